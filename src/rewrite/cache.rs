//! Rewrites cached by SQL text, and by statement shape (literals taken out), per rule-set
//! version, in bounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::preparable::preparable;
use super::shape::{self, Shape};
use super::{Outcome, Planning, RuleSet, rewrite_planned};

/// A text whose shape may run as `EXECUTE` of a prepared statement: the statement's SQL (the
/// rewritten shape, placeholders `$1`…) and the text's literals, the arguments.
#[derive(Debug)]
pub struct Prepare<'a> {
    pub template: Arc<str>,
    pub literals: Vec<&'a str>,
}

/// What the cache knows of a statement shape.
enum ShapeEntry {
    /// The outcome of rewriting the shape itself: substitute the literals into its SQL.
    /// `prepare`: that SQL, with its placeholders, when the shape may run as `EXECUTE` of a
    /// statement prepared from it ([`super::preparable`]).
    Template {
        outcome: Arc<Outcome>,
        prepare: Option<Arc<str>>,
    },
    /// Rewriting the shape did not give the rewrite of its first text: rewrite each text,
    /// for this planning.
    NotCacheable(Planning),
}

/// Applications send a small, fixed set of statement shapes (ORMs and prepared statements
/// repeat the same text), so a cache of a few thousand entries holds the whole working set.
/// Applications that inline literals send unbounded distinct texts; for those the cache must
/// not grow without limit. Policy: when full, clear it entirely. A real LRU would need a
/// shared recency list (a lock or per-entry atomics touched on every hit, the hot path); a
/// clear costs at most one re-rewrite per live shape (tens of µs each) and keeps hits
/// lock-free. Texts longer than `max_sql_bytes` are not cached, bounding memory at about
/// `capacity × (max_sql_bytes × 2 + overhead)`. A new rule-set version empties the cache;
/// each entry also carries the version it was computed under and is used only under that
/// version, so a session still finishing a statement under the old rules at cutover cannot
/// leave an old rewrite behind for the new rules.
pub struct RewriteCache {
    map: DashMap<Arc<str>, (u64, Arc<Outcome>)>,
    /// By shape ([`shape::normalize`]), for texts with inlined literals, which rarely repeat.
    shapes: DashMap<Box<str>, (u64, ShapeEntry)>,
    capacity: usize,
    max_sql_bytes: usize,
    version: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    verify: bool,
    /// How PostgreSQL plans the texts of this cache's statements (see [`Self::planned`]).
    planning: Planning,
}

impl RewriteCache {
    /// `capacity` entries, each for a text of at most `max_sql_bytes`.
    pub fn new(capacity: usize, max_sql_bytes: usize) -> RewriteCache {
        RewriteCache {
            map: DashMap::new(),
            shapes: DashMap::new(),
            capacity: capacity.max(1),
            max_sql_bytes,
            version: AtomicU64::new(u64::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            verify: false,
            planning: Planning::Once,
        }
    }

    /// A cache for texts PostgreSQL plans as `planning` says. A rewrite may depend on it
    /// (a translated INSERT's twins), so Parse texts and simple Query texts of a translated
    /// session keep separate caches (src/proxy/dualwrite.rs). With [`Planning::EachExecution`],
    /// a shape that will run as `EXECUTE` of a statement prepared from it is rewritten for
    /// [`Planning::Once`].
    pub fn planned(mut self, planning: Planning) -> RewriteCache {
        self.planning = planning;
        self
    }

    /// Re-parse every rewrite before caching it ([`super::rewrite_verified`]): safer, at about
    /// 3 times the cost of a cache miss (docs/benchmarks.md).
    pub fn verifying(mut self, on: bool) -> RewriteCache {
        self.verify = on;
        self
    }

    /// The outcome of rewriting `sql` under `rules`, from the cache when possible.
    /// Statements that touch no migrated table are answered by the prescan and not stored:
    /// the scan is as cheap as a lookup, and they would crowd out the ones worth keeping.
    pub fn rewrite(&self, rules: &RuleSet, sql: &str) -> Arc<Outcome> {
        self.lookup(rules, sql, false).0
    }

    /// For a simple Query: the outcome, and when the text's shape may run as `EXECUTE` of a
    /// statement prepared from its rewrite ([`super::preparable`]), that rewrite (with
    /// placeholders `$1`…) and the text's literals, in order.
    pub fn rewrite_query<'a>(
        &self,
        rules: &RuleSet,
        sql: &'a str,
    ) -> (Arc<Outcome>, Option<Prepare<'a>>) {
        self.lookup(rules, sql, true)
    }

