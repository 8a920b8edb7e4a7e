//! `MERGE`, action by action: each `INSERT` like an INSERT … VALUES, each `UPDATE SET` like
//! an UPDATE.

use sqlparser::ast::{Merge, MergeAction, MergeInsertKind, MergeUpdateKind};
use sqlparser::keywords::Keyword;

use super::insert::{Columns, listed_columns, target_columns, values_rows};
use super::statement::{Ctx, resolve_factor, skip};
use super::update::assignments;
use super::{Kind, Skip, SkipReason};

pub(crate) fn rewrite(ctx: &mut Ctx, m: &Merge) -> Result<(), Skip> {
    let Some(child) = resolve_factor(ctx.rules, &m.table) else {
        return Ok(());
    };
    let src = ctx.src;
    let bad = || skip(child, SkipReason::Unsupported);
    let mut changed = false;
    for clause in &m.clauses {
        match &clause.action {
            MergeAction::Insert(mi) => {
                let MergeInsertKind::Values(values) = &mi.kind else {
                    continue;
                };
                let at = src.index_at(mi.insert_token.0.span.start).ok_or_else(bad)?;
                let columns = if mi.columns.is_empty() {
                    Columns::Positional(at)
                } else {
                    let (cols, last) =
                        listed_columns(src, &mi.columns, at + 1, ctx.limit).ok_or_else(bad)?;
                    Columns::Listed(cols, last)
                };
                let per_row = values.rows.first().map(|r| r.content.len());
                if let Some(fills) = target_columns(ctx, child, columns, per_row)? {
                    values_rows(ctx, child, &values.rows, &fills)?;
                    changed = true;
                }
            }
            MergeAction::Update(mu) => {
                let MergeUpdateKind::Set(assigns) = &mu.kind else {
                    return Err(bad());
                };
                let at = src.index_at(mu.update_token.0.span.start).ok_or_else(bad)?;
                if !src.kw(at + 1, Keyword::SET) {
                    return Err(bad());
                }
                changed |= assignments(ctx, child, at + 1, assigns, &[])?;
            }
            _ => {}
        }
    }
    if changed {
        ctx.changed(child, Kind::Merge);
    }
    Ok(())
}
