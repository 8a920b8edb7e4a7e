//! The proxy's own link to the migrated database (`database_url`): it LISTENs on channel
//! `keyshift`, reads the migration's plan and phase whenever they change, builds the rewriter
//! for that phase and puts it in force, registers the proxy in `keyshift.proxies` with a
//! heartbeat, and feeds the migration's progress to `/metrics`.
//!
//! The link is advisory for the relay: if it drops, sessions keep the rules they have and the
//! link reconnects with backoff. The heartbeat stops meanwhile, which is what makes a cutover
//! refuse to start while this proxy cannot be reached.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, info, warn};

use super::Shared;
use super::dualwrite::{self, Settings};
use super::gate::PauseOutcome;
use super::reading::Reading;
use super::shapes::LiveMigration;
use super::source::{Source, Stored};
use super::statements::{ActiveRewriter, StatementRewriter};
use crate::migrate::metrics::MigrateMetrics;
use crate::migrate::{progress, state};
use crate::rewrite::RuleError;

/// How often the proxy proves it is alive and re-reads the state (a backstop for a missed
/// notification).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// While the gate is held, how often the attempt is read: its commit is visible here before
/// the NOTIFY that announces it, which PostgreSQL sends only after the committing backend
/// has unlinked the dropped indexes' files (time that grows with table size).
const HOLD_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    State(#[from] state::StateError),
    #[error("{0}")]
    Source(#[from] super::source::SourceError),
    #[error("the connection to the migrated database was lost")]
    Lost,
}

/// The control link on a thread and runtime of its own: however busy the sessions keep the
/// other runtimes, a pause request is answered promptly (a cutover waits on every proxy).
pub struct ControlThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ControlThread {
    pub fn spawn(c: Control) -> std::io::Result<ControlThread> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("keyshift-control".into())
            .spawn(move || {
                rt.block_on(async move {
                    let (url, id) = (c.url.clone(), c.id.clone());
                    // Ends on stop() or when the proxy drops the sender.
                    tokio::select! {
                        _ = c.run() => {}
                        _ = rx => deregister(&url, &id).await,
                    }
                    let _ = done_tx.send(());
                });
            })?;
        Ok(ControlThread {
            stop: Some(tx),
            done: Some(done_rx),
        })
    }

    /// Ends the link (its runtime, tasks and connection go with the thread), after taking
    /// this proxy out of keyshift.proxies, so that a cutover right after a clean restart does
    /// not wait for its heartbeat to age.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), done).await;
        }
    }
}

/// Removes this proxy's row; best effort, bounded (the database may be why we stop).
async fn deregister(url: &str, id: &str) {
    let work = async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        let driver = tokio::spawn(conn);
        let r = client
            .execute(
                "DELETE FROM keyshift.proxies WHERE id = $1 AND pid = $2",
                &[&id, &(std::process::id() as i32)],
            )
            .await;
        drop(client);
        let _ = driver.await;
        r
    };
    match tokio::time::timeout(Duration::from_secs(2), work).await {
        Ok(Ok(n)) if n > 0 => info!(proxy_id = %id, "removed from keyshift.proxies"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {}
        Ok(Err(e)) => warn!(error = %e, "could not remove this proxy from keyshift.proxies"),
        Err(_) => warn!("could not remove this proxy from keyshift.proxies within 2s"),
    }
}

pub struct Control {
    shared: Arc<Shared>,
    url: String,
    database: Option<String>,
    id: String,
    settings: Settings,
    migrate_metrics: Option<MigrateMetrics>,
    /// The rules version in force here (0: passthrough).
    version: i64,
    /// The rules version the mapping catalog was read at (`Some(None)`: no migration).
    map_version: Option<Option<i64>>,
    /// The children whose fill triggers were off at the last refresh: logged when it changes.
    fill_off: Vec<String>,
    /// Refreshes since the roles' privileges were last read (`read_unreadable`).
    privileges_age: u32,
    /// The switch (cutover/rollback) this proxy's gate is closed for, if any.
    hold: Option<Hold>,
    /// The last (attempt, round) this proxy took part in, so a refresh never joins it twice.
    last_round: (i64, i32),
    /// The stored plan and the catalog reading the rules in force were built from.
    source: Source,
    /// Refreshes since the catalog was last read (`check_reading`).
    reading_age: u32,
    /// Rewriters replaced while the gate was held, dropped once it is open: freeing the rules
    /// of 1,000 tables took about a fifth of their build time (`cargo bench --bench
    /// rules_rebuild`).
    retired: Vec<Arc<ActiveRewriter>>,
    /// When the last refresh started, for the log of a gate's opening.
    refreshed_at: Option<Instant>,
    /// The migration as the last refresh read it.
    current: Option<Stored>,
    /// Rules built while the gate is held for the phase the swap will commit (`build_ahead`).
    ahead: Option<Ahead>,
}

