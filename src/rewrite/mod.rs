//! The dual-write rewriter: a pure function of (rule set, SQL text) → SQL text.
//!
//! For every write to a migrated child table it adds the twin columns (`<fk>_uuid` before
//! cutover, `<fk>_legacy` after) computed from the parent, by splicing text into the original
//! SQL at token positions (see `edit.rs` for why the AST is never printed back). Statements
//! that mention no migrated child table are left alone after a cheap scan, without parsing.
//!
//! The proxy calls [`RewriteCache::rewrite`] (or [`rewrite`]) with the SQL of each `Query` and
//! `Parse` message that is valid UTF-8.
//!
//! Known limits (each is a [`Skip`], never a wrong rewrite, unless noted):
//! - forms sqlparser 0.63 does not parse: `OVERRIDING … VALUE`, `ON CONFLICT (a) WHERE …`,
//!   `ON CONFLICT ((expr))`, `UPDATE ONLY`: `parse_error` / `unsupported`;
//! - `SET (a, fk) = (…)`; INSERT … SELECT with `*` or a set operation and no column list;
//!   a positional INSERT after cutover (its values land in the legacy columns): `unsupported`;
//! - an FK value from a known volatile built-in (`nextval`, `random`, …) would be evaluated
//!   twice: `volatile_expression`. A volatile *user* function is not detected (wrong twin);
//! - unqualified names resolve through the configured search path over migrated tables only,
//!   not the session's `SET search_path`, and an unmigrated table of the same name earlier in
//!   the path is not known (wrong attribution);
//! - `DEFAULT` for an FK whose column default is not NULL leaves the twin NULL until the
//!   backfill's catch-up pass;
//! - one fill direction per phase: an application that writes only the twin (uuid-aware)
//!   does not get the integer column filled.

mod cache;
mod edit;
mod insert;
pub(crate) mod lex;
mod lookup;
mod merge;
mod preparable;
mod prescan;
mod redact;
mod rules;
mod shape;
mod statement;
mod translate;
mod update;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

pub use cache::{Prepare, RewriteCache};
pub use redact::redact;
pub use rules::{
    ClientView, Direction, FkPlan, ParentPlan, PlanRules, RuleError, RuleSet, TableColumns,
};

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use edit::{Edits, Source};

/// Longer statements are not parsed: parse time and memory grow with length, and a write
/// this long is almost always a generated bulk load better served by COPY. They follow the
/// unparseable-write policy.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// Nesting deeper than this is refused by the parser (an error, not a stack overflow).
const RECURSION_LIMIT: usize = 50;

/// What kind of write was rewritten, for `keyshift_rewrites_total{table,kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `INSERT … VALUES` (with or without a column list).
    Insert,
    /// `INSERT … SELECT`.
    InsertSelect,
    /// `INSERT … ON CONFLICT … DO UPDATE`.
    Upsert,
    Update,
    Merge,
    /// A statement of a translated session pointed at keyshift's views of its shape: a read
    /// (SELECT, EXPLAIN, COPY TO, …), or a write with no twin to fill (DELETE, UPDATE of
    /// other columns).
    Translated,
    TranslatedWrite,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Insert => "insert",
            Kind::InsertSelect => "insert_select",
            Kind::Upsert => "upsert",
            Kind::Update => "update",
            Kind::Merge => "merge",
            Kind::Translated => "translated",
            Kind::TranslatedWrite => "translated_write",
        }
    }
}

