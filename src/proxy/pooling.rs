//! keyshift in front of a connection pooler (`upstream_pooling`, docs/configuration.md).
//!
//! A pooler in transaction mode (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor)
//! gives each transaction of a client connection whichever server connection is free. What
//! keyshift keeps per server session then does not follow the client: a statement it
//! prepared (src/proxy/server_statements.rs) in one transaction is missing in the next
//! (`prepared statement "keyshift_…_q1" does not exist`, 26000), or a name of its own is
//! already taken on the connection it lands on (42P05). So with a transaction pooler
//! ([`Pooling::pooled`]) sessions send every rewritten statement as a text and prepare
//! nothing of their own, and do not prepare the client's named statements again at a rules
//! change (the pooler does not keep those either). A pooler that does keep them
//! (`transaction-prepared`: PgBouncer 1.21 or later with `max_prepared_statements`, which
//! names each client's statements apart on its server connections and prepares them wherever a
//! transaction lands) gets them prepared again at a rules change, as PostgreSQL does: its
//! statements prepared before a cutover would otherwise name the columns the swap renamed.
//!
//! Under `auto` keyshift does not know, and finds out from those very answers. To hide them
//! from the client, it uses its statements only where such an error can be undone
//! ([`Pooling::cautious`]): as the first thing of a sequence, outside a transaction block,
//! with nothing pipelined in front of it. There the error can only have come from keyshift's
//! message; PostgreSQL discarded the rest of the sequence, and the implicit transaction it
//! ran in rolled back. A [`Guard`] keeps, while that sequence runs, what the session would
//! have sent without keyshift's statement; the client's next sequence waits until this one's
//! ReadyForQuery. If the pooler's answer comes, the session drops it (and the ReadyForQuery
//! that ends the sequence) and sends the kept messages instead, so the client gets exactly
//! the answers of the pooler alone; and the whole proxy turns pooled, logged once at `warn`.
//! An error of the client's own in the sequence ends the guard at once: the pooler's answer
//! can no longer come, and PostgreSQL now skips to a Sync the guard must not hold back.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::config::UpstreamPooling;
use crate::metrics::Metrics;

/// Past this many bytes a guarded sequence is not kept: its failure would reach the client.
const MAX_KEPT: usize = 1 << 20;

/// What the proxy knows about its upstream; shared by every session.
#[derive(Debug)]
pub struct Pooling {
    configured: UpstreamPooling,
    detected: AtomicBool,
}

impl Pooling {
    pub fn new(configured: UpstreamPooling, metrics: &Metrics) -> Pooling {
        let p = Pooling {
            configured,
            detected: AtomicBool::new(false),
        };
        metrics.upstream_pooled.set(i64::from(p.pooled()));
        p
    }

    /// Sessions keep nothing of keyshift's on the server past a transaction.
    pub fn pooled(&self) -> bool {
        matches!(
            self.configured,
            UpstreamPooling::Transaction | UpstreamPooling::TransactionPrepared
        ) || self.detected.load(Ordering::Relaxed)
    }

    /// The pooler keeps each client's named prepared statements (under names of its own on
    /// the server), so that a Close and a Parse of the client's name replace the statement for
    /// that client alone: keyshift may prepare them again at a rules change. A pooler found
    /// out by `auto` is not trusted with that: without this, a Close of the client's name could
    /// close another client's statement of that name on a shared server connection.
    pub fn keeps_named(&self) -> bool {
        self.configured == UpstreamPooling::TransactionPrepared
    }

    /// keyshift's own statements are used only where a pooler's answer can be undone.
    pub fn cautious(&self) -> bool {
        self.configured == UpstreamPooling::Auto
    }

    /// The upstream answered as a transaction pooler does; `recovered`: the client did not see
    /// it. Every session turns pooled at its next transaction.
    pub fn detected(&self, metrics: &Metrics, session: u64, recovered: bool) {
        let outcome = if recovered { "recovered" } else { "seen" };
        metrics.pooler_answers.with_label_values(&[outcome]).inc();
        if matches!(
            self.configured,
            UpstreamPooling::Transaction | UpstreamPooling::TransactionPrepared
        ) || self.detected.swap(true, Ordering::Relaxed)
        {
            return;
        }
        metrics.upstream_pooled.set(1);
        warn!(
            session,
            configured = ?self.configured,
            "the upstream is a transaction pooler: a statement keyshift prepared on one server connection is not on the one this transaction got; from now on sessions keep nothing on the server past a transaction (set upstream_pooling = \"transaction\" to start that way)"
        );
    }
}