    fn lookup<'a>(
        &self,
        rules: &RuleSet,
        sql: &'a str,
        query: bool,
    ) -> (Arc<Outcome>, Option<Prepare<'a>>) {
        if rules.prescan.find(sql).is_none() {
            return (unchanged(), None);
        }
        let version = self.sync_version(rules);
        let cacheable = sql.len() <= self.max_sql_bytes;
        // A text that repeats (an application sending the same literals) skips even the
        // normalization. A simple Query normalizes first: when its shape can be prepared, its
        // literals are the EXECUTE arguments.
        let mut shape = if query && cacheable {
            shape::normalize(sql)
        } else {
            None
        };
        if shape.is_none()
            && let Some(hit) = self.map.get(sql)
            && hit.0 == version
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return (Arc::clone(&hit.1), None);
        }
        if !query && cacheable {
            shape = shape::normalize(sql);
        }
        // A simple Query with a shape always takes the shape path above, never the text map:
        // keeping its text would only cost an allocation and a map insert per statement
        // (`DashMap::_insert` showed in the profile of benches/shapes.sh).
        let keep_text = cacheable && !(query && shape.is_some());
        let (outcome, prepare) = match shape {
            Some(shape) => self.by_shape(rules, version, sql, shape),
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                (self.rewrite_text(rules, sql, self.planning), None)
            }
        };
        // Texts are kept too, for Parse (whose texts are looked up first).
        if keep_text {
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
            self.map
                .insert(Arc::from(sql), (version, Arc::clone(&outcome)));
        }
        (outcome, prepare)
    }

    /// The rules' version, emptying the cache when it moved.
    fn sync_version(&self, rules: &RuleSet) -> u64 {
        let version = rules.version();
        // Load before swapping: a store on every call would bounce the cache line between
        // cores on the hot path.
        if self.version.load(Ordering::Acquire) != version
            && self.version.swap(version, Ordering::AcqRel) != version
        {
            self.map.clear();
            self.shapes.clear();
        }
        version
    }

    fn rewrite_text(&self, rules: &RuleSet, sql: &str, planning: Planning) -> Arc<Outcome> {
        Arc::new(rewrite_planned(rules, sql, self.verify, planning))
    }

    /// A text with literals: its shape's template when known (and the statement to prepare,
    /// when the shape may run as `EXECUTE`), else the text's own rewrite, and on a shape's
    /// first text, the check that decides whether the shape can be trusted.
    fn by_shape<'a>(
        &self,
        rules: &RuleSet,
        version: u64,
        sql: &str,
        shape: Shape<'a>,
    ) -> (Arc<Outcome>, Option<Prepare<'a>>) {
        if let Some(hit) = self.shapes.get(shape.text.as_str())
            && hit.0 == version
        {
            if let ShapeEntry::Template { outcome, prepare } = &hit.1
                && let Some(out) = instantiate(outcome, &shape.literals)
            {
                self.hits.fetch_add(1, Ordering::Relaxed);
                let prepare = prepare.as_ref().map(|t| Prepare {
                    template: Arc::clone(t),
                    literals: shape.literals,
                });
                return (out, prepare);
            }
            let planning = match &hit.1 {
                ShapeEntry::NotCacheable(p) => *p,
                // A template that did not instantiate: planned once only if it is prepared.
                ShapeEntry::Template { prepare, .. } if prepare.is_some() => Planning::Once,
                ShapeEntry::Template { .. } => self.planning,
            };
            drop(hit);
            self.misses.fetch_add(1, Ordering::Relaxed);
            return (self.rewrite_text(rules, sql, planning), None);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A shape that may run as `EXECUTE` is planned once whatever the cache's texts are.
        let preparable = preparable(&shape.text, shape.literals.len());
        let planning = if preparable {
            Planning::Once
        } else {
            self.planning
        };
        let actual = self.rewrite_text(rules, sql, planning);
        let template = self.rewrite_text(rules, &shape.text, planning);
        let entry = match instantiate(&template, &shape.literals) {
            Some(out) if *out == *actual => {
                let prepare = match &*template {
                    Outcome::Rewritten { sql, skipped, .. } if skipped.is_empty() && preparable => {
                        Some(Arc::from(sql.as_str()))
                    }
                    _ => None,
                };
                ShapeEntry::Template {
                    outcome: template,
                    prepare,
                }
            }
            _ => ShapeEntry::NotCacheable(planning),
        };
        if self.shapes.len() >= self.capacity {
            self.shapes.clear();
        }
        self.shapes
            .insert(shape.text.into_boxed_str(), (version, entry));
        (actual, None)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Entries, texts and shapes together.
    pub fn len(&self) -> usize {
        self.map.len() + self.shapes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The outcome for one text of a shape: the template's SQL with the literals put back.
/// Outcomes that send the original text need no substitution.
fn instantiate(template: &Arc<Outcome>, literals: &[&str]) -> Option<Arc<Outcome>> {
    match &**template {
        Outcome::Rewritten {
            sql,
            changes,
            skipped,
        } => Some(Arc::new(Outcome::Rewritten {
            sql: shape::substitute(sql, literals)?,
            changes: changes.clone(),
            skipped: skipped.clone(),
        })),
        Outcome::Unchanged | Outcome::Skipped(_) => Some(Arc::clone(template)),
    }
}

fn unchanged() -> Arc<Outcome> {
    static UNCHANGED: std::sync::OnceLock<Arc<Outcome>> = std::sync::OnceLock::new();
    Arc::clone(UNCHANGED.get_or_init(|| Arc::new(Outcome::Unchanged)))
}