/// Rules built ahead of a swap's commit, for exactly the migration row it will leave.
struct Ahead {
    head: state::Head,
    reading: Reading,
    rules: Option<dualwrite::Rewriters>,
}

/// A gate closed for one round of a switch attempt (see docs/cutover.md).
#[derive(Debug, Clone, Copy)]
struct Hold {
    attempt: i64,
    round: i32,
    /// The gate opens by itself at this instant, whatever the coordinator does.
    deadline: tokio::time::Instant,
    /// The phase the attempt's swap commits, when it changes the phase: what `build_ahead`
    /// builds for.
    to: Option<state::Phase>,
}

/// A notification on channel `keyshift`.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Pause(i64, i32),
    Resume(i64, i32),
    /// keyshift changed what the rules read from the catalog without a phase change (its
    /// copies of the application's views, before a swap): read it again.
    Catalog,
    /// A phase change or anything else: re-read the state.
    Changed,
}

fn parse_notice(payload: &str) -> Notice {
    let parse = |rest: &str| {
        let (a, r) = rest.split_once(':')?;
        Some((a.trim().parse().ok()?, r.trim().parse().ok()?))
    };
    if let Some(rest) = payload.strip_prefix("pause ")
        && let Some((a, r)) = parse(rest)
    {
        return Notice::Pause(a, r);
    }
    if let Some(rest) = payload.strip_prefix("resume ")
        && let Some((a, r)) = parse(rest)
    {
        return Notice::Resume(a, r);
    }
    if payload == "catalog" {
        return Notice::Catalog;
    }
    Notice::Changed
}

