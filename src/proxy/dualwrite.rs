//! Dual-write: turns the stored migration (plan and phase) into the proxy's statement rewriter,
//! the implementation of [`StatementRewriter`] that `control` puts in force. It lives in the
//! proxy because it implements the proxy's hook; it reads the plan and the rewriter below it
//! and nothing above.
//!
//! Data flows one way: the plan in `keyshift.migration` plus what the catalog says of its tables
//! ([`Reading`]) become [`PlanRules`] (pure, [`plan_rules`]); the phase picks the direction;
//! [`RuleSet::build`] makes the immutable rule set; [`DualWrite`] wraps it with the cache, the
//! metrics and the strict-mode policy, and is what sessions call for every Query and Parse.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use tracing::warn;

use super::reading::Reading;
use super::scope::Scope;
use super::statements::{Decision, QueryTemplate, StatementRewriter};
use crate::metrics::{RewriteMetrics, TranslationMetrics};
use crate::migrate::plan::Plan;
use crate::migrate::state::{DualWrite as Mode, Phase};
use crate::rewrite::{
    ClientView, Direction, FkPlan, Kind, Outcome, ParentPlan, PlanRules, Planning, RewriteCache,
    RuleError, RuleSet, Skip, TableColumns, redact,
};
use crate::shape::Shape;

/// Settings that shape the rewriter, from the proxy's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Refuse writes to migrated tables that cannot be rewritten (SQLSTATE 0A000).
    pub strict: bool,
    /// Schemas that unqualified table names resolve through.
    pub search_path: Vec<String>,
    /// Rewrite cache entries.
    pub cache_entries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            strict: false,
            search_path: vec!["public".into()],
            cache_entries: 4096,
        }
    }
}

/// The direction writes are completed in, or `None` when the phase passes writes through.
pub fn direction(phase: Phase) -> Option<Direction> {
    match phase.dual_write() {
        Mode::Off => None,
        Mode::Forward => Some(Direction::Forward),
        Mode::Reverse => Some(Direction::Reverse),
    }
}

/// The rewriter's view of a plan. Pure.
pub fn plan_rules(plan: &Plan, columns: Vec<TableColumns>) -> PlanRules {
    let parents = plan
        .tables
        .iter()
        .map(|t| ParentPlan {
            schema: t.schema.clone(),
            table: t.name.clone(),
            key_column: t.key.clone(),
            uuid_column: t.uuid_column.clone(),
            legacy_column: t.legacy_column.clone(),
        })
        .collect();
    let fks = plan
        .tables
        .iter()
        .flat_map(|t| t.referenced_by.iter().map(move |fk| (t, fk)))
        .map(|(t, fk)| FkPlan {
            schema: fk.child_schema.clone(),
            table: fk.child_table.clone(),
            column: fk.child_column.clone(),
            uuid_column: fk.uuid_column.clone(),
            legacy_column: fk.legacy_column.clone(),
            column_type: fk.child_type.clone(),
            parent_schema: fk.parent_schema.clone(),
            parent_table: fk.parent_table.clone(),
            parent_key_column: fk.parent_key.clone(),
            parent_uuid_column: fk.parent_uuid_column.clone(),
            parent_legacy_column: t.legacy_column.clone(),
            constraint: (fk.child_not_null && !fk.deferrable).then(|| fk.constraint.clone()),
        })
        .collect();
    PlanRules {
        parents,
        fks,
        columns,
        shadows: Vec::new(),
        shaped_views: Vec::new(),
        columns_integer_named: false,
    }
}

/// A phase's rewriters: the one for sessions of every shape but one, and that one shape's
/// when the phase serves it. Usually the physical shape's and the translated one's; while a
/// cutover swaps table by table, the integer shape's and the uuid shape's, both translated.
pub type Rewriters = (DualWrite, Option<(Shape, DualWrite)>);

