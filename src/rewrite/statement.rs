//! Walks one parsed statement to every write it contains (top level, writable CTEs,
//! `PREPARE … AS`), and the helpers the per-form rewriters share.

use sqlparser::ast::{
    Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, TableObject,
};
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::edit::{Edits, Source, folded};
use super::rules::{ChildRules, Fill, RuleSet};
use super::{Change, Kind, Planning, Skip, SkipReason};
use crate::ident::quote;

pub(crate) struct Ctx<'s, 'a> {
    pub rules: &'s RuleSet,
    pub src: &'s Source<'a>,
    /// First and one past the last significant token of the statement.
    pub from: usize,
    pub limit: usize,
    pub edits: Edits,
    /// A translated session's redirects (`translate.rs`), applied to every expression the
    /// dual-write copies as well.
    pub redirects: Edits,
    pub changes: Vec<Change>,
    /// Writable CTEs of this statement that insert into a parent table.
    pub ctes: Vec<ParentCte>,
    /// CTEs with a lower position are visible to the write being rewritten.
    pub visible: usize,
    /// How often PostgreSQL will plan the result.
    pub planning: Planning,
}

/// `WITH x AS (INSERT INTO parent … RETURNING …)`: the rows it inserts are invisible to the
/// rest of the statement (one snapshot), so a child row referencing them would get a NULL
/// twin from a plain lookup. Such a CTE is made to also return the parent's key and uuid as
/// `_ks_k`, `_ks_u`, and lookups consult it.
pub(crate) struct ParentCte {
    name: String,
    parent: (String, String),
    /// Index of the CTE's closing parenthesis.
    close: usize,
    position: usize,
    /// The parent's key and uuid columns, once a lookup used this CTE.
    used: Option<(String, String)>,
}

impl Ctx<'_, '_> {
    /// The visible parent CTEs a lookup for `fill` must fall back to, marked as used.
    pub(crate) fn cte_sources(&mut self, fill: &Fill) -> Vec<String> {
        let mut out = Vec::new();
        for c in &mut self.ctes {
            if c.position < self.visible
                && c.parent.0 == fill.parent_schema
                && c.parent.1 == fill.parent_table
            {
                c.used = Some((fill.parent_key.clone(), fill.parent_value.clone()));
                out.push(quote(&c.name).into_owned());
            }
        }
        out
    }

    /// What an INSERT writes into the twin for the source-column value in tokens `a..b`.
    pub(crate) fn inserted_twin(
        &mut self,
        a: usize,
        b: usize,
        fill: &Fill,
    ) -> Result<String, SkipReason> {
        if self.twin_by_trigger(fill) {
            return Ok("NULL".to_string());
        }
        self.twin_value(a, b, fill)
    }

    /// Whether an INSERT leaves `fill`'s twin to the child's fill trigger (src/migrate/fill.rs),
    /// writing `NULL` into it: in a translated session's text that PostgreSQL plans at every
    /// execution (a simple Query keyshift does not run as `EXECUTE`).
    ///
    /// Both are correct; they differ in cost. The rewriter's lookup of a translated session
    /// reads the parent through its shape view, which PostgreSQL expands and plans with the
    /// statement: planned once, it costs an index probe per row and is the cheaper; planned at
    /// every execution it is the third view of a translated `INSERT … SELECT`, and the
    /// trigger, whose lookup plpgsql plans once per session on the parent's table, is the
    /// cheaper (docs/benchmarks.md, "Shapes": on PostgreSQL alone, simple protocol 1.3 × the
    /// throughput with the trigger, prepared 0.86 ×). The physical shape keeps the lookup: it
    /// reads the table itself. `NULL` rather than nothing: an other side with a column default
    /// would otherwise keep that default, and the trigger fills only a NULL. A parent inserted
    /// by a CTE of the same statement is invisible to the trigger: those keep the lookup,
    /// which falls back to the CTE.
    pub(crate) fn twin_by_trigger(&self, fill: &Fill) -> bool {
        self.planning == Planning::EachExecution
            && self.rules.translated().is_some()
            && !self.parent_ctes_visible(fill)
    }

