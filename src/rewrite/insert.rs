//! `INSERT`: VALUES rows, INSERT … SELECT, and ON CONFLICT … DO UPDATE.

use sqlparser::ast::{
    Distinct, Expr, Insert, OnConflictAction, OnInsert, Parens, Query, SelectItem, SetExpr,
    TableObject,
};
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::edit::Source;
use super::lookup::lookup;
use super::rules::{ChildRules, Fill};
use super::statement::{Ctx, clause_from, column, column_list, find_top, name_end, skip};
use super::{Kind, Skip, SkipReason};
use crate::ident::quote;

/// The fills an insert into `columns` needs: the source column is written and its twin is not
/// (an application that already writes the twin is left alone). With the source's position.
pub(crate) fn applicable<'c>(child: &'c ChildRules, columns: &[String]) -> Vec<(usize, &'c Fill)> {
    child
        .fills
        .iter()
        .filter(|f| !columns.contains(&f.target))
        .filter_map(|f| columns.iter().position(|c| *c == f.source).map(|i| (i, f)))
        .collect()
}

/// Where the column list is, or where one must be added.
pub(crate) enum Columns {
    /// Listed: the names, and the index of the last column token.
    Listed(Vec<String>, usize),
    /// None listed: a list goes after this token (the table name, alias or MERGE's INSERT).
    Positional(usize),
}

pub(crate) fn listed_columns(
    src: &Source,
    names: &[sqlparser::ast::ObjectName],
    open: usize,
    limit: usize,
) -> Option<(Vec<String>, usize)> {
    let close = src.close_paren(open, limit)?;
    let cols: Option<Vec<String>> = names.iter().map(column).collect();
    let cols = cols?;
    (close > open + 1).then_some((cols, close - 1))
}

/// Resolves the target columns, adding the column list (with the twins) where there was none.
/// Returns the target columns and the fills to apply, or `None` when nothing applies.
pub(crate) fn target_columns<'c>(
    ctx: &mut Ctx,
    child: &'c ChildRules,
    columns: Columns,
    values_per_row: Option<usize>,
) -> Result<Option<Vec<(usize, &'c Fill)>>, Skip> {
    match columns {
        Columns::Listed(cols, last) => {
            let fills = applicable(child, &cols);
            if fills.is_empty() {
                return Ok(None);
            }
            let mut add = String::new();
            for (_, f) in &fills {
                add.push_str(", ");
                add.push_str(&quote(&f.target));
            }
            ctx.edits.insert(ctx.src.end(last), add);
            Ok(Some(fills))
        }
        Columns::Positional(after) => {
            let Some(n) = values_per_row else {
                return Err(skip(child, SkipReason::Unsupported));
            };
            let Some(all) = &child.positional else {
                return Err(skip(child, SkipReason::Unsupported));
            };
            if n > all.len() {
                // PostgreSQL will refuse it ("more expressions than target columns").
                return Err(skip(child, SkipReason::Unsupported));
            }
            let cols = &all[..n];
            let fills = applicable(child, cols);
            if fills.is_empty() {
                return Ok(None);
            }
            let twins: Vec<&str> = fills.iter().map(|(_, f)| f.target.as_str()).collect();
            ctx.edits
                .insert(ctx.src.end(after), column_list(cols, &twins));
            Ok(Some(fills))
        }
    }
}

/// Appends the twins' values to each VALUES row, just after its last item.
pub(crate) fn values_rows(
    ctx: &mut Ctx,
    child: &ChildRules,
    rows: &[Parens<Vec<Expr>>],
    fills: &[(usize, &Fill)],
) -> Result<(), Skip> {
    let src = ctx.src;
    for row in rows {
        let bad = || skip(child, SkipReason::Unsupported);
        let open = src
            .index_at(row.opening_token.0.span.start)
            .ok_or_else(bad)?;
        let close = src
            .index_at(row.closing_token.0.span.start)
            .ok_or_else(bad)?;
        if !src.is(open, &Token::LParen) || !src.is(close, &Token::RParen) {
            return Err(bad());
        }
        let (items, stop) = src
            .split_list(open + 1, close, |_, _| false)
            .ok_or_else(bad)?;
        if stop != close || items.len() != row.content.len() {
            return Err(bad());
        }
        let mut add = String::new();
        for &(i, fill) in fills {
            let &(a, b) = items.get(i).ok_or_else(bad)?;
            let v = ctx.inserted_twin(a, b, fill).map_err(|r| skip(child, r))?;
            add.push_str(", ");
            add.push_str(&v);
        }
        ctx.edits.insert(src.end(close - 1), add);
    }
    Ok(())
}

