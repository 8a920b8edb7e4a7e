//! SQL identifiers and literals as keyshift writes them: quoting, 63-byte fitting, string
//! literals. The migration's DDL and the proxy's rewriter both splice names into SQL that
//! PostgreSQL parses; one rule here means a name reads back the same whichever path wrote it.

use std::borrow::Cow;

/// The key words that cannot stand as a plain identifier everywhere: PostgreSQL's
/// `RESERVED_KEYWORD`, `TYPE_FUNC_NAME_KEYWORD` and `COL_NAME_KEYWORD` (its
/// `quote_identifier` quotes every key word but an `UNRESERVED_KEYWORD`). Sorted in byte order
/// for [`slice::binary_search`].
///
/// Generated from PostgreSQL 15's `src/include/parser/kwlist.h` (151 words), plus the words
/// later releases added to those categories (16: `json`, `json_array`, `json_arrayagg`,
/// `json_object`, `json_objectagg`, `system_user`; 17: `json_exists`, `json_query`,
/// `json_scalar`, `json_serialize`, `json_table`, `json_value`, `merge_action`). keyshift
/// talks to PostgreSQL 13 and newer: quoting a word that is not a key word on an older server
/// changes nothing, while leaving one unquoted that a newer server reserves changes meaning
/// (`system_user` is a function call on 16), so the list is the union. To regenerate, for the
/// `kwlist.h` of each supported release (`postgresql-server-dev-N` installs it under
/// `/usr/include/postgresql/N/server/parser/`):
///
/// ```sh
/// for f in kwlist-*.h; do
///   grep -o 'PG_KEYWORD("[a-z_]*", [A-Z_0-9]*, [A-Z_]*' "$f" |
///     grep -v UNRESERVED_KEYWORD | cut -d'"' -f2
/// done | LC_ALL=C sort -u
/// ```
const KEYWORDS_NEEDING_QUOTES: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "json",
    "json_array",
    "json_arrayagg",
    "json_exists",
    "json_object",
    "json_objectagg",
    "json_query",
    "json_scalar",
    "json_serialize",
    "json_table",
    "json_value",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "merge_action",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// `name` as PostgreSQL's `quote_ident` writes it: unquoted only if it is lower-case ASCII
/// letters, digits and underscores, does not start with a digit, and is not a key word other
/// than an unreserved one; otherwise in double quotes, embedded quotes doubled. Borrowed when
/// no quoting is needed, since most names are plain and the rewriter quotes on every rewrite.
pub fn quote(name: &str) -> Cow<'_, str> {
    let mut bytes = name.bytes();
    let plain = matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && KEYWORDS_NEEDING_QUOTES.binary_search(&name).is_err();
    if plain {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("\"{}\"", name.replace('"', "\"\"")))
    }
}

/// `schema.table`, each part quoted as needed.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote(schema), quote(name))
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// PostgreSQL truncates identifiers to 63 bytes; two long names would then collide silently,
/// so a name that does not fit keeps a prefix and gets a short hash of the full name.
pub fn fit(name: &str) -> String {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name.to_string();
    }
    let hash = fnv1a(name.as_bytes());
    let suffix = format!("_{:08x}", hash as u32);
    let mut cut = MAX - suffix.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{}", &name[..cut], suffix)
}

/// `base` + `suffix`, fitted to 63 bytes.
pub fn suffixed(base: &str, suffix: &str) -> String {
    fit(&format!("{base}{suffix}"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_list_is_sorted_for_binary_search() {
        assert!(KEYWORDS_NEEDING_QUOTES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn plain_lower_case_names_stay_unquoted() {
        for name in ["users", "p_id", "_tmp", "t1", "id_uuid"] {
            assert_eq!(quote(name), name);
        }
    }

    #[test]
    fn keywords_that_are_not_unreserved_are_quoted() {
        // reserved, type/function-name, column-name, and one a later release reserved
        for kw in [
            "user",
            "order",
            "select",
            "between",
            "left",
            "int",
            "system_user",
        ] {
            assert_eq!(quote(kw), format!("\"{kw}\""));
        }
    }

    #[test]
    fn unreserved_keywords_stay_unquoted() {
        for kw in ["name", "value", "key", "data", "type", "comment"] {
            assert_eq!(quote(kw), kw);
        }
    }

    #[test]
    fn anything_else_is_quoted_with_quotes_doubled() {
        assert_eq!(quote("Users"), "\"Users\"");
        assert_eq!(quote("1a"), "\"1a\"");
        assert_eq!(quote("9lives"), "\"9lives\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a$b"), "\"a$b\"");
        assert_eq!(quote("café"), "\"café\"");
        assert_eq!(quote(""), "\"\"");
    }

    #[test]
    fn qualified_and_literal() {
        assert_eq!(qualified("App", "t"), "\"App\".t");
        assert_eq!(qualified("public", "order"), "public.\"order\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn long_names_fit_and_stay_distinct() {
        let a = suffixed(&"x".repeat(60), "_uuid_key");
        let b = suffixed(&format!("{}y", "x".repeat(60)), "_uuid_key");
        assert_eq!(a.len(), 63);
        assert_ne!(a, b);
        assert_eq!(suffixed("t", "_uuid"), "t_uuid");
    }
}
