//! Text-splicing machinery: tokens with byte offsets into the original SQL, list splitting at
//! top-level commas, and edits (insertions, replacements) applied to the original text.
//!
//! The rewriter never prints an AST back: sqlparser's printer drops comments and can change
//! meaning (`SELECT - -1` prints as a comment), and its spans of compound expressions are
//! wrong (`$1::uuid` spans `$1`). It uses the AST only to learn what a statement is, then
//! finds everything it copies or extends here, in the original tokens.

use std::borrow::Cow;
use std::ops::Range;

use sqlparser::ast::Ident;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

/// A significant token (not whitespace or comment) and where it sits in the SQL text. The
/// token itself stays in `Source::raw` (see [`Source::token`]): cloning it would allocate.
#[derive(Debug, Clone)]
pub(crate) struct Tok {
    pub start: usize,
    pub end: usize,
    pub loc: (u64, u64),
    /// Index of this token in `Source::raw`.
    pub raw: usize,
}

/// One SQL text, tokenized once.
pub(crate) struct Source<'a> {
    pub sql: &'a str,
    /// Every token including whitespace and comments, as the parser wants them.
    pub raw: Vec<TokenWithSpan>,
    pub toks: Vec<Tok>,
}

/// A `;`-separated statement: significant tokens `from..to`, raw tokens `raw_from..raw_to`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub from: usize,
    pub to: usize,
    pub raw_from: usize,
    pub raw_to: usize,
}

