//! One client session after authentication: the relay between client and PostgreSQL.
//!
//! A single task drives both directions with one hand-written poll loop (`poll_io`): it
//! writes what is pending to each side, reads from each side when the previous chunk has gone
//! out, and scans what it read. Doing both directions in one task keeps one wake-up per
//! network event and lets each direction see the other's state without locks, while never
//! blocking one direction on the other (a server busy writing results is always read, even
//! while the client's next pipeline is waiting to be written), which would deadlock.
//!
//! Bytes are forwarded as they came. Only three things are looked at: the tag and length of
//! every message (to stay in frame and count), the status byte of ReadyForQuery (transaction
//! state for the pause gate), and the kind of client message (to know when the session is
//! idle: nothing forwarded since the last ReadyForQuery).

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
use super::frame::{FrameError, Scan, Scanner};
use super::gate::{SessionInfo, SessionState};
use super::messages::{self, sqlstate};
use std::collections::VecDeque;

use super::server_statements::{self, ParseAction, PendingPrepare, QueryAction, ServerStatements};
use super::statements::{self, Decision, Prepared, Refusal};
use super::stream::Stream;
use crate::metrics::SessionCounters;

/// Read buffers grow to this much free space before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Largest message PostgreSQL itself sends (1 GB) plus room: a sanity bound on server frames.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1024;

/// Why the relay stopped polling.
#[derive(Debug)]
enum Event {
    /// The session is idle and the gate is closed: its next message waits in `c_in`.
    Hold,
    ClientEof,
    ClientTerminated,
    ServerEof,
    ClientProtocol(FrameError),
    ServerProtocol(FrameError),
    ClientIo(io::Error),
    ServerIo(io::Error),
}

pub struct Session {
    client: Stream,
    server: Stream,
    c_in: BytesMut,
    c_out: BytesMut,
    s_in: BytesMut,
    s_out: BytesMut,
    c_scan: Scanner,
    s_scan: Scanner,
    client_dirty: bool,
    server_dirty: bool,
    /// Last ReadyForQuery status: `I`, `T` or `E`.
    status: u8,
    /// ReadyForQuery messages still owed for Query, Sync and FunctionCall messages sent.
    pending_z: u32,
    /// Extended-protocol messages were sent since the last Sync.
    open_seq: bool,
    held: bool,
    terminating: bool,
    /// Named statements whose SQL was rewritten, for re-preparing at cutover.
    prepared: Prepared,
    /// Statements keyshift prepared itself for the client's rewritten unnamed Parse messages.
    stmts: ServerStatements,
    /// Refused statements whose marker error is still to come back from PostgreSQL.
    refusals: VecDeque<Refusal>,
    next_refusal: u64,
    /// The rules version this session's prepared statements were rewritten under.
    rules_seen: u64,
    /// Sequences of keyshift's own in flight (re-preparing, closing, preparing a Query
    /// shape), in the order sent: their answers, up to and including their ReadyForQuery, are
    /// dropped.
    own: VecDeque<OwnSequence>,
    counters: SessionCounters,
    info: Arc<SessionInfo>,
    shared: Arc<Shared>,
}

#[inline]
fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P'
            | b'B'
            | b'E'
            | b'D'
            | b'C'
            | b'S'
            | b'H'
            | b'X'
            | b'F'
            | b'd'
            | b'c'
            | b'f'
            | b'p'
    )
}

