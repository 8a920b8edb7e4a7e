//! One client session after authentication: the relay between client and PostgreSQL.
//!
//! A single task drives both directions with one hand-written poll loop (`poll_io`): it
//! writes what is pending to each side, reads from each side when the previous chunk has gone
//! out, and scans what it read. Doing both directions in one task keeps one wake-up per
//! network event and lets each direction see the other's state without locks, while never
//! blocking one direction on the other (a server busy writing results is always read, even
//! while the client's next pipeline is waiting to be written), which would deadlock.
//!
//! Bytes are forwarded as they came. The relay reads the tag and length of every message (to
//! stay in frame), tells its reply queue (src/proxy/replies.rs) what went to PostgreSQL and
//! what came back, and reads whole, through the typed views of src/proxy/wire, only the
//! messages it acts on:
//! - from the client, Query and Parse when a rewriter or keyshift's own statements are in
//!   play (src/proxy/statements.rs, server_statements.rs), Close to forget statements, Bind
//!   and Describe of the unnamed statement when keyshift's statement stands for it, Flush and
//!   Terminate;
//! - from the server, ReadyForQuery (transaction status), ErrorResponse (FATAL, strict-mode
//!   refusals, failures of keyshift's own statements), and whatever answers keyshift's own
//!   messages, which is dropped.
//!
//! A message keyshift cannot read is one PostgreSQL refuses too: it goes on unchanged and
//! PostgreSQL answers it. An unknown type byte or an impossible length makes PostgreSQL end
//! the session; keyshift forwards up to that point and stops reading the client, so the client
//! gets PostgreSQL's own last words.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::{debug, warn};

use super::Shared;
use super::gate::{SessionInfo, SessionState};
use super::messages::{self, sqlstate};
use super::pooling::{First, Guard, Replay, is_pooler_answer};
use super::replies::{Kind, Outcome, Owner, Replies, Route};
use super::scope::Scope;
use super::server_statements::{ParseAction, PendingPrepare, QueryAction, ServerStatements};
use super::statements::{self, ActiveRewriter, Decision, Dropped, Prepared, StatementRewriter};
use super::wire::backend::{self, Fields, TxStatus};
use super::wire::frontend::{self, Bind, Named, Parse, Query, Target};
use super::wire::tag::{backend as sb, frontend as cf};
use super::wire::{self, WireError, build};
use crate::metrics::SessionCounters;
use crate::shape::Shape;

/// Read buffers grow to this much free space before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Largest message PostgreSQL itself sends (1 GB) plus room: a sanity bound on server frames.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1024;
/// Messages sent and not yet answered past which the client is not read until PostgreSQL
/// catches up: a client pipelining without reading cannot grow the queue without bound.
const MAX_UNANSWERED: usize = 64 * 1024;
/// How keyshift's refusal (strict mode) says where to look.
const REFUSAL_HINT: &str = "keyshift refused this statement; see docs/limitations.md";

/// PostgreSQL's own message for a prepared statement whose result type changed: drivers
/// (pgjdbc, asyncpg, psycopg) recognise it, drop their cached statement and prepare again.
const CACHED_PLAN_CHANGED: &str = "cached plan must not change result type";

/// Why the relay stopped polling.
#[derive(Debug)]
enum Event {
    /// The session is idle and the gate is closed: its next message waits in `c_in`.
    Hold,
    ClientEof,
    ServerEof,
    /// A message keyshift must read whole is larger than `max_message_bytes`.
    TooLarge(usize),
    /// A message keyshift must read whole whose type byte went during a COPY (`tag_ahead`).
    BegunInCopy(u8),
    ServerProtocol(ServerError),
    ClientIo(io::Error),
    ServerIo(io::Error),
}

/// What became of a message whose type byte went ahead (`Session::finish_tag_ahead`).
enum Ahead {
    /// PostgreSQL's verdict, or the rest of the message, is still to come.
    Wait,
    /// The gate is closed: held as any session's first message after ReadyForQuery.
    Hold,
    /// A message keyshift must read whole and cannot complete (it would need another
    /// message before it, or is over `max_message_bytes`): the session ends with an error.
    Refuse,
    /// Completed, or streaming on: scanning goes on.
    Done,
}

/// Why the server's bytes could not be followed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("message length {0} is shorter than its own header")]
    TooShort(u32),
    #[error("message of {0} bytes is larger than PostgreSQL sends")]
    TooLarge(usize),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// A statement's text as the client sent it and as keyshift sent it: an error position in
/// the second is mapped back into the first.
#[derive(Debug)]
struct Texts {
    original: Arc<str>,
    sent: Arc<str>,
    /// `sent` is `original` with text inserted (a rewrite), not an `EXECUTE` in its place.
    insert_only: bool,
}

impl Texts {
    fn new(original: &str, sent: &Arc<str>) -> Box<Texts> {
        Box::new(Texts {
            original: original.into(),
            sent: Arc::clone(sent),
            insert_only: true,
        })
    }
}

/// What keyshift attaches to a message sent to PostgreSQL to learn how it ended.
#[derive(Debug)]
enum Token {
    /// A rewritten statement.
    Rewritten(Box<Texts>),
    /// keyshift's Parse of its own statement for the client's unnamed Parse.
    Statement(Arc<[u8]>, Box<Texts>),
    /// keyshift's `PREPARE` of a simple-Query shape.
    QueryPrepare(PendingPrepare),
    /// A statement refused in strict mode: PostgreSQL's syntax error for the marker becomes
    /// keyshift's 0A000 with this message.
    Refusal(Arc<str>),
    /// A named Parse keyshift started remembering: forgotten if PostgreSQL does not take it.
    Named(Box<[u8]>, Option<Box<Texts>>),
    /// keyshift's Parse of a client's statement again, under new rules.
    Reprepare(Box<[u8]>),
    /// The client's Describe of its statement `name`: what PostgreSQL answers is what the
    /// client now believes about it (`statements::Told`).
    Describe(Box<[u8]>),
    /// keyshift's Describe of a statement it prepared again: checked against what the client
    /// was told.
    Verify(Box<[u8]>),
    /// The client bound a statement whose re-preparation changed what it was told: the
    /// error PostgreSQL gives a driver for a cached plan whose result changed, so that the
    /// driver prepares again, as it would directly.
    Stale,
    /// A message that replaces or drops the client's unnamed statement while PostgreSQL may
    /// skip it, or keyshift's Parse restoring that statement: see [`Restoring`].
    Restore(Box<Restoring>),
}

/// What the client's unnamed statement still is if PostgreSQL skips the message carrying this
/// (an unnamed Parse, a simple Query or a Close of it, sent behind a message that may fail):
/// keyshift ended its alias, or the restore it had armed, when the message went, so a skipped
/// message arms the restore again. Several such messages can be in flight (fuzz seed 9801,
/// case 230: three unnamed Parses after a failed Bind); each carries the statement from
/// before the first of them, which is still the client's only if none of them ran.
#[derive(Debug)]
struct Restoring {
    /// The statement to prepare again, and the client's own SQL of it (`unnamed_sql`).
    before: Before,
    /// `unnamed_gen` once this message went: a later replacement decides instead.
    generation: u64,
    /// `generation` of the first message of the chain this one continues: if PostgreSQL ran
    /// any message of the chain, `before` is no longer the client's statement.
    origin: u64,
    /// keyshift's own restoring Parse: refused in a failed transaction (25P02), it leaves the
    /// client's statement as it was, where the client's own Parse would have dropped it.
    own: bool,
    /// The token the message carries besides.
    inner: Option<Token>,
}

/// The client's unnamed statement as keyshift would prepare it again.
#[derive(Debug, Clone)]
struct Before {
    restore: super::server_statements::Restore,
    client_sql: Option<(Arc<str>, Box<[u8]>)>,
}

/// The relay, generic over its two byte streams so that tests drive it in memory.
pub struct Session<C, S> {
    client: C,
    server: S,
    /// The waker last registered with the gate's kick (see [`Self::ending`]).
    kick_waker: Option<std::task::Waker>,
    /// The rewriter last read, and the rules version it was read at
    /// ([`Self::current_rewriter`]).
    rewriter_cache: Option<std::sync::Weak<ActiveRewriter>>,
    rewriter_version: Option<u64>,
    c_in: BytesMut,
    c_out: BytesMut,
    s_in: BytesMut,
    s_out: BytesMut,
    /// Bytes of the client message being streamed through that are still to come.
    c_left: usize,
    /// The same for the server message being streamed through.
    s_left: usize,
    client_dirty: bool,
    server_dirty: bool,
    /// The last ReadyForQuery's transaction status.
    status: TxStatus,
    /// What PostgreSQL still owes for what was sent to it.
    replies: Replies<Token>,
    held: bool,
    /// Nothing more is read from the client: it sent Terminate, or bytes after which
    /// PostgreSQL ends the session. The relay goes on until PostgreSQL closes.
    client_done: bool,
    /// The client closed its side: no more bytes come from it. What it sent is still
    /// PostgreSQL's to answer, as on a direct connection ([`Self::half_close`]).
    client_eof: bool,
    /// keyshift closed its side toward PostgreSQL after the client closed its own.
    server_shut: bool,
    /// The type byte of the message at the front of `c_in` went to PostgreSQL already
    /// (during a COPY, see `scan_client`).
    tag_ahead: bool,
    /// PostgreSQL answered 08P01 after that type byte went: it refused it.
    ahead_refused: bool,
    /// PostgreSQL sent a FATAL: the end of the connection that follows is its own doing.
    server_fatal: bool,
    /// SQLSTATE of the last error that answered one of keyshift's own messages.
    own_error: Option<Box<[u8]>>,
    /// Named statements to prepare again when the rules change.
    prepared: Prepared,
    /// Statements keyshift prepared itself for the client's rewritten statements.
    stmts: ServerStatements,
    /// The rules version this session's statements were rewritten under.
    rules_seen: u64,
    /// Moves whenever the client's unnamed statement is replaced or dropped (Query, unnamed
    /// Parse, Close of it): a skipped Parse restores only if nothing replaced it since.
    unnamed_gen: u64,
    /// The client's own SQL and parameter types of its unnamed statement, while rules are in
    /// force: when they change, a Bind that reuses the statement without a new Parse must run
    /// it under the new rules, not the text prepared under the old ones (the swap's
    /// `column "…_uuid" does not exist`).
    unnamed_sql: Option<(Arc<str>, Box<[u8]>)>,
    /// The statement a chain of replacements still in flight would leave the client's unnamed
    /// one if PostgreSQL skipped them all, and the chain's first generation ([`Restoring`]).
    unnamed_chain: Option<(Before, u64)>,
    /// The last generation whose replacement PostgreSQL ran.
    unnamed_taken: u64,
    /// Named statements whose re-preparation would have changed what the client was told:
    /// their next Bind gets PostgreSQL's 0A000 instead of running.
    stale: std::collections::HashSet<Box<[u8]>>,
    /// The session's own name resolution (search path, temporary tables), and the rewriter
    /// built for it with the rule set it was built from.
    scope: Scope,
    scoped: Option<(Arc<ActiveRewriter>, Arc<dyn StatementRewriter>)>,
    /// Messages sent with a [`Restoring`] or `Verify` token, those PostgreSQL finished, and
    /// how many had been sent when the last Sync went: a Bind or Describe in a later
    /// sequence waits (`restore_hold`) until PostgreSQL says how those before the Sync ended,
    /// since that decides which statement the client's unnamed one is. Only those: PostgreSQL
    /// answers a message after the Sync only at the next Sync or Flush, which may be behind
    /// the held Bind (fuzz seed 9801, case 230, hung on a Parse pipelined after a COPY).
    restore_sent: u64,
    restore_answered: u64,
    restore_wait: u64,
    restore_hold: bool,
    /// The upstream is (or turned out to be) a transaction pooler: nothing of keyshift's is
    /// kept on the server past a transaction (src/proxy/pooling.rs).
    pooled: bool,
    /// A sequence using keyshift's statement where a pooler's answer can be undone, and the
    /// one the client message being looked at starts.
    guard: Option<Guard<Token>>,
    pending_guard: Option<Guard<Token>>,
    /// The message being looked at is a Parse whose next message, already here, is a Bind or
    /// Describe of the unnamed statement.
    next_unnamed_use: bool,
    /// The client message being looked at went with keyshift's statement in place of the
    /// unnamed one: a guard keeps it as the client sent it.
    record_original: bool,
    /// Client bytes held by a guard are to be scanned again, now that it ended.
    rescan: bool,
    /// A copy of the client message being looked at, and its replacement.
    scratch: Vec<u8>,
    replacement: BytesMut,
    counters: SessionCounters,
    info: Arc<SessionInfo>,
    shared: Arc<Shared>,
}

