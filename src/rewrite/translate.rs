//! Translation: a session whose shape is not the physical one reads and writes keyshift's
//! views of its shape instead of the tables (DESIGN "Shapes", docs/architecture.md).
//!
//! `expand` creates, for every migrated table, one automatically updatable view per shape in
//! `keyshift_<shape>_<schema>` (src/shape.rs), listing every column in the table's order
//! under the name that shape gives it. A view binds its columns by position, so the same view
//! keeps serving its shape through the swap's renames and back: a statement pointed at it
//! keeps the column names and types its session was told, whatever the phase.
//!
//! References are redirected by insertions, like the dual-write: `users` becomes
//! `keyshift_uuid_public.users`, `public.users` becomes `keyshift_uuid_public.users` (the
//! prefix goes inside the quotes of a quoted schema). The view keeps the table's name, so
//! column references qualified by the table name (`users.id`) still bind.
//!
//! COPY names a table, never a view. `COPY t [(cols)] TO` reads the view as
//! `COPY (SELECT cols FROM view) TO` (`*` without a list). `COPY t [(cols)] FROM` writes the
//! table itself, named as written: each column it names (its list, `FORCE_NULL`,
//! `FORCE_NOT_NULL`) is replaced by its physical name (`RuleSet::physical_column`: the same
//! column, by attnum, so the same type), e.g. an integer session's `p_id` after cutover is
//! `p_id_legacy`. Without a list the table's columns in attnum order are the view's already.
//! The other member of a renamed pair is not filled here (COPY carries no expression to copy).
//!
//! What PostgreSQL cannot run through a view is refused with a clear error rather than run
//! against the tables in the wrong shape: `MERGE` into a migrated table (views accept MERGE
//! only from PostgreSQL 17), `ON CONFLICT ON CONSTRAINT` (the constraint belongs to the
//! table, not the view), and system columns (`ctid`, `xmin`, …: views have none). Other
//! statements (DDL, `TRUNCATE`, `LOCK`, `VACUUM`, `GRANT`) name the tables as they are: they
//! do not depend on the shape, or are the operator's business.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    ConflictTarget, CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, Ident,
    ObjectName, ObjectNamePart, OnInsert, Query, Statement, TableFactor, TableObject, Visit,
    Visitor, visit_relations,
};
use sqlparser::tokenizer::Token;

use super::edit::folded;
use super::statement::Ctx;
use super::{Planning, Skip, SkipReason};
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
        Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Merge(_)
            | Statement::Copy { to: false, .. }
    );
    Ok(match names(ctx, stmt, shape)? {
        false => Redirected::No,
        true if write => Redirected::Write,
        true => Redirected::Read,
    })
}

fn names(ctx: &mut Ctx, stmt: &Statement, shape: Shape) -> Result<bool, Skip> {
    if matches!(stmt, Statement::Query(_)) && !names_shaped_view(ctx, stmt) {
        if same_on_the_tables(ctx, stmt) {
            return Ok(false);
        }
        if on_the_table_renamed(ctx, stmt) {
            return Ok(true);
        }
    }
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
            to: true,
            ..
        } => return copy_to(ctx, table_name, columns, shape),
        Statement::Copy {
            source:
                CopySource::Table {
                    table_name,
                    columns,
                },
            to: false,
            options,
            legacy_options,
            ..
        } => {
            return copy_from(
                ctx,
                table_name,
                &copied_columns(columns, options, legacy_options),
            );
        }
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