/// Whether an error is a pooler's answer about one of the session's own statements: missing
/// (26000) or already there (42P05), naming a statement under the session's `prefix`.
pub fn is_pooler_answer(sqlstate: &[u8], message: &[u8], prefix: &str) -> bool {
    if !matches!(sqlstate, b"26000" | b"42P05") {
        return false;
    }
    let quoted = format!("\"{prefix}");
    message
        .windows(quoted.len())
        .any(|w| w == quoted.as_bytes())
}

/// Whose answer the first message of a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// keyshift's: the client already got the answer to the message it stands for.
    Own,
    /// The client's: the message that failed was the one it stands for.
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The sequence is still coming from the client: its messages are kept.
    Recording,
    /// Its end (Sync, or a Query) went: the client's next message waits.
    Sent,
    /// The pooler's answer came: the ReadyForQuery that ends the sequence is dropped, then the
    /// kept messages go. `sync_due`: the client had not ended the sequence, so keyshift ends
    /// it with a Sync of its own, at the next client message boundary.
    Failed { first: First, sync_due: bool },
}

/// One sequence that uses keyshift's statement where a pooler's answer can be undone: what to
/// send instead should that answer come. `T` is the token of the first message.
#[derive(Debug)]
pub struct Guard<T> {
    /// What stands for keyshift's first message without its statement (Parse of the text as
    /// the unnamed statement, or the text's Query), and its token.
    first: Vec<u8>,
    token: Option<T>,
    /// The messages after it as the client sent them, until the sequence's end.
    rest: Vec<u8>,
    state: State,
    /// The message that ended the sequence may not all have been kept yet: the relay sends
    /// what it scanned in one go, after the message that ends the sequence was seen.
    tail: bool,
    /// The first message is the client's Query: nothing follows it in its sequence.
    query: bool,
}

impl<T> Guard<T> {
    /// An unnamed Parse that keyshift sent as its statement's (reuse or preparation);
    /// `instead` is the Parse of the text.
    pub fn parse(instead: &[u8], token: Option<T>) -> Guard<T> {
        Guard {
            first: instead.to_vec(),
            token,
            rest: Vec::new(),
            state: State::Recording,
            tail: false,
            query: false,
        }
    }

    /// A simple Query sent as `EXECUTE` of keyshift's statement; `instead` is the Query of the
    /// text. It is a sequence of its own.
    pub fn query(instead: &[u8], token: Option<T>) -> Guard<T> {
        Guard {
            first: instead.to_vec(),
            token,
            rest: Vec::new(),
            state: State::Sent,
            tail: false,
            query: true,
        }
    }

    /// Client bytes sent to the server now belong to the sequence (and are kept).
    pub fn recording(&self) -> bool {
        self.tail
            || matches!(
                self.state,
                State::Recording | State::Failed { sync_due: true, .. }
            )
    }

    /// Keeps client bytes sent in the sequence; false when there are too many to keep (the
    /// guard is then given up).
    pub fn record(&mut self, bytes: &[u8]) -> bool {
        self.rest.extend_from_slice(bytes);
        self.rest.len() <= MAX_KEPT
    }

    /// The client's message with this tag went: a Sync or a Query ends the sequence.
    pub fn client_sent(&mut self, ends_sequence: bool) {
        if ends_sequence && self.state == State::Recording {
            self.state = State::Sent;
            self.tail = true;
        }
    }

    /// Everything scanned so far was sent (and kept): the sequence's end included.
    pub fn committed(&mut self) {
        self.tail = false;
    }

    /// The client's next message must wait for this sequence's end.
    pub fn holds_client(&self) -> bool {
        !matches!(self.state, State::Recording)
    }

    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed { .. })
    }

    /// The pooler's answer came; `first_failed`: it answers the first message itself. Returns
    /// true when keyshift must end the sequence with a Sync of its own (see
    /// [`Self::take_sync_due`]).
    pub fn fail(&mut self, first_failed: bool) -> bool {
        let first = if first_failed || self.query {
            First::Client
        } else {
            First::Own
        };
        let sync_due = self.state == State::Recording;
        self.state = State::Failed { first, sync_due };
        sync_due
    }

    /// keyshift's Sync is due now (the client is at a message boundary): true once.
    pub fn take_sync_due(&mut self) -> bool {
        match &mut self.state {
            State::Failed { sync_due, .. } if *sync_due => {
                *sync_due = false;
                true
            }
            _ => false,
        }
    }

    /// Whether keyshift's Sync is still to be sent.
    pub fn sync_due(&self) -> bool {
        matches!(self.state, State::Failed { sync_due: true, .. })
    }

    /// What to send instead, once the failed sequence ended: the first message, whose it is,
    /// its token, and the client's messages after it.
    pub fn replay(self) -> Option<Replay<T>> {
        let State::Failed { first, .. } = self.state else {
            return None;
        };
        Some(Replay {
            first: self.first,
            owner: first,
            token: self.token,
            rest: self.rest,
            query: self.query,
        })
    }
}