/// What the session may do with the SQL of the client's messages now.
#[derive(Clone, Copy)]
struct Rules<'a> {
    /// The rewriter in force for this session's database.
    rewriter: Option<&'a dyn StatementRewriter>,
    /// Linked to a migration that has no rules yet: named statements are remembered, so that
    /// they are prepared again, rewritten, once rules arrive.
    tracking: bool,
}

impl Token {
    fn texts(&self) -> Option<&Texts> {
        match self {
            Token::Rewritten(t) | Token::Statement(_, t) | Token::Named(_, Some(t)) => Some(t),
            Token::Restore(r) => r.inner.as_ref().and_then(Token::texts),
            _ => None,
        }
    }

    /// The token itself, or the one a [`Restoring`] carries besides.
    fn inner(&self) -> &Token {
        match self {
            Token::Restore(r) => r.inner.as_ref().map_or(self, Token::inner),
            t => t,
        }
    }
}

impl<C, S> Drop for Session<C, S> {
    fn drop(&mut self) {
        self.counters.flush(&self.shared.metrics);
    }
}

/// The migrated parents whose keys `user` may not read, as the control link last found them.
fn unreadable_for(shared: &Shared, user: &str) -> std::collections::BTreeSet<(String, String)> {
    shared
        .unreadable
        .load()
        .get(user)
        .cloned()
        .unwrap_or_default()
}

