//! A PostgreSQL lexer, just enough to tell identifiers from everything else: string literals
//! (`'…'` with `''`, `E'…'` with backslash escapes, `B'…'`, `X'…'`, `N'…'`, `U&'…'`),
//! dollar-quoted strings (`$tag$…$tag$`, as opposed to the parameter `$1`), `--` and nested
//! `/* /* */ */` comments, quoted identifiers (`"…"` with `""`, `U&"…"`), numbers, and
//! single-byte punctuation. It follows PostgreSQL's scan.l where that decides what is an
//! identifier; it does not validate (an unterminated literal or comment runs to the end of the
//! text: PostgreSQL rejects the whole message then, so nothing in it runs).
//!
//! It runs on every statement through the proxy (the prescan), so it works on bytes, never
//! allocates, and looks at each byte once. Indexing is through `get`: the text is the
//! client's.
//!
//! One setting changes where a literal ends: with `standard_conforming_strings = off` a
//! backslash escapes the next character in a plain `'…'` string too. keyshift does not track
//! it per session, so the lexer reads plain strings the standard way and records in
//! [`Lexer::ambiguous`] that a plain string held a backslash; callers that must never miss a
//! name lex such a text a second time with [`Lexer::backslash_strings`].

/// What a token is, as far as the prescan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An unquoted word: an identifier or a keyword. PostgreSQL folds its ASCII letters to
    /// lower case.
    Word,
    /// `"…"`: the identifier between the quotes, `""` standing for `"`, case kept.
    Quoted,
    /// `U&"…"`: a quoted identifier with Unicode escapes (see [`unicode_ident`]).
    UnicodeQuoted,
    /// A string literal of any kind, a dollar-quoted string, a number or a parameter.
    Literal,
    /// One byte of punctuation or of an operator (`(`, `)`, `,`, `.`, `;`, `*`, …).
    Punct(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: Kind,
    /// Byte offsets of the whole token in the text (quotes and prefixes included).
    pub start: usize,
    pub end: usize,
}

const START: u8 = 1;
const CONT: u8 = 2;
const SPACE: u8 = 4;

/// Byte classes, from scan.l: `ident_start [A-Za-z\200-\377_]`, `ident_cont [A-Za-z\200-\377_0-9\$]`,
/// `space [ \t\n\r\f\v]`.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            t[i] = START | CONT;
        } else if c.is_ascii_digit() || c == b'$' {
            t[i] = CONT;
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            t[i] = SPACE;
        }
        i += 1;
    }
    t
};

fn class(c: u8) -> u8 {
    CLASS[usize::from(c)]
}

/// A dollar-quote tag character after the first (scan.l's `dolq_cont`: no `$`).
fn tag_cont(c: u8) -> bool {
    class(c) & CONT != 0 && c != b'$'
}

#[derive(Clone)]
pub(crate) struct Lexer<'a> {
    b: &'a [u8],
    pos: usize,
    /// Read plain `'…'` strings as with `standard_conforming_strings = off`.
    backslash_strings: bool,
    /// A plain string held a backslash, so where it ends depends on
    /// `standard_conforming_strings` (only set when lexing the standard way).
    pub ambiguous: bool,
}

