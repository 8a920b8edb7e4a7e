//! A statement's shape without its literals, for logging skipped writes (issue 4: "logged
//! once per statement shape, without literals").

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// `sql` with every literal (strings of any quoting, numbers) replaced by `?`, comments
/// dropped and whitespace runs collapsed; at most `max` bytes. Text that does not tokenize
/// gives a placeholder with its length only, since it may hold anything.
pub fn redact(sql: &str, max: usize) -> String {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return format!("<untokenizable statement, {} bytes>", sql.len());
    };
    let mut out = String::new();
    let mut space = false;
    for t in tokens {
        let piece = match &t {
            Token::Whitespace(_) => {
                space = !out.is_empty();
                continue;
            }
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_) => "?".to_string(),
            other => other.to_string(),
        };
        if space {
            out.push(' ');
            space = false;
        }
        out.push_str(&piece);
        if out.len() > max {
            let mut end = max;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push('…');
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn drops_literals_and_comments() {
        assert_eq!(
            redact(
                "INSERT INTO c (a, p_id) VALUES ('secret', 42) -- who\n RETURNING $1",
                200
            ),
            "INSERT INTO c (a, p_id) VALUES (?, ?) RETURNING $1"
        );
        assert_eq!(redact("SELECT E'x\\'y', $$z$$", 200), "SELECT ?, ?");
        assert_eq!(
            redact("SELECT 'unterminated", 200),
            "<untokenizable statement, 20 bytes>"
        );
        assert_eq!(redact("SELECT abcdef", 8), "SELECT a…");
    }
}