impl<C, S> Session<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(
        client: C,
        server: S,
        status: u8,
        info: Arc<SessionInfo>,
        shared: Arc<Shared>,
    ) -> Session<C, S> {
        Session {
            client,
            server,
            kick_waker: None,
            rewriter_cache: None,
            rewriter_version: None,
            c_in: BytesMut::with_capacity(READ_CHUNK),
            c_out: BytesMut::new(),
            s_in: BytesMut::with_capacity(READ_CHUNK),
            s_out: BytesMut::new(),
            c_left: 0,
            s_left: 0,
            client_dirty: false,
            server_dirty: false,
            status: TxStatus::from_byte(status).unwrap_or(TxStatus::Idle),
            replies: Replies::default(),
            held: false,
            client_done: false,
            client_eof: false,
            server_shut: false,
            tag_ahead: false,
            ahead_refused: false,
            server_fatal: false,
            own_error: None,
            prepared: Prepared::default(),
            stmts: ServerStatements::new(if shared.pooling.pooled() {
                0
            } else {
                shared.cfg.server_statements
            }),
            pooled: shared.pooling.pooled(),
            guard: None,
            pending_guard: None,
            next_unnamed_use: false,
            record_original: false,
            rescan: false,
            rules_seen: shared.rules_version.load(Ordering::Acquire),
            unnamed_gen: 0,
            unnamed_sql: None,
            unnamed_chain: None,
            unnamed_taken: 0,
            stale: Default::default(),
            scope: Scope {
                unreadable: unreadable_for(&shared, &info.user),
                ..Scope::default()
            },
            scoped: None,
            restore_sent: 0,
            restore_answered: 0,
            restore_wait: 0,
            restore_hold: false,
            scratch: Vec::new(),
            replacement: BytesMut::new(),
            counters: SessionCounters::default(),
            info,
            shared,
        }
    }

    /// Relays until either side ends the session. Dropping both streams on return closes the
    /// upstream connection, so no backend outlives its client.
    pub async fn run(mut self) {
        let shared = self.shared.clone();
        shared.gate.set_state(&self.info, self.state_after_ready());
        const ENDING: &str =
            "terminating connection due to administrator command: keyshift is shutting down";
        loop {
            let ev = poll_fn(|cx| {
                if self.ending(cx) {
                    return Poll::Ready(None);
                }
                self.poll_io(cx).map(Some)
            })
            .await;
            let Some(ev) = ev else {
                self.fatal_to_client(sqlstate::ADMIN_SHUTDOWN, ENDING).await;
                break;
            };
            match ev {
                Event::Hold => {
                    let open = shared.gate.wait_open();
                    tokio::pin!(open);
                    let ending = poll_fn(|cx| {
                        if self.ending(cx) {
                            return Poll::Ready(true);
                        }
                        open.as_mut().poll(cx).map(|()| false)
                    })
                    .await;
                    if ending {
                        self.fatal_to_client(sqlstate::ADMIN_SHUTDOWN, ENDING).await;
                        break;
                    }
                    self.held = false;
                }
                Event::ClientEof => break,
                Event::ServerEof => {
                    // PostgreSQL usually says why before it closes (FATAL ErrorResponse):
                    // make sure the client gets it.
                    self.flush_to_client().await;
                    break;
                }
                Event::TooLarge(len) => {
                    debug!(
                        session = self.info.id,
                        len, "client message over max_message_bytes"
                    );
                    shared
                        .metrics
                        .protocol_errors
                        .with_label_values(&["client"])
                        .inc();
                    let max = shared.cfg.max_message_bytes;
                    self.fatal_to_client(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!(
                            "keyshift: message of {len} bytes is larger than max_message_bytes ({max})"
                        ),
                    )
                    .await;
                    break;
                }
                Event::BegunInCopy(tag) => {
                    self.client_protocol_error();
                    self.fatal_to_client(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!(
                            "keyshift: a message of type '{}' came in the middle of COPY FROM STDIN; end the COPY with CopyDone or CopyFail first",
                            char::from(tag).escape_default()
                        ),
                    )
                    .await;
                    break;
                }
                Event::ServerProtocol(e) => {
                    debug!(session = self.info.id, error = %e, "server protocol violation");
                    shared
                        .metrics
                        .protocol_errors
                        .with_label_values(&["server"])
                        .inc();
                    self.fatal_to_client(
                        sqlstate::CONNECTION_FAILURE,
                        &format!("invalid message from PostgreSQL: {e}"),
                    )
                    .await;
                    break;
                }
                Event::ClientIo(e) => {
                    debug!(session = self.info.id, error = %e, "client connection lost");
                    break;
                }
                Event::ServerIo(e) => {
                    debug!(session = self.info.id, error = %e, "server connection lost");
                    if self.server_fatal {
                        // PostgreSQL already said why; a reset after its FATAL adds nothing.
                        self.flush_to_client().await;
                    } else {
                        self.fatal_to_client(
                            sqlstate::CONNECTION_FAILURE,
                            "connection to PostgreSQL lost",
                        )
                        .await;
                    }
                    break;
                }
            }
        }
        if self.replies.surprises > 0 {
            debug!(
                session = self.info.id,
                surprises = self.replies.surprises,
                "server messages the reply queue did not expect"
            );
        }
    }

    /// True once the proxy ends every session ([`super::gate::Gate::end_all`]). The task's waker is
    /// registered with the gate once and again only if it changes, so the usual cost is one
    /// atomic load.
    fn ending(&mut self, cx: &mut Context<'_>) -> bool {
        if !self
            .kick_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.info.kick.register(cx.waker());
            self.kick_waker = Some(cx.waker().clone());
        }
        self.shared.gate.ending()
    }

    /// The rewriter in force, read from the shared `ArcSwap` only when its version moved.
    /// `set_rewriter` bumps the version (Release) after the swap, and the gate opens after
    /// both, so a session admitted through the gate sees the new version and reloads: the
    /// cache changes nothing about which rules a statement meets. Loading through `arc-swap`
    /// each time cost ~100 instructions, twice per transaction. The cache holds a `Weak`, so
    /// an idle session keeps no replaced rule set alive.
    fn current_rewriter(&mut self) -> Option<Arc<ActiveRewriter>> {
        let version = self.shared.rules_version.load(Ordering::Acquire);
        if self.rewriter_version == Some(version) {
            match &self.rewriter_cache {
                None => return None,
                Some(weak) => {
                    if let Some(rw) = weak.upgrade() {
                        return Some(rw);
                    }
                }
            }
        }
        let rw = self.shared.rewriter.load_full();
        self.rewriter_cache = rw.as_ref().map(Arc::downgrade);
        self.rewriter_version = Some(version);
        rw
    }

    fn state_after_ready(&self) -> SessionState {
        if self.status == TxStatus::Idle {
            SessionState::Idle
        } else {
            SessionState::IdleInTransaction
        }
    }

    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        // A read that returned Pending in this call has registered the task's waker: the
        // socket's readiness only changes when the runtime's driver turns, between polls, so
        // asking again before returning is wasted work. Not asking again halved the reads per
        // transaction (12 to 6 through `pgbench -S -c 8`, ~140 instructions each).
        let mut server_waits = false;
        // After the client's EOF there is nothing more to read from it.
        let mut client_waits = self.client_eof;
        loop {
            let mut progress = false;

            // Client → server: write what is pending.
            if !self.c_out.is_empty() {
                match Pin::new(&mut self.server).poll_write(cx, &self.c_out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Event::ServerIo(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.c_out.advance(n);
                        self.server_dirty = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerIo(e)),
                    Poll::Pending => {}
                }
            }
            if self.c_out.is_empty() && self.server_dirty {
                match Pin::new(&mut self.server).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.server_dirty = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerIo(e)),
                    Poll::Pending => {}
                }
            }

            // Server → client: write what is pending.
            if !self.s_out.is_empty() {
                match Pin::new(&mut self.client).poll_write(cx, &self.s_out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Event::ClientIo(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.s_out.advance(n);
                        self.client_dirty = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientIo(e)),
                    Poll::Pending => {}
                }
            }
            if self.s_out.is_empty() && self.client_dirty {
                match Pin::new(&mut self.client).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.client_dirty = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientIo(e)),
                    Poll::Pending => {}
                }
            }

            // Server → client: read once the previous chunk is out (backpressure).
            if self.s_out.is_empty() && !server_waits {
                match poll_read(&mut self.server, cx, &mut self.s_in) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerEof),
                    Poll::Ready(Ok(_)) => {
                        if let Err(e) = self.scan_server() {
                            return Poll::Ready(Event::ServerProtocol(e));
                        }
                        if !self.c_in.is_empty()
                            && (self.tag_ahead || self.replies.reads_copy_data())
                        {
                            // A COPY started while the start of a message waited for its
                            // rest (PostgreSQL may refuse it from its type alone), or
                            // PostgreSQL answered after a type byte went ahead.
                            self.rescan = true;
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerIo(e)),
                    Poll::Pending => server_waits = true,
                }
            }

            // Client → server: bytes held at the gate are scanned first, then more are read.
            if self.c_out.is_empty()
                && !self.held
                && !self.client_done
                && self.replies.len() < MAX_UNANSWERED
            {
                let unheld = self.restore_hold && !self.restore_unknown();
                let rescan = std::mem::take(&mut self.rescan);
                if !self.c_in.is_empty()
                    && self.c_left == 0
                    && (self.replies.idle() || unheld || rescan)
                {
                    self.restore_hold = false;
                    // Data left from before a hold, or a partial message: scan it again.
                    if let Some(ev) = self.scan_client() {
                        return Poll::Ready(ev);
                    }
                    if !self.c_out.is_empty() {
                        continue;
                    }
                }
                if !client_waits {
                    match poll_read(&mut self.client, cx, &mut self.c_in) {
                        Poll::Ready(Ok(0)) => {
                            self.client_eof = true;
                            client_waits = true;
                            progress = true;
                        }
                        Poll::Ready(Ok(_)) => {
                            if let Some(ev) = self.scan_client() {
                                return Poll::Ready(ev);
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientIo(e)),
                        Poll::Pending => client_waits = true,
                    }
                }
            }

            if !progress {
                // Checked only when nothing else moves: once per wait, not per turn.
                if self.client_eof && !self.server_shut && !self.held && !self.client_done {
                    match self.half_close(cx) {
                        Poll::Ready(Some(ev)) => return Poll::Ready(ev),
                        Poll::Ready(None) => continue,
                        Poll::Pending => {}
                    }
                }
                return Poll::Pending;
            }
        }
    }

    /// The message at the front of `c_in` had its type byte sent ahead during a COPY
    /// (`scan_client`). PostgreSQL's verdict decides what follows: while its COPY has not
    /// ended, or once it refused the type (08P01, then a FATAL and the end of the session),
    /// the rest waits. If the COPY had failed on earlier data before PostgreSQL read the byte,
    /// it now reads this message as any other. keyshift cannot rewrite a message already
    /// begun, so it completes it with a harmless one of the same type, its own (an empty
    /// Query; a Close of a statement that does not exist; a Parse of an empty statement,
    /// closed right after), and the client's message then goes as usual. A message of
    /// another type streams on as it came, unless keyshift must read it (a Bind or Describe
    /// of a statement it stands in for or tracks): that one is read whole (`use_ahead`).
    /// While PostgreSQL skips to Sync, every message streams on as it came: PostgreSQL
    /// discards it.
    #[cold]
    #[inline(never)]
    fn finish_tag_ahead(&mut self, tag: u8) -> Ahead {
        if self.replies.reads_copy_data() || self.ahead_refused {
            return Ahead::Wait;
        }
        if self.replies.idle() {
            // The first message after a ReadyForQuery: admitted as in `scan_client`.
            if self.status == TxStatus::Idle {
                if !self.shared.gate.admit(&self.info) {
                    return Ahead::Hold;
                }
            } else {
                self.shared.gate.set_state(&self.info, SessionState::Active);
            }
        }
        // A statement name of keyshift's own that nothing else uses.
        let filler = || format!("{}ahead", self.stmts.prefix()).into_bytes();
        let mut out = BytesMut::new();
        // While PostgreSQL skips to Sync after the COPY's error it discards the message
        // whatever it is, so the rest streams on as it came. (The queue may believe it
        // skips when it does not: a Sync sent during the COPY after the row that failed
        // ends the skip, fuzz seed 9700, case 121. Then the client's message runs as it
        // came, as on a direct connection, without keyshift's rewrite.)
        let skipping = self.replies.skipping();
        match tag {
            _ if skipping => return self.stream_ahead(tag),
            cf::QUERY => {
                build::query(&mut out, b"");
                self.replies.sent(Kind::Query, Owner::Own, None);
            }
            cf::CLOSE => {
                build::close_statement(&mut out, &filler());
                self.replies.sent(Kind::Close, Owner::Own, None);
            }
            cf::PARSE => {
                let name = filler();
                build::parse(&mut out, &name, b"", b"");
                build::close_statement(&mut out, &name);
                self.replies.sent(Kind::Parse, Owner::Own, None);
                self.replies.sent(Kind::Close, Owner::Own, None);
            }
            cf::BIND | cf::DESCRIBE if self.reads_use(tag) => return self.use_ahead(tag),
            _ => return self.stream_ahead(tag),
        }
        self.tag_ahead = false;
        // The filler's type byte is the one that went.
        self.c_out
            .extend_from_slice(out.get(1..).unwrap_or_default());
        Ahead::Done
    }

    /// A Bind or Describe keyshift must read whole, whose type byte went ahead and which
    /// PostgreSQL reads as any other (its COPY had failed before). Read whole, it is handled
    /// as usual; what keyshift sends for it must then begin with that same type byte, so a
    /// rename of the statement it uses goes (the whole message but its first byte), and so
    /// does the message as it came. Only what would need another message before it (a Parse
    /// restoring the client's unnamed statement, the refusal of a stale statement) is
    /// refused: the session ends (fuzz seed 10704, case 197 met the refusal with a plain
    /// rename before this).
    #[cold]
    #[inline(never)]
    fn use_ahead(&mut self, tag: u8) -> Ahead {
        let Some((_, len_word)) = wire::header(&self.c_in) else {
            return Ahead::Wait;
        };
        let len = 1 + len_word as usize;
        if len_word < 4 || len_word as usize > frontend::max_len(tag) {
            return self.stream_ahead(tag);
        }
        if len > self.shared.cfg.max_message_bytes {
            return Ahead::Refuse;
        }
        if self.restore_unknown() {
            // As in `scan_client`: PostgreSQL answers what came before the Sync it has.
            self.restore_hold = true;
            return Ahead::Wait;
        }
        let Some(msg) = self.c_in.get(..len) else {
            return Ahead::Wait;
        };
        let msg = msg.to_vec();
        self.counters.client_message(tag);
        let mut out = BytesMut::new();
        let rules = Rules {
            rewriter: None,
            tracking: false,
        };
        let replaced = self.client_message(tag, &msg, rules, &mut out);
        let sent: &[u8] = if !replaced {
            &msg
        } else {
            let mut parts = wire::messages(&out);
            match (parts.next(), parts.next()) {
                (Some((t, m)), None) if t == tag && m.len() == out.len() => &out,
                _ => return Ahead::Refuse,
            }
        };
        self.tag_ahead = false;
        // The type byte was counted when it went.
        self.counters.client_bytes(len - 1);
        self.c_out
            .extend_from_slice(sent.get(1..).unwrap_or_default());
        self.c_in.advance(len);
        self.record_original = false;
        self.guard_sees(tag);
        self.settle_outcomes();
        Ahead::Done
    }

    /// The rest of the message whose type byte went ahead streams on as it came.
    #[cold]
    #[inline(never)]
    fn stream_ahead(&mut self, tag: u8) -> Ahead {
        let Some((_, len_word)) = wire::header(&self.c_in) else {
            return Ahead::Wait;
        };
        self.tag_ahead = false;
        self.c_in.advance(1);
        self.counters.client_message(tag);
        if len_word < 4 || len_word as usize > frontend::max_len(tag) {
            // PostgreSQL ends the session on the length word.
            self.commit_client(4);
            self.client_done = true;
            self.client_protocol_error();
            return Ahead::Done;
        }
        if tag == cf::TERMINATE {
            self.client_done = true;
        }
        self.note_sent(tag);
        self.guard_sees(tag);
        self.c_left = len_word as usize;
        Ahead::Done
    }

    /// The client closed its side. On a direct connection PostgreSQL would still answer
    /// what it had read and then meet the end of the input: silently when idle, with an
    /// error in a COPY ("unexpected EOF on client connection with an open transaction").
    /// So keyshift sends what complete messages are left as usual, then the rest as it came,
    /// closes its own side toward PostgreSQL and relays until PostgreSQL closes. A session
    /// with nothing unanswered ends at once, as before: PostgreSQL would say nothing.
    /// `Ready(None)`: progress was made.
    #[cold]
    #[inline(never)]
    fn half_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if !self.c_out.is_empty() {
            return Poll::Pending;
        }
        // Something scan_client can act on: a whole message, or a type byte it refuses.
        let whole = self.c_left == 0
            && match (self.c_in.first(), wire::header(&self.c_in)) {
                (_, Some((tag, len))) => {
                    !frontend::is_known_tag(tag) || self.c_in.len() > len as usize
                }
                (Some(&tag), None) => !frontend::is_known_tag(tag),
                (None, None) => false,
            };
        if whole {
            if self.replies.len() >= MAX_UNANSWERED {
                return Poll::Pending;
            }
            // A message still to scan (held by the gate before, or behind keyshift's own
            // statements): scan it as a read would have.
            let before = self.c_in.len();
            if let Some(ev) = self.scan_client() {
                return Poll::Ready(Some(ev));
            }
            return if self.c_in.len() != before || !self.c_out.is_empty() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        if self.c_left == 0 && self.replies.idle() {
            return Poll::Ready(Some(Event::ClientEof));
        }
        if !self.c_in.is_empty() {
            // The start of a message that will never be whole: PostgreSQL meets the end
            // of the input inside it.
            if std::mem::take(&mut self.tag_ahead) {
                self.c_in.advance(1);
            }
            self.c_left = 0;
            self.commit_client(self.c_in.len());
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.server).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                self.server_shut = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Event::ServerIo(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Scans client bytes into `c_out`, applying the gate at the first message after a
    /// ReadyForQuery and, when rules or keyshift's statements are in play, handing the
    /// messages that matter to [`Self::client_message`].
    fn scan_client(&mut self) -> Option<Event> {
        let mut rewriter = self.current_rewriter();
        let mut fwd = 0;
        let mut event = None;
        let mut consumed = false;
        loop {
            let rest = self.c_in.get(fwd..).unwrap_or_default();
            if rest.is_empty() || self.client_done {
                break;
            }
            if self.c_left > 0 {
                let n = self.c_left.min(rest.len());
                self.c_left -= n;
                fwd += n;
                continue;
            }
            if self.guard.as_ref().is_some_and(Guard::sync_due) {
                // keyshift ends the failed guarded sequence here, at a message boundary.
                self.commit_client(fwd);
                fwd = 0;
                self.own_sync_for_guard();
                continue;
            }
            if self.guard.as_ref().is_some_and(Guard::holds_client) {
                // Waits until the guarded sequence ends (src/proxy/pooling.rs).
                break;
            }
            let Some(&tag) = rest.first() else { break };
            if self.tag_ahead {
                // This message's type byte went ahead (below); fwd is 0.
                match self.finish_tag_ahead(tag) {
                    Ahead::Wait => break,
                    Ahead::Hold => {
                        self.held = true;
                        event = Some(Event::Hold);
                        break;
                    }
                    Ahead::Refuse => {
                        event = Some(Event::BegunInCopy(tag));
                        break;
                    }
                    Ahead::Done => {
                        consumed = true;
                        continue;
                    }
                }
            }
            if self.replies.reads_copy_data()
                && frontend::is_known_tag(tag)
                && !frontend::continues_copy(tag)
                && wire::header(rest).is_none_or(|(_, len)| rest.len() <= len as usize)
            {
                // A message that cannot come during COPY FROM STDIN, not here whole:
                // PostgreSQL reads only its type byte, answers 08P01 and ends the session
                // ("protocol synchronization was lost"). Waiting for the rest, as keyshift
                // does for a message it reads whole, could wait forever, so the type byte
                // goes ahead. (Whole messages go as usual: if the COPY failed on earlier data,
                // PostgreSQL reads them as any other.)
                self.commit_client(fwd);
                fwd = 0;
                self.c_out.extend_from_slice(&[tag]);
                self.counters.client_bytes(1);
                self.tag_ahead = true;
                break;
            }
            if rest.len() < 5 && frontend::is_known_tag(tag) {
                break;
            }
            if self.replies.idle() {
                if self.status == TxStatus::Idle {
                    if !self.shared.gate.admit(&self.info) {
                        if self.passes_closed_gate(rest, rewriter.as_deref()) {
                            self.shared
                                .gate
                                .set_state(&self.info, SessionState::Passing);
                        } else {
                            self.held = true;
                            event = Some(Event::Hold);
                            break;
                        }
                    }
                    // Read the rules only once admitted: the control link puts new rules in
                    // force before it opens the gate, so a statement admitted after a cutover
                    // can never be rewritten under the rules from before it (the gate's
                    // SeqCst operations order the two).
                    rewriter = self.current_rewriter();
                    if !self.pooled && self.shared.pooling.pooled() {
                        self.become_pooled();
                    }
                    let version = self.shared.rules_version.load(Ordering::Acquire);
                    let rules_changed = version != self.rules_seen;
                    if rules_changed {
                        self.rules_seen = version;
                        self.stmts.retire_all();
                        // Privileges are read again with each rules version.
                        let unreadable = unreadable_for(&self.shared, &self.info.user);
                        if unreadable != self.scope.unreadable {
                            self.scope.unreadable = unreadable;
                            self.scoped = None;
                        }
                    }
                    let to_redo = !self.prepared.is_empty() || self.unnamed_sql.is_some();
                    if (rules_changed && to_redo) || self.stmts.has_closes() {
                        self.commit_client(fwd);
                        fwd = 0;
                        self.own_sequence(rules_changed);
                    }
                } else {
                    self.shared.gate.set_state(&self.info, SessionState::Active);
                }
            } else if self.info.state() == SessionState::Passing {
                // A message pipelined behind one the closed gate let through. As in `admit`,
                // Active is published before the gate is read: a pause that starts now waits
                // for it. With the gate still closed, the pause is not waiting for this
                // session, so what may touch the migration waits here.
                self.shared.gate.set_state(&self.info, SessionState::Active);
                if self.shared.gate.is_closed() {
                    self.shared
                        .gate
                        .set_state(&self.info, SessionState::Passing);
                    if !self.passes_closed_gate(rest, rewriter.as_deref()) {
                        self.held = true;
                        event = Some(Event::Hold);
                        break;
                    }
                }
            }
            let active = rewriter
                .as_ref()
                .filter(|r| r.applies_to(&self.info.database));
            let scoped = self.scoped_rewriter(active);
            let rest = self.c_in.get(fwd..).unwrap_or_default();
            let Some((_, len_word)) = wire::header(rest) else {
                // An unknown type byte: PostgreSQL reads it first and ends the session
                // ("invalid frontend message type"). It gets the byte and says so itself.
                fwd += 1;
                self.client_done = true;
                self.client_protocol_error();
                break;
            };
            if !frontend::is_known_tag(tag)
                || len_word < 4
                || len_word as usize > frontend::max_len(tag)
            {
                // An unknown type, or a length PostgreSQL refuses: it ends the session, with
                // a FATAL for the type and without a word for the length. Either way the
                // client hears it from PostgreSQL; nothing after this is in frame.
                fwd += if frontend::is_known_tag(tag) { 5 } else { 1 };
                self.client_done = true;
                self.client_protocol_error();
                break;
            }
            let len = 1 + len_word as usize;
            consumed = true;
            let active = active.map(|a| &**a);
            let rules = Rules {
                rewriter: scoped
                    .as_deref()
                    .or(active.map(|a| a.for_shape(self.info.shape))),
                tracking: active.is_none()
                    && rewriter.is_none()
                    && self.shared.cfg.database_url.is_some(),
            };
            if len > self.shared.cfg.max_message_bytes {
                // keyshift's own limit (documented): it may have to hold the message whole.
                event = Some(Event::TooLarge(len));
                break;
            }
            if self.restore_unknown() && matches!(tag, cf::BIND | cf::DESCRIBE) {
                // A later sequence's Bind or Describe: wait until the Parse's fate is known.
                // The Sync already sent makes PostgreSQL answer, so this cannot deadlock.
                self.restore_hold = true;
                break;
            }
            if !self.inspects(tag, &rules) {
                self.counters.client_message(tag);
                self.note_sent(tag);
                self.guard_sees(tag);
                self.c_left = len;
                continue;
            }
            if rest.len() < len {
                break;
            }
            self.counters.client_message(tag);
            if tag == cf::TERMINATE {
                // PostgreSQL answers what came before and closes: the relay goes on until it
                // does, so the client still gets those answers.
                fwd += len;
                self.client_done = true;
                break;
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            scratch.extend_from_slice(&rest[..len]);
            let mut out = std::mem::take(&mut self.replacement);
            out.clear();
            self.next_unnamed_use = tag == cf::PARSE
                && frontend::next_uses_unnamed_statement(rest.get(len..).unwrap_or_default());
            if self.client_message(tag, &scratch, rules, &mut out) {
                self.commit_client(fwd);
                fwd = 0;
                self.c_out.extend_from_slice(&out);
                if std::mem::take(&mut self.record_original) {
                    self.record(&scratch);
                } else {
                    self.record(&out);
                }
                self.c_in.advance(len);
            } else {
                fwd += len;
            }
            if let Some(g) = self.pending_guard.take() {
                // The guarded message itself went; the guard keeps what follows it.
                self.guard = Some(g);
            }
            self.guard_sees(tag);
            self.scratch = scratch;
            self.replacement = out;
            // A message PostgreSQL will skip may change what the next one must be.
            self.settle_outcomes();
        }
        self.commit_client(fwd);
        self.settle_outcomes();
        if consumed && !self.held && self.replies.idle() {
            // Only messages nothing answers went (a CopyData after a failed COPY, say): the
            // session still waits for its client.
            self.shared
                .gate
                .set_state(&self.info, self.state_after_ready());
        }
        event
    }

    /// Sends the first `n` bytes of `c_in` on as they came (kept by a recording guard).
    fn commit_client(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.counters.client_bytes(n);
        if let Some(bytes) = self.c_in.get(..n)
            && self.guard.as_ref().is_some_and(Guard::recording)
        {
            let bytes = bytes.to_vec();
            self.record(&bytes);
        }
        move_prefix(&mut self.c_in, &mut self.c_out, n);
        if self.c_left == 0
            && let Some(g) = &mut self.guard
        {
            g.committed();
        }
    }

    /// Keeps client bytes that went in a guarded sequence; gives the guard up past its limit.
    fn record(&mut self, bytes: &[u8]) {
        if let Some(g) = self.guard.as_mut().filter(|g| g.recording())
            && !g.record(bytes)
        {
            debug!(
                session = self.info.id,
                "guarded sequence too large to keep; a pooler's answer would reach the client"
            );
            self.guard = None;
        }
    }

    /// The client's message with this tag went: a Sync, Query or FunctionCall ends a guarded
    /// sequence.
    fn guard_sees(&mut self, tag: u8) {
        if let Some(g) = &mut self.guard {
            g.client_sent(matches!(tag, cf::SYNC | cf::QUERY | cf::FUNCTION_CALL));
        }
    }

    /// keyshift's Sync ending a failed guarded sequence the client had not ended.
    fn own_sync_for_guard(&mut self) {
        if self.guard.as_mut().is_some_and(Guard::take_sync_due) {
            build::sync(&mut self.c_out);
            self.replies.sent(Kind::Sync, Owner::Own, None);
        }
    }

    /// The upstream is a transaction pooler: from this transaction on, the session keeps
    /// nothing of keyshift's on the server (src/proxy/pooling.rs).
    fn become_pooled(&mut self) {
        self.pooled = true;
        self.stmts.disable();
        self.prepared.clear();
        self.unnamed_sql = None;
        self.unnamed_chain = None;
    }

    /// Sends a failed guarded sequence again, without keyshift's statement: the first
    /// message's answers go to whoever did not get them yet, the rest are the client's.
    fn replay(&mut self, r: Replay<Token>) {
        self.c_out.extend_from_slice(&r.first);
        let kind = if r.query { Kind::Query } else { Kind::Parse };
        match r.owner {
            First::Client => self.replies.sent(kind, Owner::Client, r.token),
            First::Own => self.replies.sent(kind, Owner::Own, None),
        }
        for (tag, msg) in wire::messages(&r.rest) {
            self.c_out.extend_from_slice(msg);
            self.note_sent(tag);
        }
        // What the client sent meanwhile is scanned again after it.
        self.rescan = true;
    }

    /// The client sent what PostgreSQL ends the session for (PostgreSQL says so itself).
    fn client_protocol_error(&self) {
        debug!(
            session = self.info.id,
            "client protocol violation, left to PostgreSQL to answer"
        );
        self.shared
            .metrics
            .protocol_errors
            .with_label_values(&["client"])
            .inc();
    }

    /// Whether the client message with this tag must be read whole.
    fn inspects(&self, tag: u8, rules: &Rules<'_>) -> bool {
        match tag {
            cf::QUERY | cf::PARSE | cf::CLOSE => {
                rules.rewriter.is_some()
                    || rules.tracking
                    || self.stmts.active()
                    || !self.prepared.is_empty()
                    || self.unnamed_chain.is_some()
            }
            cf::BIND | cf::DESCRIBE => self.reads_use(tag),
            cf::FLUSH | cf::TERMINATE => true,
            _ => false,
        }
    }

    /// Whether a Bind or Describe must be read whole: it may name a statement keyshift
    /// stands in for, restores, or must check.
    fn reads_use(&self, tag: u8) -> bool {
        self.stmts.alias().is_some()
            || self.stmts.has_restore()
            || (tag == cf::DESCRIBE && !self.prepared.is_empty())
            || (tag == cf::BIND && !self.stale.is_empty())
    }

    /// A client message about to go replaces or drops the client's unnamed statement (an
    /// unnamed Parse, a simple Query, a Close of it): keyshift's alias for that statement
    /// ends, and so does a restore armed for it. When PostgreSQL may skip the message (not
    /// first in its sequence: an earlier message may fail), what to arm again if it does.
    fn replace_unnamed(&mut self) -> Option<Box<Restoring>> {
        let skippable = !self.replies.idle();
        let fresh = skippable
            .then(|| {
                self.stmts
                    .alias_restore()
                    .or_else(|| self.stmts.restore().cloned())
            })
            .flatten();
        self.unnamed_gen += 1;
        self.stmts.unnamed_replaced();
        if !skippable {
            self.unnamed_chain = None;
            return None;
        }
        let (before, origin) = match fresh {
            Some(restore) => (
                Before {
                    restore,
                    client_sql: self.unnamed_sql.clone(),
                },
                self.unnamed_gen,
            ),
            None => self.unnamed_chain.clone()?,
        };
        self.unnamed_chain = Some((before.clone(), origin));
        Some(Box::new(Restoring {
            before,
            generation: self.unnamed_gen,
            origin,
            own: false,
            inner: None,
        }))
    }

    /// Queues a client message that replaced the unnamed statement ([`Self::replace_unnamed`]).
    fn sent_replacing(
        &mut self,
        kind: Kind,
        token: Option<Token>,
        restore: Option<Box<Restoring>>,
    ) {
        let token = match restore {
            Some(mut r) => {
                r.inner = token;
                self.restore_sent += 1;
                Some(Token::Restore(r))
            }
            None => token,
        };
        self.replies.sent(kind, Owner::Client, token);
    }

    /// A message sent before the last Sync may still change which statement the client's
    /// unnamed one is (see `restore_sent`).
    fn restore_unknown(&self) -> bool {
        self.restore_answered < self.restore_wait
    }

    /// Tells the reply queue about a client message forwarded as it came.
    fn note_sent(&mut self, tag: u8) {
        let kind = match tag {
            cf::QUERY => Kind::Query,
            cf::PARSE => Kind::Parse,
            cf::BIND => Kind::Bind,
            cf::DESCRIBE => Kind::Describe,
            cf::EXECUTE => Kind::Execute,
            cf::CLOSE => Kind::Close,
            cf::SYNC => {
                self.restore_wait = self.restore_sent;
                Kind::Sync
            }
            cf::FUNCTION_CALL => Kind::FunctionCall,
            cf::COPY_DONE => Kind::CopyDone,
            cf::COPY_FAIL => Kind::CopyFail,
            cf::FLUSH => return self.replies.sent_unanswered(true),
            cf::COPY_DATA => return self.replies.sent_copy_data(),
            _ => return self.replies.sent_unanswered(false),
        };
        self.replies.sent(kind, Owner::Client, None);
    }

    /// One whole client message: returns true when `out` holds what to send instead.
    fn client_message(
        &mut self,
        tag: u8,
        msg: &[u8],
        rules: Rules<'_>,
        out: &mut BytesMut,
    ) -> bool {
        match tag {
            cf::QUERY => self.on_query(msg, rules, out),
            cf::PARSE => self.on_parse(msg, rules, out),
            cf::BIND | cf::DESCRIBE => {
                if let Some(handled) = self.on_named_use(tag, msg, out) {
                    return handled;
                }
                self.on_unnamed_use(tag, msg, out)
            }
            cf::CLOSE => {
                if let Ok(c) = Named::read(msg)
                    && c.target == Target::Statement
                {
                    if c.name.is_empty() {
                        let restore = self.replace_unnamed();
                        self.unnamed_sql = None;
                        self.sent_replacing(Kind::Close, None, restore);
                        return false;
                    }
                    self.prepared.forget(c.name);
                    self.stale.remove(c.name);
                }
                self.note_sent(tag);
                false
            }
            cf::FLUSH if !frontend::is_empty_body(msg) => {
                // PostgreSQL refuses a Flush with a body ("invalid message format").
                self.replies.sent(Kind::Refused, Owner::Client, None);
                false
            }
            _ => {
                self.note_sent(tag);
                false
            }
        }
    }

    /// The client's SQL may drop prepared statements: forget what it drops.
    fn observe_drops(&mut self, sql: &[u8]) {
        if !super::server_statements::may_drop_statements(sql) {
            return;
        }
        // keyshift's own may be among them whatever the text names exactly.
        self.stmts.forget_all();
        match statements::dropped_statements(sql) {
            Some(Dropped::All) => {
                self.prepared.clear();
                self.stale.clear();
            }
            Some(Dropped::Names(names)) => {
                for n in names {
                    self.prepared.forget(&n);
                    self.stale.remove(n.as_slice());
                }
            }
            None => {}
        }
    }

    fn on_query(&mut self, msg: &[u8], rules: Rules<'_>, out: &mut BytesMut) -> bool {
        let Ok(q) = Query::read(msg) else {
            // PostgreSQL refuses it as it is ("invalid message format"): nothing runs.
            self.note_sent(cf::QUERY);
            return false;
        };
        // A simple Query drops the unnamed statement.
        let restore = self.replace_unnamed();
        self.unnamed_sql = None;
        self.observe_drops(q.sql);
        // A statement earlier in the same string may change the scope (CREATE TEMP TABLE x;
        // INSERT INTO x …): the rest is rewritten as the session now resolves names.
        let now = self.rescoped(q.sql, rules.rewriter.is_some());
        let rewriter = now.get().or(rules.rewriter);
        // Only valid UTF-8 is rewritten; anything else passes exactly as it came.
        let (Some(rw), Ok(sql)) = (rewriter, std::str::from_utf8(q.sql)) else {
            self.sent_replacing(Kind::Query, None, restore);
            return false;
        };
        // Under `auto`, keyshift's statements only where a pooler's answer can be undone: an
        // EXECUTE outside a transaction block is its own implicit transaction.
        let cautious = self.shared.pooling.cautious();
        let quiet = self.status != TxStatus::Failed
            && self.replies.idle()
            && (!cautious || (self.status == TxStatus::Idle && self.guard.is_none()));
        let (decision, template) = rw.rewrite_query(sql);
        match decision {
            Decision::Forward => {
                self.sent_replacing(Kind::Query, None, restore);
                false
            }
            Decision::Refuse(message) => {
                build::query(out, statements::REFUSAL_MARKER.as_bytes());
                self.sent_replacing(Kind::Query, Some(Token::Refusal(message)), restore);
                true
            }
            Decision::Replace(new) => {
                let action = match &template {
                    Some(t) => self.stmts.query(&t.template, quiet),
                    None => QueryAction::Forward,
                };
                let texts = Some(Token::Rewritten(Texts::new(sql, &new)));
                match action {
                    QueryAction::Forward => {
                        build::query(out, new.as_bytes());
                        self.sent_replacing(Kind::Query, texts, restore);
                    }
                    QueryAction::Execute(name) => {
                        self.counters.statements_reused += 1;
                        let args = template.as_ref().map(|t| t.args.as_str()).unwrap_or("");
                        let name = String::from_utf8_lossy(&name);
                        let execute: Arc<str> = format!("EXECUTE {name}({args})").into();
                        build::query(out, execute.as_bytes());
                        if cautious {
                            let mut instead = BytesMut::new();
                            build::query(&mut instead, new.as_bytes());
                            let token = Token::Rewritten(Texts::new(sql, &new));
                            self.pending_guard = Some(Guard::query(&instead, Some(token)));
                        }
                        let texts = Box::new(Texts {
                            original: sql.into(),
                            sent: execute,
                            insert_only: false,
                        });
                        self.sent_replacing(Kind::Query, Some(Token::Rewritten(texts)), restore);
                    }
                    QueryAction::Prepare(p) => {
                        self.counters.statements_prepared += 1;
                        build::query(out, new.as_bytes());
                        self.sent_replacing(Kind::Query, texts, restore);
                        let name = String::from_utf8_lossy(&p.name);
                        let prepare = format!("PREPARE {name} AS {}", p.template);
                        build::query(out, prepare.as_bytes());
                        self.replies
                            .sent(Kind::Query, Owner::Own, Some(Token::QueryPrepare(p)));
                    }
                }
                true
            }
        }
    }

    fn on_parse(&mut self, msg: &[u8], rules: Rules<'_>, out: &mut BytesMut) -> bool {
        let Ok(p) = Parse::read(msg) else {
            // PostgreSQL refuses it before it replaces any statement.
            self.note_sent(cf::PARSE);
            return false;
        };
        // PostgreSQL may skip this Parse (an earlier error in its sequence): the alias it ends
        // is then still the client's unnamed statement.
        let restore = if p.name.is_empty() {
            self.replace_unnamed()
        } else {
            None
        };
        self.observe_drops(p.sql);
        let now = self.rescoped(p.sql, rules.rewriter.is_some());
        let rewriter = now.get().or(rules.rewriter);
        let sql = std::str::from_utf8(p.sql).ok();
        if p.name.is_empty() {
            self.unnamed_sql = sql
                .filter(|_| rules.rewriter.is_some())
                .map(|s| (Arc::from(s), Box::from(p.types)));
        }
        let decision = match (rewriter, sql) {
            (Some(rw), Some(sql)) => rw.rewrite(sql),
            _ => Decision::Forward,
        };
        match decision {
            Decision::Forward => {
                let token = match sql {
                    Some(sql) if rules.rewriter.is_some() || rules.tracking => {
                        self.remember(&p, sql, None)
                    }
                    _ => None,
                };
                self.sent_replacing(Kind::Parse, token, restore);
                false
            }
            Decision::Refuse(message) => {
                self.prepared.forget(p.name);
                build::parse_with(out, &p, p.name, statements::REFUSAL_MARKER.as_bytes());
                self.replies
                    .sent(Kind::Parse, Owner::Client, Some(Token::Refusal(message)));
                true
            }
            Decision::Replace(new) if p.name.is_empty() => {
                // First in its sequence, or an earlier message's error could make PostgreSQL
                // skip it while keyshift's alias already named its statement.
                let quiet = self.status != TxStatus::Failed && self.replies.idle();
                // Under `auto`, keyshift's statements only where a pooler's answer can be
                // undone: first in its sequence, outside a transaction block, with the Bind or
                // Describe that uses it already here.
                let cautious = self.shared.pooling.cautious();
                let guardable = self.guard.is_none()
                    && self.status == TxStatus::Idle
                    && self.replies.idle()
                    && self.next_unnamed_use;
                let action =
                    self.stmts
                        .unnamed_parse(&new, p.types, quiet && (!cautious || guardable));
                if cautious && !matches!(action, ParseAction::Forward) {
                    let mut instead = BytesMut::new();
                    build::parse_with(&mut instead, &p, b"", new.as_bytes());
                    let token = sql.map(|sql| Token::Rewritten(Texts::new(sql, &new)));
                    self.pending_guard = Some(Guard::parse(&instead, token));
                }
                match action {
                    ParseAction::Forward => {
                        build::parse_with(out, &p, b"", new.as_bytes());
                        // Skipped after an earlier error, it leaves the alias's statement the
                        // client's unnamed one (fuzz seed 9700, case 146).
                        let texts = sql.map(|sql| Token::Rewritten(Texts::new(sql, &new)));
                        self.sent_replacing(Kind::Parse, texts, restore);
                    }
                    ParseAction::Prepare(name) => {
                        self.counters.statements_prepared += 1;
                        build::parse_with(out, &p, &name, new.as_bytes());
                        let texts = Texts::new(sql.unwrap_or_default(), &new);
                        self.replies.sent(
                            Kind::Parse,
                            Owner::Client,
                            Some(Token::Statement(name, texts)),
                        );
                    }
                    ParseAction::Reuse(_) => {
                        self.counters.statements_reused += 1;
                        // Parse("", "") with no parameter types: PostgreSQL answers
                        // ParseComplete without planning anything.
                        build::parse(out, b"", b"", b"");
                        self.replies.sent(Kind::Parse, Owner::Client, None);
                    }
                }
                true
            }
            Decision::Replace(new) => {
                let token = sql.map(|sql| match self.remember(&p, sql, Some(&new)) {
                    Some(Token::Named(name, _)) => Token::Named(name, Some(Texts::new(sql, &new))),
                    _ => Token::Rewritten(Texts::new(sql, &new)),
                });
                build::parse_with(out, &p, p.name, new.as_bytes());
                self.replies.sent(Kind::Parse, Owner::Client, token);
                true
            }
        }
    }

    /// Remembers a named statement for the next rules change; the token forgets it if
    /// PostgreSQL does not take the Parse. A name already taken is left alone: PostgreSQL
    /// refuses to prepare it again (42P05).
    fn remember(&mut self, p: &Parse<'_>, sql: &str, sent: Option<&str>) -> Option<Token> {
        if p.name.is_empty()
            || self.prepared.contains(p.name)
            || (self.pooled && !self.shared.pooling.keeps_named())
        {
            // Behind a transaction pooler the statement is not the session's to prepare again,
            // unless the pooler keeps it for this client (src/proxy/pooling.rs).
            return None;
        }
        self.prepared.remember(p.name, sql, p.types, sent);
        Some(Token::Named(p.name.into(), None))
    }

    /// A Describe of a tracked named statement (what PostgreSQL answers is recorded as what
    /// the client was told), or a Bind of a stale one (answered with 0A000). `None`: neither.
    fn on_named_use(&mut self, tag: u8, msg: &[u8], out: &mut BytesMut) -> Option<bool> {
        if tag == cf::DESCRIBE {
            let d = Named::read(msg).ok()?;
            if d.target != Target::Statement || d.name.is_empty() || !self.prepared.contains(d.name)
            {
                return None;
            }
            self.replies.sent(
                Kind::Describe,
                Owner::Client,
                Some(Token::Describe(d.name.into())),
            );
            return Some(false);
        }
        let b = Bind::read(msg).ok()?;
        if b.statement.is_empty() || !self.stale.contains(b.statement) {
            return None;
        }
        // A named Parse of keyshift's refusal marker in place of the Bind: PostgreSQL fails
        // it (and skips to Sync) without touching the client's unnamed statement.
        let name = format!("{}stale", self.stmts.prefix());
        build::parse(
            out,
            name.as_bytes(),
            statements::REFUSAL_MARKER.as_bytes(),
            &[0, 0],
        );
        self.replies
            .sent(Kind::Parse, Owner::Client, Some(Token::Stale));
        Some(true)
    }

    /// A Bind or Describe: when it uses the client's unnamed statement and keyshift's
    /// statement stands for it, it names keyshift's; when keyshift's was dropped, the
    /// client's text is prepared again as the unnamed statement first.
    fn on_unnamed_use(&mut self, tag: u8, msg: &[u8], out: &mut BytesMut) -> bool {
        // A Bind malformed after its names still meets the statement keyshift's alias names
        // (fuzz seed 9600, case 591); it is not worth a restoring Parse (seed 9802, case 490).
        let bind = (tag == cf::BIND)
            .then(|| {
                Bind::read(msg)
                    .ok()
                    .or_else(|| Bind::head(msg).ok().filter(|_| !self.stmts.has_restore()))
            })
            .flatten()
            .filter(|b| b.statement.is_empty());
        let describe = (tag == cf::DESCRIBE)
            .then(|| Named::read(msg).ok())
            .flatten()
            .filter(|d| d.is_unnamed_statement());
        if bind.is_none() && describe.is_none() {
            self.note_sent(tag);
            return false;
        }
        if let Some(r) = self.stmts.take_restore() {
            build::parse(out, b"", r.sql.as_bytes(), &r.types);
            // In a failed transaction PostgreSQL refuses this Parse with the error it would
            // have given the client's Bind or Describe: that error is the client's. Refused
            // or skipped (an earlier error in the sequence), it is armed again for the next
            // use; a replacement sent before PostgreSQL answers continues its chain.
            self.unnamed_gen += 1;
            let before = Before {
                restore: r,
                client_sql: self.unnamed_sql.clone(),
            };
            self.unnamed_chain = Some((before.clone(), self.unnamed_gen));
            let token = Token::Restore(Box::new(Restoring {
                before,
                generation: self.unnamed_gen,
                origin: self.unnamed_gen,
                own: true,
                inner: None,
            }));
            self.restore_sent += 1;
            self.replies
                .sent(Kind::Parse, Owner::OwnErrorsToClient, Some(token));
            out.extend_from_slice(msg);
            self.note_sent(tag);
            return true;
        }
        let Some(alias) = self.stmts.alias() else {
            self.note_sent(tag);
            return false;
        };
        match (bind, describe) {
            (Some(b), _) => build::bind_with(out, &b, alias),
            (_, Some(d)) => build::named_with(out, &d, alias),
            _ => {}
        }
        self.record_original = true;
        self.note_sent(tag);
        true
    }

    /// The rewriter for this session's own name resolution, when it set a search path or
    /// created temporary tables; built once per rule set and scope.
    /// Whether the message at the start of `rest`, sent by this idle session while the gate
    /// is closed, may go on anyway: a complete simple Query that cannot touch the migration
    /// (src/proxy/pass.rs), in a database the rules apply to.
    fn passes_closed_gate(&self, rest: &[u8], active: Option<&ActiveRewriter>) -> bool {
        let Some(active) = active.filter(|a| a.applies_to(&self.info.database)) else {
            return false;
        };
        let Some((tag, len)) = wire::header(rest) else {
            return false;
        };
        let Some(msg) = rest.get(..(len as usize).saturating_add(1)) else {
            return false;
        };
        if tag != cf::QUERY || !self.scope.is_default() {
            return false;
        }
        let Ok(q) = frontend::Query::read(msg) else {
            return false;
        };
        super::pass::passes_closed_gate(q.sql, Some(active.for_shape(self.info.shape)))
    }

    fn scoped_rewriter(
        &mut self,
        active: Option<&Arc<ActiveRewriter>>,
    ) -> Option<Arc<dyn StatementRewriter>> {
        let active = active?;
        if self.scope.is_default() {
            return None;
        }
        if let Some((for_rules, rw)) = &self.scoped
            && Arc::ptr_eq(for_rules, active)
        {
            return Some(rw.clone());
        }
        let rw = active.for_shape(self.info.shape).scoped(&self.scope)?;
        self.scoped = Some((active.clone(), rw.clone()));
        Some(rw)
    }

    /// What the client's SQL does to name resolution. When it changes it (and rules are in
    /// force), the rewriter for the new scope, to rewrite this same message with.
    fn rescoped(&mut self, sql: &[u8], rules: bool) -> Rescoped {
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Rescoped::default();
        };
        if !self.scope.observe(sql, &self.info.user) {
            return Rescoped::default();
        }
        self.scoped = None;
        if !rules {
            return Rescoped::default();
        }
        let active = self
            .shared
            .rewriter
            .load_full()
            .filter(|r| r.applies_to(&self.info.database));
        let scoped = self.scoped_rewriter(active.as_ref());
        Rescoped {
            shape: Some(self.info.shape),
            active,
            scoped,
        }
    }

    /// A sequence of keyshift's own, sent while the session is idle, before the client's next
    /// message; its answers are dropped. It closes the statements keyshift prepared and no
    /// longer uses, and, when the rules changed (expand, cutover, rollback, finalize),
    /// prepares again every tracked named statement whose text under the new rules differs
    /// from the one the server has, from the client's original SQL. PostgreSQL would otherwise
    /// go on running the old text: without the twins' columns when the statement was prepared
    /// before expand, or naming columns the cutover renamed.
    fn own_sequence(&mut self, rules_changed: bool) {
        let closes = self.stmts.take_closes();
        for name in &closes {
            build::close_statement(&mut self.c_out, name);
            self.replies.sent(Kind::Close, Owner::Own, None);
        }
        let changed = if rules_changed {
            let rw = self.shared.rewriter.load_full();
            let active = rw.as_ref().filter(|r| r.applies_to(&self.info.database));
            let scoped = self.scoped_rewriter(active);
            let now: Option<&dyn StatementRewriter> = scoped
                .as_deref()
                .or(active.map(|a| a.for_shape(self.info.shape)));
            self.prepared
                .changed(|sql| match now.map(|r| r.rewrite(sql)) {
                    Some(Decision::Replace(s)) => Some(s.to_string()),
                    _ => None,
                })
        } else {
            Vec::new()
        };
        if rules_changed {
            self.restore_unnamed_under_new_rules();
        }
        if changed.is_empty() && closes.is_empty() {
            return;
        }
        // One sequence per statement: a Parse PostgreSQL refuses makes it skip the rest of its
        // sequence, and a skipped Close would leave the statement prepared under the old
        // rules to run after the swap. Each Close runs; a refused Parse leaves only its own
        // statement missing (the client's next use gets PostgreSQL's 26000).
        // What the client was told stays true by construction: the parameter types it was
        // given are the Parse's, and the result columns are checked (Describe) before the
        // client's next Bind or Describe goes (the restore hold), a change making the
        // statement stale rather than letting it send rows the client would misread.
        for r in &changed {
            build::close_statement(&mut self.c_out, &r.name);
            self.replies.sent(Kind::Close, Owner::Own, None);
            let tail = r.told.as_ref().map(statements::Told::parse_tail);
            let types = tail.as_deref().unwrap_or(&r.rest);
            build::parse(&mut self.c_out, &r.name, r.text.as_bytes(), types);
            self.replies.sent(
                Kind::Parse,
                Owner::Own,
                Some(Token::Reprepare(r.name.clone())),
            );
            if r.told.is_some() {
                build::describe_statement(&mut self.c_out, &r.name);
                self.replies.sent(
                    Kind::Describe,
                    Owner::Own,
                    Some(Token::Verify(r.name.clone())),
                );
                self.restore_sent += 1;
            }
            build::sync(&mut self.c_out);
            self.replies.sent(Kind::Sync, Owner::Own, None);
            self.restore_wait = self.restore_sent;
        }
        build::sync(&mut self.c_out);
        self.replies.sent(Kind::Sync, Owner::Own, None);
        debug!(
            session = self.info.id,
            statements = changed.len(),
            closed = closes.len(),
            "re-preparing rewritten statements under new rules, closing keyshift's own"
        );
    }

    /// After a rules change, the client's unnamed statement as the new rules make it: if that
    /// is not what the server has, it is prepared again before the client's next Bind or
    /// Describe of it (`on_unnamed_use`), and keyshift's alias for it ends.
    fn restore_unnamed_under_new_rules(&mut self) {
        let Some((sql, types)) = self.unnamed_sql.clone() else {
            return;
        };
        let rw = self.shared.rewriter.load_full();
        let active = rw.as_ref().filter(|r| r.applies_to(&self.info.database));
        let scoped = self.scoped_rewriter(active);
        let current: Option<&dyn StatementRewriter> = scoped
            .as_deref()
            .or(active.map(|a| a.for_shape(self.info.shape)));
        let now: Arc<str> = match current.map(|r| r.rewrite(&sql)) {
            Some(Decision::Replace(s)) => s,
            _ => sql,
        };
        // Without an alias the server's text is unknown here (the client's own, or a rewrite
        // forwarded under the old rules): preparing it again costs one Parse, once.
        if self.stmts.alias_restore().is_some_and(|r| r.sql == now) {
            return;
        }
        self.stmts.end_alias();
        self.stmts
            .set_restore(super::server_statements::Restore { sql: now, types });
    }

    /// Scans server bytes into `s_out`: the client's messages stream through; ReadyForQuery
    /// and ErrorResponse are read whole; answers to keyshift's own messages are dropped; the
    /// syntax error of a refusal marker becomes keyshift's refusal.
    fn scan_server(&mut self) -> Result<(), ServerError> {
        let mut fwd = 0;
        loop {
            let rest = self.s_in.get(fwd..).unwrap_or_default();
            if rest.is_empty() {
                break;
            }
            if self.s_left > 0 {
                let n = self.s_left.min(rest.len());
                self.s_left -= n;
                fwd += n;
                continue;
            }
            let Some((tag, len_word)) = wire::header(rest) else {
                break;
            };
            if len_word < 4 {
                return Err(ServerError::TooShort(len_word));
            }
            let len = 1 + len_word as usize;
            if len > MAX_SERVER_MESSAGE {
                return Err(ServerError::TooLarge(len));
            }
            let route = self.replies.route(tag);
            let whole = route == Route::Drop
                || matches!(tag, sb::READY_FOR_QUERY | sb::ERROR_RESPONSE)
                || (matches!(
                    tag,
                    sb::PARAMETER_DESCRIPTION | sb::ROW_DESCRIPTION | sb::NO_DATA
                ) && matches!(
                    self.replies.front_token().map(Token::inner),
                    Some(Token::Describe(_) | Token::Verify(_))
                ));
            if !whole {
                self.counters.server_message(tag);
                self.replies.server(tag, b"");
                if matches!(tag, sb::COPY_IN_RESPONSE | sb::COPY_BOTH_RESPONSE) {
                    self.end_unfailed_guard();
                }
                self.s_left = len;
                if self.replies.has_outcomes() {
                    self.settle_outcomes();
                }
                continue;
            }
            let Some(msg) = rest.get(..len) else {
                break;
            };
            self.counters.server_message(tag);
            let mut code = [0u8; 5];
            let mut replacement = None;
            // Dropped: a pooler's answer the session undoes, and the end of its sequence.
            let mut suppress = false;
            let mut pooler = false;
            // The client's own error (not a pooler's answer, not keyshift's).
            let mut erred = false;
            match tag {
                sb::READY_FOR_QUERY => {
                    self.status = backend::ready_for_query(msg)?;
                    if self.status == TxStatus::Idle && self.scope.transaction_ended() {
                        self.scoped = None;
                    }
                }
                sb::PARAMETER_DESCRIPTION | sb::ROW_DESCRIPTION | sb::NO_DATA => {
                    description(
                        tag,
                        msg,
                        self.replies.front_token().map(Token::inner),
                        Told {
                            prepared: &mut self.prepared,
                            stale: &mut self.stale,
                            stmts: &mut self.stmts,
                        },
                        self.info.id,
                    );
                }
                sb::ERROR_RESPONSE => {
                    // A malformed ErrorResponse still goes to the client as it came.
                    if let Ok(f) = Fields::read(msg) {
                        if let Some(c) = f.sqlstate().filter(|c| c.len() == 5) {
                            code.copy_from_slice(c);
                        }
                        self.server_fatal |= f.ends_session();
                        self.ahead_refused |= self.tag_ahead && &code == b"08P01";
                        pooler = is_pooler_answer(
                            &code,
                            f.message().unwrap_or_default(),
                            self.stmts.prefix(),
                        );
                    }
                    suppress = pooler
                        && route == Route::Client
                        && self.guard.as_ref().is_some_and(|g| !g.failed());
                    erred = !pooler && route == Route::Client;
                    if suppress {
                    } else if route == Route::Drop {
                        self.own_error = Some(code.into());
                    } else if &code == b"42601"
                        && let Some(Token::Refusal(m)) =
                            self.replies.front_token().map(Token::inner)
                    {
                        replacement = Some(messages::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            m,
                            Some(REFUSAL_HINT),
                        ));
                    } else if &code == b"42601"
                        && let Some(Token::Stale) = self.replies.front_token().map(Token::inner)
                    {
                        replacement = Some(messages::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            CACHED_PLAN_CHANGED,
                            None,
                        ));
                    } else {
                        if let Some(t) = self
                            .replies
                            .front_token()
                            .map(Token::inner)
                            .and_then(Token::texts)
                        {
                            replacement = mapped_position(msg, t);
                        }
                        // Both may apply: a position in the text keyshift sent, and the name
                        // of keyshift's statement standing for the client's unnamed one.
                        // Not only while keyshift's statements are active: a DISCARD ALL
                        // pipelined behind the failed Bind has forgotten them by now
                        // (fuzz seed 9302, case 272). The prefix is this session's alone.
                        let base = replacement.as_deref().unwrap_or(msg);
                        if let Some(r) = unnamed_in_message(base, self.stmts.prefix()) {
                            replacement = Some(r);
                        }
                    }
                }
                _ => {}
            }
            let sqlstate = if tag == sb::ERROR_RESPONSE {
                &code[..]
            } else {
                b""
            };
            if pooler {
                self.pooler_answer(route);
            }
            if erred {
                self.end_unfailed_guard();
            }
            self.replies.server(tag, sqlstate);
            if tag == sb::READY_FOR_QUERY {
                suppress |= self.guarded_sequence_ended(route);
            }
            if route == Route::Drop || replacement.is_some() || suppress {
                self.counters.server_bytes(fwd);
                move_prefix(&mut self.s_in, &mut self.s_out, fwd);
                fwd = 0;
                if let Some(r) = replacement {
                    self.s_out.extend_from_slice(&r);
                }
                self.s_in.advance(len);
            } else {
                fwd += len;
            }
            self.settle_outcomes();
            if tag == sb::READY_FOR_QUERY && self.replies.idle() {
                let st = self.state_after_ready();
                self.shared.gate.set_state(&self.info, st);
                self.counters.flush_if_due(&self.shared.metrics);
            }
        }
        self.counters.server_bytes(fwd);
        move_prefix(&mut self.s_in, &mut self.s_out, fwd);
        Ok(())
    }

    /// The upstream said one of keyshift's statements is missing or already there: a
    /// transaction pooler. When a guard stands for the failed message the error is undone
    /// (the caller drops it, and the guarded sequence is sent again once it ends); otherwise
    /// it reaches the client.
    fn pooler_answer(&mut self, route: Route) {
        // The guarded first message itself failed (keyshift's Parse of its statement): its
        // answer is the client's to get from the replay.
        let first_failed = matches!(
            self.replies.front_token().map(Token::inner),
            Some(Token::Statement(..))
        );
        let guard = self.guard.as_mut().filter(|g| !g.failed());
        let recovered = route == Route::Drop || guard.is_some();
        self.shared
            .pooling
            .detected(&self.shared.metrics, self.info.id, recovered);
        let Some(g) = guard.filter(|_| route == Route::Client) else {
            return;
        };
        if g.fail(first_failed) && self.c_left == 0 {
            // The client is at a message boundary: end the sequence now.
            self.own_sync_for_guard();
        }
    }

    /// A ReadyForQuery came: when it ends a guarded sequence, the guard ends, and a failed
    /// one is sent again. Returns true when this ReadyForQuery is dropped (it ended the
    /// sequence the client must not see fail).
    fn guarded_sequence_ended(&mut self, route: Route) -> bool {
        let Some(g) = self.guard.take_if(|g| g.holds_client() && !g.sync_due()) else {
            return false;
        };
        self.rescan = true;
        let Some(replay) = g.replay() else {
            return false;
        };
        self.replay(replay);
        self.become_pooled();
        route == Route::Client
    }

    /// Ends a guard that has not failed: past this point a pooler's answer can no longer come
    /// (it answers keyshift's statement, which went first), so there is nothing to send again,
    /// and holding the client's next messages could only hang the session. Two such points,
    /// both found by the protocol fuzzer:
    /// - PostgreSQL entered COPY FROM STDIN inside the sequence: it answered everything before
    ///   without a pooler's error (after one it would have skipped to the Sync) and now waits
    ///   for the client's data, which the guard would hold until a ReadyForQuery that cannot
    ///   come before it (a COPY pipelined after a rewritten INSERT hung);
    /// - the client's own error came: PostgreSQL now skips to the next Sync, which a guard
    ///   holding the client after a Query or FunctionCall (the usual end of a sequence) would
    ///   keep from it (a rewritten UPDATE's Execute failed on a foreign key, and a Query
    ///   pipelined behind it waited for ever).
    fn end_unfailed_guard(&mut self) {
        if self.guard.take_if(|g| !g.failed()).is_some() {
            self.rescan = true;
        }
    }

    /// Acts on how PostgreSQL finished the messages that carried tokens.
    fn settle_outcomes(&mut self) {
        if !self.replies.has_outcomes() {
            return;
        }
        let done: Vec<(Token, Outcome)> = self.replies.take_outcomes().collect();
        for (token, outcome) in done {
            self.settle_outcome(token, outcome);
        }
    }

    fn settle_outcome(&mut self, token: Token, outcome: Outcome) {
        match token {
            Token::Statement(name, _) => self.stmts.parse_outcome(&name, outcome == Outcome::Done),
            Token::QueryPrepare(p) => {
                let error = match outcome {
                    Outcome::Done => None,
                    // Skipped: nothing wrong with the statement, try another time.
                    Outcome::Skipped => Some(Box::from(&b"25P02"[..])),
                    Outcome::Failed => self.own_error.take(),
                };
                self.stmts.query_prepared(p, error.as_deref());
            }
            Token::Named(name, _) => {
                if outcome != Outcome::Done {
                    self.prepared.forget(&name);
                }
            }
            Token::Describe(_) | Token::Stale => {}
            Token::Verify(_) => {
                self.restore_answered += 1;
            }
            Token::Reprepare(name) => {
                if outcome != Outcome::Done {
                    // Its next use gets 0A000, as a driver gets from PostgreSQL when a
                    // cached plan can no longer be what it was.
                    self.stale.insert(name);
                    warn!(
                        session = self.info.id,
                        "re-preparing a statement under the new rules failed; the client will see an error when it uses it"
                    );
                }
            }
            Token::Restore(r) => {
                let Restoring {
                    before,
                    generation,
                    origin,
                    own,
                    inner,
                } = *r;
                if outcome == Outcome::Done {
                    self.unnamed_taken = self.unnamed_taken.max(generation);
                }
                if generation == self.unnamed_gen {
                    // The last replacement sent: what it leaves is now known.
                    self.unnamed_chain = None;
                    let not_run = match outcome {
                        Outcome::Skipped => true,
                        Outcome::Failed => own,
                        Outcome::Done => false,
                    };
                    if not_run && self.unnamed_taken < origin {
                        self.stmts.set_restore(before.restore);
                        self.unnamed_sql = before.client_sql;
                    }
                }
                self.restore_answered += 1;
                if let Some(inner) = inner {
                    self.settle_outcome(inner, outcome);
                }
            }
            Token::Refusal(_) | Token::Rewritten(_) => {}
        }
    }

    async fn flush_to_client(&mut self) {
        if self.s_out.is_empty() {
            return;
        }
        let fut = async {
            self.client.write_all(&self.s_out).await?;
            self.client.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
        self.s_out.clear();
    }

    /// Tells the client why the session ends, if it can be done without breaking a message
    /// already half-sent to it.
    async fn fatal_to_client(&mut self, code: &str, msg: &str) {
        self.flush_to_client().await;
        if self.s_left > 0 {
            return;
        }
        let err = messages::fatal(code, msg);
        let fut = async {
            self.client.write_all(&err).await?;
            self.client.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
    }
}

/// The ErrorResponse `msg` with keyshift's statement name (`"keyshift_<hex>_s1"`, which a
/// Bind of the unnamed statement named instead) put back as the client's `""`; `None` when
/// the message does not name one.
fn unnamed_in_message(msg: &[u8], prefix: &str) -> Option<BytesMut> {
    let fields = Fields::read(msg).ok()?;
    let m = fields.message()?;
    let quoted = format!("\"{prefix}");
    let at = m
        .windows(quoted.len())
        .position(|w| w == quoted.as_bytes())?;
    let end = at + 1 + m.get(at + 1..)?.iter().position(|&c| c == b'"')?;
    let mut text = m[..at].to_vec();
    text.extend_from_slice(b"\"\"");
    text.extend_from_slice(m.get(end + 1..)?);
    let mut out = BytesMut::with_capacity(msg.len());
    build::fields_with(&mut out, sb::ERROR_RESPONSE, &fields, b'M', &text);
    Some(out)
}

/// The rewriter for a scope that changed in the middle of a message (`Session::rescoped`).
#[derive(Default)]
struct Rescoped {
    shape: Option<Shape>,
    active: Option<Arc<ActiveRewriter>>,
    scoped: Option<Arc<dyn StatementRewriter>>,
}

impl Rescoped {
    fn get(&self) -> Option<&dyn StatementRewriter> {
        self.scoped.as_deref().or_else(|| {
            let shape = self.shape?;
            self.active.as_deref().map(|a| a.for_shape(shape))
        })
    }
}

/// The session state a description updates.
struct Told<'a> {
    prepared: &'a mut Prepared,
    stale: &'a mut std::collections::HashSet<Box<[u8]>>,
    stmts: &'a mut ServerStatements,
}