/// A failed guarded sequence, to send again without keyshift's statement.
#[derive(Debug)]
pub struct Replay<T> {
    pub first: Vec<u8>,
    pub owner: First,
    pub token: Option<T>,
    pub rest: Vec<u8>,
    /// `first` is a Query (else a Parse).
    pub query: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pooler_declared_to_keep_prepared_statements_gets_them_prepared_again() {
        let m = Metrics::new();
        let kept = Pooling::new(UpstreamPooling::TransactionPrepared, &m);
        assert!(kept.pooled() && kept.keeps_named() && !kept.cautious());
        assert_eq!(m.upstream_pooled.get(), 1);
        // Declared: an answer changes nothing, and says nothing new.
        kept.detected(&m, 1, true);
        assert!(kept.keeps_named());
        let plain = Pooling::new(UpstreamPooling::Transaction, &m);
        assert!(plain.pooled() && !plain.keeps_named());
        // Found out by `auto`: pooled, but the names are not trusted to be the client's.
        let found = Pooling::new(UpstreamPooling::Auto, &m);
        assert!(!found.pooled() && found.cautious());
        found.detected(&m, 2, true);
        assert!(found.pooled() && !found.keeps_named());
    }

    #[test]
    fn pooler_answers_name_the_sessions_own_statements() {
        let p = "keyshift_0badcafe_";
        let missing = b"prepared statement \"keyshift_0badcafe_q1\" does not exist";
        assert!(is_pooler_answer(b"26000", missing, p));
        assert!(is_pooler_answer(
            b"42P05",
            b"prepared statement \"keyshift_0badcafe_s3\" already exists",
            p
        ));
        // The client's own statement, another session's, another error.
        assert!(!is_pooler_answer(
            b"26000",
            b"prepared statement \"keyshift_s1\" does not exist",
            p
        ));
        assert!(!is_pooler_answer(
            b"26000",
            b"prepared statement \"keyshift_12345678_q1\" does not exist",
            p
        ));
        assert!(!is_pooler_answer(b"42601", missing, p));
    }

    #[test]
    fn a_guard_keeps_its_sequence_and_replays_it_once_failed() {
        let mut g: Guard<()> = Guard::parse(b"P-text", None);
        assert!(g.recording() && !g.holds_client());
        assert!(g.record(b"B"));
        g.client_sent(false);
        assert!(g.record(b"E"));
        g.client_sent(false);
        assert!(g.record(b"S"));
        g.client_sent(true);
        assert!(g.recording() && g.holds_client());
        g.committed();
        assert!(!g.recording());
        // The Bind of keyshift's statement failed: the Sync already went.
        assert!(!g.fail(false));
        assert!(!g.take_sync_due());
        let r = g.replay().unwrap();
        assert_eq!(
            (r.first.as_slice(), r.owner, r.rest.as_slice(), r.query),
            (&b"P-text"[..], First::Own, &b"BES"[..], false)
        );
    }

    #[test]
    fn a_failure_before_the_sequence_ends_needs_keyshifts_sync() {
        let mut g: Guard<()> = Guard::parse(b"P", None);
        g.record(b"B");
        // keyshift's own Parse was refused (42P05): the client's Parse failed.
        assert!(g.fail(true));
        assert!(g.recording() && g.sync_due());
        g.record(b"E");
        assert!(g.take_sync_due());
        assert!(!g.take_sync_due() && !g.recording() && g.holds_client());
        let r = g.replay().unwrap();
        assert_eq!((r.owner, r.rest.as_slice()), (First::Client, &b"BE"[..]));
    }

    #[test]
    fn a_query_guard_holds_at_once_and_a_success_replays_nothing() {
        let g: Guard<()> = Guard::query(b"Q-text", None);
        assert!(g.holds_client() && !g.recording());
        assert!(g.replay().is_none());
        let mut g: Guard<()> = Guard::query(b"Q-text", None);
        g.fail(false);
        assert_eq!(g.replay().unwrap().owner, First::Client);
        let mut big: Guard<()> = Guard::parse(b"P", None);
        assert!(!big.record(&vec![0; MAX_KEPT + 1]));
    }
}