/// The rewriters for a migration in `phase`: one for sessions in the physical shape, and
/// one for sessions of the other shape when the phase serves it; `None` when the phase passes
/// writes through unchanged. In phase `cutting_over` no shape is physical: both are
/// translated. Pure: what it needs from the catalog is `reading` (src/proxy/reading.rs), in
/// the phase's physical shape (through the integer views in `cutting_over`).
pub fn build(
    plan: &Plan,
    phase: Phase,
    reading: &Reading,
    version: u64,
    settings: &Settings,
    metrics: Arc<RewriteMetrics>,
    translation: TranslationMetrics,
) -> Result<Option<Rewriters>, RuleError> {
    let Some(dir) = direction(phase) else {
        return Ok(None);
    };
    let mut rules = plan_rules(plan, reading.columns.clone());
    rules.shadows = reading.shadows.clone();
    rules.columns_integer_named = reading.through_views;
    let translated = |shape: Shape| -> Result<DualWrite, RuleError> {
        let mut rules = rules.clone();
        rules.shaped_views = reading.copies(shape).to_vec();
        let set = RuleSet::build(
            &rules,
            shape_direction(shape),
            ClientView::Translated(shape),
            settings.search_path.clone(),
            version,
        )?;
        // A translated statement that cannot be translated would run against the tables
        // in the other shape: always refused, strict or not.
        let strict = Settings {
            strict: true,
            ..settings.clone()
        };
        let mut dw = DualWrite::new(set, &strict, metrics.clone());
        dw.translation = Some(translation.clone());
        Ok(dw)
    };
    let Some(physical) = Shape::physical(phase) else {
        return Ok(Some((
            translated(Shape::Integer)?,
            Some((Shape::Uuid, translated(Shape::Uuid)?)),
        )));
    };
    let set = RuleSet::build(
        &rules,
        dir,
        ClientView::Physical,
        settings.search_path.clone(),
        version,
    )?;
    let other = Some(physical.other()).filter(|s| s.available(phase).is_ok());
    let other = match other {
        Some(shape) => Some((shape, translated(shape)?)),
        None => None,
    };
    Ok(Some((DualWrite::new(set, settings, metrics), other)))
}

/// The dual-write a shape's writes need: an integer-shaped write names the integer columns
/// and its uuid twins are filled; a uuid-shaped one the other way round.
pub fn shape_direction(shape: Shape) -> Direction {
    match shape {
        Shape::Integer => Direction::Forward,
        Shape::Uuid => Direction::Reverse,
    }
}

/// Statement shapes already logged as skipped; bounded so odd traffic cannot grow it.
const MAX_LOGGED_SHAPES: usize = 1000;

/// The rewriter sessions call: one rule set, its cache, metrics and the strict policy.
pub struct DualWrite {
    rules: RuleSet,
    cache: RewriteCache,
    /// A translated session's simple Query texts, whose INSERTs leave their twins to the
    /// fill triggers when PostgreSQL plans them at every execution
    /// (`rewrite::Planning`); `None` for the physical shape, whose rewrites do not depend
    /// on it.
    queries: Option<RewriteCache>,
    strict: bool,
    metrics: Arc<RewriteMetrics>,
    logged: DashMap<String, ()>,
    /// For a translated session's rewriter: its statements are also counted by shape.
    translation: Option<TranslationMetrics>,
}

impl DualWrite {
    /// Touches no metric: a rewriter may be built ahead of the moment it is put in force
    /// (src/proxy/control.rs), which resets the cache counters then
    /// (`RewriteMetrics::new_cache`).
    pub fn new(rules: RuleSet, settings: &Settings, metrics: Arc<RewriteMetrics>) -> DualWrite {
        DualWrite {
            queries: query_cache(&rules, settings.cache_entries),
            rules,
            cache: RewriteCache::new(settings.cache_entries, 64 * 1024),
            strict: settings.strict,
            metrics,
            logged: DashMap::new(),
            translation: None,
        }
    }

    /// Counts and logs (once per statement shape, literals removed) writes left unrewritten.
    fn skipped(&self, sql: &str, skips: &[Skip]) {
        for s in skips {
            self.metrics
                .skipped
                .with_label_values(&[s.reason.as_str()])
                .inc();
        }
        let shape = redact(sql, 300);
        if self.logged.len() < MAX_LOGGED_SHAPES && self.logged.insert(shape.clone(), ()).is_none()
        {
            for s in skips {
                // The target predates the move under proxy/: the runbook and the
                // KeyshiftWritesNotRewritten alert tell operators to filter on it.
                warn!(
                    target: "keyshift::dualwrite",
                    table = %s.table,
                    reason = s.reason.as_str(),
                    statement = %shape,
                    strict = self.strict,
                    "a write to a migrated table was not rewritten: {}",
                    s.reason.describe()
                );
            }
        }
    }

    fn refusal(&self, skips: &[Skip]) -> Decision {
        let s = &skips[0];
        if let Some(shape) = self.rules.translated() {
            return Decision::Refuse(
                format!(
                    "keyshift cannot serve this statement to a {shape}-shaped session: {} ({} is \
                     served to this session through keyshift's view of it)",
                    s.reason.describe(),
                    s.table
                )
                .into(),
            );
        }
        Decision::Refuse(
            format!(
                "keyshift refused a write to {}: {} (strict = true; without strict it would pass unchanged and leave the uuid columns for the backfill's catch-up)",
                s.table,
                s.reason.describe()
            )
            .into(),
        )
    }
}