/// Whether `stmt` names one of the application's views that keyshift shows in the session's
/// shape: every column of such a view may differ by shape (its definition decides), so the
/// statement always reads keyshift's copy.
fn names_shaped_view(ctx: &Ctx, stmt: &Statement) -> bool {
    let ctes = cte_names(stmt);
    let found = visit_relations(stmt, |name: &ObjectName| {
        let parts: Option<Vec<&Ident>> = name
            .0
            .iter()
            .map(|p| match p {
                ObjectNamePart::Identifier(id) => Some(id),
                _ => None,
            })
            .collect();
        let hit = match parts.as_deref() {
            Some([table]) => {
                let t = folded(table);
                !ctes.contains(t.as_ref())
                    && ctx
                        .rules
                        .migrated(None, &t)
                        .is_some_and(|s| ctx.rules.is_shaped_view(&s, &t))
            }
            Some([.., schema, table]) => {
                let (s, t) = (folded(schema), folded(table));
                ctx.rules.is_shaped_view(&s, &t)
            }
            _ => false,
        };
        if hit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found.is_break()
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

/// A read that names none of the columns whose names depend on the shape, and cannot see a
/// whole row, gets from the tables exactly what it would get from the views: the views list
/// every other column under the table's own name and type, with the table's privileges and
/// row security (`security_invoker`). It runs on the tables untouched, which spares
/// PostgreSQL the view's expansion at every simple-protocol execution (docs/benchmarks.md,
/// "Shapes"). Conservative, from the tokens ([`table_tokens`]).
fn same_on_the_tables(ctx: &Ctx, stmt: &Statement) -> bool {
    /// Relations and aliases, with the token of each definition.
    struct Rows<'c, 'a, 's> {
        ctx: &'c Ctx<'s, 'a>,
        names: HashSet<String>,
        defined: HashSet<usize>,
    }
    impl Rows<'_, '_, '_> {
        fn add(&mut self, id: &sqlparser::ast::Ident) {
            self.names.insert(folded(id).into_owned());
            if let Some(i) = self.ctx.src.ident_index(id) {
                self.defined.insert(i);
            }
        }
    }
    impl Visitor for Rows<'_, '_, '_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
            let alias = match t {
                TableFactor::Table { name, alias, .. } => {
                    if let Some(ObjectNamePart::Identifier(id)) = name.0.last() {
                        self.add(id);
                    }
                    alias
                }
                TableFactor::Derived { alias, .. }
                | TableFactor::Function { alias, .. }
                | TableFactor::UNNEST { alias, .. }
                | TableFactor::NestedJoin { alias, .. } => alias,
                _ => &None,
            };
            if let Some(a) = alias {
                self.add(&a.name);
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(with) = &q.with {
                for cte in &with.cte_tables {
                    self.add(&cte.alias.name);
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut rows = Rows {
        ctx,
        names: HashSet::new(),
        defined: HashSet::new(),
    };
    let _ = stmt.visit(&mut rows);
    let relations = Relations {
        names: rows.names,
        defined: rows.defined,
    };
    table_tokens(ctx, &relations).is_some_and(|renamed| renamed.is_empty())
}

/// A statement's relation names and aliases, and the tokens that define them.
struct Relations {
    names: HashSet<String>,
    defined: HashSet<usize>,
}

/// What a read's tokens say about running it on the tables: `None` when one keeps it on the
/// views (`*` but in `count(*)`, `NATURAL` (joins by name), a write keyword (a data-modifying
/// CTE, `FOR UPDATE`), `ONLY` (a view reads its table's children whatever the reference
/// says), `TABLESAMPLE` (refused on a view), a system column, or a relation name or alias used
/// other than as a qualifier: a whole-row reference); else the words that name a column some
/// shape renames, with their names.
fn table_tokens(ctx: &Ctx, relations: &Relations) -> Option<Vec<(usize, String)>> {
    use sqlparser::keywords::Keyword;
    let src = ctx.src;
    let mut renamed = Vec::new();
    for i in ctx.from..ctx.limit {
        match src.token(i) {
            Token::Mul => {
                let counted = i > ctx.from
                    && src.is(i - 1, &Token::LParen)
                    && i + 1 < ctx.limit
                    && src.is(i + 1, &Token::RParen);
                if !counted {
                    return None;
                }
            }
            Token::Word(w) => {
                let name = match w.quote_style {
                    Some(_) => w.value.clone(),
                    None => w.value.to_ascii_lowercase(),
                };
                if w.quote_style.is_none()
                    && (matches!(
                        w.keyword,
                        Keyword::NATURAL
                            | Keyword::INSERT
                            | Keyword::UPDATE
                            | Keyword::DELETE
                            | Keyword::MERGE
                            | Keyword::SHARE
                            | Keyword::TABLE
                            | Keyword::ONLY
                            | Keyword::TABLESAMPLE
                    ) || SYSTEM_COLUMNS.contains(&name.as_str()))
                {
                    return None;
                }
                if ctx.rules.is_renamed_column(&name) {
                    renamed.push((i, name));
                    continue;
                }
                let qualifier = i + 1 < ctx.limit && src.is(i + 1, &Token::Period);
                let qualified = i > ctx.from && src.is(i - 1, &Token::Period);
                if relations.names.contains(&name)
                    && !relations.defined.contains(&i)
                    && !qualifier
                    && !qualified
                {
                    return None;
                }
            }
            _ => {}
        }
    }
    Some(renamed)
}

/// A simple-protocol read of one migrated table that names some of the columns its shape
/// renames runs on the table, each such column under its physical name (`bid` becomes
/// `bid_uuid`), and as a select item `AS` the session's name (`bid_uuid AS bid`): PostgreSQL
/// then plans it without expanding the view at every execution, as it plans the untranslated
/// session's statement (a point read through the view ran at 0.79–0.90 × the table's rate,
/// docs/benchmarks.md "Shapes"). The view lists the table's columns by position, with their
/// types, the table's privileges and its row security (`security_invoker`): the rows, the
/// column names and the types are the same; the RowDescription's table OID and column numbers
/// are the table's rather than the view's (and stay the same across the swap, which renames
/// columns in place). Only where that is sure, else the view as usual: planned at every
/// execution (a prepared statement is planned once through the view); the tables not being
/// swapped one by one; one relation, no CTE, subquery, set operation, join or table function;
/// no alias named like a renamed column; each renamed name used as a column of this table
/// (not a function, not a qualifier, and renamed by this shape: `bid_uuid` does not exist in
/// the uuid shape's view); in the select list, a renamed column only as the item itself or
/// inside a function call (named after the function); and the conditions of
/// [`table_tokens`].
fn on_the_table_renamed(ctx: &mut Ctx, stmt: &Statement) -> bool {
    use sqlparser::ast::{Expr, SelectItem, SetExpr};
    if ctx.planning != Planning::EachExecution || ctx.rules.mixed() {
        return false;
    }
    let Statement::Query(q) = stmt else {
        return false;
    };
    let SetExpr::Select(select) = &*q.body else {
        return false;
    };
    if q.with.is_some() || select.from.len() != 1 || !select.from[0].joins.is_empty() {
        return false;
    }
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = &select.from[0].relation
    else {
        return false;
    };
    // One query, one relation: no subquery, so every column reference is this table's.
    struct Count(usize, usize);
    impl Visitor for Count {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.0 += 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<()> {
            self.1 += 1;
            ControlFlow::Continue(())
        }
    }
    let mut count = Count(0, 0);
    let _ = stmt.visit(&mut count);
    if count.0 != 1 || count.1 != 1 {
        return false;
    }
    let Some((schema, table)) = resolves(ctx, name) else {
        return false;
    };
    let renamed = |id: &Ident| ctx.rules.is_renamed_column(&folded(id));
    // The relation's own names: used other than as a qualifier, a whole-row reference.
    let mut relations = Relations {
        names: HashSet::new(),
        defined: HashSet::new(),
    };
    let mut relation = |id: &Ident| {
        relations.names.insert(folded(id).into_owned());
        relations.defined.extend(ctx.src.ident_index(id));
    };
    if let Some(ObjectNamePart::Identifier(id)) = name.0.last() {
        relation(id);
    }
    if let Some(a) = alias {
        if renamed(&a.name) {
            return false;
        }
        relation(&a.name);
    }
    // Select items that are a renamed column itself: they get `AS` the session's name.
    let mut items = HashSet::new();
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(e) => e,
            SelectItem::ExprWithAlias { alias, .. } => {
                if renamed(alias) {
                    return false;
                }
                continue;
            }
            _ => return false,
        };
        let column = match expr {
            Expr::Identifier(id) => Some(id),
            Expr::CompoundIdentifier(ids) => ids.last(),
            _ => None,
        };
        match column {
            Some(id) if renamed(id) => match ctx.src.ident_index(id) {
                Some(i) => {
                    items.insert(i);
                }
                None => return false,
            },
            Some(_) => {}
            None if matches!(expr, Expr::Function(_)) => {}
            None => {
                let mentions = sqlparser::ast::visit_expressions(expr, |e| match e {
                    Expr::Identifier(id) if renamed(id) => ControlFlow::Break(()),
                    Expr::CompoundIdentifier(ids) if ids.last().is_some_and(renamed) => {
                        ControlFlow::Break(())
                    }
                    _ => ControlFlow::Continue(()),
                });
                if mentions.is_break() {
                    return false;
                }
            }
        }
    }
    let Some(words) = table_tokens(ctx, &relations) else {
        return false;
    };
    let src = ctx.src;
    let mut edits = Vec::new();
    for (i, name) in words {
        let qualifier = i + 1 < ctx.limit && src.is(i + 1, &Token::Period);
        let call = i + 1 < ctx.limit && src.is(i + 1, &Token::LParen);
        let Some(physical) = ctx.rules.physical_column(&schema, &table, &name) else {
            return false;
        };
        if qualifier || call {
            return false;
        }
        let mut text = quote(physical).into_owned();
        if items.contains(&i) {
            text.push_str(" AS ");
            text.push_str(&quote(&name));
        }
        edits.push((src.start(i)..src.end(i), text));
    }
    if edits.is_empty() {
        return false;
    }
    for (range, text) in edits {
        ctx.edits.replace(range, text);
    }
    true
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
                && resolved_label(ctx, name).as_deref() == Some(table)
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
                && matches!(&ins.table, TableObject::TableName(n) if resolved_label(ctx, n).as_deref() == Some(table))
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

fn resolves(ctx: &Ctx, name: &ObjectName) -> Option<(String, String)> {
    let idents: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(folded(id).into_owned()),
            _ => None,
        })
        .collect();
    let (schema, table) = match idents.as_slice() {
        [t] => (ctx.rules.migrated(None, t)?, t),
        [.., s, t] => (ctx.rules.migrated(Some(s), t)?, t),
        [] => return None,
    };
    Some((schema, table.clone()))
}

/// `schema.table` of the migrated table `name` resolves to.
fn resolved_label(ctx: &Ctx, name: &ObjectName) -> Option<String> {
    resolves(ctx, name).map(|(s, t)| format!("{s}.{t}"))
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

/// `COPY t [(cols)] TO …` reads the view: `COPY (SELECT * FROM view) TO …`, or with a column
/// list `COPY (SELECT cols FROM view) TO …` (the view's columns already carry the session's
/// names). PostgreSQL names only tables in this form, never views.
fn copy_to(
    ctx: &mut Ctx,
    name: &ObjectName,
    columns: &[Ident],
    shape: Shape,
) -> Result<bool, Skip> {
    let Some((schema, table)) = resolves(ctx, name) else {
        return Ok(false);
    };
    let unsupported = || limit(&format!("{schema}.{table}"), "this form of COPY");
    let index = |part: Option<&ObjectNamePart>| match part {
        Some(ObjectNamePart::Identifier(id)) => ctx.src.ident_index(id),
        _ => None,
    };
    let (Some(first), Some(last)) = (index(name.0.first()), index(name.0.last())) else {
        return Err(unsupported());
    };
    let src = ctx.src;
    let select = if columns.is_empty() {
        ctx.edits.insert(src.end(last), ")".to_string());
        "*"
    } else {
        // `t (a, b)`: the list moves into the query, and `)` takes its place.
        let close = src
            .close_paren(last + 1, ctx.limit)
            .ok_or_else(unsupported)?;
        ctx.edits
            .replace(src.end(last)..src.end(close), ")".to_string());
        src.text(last + 2, close)
    };
    ctx.edits
        .insert(src.start(first), format!("(SELECT {select} FROM "));
    point(ctx, name, &HashSet::new(), shape);
    Ok(true)
}

/// The columns a `COPY … FROM` names: its column list, and those of `FORCE_NULL`,
/// `FORCE_NOT_NULL` (and `FORCE_QUOTE`, which PostgreSQL refuses in COPY FROM), in either
/// option syntax.
fn copied_columns<'s>(
    columns: &'s [Ident],
    options: &'s [CopyOption],
    legacy_options: &'s [CopyLegacyOption],
) -> Vec<&'s Ident> {
    let mut named: Vec<&Ident> = columns.iter().collect();
    for o in options {
        if let CopyOption::ForceNotNull(c) | CopyOption::ForceNull(c) | CopyOption::ForceQuote(c) =
            o
        {
            named.extend(c);
        }
    }
    for o in legacy_options {
        if let CopyLegacyOption::Csv(csv) = o {
            for c in csv {
                if let CopyLegacyCsvOption::ForceNotNull(c) | CopyLegacyCsvOption::ForceQuote(c) = c
                {
                    named.extend(c);
                }
            }
        }
    }
    named
}

