//! Translation: a session whose shape is not the physical one reads and writes keyshift's
//! views of its shape instead of the tables (DESIGN "Shapes", docs/architecture.md).
//!
//! `expand` creates, for every migrated table, one automatically updatable view per shape in
//! `keyshift_<shape>_<schema>` (src/shape.rs), listing every column in the table's order
//! under the name that shape gives it. A view binds its columns by position, so the same view
//! keeps serving its shape through the swap's renames and back: a statement pointed at it
//! keeps the column names and types its session was told, whatever the phase.
//!
//! Only insertions are spliced, like the dual-write: `users` becomes
//! `keyshift_uuid_public.users`, `public.users` becomes `keyshift_uuid_public.users` (the
//! prefix goes inside the quotes of a quoted schema). The view keeps the table's name, so
//! column references qualified by the table name (`users.id`) still bind.
//!
//! What PostgreSQL cannot run through a view is refused with a clear error rather than run
//! against the tables in the wrong shape: `MERGE` into a migrated table (views accept MERGE
//! only from PostgreSQL 17), `ON CONFLICT ON CONSTRAINT` (the constraint belongs to the
//! table, not the view), `COPY … FROM` into one and `COPY t (cols) TO`, and system columns
//! (`ctid`, `xmin`, …: views have none). `COPY t TO` becomes `COPY (SELECT * FROM view) TO`.
//! Other statements (DDL, `TRUNCATE`, `LOCK`, `VACUUM`, `GRANT`) name the tables as they are:
//! they do not depend on the shape, or are the operator's business.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    ConflictTarget, CopySource, ObjectName, ObjectNamePart, OnInsert, Query, Statement,
    TableFactor, TableObject, Visit, Visitor, visit_relations,
};
use sqlparser::tokenizer::Token;

use super::edit::folded;
use super::statement::Ctx;
use super::{Skip, SkipReason};
use crate::ident::quote;
use crate::shape::Shape;

/// Columns every table has and no view does.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// What a translated statement is, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirected {
    /// It names no migrated table.
    No,
    Read,
    Write,
}

/// Points every reference to a migrated table in `stmt` at its view in `shape`.
pub(crate) fn redirect(ctx: &mut Ctx, stmt: &Statement, shape: Shape) -> Result<Redirected, Skip> {
    let write = matches!(
        stmt,
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_)
    );
    Ok(match names(ctx, stmt, shape)? {
        false => Redirected::No,
        true if write => Redirected::Write,
        true => Redirected::Read,
    })
}

