//! What a session still expects from PostgreSQL: one queue of the messages sent to the
//! server that it has not finished answering, following PostgreSQL's own rules, with no I/O.
//!
//! The relay tells the queue every message it forwards (the client's, keyshift's own) with
//! [`Replies::sent`], and the tag of every message the server sends with [`Replies::server`],
//! which says whose it is: the client's (forward it), keyshift's (drop it). From the same
//! bookkeeping come the session's idleness (for the pause gate) and the outcome of each
//! message that carries a token (did PostgreSQL complete it, refuse it, or skip it).
//!
//! PostgreSQL's rules (src/backend/tcop/postgres.c, `PostgresMain` and `SocketBackend`;
//! src/backend/commands/copyfromparse.c, `CopyGetData`):
//! - Query and FunctionCall end with ReadyForQuery, error or not; so does Sync.
//! - Parse, Bind, Describe, Execute, Close answer one message each (`1`, `2`, `T`/`n`
//!   after an optional `t`, `C`/`I`/`s` after rows, `3`); an ErrorResponse instead makes
//!   PostgreSQL discard every message up to the next Sync, Query and FunctionCall included:
//!   they get no answer at all.
//! - Flush and CopyData never get an answer; CopyDone and CopyFail get none outside COPY.
//! - In COPY FROM STDIN (after `G`), Sync and Flush are ignored, CopyDone ends the COPY
//!   (`C`), and CopyFail or any other message fails it (`E`). A COPY started by Execute
//!   then skips to Sync like any extended-protocol error.
//!
//! So Flush and CopyData are never queued: nothing ever answers them. Where the stream alone
//! cannot say what PostgreSQL did (a Sync sent between CopyData messages of a COPY that fails
//! half-way: was it read before or after the error?) the queue assumes the COPY read it, and a
//! ReadyForQuery nobody waits for still goes to the client: the queue can be surprised, it
//! never stalls waiting for an answer PostgreSQL will not send.
//!
//! The other way round (the COPY failed before it read that Sync, which then got its own
//! ReadyForQuery), a ReadyForQuery comes before any answer to the Query or FunctionCall at
//! the front. Those always get an answer first, so it is not theirs: it goes to the client
//! and ends nothing.

use std::collections::VecDeque;

use super::wire::tag::backend as b;

/// A message sent to PostgreSQL, as far as its answers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    FunctionCall,
    CopyDone,
    CopyFail,
    /// An extended-protocol message PostgreSQL will refuse whatever the state (a Flush with
    /// a body): an ErrorResponse, then skip to Sync.
    Refused,
}

impl Kind {
    /// Ends with a ReadyForQuery of its own.
    fn ends_with_ready(self) -> bool {
        matches!(self, Kind::Query | Kind::FunctionCall | Kind::Sync)
    }

    /// An error in it makes PostgreSQL skip to the next Sync.
    fn is_extended(self) -> bool {
        matches!(
            self,
            Kind::Parse | Kind::Bind | Kind::Describe | Kind::Execute | Kind::Close | Kind::Refused
        )
    }
}

/// Whose answers these are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Client,
    /// keyshift's own message: its answers are dropped.
    Own,
    /// keyshift's own message sent in place of what the client's next message implies
    /// (restoring the unnamed statement): its answers are dropped, but an error goes to the
    /// client, which would have got the same one from its own message.
    OwnErrorsToClient,
}

/// Where a server message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Client,
    Drop,
}

/// How PostgreSQL finished a message that carried a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// An ErrorResponse answered it.
    Failed,
    /// PostgreSQL discarded it (skipping to Sync after an earlier error).
    Skipped,
}

#[derive(Debug)]
struct Entry<T> {
    kind: Kind,
    owner: Owner,
    /// A CopyData went after this message and before the next one queued (see `end_copy`).
    data_after: bool,
    token: Option<T>,
}

