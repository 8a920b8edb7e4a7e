//! `UPDATE … SET`, and the SET list shared with ON CONFLICT … DO UPDATE and MERGE.

use sqlparser::ast::{Assignment, AssignmentTarget, Update};
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::edit::Source;
use super::rules::{ChildRules, Fill};
use super::statement::{Ctx, clause_from, column, find_top, resolve_factor, skip};
use super::{Kind, Skip, SkipReason};
use crate::ident::quote;

fn ends_set_list(src: &Source, i: usize) -> bool {
    clause_from(src, i)
        || [Keyword::WHERE, Keyword::RETURNING, Keyword::WHEN]
            .iter()
            .any(|&k| src.kw(i, k))
}

/// After each `fk = E` in the SET list starting after the `SET` at `set`, adds
/// `fk_uuid = <lookup of E>`, unless the list already assigns the twin. `excluded` names the
/// twins the INSERT of an upsert fills, so that `fk = EXCLUDED.fk` becomes
/// `fk_uuid = EXCLUDED.fk_uuid` instead of a second lookup. Returns whether it added any.
pub(crate) fn assignments(
    ctx: &mut Ctx,
    child: &ChildRules,
    set: usize,
    assigns: &[Assignment],
    excluded: &[&str],
) -> Result<bool, Skip> {
    let src = ctx.src;
    let bad = || skip(child, SkipReason::Unsupported);
    if !src.kw(set, Keyword::SET) {
        return Err(bad());
    }
    let mut assigned = Vec::new();
    for a in assigns {
        match &a.target {
            AssignmentTarget::ColumnName(n) => assigned.push(column(n).ok_or_else(bad)?),
            AssignmentTarget::Tuple(ns) => {
                for n in ns {
                    assigned.push(column(n).ok_or_else(bad)?);
                }
            }
        }
    }
    let needs = |col: &str| -> Vec<&Fill> {
        child
            .fills
            .iter()
            .filter(|f| f.source == col && !assigned.contains(&f.target))
            .collect()
    };
    if !assigned.iter().any(|c| !needs(c).is_empty()) {
        return Ok(false);
    }
    let (items, _) = src
        .split_list(set + 1, ctx.limit, ends_set_list)
        .ok_or_else(bad)?;
    if items.len() != assigns.len() {
        return Err(bad());
    }
    let mut added = false;
    for (&(a, b), asg) in items.iter().zip(assigns) {
        let AssignmentTarget::ColumnName(n) = &asg.target else {
            // `SET (a, fk) = (…)`: would need the row's items split; rare in applications.
            return Err(bad());
        };
        let col = column(n).ok_or_else(bad)?;
        let eq = find_top(src, a, b, |s, i| s.is(i, &Token::Eq)).ok_or_else(bad)?;
        if eq + 1 >= b {
            return Err(bad());
        }
        let mut add = String::new();
        for fill in needs(&col) {
            let v = if excluded.contains(&fill.target.as_str())
                && is_excluded(src, eq + 1, b, &fill.source)
            {
                format!("EXCLUDED.{}", quote(&fill.target))
            } else {
                ctx.twin_value(eq + 1, b, fill)
                    .map_err(|r| skip(child, r))?
            };
            add.push_str(&format!(", {} = {}", quote(&fill.target), v));
        }
        if !add.is_empty() {
            ctx.edits.insert(src.end(b - 1), add);
            added = true;
        }
    }
    Ok(added)
}

/// Whether tokens `a..b` are exactly `EXCLUDED.<col>`.
fn is_excluded(src: &Source, a: usize, b: usize, col: &str) -> bool {
    let excluded = matches!(src.token(a), Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("excluded"));
    if b != a + 3 || !excluded || !src.is(a + 1, &Token::Period) {
        return false;
    }
    match src.token(a + 2) {
        Token::Word(w) => match w.quote_style {
            Some(_) => w.value == col,
            None => {
                w.value.eq_ignore_ascii_case(col) && !col.bytes().any(|c| c.is_ascii_uppercase())
            }
        },
        _ => false,
    }
}

pub(crate) fn rewrite(ctx: &mut Ctx, upd: &Update) -> Result<(), Skip> {
    // `UPDATE ONLY c`, which sqlparser 0.63 misreads, never gets here (`misreads_only`).
    let Some(child) = resolve_factor(ctx.rules, &upd.table.relation) else {
        return Ok(());
    };
    if !upd.table.joins.is_empty() {
        return Err(skip(child, SkipReason::Unsupported));
    }
    let src = ctx.src;
    let bad = || skip(child, SkipReason::Unsupported);
    let u = src
        .index_at(upd.update_token.0.span.start)
        .ok_or_else(bad)?;
    let set = find_top(src, u + 1, ctx.limit, |s, i| s.kw(i, Keyword::SET)).ok_or_else(bad)?;
    if assignments(ctx, child, set, &upd.assignments, &[])? {
        ctx.changed(child, Kind::Update);
    }
    Ok(())
}