/// A statement that tries to change `keyshift.shape` (a `SET`, `RESET` or `set_config`):
/// PostgreSQL would accept it as a placeholder setting and nothing would change, so it is
/// refused with the reason instead.
fn changes_shape(sql: &str) -> bool {
    const NAME: &[u8] = b"keyshift.shape";
    let b = sql.as_bytes();
    // Most statements have no dot at all: one pass of a byte search before the window scan.
    if !b.contains(&b'.') || !b.windows(NAME.len()).any(|w| w.eq_ignore_ascii_case(NAME)) {
        return false;
    }
    let lower = sql.to_ascii_lowercase();
    let first = lower.split_whitespace().next().unwrap_or("");
    matches!(first, "set" | "reset") || lower.contains("set_config")
}

const SHAPE_FIXED: &str = "keyshift.shape is fixed for the life of a connection: open a new \
     connection with keyshift.shape set (startup parameter, or -c keyshift.shape=… in options) \
     to use another shape";

impl StatementRewriter for DualWrite {
    fn rewrite(&self, sql: &str) -> Decision {
        if changes_shape(sql) {
            return Decision::Refuse(SHAPE_FIXED.into());
        }
        let start = Instant::now();
        let out = self.cache.rewrite(&self.rules, sql);
        self.decide(sql, &out, start)
    }

    fn rewrite_query(&self, sql: &str) -> (Decision, Option<QueryTemplate>) {
        if changes_shape(sql) {
            return (Decision::Refuse(SHAPE_FIXED.into()), None);
        }
        let start = Instant::now();
        let cache = self.queries.as_ref().unwrap_or(&self.cache);
        let (out, prepare) = cache.rewrite_query(&self.rules, sql);
        let decision = self.decide(sql, &out, start);
        let template = match (&decision, prepare) {
            (Decision::Replace(_), Some(p)) => Some(QueryTemplate {
                template: p.template,
                args: p.literals.join(", "),
            }),
            _ => None,
        };
        (decision, template)
    }

    fn observe_metrics(&self) {
        let (mut hits, mut misses, mut len) =
            (self.cache.hits(), self.cache.misses(), self.cache.len());
        if let Some(q) = &self.queries {
            hits += q.hits();
            misses += q.misses();
            len += q.len();
        }
        self.metrics.observe_cache(hits, misses, len);
    }

    fn may_name_migrated(&self, sql: &str) -> bool {
        self.rules.may_name_migrated(sql)
    }

    fn scoped(&self, scope: &Scope) -> Option<Arc<dyn StatementRewriter>> {
        let rules = self
            .rules
            .with_scope(scope.path(), &scope.temp)
            .without_lookups_in(&scope.unreadable);
        Some(Arc::new(DualWrite {
            // One session's: small, and not in the proxy's cache metrics.
            queries: query_cache(&rules, SCOPED_CACHE_ENTRIES),
            rules,
            cache: RewriteCache::new(SCOPED_CACHE_ENTRIES, 64 * 1024),
            strict: self.strict,
            metrics: self.metrics.clone(),
            logged: DashMap::new(),
            translation: self.translation.clone(),
        }))
    }
}

/// Rewrite cache entries of a session with its own search path or temporary tables.
const SCOPED_CACHE_ENTRIES: usize = 256;

/// The cache of simple Query texts for a translated rule set (`DualWrite::queries`).
fn query_cache(rules: &RuleSet, entries: usize) -> Option<RewriteCache> {
    rules
        .translated()
        .map(|_| RewriteCache::new(entries, 64 * 1024).planned(Planning::EachExecution))
}

