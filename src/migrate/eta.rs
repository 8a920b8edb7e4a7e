//! The backfill's time left, for the live display, `status` and the metrics: the work left
//! (rows still to scan, in row-equivalents) over the rate of the recent batches.
//!
//! Why recent batches and not the average since the start: the rate changes with the
//! application's load beside the backfill (on the project's 2-core VM, 91k rows/s alone and
//! 36k beside 4 pgbench clients, docs/benchmarks.md), and the tasks of one run differ
//! (a key pass that also fills FK twins pays a parent lookup per row). A window of a minute
//! follows such changes and still smooths the batch-to-batch noise of a shared machine.
//!
//! The rows left come from each task's `rows_estimate`, which the backfill corrects as it
//! goes (`rows_done` plus what lies between the cursor and the last key, at the density the
//! batches have seen: [`remaining_along_key`]), so that a stale `reltuples` does not skew it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::progress::TaskProgress;

/// What a row of a catch-up pass costs next to an average row of the key and FK passes
/// ([`row_cost`], scaled to 1 on average by the backfill): the catch-up reads its child in one
/// hash join and writes only the rows it finds (none when the proxy did the dual-write).
/// Measured with benches/backfill.sh at 20 million rows (docs/benchmarks.md): the catch-ups
/// and the key catch-up read 20.6 M rows in 18 s while the key passes wrote 37k rows/s, 0.03
/// of a written row; at 740k rows beside pgbench, 0.05. A first guess of 0.15 made the ETA
/// 10-14 % long for the whole second half of the 20 M run.
pub const CATCHUP_COST: f64 = 0.05;

/// The cost of a row of a key or FK pass, in units of a row that is written with one index
/// entry and needs no lookup (a parent table's key pass with only its primary key); the
/// backfill then scales a run's costs to 1 on average over its rows.
///
/// Why: every row of such a pass is a non-HOT update (the loaded pages are full), which
/// writes a new heap tuple and one entry in every index of the table, and a pass that fills
/// FK twins looks each parent up in its key's index. So a row costs about one page touch
/// for the heap, one per index and one per lookup. Measured beside pgbench through keyshift
/// (benches/backfill.sh, 2 M rows, 2026-12-03): the parent with its primary key alone
/// (2 touches) went at 69k rows/s, the children with a primary key, an FK index and one
/// twin (4 touches) at 36–49k: 1.4–1.9 × the parent's time per row, where this gives 2.
/// Counting every row as 1 made the ETA taken at 10 % of the rows 25–35 % short, since the
/// cheap parents go first.
pub fn row_cost(indexes: i64, lookups: i64) -> f64 {
    (1 + indexes.max(0) + lookups.max(0)) as f64 / 2.0
}

/// The work left over every task, in row-equivalents.
pub fn work_left(tasks: &[TaskProgress]) -> f64 {
    tasks
        .iter()
        .map(|t| t.rows_remaining() as f64 * t.cost())
        .sum()
}

/// The time `work` takes at `rate` row-equivalents per second; `None` without a rate yet.
pub fn eta(work: f64, rate: f64) -> Option<Duration> {
    (rate.is_finite() && rate > 0.0).then(|| Duration::from_secs_f64(work.max(0.0) / rate))
}

/// The rows left of a task batched along a key (or ctid pages), from where it stands:
/// `(top - cursor)` keys at the density seen since this run's first key `from`
/// (`scanned` rows over `cursor - from` keys). `None` before the first batch.
pub fn remaining_along_key(from: i64, cursor: i64, top: i64, scanned: i64) -> Option<i64> {
    let covered = cursor.saturating_sub(from);
    if covered <= 0 || scanned <= 0 {
        return None;
    }
    let left = top.saturating_sub(cursor).max(0) as f64;
    Some((left * scanned as f64 / covered as f64).round() as i64)
}

/// Rows per second over the last `span`, from the cumulative count after each batch.
pub struct RateWindow {
    span: Duration,
    /// (when, cumulative rows), oldest first; the first one is kept just outside the span.
    points: VecDeque<(Instant, f64)>,
    total: f64,
}

impl RateWindow {
    pub fn new(start: Instant, span: Duration) -> RateWindow {
        RateWindow {
            span,
            points: VecDeque::from([(start, 0.0)]),
            total: 0.0,
        }
    }

    pub fn add(&mut self, at: Instant, rows: f64) {
        self.total += rows;
        self.points.push_back((at, self.total));
        // Keep one point at or before the window's start, so the rate spans the whole window.
        while self.points.len() > 2 && at.duration_since(self.points[1].0) >= self.span {
            self.points.pop_front();
        }
    }

    /// The rate up to `now` (time since the last batch counts as time without rows).
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let (t0, n0) = *self.points.front()?;
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        let rows = self.total - n0;
        (secs >= 0.5 && rows > 0.0).then(|| rows / secs)
    }
}

/// `1h02m`, `3m05s`, `42s`: the ETA as operators read it.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(kind: &str, estimate: i64, done: i64) -> TaskProgress {
        TaskProgress {
            task: format!("{kind}:t"),
            kind: kind.into(),
            schema: "public".into(),
            table: "t".into(),
            column: "c".into(),
            done: false,
            rows_estimate: estimate,
            rows_done: done,
            rows_updated: 0,
            batches: 0,
            last_batch_ms: None,
            rows_per_sec: None,
            row_cost: 2.0,
        }
    }

    #[test]
    fn catch_up_rows_cost_less_than_written_rows() {
        let tasks = [task("key", 1000, 400), task("catchup", 1000, 0)];
        assert!((work_left(&tasks) - (600.0 * 2.0 + 1000.0 * CATCHUP_COST)).abs() < 1e-9);
        assert_eq!(eta(750.0, 250.0), Some(Duration::from_secs(3)));
        assert_eq!(eta(750.0, 0.0), None);
    }

    #[test]
    fn a_row_costs_a_touch_per_index_and_lookup() {
        // A parent with its primary key only: the unit.
        assert_eq!(row_cost(1, 0), 1.0);
        // A child with its primary key, an FK index and one twin looked up: twice as much.
        assert_eq!(row_cost(2, 1), 2.0);
        // The ETA weighs the rows left by it: 100 parent rows and 100 child rows left.
        let mut parent = task("key", 100, 0);
        parent.row_cost = row_cost(1, 0);
        let child = task("key", 100, 0);
        assert_eq!(work_left(&[parent, child]), 300.0);
    }

    #[test]
    fn remaining_follows_the_density_seen() {
        // Keys 1..=1000 with every other key gone: 500 rows seen over keys 0..1000.
        assert_eq!(remaining_along_key(0, 1000, 3000, 500), Some(1000));
        assert_eq!(remaining_along_key(0, 3000, 3000, 1500), Some(0));
        assert_eq!(remaining_along_key(0, 0, 3000, 0), None);
        // From i64::MIN (no cursor yet) the span does not overflow.
        assert!(remaining_along_key(i64::MIN, 10, 20, 5).is_some());
    }

    #[test]
    fn the_rate_forgets_batches_older_than_the_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = RateWindow::new(t0, s(10));
        // 100 rows/s for 20 s, then 400 rows/s for 10 s.
        for i in 1..=20 {
            w.add(t0 + s(i), 100.0);
        }
        for i in 21..=30 {
            w.add(t0 + s(i), 400.0);
        }
        let r = w.rate(t0 + s(30)).unwrap();
        assert!((r - 400.0).abs() < 31.0, "{r}");
        assert!(w.points.len() <= 12);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
    }
}
