//! Backfill progress: read from `keyshift.backfill` (for `status`, metrics and the proxy), and
//! shown while backfilling: an indicatif bar per task on a terminal, a log line every few
//! seconds otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;
use tokio_postgres::Client;

use super::eta::{CATCHUP_COST, RateWindow, eta, human};
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
    /// The running backfill's rate over its recent batches (all tasks), as of this task's
    /// last batch: what `status` divides the work left by ([`super::eta`]).
    pub rows_per_sec: Option<f64>,
    /// What a row of this task costs, in the backfill's row-equivalents
    /// ([`super::eta::row_cost`]), as the backfill set it when it started.
    pub row_cost: f64,
}

impl TaskProgress {
    /// What a row of this task costs, in row-equivalents: the ETA's weight.
    pub fn cost(&self) -> f64 {
        match self.kind.as_str() {
            "catchup" | "legacy" => super::eta::CATCHUP_COST,
            _ => self.row_cost,
        }
    }

    /// Whether a batch of this task has run (its rate is the latest one written).
    fn started(&self) -> bool {
        self.batches > 0 || self.done
    }

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
    let fill_off = super::fill::off(client, plan, phase).await?;
    Ok(Progress {
        fill_off,
        phase: Some(phase),
        rules_version,
        tasks: read_tasks(client).await?,
    })
}

/// Every backfill task as stored, in order.
pub async fn read_tasks(client: &Client) -> Result<Vec<TaskProgress>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT task, kind, schema_name, table_name, column_name, done, rows_estimate, rows_done,
                    rows_updated, batches, last_batch_ms, rows_per_sec, row_cost
               FROM keyshift.backfill ORDER BY ord",
            &[],
        )
        .await?;
    Ok(rows
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
            rows_per_sec: r.get(11),
            row_cost: r.get(12),
        })
        .collect())
}

impl Progress {
    /// The rate the running backfill last wrote (its recent batches, every task).
    pub fn rate(&self) -> Option<f64> {
        self.tasks
            .iter()
            .filter(|t| t.started())
            .filter_map(|t| t.rows_per_sec)
            .next_back()
    }

    /// The backfill's time left as `status` and the metrics show it: the work left over
    /// [`Progress::rate`] (`None` when all is done or no batch has run).
    pub fn eta(&self) -> Option<Duration> {
        if self.tasks.iter().all(|t| t.done) {
            return None;
        }
        super::eta::eta(super::eta::work_left(&self.tasks), self.rate()?)
    }
}

/// Live display of one running backfill: a bar per task and one for the whole run on a
/// terminal, else a log line every few seconds; both show the whole run's ETA
/// ([`super::eta`]), which the benchmark (benches/backfill.sh) checks against the real end.
pub struct Display {
    multi: Option<MultiProgress>,
    /// The whole run: percent done and ETA, above the task bars.
    overall: Option<ProgressBar>,
    last_log: Instant,
    interval: Duration,
    started: Instant,
    rate: RateWindow,
    /// Per task: (cost of a row, rows done, rows left), for the work done and left.
    work: BTreeMap<String, (f64, i64, i64)>,
}

pub struct TaskBar {
    bar: Option<ProgressBar>,
    name: String,
    total: u64,
    done: u64,
    started: Instant,
}

impl Display {
    /// Bars when stderr is a terminal, log lines otherwise; `tasks` as stored when the run
    /// starts (their estimates just refreshed).
    pub fn new(started: Instant, tasks: &[TaskProgress]) -> Display {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(1000));
            b.set_style(
                ProgressStyle::with_template("{prefix:<44} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix("all tasks");
            b
        });
        Display {
            multi,
            overall,
            last_log: started,
            interval: Duration::from_secs(5),
            started,
            rate: RateWindow::new(started, RATE_SPAN),
            work: tasks
                .iter()
                .map(|t| {
                    let e = (t.cost(), t.rows_done, t.rows_remaining());
                    (t.task.clone(), e)
                })
                .collect(),
        }
    }

    pub fn task(&self, name: &str, total: i64, done: i64) -> TaskBar {
        let total = total.max(done).max(0) as u64;
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:<44} [{bar:30}] {human_pos}/{human_len} rows {rate}",
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

    /// `rows` more scanned by `t`; `left` is its corrected count of rows still to scan,
    /// when the task knows one.
    pub fn advance(&mut self, t: &mut TaskBar, rows: u64, left: Option<i64>) {
        t.done += rows;
        let now = Instant::now();
        let w = self.work.entry(t.name.clone()).or_insert((1.0, 0, 0));
        w.1 += rows as i64;
        w.2 = left.unwrap_or(w.2 - rows as i64).max(0);
        self.rate.add(now, rows as f64 * w.0);
        if let Some(l) = left {
            t.total = t.done + l.max(0) as u64;
        }
        t.total = t.total.max(t.done);
        if let Some(b) = &t.bar {
            b.set_length(t.total);
            b.set_position(t.done);
        }
        let (pct, eta) = self.overall_now(now);
        if let Some(b) = &self.overall {
            b.set_position((pct * 10.0) as u64);
            b.set_message(format!("{pct:.1}% ETA {}", eta_text(eta)));
        } else if now.duration_since(self.last_log) >= self.interval {
            self.last_log = now;
            let secs = t.started.elapsed().as_secs_f64().max(0.001);
            // The benchmark reads "all tasks: P% done after Ns, ETA Ms": keep that form.
            tracing::info!(
                "backfill {}: {}/{} rows ({:.0}%), {:.0} rows/s; all tasks: {pct:.1}% done after {:.0}s, ETA {}",
                t.name,
                t.done,
                t.total,
                100.0 * t.done as f64 / (t.total.max(1) as f64),
                t.done as f64 / secs,
                self.started.elapsed().as_secs_f64(),
                eta_text(eta),
            );
        }
    }

    /// A catch-up's search is over: the rows it was estimated to read count as done, and
    /// `found` rows are left to fix.
    pub fn searched(&mut self, task: &str, found: usize) {
        let now = Instant::now();
        let w = self
            .work
            .entry(task.to_string())
            .or_insert((CATCHUP_COST, 0, 0));
        w.1 += w.2;
        let read = w.2 as f64 * w.0;
        w.2 = found as i64;
        self.rate.add(now, read);
    }

    /// The run's rate over its recent batches, in row-equivalents per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate.rate(Instant::now())
    }

    /// Percent of the run's work done, and the time left.
    fn overall_now(&self, now: Instant) -> (f64, Option<Duration>) {
        let (done, left) = self.work.values().fold((0.0, 0.0), |(d, l), (c, n, r)| {
            (d + c * *n as f64, l + c * *r as f64)
        });
        let pct = 100.0 * done / (done + left).max(1.0);
        let eta = self.rate.rate(now).and_then(|r| eta(left, r));
        (pct, eta)
    }

    pub fn finish(&mut self, t: &TaskBar) {
        if let Some(w) = self.work.get_mut(&t.name) {
            w.2 = 0;
        }
        match &t.bar {
            Some(b) => b.finish(),
            None => tracing::info!(
                "backfill {}: done, {} rows in {:.1}s (all tasks: {:.1}s so far)",
                t.name,
                t.done,
                t.started.elapsed().as_secs_f64(),
                self.started.elapsed().as_secs_f64(),
            ),
        }
    }
}

fn eta_text(eta: Option<Duration>) -> String {
    eta.map(|d| format!("{}s ({})", d.as_secs(), human(d)))
        .unwrap_or_else(|| "?".into())
}

/// How far back the rate looks: see [`super::eta`].
const RATE_SPAN: Duration = Duration::from_secs(60);