pub(crate) fn plain_values(q: &Query) -> Option<&sqlparser::ast::Values> {
    match &*q.body {
        SetExpr::Values(v)
            if q.with.is_none()
                && q.order_by.is_none()
                && q.limit_clause.is_none()
                && q.fetch.is_none()
                && !v.explicit_row =>
        {
            Some(v)
        }
        _ => None,
    }
}

pub(crate) fn rewrite(ctx: &mut Ctx, ins: &Insert) -> Result<(), Skip> {
    let TableObject::TableName(name) = &ins.table else {
        return Ok(());
    };
    let Some(child) = super::statement::resolve(ctx.rules, name) else {
        return Ok(());
    };
    let src = ctx.src;
    let bad = || skip(child, SkipReason::Unsupported);
    let mut target_end = name_end(src, name).ok_or_else(bad)?;
    if let Some(alias) = &ins.table_alias {
        target_end = src.ident_index(&alias.alias).ok_or_else(bad)?;
    }
    let (columns, next) = if ins.columns.is_empty() {
        (Columns::Positional(target_end), target_end + 1)
    } else {
        let (cols, last) =
            listed_columns(src, &ins.columns, target_end + 1, ctx.limit).ok_or_else(bad)?;
        (Columns::Listed(cols, last), last + 2)
    };
    let listed: Vec<String> = match &columns {
        Columns::Listed(c, _) => c.clone(),
        Columns::Positional(_) => Vec::new(),
    };

    let mut kind = None;
    let mut twins_from_insert: Vec<&str> = Vec::new();
    match ins.source.as_deref() {
        None => {}
        Some(q) => {
            if let Some(values) = plain_values(q) {
                let per_row = values.rows.first().map(|r| r.content.len());
                if let Some(fills) = target_columns(ctx, child, columns, per_row)? {
                    values_rows(ctx, child, &values.rows, &fills)?;
                    twins_from_insert = fills.iter().map(|(_, f)| f.target.as_str()).collect();
                    kind = Some(Kind::Insert);
                }
            } else if insert_select(ctx, child, q, columns, next, &listed)? {
                twins_from_insert = applicable_targets(child, &listed, q);
                kind = Some(Kind::InsertSelect);
            }
        }
    }

    if let Some(OnInsert::OnConflict(oc)) = &ins.on
        && let OnConflictAction::DoUpdate(du) = &oc.action
    {
        let on = find_top(src, next, ctx.limit, |s, i| {
            s.kw(i, Keyword::ON) && s.kw(i + 1, Keyword::CONFLICT)
        })
        .ok_or_else(bad)?;
        let set = find_top(src, on, ctx.limit, |s, i| {
            s.kw(i, Keyword::DO) && s.kw(i + 1, Keyword::UPDATE) && s.kw(i + 2, Keyword::SET)
        })
        .ok_or_else(bad)?
            + 2;
        if super::update::assignments(ctx, child, set, &du.assignments, &twins_from_insert)? {
            kind = Some(Kind::Upsert);
        }
    }
    if let Some(kind) = kind {
        ctx.changed(child, kind);
    }
    Ok(())
}

/// The twins an INSERT … SELECT added (for `EXCLUDED.<twin>` in ON CONFLICT).
fn applicable_targets<'c>(child: &'c ChildRules, listed: &[String], q: &Query) -> Vec<&'c str> {
    if !listed.is_empty() {
        return applicable(child, listed)
            .iter()
            .map(|(_, f)| f.target.as_str())
            .collect();
    }
    let n = match &*q.body {
        SetExpr::Select(s) => s.projection.len(),
        _ => 0,
    };
    match &child.positional {
        Some(all) if n <= all.len() => applicable(child, &all[..n])
            .iter()
            .map(|(_, f)| f.target.as_str())
            .collect(),
        _ => Vec::new(),
    }
}

/// Ends a SELECT's output list.
fn ends_select_list(src: &Source, i: usize) -> bool {
    clause_from(src, i)
        || [
            Keyword::INTO,
            Keyword::WHERE,
            Keyword::GROUP,
            Keyword::HAVING,
            Keyword::WINDOW,
            Keyword::QUALIFY,
            Keyword::ORDER,
            Keyword::LIMIT,
            Keyword::OFFSET,
            Keyword::FETCH,
            Keyword::FOR,
            Keyword::UNION,
            Keyword::EXCEPT,
            Keyword::INTERSECT,
            Keyword::RETURNING,
        ]
        .iter()
        .any(|&k| src.kw(i, k))
        || (src.kw(i, Keyword::ON) && src.kw(i + 1, Keyword::CONFLICT))
}