impl<'a> Lexer<'a> {
    /// Lexes `sql` as PostgreSQL does with `standard_conforming_strings = on`, the default.
    pub(crate) fn new(sql: &'a str) -> Lexer<'a> {
        Lexer {
            b: sql.as_bytes(),
            pos: 0,
            backslash_strings: false,
            ambiguous: false,
        }
    }

    /// Lexes as with `standard_conforming_strings = off`.
    pub(crate) fn backslash_strings(sql: &'a str) -> Lexer<'a> {
        Lexer {
            backslash_strings: true,
            ..Lexer::new(sql)
        }
    }

    fn at(&self, i: usize) -> u8 {
        // 0 is never a byte the lexer looks for, so it doubles as "past the end".
        self.b.get(i).copied().unwrap_or(0)
    }

    /// From just after an opening `'`: the end of the string. `backslash`: `\` escapes the
    /// next byte. `doubled`: `''` is a quote (not in `B'…'` and `X'…'`).
    fn quoted_string(&mut self, mut i: usize, backslash: bool, doubled: bool) -> usize {
        let standard = !backslash;
        loop {
            match self.b.get(i) {
                None => return self.b.len(),
                Some(b'\'') => {
                    if doubled && self.at(i + 1) == b'\'' {
                        i += 2;
                    } else {
                        return i + 1;
                    }
                }
                Some(b'\\') if backslash => i += 2,
                Some(b'\\') => {
                    if standard && doubled {
                        self.ambiguous = true;
                    }
                    i += 1;
                }
                Some(_) => i += 1,
            }
        }
    }

    /// From an opening `"`: the end of the quoted identifier.
    fn quoted_ident(&self, mut i: usize) -> usize {
        i += 1;
        loop {
            match self.b.get(i) {
                None => return self.b.len(),
                Some(b'"') if self.at(i + 1) == b'"' => i += 2,
                Some(b'"') => return i + 1,
                Some(_) => i += 1,
            }
        }
    }

    /// From a `$`: a parameter, a dollar-quoted string, or a lone `$`.
    fn dollar(&self, start: usize) -> (Kind, usize) {
        let mut i = start + 1;
        if self.at(i).is_ascii_digit() {
            while self.at(i).is_ascii_digit() {
                i += 1;
            }
            return (Kind::Literal, i);
        }
        if class(self.at(i)) & START != 0 {
            while tag_cont(self.at(i)) {
                i += 1;
            }
        }
        if self.at(i) != b'$' {
            return (Kind::Punct(b'$'), start + 1);
        }
        let tag = &self.b[start..=i];
        let body = i + 1;
        let end = self
            .b
            .get(body..)
            .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
            .map_or(self.b.len(), |p| body + p + tag.len());
        (Kind::Literal, end)
    }

    fn number(&self, mut i: usize) -> usize {
        while self.at(i).is_ascii_digit() {
            i += 1;
        }
        if self.at(i) == b'.' && self.at(i + 1) != b'.' {
            i += 1;
            while self.at(i).is_ascii_digit() {
                i += 1;
            }
        }
        if matches!(self.at(i), b'e' | b'E') {
            let sign = usize::from(matches!(self.at(i + 1), b'+' | b'-'));
            if self.at(i + 1 + sign).is_ascii_digit() {
                i += 1 + sign;
                while self.at(i).is_ascii_digit() {
                    i += 1;
                }
            }
        }
        i
    }

    /// Skips a nested `/* … */` comment starting at `i`.
    fn block_comment(&self, mut i: usize) -> usize {
        let mut depth = 0usize;
        loop {
            match (self.b.get(i), self.at(i + 1)) {
                (None, _) => return self.b.len(),
                (Some(b'/'), b'*') => {
                    depth += 1;
                    i += 2;
                }
                (Some(b'*'), b'/') => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        return i;
                    }
                }
                _ => i += 1,
            }
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        loop {
            let start = self.pos;
            let c = *self.b.get(start)?;
            let (kind, end) = match c {
                _ if class(c) & SPACE != 0 => {
                    self.pos += 1;
                    continue;
                }
                b'-' if self.at(start + 1) == b'-' => {
                    let mut i = start + 2;
                    while !matches!(self.b.get(i), None | Some(b'\n' | b'\r')) {
                        i += 1;
                    }
                    self.pos = i;
                    continue;
                }
                b'/' if self.at(start + 1) == b'*' => {
                    self.pos = self.block_comment(start);
                    continue;
                }
                b'\'' => {
                    let bs = self.backslash_strings;
                    (Kind::Literal, self.quoted_string(start + 1, bs, true))
                }
                b'"' => (Kind::Quoted, self.quoted_ident(start)),
                b'$' => self.dollar(start),
                b'0'..=b'9' => (Kind::Literal, self.number(start)),
                b'.' if self.at(start + 1).is_ascii_digit() => {
                    (Kind::Literal, self.number(start + 1))
                }
                _ if class(c) & START != 0 => {
                    let next = self.at(start + 1);
                    match (c, next) {
                        (b'e' | b'E', b'\'') => {
                            (Kind::Literal, self.quoted_string(start + 2, true, true))
                        }
                        (b'b' | b'B' | b'x' | b'X', b'\'') => {
                            (Kind::Literal, self.quoted_string(start + 2, false, false))
                        }
                        (b'n' | b'N', b'\'') => {
                            let bs = self.backslash_strings;
                            (Kind::Literal, self.quoted_string(start + 2, bs, true))
                        }
                        // U&'…' is an error without standard_conforming_strings: read it
                        // the standard way in both modes.
                        (b'u' | b'U', b'&') if self.at(start + 2) == b'\'' => {
                            (Kind::Literal, self.quoted_string(start + 3, false, true))
                        }
                        (b'u' | b'U', b'&') if self.at(start + 2) == b'"' => {
                            (Kind::UnicodeQuoted, self.quoted_ident(start + 2))
                        }
                        _ => {
                            let mut i = start + 1;
                            while class(self.at(i)) & CONT != 0 {
                                i += 1;
                            }
                            (Kind::Word, i)
                        }
                    }
                }
                _ => (Kind::Punct(c), start + 1),
            };
            self.pos = end;
            return Some(Token { kind, start, end });
        }
    }
}

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes (63 in every build we know of),
/// at a character boundary: a longer identifier names the table of its first 63 bytes.
pub(crate) const MAX_IDENT_BYTES: usize = 63;

/// `v` cut to what PostgreSQL keeps of an identifier.
pub(crate) fn truncated(v: &[u8]) -> &[u8] {
    if v.len() <= MAX_IDENT_BYTES {
        return v;
    }
    let mut n = MAX_IDENT_BYTES;
    while n > 0 && v.get(n).is_some_and(|&c| c & 0xC0 == 0x80) {
        n -= 1;
    }
    v.get(..n).unwrap_or(v)
}

/// The bytes between the quotes of a `"…"` token (an unterminated one runs to the end).
pub(crate) fn quoted_inner(raw: &[u8]) -> &[u8] {
    let inner = raw.get(1..).unwrap_or_default();
    match inner.last() {
        Some(b'"') => inner.get(..inner.len() - 1).unwrap_or_default(),
        _ => inner,
    }
}

/// The name a `U&"…"` identifier spells (its raw token text), or `None` when it cannot be
/// decoded here: a `UESCAPE` clause follows (`followed_by_uescape`) or an escape is invalid
/// (PostgreSQL rejects it). Escapes are `\XXXX`, `\+XXXXXX` and `\\`.
pub(crate) fn unicode_ident(raw: &[u8], followed_by_uescape: bool) -> Option<String> {
    if followed_by_uescape {
        return None;
    }
    let inner = quoted_inner(raw.get(2..)?);
    let text = std::str::from_utf8(inner).ok()?.replace("\"\"", "\"");
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch != '\\' {
            out.push(ch);
            continue;
        }
        let rest = chars.as_str();
        let (digits, len) = if rest.starts_with('\\') {
            out.push('\\');
            chars.next();
            continue;
        } else if let Some(r) = rest.strip_prefix('+') {
            (r.get(..6)?, 7)
        } else {
            (rest.get(..4)?, 4)
        };
        if !digits.bytes().all(|d| d.is_ascii_hexdigit()) {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(digits, 16).ok()?)?);
        for _ in 0..len {
            chars.next();
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (kind, text) of every token.
    fn lex(sql: &str) -> Vec<(Kind, &str)> {
        Lexer::new(sql)
            .map(|t| (t.kind, &sql[t.start..t.end]))
            .collect()
    }

    fn words(sql: &str) -> Vec<&str> {
        lex(sql)
            .into_iter()
            .filter(|(k, _)| matches!(k, Kind::Word | Kind::Quoted | Kind::UnicodeQuoted))
            .map(|(_, t)| t)
            .collect()
    }

    #[test]
    fn literals_hide_their_content() {
        assert_eq!(words("SELECT 'a c''d' c"), ["SELECT", "c"]);
        assert_eq!(words("SELECT E'a\\'c' c"), ["SELECT", "c"]);
        assert_eq!(words("SELECT e'a\\\\' c"), ["SELECT", "c"]);
        assert_eq!(words("SELECT B'01' c, X'1F' d"), ["SELECT", "c", "d"]);
        assert_eq!(words("SELECT N'c' x"), ["SELECT", "x"]);
        assert_eq!(words("SELECT U&'d\\0061ta' x"), ["SELECT", "x"]);
        // B'' ends at the first quote: the next one opens a plain string.
        assert_eq!(words("SELECT B'0''x' y"), ["SELECT", "y"]);
        assert_eq!(
            words("SELECT $$insert into c$$, $q$ c $$ $q$ x"),
            ["SELECT", "x"]
        );
        assert_eq!(words("SELECT $1, $23 c"), ["SELECT", "c"]);
        assert_eq!(words("SELECT 'unterminated c"), ["SELECT"]);
        assert_eq!(words("SELECT $a$ unterminated c"), ["SELECT"]);
    }

    #[test]
    fn comments_hide_their_content() {
        assert_eq!(words("SELECT 1 -- insert into c\n, d"), ["SELECT", "d"]);
        assert_eq!(words("SELECT 1 --c\rd"), ["SELECT", "d"]);
        assert_eq!(words("SELECT /* a /* c */ c */ d"), ["SELECT", "d"]);
        assert_eq!(words("SELECT 1 /* c"), ["SELECT"]);
        assert_eq!(words("SELECT 1+--c\n2"), ["SELECT"]);
    }

    #[test]
    fn identifiers() {
        assert_eq!(
            lex("a$b$c \"C\"\"x\" U&\"c\" _é1 x.y"),
            [
                (Kind::Word, "a$b$c"),
                (Kind::Quoted, "\"C\"\"x\""),
                (Kind::UnicodeQuoted, "U&\"c\""),
                (Kind::Word, "_é1"),
                (Kind::Word, "x"),
                (Kind::Punct(b'.'), "."),
                (Kind::Word, "y"),
            ]
        );
        // A prefix letter is a prefix only right before the quote.
        assert_eq!(words("SELECT be'x' c"), ["SELECT", "be", "c"]);
        assert_eq!(words("SELECT 1e5c, 1.5 d, .5 e"), ["SELECT", "c", "d", "e"]);
        assert_eq!(words("SELECT 1ec"), ["SELECT", "ec"]);
    }

    #[test]
    fn backslashes_in_plain_strings_are_ambiguous() {
        let sql = "SELECT 'a\\', c, '";
        let mut l = Lexer::new(sql);
        let standard: Vec<_> = l.by_ref().map(|t| &sql[t.start..t.end]).collect();
        assert!(l.ambiguous);
        assert!(standard.contains(&"c"));
        let sql = "SELECT 'a\\'', c";
        let off: Vec<_> = Lexer::backslash_strings(sql)
            .map(|t| &sql[t.start..t.end])
            .collect();
        assert!(off.contains(&"c"), "{off:?}");
        let mut l = Lexer::new("SELECT E'\\\\', B'\\'");
        l.by_ref().count();
        assert!(!l.ambiguous);
    }

    #[test]
    fn unicode_identifiers_decode() {
        assert_eq!(
            unicode_ident(b"U&\"d\\0061t\\+000061\"", false).as_deref(),
            Some("data")
        );
        assert_eq!(
            unicode_ident(b"u&\"a\\\\b\"\"\"", false).as_deref(),
            Some("a\\b\"")
        );
        assert_eq!(unicode_ident(b"U&\"c\"", true), None);
        assert_eq!(unicode_ident(b"U&\"\\00zz\"", false), None);
        assert_eq!(unicode_ident(b"U&\"\\00\"", false), None);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let long = "a".repeat(70);
        assert_eq!(truncated(long.as_bytes()).len(), 63);
        let accents = "é".repeat(40);
        assert_eq!(truncated(accents.as_bytes()).len(), 62);
        assert_eq!(truncated(b"c"), b"c");
    }

    #[test]
    fn never_panics_on_odd_bytes() {
        for sql in [
            "$", "$$", "$a", "'", "\"", "E'\\", "U&", "u&\"", "/*", "-", "1e", "1e+", ".", "é'",
        ] {
            let _ = lex(sql);
        }
    }
}