/// The queue. `T` is what the relay attaches to a message to learn its outcome.
#[derive(Debug)]
pub struct Replies<T> {
    queue: VecDeque<Entry<T>>,
    /// Messages in the queue that end with ReadyForQuery.
    readies: usize,
    /// Messages in the queue that are keyshift's own: while there are none, every server
    /// message is the client's and `route` looks at nothing else (the hot path).
    own: usize,
    /// CopyDone and CopyFail messages in the queue: while there are none and PostgreSQL is not
    /// skipping to Sync, `settle` has nothing to drop.
    strays: usize,
    /// PostgreSQL discards messages until the next Sync.
    skipping: bool,
    /// The message at the front started a COPY FROM STDIN.
    copy_in: bool,
    /// The message at the front (Query, FunctionCall, Sync) met an error; its ReadyForQuery
    /// is still to come.
    front_failed: bool,
    /// The message at the front got some answer already. A Query or FunctionCall always
    /// gets one before its ReadyForQuery (CommandComplete, EmptyQueryResponse, an error, a
    /// COPY's start, FunctionCallResponse), so a ReadyForQuery before any is not its own: it
    /// answers a Sync the queue took as read by a COPY that had in fact failed before it.
    front_answered: bool,
    /// An extended-protocol message was sent since the last Sync.
    open: bool,
    outcomes: Vec<(T, Outcome)>,
    /// Server messages the queue did not expect (forwarded to the client all the same).
    pub surprises: u64,
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Replies {
            queue: VecDeque::new(),
            readies: 0,
            own: 0,
            strays: 0,
            skipping: false,
            copy_in: false,
            front_failed: false,
            front_answered: false,
            open: false,
            outcomes: Vec::new(),
            surprises: 0,
        }
    }
}

impl<T> Replies<T> {
    /// PostgreSQL is in a COPY FROM STDIN and the client has not ended it yet: the next
    /// client message is read by the COPY.
    pub fn reads_copy_data(&self) -> bool {
        self.copy_in && self.strays == 0
    }

