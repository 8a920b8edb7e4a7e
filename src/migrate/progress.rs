//! Backfill progress: read from `keyshift.backfill` (for `status`, metrics and the proxy), and
//! shown while backfilling: an indicatif bar per task on a terminal, a log line every few
//! seconds otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;
use tokio_postgres::Client;

use super::plan::Plan;
use super::state::{self, Phase, StateError};

/// One backfill task as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskProgress {
    pub task: String,
    /// `key`, `fk` or `catchup`.
    pub kind: String,
    pub schema: String,
    pub table: String,
    pub column: String,
    pub done: bool,
    pub rows_estimate: i64,
    pub rows_done: i64,
    pub rows_updated: i64,
    pub batches: i64,
    pub last_batch_ms: Option<f64>,
}

impl TaskProgress {
    /// Rows still to scan, from the estimate (0 once done).
    pub fn rows_remaining(&self) -> i64 {
        if self.done {
            0
        } else {
            (self.rows_estimate - self.rows_done).max(0)
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Progress {
    pub phase: Option<Phase>,
    pub rules_version: i64,
    pub tasks: Vec<TaskProgress>,
    /// Every child table and whether its fill triggers for this phase are missing or
    /// disabled (`fill::off`): writes that bypass the proxy there are not filled.
    pub fill_off: Vec<(String, bool)>,
}

/// The migration's phase and per-task progress; `phase` is `None` when no migration exists.
pub async fn read(client: &Client) -> Result<Progress, StateError> {
    let Some(m) = state::load_migration(client).await? else {
        return Ok(Progress {
            phase: None,
            rules_version: 0,
            tasks: Vec::new(),
            fill_off: Vec::new(),
        });
    };
    read_for(client, &m.plan, m.phase, m.rules_version).await
}

/// The progress of the migration whose plan and phase the caller has already read (the
/// proxy keeps its plan: reading it costs 35 ms at 1,000 tables).
pub async fn read_for(
    client: &Client,
    plan: &Plan,
    phase: Phase,
    rules_version: i64,
) -> Result<Progress, StateError> {
    let rows = client
        .query(
            "SELECT task, kind, schema_name, table_name, column_name, done, rows_estimate, rows_done,
                    rows_updated, batches, last_batch_ms
               FROM keyshift.backfill ORDER BY ord",
            &[],
        )
        .await?;
    let fill_off = super::fill::off(client, plan, phase).await?;
    Ok(Progress {
        fill_off,
        phase: Some(phase),
        rules_version,
        tasks: rows
            .iter()
            .map(|r| TaskProgress {
                task: r.get(0),
                kind: r.get(1),
                schema: r.get(2),
                table: r.get(3),
                column: r.get(4),
                done: r.get(5),
                rows_estimate: r.get(6),
                rows_done: r.get(7),
                rows_updated: r.get(8),
                batches: r.get(9),
                last_batch_ms: r.get(10),
            })
            .collect(),
    })
}

/// Live display of one running backfill.
pub struct Display {
    multi: Option<MultiProgress>,
    last_log: Instant,
    interval: Duration,
}

pub struct TaskBar {
    bar: Option<ProgressBar>,
    name: String,
    total: u64,
    done: u64,
    started: Instant,
}

impl Display {
    /// Bars when stderr is a terminal, log lines otherwise.
    pub fn new() -> Display {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Display {
            multi,
            last_log: Instant::now(),
            interval: Duration::from_secs(5),
        }
    }

    pub fn task(&self, name: &str, total: i64, done: i64) -> TaskBar {
        let total = total.max(done).max(0) as u64;
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:<44} [{bar:30}] {human_pos}/{human_len} rows {rate} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} rows/s", s.per_sec());
                })
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_string());
            b.set_position(done.max(0) as u64);
            b
        });
        TaskBar {
            bar,
            name: name.into(),
            total,
            done: done.max(0) as u64,
            started: Instant::now(),
        }
    }

    pub fn advance(&mut self, t: &mut TaskBar, rows: u64) {
        t.done += rows;
        if t.done > t.total {
            t.total = t.done;
            if let Some(b) = &t.bar {
                b.set_length(t.total);
            }
        }
        match &t.bar {
            Some(b) => b.set_position(t.done),
            None => {
                if self.last_log.elapsed() >= self.interval {
                    self.last_log = Instant::now();
                    let secs = t.started.elapsed().as_secs_f64().max(0.001);
                    let rate = t.done as f64 / secs;
                    let left = t.total.saturating_sub(t.done) as f64;
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", left / rate)
                    } else {
                        "?".into()
                    };
                    tracing::info!(
                        "backfill {}: {}/{} rows ({:.0}%), {:.0} rows/s, ETA {eta}",
                        t.name,
                        t.done,
                        t.total,
                        100.0 * t.done as f64 / (t.total.max(1) as f64),
                        rate
                    );
                }
            }
        }
    }

    pub fn finish(&mut self, t: &TaskBar) {
        match &t.bar {
            Some(b) => b.finish(),
            None => tracing::info!(
                "backfill {}: done, {} rows in {:.1}s",
                t.name,
                t.done,
                t.started.elapsed().as_secs_f64()
            ),
        }
    }
}

impl Default for Display {
    fn default() -> Self {
        Display::new()
    }
}