fn names(ctx: &mut Ctx, stmt: &Statement, shape: Shape) -> Result<bool, Skip> {
    match stmt {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Declare { .. } => {}
        Statement::Explain { statement, .. } | Statement::Prepare { statement, .. } => {
            return names(ctx, statement, shape);
        }
        Statement::Copy {
            source: CopySource::Query(_),
            ..
        } => {}
        Statement::Copy {
            source:
                CopySource::Table {
                    table_name,
                    columns,
                },
            to,
            ..
        } => return copy_table(ctx, table_name, columns.is_empty(), *to, shape),
        _ => return Ok(false),
    }
    let ctes = cte_names(stmt);
    let mut names = Vec::new();
    let _ = visit_relations(stmt, |name: &ObjectName| {
        names.push(name.clone());
        ControlFlow::<()>::Continue(())
    });
    let mut first = None;
    for name in &names {
        if let Some(table) = point(ctx, name, &ctes, shape) {
            refuse_view_limits(ctx, stmt, &table)?;
            first.get_or_insert(table);
        }
    }
    match first {
        Some(table) => {
            refuse_system_columns(ctx, &table)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Adds the insertion that points `name` at its view; the migrated table's `schema.table`,
/// or `None` when `name` is not one (or is a CTE of the statement).
fn point(ctx: &mut Ctx, name: &ObjectName, ctes: &HashSet<String>, shape: Shape) -> Option<String> {
    let parts: Vec<&sqlparser::ast::Ident> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(id),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [table] => {
            let t = folded(table);
            if ctes.contains(t.as_ref()) {
                return None;
            }
            let schema = ctx.rules.migrated(None, &t)?;
            let at = ctx.src.start(ctx.src.ident_index(table)?);
            ctx.edits
                .insert(at, format!("{}.", quote(&shape.view_schema(&schema))));
            Some(format!("{schema}.{t}"))
        }
        [.., schema, table] => {
            let (s, t) = (folded(schema), folded(table));
            ctx.rules.migrated(Some(&s), &t)?;
            let i = ctx.src.ident_index(schema)?;
            // Inside the quotes of a quoted schema; before an unquoted one, which folds to
            // the same lower case as the prefix.
            let at = ctx.src.start(i) + usize::from(schema.quote_style.is_some());
            ctx.edits.insert(at, shape.view_schema("").to_string());
            Some(format!("{s}.{t}"))
        }
        [] => None,
    }
}

/// The names of the statement's CTEs: an unqualified reference to one is not a table.
fn cte_names(stmt: &Statement) -> HashSet<String> {
    struct Ctes(HashSet<String>);
    impl Visitor for Ctes {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(with) = &q.with {
                for cte in &with.cte_tables {
                    self.0.insert(folded(&cte.alias.name).into_owned());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = Ctes(HashSet::new());
    let _ = stmt.visit(&mut v);
    v.0
}

fn limit(table: &str, what: &'static str) -> Skip {
    Skip {
        table: table.to_string(),
        reason: SkipReason::ViewLimit(what),
    }
}

/// Forms PostgreSQL refuses on a view, when their target is the migrated `table`.
fn refuse_view_limits(ctx: &Ctx, stmt: &Statement, table: &str) -> Result<(), Skip> {
    match stmt {
        Statement::Merge(m) => {
            if let TableFactor::Table { name, .. } = &m.table
                && resolves(ctx, name).as_deref() == Some(table)
            {
                return Err(limit(
                    table,
                    "MERGE into a migrated table (use INSERT … ON CONFLICT, UPDATE and DELETE)",
                ));
            }
        }
        Statement::Insert(ins) => {
            if let Some(OnInsert::OnConflict(oc)) = &ins.on
                && matches!(oc.conflict_target, Some(ConflictTarget::OnConstraint(_)))
                && matches!(&ins.table, TableObject::TableName(n) if resolves(ctx, n).as_deref() == Some(table))
            {
                return Err(limit(
                    table,
                    "ON CONFLICT ON CONSTRAINT (name the constraint's columns instead: ON CONFLICT (col, …))",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

fn resolves(ctx: &Ctx, name: &ObjectName) -> Option<String> {
    let idents: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(folded(id).into_owned()),
            _ => None,
        })
        .collect();
    match idents.as_slice() {
        [t] => ctx.rules.migrated(None, t).map(|s| format!("{s}.{t}")),
        [.., s, t] => ctx.rules.migrated(Some(s), t).map(|s| format!("{s}.{t}")),
        [] => None,
    }
}

/// A statement that names a migrated table and a system column: the view has no such
/// column, so PostgreSQL would answer `column "ctid" does not exist`; say why instead.
fn refuse_system_columns(ctx: &Ctx, table: &str) -> Result<(), Skip> {
    for i in ctx.from..ctx.limit {
        if let Token::Word(w) = ctx.src.token(i)
            && w.quote_style.is_none()
            && SYSTEM_COLUMNS.contains(&w.value.to_ascii_lowercase().as_str())
        {
            return Err(limit(
                table,
                "system columns of a migrated table (ctid, xmin, …)",
            ));
        }
    }
    Ok(())
}

/// `COPY t TO …` reads the view: `COPY (SELECT * FROM view) TO …`. COPY into a view is not
/// possible, nor a column list on the query form without re-listing the columns.
fn copy_table(
    ctx: &mut Ctx,
    name: &ObjectName,
    all_columns: bool,
    to: bool,
    shape: Shape,
) -> Result<bool, Skip> {
    let Some(table) = resolves(ctx, name) else {
        return Ok(false);
    };
    if !to {
        return Err(limit(
            &table,
            "COPY FROM into a migrated table (use INSERT, or a connection in the physical shape)",
        ));
    }
    if !all_columns {
        return Err(limit(
            &table,
            "COPY with a column list from a migrated table (use COPY (SELECT cols FROM table) TO)",
        ));
    }
    let first = match name.0.first() {
        Some(ObjectNamePart::Identifier(id)) => ctx.src.ident_index(id),
        _ => None,
    };
    let last = match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => ctx.src.ident_index(id),
        _ => None,
    };
    let (Some(first), Some(last)) = (first, last) else {
        return Err(limit(&table, "this form of COPY"));
    };
    ctx.edits
        .insert(ctx.src.start(first), "(SELECT * FROM ".to_string());
    point(ctx, name, &HashSet::new(), shape);
    ctx.edits.insert(ctx.src.end(last), ")".to_string());
    Ok(true)
}