impl DualWrite {
    /// The decision for `sql` given its rewrite, counted in the metrics.
    fn decide(&self, sql: &str, out: &Outcome, start: Instant) -> Decision {
        let decision = match out {
            // The prescan path: no metrics on what is most of the traffic.
            Outcome::Unchanged => return Decision::Forward,
            Outcome::Rewritten {
                sql: new,
                changes,
                skipped,
            } => {
                // Translation is counted by shape below, not as a dual-write.
                for c in changes
                    .iter()
                    .filter(|c| !matches!(c.kind, Kind::Translated | Kind::TranslatedWrite))
                {
                    self.metrics
                        .rewrites
                        .with_label_values(&[&c.table, c.kind.as_str()])
                        .inc();
                }
                if !skipped.is_empty() {
                    self.skipped(sql, skipped);
                    if self.strict {
                        return self.refusal(skipped);
                    }
                }
                Decision::Replace(new.as_str().into())
            }
            Outcome::Skipped(skips) => {
                self.skipped(sql, skips);
                if self.strict {
                    self.refusal(skips)
                } else {
                    Decision::Forward
                }
            }
        };
        let elapsed = start.elapsed().as_secs_f64();
        self.metrics.duration.observe(elapsed);
        if let (Some(t), Some(shape)) = (&self.translation, self.rules.translated()) {
            let kind = match (&decision, out) {
                (Decision::Refuse(_), _) => "refused",
                (_, Outcome::Rewritten { changes, .. })
                    if changes.iter().all(|c| c.kind == Kind::Translated) =>
                {
                    "read"
                }
                (_, Outcome::Rewritten { .. }) => "write",
                _ => "other",
            };
            t.statements
                .with_label_values(&[shape.as_str(), kind])
                .inc();
            t.seconds.observe(elapsed);
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// `public.c` with an FK `p_id` to `public.p`, the tables of issue 12's regression run.
    fn dual_write(strict: bool) -> (DualWrite, Arc<RewriteMetrics>) {
        let plan = PlanRules {
            parents: vec![ParentPlan {
                schema: "public".into(),
                table: "p".into(),
                key_column: "id".into(),
                uuid_column: "id_uuid".into(),
                legacy_column: "id_legacy".into(),
            }],
            fks: vec![FkPlan {
                schema: "public".into(),
                table: "c".into(),
                column: "p_id".into(),
                uuid_column: "p_id_uuid".into(),
                legacy_column: "p_id_legacy".into(),
                column_type: "integer".into(),
                parent_schema: "public".into(),
                parent_table: "p".into(),
                parent_key_column: "id".into(),
                parent_uuid_column: "id_uuid".into(),
                parent_legacy_column: "id_legacy".into(),
                constraint: None,
            }],
            ..PlanRules::default()
        };
        let rules = RuleSet::build(
            &plan,
            Direction::Forward,
            ClientView::Physical,
            vec!["public".into()],
            1,
        )
        .expect("valid plan");
        let metrics = Metrics::new().rewrite.clone();
        let settings = Settings {
            strict,
            ..Settings::default()
        };
        (DualWrite::new(rules, &settings, metrics.clone()), metrics)
    }

    fn skipped_total(m: &RewriteMetrics) -> u64 {
        ["parse_error", "unsupported", "too_long"]
            .iter()
            .map(|r| m.skipped.with_label_values(&[*r]).get())
            .sum()
    }

    #[test]
    fn statements_that_do_not_write_a_migrated_table_are_neither_refused_nor_counted() {
        let not_writes = [
            "UPDATE js SET j['a']['c'] = '1'",
            "SELECT 'abc' COLLATE \"C\"",
            "CREATE TABLE t (c int)",
            "DECLARE c CURSOR FOR SELECT 1",
            "FETCH 1 FROM c",
            "CLOSE c",
            "UPDATE t SET c[1] = 2 OVERRIDING",
            "SELECT c FROM t WHERE a = 'unterminated",
            "CREATE RULE r AS ON INSERT TO t DO INSTEAD (INSERT INTO c VALUES (1); NOTIFY c)",
        ];
        for strict in [true, false] {
            let (dw, metrics) = dual_write(strict);
            for sql in not_writes {
                assert!(
                    matches!(dw.rewrite(sql), Decision::Forward),
                    "strict = {strict}: {sql}"
                );
            }
            assert_eq!(skipped_total(&metrics), 0, "strict = {strict}");
            assert!(dw.logged.is_empty(), "strict = {strict}");
        }
    }

    #[test]
    fn unparseable_writes_to_a_migrated_table_are_refused_or_counted() {
        let writes = [
            "insert into C (id, p_id) overriding system value values (1, 2)",
            "WITH x AS (UPDATE ONLY public.\"c\" AS y SET p_id = 1 RETURNING *) SELECT * FROM x",
        ];
        let (dw, metrics) = dual_write(true);
        for sql in writes {
            assert!(matches!(dw.rewrite(sql), Decision::Refuse(_)), "{sql}");
        }
        assert_eq!(skipped_total(&metrics), 2);
        let (dw, metrics) = dual_write(false);
        for sql in writes {
            assert!(matches!(dw.rewrite(sql), Decision::Forward), "{sql}");
        }
        assert_eq!(skipped_total(&metrics), 2);
        assert_eq!(dw.logged.len(), 2);
    }
}