/// `COPY t [(cols)] FROM …` cannot write a view, so it writes the table itself, named as
/// written: each column it names by the session's name gets its physical name (the same
/// column, same attnum, same type). Without a column list the table's columns in attnum order
/// are the view's, under other names only, so nothing changes. The other member of a renamed
/// pair (the uuid FK when the session writes the integer one) is the table triggers' business.
fn copy_from(ctx: &mut Ctx, name: &ObjectName, columns: &[&Ident]) -> Result<bool, Skip> {
    let Some((schema, table)) = resolves(ctx, name) else {
        return Ok(false);
    };
    for id in columns {
        if ctx.rules.mixed() && ctx.rules.is_renamed_column(&folded(id)) {
            return Err(Skip {
                table: format!("{schema}.{table}"),
                reason: SkipReason::MidCutover,
            });
        }
        let Some(physical) = ctx.rules.physical_column(&schema, &table, &folded(id)) else {
            continue;
        };
        let i = ctx
            .src
            .ident_index(id)
            .filter(|&i| matches!(ctx.src.token(i), Token::Word(w) if w.value == id.value))
            .ok_or_else(|| limit(&format!("{schema}.{table}"), "this form of COPY"))?;
        ctx.edits.replace(
            ctx.src.start(i)..ctx.src.end(i),
            quote(physical).into_owned(),
        );
    }
    Ok(true)
}
