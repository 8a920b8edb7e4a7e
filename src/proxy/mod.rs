//! The PostgreSQL wire-protocol proxy.
//!
//! Client-facing and server-facing concerns live in separate files: `startup` (TLS, StartupMessage,
//! the relayed auth exchange), `session` (the relay), `replies` (what the session still expects
//! from PostgreSQL), `upstream` (reaching PostgreSQL), `cancel` (cancel keys), `gate` (the pause
//! gate), `wire` (the messages, read through checked views and built) and `messages` (what keyshift
//! itself sends). The rewrite side: `statements` (the hook sessions call for Query and Parse, and
//! the statements they changed), `server_statements` (statements keyshift prepares for a session),
//! `pooling` (what a transaction pooler upstream allows of them, and finding one out),
//! `dualwrite` (the stored plan and phase as that hook's implementation) and `control` (the link to
//! the migrated database that puts it in force). `admin` is the HTTP listener beside it. This file
//! is the listener: it accepts, caps the number of sessions, spawns one task per connection and
//! runs the graceful shutdown.
//!
//! Everything the proxy uses sits below it (`config`, `metrics`, `map`, `migrate`, `rewrite`,
//! `ident`); none of those imports the proxy.

pub mod admin;
pub mod cancel;
pub mod control;
pub mod dualwrite;
pub mod gate;
pub mod messages;
pub mod pass;
pub mod pooling;
pub mod reading;
pub mod replies;
pub mod scope;
pub mod server_statements;
pub mod session;
pub mod shapes;
pub mod source;
pub mod startup;
pub mod statements;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use messages::sqlstate;
use startup::{Request, StartupError};
use stream::Stream;
use upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("admin endpoint: {0}")]
    Admin(std::io::Error),
    #[error("starting the link to the migrated database: {0}")]
    Control(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

/// State shared by every session of one proxy.
pub struct Shared {
    pub cfg: ProxyConfig,
    pub upstream: Upstream,
    pub acceptor: Option<TlsAcceptor>,
    pub cancels: Arc<cancel::CancelMap>,
    pub gate: gate::Gate,
    pub metrics: Metrics,
    /// The SQL rewriter in force; `None` means pure passthrough (no migration running).
    pub rewriter: arc_swap::ArcSwapOption<statements::ActiveRewriter>,
    /// Bumped after every change of `rewriter`: a session that sees a new value prepares again,
    /// once idle, the named statements whose text the new rules change
    /// (`Session::own_sequence`).
    pub rules_version: std::sync::atomic::AtomicU64,
    /// The migration's phase and default shape, for startup decisions; `None` with no
    /// migration (or before the control link first read it).
    pub migration: arc_swap::ArcSwapOption<shapes::LiveMigration>,
    /// Per login role, the migrated parents whose keys it may not read (control.rs): its
    /// sessions leave those lookups to the fill triggers.
    pub unreadable: arc_swap::ArcSwap<
        std::collections::HashMap<String, std::collections::BTreeSet<(String, String)>>,
    >,
    /// True while the link to the migrated database (`database_url`) is up.
    pub control_connected: std::sync::atomic::AtomicBool,
    /// The id mapping served on `/v1/map` (src/map).
    pub map: crate::map::MapService,
    /// Whether the upstream is a transaction pooler (configured or found out).
    pub pooling: pooling::Pooling,
    sessions: Arc<Semaphore>,
}

impl Shared {
    /// The state of a proxy that has no sessions yet.
    pub fn new(cfg: ProxyConfig, upstream: Upstream, acceptor: Option<TlsAcceptor>) -> Shared {
        let metrics = Metrics::new();
        let map = crate::map::MapService::new(
            cfg.database_url.clone(),
            cfg.search_path.clone(),
            cfg.map_cache_entries,
            metrics.map.clone(),
        );
        let pooling = pooling::Pooling::new(cfg.upstream_pooling, &metrics);
        Shared {
            sessions: Arc::new(Semaphore::new(cfg.max_client_connections)),
            pooling,
            cfg,
            upstream,
            acceptor,
            cancels: Default::default(),
            gate: Default::default(),
            metrics,
            map,
            rewriter: arc_swap::ArcSwapOption::empty(),
            migration: arc_swap::ArcSwapOption::empty(),
            unreadable: Default::default(),
            rules_version: std::sync::atomic::AtomicU64::new(0),
            control_connected: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Puts a new rewriter (or none: passthrough) in force for every session. Returns the one
    /// it replaces, for the caller to drop when it suits: freeing a rule set for 1,000 tables
    /// takes milliseconds, which a cutover's pause need not wait for.
    #[must_use = "drops the replaced rewriter here; hold it to drop it later"]
    pub fn set_rewriter(
        &self,
        rw: Option<statements::ActiveRewriter>,
    ) -> Option<Arc<statements::ActiveRewriter>> {
        let old = self.rewriter.swap(rw.map(Arc::new));
        self.rules_version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        old
    }
}

/// A bound proxy: both listeners are open, nothing runs until [`Proxy::run`].
pub struct Proxy {
    listener: TcpListener,
    admin: TcpListener,
    shared: Arc<Shared>,
    /// Other runtimes that sessions may be placed on (see [`Proxy::with_workers`]).
    workers: Vec<Worker>,
}

/// One single-threaded runtime that owns some sessions for their whole life.
struct Worker {
    handle: tokio::runtime::Handle,
    /// Sessions (and startups) currently on this runtime: each new one goes to the least loaded.
    load: Arc<AtomicUsize>,
}

/// Decrements a worker's load when its session ends, however it ends.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Proxy {
    pub async fn bind(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        install_panic_hook();
        let acceptor = tls::server_config(&cfg)?.map(TlsAcceptor::from);
        let upstream = Upstream::new(&cfg, tls::client_config(&cfg)?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let admin = TcpListener::bind(cfg.admin_listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: cfg.admin_listen,
                source,
            })?;
        let shared = Arc::new(Shared::new(cfg, upstream, acceptor));
        Ok(Proxy {
            listener,
            admin,
            shared,
            workers: Vec::new(),
        })
    }

    /// Spreads sessions over these runtimes as well as the one running [`Proxy::run`]: each
    /// accepted connection goes, for its whole life, to the runtime with the fewest sessions.
    ///
    /// Why not one multi-threaded runtime: a relay is all wake-ups, one per network event, and
    /// a work-stealing scheduler turns many of them into cross-thread hand-offs (a futex wake of
    /// an idle worker, the task's state bouncing between cores). Single-threaded runtimes, one
    /// per core, keep every session's events on one thread and let one `epoll_wait` serve
    /// several sessions; measured in docs/benchmarks.md ("Proxy passthrough").
    pub fn with_workers(mut self, handles: Vec<tokio::runtime::Handle>) -> Proxy {
        self.workers = handles
            .into_iter()
            .map(|handle| Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        self
    }

    /// The address clients connect to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.cfg.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.shared.cfg.admin_listen)
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<(), ProxyError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(ProxyError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(ProxyError::Signal)?;
        info!(listen = %self.local_addr(), admin = %self.admin_addr(), upstream = %self.shared.cfg.upstream, "keyshift proxy ready");
        self.run(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received, shutting down"),
                _ = int.recv() => info!("SIGINT received, shutting down"),
            }
        })
        .await
    }

    /// Accepts clients until `shutdown` completes; then stops accepting, waits up to
    /// `shutdown_grace` for sessions to end and closes the rest with SQLSTATE 57P01.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ProxyError> {
        let shared = self.shared.clone();
        let admin = tokio::spawn(admin::serve(self.admin, shared.clone()));
        let control = match shared.cfg.database_url.clone() {
            Some(url) => {
                let port = self.listener.local_addr().map(|a| a.port()).unwrap_or(0);
                let c = control::Control::new(shared.clone(), url, port);
                Some(control::ControlThread::spawn(c).map_err(ProxyError::Control)?)
            }
            None => None,
        };
        // The runtime running this loop takes sessions too: it is the last "worker".
        let local_load = Arc::new(AtomicUsize::new(0));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        shared.metrics.connections_accepted.inc();
                        place(&self.workers, &local_load, tcp, addr, shared.clone());
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(self.listener);
        let max = shared.cfg.max_client_connections as u32;
        let grace = shared.cfg.shutdown_grace;
        let active = max as usize - shared.sessions.available_permits();
        info!(sessions = active, grace = ?grace, "no longer accepting; waiting for sessions to end");
        let drained = tokio::time::timeout(grace, shared.sessions.acquire_many(max)).await;
        if drained.is_err() {
            let left = max as usize - shared.sessions.available_permits();
            warn!(
                sessions = left,
                "shutdown grace over; closing the remaining sessions"
            );
            shared.gate.end_all();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                shared.sessions.acquire_many(max),
            )
            .await;
        }
        admin.abort();
        if let Some(c) = control {
            c.stop().await;
        }
        info!("keyshift proxy stopped");
        Ok(())
    }
}

