//! The pause gate and the registry of live sessions it watches.
//!
//! Closed, the gate holds the next message of every idle session; sessions inside a
//! transaction run on until they are idle, then are held too. Nothing is rejected: clients see
//! latency, not errors. Opening it lets every held session go on, each in its own order.
//!
//! Correctness rests on one ordering, Dekker-style: a session publishes `Active` *before* it
//! checks the gate, and `pause` closes the gate *before* it reads the sessions' states (both
//! SeqCst). So either the session sees the gate closed and holds, or `pause` sees it active
//! and waits for it; a message can never slip past a pause that believes all is quiet.

use crate::shape::Shape;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics::GateReading;

/// What a session is doing, as the gate and `/v1/status` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum SessionState {
    /// TLS, startup and authentication; no transaction can be open yet.
    Startup = 0,
    /// Waiting for the client, outside a transaction.
    Idle = 1,
    /// A statement is running (or a pipeline is unfinished).
    Active = 2,
    /// Waiting for the client inside a transaction (ReadyForQuery `T` or `E`).
    IdleInTransaction = 3,
    /// Idle, with its next message held by the closed gate.
    Held = 4,
    /// Running a statement the closed gate let through (src/proxy/pass.rs): it names no
    /// migrated table, so the pause does not wait for it.
    Passing = 5,
}

impl SessionState {
    pub const ALL: [SessionState; 6] = [
        SessionState::Startup,
        SessionState::Idle,
        SessionState::Active,
        SessionState::IdleInTransaction,
        SessionState::Held,
        SessionState::Passing,
    ];

    fn from_u8(v: u8) -> SessionState {
        match v {
            1 => SessionState::Idle,
            2 => SessionState::Active,
            3 => SessionState::IdleInTransaction,
            4 => SessionState::Held,
            5 => SessionState::Passing,
            _ => SessionState::Startup,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Startup => "startup",
            SessionState::Idle => "idle",
            SessionState::Active => "active",
            SessionState::IdleInTransaction => "idle_in_transaction",
            SessionState::Held => "held",
            SessionState::Passing => "passing",
        }
    }

    /// Whether a pause must wait for this session.
    pub fn is_busy(self) -> bool {
        matches!(self, SessionState::Active | SessionState::IdleInTransaction)
    }
}

/// What other tasks may read about one session.
pub struct SessionInfo {
    pub id: u64,
    pub client_addr: Option<SocketAddr>,
    pub user: String,
    pub database: String,
    pub application_name: String,
    /// The shape this session sees, decided at startup (src/shape.rs).
    pub shape: Shape,
    pub started: SystemTime,
    state: AtomicU8,
    /// The upstream backend's pid, once known (0 before).
    pub backend_pid: AtomicU32,
    /// Milliseconds since UNIX epoch when the current state began (a coarse clock).
    since_ms: AtomicU64,
    /// Woken when keyshift ends every session ([`Gate::end_all`]). A session registers its
    /// waker here once, not on every poll: a `watch` receiver polled beside the relay cost
    /// ~440 instructions per transaction (callgrind, 2026-12-03), a sixth of the relay's own.
    pub(crate) kick: AtomicWaker,
}

impl SessionInfo {
    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.state.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: u64,
    pub state: SessionState,
    pub backend_pid: u32,
    pub client_addr: Option<String>,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub shape: Shape,
    /// Seconds the session has been in its current state.
    pub state_seconds: f64,
}

/// The gate plus the sessions it governs, shared by every session of one proxy.
pub struct Gate {
    closed: AtomicBool,
    /// Woken when the gate opens.
    opened: Notify,
    /// Woken when a session becomes idle or held while the gate is closed.
    quiet: Notify,
    sessions: DashMap<u64, Arc<SessionInfo>>,
    next_id: AtomicU64,
    /// Set by [`Gate::end_all`].
    ending: AtomicBool,
    closed_at: std::sync::Mutex<Option<Instant>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            closed: AtomicBool::new(false),
            opened: Notify::new(),
            quiet: Notify::new(),
            sessions: DashMap::new(),
            next_id: AtomicU64::new(1),
            ending: AtomicBool::new(false),
            closed_at: std::sync::Mutex::new(None),
        }
    }
}