/// INSERT … SELECT. A plain SELECT gets the twins appended to its output list, computed from
/// copies of the FK's output expressions: its parameters and untyped literals keep being typed
/// by the target columns, exactly as before. Anything else (set operations, `*`, a
/// parenthesized query) is wrapped as a derived table whose output column feeds the lookup;
/// those forms already resolve untyped outputs to text, so wrapping changes no type.
fn insert_select(
    ctx: &mut Ctx,
    child: &ChildRules,
    q: &Query,
    columns: Columns,
    next: usize,
    listed: &[String],
) -> Result<bool, Skip> {
    let src = ctx.src;
    let bad = || skip(child, SkipReason::Unsupported);
    if let SetExpr::Select(sel) = &*q.body
        && !sel.projection.iter().any(|p| {
            matches!(
                p,
                SelectItem::Wildcard(_)
                    | SelectItem::QualifiedWildcard(..)
                    | SelectItem::ExprWithAliases { .. }
            )
        })
    {
        let s = src
            .index_at(sel.select_token.0.span.start)
            .ok_or_else(bad)?;
        let mut j = s + 1;
        match &sel.distinct {
            None => {}
            Some(Distinct::All) | Some(Distinct::Distinct) => j += 1,
            Some(Distinct::On(_)) => {
                let open = j + 2;
                if !src.kw(j, Keyword::DISTINCT) || !src.kw(j + 1, Keyword::ON) {
                    return Err(bad());
                }
                j = src.close_paren(open, ctx.limit).ok_or_else(bad)? + 1;
            }
        }
        let (items, _) = src
            .split_list(j, ctx.limit, ends_select_list)
            .ok_or_else(bad)?;
        if items.len() != sel.projection.len() || items.is_empty() {
            return Err(bad());
        }
        let mut exprs = Vec::with_capacity(items.len());
        for (&(a, b), item) in items.iter().zip(&sel.projection) {
            let b = match item {
                SelectItem::ExprWithAlias { alias, .. } => {
                    let at = src.ident_index(alias).ok_or_else(bad)?;
                    if at + 1 != b {
                        return Err(bad());
                    }
                    if at > a && src.kw(at - 1, Keyword::AS) {
                        at - 1
                    } else {
                        at
                    }
                }
                _ => b,
            };
            if a >= b {
                return Err(bad());
            }
            exprs.push((a, b));
        }
        if !listed.is_empty() && listed.len() != exprs.len() {
            return Err(bad());
        }
        let Some(fills) = target_columns(ctx, child, columns, Some(exprs.len()))? else {
            return Ok(false);
        };
        let mut add = String::new();
        for &(i, fill) in &fills {
            let &(a, b) = exprs.get(i).ok_or_else(bad)?;
            if src.only_kw(a, b, Keyword::DEFAULT) {
                return Err(bad());
            }
            let v = ctx.inserted_twin(a, b, fill).map_err(|r| skip(child, r))?;
            add.push_str(", ");
            add.push_str(&v);
        }
        let last = items.last().map_or(j, |&(_, b)| b - 1);
        ctx.edits.insert(src.end(last), add);
        return Ok(true);
    }

    // Wrapped as a derived table: needs the column count, which only a column list gives.
    if listed.is_empty() {
        return Err(bad());
    }
    let end = find_top(src, next, ctx.limit, |s, i| {
        s.kw(i, Keyword::RETURNING) || (s.kw(i, Keyword::ON) && s.kw(i + 1, Keyword::CONFLICT))
    })
    .unwrap_or(ctx.limit);
    let end = end_of_group(src, next, end);
    if end <= next {
        return Err(bad());
    }
    let Some(fills) = target_columns(ctx, child, columns, Some(listed.len()))? else {
        return Ok(false);
    };
    let mut head = String::from("SELECT _ks.*");
    for &(i, fill) in &fills {
        head.push_str(", ");
        if ctx.twin_by_trigger(fill) {
            head.push_str("NULL");
            continue;
        }
        let ctes = ctx.cte_sources(fill);
        head.push_str(&lookup(fill, &format!("_ks._ks{}", i + 1), false, &ctes));
    }
    head.push_str(" FROM (");
    let mut tail = String::from(") AS _ks(");
    for i in 0..listed.len() {
        if i > 0 {
            tail.push_str(", ");
        }
        tail.push_str(&format!("_ks{}", i + 1));
    }
    tail.push(')');
    ctx.edits.insert(src.start(next), head);
    ctx.edits.insert(src.end(end - 1), tail);
    Ok(true)
}

/// The closing parenthesis of an enclosing CTE, if it comes before `end`.
fn end_of_group(src: &Source, from: usize, end: usize) -> usize {
    let mut depth = 0i64;
    for i in from..end.min(src.toks.len()) {
        match src.token(i) {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth < 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    end
}