impl Session {
    pub fn new(
        client: Stream,
        server: Stream,
        status: u8,
        info: Arc<SessionInfo>,
        shared: Arc<Shared>,
    ) -> Session {
        Session {
            client,
            server,
            c_in: BytesMut::with_capacity(READ_CHUNK),
            c_out: BytesMut::new(),
            s_in: BytesMut::with_capacity(READ_CHUNK),
            s_out: BytesMut::new(),
            c_scan: Scanner::default(),
            s_scan: Scanner::default(),
            client_dirty: false,
            server_dirty: false,
            status,
            pending_z: 0,
            open_seq: false,
            held: false,
            terminating: false,
            prepared: Prepared::default(),
            stmts: ServerStatements::new(shared.cfg.server_statements),
            refusals: VecDeque::new(),
            next_refusal: 0,
            rules_seen: shared.rules_version.load(Ordering::Acquire),
            own: VecDeque::new(),
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
        let force = forced(shared.force_shutdown.clone());
        tokio::pin!(force);
        loop {
            let ev = tokio::select! {
                biased;
                ev = poll_fn(|cx| self.poll_io(cx)) => ev,
                _ = &mut force => {
                    self.fatal_to_client(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command: keyshift is shutting down").await;
                    break;
                }
            };
            match ev {
                Event::Hold => {
                    tokio::select! {
                        _ = shared.gate.wait_open() => {}
                        _ = &mut force => {
                            self.fatal_to_client(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command: keyshift is shutting down").await;
                            break;
                        }
                    }
                    self.held = false;
                }
                Event::ClientEof | Event::ClientTerminated => break,
                Event::ServerEof => {
                    // PostgreSQL usually says why before it closes (FATAL ErrorResponse):
                    // make sure the client gets it.
                    self.flush_to_client().await;
                    break;
                }
                Event::ClientProtocol(e) => {
                    debug!(session = self.info.id, error = %e, "client protocol violation");
                    shared
                        .metrics
                        .protocol_errors
                        .with_label_values(&["client"])
                        .inc();
                    self.fatal_to_client(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("invalid message from client: {e}"),
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
                    self.fatal_to_client(
                        sqlstate::CONNECTION_FAILURE,
                        "connection to PostgreSQL lost",
                    )
                    .await;
                    break;
                }
            }
        }
        self.counters.flush(&shared.metrics);
    }

    fn state_after_ready(&self) -> SessionState {
        if self.status == b'I' {
            SessionState::Idle
        } else {
            SessionState::IdleInTransaction
        }
    }

    /// Waiting for the client with nothing in flight: the moment the gate applies.
    #[inline]
    fn waiting_for_client(&self) -> bool {
        self.pending_z == 0 && !self.open_seq
    }

    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
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
            if self.terminating && self.c_out.is_empty() && !self.server_dirty {
                return Poll::Ready(Event::ClientTerminated);
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
            if self.s_out.is_empty() {
                match poll_read(&mut self.server, cx, &mut self.s_in) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerEof),
                    Poll::Ready(Ok(_)) => {
                        if let Err(e) = self.scan_server() {
                            return Poll::Ready(Event::ServerProtocol(e));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerIo(e)),
                    Poll::Pending => {}
                }
            }

            // Client → server: bytes held at the gate are scanned first, then more are read.
            if self.c_out.is_empty() && !self.held && !self.terminating {
                if !self.c_in.is_empty() && self.c_scan.at_boundary() && self.waiting_for_client() {
                    // Data left from before a hold, or a partial message: scan it again.
                    match self.scan_client() {
                        Ok(Some(ev)) => return Poll::Ready(ev),
                        Ok(None) => {}
                        Err(e) => return Poll::Ready(Event::ClientProtocol(e)),
                    }
                    if !self.c_out.is_empty() {
                        continue;
                    }
                }
                match poll_read(&mut self.client, cx, &mut self.c_in) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientEof),
                    Poll::Ready(Ok(_)) => {
                        match self.scan_client() {
                            Ok(Some(ev)) => return Poll::Ready(ev),
                            Ok(None) => {}
                            Err(e) => return Poll::Ready(Event::ClientProtocol(e)),
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientIo(e)),
                    Poll::Pending => {}
                }
            }

            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Scans client bytes into `c_out`, applying the gate at the first message after a
    /// ReadyForQuery and, when a rewriter is active, handing it the SQL of Query and Parse.
    fn scan_client(&mut self) -> Result<Option<Event>, FrameError> {
        let max = self.shared.cfg.max_message_bytes;
        let mut rewriter = self.shared.rewriter.load();
        let mut fwd = 0;
        let mut event = None;
        loop {
            if self.c_in.len() == fwd {
                break;
            }
            if self.c_scan.at_boundary() && self.waiting_for_client() {
                if self.status == b'I' {
                    if !self.shared.gate.admit(&self.info) {
                        self.held = true;
                        event = Some(Event::Hold);
                        break;
                    }
                    // Read the rules only once admitted: the control link puts new rules in
                    // force before it opens the gate, so a statement admitted after a cutover
                    // can never be rewritten under the rules from before it (the gate's
                    // SeqCst operations order the two).
                    rewriter = self.shared.rewriter.load();
                    let version = self.shared.rules_version.load(Ordering::Acquire);
                    let rules_changed = version != self.rules_seen;
                    if rules_changed {
                        self.rules_seen = version;
                        self.stmts.retire_all();
                    }
                    if (rules_changed && !self.prepared.is_empty()) || self.stmts.has_closes() {
                        move_prefix(&mut self.c_in, &mut self.c_out, fwd);
                        fwd = 0;
                        self.own_sequence(rules_changed);
                    }
                } else {
                    self.shared.gate.set_state(&self.info, SessionState::Active);
                }
            }
            let rewriting = rewriter
                .as_ref()
                .is_some_and(|r| r.applies_to(&self.info.database));
            // Linked to a migration but no rules yet: named statements are tracked (not
            // rewritten) so that they are prepared again, rewritten, once rules arrive.
            let tracking =
                !rewriting && rewriter.is_none() && self.shared.cfg.database_url.is_some();
            // keyshift's own statements: Bind and Describe of the unnamed statement are pointed
            // at them, and whatever ends the unnamed statement must be seen.
            let aliasing = self.stmts.alias().is_some();
            let stmts_active = self.stmts.active();
            let want = |t: u8| {
                t == b'X'
                    || ((rewriting || stmts_active) && matches!(t, b'Q' | b'P' | b'C'))
                    || (tracking && matches!(t, b'P' | b'C'))
                    || (aliasing && matches!(t, b'B' | b'D'))
            };
            let rest = &self.c_in[fwd..];
            match self.c_scan.next(rest, max, want)? {
                Scan::NeedMore => break,
                Scan::Forward { n } => fwd += n,
                Scan::Message { tag, len, inspect } => {
                    if !is_frontend_tag(tag) {
                        return Err(FrameError::BadTag(tag));
                    }
                    self.counters.client_message(tag);
                    match tag {
                        b'Q' | b'F' => self.pending_z += 1,
                        b'S' => {
                            self.pending_z += 1;
                            self.open_seq = false;
                        }
                        b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.open_seq = true,
                        _ => {}
                    }
                    if !inspect {
                        continue;
                    }
                    if tag == b'X' {
                        // Terminate: forward it, then close once it is written.
                        fwd += len;
                        self.terminating = true;
                        break;
                    }
                    let msg = &rest[..len];
                    let replacement = if matches!(tag, b'B' | b'D') {
                        // Only inspected while the unnamed statement is keyshift's.
                        self.stmts
                            .alias()
                            .and_then(|a| server_statements::rename_unnamed(msg, a))
                    } else {
                        observe_for_statements(&mut self.stmts, msg);
                        // ReadyForQuery messages owed before the one this statement's
                        // sequence ends with (a Query's own was counted above).
                        let ready_before = self.pending_z - u32::from(tag == b'Q');
                        match rewriter.as_ref().filter(|_| rewriting) {
                            Some(rw) => {
                                let mut refusal =
                                    Refusal::new(self.next_refusal, "".into(), ready_before);
                                let mut unnamed = Unnamed {
                                    stmts: &mut self.stmts,
                                    failed_tx: self.status == b'E',
                                    open_seq: self.open_seq,
                                    counters: &mut self.counters,
                                    prepare: None,
                                };
                                let r = rewrite_message(
                                    &mut self.prepared,
                                    &*rw.rewriter,
                                    msg,
                                    &mut refusal,
                                    &mut unnamed,
                                );
                                if let Some(p) = unnamed.prepare {
                                    // Its answer follows the Query's own ReadyForQuery.
                                    self.own.push_back(OwnSequence {
                                        after: self.pending_z,
                                        prepare: Some(p),
                                        error: None,
                                    });
                                }
                                if !refusal.message.is_empty() {
                                    self.next_refusal += 1;
                                    self.refusals.push_back(refusal);
                                }
                                r
                            }
                            None => {
                                if tracking {
                                    track_message(&mut self.prepared, msg);
                                }
                                None
                            }
                        }
                    };
                    match replacement {
                        None => fwd += len,
                        Some(new) => {
                            self.counters.client_bytes(fwd);
                            move_prefix(&mut self.c_in, &mut self.c_out, fwd);
                            fwd = 0;
                            self.c_out.extend_from_slice(&new);
                            self.c_in.advance(len);
                        }
                    }
                }
            }
        }
        self.counters.client_bytes(fwd);
        move_prefix(&mut self.c_in, &mut self.c_out, fwd);
        Ok(event)
    }

    /// A sequence of keyshift's own, sent while the session is idle, before the client's next
    /// message; its answers are swallowed (`own`). It closes the statements
    /// keyshift prepared and no longer uses, and, when the rules changed (expand, cutover,
    /// rollback, finalize), prepares again every tracked named statement whose text under the
    /// new rules differs from the one the server has, from the client's original SQL.
    /// PostgreSQL would otherwise go on running the old text: without the twins' columns when
    /// the statement was prepared before expand, or naming columns the cutover renamed.
    fn own_sequence(&mut self, rules_changed: bool) {
        let closes = self.stmts.take_closes();
        for name in &closes {
            close_statement(&mut self.c_out, name);
        }
        let changed = if rules_changed {
            let rw = self.shared.rewriter.load();
            let active = rw.as_ref().filter(|r| r.applies_to(&self.info.database));
            self.prepared
                .changed(|sql| match active.map(|r| r.rewriter.rewrite(sql)) {
                    Some(Decision::Replace(s)) => Some(s.to_string()),
                    _ => None,
                })
        } else {
            Vec::new()
        };
        if changed.is_empty() && closes.is_empty() {
            return;
        }
        let n = changed.len();
        for r in &changed {
            close_statement(&mut self.c_out, &r.name);
            let m = statements::SqlMessage {
                tag: b'P',
                name: &r.name,
                sql: r.sql.as_bytes(),
                rest: &r.rest,
            };
            statements::rebuild(&m, &r.text, &mut self.c_out);
        }
        self.c_out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        self.own.push_back(OwnSequence {
            after: self.pending_z,
            prepare: None,
            error: None,
        });
        debug!(
            session = self.info.id,
            statements = n,
            closed = closes.len(),
            "re-preparing rewritten statements under new rules, closing keyshift's own"
        );
    }

    /// Scans server bytes into `s_out`, tracking ReadyForQuery, and putting keyshift's own
    /// error in place of PostgreSQL's answer to a refusal marker.
    fn scan_server(&mut self) -> Result<(), FrameError> {
        let mut fwd = 0;
        loop {
            let refusing = !self.refusals.is_empty();
            let awaiting = self.stmts.awaiting();
            let swallowing = self.own.front().is_some_and(|o| o.after == 0);
            let rest = &self.s_in[fwd..];
            match self.s_scan.next(rest, MAX_SERVER_MESSAGE, |t| {
                t == b'Z' || ((refusing || awaiting) && t == b'E') || swallowing
            })? {
                Scan::NeedMore => break,
                Scan::Forward { n } => fwd += n,
                Scan::Message { tag, len, inspect } => {
                    self.counters.server_message(tag);
                    if !inspect {
                        continue;
                    }
                    if swallowing && !matches!(tag, b'A' | b'N' | b'S') {
                        // An answer to keyshift's own sequence; notifications, notices and
                        // parameter changes still belong to the client.
                        if tag == b'E'
                            && let Some(o) = self.own.front_mut()
                        {
                            o.error = Some(
                                statements::error_field(&rest[..len], b'C')
                                    .unwrap_or_default()
                                    .into(),
                            );
                            if o.prepare.is_none() {
                                warn!(
                                    session = self.info.id,
                                    "re-preparing a statement under the new rules failed; the client will see an error when it uses it"
                                );
                            }
                        }
                        if tag == b'Z'
                            && let Some(o) = self.own.pop_front()
                            && let Some(p) = o.prepare
                        {
                            self.stmts.query_prepared(p, o.error.as_deref());
                        }
                        self.counters.server_bytes(fwd);
                        move_prefix(&mut self.s_in, &mut self.s_out, fwd);
                        fwd = 0;
                        self.s_in.advance(len);
                        continue;
                    }
                    if tag == b'E' {
                        if awaiting {
                            self.stmts.server_error();
                        }
                        let ours = self.refusals.front().filter(|r| {
                            r.ready_before == 0
                                && statements::error_message(&rest[..len]).is_some_and(|m| {
                                    m.windows(r.marker.len()).any(|w| w == r.marker.as_bytes())
                                })
                        });
                        match ours {
                            Some(r) => {
                                let err = messages::error(
                                    sqlstate::FEATURE_NOT_SUPPORTED,
                                    &r.message,
                                    Some(
                                        "keyshift runs with strict = true; see docs/limitations.md",
                                    ),
                                );
                                self.refusals.pop_front();
                                self.counters.server_bytes(fwd);
                                move_prefix(&mut self.s_in, &mut self.s_out, fwd);
                                fwd = 0;
                                self.s_out.extend_from_slice(&err);
                                self.s_in.advance(len);
                            }
                            None => fwd += len,
                        }
                        continue;
                    }
                    // ReadyForQuery: tag, length 5, status.
                    if len != 6 {
                        return Err(FrameError::Malformed("ReadyForQuery"));
                    }
                    self.status = rest[5];
                    self.pending_z = self.pending_z.saturating_sub(1);
                    self.stmts.server_ready();
                    for o in &mut self.own {
                        o.after = o.after.saturating_sub(1);
                    }
                    fwd += len;
                    if refusing {
                        // A refusal whose sequence just ended without its error (an earlier
                        // error made PostgreSQL skip it) is dropped; the others move closer.
                        self.refusals.retain_mut(|r| {
                            let keep = r.ready_before > 0;
                            r.ready_before = r.ready_before.saturating_sub(1);
                            keep
                        });
                    }
                    if self.waiting_for_client() {
                        let st = self.state_after_ready();
                        self.shared.gate.set_state(&self.info, st);
                        self.counters.flush_if_due(&self.shared.metrics);
                    }
                }
            }
        }
        self.counters.server_bytes(fwd);
        move_prefix(&mut self.s_in, &mut self.s_out, fwd);
        Ok(())
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
        if !self.s_scan.at_boundary() {
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

/// A sequence keyshift sent on its own behalf.
struct OwnSequence {
    /// The client's ReadyForQuery messages due before this sequence's own.
    after: u32,
    /// A PREPARE of a Query shape, reported to `stmts` when it ends.
    prepare: Option<PendingPrepare>,
    /// The SQLSTATE of the error it met, if any.
    error: Option<Box<[u8]>>,
}

/// What an unnamed Parse or a simple Query needs beyond the rewriter: the session's own
/// statements (src/proxy/server_statements.rs).
struct Unnamed<'a> {
    stmts: &'a mut ServerStatements,
    /// The session is in a failed transaction (the Parse must reach PostgreSQL as it is).
    failed_tx: bool,
    /// An extended-protocol sequence is open (a Query in its middle is left alone).
    open_seq: bool,
    counters: &'a mut SessionCounters,
    /// Set when a PREPARE of keyshift's was appended after the Query.
    prepare: Option<PendingPrepare>,
}

/// The message to send instead of `msg` (a whole Query, Parse or Close), if any.
/// A refused statement is replaced by `refusal.marker`, and `refusal.message` is filled in.
/// A rewritten unnamed Parse may become a named Parse of keyshift's, or an empty one when that
/// statement is already prepared (src/proxy/server_statements.rs).
fn rewrite_message(
    prepared: &mut Prepared,
    rw: &dyn statements::StatementRewriter,
    msg: &[u8],
    refusal: &mut Refusal,
    unnamed: &mut Unnamed<'_>,
) -> Option<BytesMut> {
    if msg[0] == b'C' {
        // Close of a statement: forget it.
        if msg.get(5) == Some(&b'S') {
            let name = &msg[6..msg.len().saturating_sub(1)];
            prepared.forget(name);
        }
        return None;
    }
    let m = statements::split(msg)?;
    // Only valid UTF-8 is rewritten; anything else passes exactly as it came.
    let sql = std::str::from_utf8(m.sql).ok()?;
    let (decision, template) = if m.tag == b'Q' {
        rw.rewrite_query(sql)
    } else {
        (rw.rewrite(sql), None)
    };
    if let (Decision::Replace(new), Some(t)) = (&decision, template) {
        let quiet = !unnamed.failed_tx && !unnamed.open_seq && refusal.ready_before == 0;
        let mut out = BytesMut::new();
        match unnamed.stmts.query(&t.template, quiet) {
            QueryAction::Forward => statements::rebuild(&m, new, &mut out),
            QueryAction::Execute(name) => {
                unnamed.counters.statements_reused += 1;
                let name = String::from_utf8_lossy(&name);
                statements::rebuild(&m, &format!("EXECUTE {name}({})", t.args), &mut out);
            }
            QueryAction::Prepare(p) => {
                unnamed.counters.statements_prepared += 1;
                statements::rebuild(&m, new, &mut out);
                let name = String::from_utf8_lossy(&p.name);
                let prepare = format!("PREPARE {name} AS {}", p.template);
                statements::rebuild(&m, &prepare, &mut out);
                unnamed.prepare = Some(p);
            }
        }
        return Some(out);
    }
    let new_sql = match decision {
        Decision::Forward => {
            if m.tag == b'P' {
                // Untouched under these rules, maybe not under the next ones (cutover).
                prepared.remember(m.name, sql, m.rest, None);
            }
            return None;
        }
        Decision::Replace(new) if m.tag == b'P' && m.name.is_empty() => {
            let quiet = !unnamed.failed_tx && refusal.ready_before == 0;
            let action = unnamed.stmts.unnamed_parse(&new, m.rest, quiet);
            let mut out = BytesMut::with_capacity(new.len() + 32);
            match action {
                ParseAction::Forward => statements::rebuild(&m, &new, &mut out),
                ParseAction::Prepare(name) => {
                    unnamed.counters.statements_prepared += 1;
                    let named = statements::SqlMessage { name: &name, ..m };
                    statements::rebuild(&named, &new, &mut out);
                }
                ParseAction::Reuse(_) => {
                    unnamed.counters.statements_reused += 1;
                    // Parse("", "") with no parameter types: PostgreSQL answers
                    // ParseComplete without planning anything.
                    out.extend_from_slice(&[b'P', 0, 0, 0, 8, 0, 0, 0, 0]);
                }
            }
            return Some(out);
        }
        Decision::Replace(new) => new.to_string(),
        Decision::Refuse(message) => {
            refusal.message = message;
            prepared.forget(m.name);
            refusal.marker.clone()
        }
    };
    if m.tag == b'P' && refusal.message.is_empty() {
        prepared.remember(m.name, sql, m.rest, Some(&new_sql));
    }
    let mut out = BytesMut::with_capacity(new_sql.len() + 16);
    statements::rebuild(&m, &new_sql, &mut out);
    Some(out)
}

/// Ends the client's unnamed statement as PostgreSQL would (a simple Query, an unnamed Parse,
/// a Close of it), and forgets keyshift's statements when the client's SQL may have dropped them.
fn observe_for_statements(stmts: &mut ServerStatements, msg: &[u8]) {
    if !stmts.active() {
        return;
    }
    match msg[0] {
        b'C' if msg.get(5..7) == Some(&b"S\0"[..]) => stmts.end_alias(),
        b'Q' | b'P' => {
            let Some(m) = statements::split(msg) else {
                return;
            };
            if m.tag == b'Q' || m.name.is_empty() {
                stmts.end_alias();
            }
            if server_statements::may_drop_statements(m.sql) {
                stmts.forget_all();
            }
        }
        _ => {}
    }
}

/// Appends a Close of the prepared statement `name`.
fn close_statement(out: &mut BytesMut, name: &[u8]) {
    let len = 4 + 1 + name.len() + 1;
    out.reserve(1 + len);
    out.extend_from_slice(b"C");
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(b"S");
    out.extend_from_slice(name);
    out.extend_from_slice(&[0]);
}

/// Before any rule exists: remembers a named Parse as it is (Close forgets it).
fn track_message(prepared: &mut Prepared, msg: &[u8]) {
    if msg[0] == b'C' {
        if msg.get(5) == Some(&b'S') {
            prepared.forget(&msg[6..msg.len().saturating_sub(1)]);
        }
        return;
    }
    if let Some(m) = statements::split(msg)
        && m.tag == b'P'
        && let Ok(sql) = std::str::from_utf8(m.sql)
    {
        prepared.remember(m.name, sql, m.rest, None);
    }
}

/// Completes when the proxy orders every session closed.
async fn forced(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|f| *f).await;
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
fn poll_read(s: &mut Stream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
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
