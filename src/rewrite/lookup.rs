//! The expression that computes a twin column from the copied text of the value written to
//! its source column.

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::SkipReason;
use super::edit::{Edits, Source};
use super::rules::Fill;
use crate::ident::quote;

/// Functions whose second evaluation would give a different value than the first, so the
/// copied expression would compute the twin of some other row. Only the common built-ins are
/// known; a volatile user function goes unnoticed (documented limitation).
const VOLATILE: &[&str] = &[
    "nextval",
    "setval",
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "clock_timestamp",
    "timeofday",
    "txid_current",
];

/// What to write into the twin, given the tokens `a..b` written to the source column.
/// `DEFAULT` stays `DEFAULT` (the twin has no default, so it is NULL like an FK without one),
/// `NULL` stays `NULL`.
pub(crate) fn twin_value(
    src: &Source,
    a: usize,
    b: usize,
    fill: &Fill,
    ctes: &[String],
    redirects: &Edits,
) -> Result<String, SkipReason> {
    if src.only_kw(a, b, Keyword::DEFAULT) {
        return Ok("DEFAULT".to_string());
    }
    if src.only_kw(a, b, Keyword::NULL) {
        return Ok("NULL".to_string());
    }
    let mut refers_to_columns = false;
    for i in a..b {
        if let Token::Word(w) = src.token(i) {
            let after_cast = i > a && src.is(i - 1, &Token::DoubleColon);
            if !after_cast && src.is(i + 1, &Token::LParen) && w.quote_style.is_none() {
                let name = w.value.to_ascii_lowercase();
                if VOLATILE.contains(&name.as_str()) {
                    return Err(SkipReason::Volatile);
                }
            }
            let constant = w.quote_style.is_none()
                && matches!(w.keyword, Keyword::NULL | Keyword::TRUE | Keyword::FALSE);
            if !after_cast && !constant {
                refers_to_columns = true;
            }
        }
    }
    let text = src.text(a, b);
    let range = src.start(a)..src.start(a) + text.len();
    if !redirects.touches(range.clone()) {
        return Ok(lookup(fill, text, refers_to_columns, ctes));
    }
    // The copy of a translated statement's expression reads the same views it does.
    let text = redirects
        .apply(src.sql, range)
        .ok_or(SkipReason::Internal)?;
    Ok(lookup(fill, &text, refers_to_columns, ctes))
}

/// `(SELECT id_uuid FROM public.p WHERE id = (E)::bigint)`.
///
/// When E may name columns it is evaluated where the parent's columns are out of scope:
/// inside `FROM public.p` an unqualified `id` in E would bind to `p.id` instead of the outer
/// row's column (`INSERT INTO c (p_id) SELECT id FROM p` would compare `p.id = p.id`). A
/// VALUES list placed before the parent in FROM cannot see its sibling, so E binds exactly as
/// it did where it was written.
///
/// `ctes` names writable CTEs of the same statement that insert into the parent: their rows
/// are invisible to the statement's snapshot, so the lookup falls back to the parent key and
/// uuid those CTEs were made to return (`_ks_k`, `_ks_u`, see `statement.rs`).
///
/// With `fill.check`, a value that names no parent fails as the FK constraint would, with
/// its SQLSTATE 23503 and message (`keyshift.missing_parent`, STRICT: NULL stays NULL),
/// instead of writing a NULL twin.
pub(crate) fn lookup(fill: &Fill, expr: &str, refers_to_columns: bool, ctes: &[String]) -> String {
    let base = parent_lookup(fill, expr, refers_to_columns);
    if ctes.is_empty() && fill.check.is_none() {
        return base;
    }
    let cast = &fill.cast;
    let mut s = format!("COALESCE({base}");
    for cte in ctes {
        s.push_str(&format!(
            ", (SELECT _ks_c._ks_u FROM (VALUES (({expr})::{cast})) AS _ks_v(k) \
             JOIN {cte} AS _ks_c ON _ks_c._ks_k = _ks_v.k)"
        ));
    }
    if let Some(c) = &fill.check {
        s.push_str(&format!(
            ", keyshift.missing_parent((({expr})::{cast})::text, {}, {}, {}, {})::{}",
            literal(&c.child),
            literal(&c.constraint),
            literal(&c.column),
            literal(&c.parent),
            fill.twin_type
        ));
    }
    s.push(')');
    s
}

/// A standard SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parent_lookup(fill: &Fill, expr: &str, refers_to_columns: bool) -> String {
    let schema = quote(&fill.lookup_schema);
    let table = quote(&fill.parent_table);
    let key = quote(&fill.parent_key);
    let value = quote(&fill.parent_value);
    let cast = &fill.cast;
    if refers_to_columns {
        format!(
            "(SELECT _ks_p.{value} FROM (VALUES (({expr})::{cast})) AS _ks_v(k) \
             JOIN {schema}.{table} AS _ks_p ON _ks_p.{key} = _ks_v.k)"
        )
    } else {
        format!("(SELECT {value} FROM {schema}.{table} WHERE {key} = ({expr})::{cast})")
    }
}