impl Control {
    pub fn new(shared: Arc<Shared>, url: String, listen_port: u16) -> Control {
        let database = url
            .parse::<tokio_postgres::Config>()
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_string));
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "keyshift".into());
        let id = shared
            .cfg
            .proxy_id
            .clone()
            .unwrap_or_else(|| format!("{host}:{listen_port}"));
        let settings = Settings {
            strict: shared.cfg.strict,
            search_path: shared.cfg.search_path.clone(),
            cache_entries: shared.cfg.rewrite_cache_entries,
        };
        let migrate_metrics = MigrateMetrics::new()
            .ok()
            .filter(|m| m.register(&shared.metrics.registry).is_ok());
        Control {
            shared,
            url,
            database,
            id,
            settings,
            migrate_metrics,
            version: 0,
            map_version: None,
            fill_off: Vec::new(),
            privileges_age: 0,
            hold: None,
            last_round: (0, 0),
            source: Source::default(),
            reading_age: 0,
            retired: Vec::new(),
            refreshed_at: None,
            current: None,
            ahead: None,
        }
    }

    /// Runs for the life of the proxy, reconnecting with backoff.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let result = self.connected().await;
            self.shared
                .control_connected
                .store(false, Ordering::Relaxed);
            match result {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "link to the migrated database down; sessions keep their current rules");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn connected(&mut self) -> Result<(), ControlError> {
        let (client, mut conn) = tokio_postgres::connect(&self.url, NoTls).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            // Drives the connection; ends (dropping `tx`) when it closes.
            while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let result = self.listen(&client, &mut rx).await;
        driver.abort();
        result
    }

    async fn listen(
        &mut self,
        client: &Client,
        rx: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<(), ControlError> {
        client
            .batch_execute("SET application_name = 'keyshift proxy'; LISTEN keyshift")
            .await?;
        // Unheard while the link was down: whatever changed the catalog meanwhile.
        self.source.distrust();
        self.refresh(client).await?;
        self.shared.control_connected.store(true, Ordering::Relaxed);
        info!(proxy_id = %self.id, rules_version = self.version, "linked to the migrated database");
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain: Option<JoinHandle<PauseOutcome>> = None;
        let mut watch = tokio::time::interval(HOLD_POLL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let deadline = self.hold.map(|h| h.deadline);
            let holding = self.hold.is_some();
            let step = tokio::select! {
                m = rx.recv() => match m {
                    Some(payload) => match parse_notice(&payload) {
                        Notice::Pause(a, r) => self.on_pause(client, a, r, &mut drain).await,
                        Notice::Resume(a, r) => self.on_resume(client, a, r, &mut drain).await,
                        Notice::Catalog => {
                            // Rules built ahead rest on the reading distrusted here.
                            self.ahead = None;
                            self.source.distrust();
                            self.refresh_and_join(client, &mut drain).await
                        }
                        Notice::Changed => self.refresh_and_join(client, &mut drain).await,
                    },
                    None => Err(ControlError::Lost),
                },
                _ = tick.tick() => self.refresh_and_join(client, &mut drain).await,
                out = async { drain.as_mut().expect("guarded").await }, if drain.is_some() => {
                    drain = None;
                    match out {
                        Ok(o) => self.drained(client, o).await,
                        Err(_) => Ok(()),
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.expire(client, &mut drain).await
                }
                _ = watch.tick(), if holding => self.check_hold(client, &mut drain).await,
            };
            if let Err(e) = step {
                break e;
            }
        };
        // Never leave the gate closed behind a lost link: the coordinator cannot reach us.
        self.ahead = None;
        if let Some(h) = self.hold.take() {
            if let Some(d) = drain.take() {
                d.abort();
            }
            warn!(
                attempt = h.attempt,
                "link lost while holding the gate; opening it"
            );
            self.open_gate();
        }
        Err(result)
    }

    /// Joins a switch attempt: closes the gate and starts draining (docs/cutover.md step 3).
    async fn on_pause(
        &mut self,
        client: &Client,
        attempt: i64,
        round: i32,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        if (attempt, round) <= self.last_round {
            return Ok(());
        }
        let row = client
            .query_opt(
                "SELECT state, round, drain_timeout_ms,
                        GREATEST(extract(epoch FROM hold_deadline - clock_timestamp()), 0)::float8,
                        to_phase
                 FROM keyshift.switch_attempts WHERE id = $1",
                &[&attempt],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let state: String = row.get(0);
        let current_round: i32 = row.get(1);
        let remaining: f64 = row.get(3);
        if !matches!(state.as_str(), "pausing" | "swapping")
            || current_round != round
            || remaining <= 0.0
        {
            return Ok(());
        }
        let drain_timeout = Duration::from_millis(row.get::<_, i32>(2).max(0) as u64);
        self.last_round = (attempt, round);
        self.hold = Some(Hold {
            attempt,
            round,
            deadline: tokio::time::Instant::now() + Duration::from_secs_f64(remaining),
            to: row
                .get::<_, Option<String>>(4)
                .as_deref()
                .and_then(state::Phase::parse),
        });
        info!(
            attempt,
            round,
            ?drain_timeout,
            "switch: closing the gate and draining"
        );
        if let Some(d) = drain.take() {
            d.abort();
        }
        let shared = self.shared.clone();
        *drain = Some(tokio::spawn(async move {
            shared.gate.pause(drain_timeout).await
        }));
        Ok(())
    }

    /// The drain finished: report it. A failed drain opens the gate at once (the coordinator
    /// will abort the attempt; holding clients meanwhile would only add to their wait).
    async fn drained(&mut self, client: &Client, out: PauseOutcome) -> Result<(), ControlError> {
        let Some(h) = self.hold else { return Ok(()) };
        let busy = serde_json::to_string(&out.busy).unwrap_or_else(|_| "[]".into());
        let state = if out.drained { "held" } else { "drain_failed" };
        self.shared
            .metrics
            .pauses
            .with_label_values(&[if out.drained {
                "drained"
            } else {
                "drain_failed"
            }])
            .inc();
        let mut pause_ms: Option<f64> = None;
        if !out.drained {
            warn!(
                attempt = h.attempt,
                busy = out.busy.len(),
                "switch: sessions stayed busy past the drain timeout"
            );
            self.hold = None;
            pause_ms = self.open_gate();
        }
        client
            .execute(
                "UPDATE keyshift.proxies SET pause_attempt = $2, pause_round = $3, pause_state = $4,
                        busy = $5::text::jsonb, pause_ms = COALESCE($6, pause_ms)
                 WHERE id = $1",
                &[&self.id, &h.attempt, &h.round, &state, &busy, &pause_ms],
            )
            .await?;
        if out.drained {
            self.build_ahead();
        }
        Ok(())
    }

    /// Held and reported: the coordinator swaps now. The rules for the phase its commit will
    /// bring are built meanwhile, from the reading derived across the swap, so that the gate
    /// opens without waiting for them: at 1,000 tables the derived rebuild took 21–23 ms in a
    /// proxy right after a swap's commit (benches/big_schema.sh) against a swap of 2–3 s.
    /// Used only if the migration the refresh finds after the swap is exactly the one they
    /// were built for (`rebuild`); a build still running when the swap commits delays the
    /// gate by what is left of it, no more than building afterwards would.
    fn build_ahead(&mut self) {
        self.ahead = None;
        let Some(m) = self
            .current
            .as_ref()
            .filter(|m| m.head.rules_version == self.version)
        else {
            return;
        };
        // The swap's commit: the phase the attempt names (the other shape's, or, for a
        // cutover table by table, the one where both are translated), its version bumped once.
        use state::Phase::{CutOver, CuttingOver, Hardened};
        let phase = match (m.head.phase, self.hold.and_then(|h| h.to)) {
            (Hardened, Some(to @ (CutOver | CuttingOver))) | (CutOver, Some(to @ Hardened)) => to,
            _ => return,
        };
        let next = Stored {
            head: state::Head {
                phase,
                rules_version: m.head.rules_version + 1,
                ..m.head.clone()
            },
            plan: m.plan.clone(),
        };
        let Some(reading) = self.source.after_swap(&next) else {
            return;
        };
        let started = Instant::now();
        match self.build_rules(&next, Some(&reading)) {
            Ok(rules) => {
                debug!(phase = %phase, rules_version = next.head.rules_version, build_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0), "rules built ahead for the swap");
                self.ahead = Some(Ahead {
                    head: next.head,
                    reading,
                    rules,
                });
            }
            Err(e) => debug!(error = %e, "cannot build the rules ahead of the swap"),
        }
    }

    /// Opens the gate after a switch round (step 8): the rules first, then the gate. A resume
    /// of an earlier round than the one held for (sent after its lock timeout, read late,
    /// when this proxy already joined the next round) is not this round's: its swap may still
    /// come, so the gate stays closed until this round's own resume or end.
    async fn on_resume(
        &mut self,
        client: &Client,
        attempt: i64,
        round: i32,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        self.refresh(client).await?;
        let Some(h) = self.hold else { return Ok(()) };
        if h.attempt != attempt || round < h.round {
            return Ok(());
        }
        self.release(client, "released", drain).await
    }

    async fn release(
        &mut self,
        client: &Client,
        state: &str,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        let Some(h) = self.hold.take() else {
            return Ok(());
        };
        if let Some(d) = drain.take() {
            d.abort();
        }
        let pause_ms = self.open_gate();
        self.ahead = None;
        // What this proxy added to the pause after the swap: from its last reading of the
        // state (the one that found the swap's phase) to the gate opening.
        let refresh_ms = self
            .refreshed_at
            .map(|t| format!("{:.1}", t.elapsed().as_secs_f64() * 1000.0));
        info!(
            attempt = h.attempt,
            round = h.round,
            pause_ms,
            refresh_ms,
            state,
            "switch: gate open"
        );
        self.retired.clear();
        client
            .execute(
                "UPDATE keyshift.proxies SET pause_state = $2, pause_ms = $3 WHERE id = $1",
                &[&self.id, &state, &pause_ms],
            )
            .await?;
        // The rules the gate opened under may rest on a reading derived across the swap:
        // the catalog now, with no one waiting.
        if self.source.unverified() {
            self.check_reading(client).await?;
        }
        Ok(())
    }

    /// The coordinator never came back: open the gate by ourselves.
    async fn expire(
        &mut self,
        client: &Client,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        if let Some(h) = self.hold {
            warn!(
                attempt = h.attempt,
                "switch: hold deadline passed without word from the coordinator; opening the gate"
            );
            self.shared
                .metrics
                .pauses
                .with_label_values(&["expired"])
                .inc();
        }
        // The swap may have committed without this proxy hearing of it (a notification
        // late under load): the rules first, as on every other way the gate opens, so that no
        // held statement runs under the old rules after a commit. Unreadable state still
        // opens the gate: holding clients forever is worse.
        if let Err(e) = self.refresh(client).await {
            warn!(error = %e, "switch: could not re-read the rules before opening the gate");
        }
        self.release(client, "expired", drain).await
    }

    /// While holding: opens the gate as soon as the attempt is over (committed, aborted), or
    /// when the coordinator's backend has gone (its swap transaction is then over either way,
    /// committed or rolled back). The rules are re-read first, so that no held message runs
    /// under the old ones after a commit.
    async fn check_hold(
        &mut self,
        client: &Client,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        let Some(h) = self.hold else { return Ok(()) };
        let row = client
            .query_opt(
                "SELECT state, round,
                        coordinator_pid IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = coordinator_pid)
                 FROM keyshift.switch_attempts WHERE id = $1",
                &[&h.attempt],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let (state, round, gone): (String, i32, bool) = (row.get(0), row.get(1), row.get(2));
        let result = if !matches!(state.as_str(), "pausing" | "swapping") {
            "released"
        } else if gone {
            warn!(
                attempt = h.attempt,
                "switch: the coordinator's session is gone; opening the gate"
            );
            self.shared
                .metrics
                .pauses
                .with_label_values(&["coordinator_gone"])
                .inc();
            // Its transaction is over, and a commit would have set `committed` in it: the
            // attempt is dead, say so (several proxies may race here; the WHERE makes it once).
            client
                .execute(
                    "UPDATE keyshift.switch_attempts SET state = 'aborted', finished_at = clock_timestamp(),
                       outcome = jsonb_build_object('error', 'the coordinator''s session ended')
                     WHERE id = $1 AND state IN ('pausing', 'swapping')",
                    &[&h.attempt],
                )
                .await?;
            "coordinator_gone"
        } else if round != h.round {
            // A retry after a lock timeout: its own pause notice will follow.
            "released"
        } else {
            return Ok(());
        };
        self.refresh(client).await?;
        self.release(client, result, drain).await
    }

    /// Opens the gate; returns how long it was closed, in milliseconds.
    fn open_gate(&self) -> Option<f64> {
        let d = self.shared.gate.resume()?;
        self.shared.metrics.pause_duration.observe(d.as_secs_f64());
        Some(d.as_secs_f64() * 1000.0)
    }

    /// A refresh, then the switch bookkeeping a missed notification would have done: release
    /// a hold whose attempt is over, or join an attempt in progress (a proxy started during a
    /// cutover must hold its clients too).
    ///
    /// While holding, the attempt is read *before* the refresh, as in [`Self::check_hold`]:
    /// a swap that commits between the two reads would otherwise be seen over by the second
    /// while the first read the migration from before it, and the gate would open with the
    /// old rules in force, rewriting the held statements for the shape the swap just replaced
    /// (42703 on a twin column that is gone) until the next refresh.
    async fn refresh_and_join(
        &mut self,
        client: &Client,
        drain: &mut Option<JoinHandle<PauseOutcome>>,
    ) -> Result<(), ControlError> {
        let over = match self.hold {
            Some(h) => {
                let state: Option<String> = client
                    .query_opt(
                        "SELECT state FROM keyshift.switch_attempts WHERE id = $1",
                        &[&h.attempt],
                    )
                    .await?
                    .map(|r| r.get(0));
                !matches!(state.as_deref(), Some("pausing") | Some("swapping"))
            }
            None => false,
        };
        self.refresh(client).await?;
        let exists: bool = client
            .query_one(
                "SELECT to_regclass('keyshift.switch_attempts') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        if !exists {
            return Ok(());
        }
        for r in client
            .query(
                "SELECT action, state, count(*) FROM keyshift.switch_attempts GROUP BY 1, 2",
                &[],
            )
            .await?
        {
            let (action, state, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
            self.shared
                .metrics
                .switch_attempts
                .with_label_values(&[&action, &state])
                .set(n);
        }
        if self.hold.is_some() {
            // Over as of a read that came before the refresh: its rules are the ones after
            // the swap. An attempt that ended since is left to check_hold and the resume.
            if over {
                return self.release(client, "released", drain).await;
            }
            return Ok(());
        }
        let active = client
            .query_opt(
                "SELECT id, round FROM keyshift.switch_attempts
                 WHERE state IN ('pausing', 'swapping') AND hold_deadline > clock_timestamp()
                 ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?;
        if let Some(r) = active {
            self.on_pause(client, r.get(0), r.get(1), drain).await?;
        }
        Ok(())
    }

    /// Reads the migration; rebuilds the rules when its version moved; heartbeats.
    async fn refresh(&mut self, client: &Client) -> Result<(), ControlError> {
        self.refreshed_at = Some(Instant::now());
        let mut migration = match self.source.migration(client).await {
            Ok(m) => m,
            // An unreadable plan must not take the rules away from running sessions.
            Err(state::StateError::Db(e)) => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "cannot read keyshift's state; keeping the current rules");
                return Ok(());
            }
        };
        match &migration {
            None => {
                if self.version != 0 {
                    info!("no migration in the database any more; passing every statement through");
                    drop(self.shared.set_rewriter(None));
                    self.shared.metrics.rewrite.rules_version.set(0);
                    self.version = 0;
                }
                self.source.clear();
            }
            Some(m) if m.head.rules_version != self.version => {
                migration = Some(self.rebuild(client, m.clone()).await?);
            }
            Some(_) => {}
        }
        self.current = migration.clone();
        // What startup decides a new session's shape from, once the rules for that phase are
        // in force (and not if they could not be built): a session accepted in the uuid shape
        // must find the rules that translate it.
        match &migration {
            None => self.shared.migration.store(None),
            Some(m) if m.head.rules_version == self.version => {
                self.shared.migration.store(Some(Arc::new(LiveMigration {
                    phase: m.head.phase,
                    default_shape: m.head.default_shape,
                })))
            }
            Some(_) => {}
        }
        // The mapping's columns move with the phase; with no migration an archive may remain.
        let version = migration.as_ref().map(|m| m.head.rules_version);
        if Some(version) != self.map_version {
            let cat = match &migration {
                Some(m) => Ok(Some(crate::map::catalog::live_catalog(
                    m.head.stamp.created_at.clone(),
                    &m.plan,
                    m.head.phase,
                ))),
                None => crate::map::catalog::load(client).await,
            };
            match cat {
                Ok(cat) => {
                    self.map_version = Some(version);
                    self.shared.map.set_catalog(cat);
                }
                Err(e) => warn!(error = %e, "cannot read the id mapping catalog"),
            }
        }
        let Some(m) = &migration else { return Ok(()) };
        self.privileges_age += 1;
        if self.privileges_age >= PRIVILEGES_EVERY {
            self.refresh_privileges(client, &m.plan, m.head.phase).await;
        }
        self.heartbeat(client).await?;
        // While the gate is held nothing more: the gate waits for this refresh (a release
        // follows it, which checks the reading), and the next one is at most HEARTBEAT away.
        if self.hold.is_some() {
            return Ok(());
        }
        self.retired.clear();
        self.reading_age += 1;
        if self.source.unverified() || self.reading_age >= READING_EVERY {
            self.check_reading(client).await?;
        }
        if let Some(mm) = &self.migrate_metrics
            && let Ok(p) =
                progress::read_for(client, &m.plan, m.head.phase, m.head.rules_version).await
        {
            mm.observe(&p);
            let off: Vec<String> = p
                .fill_off
                .iter()
                .filter(|(_, off)| *off)
                .map(|(t, _)| t.clone())
                .collect();
            if off != self.fill_off {
                if !off.is_empty() {
                    warn!(
                        tables = %off.join(", "),
                        "keyshift's fill triggers are missing or disabled on these tables: writes that bypass the proxy there leave a side of their foreign keys unfilled (docs/runbook.md#fill-triggers)"
                    );
                }
                self.fill_off = off;
            }
        }
        Ok(())
    }

    /// Builds the rules for `m`, whose version moved, and puts them in force; returns the
    /// migration they were built for (a full read may find a newer one).
    ///
    /// While the gate is held this is a swap's rebuild, which the client-visible pause waits
    /// for: its reading is derived from the last one (`Source::after_swap`), no catalog read
    /// (at 1,000 tables, 77–125 ms read → 0). Everywhere else sessions run on under the rules
    /// in force meanwhile, and the catalog is read.
    async fn rebuild(&mut self, client: &Client, m: Stored) -> Result<Stored, ControlError> {
        let started = Instant::now();
        // Built ahead for exactly this migration (plan, phase, version): what the lines
        // below would build, from the same derived reading.
        if self.hold.is_some()
            && let Some(ahead) = self.ahead.take_if(|a| a.head == m.head)
        {
            self.refresh_privileges(client, &m.plan, m.head.phase).await;
            let mode = self.install(&m, ahead.rules);
            info!(phase = %m.head.phase, rules_version = m.head.rules_version, mode, reading = "derived", ahead = true, build_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0), "new rules in force");
            self.source.keep(&m, Arc::new(ahead.reading), false);
            self.count_build("derived");
            return Ok(m);
        }
        let derived = match self.hold {
            Some(_) => self.source.after_swap(&m),
            None => None,
        };
        let (m, reading, how) = match derived {
            Some(r) => (m, Some(r), "derived"),
            None => match self.source.snapshot(client).await {
                Ok(Some((m, r))) => (m, r, "read"),
                // Gone since: the next refresh says so.
                Ok(None) => return Ok(m),
                Err(e) if e.is_db() => return Err(e.into()),
                Err(e) => {
                    warn!(error = %e, "cannot build rewrite rules; keeping the current ones");
                    return Ok(m);
                }
            },
        };
        let reading_ms = started.elapsed().as_secs_f64() * 1000.0;
        // Before the rules: a session that sees the new rules sees these too.
        self.refresh_privileges(client, &m.plan, m.head.phase).await;
        let build = Instant::now();
        match self.put_in_force(&m, reading.as_ref()) {
            Ok(mode) => {
                // With the catalog reads it needs, privileges aside (docs/benchmarks.md, "Big
                // schemas").
                let build_ms = reading_ms + build.elapsed().as_secs_f64() * 1000.0;
                info!(phase = %m.head.phase, rules_version = m.head.rules_version, mode, reading = how, reading_ms = format!("{reading_ms:.1}"), build_ms = format!("{build_ms:.1}"), "new rules in force");
                if let Some(r) = reading {
                    self.source.keep(&m, Arc::new(r), how == "read");
                    self.count_build(how);
                }
            }
            Err(e) => warn!(error = %e, "cannot build rewrite rules; keeping the current ones"),
        }
        Ok(m)
    }

    /// Builds the rules of `m` from `reading` and puts them in force; `None`: the phase has
    /// none (passthrough). Returns the mode, for the log.
    fn put_in_force(
        &mut self,
        m: &Stored,
        reading: Option<&Reading>,
    ) -> Result<&'static str, RuleError> {
        let rules = self.build_rules(m, reading)?;
        Ok(self.install(m, rules))
    }

    fn build_rules(
        &self,
        m: &Stored,
        reading: Option<&Reading>,
    ) -> Result<Option<dualwrite::Rewriters>, RuleError> {
        match reading {
            Some(r) => dualwrite::build(
                &m.plan,
                m.head.phase,
                r,
                m.head.rules_version as u64,
                &self.settings,
                self.shared.metrics.rewrite.clone(),
                self.shared.metrics.translation.clone(),
            ),
            None => Ok(None),
        }
    }

    /// Puts `rules`, built for `m`, in force. Returns the mode, for the log.
    fn install(&mut self, m: &Stored, rules: Option<dualwrite::Rewriters>) -> &'static str {
        let mode = if rules.is_some() {
            "dual-write"
        } else {
            "passthrough"
        };
        let metrics = &self.shared.metrics.rewrite;
        metrics.new_cache();
        metrics.rules_version.set(m.head.rules_version);
        let old = self
            .shared
            .set_rewriter(rules.map(|(r, translated)| ActiveRewriter {
                database: self.database.clone(),
                rewriter: Box::new(r),
                translated:
                    translated.map(|(shape, t)| (shape, Box::new(t) as Box<dyn StatementRewriter>)),
            }));
        self.retired.extend(old);
        self.version = m.head.rules_version;
        mode
    }

    fn count_build(&self, how: &str) {
        self.shared
            .metrics
            .rewrite
            .rules_builds
            .with_label_values(&[how])
            .inc();
    }

    /// Reads the catalog again and, when it differs from the reading the rules in force were
    /// built from, rebuilds them from the new one (same version). Runs after a swap's derived
    /// rebuild once the gate is open, after anything that may have changed the catalog behind
    /// the kept reading, and every READING_EVERY refreshes: the application's own DDL (a
    /// column added to a child) is announced to no one.
    async fn check_reading(&mut self, client: &Client) -> Result<(), ControlError> {
        self.reading_age = 0;
        let started = Instant::now();
        let (m, fresh) = match self.source.snapshot(client).await {
            Ok(Some((m, Some(r)))) => (m, r),
            // No migration, or a phase without rules: nothing rests on a reading.
            Ok(_) => return Ok(()),
            Err(e) if e.is_db() => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "cannot read the catalog again; keeping the current rules");
                return Ok(());
            }
        };
        // Moved on since: the refresh that notices builds from a full read of its own.
        if m.head.rules_version != self.version {
            return Ok(());
        }
        let read_ms = started.elapsed().as_secs_f64() * 1000.0;
        if self.source.kept(&m) == Some(&fresh) {
            debug!(
                rules_version = m.head.rules_version,
                read_ms = format!("{read_ms:.1}"),
                "catalog read again: the rules' reading holds"
            );
            self.source.verified(&m, Arc::new(fresh));
            return Ok(());
        }
        match self.put_in_force(&m, Some(&fresh)) {
            Ok(_) => {
                warn!(
                    rules_version = m.head.rules_version,
                    read_ms = format!("{read_ms:.1}"),
                    "the catalog differs from the reading the rules were built from (something other than keyshift's swap changed the migrated tables, or keyshift's copies of the application's views, since): rules rebuilt from a new reading"
                );
                self.source.verified(&m, Arc::new(fresh));
                self.count_build("corrected");
            }
            Err(e) => warn!(error = %e, "cannot build rewrite rules; keeping the current ones"),
        }
        Ok(())
    }

    /// Reads which login roles may not read which migrated parents' keys, for the sessions'
    /// scopes (`Scope::unreadable`). Keeps the last answer when the query fails (in the
    /// middle of a swap, a column it names may be gone).
    async fn refresh_privileges(
        &mut self,
        client: &Client,
        plan: &crate::migrate::plan::Plan,
        phase: crate::migrate::state::Phase,
    ) {
        self.privileges_age = 0;
        match read_unreadable(client, plan, phase).await {
            Ok(map) => self.shared.unreadable.store(Arc::new(map)),
            Err(e) => {
                warn!(error = %e, "cannot read the roles' privileges on the migrated tables; keeping the last reading")
            }
        }
    }

    /// Proves this proxy alive and reports its sessions per (shape, user, database,
    /// application_name) with their backend pids, for `status` and finalize's guard
    /// (src/migrate/shapes.rs). Runs at every refresh: every HEARTBEAT and on every
    /// notification, which is how finalize gets numbers fresher than a heartbeat period.
    async fn heartbeat(&self, client: &Client) -> Result<(), ControlError> {
        let address = self.shared.cfg.listen.to_string();
        let pid = std::process::id() as i32;
        let sessions =
            serde_json::to_string(&self.shared.gate.shape_groups()).unwrap_or_else(|_| "[]".into());
        let upsert = |with_sessions: bool| {
            let (col, val, set) = if with_sessions {
                (
                    ", sessions",
                    ", $6::text::jsonb",
                    ", sessions = EXCLUDED.sessions",
                )
            } else {
                ("", "", "")
            };
            format!(
                "INSERT INTO keyshift.proxies (id, address, pid, version, heartbeat_at, acked_rules_version{col})
                 VALUES ($1, $2, $3, $4, now(), $5{val})
                 ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, pid = EXCLUDED.pid,
                   version = EXCLUDED.version, heartbeat_at = now(),
                   acked_rules_version = EXCLUDED.acked_rules_version{set}"
            )
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &self.id,
            &address,
            &pid,
            &env!("CARGO_PKG_VERSION"),
            &self.version,
            &sessions,
        ];
        match client.execute(&upsert(true), &params).await {
            Ok(_) => Ok(()),
            // State written by a keyshift older than shapes has no `sessions` column: stay
            // alive without it (finalize then counts this proxy's sessions as unknown).
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                client.execute(&upsert(false), &params[..5]).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Refreshes between two readings of the roles' privileges (`HEARTBEAT` apart): a GRANT or
/// REVOKE is taken within about 30 s, by sessions that start after it or at the next rules
/// change.
const PRIVILEGES_EVERY: u32 = 15;

/// Refreshes between two readings of the catalog when nothing announced a change
/// (`check_reading`): the application's DDL on a migrated table reaches the rules within
/// about 30 s. A reading costs the database 15–80 ms at 1,000 tables.
const READING_EVERY: u32 = 15;

/// Per login role that is not a superuser, the migrated parents (as (schema, table)) whose
/// key columns, under the names the tables have in `phase`, it may not both SELECT: the
/// dual-write's lookup reads them, where PostgreSQL's own FK check would not need the role
/// to. Roles absent from the map may read every parent.
async fn read_unreadable(
    client: &Client,
    plan: &crate::migrate::plan::Plan,
    phase: crate::migrate::state::Phase,
) -> Result<
    std::collections::HashMap<String, std::collections::BTreeSet<(String, String)>>,
    tokio_postgres::Error,
> {
    // In phase cutting_over the tables are in both shapes: the integer names hold for those
    // not swapped yet; a query naming a column a swapped one no longer has fails, and the
    // last reading is kept.
    let after = crate::shape::Shape::physical(phase) == Some(crate::shape::Shape::Uuid);
    let (mut schemas, mut tables, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in plan.tables.iter().filter(|t| !t.referenced_by.is_empty()) {
        schemas.push(t.schema.clone());
        tables.push(t.name.clone());
        a.push(t.key.clone());
        b.push(if after {
            t.legacy_column.clone()
        } else {
            t.uuid_column.clone()
        });
    }
    let mut map: std::collections::HashMap<String, std::collections::BTreeSet<(String, String)>> =
        std::collections::HashMap::new();
    if schemas.is_empty() {
        return Ok(map);
    }
    let rows = client
        .query(
            "SELECT r.rolname::text, p.s, p.t
               FROM pg_roles r, unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS p(s, t, a, b)
              WHERE r.rolcanlogin AND NOT r.rolsuper
                AND NOT (has_column_privilege(r.oid, format('%I.%I', p.s, p.t), p.a, 'SELECT')
                     AND has_column_privilege(r.oid, format('%I.%I', p.s, p.t), p.b, 'SELECT'))",
            &[&schemas, &tables, &a, &b],
        )
        .await?;
    for r in rows {
        map.entry(r.get(0))
            .or_default()
            .insert((r.get(1), r.get(2)));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices() {
        assert_eq!(parse_notice("pause 12:3"), Notice::Pause(12, 3));
        assert_eq!(parse_notice("resume 12:1"), Notice::Resume(12, 1));
        assert_eq!(parse_notice("cut_over"), Notice::Changed);
        assert_eq!(parse_notice("catalog"), Notice::Catalog);
        assert_eq!(parse_notice("pause x:1"), Notice::Changed);
        assert_eq!(parse_notice(""), Notice::Changed);
    }
}