    /// Whether a visible CTE of this statement inserts into `fill`'s parent.
    fn parent_ctes_visible(&self, fill: &Fill) -> bool {
        self.ctes.iter().any(|c| {
            c.position < self.visible
                && c.parent.0 == fill.parent_schema
                && c.parent.1 == fill.parent_table
        })
    }

    /// What to write into the twin for the source-column value in tokens `a..b`.
    pub(crate) fn twin_value(
        &mut self,
        a: usize,
        b: usize,
        fill: &Fill,
    ) -> Result<String, SkipReason> {
        let ctes = self.cte_sources(fill);
        super::lookup::twin_value(self.src, a, b, fill, &ctes, &self.redirects)
    }

    /// Adds `_ks_k`, `_ks_u` to the RETURNING list of each parent CTE a lookup used.
    pub(crate) fn finish_ctes(&mut self) {
        for c in &self.ctes {
            if let Some((key, value)) = &c.used {
                self.edits.insert(
                    self.src.end(c.close - 1),
                    format!(", {} AS _ks_k, {} AS _ks_u", quote(key), quote(value)),
                );
            }
        }
    }

    /// Whether the statement may expand a CTE's columns (`*`, `x.*`, `TABLE x`): then an
    /// added column would change what it returns, and parent CTEs are not extended.
    fn expands_columns(&self) -> bool {
        let src = self.src;
        (self.from..self.limit).any(|i| {
            (src.is(i, &Token::Mul)
                && i > self.from
                && (src.is(i - 1, &Token::Comma)
                    || src.is(i - 1, &Token::Period)
                    || src.kw(i - 1, Keyword::SELECT)
                    || src.kw(i - 1, Keyword::DISTINCT)
                    || src.kw(i - 1, Keyword::ALL)
                    || src.kw(i - 1, Keyword::RETURNING)))
                || (src.kw(i, Keyword::TABLE) && i > self.from)
        })
    }

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
        // EXPLAIN ANALYZE runs the write: keeping the twins right matters more than the plan
        // text, which then shows the lookups.
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } if *analyze
            || options
                .iter()
                .flatten()
                .any(|o| o.name.value.eq_ignore_ascii_case("analyze")) =>
        {
            visit(ctx, statement)
        }
        _ => Ok(()),
    }
}

fn visit_query(ctx: &mut Ctx, q: &Query) -> Result<(), Skip> {
    if let Some(with) = &q.with {
        let base = next_position(ctx);
        let extendable = !ctx.expands_columns();
        for (i, cte) in with.cte_tables.iter().enumerate() {
            if !extendable {
                break;
            }
            let SetExpr::Insert(Statement::Insert(ins)) = &*cte.query.body else {
                continue;
            };
            let TableObject::TableName(name) = &ins.table else {
                continue;
            };
            if ins.returning.as_ref().is_none_or(|r| r.is_empty()) {
                continue;
            }
            let (Some(parent), Some(close)) = (
                resolve_parent(ctx.rules, name),
                ctx.src.index_at(cte.closing_paren_token.0.span.start),
            ) else {
                continue;
            };
            ctx.ctes.push(ParentCte {
                name: folded(&cte.alias.name).into_owned(),
                parent,
                close,
                position: base + i,
                used: None,
            });
        }
        let outer = ctx.visible;
        for (i, cte) in with.cte_tables.iter().enumerate() {
            ctx.visible = base + i;
            visit_query(ctx, &cte.query)?;
        }
        ctx.visible = outer;
    }
    visit_set_expr(ctx, &q.body)
}

/// Positions of CTEs already seen in this statement come first.
fn next_position(ctx: &Ctx) -> usize {
    ctx.ctes.iter().map(|c| c.position + 1).max().unwrap_or(0)
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

/// The migrated parent a table name designates, if any, as (schema, table).
fn resolve_parent(rules: &RuleSet, name: &ObjectName) -> Option<(String, String)> {
    let parts = idents(name)?;
    match parts.as_slice() {
        [t] => rules.parent(None, &folded(t)),
        [s, t] | [_, s, t] => rules.parent(Some(&folded(s)), &folded(t)),
        _ => None,
    }
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
        s.push_str(&quote(c));
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
        match src.token(i) {
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
