//! The cheap scan that lets statements touching no migrated child table skip the parser.
//!
//! It must never miss a mention (a miss is a write that silently loses its dual-write), while
//! a false alarm only costs a parse. So it errs one way: it does not try to skip strings or
//! comments (a name inside them is a harmless false alarm), treats double quotes as plain
//! separators (so a stray `"` inside a string literal cannot swallow a real name), compares
//! ASCII case-insensitively (a superset of PostgreSQL's folding of unquoted names, which folds
//! ASCII only), and gives up — "maybe" — on Unicode-escaped identifiers (`U&"…"`).

use std::collections::HashMap;

#[derive(Debug, Clone, Default)]
pub(crate) struct Prescan {
    /// Lowercased names made only of identifier characters, matched word by word, → the name.
    words: HashMap<Vec<u8>, String>,
    /// Bit `n` set when some word-name has length `n` (lengths ≥ 63 share bit 63): rejects
    /// most words without hashing.
    lengths: u64,
    /// Lowercased names with other characters (spaces, punctuation), matched as substrings;
    /// both as written and with `"` doubled, as a quoted identifier spells it.
    others: Vec<(Vec<u8>, String)>,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn length_bit(n: usize) -> u64 {
    1u64 << n.min(63)
}

impl Prescan {
    pub(crate) fn new<'a>(names: impl Iterator<Item = &'a str>) -> Prescan {
        let mut p = Prescan::default();
        for name in names {
            let lower = name.as_bytes().to_ascii_lowercase();
            if lower.is_empty() {
                continue;
            }
            if lower.iter().all(|&b| is_word_byte(b)) {
                p.lengths |= length_bit(lower.len());
                p.words.insert(lower, name.to_string());
            } else {
                if lower.contains(&b'"') {
                    let doubled: Vec<u8> = lower
                        .iter()
                        .flat_map(|&b| if b == b'"' { vec![b, b] } else { vec![b] })
                        .collect();
                    p.others.push((doubled, name.to_string()));
                }
                p.others.push((lower, name.to_string()));
            }
        }
        p
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.words.is_empty() && self.others.is_empty()
    }

    /// Whether `sql` may mention one of the names.
    #[cfg(test)]
    pub(crate) fn mentions(&self, sql: &str) -> bool {
        self.find(sql).is_some()
    }

    /// The first name `sql` may mention (any name, for a Unicode-escaped identifier).
    pub(crate) fn find(&self, sql: &str) -> Option<&str> {
        if self.is_empty() {
            return None;
        }
        let b = sql.as_bytes();
        if contains_unicode_escape_ident(b) {
            return self
                .words
                .values()
                .chain(self.others.iter().map(|(_, n)| n))
                .next()
                .map(String::as_str);
        }
        if !self.others.is_empty() {
            let lower = b.to_ascii_lowercase();
            if let Some((_, name)) = self
                .others
                .iter()
                .find(|(o, _)| lower.windows(o.len()).any(|w| w == o.as_slice()))
            {
                return Some(name);
            }
        }
        let mut buf = [0u8; 64];
        let mut i = 0;
        while i < b.len() {
            if !is_word_byte(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && is_word_byte(b[i]) {
                i += 1;
            }
            let n = i - start;
            if self.lengths & length_bit(n) == 0 {
                continue;
            }
            let found = if n <= buf.len() {
                for (d, s) in buf.iter_mut().zip(&b[start..i]) {
                    *d = s.to_ascii_lowercase();
                }
                self.words.get(&buf[..n])
            } else {
                self.words.get(&b[start..i].to_ascii_lowercase())
            };
            if let Some(name) = found {
                return Some(name);
            }
        }
        None
    }
}

fn contains_unicode_escape_ident(b: &[u8]) -> bool {
    b.windows(3)
        .any(|w| (w[0] == b'U' || w[0] == b'u') && w[1] == b'&' && w[2] == b'"')
}

#[cfg(test)]
mod tests {
    use super::Prescan;

    fn scan(names: &[&str], sql: &str) -> bool {
        Prescan::new(names.iter().copied()).mentions(sql)
    }

    #[test]
    fn finds_plain_quoted_and_qualified_names() {
        let names = ["orders"];
        assert!(scan(&names, "INSERT INTO orders (a) VALUES (1)"));
        assert!(scan(&names, "insert into ORDERS values (1)"));
        assert!(scan(&names, "INSERT INTO \"orders\" VALUES (1)"));
        assert!(scan(&names, "INSERT INTO public.orders VALUES (1)"));
        assert!(scan(
            &names,
            "INSERT INTO \"public\".\"orders\"(a) VALUES (1)"
        ));
        assert!(scan(&names, "UPDATE x SET a=1;UPDATE orders SET b=2"));
    }

    #[test]
    fn ignores_other_names_and_longer_words() {
        let names = ["orders"];
        assert!(!scan(&names, "SELECT 1"));
        assert!(!scan(&names, "INSERT INTO orders_archive VALUES (1)"));
        assert!(!scan(&names, "INSERT INTO my_orders VALUES (1)"));
        assert!(!scan(&names, "UPDATE order SET a = 1"));
        assert!(!scan(&[], "INSERT INTO orders VALUES (1)"));
    }

    #[test]
    fn a_quote_inside_a_string_cannot_hide_a_name() {
        let names = ["c"];
        assert!(scan(
            &names,
            "INSERT INTO x VALUES ('a\"b'); INSERT INTO c VALUES (1)"
        ));
    }

    #[test]
    fn mixed_case_and_spaced_names() {
        assert!(scan(&["Orders"], "INSERT INTO \"Orders\" VALUES (1)"));
        assert!(scan(
            &["Order Lines"],
            "INSERT INTO \"Order Lines\" VALUES (1)"
        ));
        assert!(scan(&["a\"b"], "INSERT INTO \"a\"\"b\" VALUES (1)"));
        assert!(!scan(
            &["Order Lines"],
            "INSERT INTO order_lines VALUES (1)"
        ));
    }

    #[test]
    fn non_ascii_names_and_text() {
        assert!(scan(&["café"], "INSERT INTO café VALUES (1)"));
        assert!(!scan(&["café"], "INSERT INTO cafés VALUES ('é')"));
        assert!(scan(&["c"], "SELECT 'é'; INSERT INTO c VALUES (1)"));
    }

    #[test]
    fn unicode_escaped_identifiers_are_a_maybe() {
        assert!(scan(&["data"], "INSERT INTO U&\"d\\0061ta\" VALUES (1)"));
    }

    #[test]
    fn names_in_strings_and_comments_are_harmless_false_alarms() {
        assert!(scan(&["orders"], "SELECT 'orders' -- orders"));
    }
}
