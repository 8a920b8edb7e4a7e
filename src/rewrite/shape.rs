//! Statement shapes: a SQL text with its literals taken out.
//!
//! Applications that inline values (the simple protocol, pgbench's default mode, many
//! hand-written queries) send a new text for every statement, so a cache keyed by text never
//! hits. Their shapes repeat: `INSERT INTO t (a, p_id) VALUES ($1, $2)` for every
//! `INSERT INTO t (a, p_id) VALUES ('x', 5)`. [`normalize`] replaces each number and
//! standard string literal with a placeholder `$1`, `$2`, … in order, and [`substitute`] puts
//! the literals back into a rewrite of the shape.
//!
//! The cache ([`super::cache`]) trusts a shape only after checking, on its first text, that
//! rewriting the shape and substituting gives exactly the rewrite of the text itself; a shape
//! that does not (a typed literal such as `DATE '…'` that the placeholder breaks, a rule
//! identifier containing `$`) is remembered as not cacheable. Literals are opaque to the
//! rewriter, which copies expressions as text, so what holds for one text of a shape holds
//! for every text of it.
//!
//! To stay on ground where the literals' boundaries are certain, a text is not normalized
//! when it contains `$` (real parameters, dollar quoting), a backslash or an `E'`/`U&'`/`B'`/
//! `X'`/`N'` string (escape rules), or a comment.

/// A text's shape and where its literals were.
#[derive(Debug, PartialEq, Eq)]
pub struct Shape<'a> {
    pub text: String,
    pub literals: Vec<&'a str>,
}

/// The shape of `sql`, or `None` when it has no literal or cannot be normalized safely.
pub fn normalize(sql: &str) -> Option<Shape<'_>> {
    let b = sql.as_bytes();
    if b.iter().any(|&c| c == b'$' || c == b'\\') || sql.contains("--") || sql.contains("/*") {
        return None;
    }
    let mut text = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut i = 0;
    let mut copied = 0;
    let mut push = |text: &mut String, copied: &mut usize, start: usize, end: usize| {
        text.push_str(&sql[*copied..start]);
        literals.push(&sql[start..end]);
        text.push('$');
        text.push_str(&literals.len().to_string());
        *copied = end;
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            // A quoted identifier: skip to its closing quote ("" is an escaped quote).
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else if c == b'\'' {
            // A string prefixed by a letter (E'', B'', X'', N'', U&'') has other rules.
            if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'&') {
                return None;
            }
            let start = i;
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            // 'a' 'b' on two lines is one literal in SQL; keep such texts as they are.
            if b[i..]
                .iter()
                .find(|c| !c.is_ascii_whitespace())
                .is_some_and(|&c| c == b'\'')
            {
                return None;
            }
            push(&mut text, &mut copied, start, i);
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            // A keyword or identifier, digits included (t1, col_2).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if b.get(i) == Some(&b'.') {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if matches!(b.get(i), Some(b'e' | b'E')) {
                let mut j = i + 1;
                if matches!(b.get(j), Some(b'+' | b'-')) {
                    j += 1;
                }
                if b.get(j).is_some_and(u8::is_ascii_digit) {
                    i = j;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            // 1x, 0x1F, 1_000: forms whose reading depends on the server version.
            if b.get(i)
                .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
            {
                return None;
            }
            push(&mut text, &mut copied, start, i);
        } else {
            i += 1;
        }
    }
    if literals.is_empty() {
        return None;
    }
    text.push_str(&sql[copied..]);
    Some(Shape { text, literals })
}

/// `template` (a rewrite of a shape) with each placeholder `$n` replaced by `literals[n-1]`;
/// `None` when a placeholder has no literal.
pub fn substitute(template: &str, literals: &[&str]) -> Option<String> {
    let extra: usize = literals.iter().map(|l| l.len()).sum();
    let mut out = String::with_capacity(template.len() + extra * 2);
    let b = template.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let start = i;
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let n: usize = template[start + 1..i].parse().ok()?;
            let lit = literals.get(n.checked_sub(1)?)?;
            out.push_str(&template[copied..start]);
            out.push_str(lit);
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&template[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Option<(String, Vec<&str>)> {
        normalize(sql).map(|s| (s.text, s.literals))
    }

    #[test]
    fn numbers_and_strings_become_placeholders_in_order() {
        let (text, lits) =
            shape("INSERT INTO t1 (a, p_id) VALUES ('it''s', 5), ('b', -1.5e3) LIMIT .5").unwrap();
        assert_eq!(
            text,
            "INSERT INTO t1 (a, p_id) VALUES ($1, $2), ($3, -$4) LIMIT $5"
        );
        assert_eq!(lits, vec!["'it''s'", "5", "'b'", "1.5e3", ".5"]);
        assert_eq!(
            substitute(&text, &lits).unwrap(),
            "INSERT INTO t1 (a, p_id) VALUES ('it''s', 5), ('b', -1.5e3) LIMIT .5"
        );
    }

    #[test]
    fn identifiers_keywords_and_quoted_names_are_kept() {
        let (text, lits) = shape(r#"UPDATE "t 1" SET col_2 = 'x' WHERE "a""b" = 3"#).unwrap();
        assert_eq!(text, r#"UPDATE "t 1" SET col_2 = $1 WHERE "a""b" = $2"#);
        assert_eq!(lits, vec!["'x'", "3"]);
    }

    #[test]
    fn unsafe_texts_are_not_normalized() {
        for sql in [
            "SELECT 1 WHERE a = $1",
            "SELECT $$x$$",
            "SELECT E'a\\'b'",
            "SELECT 'a\\'",
            "SELECT x'1f'",
            "SELECT B'0101'",
            "SELECT U&'d'",
            "SELECT 1 -- comment 'x",
            "SELECT /* 'x */ 1",
            "SELECT 'a'\n 'b'",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT a FROM t",
        ] {
            assert_eq!(normalize(sql), None, "{sql}");
        }
    }

    #[test]
    fn substitute_replaces_repeats_and_refuses_unknown_placeholders() {
        assert_eq!(
            substitute(
                "V ($1, (SELECT u FROM p WHERE id = ($1)::int)) $2",
                &["7", "'x'"]
            )
            .unwrap(),
            "V (7, (SELECT u FROM p WHERE id = (7)::int)) 'x'"
        );
        assert_eq!(substitute("$3", &["1"]), None);
        assert_eq!(substitute("$0", &["1"]), None);
        assert_eq!(substitute("a $ b", &[]).unwrap(), "a $ b");
    }
}