/// Why a write to a migrated child table was not rewritten, for
/// `keyshift_rewrite_skipped_total{reason}` and the strict-mode error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// sqlparser could not tokenize or parse the statement.
    ParseError,
    /// It parsed, but its form is one the rewriter does not handle.
    Unsupported,
    /// The FK value is computed by a volatile function: copying it would evaluate it twice.
    Volatile,
    /// Longer than [`MAX_SQL_BYTES`].
    TooLong,
    /// The rewritten text did not parse, so the original was kept: sqlparser accepted
    /// something PostgreSQL would reject anyway, or a rewriter bug.
    Invalid,
    /// The rewriter panicked (a bug), caught.
    Internal,
    /// A translated session's statement in a form PostgreSQL cannot run through a view
    /// (src/rewrite/translate.rs): what the form is.
    ViewLimit(&'static str),
    /// A translated session's `COPY … FROM` naming a renamed column while a cutover swaps
    /// the tables one by one: the column's physical name depends on whether its table has
    /// been swapped yet, which the rules do not follow (docs/cutover.md).
    MidCutover,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::ParseError => "parse_error",
            SkipReason::Unsupported => "unsupported",
            SkipReason::Volatile => "volatile_expression",
            SkipReason::TooLong => "too_long",
            SkipReason::Invalid => "rewrite_invalid",
            SkipReason::Internal => "internal_error",
            SkipReason::ViewLimit(_) => "view_limit",
            SkipReason::MidCutover => "mid_cutover",
        }
    }

    /// A sentence for the strict-mode ErrorResponse.
    pub fn describe(self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            SkipReason::ParseError => "keyshift cannot parse this statement",
            SkipReason::Unsupported => "keyshift cannot rewrite this form of statement",
            SkipReason::Volatile => {
                "the foreign key value comes from a volatile function, which keyshift cannot copy"
            }
            SkipReason::TooLong => "the statement is too long for keyshift to rewrite",
            SkipReason::Invalid => "keyshift's rewrite of this statement was not valid SQL",
            SkipReason::Internal => "keyshift failed to rewrite this statement (a bug)",
            SkipReason::MidCutover => {
                "a cutover is swapping the migrated tables one by one, and COPY FROM naming a \
                 key or foreign key column cannot be served until it ends: retry in a few \
                 seconds (`keyshift status` shows its progress), or COPY without a column list"
            }
            SkipReason::ViewLimit(what) => {
                return std::borrow::Cow::Owned(format!(
                    "keyshift serves this session's shape through views, and PostgreSQL cannot \
                     run {what} through a view"
                ));
            }
        })
    }
}

/// One rewritten write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `schema.table` of the child table.
    pub table: String,
    pub kind: Kind,
}

/// One write to a migrated child table left as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// `schema.table` when known; the name as written when the statement did not parse.
    pub table: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No write to a migrated child table: send the original bytes.
    Unchanged,
    /// Send `sql` instead. It is one statement wherever the original was one, with the same
    /// parameters, result columns and command tags. `skipped` lists statements of the same
    /// Query string that were left unchanged (strict mode refuses the whole message).
    Rewritten {
        sql: String,
        changes: Vec<Change>,
        skipped: Vec<Skip>,
    },
    /// Writes to migrated child tables that were left unchanged, nothing rewritten: send the
    /// original (or refuse it in strict mode).
    Skipped(Vec<Skip>),
}

impl Outcome {
    /// The statements left unchanged, whatever the outcome.
    pub fn skipped(&self) -> &[Skip] {
        match self {
            Outcome::Unchanged => &[],
            Outcome::Rewritten { skipped, .. } | Outcome::Skipped(skipped) => skipped,
        }
    }
}

/// How often PostgreSQL will plan the text a rewrite produces, which decides how a
/// translated INSERT fills its twins ([`statement::Ctx::inserted_twin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Planning {
    /// Once, or once per few executions: a named statement, an unnamed one that keyshift
    /// prepares under a name when it repeats (src/proxy/server_statements.rs), a simple
    /// Query whose shape keyshift runs as `EXECUTE` (src/rewrite/preparable.rs).
    #[default]
    Once,
    /// At every execution: the text of any other simple Query.
    EachExecution,
}

/// Rewrites `sql` under `rules`, for a statement planned once ([`Planning::Once`]). Never
/// panics: a panic inside is caught and reported as [`SkipReason::Internal`].
///
/// Release builds do not re-parse the output (debug builds, and so every test, do): the
/// re-parse costs about twice the rest of the rewrite, because sqlparser parses the nested
/// parentheses of the lookups speculatively, and it would only turn a rewriter bug's syntax
/// error into a pass-through. Use [`rewrite_verified`] to always check.
pub fn rewrite(rules: &RuleSet, sql: &str) -> Outcome {
    rewrite_checked(rules, sql, cfg!(debug_assertions), Planning::Once)
}