/// Spawns the task of a new connection on the least loaded runtime.
fn place(
    workers: &[Worker],
    local_load: &Arc<AtomicUsize>,
    tcp: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
) {
    let least = workers
        .iter()
        .min_by_key(|w| w.load.load(Ordering::Relaxed))
        .filter(|w| w.load.load(Ordering::Relaxed) < local_load.load(Ordering::Relaxed));
    let Some(w) = least else {
        local_load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(local_load.clone());
        tokio::spawn(handle(tcp, addr, shared, guard));
        return;
    };
    // A tokio socket belongs to the reactor of the runtime that created it: hand over the
    // plain socket and register it again on the chosen runtime.
    let std = match tcp.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not hand a connection to a worker");
            return;
        }
    };
    w.load.fetch_add(1, Ordering::Relaxed);
    let guard = LoadGuard(w.load.clone());
    w.handle.spawn(async move {
        match TcpStream::from_std(std) {
            Ok(tcp) => handle(tcp, addr, shared, guard).await,
            Err(e) => warn!(error = %e, "could not register a connection on a worker"),
        }
    });
}

thread_local! {
    /// The session whose task this thread is polling, for the panic hook.
    static CURRENT_SESSION: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Routes panics inside a session to the log, once, with the session's id; panics
/// elsewhere keep the default report.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            match CURRENT_SESSION.with(|c| c.get()) {
                Some(id) => tracing::error!(
                    session = id,
                    panic = %info,
                    "keyshift bug: a session panicked; ending that session only"
                ),
                None => previous(info),
            }
        }));
    });
}

