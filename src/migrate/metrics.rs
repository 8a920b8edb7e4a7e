//! Prometheus metrics for the migration, registry-agnostic: the proxy (or any process) builds
//! [`MigrateMetrics`], registers it in its own registry, and calls [`MigrateMetrics::observe`]
//! with a [`Progress`] read from the database (`progress::read`) at each scrape or on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{Histogram, HistogramOpts, IntGauge, IntGaugeVec, Opts, Registry};

use super::progress::Progress;
use super::state::Phase;

#[derive(Clone)]
pub struct MigrateMetrics {
    /// `keyshift_backfill_rows_done{task,table}`: rows scanned by each backfill task.
    pub rows_done: IntGaugeVec,
    /// `keyshift_backfill_rows_remaining{task,table}`: estimate of rows left.
    pub rows_remaining: IntGaugeVec,
    /// `keyshift_backfill_last_batch_seconds_milli{task}`: duration of the last batch, ms.
    pub last_batch_ms: IntGaugeVec,
    /// `keyshift_backfill_batch_seconds`: durations of the batches seen between observations.
    pub batch_seconds: Histogram,
    /// `keyshift_backfill_eta_seconds`: the running backfill's time left ([`Progress::eta`]),
    /// -1 when none is running or it has no rate yet.
    pub eta_seconds: IntGauge,
    /// `keyshift_migration_phase{phase}`: 1 for the current phase, 0 for the others.
    pub phase: IntGaugeVec,
    /// `keyshift_fill_triggers_off{table}`: per child, 1 when its fill triggers for this phase
    /// are missing or disabled (writes bypassing the proxy there stay unfilled), else 0.
    pub fill_off: IntGaugeVec,
    /// Batch count per task at the last observation, so that each new batch is counted once.
    seen: Arc<Mutex<HashMap<String, i64>>>,
}

impl MigrateMetrics {
    pub fn new() -> Result<MigrateMetrics, prometheus::Error> {
        Ok(MigrateMetrics {
            rows_done: IntGaugeVec::new(
                Opts::new(
                    "keyshift_backfill_rows_done",
                    "Rows scanned by each backfill task",
                ),
                &["task", "table"],
            )?,
            rows_remaining: IntGaugeVec::new(
                Opts::new(
                    "keyshift_backfill_rows_remaining",
                    "Estimated rows left for each backfill task",
                ),
                &["task", "table"],
            )?,
            last_batch_ms: IntGaugeVec::new(
                Opts::new(
                    "keyshift_backfill_last_batch_milliseconds",
                    "Duration of each task's last batch",
                ),
                &["task"],
            )?,
            batch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keyshift_backfill_batch_seconds",
                    "Backfill batch durations",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )?,
            eta_seconds: IntGauge::new(
                "keyshift_backfill_eta_seconds",
                "Time left of the running backfill, from the rate of its recent batches (-1: none running)",
            )?,
            phase: IntGaugeVec::new(
                Opts::new(
                    "keyshift_migration_phase",
                    "1 for the migration's current phase",
                ),
                &["phase"],
            )?,
            fill_off: IntGaugeVec::new(
                Opts::new(
                    "keyshift_fill_triggers_off",
                    "1 for a child table whose fill triggers are missing or disabled: writes that bypass the proxy there leave a side of its foreign keys unfilled",
                ),
                &["table"],
            )?,
            seen: Arc::default(),
        })
    }

    pub fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.rows_done.clone()))?;
        r.register(Box::new(self.rows_remaining.clone()))?;
        r.register(Box::new(self.last_batch_ms.clone()))?;
        r.register(Box::new(self.batch_seconds.clone()))?;
        r.register(Box::new(self.eta_seconds.clone()))?;
        r.register(Box::new(self.phase.clone()))?;
        r.register(Box::new(self.fill_off.clone()))?;
        Ok(())
    }

    pub fn observe(&self, p: &Progress) {
        for ph in Phase::ALL {
            self.phase
                .with_label_values(&[ph.as_str()])
                .set(i64::from(p.phase == Some(ph)));
        }
        // Reset first: a table no longer migrated (after finalize) disappears.
        self.fill_off.reset();
        for (t, off) in &p.fill_off {
            self.fill_off.with_label_values(&[t]).set(i64::from(*off));
        }
        self.eta_seconds
            .set(p.eta().map(|d| d.as_secs() as i64).unwrap_or(-1));
        for t in &p.tasks {
            let table = format!("{}.{}", t.schema, t.table);
            self.rows_done
                .with_label_values(&[&t.task, &table])
                .set(t.rows_done);
            self.rows_remaining
                .with_label_values(&[&t.task, &table])
                .set(t.rows_remaining());
            if let Some(ms) = t.last_batch_ms {
                self.last_batch_ms
                    .with_label_values(&[&t.task])
                    .set(ms.round() as i64);
                // Only the last batch's duration is stored: observe it once per new batch count
                // (a sample of the durations when scrapes are rarer than batches).
                if let Ok(mut seen) = self.seen.lock() {
                    let prev = seen.insert(t.task.clone(), t.batches);
                    if prev.is_some_and(|p| p != t.batches) {
                        self.batch_seconds.observe(ms / 1000.0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::progress::TaskProgress;

    #[test]
    fn observes_progress() {
        let m = MigrateMetrics::new().unwrap();
        let r = Registry::new();
        m.register(&r).unwrap();
        m.observe(&Progress {
            phase: Some(Phase::Backfilling),
            rules_version: 3,
            fill_off: vec![("public.c".into(), true), ("public.d".into(), false)],
            tasks: vec![TaskProgress {
                task: "key:public.t".into(),
                kind: "key".into(),
                schema: "public".into(),
                table: "t".into(),
                column: "id_uuid".into(),
                done: false,
                rows_estimate: 100,
                rows_done: 40,
                rows_updated: 40,
                batches: 4,
                last_batch_ms: Some(12.4),
                rows_per_sec: Some(20.0),
                row_cost: 1.0,
            }],
        });
        assert_eq!(
            m.rows_remaining
                .with_label_values(&["key:public.t", "public.t"])
                .get(),
            60
        );
        // 60 rows left at 20 rows/s.
        assert_eq!(m.eta_seconds.get(), 3);
        assert_eq!(m.phase.with_label_values(&["backfilling"]).get(), 1);
        assert_eq!(m.phase.with_label_values(&["expanded"]).get(), 0);
        assert_eq!(m.fill_off.with_label_values(&["public.c"]).get(), 1);
        assert_eq!(m.fill_off.with_label_values(&["public.d"]).get(), 0);
        assert!(!r.gather().is_empty());
        let mut p = Progress {
            phase: Some(Phase::Backfilling),
            rules_version: 3,
            tasks: Vec::new(),
            fill_off: Vec::new(),
        };
        let t = TaskProgress {
            task: "key:public.t".into(),
            kind: "key".into(),
            schema: "public".into(),
            table: "t".into(),
            column: "id_uuid".into(),
            done: false,
            rows_estimate: 100,
            rows_done: 50,
            rows_updated: 50,
            batches: 5,
            last_batch_ms: Some(20.0),
            rows_per_sec: None,
            row_cost: 1.0,
        };
        p.tasks.push(t);
        m.observe(&p);
        m.observe(&p);
        assert_eq!(
            m.batch_seconds.get_sample_count(),
            1,
            "one new batch, observed once"
        );
    }
}