    /// PostgreSQL discards what comes until the next Sync (after an error).
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// Nothing sent is unanswered and no extended-protocol sequence is open: the session
    /// waits for its client, and a pause may hold it.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && !self.open
    }

    /// Messages sent and not yet answered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The token of the message PostgreSQL is answering now, if it has one.
    pub fn front_token(&self) -> Option<&T> {
        self.queue.front().and_then(|e| e.token.as_ref())
    }

    /// Some message with a token has finished.
    pub fn has_outcomes(&self) -> bool {
        !self.outcomes.is_empty()
    }

    /// Outcomes of messages with tokens, in the order PostgreSQL finished them.
    pub fn take_outcomes(&mut self) -> std::vec::Drain<'_, (T, Outcome)> {
        self.outcomes.drain(..)
    }

    /// A client message that gets no answer and is not queued (Flush, CopyData).
    pub fn sent_unanswered(&mut self, extended: bool) {
        if extended {
            self.open = true;
        }
    }

    /// A CopyData, which gets no answer and is not queued either; where it went among the
    /// queued messages decides which Syncs a failed COPY read (`end_copy`).
    #[inline]
    pub fn sent_copy_data(&mut self) {
        if let Some(e) = self.queue.back_mut() {
            e.data_after = true;
        }
    }

    /// A message forwarded to PostgreSQL, in the order it was written.
    #[inline]
    pub fn sent(&mut self, kind: Kind, owner: Owner, token: Option<T>) {
        match kind {
            Kind::Sync => self.open = false,
            k if k.is_extended() => self.open = true,
            _ => {}
        }
        self.readies += usize::from(kind.ends_with_ready());
        self.own += usize::from(owner != Owner::Client);
        self.strays += usize::from(matches!(kind, Kind::CopyDone | Kind::CopyFail));
        self.queue.push_back(Entry {
            kind,
            owner,
            data_after: false,
            token,
        });
        self.settle();
    }

    /// Where the server message with this tag goes, without changing anything.
    #[inline]
    pub fn route(&self, tag: u8) -> Route {
        if self.own == 0 {
            return Route::Client;
        }
        if matches!(
            tag,
            b::NOTICE_RESPONSE | b::NOTIFICATION_RESPONSE | b::PARAMETER_STATUS
        ) {
            // Asynchronous: they belong to the session, whoever's statement runs.
            return Route::Client;
        }
        let entry = if tag == b::READY_FOR_QUERY {
            if self.stray_ready(self.skipping) {
                return Route::Client;
            }
            self.queue.iter().find(|e| e.kind.ends_with_ready())
        } else {
            self.queue.front()
        };
        match entry.map(|e| e.owner) {
            None | Some(Owner::Client) => Route::Client,
            Some(Owner::OwnErrorsToClient) if tag == b::ERROR_RESPONSE => Route::Client,
            Some(Owner::Own | Owner::OwnErrorsToClient) => Route::Drop,
        }
    }

    /// The server sent a message with this tag; returns where it goes (as [`Self::route`]).
    /// `sqlstate` is the SQLSTATE of an ErrorResponse (empty for other messages).
    #[inline]
    pub fn server(&mut self, tag: u8, sqlstate: &[u8]) -> Route {
        if self.own == 0
            && let Some(front) = self.queue.front()
            && (tag == b::DATA_ROW
                || (front.kind == Kind::Query
                    && !self.copy_in
                    && matches!(tag, b::ROW_DESCRIPTION | b::COMMAND_COMPLETE)))
        {
            // The bulk of any result, the client's: it settles nothing. (Measured: keeping
            // this path free of the rest cut the queue's cost per transaction by a third.)
            self.front_answered = true;
            return Route::Client;
        }
        self.server_answer(tag, sqlstate)
    }

    #[inline(never)]
    fn server_answer(&mut self, tag: u8, sqlstate: &[u8]) -> Route {
        let route = self.route(tag);
        match tag {
            b::NOTICE_RESPONSE | b::NOTIFICATION_RESPONSE | b::PARAMETER_STATUS => return route,
            b::READY_FOR_QUERY => self.ready(),
            b::ERROR_RESPONSE => self.error(sqlstate),
            _ => self.answer(tag),
        }
        self.settle();
        route
    }

    /// A ReadyForQuery now cannot be the front's: see `front_answered`. Nor can it follow an
    /// extended message at the front that PostgreSQL, not skipping, has not answered yet: it
    /// answers each before any ReadyForQuery (a Sync taken as read by a failed COPY, with a
    /// CopyDone behind it and a Describe after: fuzz seed 10702, case 55).
    fn stray_ready(&self, was_skipping: bool) -> bool {
        !self.front_answered
            && !self.front_failed
            && self.queue.front().is_some_and(|f| match f.kind {
                Kind::Query | Kind::FunctionCall => true,
                k => !was_skipping && k.is_extended(),
            })
    }

    fn ready(&mut self) {
        let was_skipping = std::mem::take(&mut self.skipping);
        self.copy_in = false;
        if self.readies == 0 || self.stray_ready(was_skipping) {
            // Nobody waits for it (see the module comment): it is the client's.
            self.surprises += 1;
            return;
        }
        // Normally the front itself; anything before it that PostgreSQL did not answer is
        // dropped with it.
        while let Some(e) = self.pop_front() {
            if e.kind.ends_with_ready() {
                let outcome = if std::mem::take(&mut self.front_failed) {
                    Outcome::Failed
                } else {
                    Outcome::Done
                };
                self.finish(e, outcome);
                return;
            }
            self.surprises += 1;
            self.finish(e, Outcome::Skipped);
        }
    }

    fn error(&mut self, sqlstate: &[u8]) {
        let protocol_violation = sqlstate == b"08P01";
        if self.copy_in {
            // 57014: the client's CopyFail (or a cancel) ended the COPY, not a row.
            self.end_copy(false, protocol_violation, sqlstate == b"57014");
        }
        let Some(front) = self.queue.front() else {
            // A FATAL on its own (shutdown, terminated backend): the client's.
            return;
        };
        if front.kind.ends_with_ready() {
            self.front_failed = true;
            self.front_answered = true;
        } else if let Some(e) = self.pop_front() {
            let extended = e.kind.is_extended();
            self.finish(e, Outcome::Failed);
            // CopyDone and CopyFail out of place are never answered, so never the front here.
            self.skipping = extended;
        }
    }

    fn answer(&mut self, tag: u8) {
        let Some(front) = self.queue.front() else {
            self.surprises += 1;
            return;
        };
        self.front_answered = true;
        let done = match (front.kind, tag) {
            (Kind::Parse, b::PARSE_COMPLETE)
            | (Kind::Bind, b::BIND_COMPLETE)
            | (Kind::Close, b::CLOSE_COMPLETE)
            | (Kind::Describe, b::ROW_DESCRIPTION | b::NO_DATA)
            | (Kind::Execute, b::EMPTY_QUERY_RESPONSE | b::PORTAL_SUSPENDED) => true,
            (Kind::Execute, b::COMMAND_COMPLETE) => {
                if self.copy_in {
                    self.end_copy(true, false, false);
                }
                true
            }
            (Kind::Query, b::COMMAND_COMPLETE) => {
                if self.copy_in {
                    self.end_copy(true, false, false);
                }
                false
            }
            (Kind::Query | Kind::Execute, b::COPY_IN_RESPONSE | b::COPY_BOTH_RESPONSE) => {
                self.copy_in = true;
                false
            }
            (Kind::Describe, b::PARAMETER_DESCRIPTION) => false,
            (Kind::Query | Kind::Execute | Kind::FunctionCall, _) => false,
            _ => {
                self.surprises += 1;
                false
            }
        };
        if done && let Some(e) = self.pop_front() {
            self.finish(e, Outcome::Done);
        }
    }

    /// The COPY at the front ended: the messages behind it that it read are answered by its
    /// end. After success that is everything up to its CopyDone (a Sync among them was
    /// ignored). After an error, the Syncs before the first CopyDone or CopyFail, that one
    /// too, and, when the error is a protocol violation (08P01: "unexpected message type
    /// during COPY"), the message that caused it.
    ///
    /// PostgreSQL fails a row when it reads the CopyData holding it, so the Syncs it read
    /// inside the COPY are those sent before the failing CopyData, which the queue cannot
    /// tell apart. Those sent after the last CopyData, with no CopyDone or CopyFail behind
    /// them, it can: PostgreSQL had not read them, and the first ends its skip with a
    /// ReadyForQuery (fuzz seed 10305, case 268: taking it as read, the queue skipped the
    /// messages after it, then waited for a ReadyForQuery that never came, the session
    /// `active` in the gate for ever).
    ///
    /// A Sync read inside the COPY did not end its extended-protocol sequence: unless another
    /// Sync is on its way, the sequence is still open (fuzz seed 10901, case 95: taken as
    /// ended, the session looked idle while PostgreSQL still skipped to Sync, and keyshift's
    /// own Close and Sync, sent at the next admission, ended that skip early).
    fn end_copy(&mut self, success: bool, protocol_violation: bool, canceled: bool) {
        self.copy_in = false;
        let extended = self.queue.front().is_some_and(|e| e.kind.is_extended());
        let mut read_syncs = usize::MAX;
        // A protocol violation is the message after the Syncs: PostgreSQL read them all.
        if !success && !protocol_violation {
            let mut unread_from = None;
            for (i, e) in self.queue.iter().enumerate().skip(1) {
                match e.kind {
                    Kind::Sync if e.data_after => unread_from = None,
                    Kind::Sync => {
                        unread_from.get_or_insert(i - 1);
                    }
                    // A row failed, so not at this CopyFail: the Syncs before it are after
                    // the failing data all the same (fuzz seed 10303, case 465).
                    Kind::CopyFail if !canceled => break,
                    // The last row may fail at the CopyDone (an incomplete last line).
                    Kind::CopyDone | Kind::CopyFail => {
                        unread_from = None;
                        break;
                    }
                    _ => break,
                }
            }
            read_syncs = unread_from.unwrap_or(usize::MAX);
        }
        while let Some(e) = self.queue.get(1) {
            let (take, last) = match e.kind {
                Kind::CopyDone | Kind::CopyFail => (true, true),
                Kind::Sync if read_syncs == 0 => return,
                Kind::Sync => {
                    read_syncs -= 1;
                    (true, false)
                }
                _ if success => (true, false),
                _ => (protocol_violation, true),
            };
            if !take {
                return;
            }
            if let Some(e) = self.remove(1) {
                if e.kind == Kind::Sync && extended {
                    self.open = !self.queue.iter().any(|e| e.kind == Kind::Sync);
                }
                self.finish(e, Outcome::Done);
            }
            if last {
                return;
            }
        }
    }

    /// Drops from the front what PostgreSQL will not answer: everything but Sync while it
    /// skips to Sync, a stray CopyDone or CopyFail otherwise.
    #[inline(always)]
    fn settle(&mut self) {
        if self.skipping || self.strays != 0 {
            self.settle_drops();
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_drops(&mut self) {
        while let Some(front) = self.queue.front() {
            if self.copy_in {
                return;
            }
            let drop = if self.skipping {
                front.kind != Kind::Sync
            } else {
                matches!(front.kind, Kind::CopyDone | Kind::CopyFail)
            };
            if !drop {
                return;
            }
            if let Some(e) = self.pop_front() {
                let outcome = if self.skipping {
                    Outcome::Skipped
                } else {
                    Outcome::Done
                };
                self.finish(e, outcome);
            }
        }
    }

    fn pop_front(&mut self) -> Option<Entry<T>> {
        let e = self.queue.pop_front()?;
        self.front_answered = false;
        self.forget(&e);
        Some(e)
    }

    fn remove(&mut self, i: usize) -> Option<Entry<T>> {
        let e = self.queue.remove(i)?;
        self.forget(&e);
        Some(e)
    }

    /// Keeps the counts right for an entry leaving the queue.
    fn forget(&mut self, e: &Entry<T>) {
        self.readies -= usize::from(e.kind.ends_with_ready());
        self.own -= usize::from(e.owner != Owner::Client);
        self.strays -= usize::from(matches!(e.kind, Kind::CopyDone | Kind::CopyFail));
    }

    fn finish(&mut self, e: Entry<T>, outcome: Outcome) {
        if let Some(t) = e.token {
            self.outcomes.push((t, outcome));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kind::*;
    use super::*;

    type R = Replies<u32>;

    fn client(r: &mut R, kinds: &[Kind]) {
        for &k in kinds {
            r.sent(k, Owner::Client, None);
        }
    }

    /// Feeds server tags; returns the routes.
    fn server(r: &mut R, tags: &[u8]) -> Vec<Route> {
        tags.iter().map(|&t| r.server(t, b"")).collect()
    }

    fn outcomes(r: &mut R) -> Vec<(u32, Outcome)> {
        r.take_outcomes().collect()
    }

    #[test]
    fn simple_query_and_extended_sequence() {
        let mut r = R::default();
        assert!(r.idle());
        client(&mut r, &[Query]);
        assert!(!r.idle());
        server(&mut r, b"TDDC");
        assert!(!r.idle());
        server(&mut r, b"Z");
        assert!(r.idle());
        client(&mut r, &[Parse, Bind, Describe, Execute]);
        server(&mut r, b"12TDC");
        // Every answer came, but no Sync yet: an implicit transaction may be open.
        assert!(r.is_empty() && !r.idle());
        client(&mut r, &[Sync]);
        server(&mut r, b"Z");
        assert!(r.idle());
        assert_eq!(r.surprises, 0);
    }

    #[test]
    fn extended_copy_in_ignores_the_sync_sent_before_the_data() {
        // The first case: Parse COPY … FROM STDIN, Bind, Describe, Execute, Sync,
        // then CopyData, CopyDone, Sync. PostgreSQL reads the first Sync inside the COPY.
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Describe, Execute, Sync]);
        server(&mut r, b"12nG");
        r.sent_unanswered(false); // CopyData
        client(&mut r, &[CopyDone, Sync]);
        assert!(!r.idle());
        server(&mut r, b"C");
        assert_eq!(r.len(), 1);
        server(&mut r, b"Z");
        assert!(r.idle());
        assert_eq!(r.surprises, 0);
    }

    #[test]
    fn a_sync_read_inside_an_extended_copy_leaves_its_sequence_open() {
        // Extended COPY, a Sync inside it, a CopyFail, a Query (fuzz seed 10901, case 95):
        // PostgreSQL ignored the Sync and skips the Query; it still waits for a Sync, so the
        // session is not idle.
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Execute, Sync]);
        server(&mut r, b"12G");
        client(&mut r, &[CopyFail, Query]);
        r.server(b'E', b"57014");
        assert_eq!(r.len(), 0, "the Query is skipped");
        assert!(!r.idle(), "the sequence is open until the next Sync");
        client(&mut r, &[Sync]);
        server(&mut r, b"Z");
        assert!(r.idle());
        // The same COPY succeeding: its Execute completes, and the sequence is still open.
        client(&mut r, &[Parse, Bind, Execute, Sync]);
        server(&mut r, b"12G");
        client(&mut r, &[CopyDone]);
        server(&mut r, b"C");
        assert!(!r.idle());
        // A simple COPY's ignored Sync leaves no sequence open.
        let mut r = R::default();
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        client(&mut r, &[Sync, CopyDone]);
        server(&mut r, b"CZ");
        assert!(r.idle());
        assert_eq!(r.surprises, 0);
    }

    #[test]
    fn extended_copy_failing_on_data_skips_to_the_last_sync() {
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Execute, Sync]);
        server(&mut r, b"12G");
        client(&mut r, &[CopyDone, Sync]);
        r.server(b'E', b"22P02");
        assert_eq!(r.len(), 1);
        server(&mut r, b"Z");
        assert!(r.idle());
    }

    #[test]
    fn error_skips_query_and_function_call_until_sync() {
        // The second case: Parse of bad SQL, Bind, Execute, Query `SELECT 1`, Sync.
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Execute, Query, FunctionCall, Sync]);
        assert!(!r.idle());
        r.server(b'E', b"42601");
        assert_eq!(r.len(), 1, "only the Sync is answered");
        server(&mut r, b"Z");
        assert!(r.idle());
    }

    #[test]
    fn copy_data_after_a_failed_copy_is_ignored() {
        let mut r = R::default();
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        client(&mut r, &[CopyFail]);
        r.server(b'E', b"57014");
        server(&mut r, b"Z");
        assert!(r.idle());
        // The client goes on sending data for the COPY that failed: nothing answers it.
        r.sent_unanswered(false);
        client(&mut r, &[CopyDone]);
        assert!(r.idle());
    }

    #[test]
    fn a_sync_after_the_last_copy_data_of_a_failed_copy_ends_the_skip() {
        // Extended COPY, a Sync inside it, a row that fails, a Sync, then a Bind and a Sync
        // (fuzz seed 10305, case 268): PostgreSQL read the first Sync inside the COPY; the
        // second ends its skip, and the Bind after it runs.
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Execute, Sync]);
        server(&mut r, b"12G");
        r.sent_copy_data();
        client(&mut r, &[Sync, Bind, Sync]);
        r.server(b'E', b"22P02");
        server(&mut r, b"Z");
        assert_eq!(r.len(), 2, "the Bind and its Sync are still to answer");
        r.server(b'E', b"26000");
        server(&mut r, b"Z");
        assert!(r.idle());
        // Data after both Syncs: PostgreSQL may have read them inside the COPY, as before.
        client(&mut r, &[Parse, Bind, Execute, Sync]);
        server(&mut r, b"12G");
        client(&mut r, &[Sync]);
        r.sent_copy_data();
        r.server(b'E', b"22P02");
        assert_eq!(r.len(), 0, "both Syncs taken as read by the COPY");
        // Simple COPY, a row that fails, a Sync, a CopyFail (fuzz seed 10303, case 465): a
        // row failed, not the CopyFail, so PostgreSQL reads the Sync after the COPY.
        let mut r = R::default();
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        r.sent_copy_data();
        client(&mut r, &[Sync, CopyFail, Query]);
        r.server(b'E', b"22P04");
        server(&mut r, b"ZZ");
        assert_eq!(r.len(), 1, "the Query is still to answer");
        // Had the CopyFail ended the COPY (57014), the Sync came before it: read inside.
        server(&mut r, b"CZ");
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        r.sent_copy_data();
        client(&mut r, &[Sync, CopyFail, Query]);
        r.server(b'E', b"57014");
        server(&mut r, b"Z");
        assert_eq!(r.len(), 1, "the Query is still to answer");
    }

    #[test]
    fn simple_copy_with_a_stray_message() {
        // A Query during COPY FROM STDIN fails the COPY and is consumed by it (08P01).
        let mut r = R::default();
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        client(&mut r, &[Query]);
        r.server(b'E', b"08P01");
        server(&mut r, b"Z");
        assert!(r.idle());
        // A data error instead: the Query after the COPY is answered on its own.
        client(&mut r, &[Query]);
        server(&mut r, b"G");
        client(&mut r, &[Query]);
        r.server(b'E', b"22P02");
        server(&mut r, b"Z");
        assert!(!r.idle());
        server(&mut r, b"TDCZ");
        assert!(r.idle());
    }

    #[test]
    fn copy_out_and_empty_query() {
        let mut r = R::default();
        client(&mut r, &[Query]);
        server(&mut r, b"HddcCZ");
        assert!(r.idle());
        client(&mut r, &[Query]);
        server(&mut r, b"IZ");
        client(&mut r, &[Parse, Bind, Execute, Execute, Sync]);
        server(&mut r, b"12DsDCZ");
        assert!(r.idle());
        assert_eq!(r.surprises, 0);
    }

    #[test]
    fn own_messages_are_dropped_and_asynchronous_ones_are_not() {
        let mut r = R::default();
        r.sent(Close, Owner::Own, Some(1));
        r.sent(Parse, Owner::Own, Some(2));
        r.sent(Sync, Owner::Own, None);
        client(&mut r, &[Query]);
        assert_eq!(
            server(&mut r, b"3N1AZ"),
            [
                Route::Drop,
                Route::Client,
                Route::Drop,
                Route::Client,
                Route::Drop
            ]
        );
        assert_eq!(outcomes(&mut r), [(1, Outcome::Done), (2, Outcome::Done)]);
        assert_eq!(server(&mut r, b"CZ"), [Route::Client, Route::Client]);
        assert!(r.idle());
    }

    #[test]
    fn a_statement_prepared_behind_an_error_is_skipped_not_done() {
        // The "permanent wrong answer": the error of an earlier message comes back
        // before keyshift's own Parse is sent; PostgreSQL skips that Parse.
        let mut r = R::default();
        client(&mut r, &[Parse, Bind, Execute]);
        r.server(b'E', b"42601");
        r.sent(Parse, Owner::Client, Some(7));
        assert_eq!(outcomes(&mut r), [(7, Outcome::Skipped)]);
        client(&mut r, &[Bind, Execute, Sync]);
        server(&mut r, b"Z");
        assert!(r.idle());
        // The same Parse sent in a fresh sequence completes.
        r.sent(Parse, Owner::Client, Some(8));
        client(&mut r, &[Sync]);
        server(&mut r, b"1Z");
        assert_eq!(outcomes(&mut r), [(8, Outcome::Done)]);
    }

    #[test]
    fn failed_query_and_restoring_parse() {
        let mut r = R::default();
        r.sent(Query, Owner::Client, Some(1));
        r.sent(Query, Owner::Own, Some(2));
        r.server(b'E', b"23505");
        server(&mut r, b"Z");
        assert_eq!(server(&mut r, b"CZ"), [Route::Drop, Route::Drop]);
        assert_eq!(outcomes(&mut r), [(1, Outcome::Failed), (2, Outcome::Done)]);
        // A restoring Parse refused in a failed transaction: its error is the client's.
        r.sent(Parse, Owner::OwnErrorsToClient, Some(3));
        client(&mut r, &[Bind, Execute, Sync]);
        assert_eq!(r.server(b'E', b"25P02"), Route::Client);
        assert_eq!(r.server(b'Z', b""), Route::Client);
        assert!(r.idle());
    }

    #[test]
    fn a_ready_for_query_nobody_waits_for_goes_to_the_client() {
        let mut r = R::default();
        assert_eq!(r.server(b'Z', b""), Route::Client);
        assert_eq!(r.server(b'E', b"57P01"), Route::Client);
        assert_eq!(r.surprises, 1);
        assert!(r.idle());
        // An answer without its message: forwarded, counted, nothing stalls.
        client(&mut r, &[Query]);
        server(&mut r, b"1");
        server(&mut r, b"Z");
        assert!(r.idle());
    }

    #[test]
    fn a_sync_inside_a_copy_that_failed_before_reading_it_gets_its_own_ready() {
        // Found by the protocol fuzzer: `Query COPY … FROM STDIN`, CopyData, Sync, Query. The
        // COPY failed on the data before PostgreSQL read the Sync, which then got its own
        // ReadyForQuery; taken for the next Query's, it ended that Query before its answer,
        // and the Query's error went out without its position mapped back. The Sync came
        // after the last CopyData: the queue knows PostgreSQL had not read it (`end_copy`).
        let mut r = R::default();
        r.sent(Query, Owner::Client, Some(1));
        server(&mut r, b"G");
        r.sent_copy_data();
        r.sent(Sync, Owner::Client, None);
        r.sent(Query, Owner::Client, Some(2));
        r.server(b'E', b"22P04");
        server(&mut r, b"Z");
        assert_eq!(outcomes(&mut r), [(1, Outcome::Failed)]);
        assert_eq!(r.server(b'Z', b""), Route::Client);
        assert_eq!(r.surprises, 0);
        assert_eq!(r.front_token(), Some(&2));
        r.server(b'E', b"22P02");
        server(&mut r, b"Z");
        assert_eq!(outcomes(&mut r), [(2, Outcome::Failed)]);
        assert!(r.idle());
        // Where the COPY did read the Sync (it failed later), nothing changes.
        r.sent(Query, Owner::Client, Some(3));
        server(&mut r, b"G");
        r.sent(Sync, Owner::Client, None);
        r.sent(CopyDone, Owner::Client, None);
        r.sent(Query, Owner::Client, Some(4));
        r.server(b'E', b"22P04");
        server(&mut r, b"ZCZ");
        assert_eq!(outcomes(&mut r), [(3, Outcome::Failed), (4, Outcome::Done)]);
        assert!(r.idle());
    }

    #[test]
    fn a_bad_flush_fails_and_skips() {
        let mut r = R::default();
        client(&mut r, &[Refused, Parse, Sync]);
        r.server(b'E', b"08P01");
        server(&mut r, b"Z");
        assert!(r.idle());
    }
}