/// [`rewrite`], always checking that each rewritten statement parses as one statement; one
/// that does not is kept as it came and reported as [`SkipReason::Invalid`].
pub fn rewrite_verified(rules: &RuleSet, sql: &str) -> Outcome {
    rewrite_checked(rules, sql, true, Planning::Once)
}

/// [`rewrite`] for a text PostgreSQL will plan as `planning` says; `verify` as
/// [`rewrite_verified`] (debug builds always verify).
pub fn rewrite_planned(rules: &RuleSet, sql: &str, verify: bool, planning: Planning) -> Outcome {
    rewrite_checked(rules, sql, verify || cfg!(debug_assertions), planning)
}

fn rewrite_checked(rules: &RuleSet, sql: &str, verify: bool, planning: Planning) -> Outcome {
    let Some(name) = rules.prescan.find(sql) else {
        return Outcome::Unchanged;
    };
    if sql.len() > MAX_SQL_BYTES {
        return unparsed(rules, sql, 0..sql.len(), SkipReason::TooLong);
    }
    match catch_unwind(AssertUnwindSafe(|| {
        rewrite_parsed(rules, sql, verify, true, planning)
    })) {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Skipped(vec![Skip {
            table: name.to_string(),
            reason: SkipReason::Internal,
        }]),
    }
}

fn parser(tokens: Vec<sqlparser::tokenizer::TokenWithSpan>) -> Parser<'static> {
    Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(tokens)
}

/// [`rewrite`] without the prescan's gate: every statement is parsed. For the property that
/// the prescan never hides a write the parser would find.
#[cfg(test)]
pub(crate) fn rewrite_unscanned(rules: &RuleSet, sql: &str) -> Outcome {
    rewrite_parsed(rules, sql, true, false, Planning::Once)
}