impl<'a> Source<'a> {
    pub(crate) fn tokenize(
        sql: &'a str,
    ) -> Result<Source<'a>, sqlparser::tokenizer::TokenizerError> {
        let raw = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location()?;
        // Locations are (line, column) counted in characters, with only '\n' starting a line
        // (mirroring the tokenizer's own counting); walk the text once to turn them into byte
        // offsets, so multi-byte UTF-8 and "\r\n" land where they should.
        let mut starts = Vec::with_capacity(raw.len());
        let mut chars = sql.char_indices();
        let (mut line, mut col, mut byte) = (1u64, 1u64, 0usize);
        for t in &raw {
            let want = (t.span.start.line, t.span.start.column);
            while (line, col) < want {
                match chars.next() {
                    Some((_, ch)) => {
                        byte += ch.len_utf8();
                        if ch == '\n' {
                            line += 1;
                            col = 1;
                        } else {
                            col += 1;
                        }
                    }
                    None => break,
                }
            }
            starts.push(byte);
        }
        let mut toks = Vec::with_capacity(raw.len());
        for (i, t) in raw.iter().enumerate() {
            if matches!(t.token, Token::Whitespace(_) | Token::EOF) {
                continue;
            }
            let start = starts[i];
            let end = starts.get(i + 1).copied().unwrap_or(sql.len()).max(start);
            toks.push(Tok {
                start,
                end,
                loc: (t.span.start.line, t.span.start.column),
                raw: i,
            });
        }
        Ok(Source { sql, raw, toks })
    }

    pub(crate) fn token(&self, i: usize) -> &Token {
        self.toks
            .get(i)
            .and_then(|t| self.raw.get(t.raw))
            .map_or(&Token::EOF, |t| &t.token)
    }

    /// Splits at top-level `;`. Empty statements are dropped.
    pub(crate) fn pieces(&self) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut depth = 0i64;
        let mut from = 0;
        let mut raw_from = 0;
        for (i, t) in self.toks.iter().enumerate() {
            match self.raw[t.raw].token {
                Token::LParen | Token::LBracket => depth += 1,
                Token::RParen | Token::RBracket => depth -= 1,
                Token::SemiColon if depth <= 0 => {
                    if from < i {
                        out.push(Piece {
                            from,
                            to: i,
                            raw_from,
                            raw_to: t.raw,
                        });
                    }
                    from = i + 1;
                    raw_from = t.raw + 1;
                    depth = 0;
                }
                _ => {}
            }
        }
        if from < self.toks.len() {
            out.push(Piece {
                from,
                to: self.toks.len(),
                raw_from,
                raw_to: self.raw.len(),
            });
        }
        out
    }

    /// The text of significant tokens `a..b`, verbatim (inner comments included).
    pub(crate) fn text(&self, a: usize, b: usize) -> &'a str {
        if a >= b || b > self.toks.len() {
            return "";
        }
        self.sql
            .get(self.toks[a].start..self.toks[b - 1].end)
            .unwrap_or("")
    }

    pub(crate) fn index_at(&self, loc: Location) -> Option<usize> {
        let key = (loc.line, loc.column);
        self.toks.binary_search_by(|t| t.loc.cmp(&key)).ok()
    }

    pub(crate) fn ident_index(&self, id: &Ident) -> Option<usize> {
        self.index_at(id.span.start)
    }

    pub(crate) fn kw(&self, i: usize, kw: Keyword) -> bool {
        matches!(self.token(i), Token::Word(w) if w.keyword == kw && w.quote_style.is_none())
    }

    pub(crate) fn is(&self, i: usize, tok: &Token) -> bool {
        i < self.toks.len() && self.token(i) == tok
    }

    pub(crate) fn end(&self, i: usize) -> usize {
        self.toks.get(i).map_or(self.sql.len(), |t| t.end)
    }

    pub(crate) fn start(&self, i: usize) -> usize {
        self.toks.get(i).map_or(self.sql.len(), |t| t.start)
    }

    /// The `)` matching the `(` at `open`, not looking past `limit`.
    pub(crate) fn close_paren(&self, open: usize, limit: usize) -> Option<usize> {
        if !self.is(open, &Token::LParen) {
            return None;
        }
        let mut depth = 0i64;
        for i in open..limit.min(self.toks.len()) {
            match self.token(i) {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Splits the comma-separated list starting at `from` into items `(start, end)`, stopping
    /// before `limit`, a `)` or `]` that closes an enclosing group, or a top-level token for
    /// which `stop` says so. Parentheses, brackets and CASE…END nest. Returns the items and the
    /// stop index; `None` when an item is empty (the list is not what the AST said).
    pub(crate) fn split_list(
        &self,
        from: usize,
        limit: usize,
        stop: impl Fn(&Source, usize) -> bool,
    ) -> Option<(Vec<(usize, usize)>, usize)> {
        let limit = limit.min(self.toks.len());
        let mut items = Vec::new();
        let mut depth = 0i64;
        let mut start = from;
        let mut i = from;
        while i < limit {
            let t = self.token(i);
            if depth == 0
                && (matches!(t, Token::RParen | Token::RBracket | Token::SemiColon)
                    || stop(self, i))
            {
                break;
            }
            match t {
                Token::LParen | Token::LBracket => depth += 1,
                Token::RParen | Token::RBracket => depth -= 1,
                Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::CASE => {
                    depth += 1
                }
                Token::Word(w)
                    if w.quote_style.is_none() && w.keyword == Keyword::END && depth > 0 =>
                {
                    depth -= 1
                }
                Token::Comma if depth == 0 => {
                    if start == i {
                        return None;
                    }
                    items.push((start, i));
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        if start < i {
            items.push((start, i));
        } else if !items.is_empty() {
            return None;
        }
        Some((items, i))
    }

    /// Whether significant tokens `a..b` are exactly the unquoted keyword `kw`.
    pub(crate) fn only_kw(&self, a: usize, b: usize, kw: Keyword) -> bool {
        b == a + 1 && self.kw(a, kw)
    }
}

/// Edits of the original text: insertions, and replacements of byte ranges. Positions always
/// refer to the original text, so edits can be added in any order.
///
/// At one position, the insertions come out first, in the order they were added, then the
/// replacement of a range starting there. Replaced ranges do not overlap, and nothing is
/// inserted strictly inside one: [`Edits::apply`] answers `None` for such a set rather than
/// guess.
#[derive(Debug, Default, Clone)]
pub(crate) struct Edits {
    ins: Vec<(usize, String)>,
    reps: Vec<(Range<usize>, String)>,
}

impl Edits {
    pub(crate) fn insert(&mut self, pos: usize, text: String) {
        self.ins.push((pos, text));
    }

    /// Replaces the original text of `range` with `text` (an empty range is an insertion).
    pub(crate) fn replace(&mut self, range: Range<usize>, text: String) {
        if range.is_empty() {
            self.insert(range.start, text);
        } else {
            self.reps.push((range, text));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ins.is_empty() && self.reps.is_empty()
    }

    /// Whether an edit falls inside `range` (an insertion at `range.end` does not): whether
    /// [`Edits::apply`] could give anything but the original text of `range`.
    pub(crate) fn touches(&self, range: Range<usize>) -> bool {
        self.ins.iter().any(|(p, _)| range.contains(p))
            || self
                .reps
                .iter()
                .any(|(r, _)| r.start < range.end && range.start < r.end)
    }

    /// Applies the edits that fall in `range` (insertions at `range.end` included) to that
    /// slice of `sql`. `None` when a replaced range crosses a bound of `range` or overlaps
    /// another, when an insertion falls strictly inside a replaced range, or when a position
    /// is not on a character boundary of `sql`.
    pub(crate) fn apply(&self, sql: &str, range: Range<usize>) -> Option<String> {
        let mut ins: Vec<&(usize, String)> = self
            .ins
            .iter()
            .filter(|(p, _)| range.contains(p) || *p == range.end)
            .collect();
        ins.sort_by_key(|(p, _)| *p);
        let mut reps: Vec<&(Range<usize>, String)> = Vec::new();
        for rep in &self.reps {
            let r = &rep.0;
            if r.end <= range.start || r.start >= range.end {
                continue;
            }
            if r.start < range.start || r.end > range.end {
                return None;
            }
            reps.push(rep);
        }
        reps.sort_by_key(|(r, _)| r.start);
        if reps.windows(2).any(|w| w[0].0.end > w[1].0.start)
            || ins
                .iter()
                .any(|(p, _)| reps.iter().any(|(r, _)| r.start < *p && *p < r.end))
        {
            return None;
        }
        let extra: usize = ins.iter().map(|(_, t)| t.len()).sum::<usize>()
            + reps.iter().map(|(_, t)| t.len()).sum::<usize>();
        let mut out = String::with_capacity(range.len() + extra);
        let mut at = range.start;
        let mut reps = reps.into_iter().peekable();
        for (p, t) in ins {
            while let Some((r, rt)) = reps.next_if(|(r, _)| r.start < *p) {
                out.push_str(sql.get(at..r.start)?);
                out.push_str(rt);
                at = r.end;
            }
            out.push_str(sql.get(at..*p)?);
            out.push_str(t);
            at = *p;
        }
        for (r, rt) in reps {
            out.push_str(sql.get(at..r.start)?);
            out.push_str(rt);
            at = r.end;
        }
        out.push_str(sql.get(at..range.end)?);
        Some(out)
    }
}

/// The name as PostgreSQL stores it: unquoted names fold to lower case (ASCII only, as
/// PostgreSQL does for multi-byte encodings).
pub(crate) fn folded(id: &Ident) -> Cow<'_, str> {
    if id.quote_style.is_some() || !id.value.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Borrowed(&id.value)
    } else {
        Cow::Owned(id.value.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_offsets_survive_multibyte_text_and_crlf() {
        let sql = "INSERT INTO c (a, p_id)\r\n VALUES ('é€😀', 7) -- ü\n; SELECT 'ß', x";
        let src = Source::tokenize(sql).unwrap();
        for t in &src.toks {
            let text = &sql[t.start..t.end];
            match &src.raw[t.raw].token {
                Token::Word(w) => assert_eq!(text, w.value),
                Token::SingleQuotedString(s) => assert_eq!(text, format!("'{s}'")),
                Token::Number(n, _) => assert_eq!(text, n),
                _ => {}
            }
        }
        let pieces = src.pieces();
        assert_eq!(pieces.len(), 2);
        assert_eq!(src.text(pieces[1].from, pieces[1].to), "SELECT 'ß', x");
    }

    #[test]
    fn edits_insert_and_replace_at_original_positions() {
        let sql = "COPY c (p_id, \"a\") FROM STDIN";
        let mut e = Edits::default();
        assert!(e.is_empty());
        // Added out of order; at one position, insertions keep the order they were added in
        // and come before a replacement starting there.
        e.replace(14..17, "\"a_legacy\"".into());
        e.insert(8, "/*1*/".into());
        e.replace(8..12, "p_id_legacy".into());
        e.insert(5, "s.".into());
        e.insert(5, "t".into());
        assert!(!e.is_empty());
        assert_eq!(
            e.apply(sql, 0..sql.len()).unwrap(),
            "COPY s.tc (/*1*/p_id_legacy, \"a_legacy\") FROM STDIN"
        );
        // A slice takes only the edits inside it: an insertion at its end is in, a
        // replacement ending at its start or starting at its end is not.
        assert_eq!(e.apply(sql, 8..13).unwrap(), "/*1*/p_id_legacy,");
        assert_eq!(e.apply(sql, 12..14).unwrap(), ", ");
        assert_eq!(e.apply(sql, 0..5).unwrap(), "COPY s.t");
        assert!(e.touches(9..10));
        assert!(e.touches(4..6));
        assert!(!e.touches(12..14));
        assert!(!e.touches(0..5));
        // A replacement crossing the slice's bounds cannot be applied to it.
        assert_eq!(e.apply(sql, 10..20), None);
        assert_eq!(e.apply(sql, 0..9), None);
        assert_eq!(e.apply(sql, 9..10), None);
    }

    #[test]
    fn edits_refuse_what_has_no_single_meaning() {
        let sql = "abcdefgh";
        let mut overlap = Edits::default();
        overlap.replace(1..4, "x".into());
        overlap.replace(3..6, "y".into());
        assert_eq!(overlap.apply(sql, 0..8), None);
        let mut inside = Edits::default();
        inside.replace(1..4, "x".into());
        inside.insert(2, "y".into());
        assert_eq!(inside.apply(sql, 0..8), None);
        // Adjacent replacements, and insertions at both ends of one, are fine.
        let mut ok = Edits::default();
        ok.replace(1..3, "X".into());
        ok.replace(3..5, "Y".into());
        ok.insert(5, "|".into());
        ok.replace(6..6, "_".into());
        assert_eq!(ok.apply(sql, 0..8).unwrap(), "aXY|f_gh");
        // Not on a character boundary.
        let mut mid = Edits::default();
        mid.insert(1, "x".into());
        assert_eq!(mid.apply("é", 0..2), None);
    }

    #[test]
    fn splits_lists_with_nesting() {
        let sql = "(a, f(b, c), CASE WHEN x THEN 1 ELSE 2 END, d[1, 2]) tail";
        let src = Source::tokenize(sql).unwrap();
        let (items, stop) = src.split_list(1, usize::MAX, |_, _| false).unwrap();
        let texts: Vec<&str> = items.iter().map(|&(a, b)| src.text(a, b)).collect();
        assert_eq!(
            texts,
            ["a", "f(b, c)", "CASE WHEN x THEN 1 ELSE 2 END", "d[1, 2]"]
        );
        assert!(src.is(stop, &Token::RParen));
        assert_eq!(src.close_paren(0, usize::MAX), Some(stop));
    }
}