/// Polls `fut` as session `id` (None before the session is known): a panic inside it ends
/// only this future, is counted, and is logged once by the panic hook. Whatever the session
/// holds is released by its guards as the panic unwinds.
///
/// The future is boxed as it comes in: an `async fn` taking it by value would keep its
/// argument's slot beside the pinned copy, doubling the size of every connection's task
/// (measured: 22.5 KiB per idle connection instead of 12.3, benches/proxy.sh).
fn contained<F>(shared: Arc<Shared>, id: Option<u64>, fut: F) -> impl Future<Output = ()>
where
    F: Future<Output = ()>,
{
    let mut fut = Box::pin(fut);
    async move {
        let outcome = std::future::poll_fn(|cx| {
            let previous = CURRENT_SESSION.with(|c| c.replace(id));
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx)));
            CURRENT_SESSION.with(|c| c.set(previous));
            match r {
                Ok(p) => p.map(Ok),
                Err(e) => std::task::Poll::Ready(Err(e)),
            }
        })
        .await;
        if outcome.is_err() {
            shared.metrics.session_panics.inc();
        }
    }
}

/// A session's place in the gate's registry and its lifetime metric, given up on drop
/// whatever the exit path (error, early return, panic): a session that is gone can never
/// keep a pause from draining.
struct Registered {
    shared: Arc<Shared>,
    info: Arc<gate::SessionInfo>,
    started: Instant,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.gate.unregister(self.info.id);
        self.shared
            .metrics
            .session_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// What a session holds for as long as it lives; released on drop, whatever the exit path.
struct Held {
    registered: Registered,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _load: LoadGuard,
    _cancel_key: Option<cancel::CancelKey>,
}

/// One client connection, from accept to the end of its startup. Once authenticated, the
/// relay runs as a task of its own on the same runtime (`serve`).
async fn handle(tcp: TcpStream, addr: SocketAddr, shared: Arc<Shared>, load: LoadGuard) {
    contained(shared.clone(), None, connection(tcp, addr, shared, load)).await;
}

async fn connection(tcp: TcpStream, addr: SocketAddr, shared: Arc<Shared>, load: LoadGuard) {
    let _ = tcp.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + shared.cfg.startup_timeout;
    let req = match startup::negotiate(tcp, shared.acceptor.as_ref(), deadline).await {
        Ok(r) => r,
        Err(e) => {
            debug!(client = %addr, error = %e, "startup failed");
            match e {
                StartupError::Timeout => shared
                    .metrics
                    .connections_rejected
                    .with_label_values(&["startup_timeout"])
                    .inc(),
                StartupError::Client(wire::startup::FrameError::Closed) => {}
                _ => shared
                    .metrics
                    .protocol_errors
                    .with_label_values(&["client"])
                    .inc(),
            }
            return;
        }
    };
    match req {
        Request::Cancel { pid, secret } => cancel(&shared, pid, secret).await,
        Request::Session { stream, packet } => session(stream, packet, addr, shared, load).await,
    }
}

async fn cancel(shared: &Shared, pid: u32, secret: u32) {
    let Some(key) = shared.cancels.lookup(pid, secret) else {
        shared
            .metrics
            .cancel_requests
            .with_label_values(&["unknown_key"])
            .inc();
        return;
    };
    match shared.upstream.cancel(key.pid, key.secret).await {
        Ok(()) => shared
            .metrics
            .cancel_requests
            .with_label_values(&["forwarded"])
            .inc(),
        Err(e) => {
            warn!(error = %e, "could not forward a cancel request");
            shared
                .metrics
                .cancel_requests
                .with_label_values(&["failed"])
                .inc();
        }
    }
}

async fn session(
    mut client: Stream,
    packet: bytes::BytesMut,
    addr: SocketAddr,
    shared: Arc<Shared>,
    load: LoadGuard,
) {
    let params = match wire::startup::startup_params(&packet) {
        Ok(p) => p,
        Err(e) => {
            shared
                .metrics
                .protocol_errors
                .with_label_values(&["client"])
                .inc();
            let _ = startup::send(
                &mut client,
                &messages::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    &format!("invalid startup packet: {e}"),
                ),
            )
            .await;
            return;
        }
    };
    let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
        shared
            .metrics
            .connections_rejected
            .with_label_values(&["too_many_connections"])
            .inc();
        let _ = startup::send(
            &mut client,
            &messages::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            ),
        )
        .await;
        return;
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let user = param("user");
    let database = match param("database") {
        d if d.is_empty() => user.clone(),
        d => d,
    };
    let application_name = param("application_name");
    // The shape, once: before connecting upstream, so a refused client costs no backend.
    let migration = shared.migration.load();
    let shape = shapes::requested(&params)
        .map_err(shapes::Refusal::from)
        .and_then(|requested| {
            shapes::decide(
                requested,
                &shared.cfg.shape_rules,
                (&user, &database, &application_name),
                migration.as_deref(),
            )
        });
    let shape = match shape {
        Ok(s) => s,
        Err(refusal) => {
            let code = match refusal {
                shapes::Refusal::Unknown(_) => sqlstate::INVALID_PARAMETER_VALUE,
                shapes::Refusal::Unavailable { .. } => sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            };
            shared
                .metrics
                .connections_rejected
                .with_label_values(&["shape"])
                .inc();
            let _ = startup::send(&mut client, &messages::fatal(code, &refusal.to_string())).await;
            return;
        }
    };
    let packet = shapes::strip(&packet, &params).unwrap_or(packet);
    let info = shared
        .gate
        .register(Some(addr), user, database, application_name, shape);
    let registered = Registered {
        shared: shared.clone(),
        info: info.clone(),
        started: Instant::now(),
    };
    let held = Held {
        registered,
        _permit: permit,
        _load: load,
        _cancel_key: None,
    };
    contained(
        shared.clone(),
        Some(info.id),
        serve(client, packet, addr, held),
    )
    .await;
}