/// Result of a pause: drained, or which sessions were still busy at the deadline.
#[derive(Debug, Serialize)]
pub struct PauseOutcome {
    pub drained: bool,
    pub waited_ms: u64,
    pub busy: Vec<SessionView>,
}

fn now_ms() -> u64 {
    crate::clock::coarse_wall_ms()
}

impl Gate {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn register(
        &self,
        client_addr: Option<SocketAddr>,
        user: String,
        database: String,
        application_name: String,
        shape: Shape,
    ) -> Arc<SessionInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(SessionInfo {
            id,
            client_addr,
            user,
            database,
            application_name,
            shape,
            started: SystemTime::now(),
            state: AtomicU8::new(SessionState::Startup as u8),
            backend_pid: AtomicU32::new(0),
            since_ms: AtomicU64::new(now_ms()),
            kick: AtomicWaker::new(),
        });
        self.sessions.insert(id, info.clone());
        info
    }

    /// Orders every session, running or still to start, to end (the shutdown grace is over).
    pub fn end_all(&self) {
        self.ending.store(true, Ordering::SeqCst);
        for s in self.sessions.iter() {
            s.value().kick.wake();
        }
    }

    /// True once [`Self::end_all`] was called.
    pub fn ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    pub fn unregister(&self, id: u64) {
        self.sessions.remove(&id);
        if self.is_closed() {
            self.quiet.notify_waiters();
        }
    }

    /// Publishes a session's new state. Cheap when unchanged: this is on the hot path.
    pub fn set_state(&self, s: &SessionInfo, state: SessionState) {
        let old = s.state.swap(state as u8, Ordering::SeqCst);
        if old != state as u8 {
            s.since_ms.store(now_ms(), Ordering::Relaxed);
            if !state.is_busy() && self.is_closed() {
                self.quiet.notify_waiters();
            }
        }
    }

    /// Called by an idle session about to forward a client message. Returns true when the
    /// message may go; false when the gate is closed and the session must hold it.
    pub fn admit(&self, s: &SessionInfo) -> bool {
        self.set_state(s, SessionState::Active);
        if self.is_closed() {
            self.set_state(s, SessionState::Held);
            return false;
        }
        true
    }

    /// Waits until the gate is open.
    pub async fn wait_open(&self) {
        loop {
            let notified = self.opened.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Closes the gate and waits until no session is busy, or until `timeout`. The gate stays
    /// closed either way; the caller decides whether to resume.
    pub async fn pause(&self, timeout: Duration) -> PauseOutcome {
        let start = Instant::now();
        if !self.closed.swap(true, Ordering::SeqCst)
            && let Ok(mut at) = self.closed_at.lock()
        {
            *at = Some(start);
        }
        let deadline = start + timeout;
        loop {
            let quiet = self.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            let busy = self.busy_sessions();
            if busy.is_empty() {
                return PauseOutcome {
                    drained: true,
                    waited_ms: start.elapsed().as_millis() as u64,
                    busy,
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return PauseOutcome {
                    drained: false,
                    waited_ms: start.elapsed().as_millis() as u64,
                    busy,
                };
            }
            // The notify is the fast path; the short sleep is a backstop for any transition
            // that raced with `enable`.
            let _ =
                tokio::time::timeout((deadline - now).min(Duration::from_millis(20)), quiet).await;
        }
    }

    /// Opens the gate; held sessions go on. Returns how long it was closed.
    pub fn resume(&self) -> Option<Duration> {
        let was_closed = self.closed.swap(false, Ordering::SeqCst);
        self.opened.notify_waiters();
        let at = self.closed_at.lock().ok().and_then(|mut a| a.take());
        if was_closed {
            at.map(|t| t.elapsed())
        } else {
            None
        }
    }

    pub fn closed_for(&self) -> Option<Duration> {
        if !self.is_closed() {
            return None;
        }
        self.closed_at
            .lock()
            .ok()
            .and_then(|a| a.map(|t| t.elapsed()))
    }

    pub fn busy_sessions(&self) -> Vec<SessionView> {
        self.sessions
            .iter()
            .filter(|e| e.value().state().is_busy())
            .map(|e| view(e.value()))
            .collect()
    }

    pub fn sessions(&self) -> Vec<SessionView> {
        self.sessions.iter().map(|e| view(e.value())).collect()
    }

    /// The registered sessions grouped by (shape, user, database, application_name), with
    /// their backend pids: what the heartbeat reports, `/v1/status` shows and `finalize
    /// --terminate` ends. Sessions still in `Startup` are counted: their shape is decided
    /// and they become ordinary sessions as soon as they authenticate, so leaving them out
    /// would let finalize go ahead under a V1 connection that is just arriving (their pid is
    /// 0 until known, and the group's count says they are there).
    pub fn shape_groups(&self) -> Vec<crate::migrate::shapes::SessionGroup> {
        let sessions: Vec<Arc<SessionInfo>> =
            self.sessions.iter().map(|e| e.value().clone()).collect();
        crate::migrate::shapes::group_sessions(sessions.iter().map(|s| {
            (
                s.shape,
                s.user.as_str(),
                s.database.as_str(),
                s.application_name.as_str(),
                s.backend_pid.load(Ordering::Relaxed),
            )
        }))
    }

    /// The gate and the sessions' states now, for the metrics scrape.
    pub fn reading(&self) -> GateReading {
        let counts = self.counts();
        let mut shapes: Vec<(&'static str, usize)> =
            Shape::ALL.iter().map(|sh| (sh.as_str(), 0)).collect();
        for e in self.sessions.iter() {
            let name = e.value().shape.as_str();
            if let Some(slot) = shapes.iter_mut().find(|(n, _)| *n == name) {
                slot.1 += 1;
            }
        }
        GateReading {
            shapes,
            sessions: SessionState::ALL
                .iter()
                .zip(counts)
                .map(|(st, n)| (st.as_str(), n))
                .collect(),
            held: counts[SessionState::Held as usize],
            closed: self.is_closed(),
            closed_for: self.closed_for(),
        }
    }

    /// Number of sessions in each state, in the order of [`SessionState::ALL`].
    pub fn counts(&self) -> [usize; SessionState::ALL.len()] {
        let mut c = [0usize; SessionState::ALL.len()];
        for e in self.sessions.iter() {
            if let Some(n) = c.get_mut(e.value().state() as usize) {
                *n += 1;
            }
        }
        c
    }
}

fn view(s: &SessionInfo) -> SessionView {
    SessionView {
        id: s.id,
        state: s.state(),
        backend_pid: s.backend_pid.load(Ordering::Relaxed),
        client_addr: s.client_addr.map(|a| a.to_string()),
        user: s.user.clone(),
        database: s.database.clone(),
        application_name: s.application_name.clone(),
        shape: s.shape,
        state_seconds: now_ms().saturating_sub(s.since_ms.load(Ordering::Relaxed)) as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pause_waits_for_busy_then_drains() {
        let gate = Arc::new(Gate::default());
        let s = gate.register(None, "u".into(), "d".into(), "a".into(), Shape::Integer);
        gate.set_state(&s, SessionState::IdleInTransaction);
        let out = gate.pause(Duration::from_millis(30)).await;
        assert!(!out.drained);
        assert_eq!(out.busy.len(), 1);
        let g2 = gate.clone();
        let s2 = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            g2.set_state(&s2, SessionState::Idle);
        });
        let out = gate.pause(Duration::from_secs(5)).await;
        assert!(out.drained, "{out:?}");
        // An idle session that wants to run is held while closed, admitted once open.
        assert!(!gate.admit(&s));
        assert_eq!(s.state(), SessionState::Held);
        assert!(gate.resume().is_some());
        gate.wait_open().await;
        assert!(gate.admit(&s));
    }
}