/// A ParameterDescription, RowDescription or NoData answering the client's Describe of a
/// tracked statement (recorded as what the client was told) or keyshift's own after a
/// re-preparation (compared with it: a difference makes the statement stale).
/// A free function over the fields it needs: the message is borrowed from the read buffer.
fn description(tag: u8, msg: &[u8], front: Option<&Token>, t: Told<'_>, session: u64) {
    let columns = || -> Option<Option<statements::Columns>> {
        match tag {
            sb::NO_DATA => Some(None),
            _ => backend::row_description(msg).ok().map(|cols| {
                Some(
                    cols.iter()
                        .map(|c| (Box::from(c.name), c.type_oid))
                        .collect(),
                )
            }),
        }
    };
    match front {
        Some(Token::Describe(name)) => {
            let name = name.clone();
            if tag == sb::PARAMETER_DESCRIPTION {
                if let Ok(p) = backend::parameter_types(msg) {
                    t.prepared.told_params(&name, p);
                }
            } else if let Some(c) = columns() {
                t.prepared.told_columns(&name, c);
            }
        }
        Some(Token::Verify(name)) if tag != sb::PARAMETER_DESCRIPTION => {
            let name = name.clone();
            let told = t.prepared.told(&name).and_then(|t| t.columns.clone());
            if columns().is_none_or(|now| now != told) {
                warn!(
                    session,
                    statement = %String::from_utf8_lossy(&name),
                    "a statement prepared again under new rules would answer other columns than the client was told; its next use gets 0A000"
                );
                t.stale.insert(name.clone());
                t.prepared.forget(&name);
                t.stmts.close_later(&name);
            }
        }
        _ => {}
    }
}