/// A registered session: upstream connection, the relayed authentication, then the relay.
///
/// The relay is spawned as a task of its own, holding only the session and what it owns:
/// polled through the startup's futures (two `contained` layers, thread-local swaps and
/// `catch_unwind` each, and four async state machines), every wake-up of a relaying session
/// cost about 290 more instructions per transaction (callgrind, `pgbench -S -c 8`).
async fn serve(mut client: Stream, packet: bytes::BytesMut, addr: SocketAddr, mut held: Held) {
    let (shared, info) = (held.registered.shared.clone(), held.registered.info.clone());
    let shared = &shared;
    let mut server = match shared.upstream.connect().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "upstream connect failed");
            shared.metrics.upstream_connect_failures.inc();
            let _ = startup::send(
                &mut client,
                &messages::fatal(sqlstate::UNABLE_TO_CONNECT, &format!("keyshift {e}")),
            )
            .await;
            return;
        }
    };

    let auth = tokio::time::timeout(
        shared.cfg.startup_timeout,
        startup::authenticate(
            &mut client,
            &mut server,
            &packet,
            &shared.cancels,
            shared.cfg.max_message_bytes,
            shared.cfg.connect_timeout,
        ),
    )
    .await;
    match auth {
        Ok(Ok(a)) => {
            if let Some(k) = a.upstream_key {
                info.backend_pid
                    .store(k.pid, std::sync::atomic::Ordering::Relaxed);
            }
            // The cancel key lives exactly as long as the relay.
            held._cancel_key = a.client_key;
            let id = info.id;
            let session = session::Session::new(client, server, a.status, info, shared.clone());
            tokio::spawn(contained(shared.clone(), Some(id), async move {
                let _held = held;
                session.run().await;
            }));
        }
        Ok(Err(StartupError::Refused)) => {}
        Ok(Err(e)) => {
            debug!(client = %addr, error = %e, "authentication relay failed");
            let code = match e {
                StartupError::Server(_) | StartupError::NoAnswer(_) => sqlstate::CONNECTION_FAILURE,
                _ => sqlstate::PROTOCOL_VIOLATION,
            };
            let _ = startup::send(
                &mut client,
                &messages::fatal(code, &format!("keyshift: {e}")),
            )
            .await;
        }
        Err(_) => {
            shared
                .metrics
                .connections_rejected
                .with_label_values(&["startup_timeout"])
                .inc();
            let _ = startup::send(
                &mut client,
                &messages::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "keyshift: authentication did not complete within startup_timeout",
                ),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_session_releases_what_it_holds_and_is_counted() {
        install_panic_hook();
        let cfg = ProxyConfig::default();
        let upstream = Upstream::new(&cfg, None);
        let shared = Arc::new(Shared::new(cfg, upstream, None));
        let info = shared.gate.register(
            None,
            "u".into(),
            "db".into(),
            "panics".into(),
            crate::shape::Shape::Integer,
        );
        let registered = Registered {
            shared: shared.clone(),
            info: info.clone(),
            started: Instant::now(),
        };
        let key = shared
            .cancels
            .register_guarded(cancel::UpstreamKey { pid: 1, secret: 2 });
        let (pid, secret) = key.key();
        assert_eq!(shared.gate.sessions().len(), 1);
        contained(shared.clone(), Some(info.id), async move {
            let _held = (registered, key);
            tokio::task::yield_now().await;
            panic!("a bug in a session");
        })
        .await;
        // The panic ended only that future: its registration and cancel key are gone, so a
        // pause drains, and the proxy counted it.
        assert!(shared.gate.sessions().is_empty());
        assert!(shared.cancels.lookup(pid, secret).is_none());
        assert_eq!(shared.metrics.session_panics.get(), 1);
        assert!(
            shared
                .gate
                .pause(std::time::Duration::from_secs(1))
                .await
                .drained
        );
    }
}
