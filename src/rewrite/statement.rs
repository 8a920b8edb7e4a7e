//! Walks one parsed statement to every write it contains (top level, writable CTEs,
//! `PREPARE … AS`), and the helpers the per-form rewriters share.

use sqlparser::ast::{Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor};
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::edit::{Edits, Source, folded, quote_ident};
use super::rules::{ChildRules, RuleSet};
use super::{Change, Kind, Skip, SkipReason};

pub(crate) struct Ctx<'s, 'a> {
    pub rules: &'s RuleSet,
    pub src: &'s Source<'a>,
    /// One past the statement's last significant token.
    pub limit: usize,
    pub edits: Edits,
    pub changes: Vec<Change>,
}

impl Ctx<'_, '_> {
    pub(crate) fn changed(&mut self, child: &ChildRules, kind: Kind) {
        self.changes.push(Change {
            table: child.label.clone(),
            kind,
        });
    }
}

pub(crate) fn skip(child: &ChildRules, reason: SkipReason) -> Skip {
    Skip {
        table: child.label.clone(),
        reason,
    }
}

pub(crate) fn visit(ctx: &mut Ctx, stmt: &Statement) -> Result<(), Skip> {
    match stmt {
        Statement::Insert(ins) => super::insert::rewrite(ctx, ins),
        Statement::Update(upd) => super::update::rewrite(ctx, upd),
        Statement::Merge(m) => super::merge::rewrite(ctx, m),
        Statement::Query(q) => visit_query(ctx, q),
        Statement::Prepare { statement, .. } => visit(ctx, statement),
        _ => Ok(()),
    }
}

fn visit_query(ctx: &mut Ctx, q: &Query) -> Result<(), Skip> {
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            visit_query(ctx, &cte.query)?;
        }
    }
    visit_set_expr(ctx, &q.body)
}

fn visit_set_expr(ctx: &mut Ctx, body: &SetExpr) -> Result<(), Skip> {
    match body {
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Merge(s) => visit(ctx, s),
        SetExpr::Query(q) => visit_query(ctx, q),
        SetExpr::SetOperation { left, right, .. } => {
            visit_set_expr(ctx, left)?;
            visit_set_expr(ctx, right)
        }
        _ => Ok(()),
    }
}

fn idents(name: &ObjectName) -> Option<Vec<&Ident>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(i),
            ObjectNamePart::Function(_) => None,
        })
        .collect()
}

/// The migrated child a table name designates, if any.
pub(crate) fn resolve<'r>(rules: &'r RuleSet, name: &ObjectName) -> Option<&'r ChildRules> {
    let parts = idents(name)?;
    match parts.as_slice() {
        [t] => rules.child(None, &folded(t)),
        [s, t] | [_, s, t] => rules.child(Some(&folded(s)), &folded(t)),
        _ => None,
    }
}

pub(crate) fn resolve_factor<'r>(
    rules: &'r RuleSet,
    factor: &TableFactor,
) -> Option<&'r ChildRules> {
    match factor {
        TableFactor::Table {
            name, args: None, ..
        } => resolve(rules, name),
        _ => None,
    }
}

/// The column a (possibly qualified) column name designates.
pub(crate) fn column(name: &ObjectName) -> Option<String> {
    let parts = idents(name)?;
    parts.last().map(|i| folded(i).into_owned())
}

/// Index of the last token of a name.
pub(crate) fn name_end(src: &Source, name: &ObjectName) -> Option<usize> {
    let parts = idents(name)?;
    src.ident_index(parts.last()?)
}

/// ` (a, b, p_id, p_id_uuid)`: a column list for an insert that had none.
pub(crate) fn column_list(columns: &[String], twins: &[&str]) -> String {
    let mut s = String::from(" (");
    for (i, c) in columns
        .iter()
        .map(String::as_str)
        .chain(twins.iter().copied())
        .enumerate()
    {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&quote_ident(c));
    }
    s.push(')');
    s
}

/// The first top-level token at or after `from` (before `limit`) for which `hit` holds,
/// without leaving the enclosing parentheses.
pub(crate) fn find_top(
    src: &Source,
    from: usize,
    limit: usize,
    hit: impl Fn(&Source, usize) -> bool,
) -> Option<usize> {
    let mut depth = 0i64;
    for i in from..limit.min(src.toks.len()) {
        match src.toks[i].token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            _ if depth == 0 && hit(src, i) => return Some(i),
            _ => {}
        }
    }
    None
}

/// `FROM` that ends a list, as opposed to the one in `IS [NOT] DISTINCT FROM`.
pub(crate) fn clause_from(src: &Source, i: usize) -> bool {
    src.kw(i, Keyword::FROM) && !(i > 0 && src.kw(i - 1, Keyword::DISTINCT))
}