/// The ErrorResponse `msg` with its position (`P`) moved from the text keyshift sent into the
/// client's; `None` when it has none (or it is already right).
fn mapped_position(msg: &[u8], texts: &Texts) -> Option<BytesMut> {
    let fields = Fields::read(msg).ok()?;
    let p: usize = std::str::from_utf8(fields.get(b'P')?).ok()?.parse().ok()?;
    let mapped = statements::map_error_position(&texts.original, &texts.sent, p, texts.insert_only);
    if mapped == p {
        return None;
    }
    let mut out = BytesMut::with_capacity(msg.len());
    build::fields_with(
        &mut out,
        sb::ERROR_RESPONSE,
        &fields,
        b'P',
        mapped.to_string().as_bytes(),
    );
    Some(out)
}

/// Moves the first `n` bytes of `src` to the end of `dst`. When that is all of `src` and
/// `dst` is empty (the usual case), the buffers are swapped instead of copied.
#[inline]
fn move_prefix(src: &mut BytesMut, dst: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    if n == src.len() && dst.is_empty() {
        std::mem::swap(src, dst);
        src.clear();
    } else {
        dst.extend_from_slice(&src[..n]);
        src.advance(n);
    }
}

/// Reads into the spare capacity of `buf`, growing it to at least `READ_CHUNK` free bytes.
#[inline]
fn poll_read<R: AsyncRead + Unpin>(
    s: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let dst = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(dst);
    ready!(Pin::new(s).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