/// Whether sqlparser read `FROM ONLY c` (or `UPDATE ONLY c`, `DELETE FROM ONLY c`) as the
/// table `ONLY` under the alias `c`, as its PostgreSQL dialect does (0.63; `ONLY public.c`
/// does not parse at all): the statement then looks as if it named no migrated table, and a
/// translated session would read the table in the other shape. It is handled as a statement
/// keyshift cannot parse.
fn misreads_only(stmt: &sqlparser::ast::Statement) -> bool {
    use sqlparser::ast::{ObjectNamePart, TableFactor, Visit, Visitor};
    use std::ops::ControlFlow;
    struct Only;
    impl Visitor for Only {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias: Some(alias),
                ..
            } = t
                && !alias.explicit
                && let [ObjectNamePart::Identifier(id)] = name.0.as_slice()
                && id.quote_style.is_none()
                && id.value.eq_ignore_ascii_case("only")
            {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    stmt.visit(&mut Only).is_break()
}

/// `gate`: parse only the statements the prescan says may mention a migrated table.
fn rewrite_parsed(
    rules: &RuleSet,
    sql: &str,
    verify: bool,
    gate: bool,
    planning: Planning,
) -> Outcome {
    let Ok(mut src) = Source::tokenize(sql) else {
        return unparsed(rules, sql, 0..sql.len(), SkipReason::ParseError);
    };
    let mut out = String::new();
    let mut copied_to = 0;
    let mut changes = Vec::new();
    let mut skipped = Vec::new();
    for piece in src.pieces() {
        let range = src.start(piece.from)..src.end(piece.to - 1);
        let name = match rules.prescan.find(&sql[range.clone()]) {
            Some(name) => name,
            None if gate => continue,
            None => "",
        };
        // The parser wants owned tokens: lend it the whole list when the statement is all of
        // it (the usual case) and take it back after, rather than cloning every token.
        let whole = piece.raw_from == 0 && piece.raw_to == src.raw.len();
        let tokens = if whole {
            std::mem::take(&mut src.raw)
        } else {
            src.raw[piece.raw_from..piece.raw_to].to_vec()
        };
        let mut p = parser(tokens);
        let parsed = p
            .parse_statement()
            .ok()
            .filter(|s| p.peek_token().token == Token::EOF && !misreads_only(s));
        if whole {
            src.raw = p.into_tokens();
        }
        let Some(stmt) = parsed else {
            if let Some(table) = untranslatable_or_written(rules, sql, range.clone()) {
                skipped.push(Skip {
                    table: table.to_string(),
                    reason: SkipReason::ParseError,
                });
            }
            continue;
        };
        let mut ctx = statement::Ctx {
            rules,
            src: &src,
            from: piece.from,
            limit: piece.to,
            edits: Edits::default(),
            redirects: Edits::default(),
            changes: Vec::new(),
            ctes: Vec::new(),
            visible: usize::MAX,
            planning,
        };
        // Translation first: an expression the dual-write copies into a lookup (a subquery
        // naming a migrated table) must read the views too, so the copy takes the redirects.
        let mut redirected = translate::Redirected::No;
        if let Some(shape) = rules.translated() {
            match translate::redirect(&mut ctx, &stmt, shape) {
                Ok(r) => redirected = r,
                Err(skip) => {
                    skipped.push(skip);
                    continue;
                }
            }
            ctx.redirects = ctx.edits.clone();
        }
        if let Err(skip) = statement::visit(&mut ctx, &stmt) {
            skipped.push(skip);
            continue;
        }
        ctx.finish_ctes();
        if redirected != translate::Redirected::No && ctx.changes.is_empty() {
            ctx.changes.push(Change {
                table: name.to_string(),
                kind: match redirected {
                    translate::Redirected::Write => Kind::TranslatedWrite,
                    _ => Kind::Translated,
                },
            });
        }
        if ctx.edits.is_empty() {
            continue;
        }
        let Some(text) = ctx.edits.apply(sql, range.clone()) else {
            skipped.push(invalid(&ctx.changes, name));
            continue;
        };
        // Last line of defence against a mangled statement: what is sent must parse, as one
        // statement.
        if verify && !parses_as_one(&text) {
            skipped.push(invalid(&ctx.changes, name));
            continue;
        }
        out.push_str(&sql[copied_to..range.start]);
        out.push_str(&text);
        copied_to = range.end;
        changes.extend(ctx.changes);
    }
    if changes.is_empty() {
        return if skipped.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Skipped(skipped)
        };
    }
    out.push_str(&sql[copied_to..]);
    Outcome::Rewritten {
        sql: out,
        changes,
        skipped,
    }
}

fn invalid(changes: &[Change], name: &str) -> Skip {
    Skip {
        table: changes
            .first()
            .map_or_else(|| name.to_string(), |c| c.table.clone()),
        reason: SkipReason::Invalid,
    }
}

/// The outcome for (part of) a text keyshift does not parse: a skip only when a statement in
/// `range` can write a migrated table in a way that needs a dual-write. Anything else (a read,
/// a DDL statement naming a column `c`, a cursor called `c`) is not a skipped dual-write: it is
/// neither refused in strict mode nor counted.
fn unparsed(rules: &RuleSet, sql: &str, range: Range<usize>, reason: SkipReason) -> Outcome {
    match untranslatable_or_written(rules, sql, range) {
        Some(table) => Outcome::Skipped(vec![Skip {
            table: table.to_string(),
            reason,
        }]),
        None => Outcome::Unchanged,
    }
}

/// The table a statement keyshift could not parse concerns: for a translated session any
/// mention of a migrated table (run untranslated, it would see the other shape), otherwise
/// only a write that needs a dual-write.
fn untranslatable_or_written<'r>(
    rules: &'r RuleSet,
    sql: &str,
    range: Range<usize>,
) -> Option<&'r str> {
    match rules.translated() {
        Some(_) => rules.prescan.find(sql.get(range)?),
        None => rules.prescan.written(sql, range),
    }
}

pub(crate) fn parses_as_one(sql: &str) -> bool {
    let Ok(src) = Source::tokenize(sql) else {
        return false;
    };
    let mut p = parser(src.raw);
    p.parse_statement().is_ok()
        && (p.peek_token().token == Token::EOF
            || (p.consume_token(&Token::SemiColon) && p.peek_token().token == Token::EOF))
}
