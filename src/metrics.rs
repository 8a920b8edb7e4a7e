//! Prometheus metrics, all prefixed `keyshift_`, in a registry owned by one proxy.
//!
//! The relay counts messages and bytes in plain per-session counters and adds them to the
//! shared atomics now and then ([`SessionCounters::flush_if_due`]): a shared atomic per message
//! would bounce a cache line between cores on every round trip. Gauges that describe sessions
//! are computed when Prometheus scrapes, from the session registry, for the same reason.
//! No label ever carries SQL text or a literal.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The pause gate and its sessions as the proxy read them for one scrape. The gate belongs to
/// the proxy, which depends on this module, so it is handed over as numbers rather than read
/// here (`proxy::gate::Gate::reading`).
#[derive(Debug, Clone, Default)]
pub struct GateReading {
    /// Live sessions per state, by the state's label value (`idle`, `active`, …).
    pub sessions: Vec<(&'static str, usize)>,
    /// Live sessions per shape (`integer`, `uuid`), every shape present.
    pub shapes: Vec<(&'static str, usize)>,
    /// Sessions whose next message the closed gate is holding.
    pub held: usize,
    pub closed: bool,
    /// How long the gate has been closed; `None` while it is open.
    pub closed_for: Option<Duration>,
}

/// Frontend (client → server) message types, by tag.
pub const CLIENT_TAGS: &[(u8, &str)] = &[
    (b'Q', "Query"),
    (b'P', "Parse"),
    (b'B', "Bind"),
    (b'E', "Execute"),
    (b'D', "Describe"),
    (b'C', "Close"),
    (b'S', "Sync"),
    (b'H', "Flush"),
    (b'X', "Terminate"),
    (b'F', "FunctionCall"),
    (b'd', "CopyData"),
    (b'c', "CopyDone"),
    (b'f', "CopyFail"),
    (b'p', "PasswordMessage"),
];

/// Backend (server → client) message types, by tag.
pub const SERVER_TAGS: &[(u8, &str)] = &[
    (b'R', "Authentication"),
    (b'S', "ParameterStatus"),
    (b'K', "BackendKeyData"),
    (b'Z', "ReadyForQuery"),
    (b'T', "RowDescription"),
    (b'D', "DataRow"),
    (b'C', "CommandComplete"),
    (b'E', "ErrorResponse"),
    (b'N', "NoticeResponse"),
    (b'A', "NotificationResponse"),
    (b'1', "ParseComplete"),
    (b'2', "BindComplete"),
    (b'3', "CloseComplete"),
    (b'n', "NoData"),
    (b's', "PortalSuspended"),
    (b't', "ParameterDescription"),
    (b'G', "CopyInResponse"),
    (b'H', "CopyOutResponse"),
    (b'W', "CopyBothResponse"),
    (b'd', "CopyData"),
    (b'c', "CopyDone"),
    (b'I', "EmptyQueryResponse"),
    (b'V', "FunctionCallResponse"),
    (b'v', "NegotiateProtocolVersion"),
];

/// Index into a tag table; unknown tags share the last slot ("other").
const fn index_table(tags: &[(u8, &str)]) -> [u8; 256] {
    let mut t = [tags.len() as u8; 256];
    let mut i = 0;
    while i < tags.len() {
        t[tags[i].0 as usize] = i as u8;
        i += 1;
    }
    t
}

static CLIENT_INDEX: [u8; 256] = index_table(CLIENT_TAGS);
static SERVER_INDEX: [u8; 256] = index_table(SERVER_TAGS);
const CLIENT_SLOTS: usize = CLIENT_TAGS.len() + 1;
const SERVER_SLOTS: usize = SERVER_TAGS.len() + 1;

pub struct Metrics {
    pub registry: Registry,
    pub connections_accepted: IntCounter,
    pub connections_rejected: IntCounterVec,
    pub upstream_connect_failures: IntCounter,
    /// 1 while sessions keep nothing of keyshift's on the server past a transaction
    /// (`upstream_pooling`, src/proxy/pooling.rs).
    pub upstream_pooled: IntGauge,
    /// Answers that showed the upstream to be a transaction pooler (keyshift's own statement
    /// missing or already there on the server connection).
    pub pooler_answers: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    /// Sessions ended by a panic in keyshift (each one a bug; the proxy goes on).
    pub session_panics: IntCounter,
    pub session_duration: Histogram,
    pub cancel_requests: IntCounterVec,
    client_messages: Vec<IntCounter>,
    server_messages: Vec<IntCounter>,
    /// `keyshift_server_statements_total{event}`: statements keyshift prepared for unnamed
    /// Parse messages, and executions that reused one (src/proxy/server_statements.rs).
    statements_prepared: IntCounter,
    statements_reused: IntCounter,
    bytes_client: IntCounter,
    bytes_server: IntCounter,
    connections: IntGaugeVec,
    held_sessions: IntGauge,
    gate_closed: IntGauge,
    gate_closed_seconds: prometheus::Gauge,
    pub pauses: IntCounterVec,
    /// Cutover and rollback attempts recorded in the database, by action and result.
    pub switch_attempts: IntGaugeVec,
    /// How long the gate was closed, per pause (HTTP or cutover protocol).
    pub pause_duration: Histogram,
    pub rewrite: std::sync::Arc<RewriteMetrics>,
    pub map: MapMetrics,
    /// `keyshift_sessions{shape}`: set from the gate at each scrape.
    sessions_by_shape: IntGaugeVec,
    pub translation: TranslationMetrics,
}

/// Sessions served in a shape that is not the physical one (DESIGN "Shapes"): the proxy
/// points their table references at keyshift's views of their shape.
#[derive(Clone)]
pub struct TranslationMetrics {
    /// `keyshift_translated_statements_total{shape,kind}`: statements of a translated session
    /// that named a migrated table and were redirected, by the session's shape and the
    /// statement's kind ([`TRANSLATION_KINDS`]).
    pub statements: IntCounterVec,
    /// `keyshift_translation_seconds`: time to translate one statement (cache included).
    pub seconds: Histogram,
}

/// The `kind` label values of `keyshift_translated_statements_total`, exported at 0 from the
/// start: `read` (SELECT, row locks, EXPLAIN), `write` (INSERT, UPDATE, DELETE, MERGE),
/// `refused` (a form keyshift answers with an error naming the table, e.g. TRUNCATE through a
/// view), `other`.
pub const TRANSLATION_KINDS: [&str; 4] = ["read", "write", "refused", "other"];

impl TranslationMetrics {
    fn new(r: &Registry) -> TranslationMetrics {
        TranslationMetrics {
            statements: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "keyshift_translated_statements_total",
                        "Statements of sessions whose shape is not the physical one, redirected to keyshift's views, by shape and kind",
                    ),
                    &["shape", "kind"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            seconds: statement_histogram(
                r,
                "keyshift_translation_seconds",
                "Time to translate a statement of a translated session (cache included)",
            ),
        }
    }
}

/// Id-mapping lookups served on `/v1/map` (src/map).
#[derive(Clone)]
pub struct MapMetrics {
    /// `keyshift_map_lookups_total{result}`: ids looked up, by result (hit: from the cache,
    /// miss: from the database, not_found, error: database unreachable or failing).
    lookups: IntCounterVec,
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub not_found: IntCounter,
    pub error: IntCounter,
    /// `keyshift_map_lookup_duration_seconds`: per HTTP request (one id or a batch).
    pub duration: Histogram,
    /// `keyshift_map_cache_entries`
    pub cache_entries: IntGauge,
}

impl MapMetrics {
    fn new(r: &Registry) -> MapMetrics {
        let lookups = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "keyshift_map_lookups_total",
                    "Ids looked up on /v1/map, by result (hit, miss, not_found, error)",
                ),
                &["result"],
            )
            .unwrap_or_else(|_| unreachable!()),
        );
        MapMetrics {
            hit: lookups.with_label_values(&["hit"]),
            miss: lookups.with_label_values(&["miss"]),
            not_found: lookups.with_label_values(&["not_found"]),
            error: lookups.with_label_values(&["error"]),
            lookups,
            duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "keyshift_map_lookup_duration_seconds",
                        "Time to answer a /v1/map request (one id or a batch)",
                    )
                    .buckets(vec![
                        1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                    ]),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cache_entries: reg(
                r,
                IntGauge::new(
                    "keyshift_map_cache_entries",
                    "Id mappings held in the proxy's lookup cache",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
        }
    }

    pub fn lookups(&self) -> &IntCounterVec {
        &self.lookups
    }
}

/// The `reading` label values of `keyshift_rules_builds_total` (src/proxy/control.rs).
pub const RULES_READINGS: [&str; 3] = ["read", "derived", "corrected"];

/// Dual-write metrics, shared by every rule set a proxy builds.
pub struct RewriteMetrics {
    /// `keyshift_rewrites_total{table,kind}`
    pub rewrites: IntCounterVec,
    /// `keyshift_rewrite_skipped_total{reason}`: writes to migrated tables left unrewritten.
    pub skipped: IntCounterVec,
    pub duration: Histogram,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_entries: IntGauge,
    pub rules_version: IntGauge,
    /// `keyshift_rules_builds_total{reading}`: rule sets put in force, by where their catalog
    /// reading came from ([`RULES_READINGS`]).
    pub rules_builds: IntCounterVec,
    /// Cache counters at the last scrape, to add only the difference. A new cache (new rule
    /// set) starts from zero again.
    last: std::sync::Mutex<(u64, u64)>,
}

impl RewriteMetrics {
    fn new(r: &Registry) -> RewriteMetrics {
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
            )
        };
        let c = |name: &str, help: &str| {
            reg(
                r,
                IntCounter::new(name, help)
                    .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
            )
        };
        let g = |name: &str, help: &str| {
            reg(
                r,
                IntGauge::new(name, help)
                    .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
            )
        };
        RewriteMetrics {
            rewrites: cv(
                "keyshift_rewrites_total",
                "Writes rewritten to keep the twin columns filled, by child table and statement kind",
                &["table", "kind"],
            ),
            skipped: cv(
                "keyshift_rewrite_skipped_total",
                "Writes to migrated tables passed through (or refused, strict) without a rewrite, by reason",
                &["reason"],
            ),
            duration: statement_histogram(
                r,
                "keyshift_rewrite_duration_seconds",
                "Time to rewrite a statement that names a migrated table (cache included)",
            ),
            cache_hits: c("keyshift_rewrite_cache_hits_total", "Rewrite cache hits"),
            cache_misses: c(
                "keyshift_rewrite_cache_misses_total",
                "Rewrite cache misses",
            ),
            cache_entries: g(
                "keyshift_rewrite_cache_entries",
                "Statements in the rewrite cache",
            ),
            rules_version: g(
                "keyshift_rules_version",
                "Version of the rule set in force (keyshift.migration.rules_version; 0: passthrough)",
            ),
            rules_builds: cv(
                "keyshift_rules_builds_total",
                "Rule sets put in force, by how their catalog reading was had: read, derived from the last one across a swap, or corrected after a new reading found the catalog changed",
                &["reading"],
            ),
            last: std::sync::Mutex::new((0, 0)),
        }
    }

    /// A new rule set brings a new cache whose counters start at zero.
    pub fn new_cache(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = (0, 0);
        }
    }

    /// Adds the cache's counts since the last call.
    pub fn observe_cache(&self, hits: u64, misses: u64, entries: usize) {
        if let Ok(mut last) = self.last.lock() {
            if hits < last.0 || misses < last.1 {
                *last = (0, 0);
            }
            self.cache_hits.inc_by(hits - last.0);
            self.cache_misses.inc_by(misses - last.1);
            *last = (hits, misses);
        }
        self.cache_entries.set(entries as i64);
    }
}

/// Per-statement work in the proxy (rewriting, translating): microseconds when cached, tens of
/// them when not; the same buckets so the two histograms compare.
fn statement_histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    reg(
        r,
        Histogram::with_opts(
            HistogramOpts::new(name, help)
                .buckets(vec![1e-6, 2e-6, 5e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2]),
        )
        .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
    )
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed in this file and unique per registry: registration cannot collide.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounter::new(name, help)
                    .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|_| unreachable!("valid metric name {name}")),
            )
        };
        let messages = counter_vec(
            "keyshift_messages_total",
            "Protocol messages relayed, by direction and message type",
            &["direction", "type"],
        );
        let client_messages = CLIENT_TAGS
            .iter()
            .map(|(_, n)| *n)
            .chain(["other"])
            .map(|n| messages.with_label_values(&["client_to_server", n]))
            .collect();
        let server_messages = SERVER_TAGS
            .iter()
            .map(|(_, n)| *n)
            .chain(["other"])
            .map(|n| messages.with_label_values(&["server_to_client", n]))
            .collect();
        let bytes = counter_vec(
            "keyshift_bytes_total",
            "Bytes relayed, by direction",
            &["direction"],
        );
        let connections = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "keyshift_client_connections",
                    "Client connections, by session state",
                ),
                &["state"],
            )
            .unwrap_or_else(|_| unreachable!()),
        );
        let statements = counter_vec(
            "keyshift_server_statements_total",
            "Server-side statements keyshift prepared for rewritten unnamed Parse messages (prepared), and executions that reused one instead of planning again (reused)",
            &["event"],
        );
        let m = Metrics {
            connections_accepted: counter(
                "keyshift_client_connections_accepted_total",
                "Client connections accepted",
            ),
            connections_rejected: counter_vec(
                "keyshift_client_connections_rejected_total",
                "Client connections refused, by reason",
                &["reason"],
            ),
            upstream_connect_failures: counter(
                "keyshift_upstream_connect_failures_total",
                "Failed attempts to connect to PostgreSQL",
            ),
            upstream_pooled: reg(
                &r,
                IntGauge::new(
                    "keyshift_upstream_pooled",
                    "1 while the upstream is treated as a transaction pooler (configured or detected)",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            pooler_answers: counter_vec(
                "keyshift_upstream_pooler_answers_total",
                "Answers showing the upstream to be a transaction pooler, by whether keyshift hid them from the client (recovered) or not (seen)",
                &["outcome"],
            ),
            protocol_errors: counter_vec(
                "keyshift_protocol_errors_total",
                "Connections ended for a protocol violation, by side",
                &["side"],
            ),
            session_panics: counter(
                "keyshift_session_panics_total",
                "Sessions ended by a panic inside keyshift (a bug: please report it); other sessions go on",
            ),
            session_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "keyshift_session_duration_seconds",
                        "Client session lifetimes",
                    )
                    .buckets(vec![0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0]),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cancel_requests: counter_vec(
                "keyshift_cancel_requests_total",
                "CancelRequests received, by result",
                &["result"],
            ),
            pauses: counter_vec(
                "keyshift_pauses_total",
                "Pauses of the gate, by result (drained, timeout, drain_failed, expired, coordinator_gone)",
                &["result"],
            ),
            rewrite: std::sync::Arc::new(RewriteMetrics::new(&r)),
            map: MapMetrics::new(&r),
            sessions_by_shape: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "keyshift_sessions",
                        "Client sessions open now, by the shape they see (integer, uuid)",
                    ),
                    &["shape"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            translation: TranslationMetrics::new(&r),
            switch_attempts: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "keyshift_cutover_attempts",
                        "Cutover and rollback attempts in keyshift.switch_attempts, by action and result (committed, aborted, dry_run_done, pausing, swapping)",
                    ),
                    &["action", "result"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            pause_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "keyshift_pause_duration_seconds",
                        "How long this proxy's gate stayed closed, per pause",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            client_messages,
            server_messages,
            statements_prepared: statements.with_label_values(&["prepared"]),
            statements_reused: statements.with_label_values(&["reused"]),
            bytes_client: bytes.with_label_values(&["client_to_server"]),
            bytes_server: bytes.with_label_values(&["server_to_client"]),
            connections,
            held_sessions: reg(
                &r,
                IntGauge::new(
                    "keyshift_held_sessions",
                    "Sessions whose next message is held by the closed gate",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            gate_closed: reg(
                &r,
                IntGauge::new("keyshift_gate_closed", "1 while the pause gate is closed")
                    .unwrap_or_else(|_| unreachable!()),
            ),
            gate_closed_seconds: reg(
                &r,
                prometheus::Gauge::new(
                    "keyshift_gate_closed_seconds",
                    "How long the gate has been closed (0 when open)",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            registry: r,
        };
        m.zero_fixed_labels();
        m
    }

    /// Prometheus text exposition, with the session gauges set from `gate`, read just now.
    pub fn render(&self, gate: &GateReading) -> String {
        for (state, n) in &gate.sessions {
            self.connections.with_label_values(&[state]).set(*n as i64);
        }
        for (shape, n) in &gate.shapes {
            self.sessions_by_shape
                .with_label_values(&[shape])
                .set(*n as i64);
        }
        self.held_sessions.set(gate.held as i64);
        self.gate_closed.set(gate.closed as i64);
        self.gate_closed_seconds
            .set(gate.closed_for.map(|d| d.as_secs_f64()).unwrap_or(0.0));
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

// ------------------------------------------------------------------------------------------
// Label values known in advance, exported at 0 from the start (deploy/, docs/metrics.md).
//
// A labelled counter prints nothing until its first event, so an alert such as
// `increase(keyshift_rewrite_skipped_total[5m]) > 0` would miss that first event (a series
// that appears at 1 has no increase) and a dashboard would show "no data" instead of 0.
impl Metrics {
    fn zero_fixed_labels(&self) {
        use crate::rewrite::SkipReason;
        for reason in [
            SkipReason::ParseError,
            SkipReason::Unsupported,
            SkipReason::Volatile,
            SkipReason::TooLong,
            SkipReason::Invalid,
            SkipReason::Internal,
            SkipReason::MidCutover,
        ] {
            self.rewrite.skipped.with_label_values(&[reason.as_str()]);
        }
        for reading in RULES_READINGS {
            self.rewrite.rules_builds.with_label_values(&[reading]);
        }
        // The results written by src/admin.rs (drained, timeout) and src/proxy/control.rs.
        for result in [
            "drained",
            "timeout",
            "drain_failed",
            "expired",
            "coordinator_gone",
        ] {
            self.pauses.with_label_values(&[result]);
        }
        // Both shapes from the start: "V1 is gone" reads as integer 0, not as no data.
        for shape in crate::shape::Shape::ALL {
            self.sessions_by_shape.with_label_values(&[shape.as_str()]);
            for kind in TRANSLATION_KINDS {
                self.translation
                    .statements
                    .with_label_values(&[shape.as_str(), kind]);
            }
        }
        // The outcomes an alert compares with their value some minutes ago; the link to the
        // database overwrites them with the counts in keyshift.switch_attempts.
        for action in ["cutover", "rollback"] {
            for result in ["committed", "aborted"] {
                self.switch_attempts.with_label_values(&[action, result]);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A session's own counters, added to the shared ones at most every `FLUSH_EVERY`.
pub struct SessionCounters {
    client: [u32; CLIENT_SLOTS],
    server: [u32; SERVER_SLOTS],
    bytes_client: u64,
    bytes_server: u64,
    pub statements_prepared: u32,
    pub statements_reused: u32,
    /// When the counters were last added to the shared ones ([`crate::clock`]'s coarse ms).
    last_flush_ms: u64,
}

const FLUSH_EVERY_MS: u64 = 500;

impl Default for SessionCounters {
    fn default() -> Self {
        SessionCounters {
            client: [0; CLIENT_SLOTS],
            server: [0; SERVER_SLOTS],
            bytes_client: 0,
            bytes_server: 0,
            statements_prepared: 0,
            statements_reused: 0,
            last_flush_ms: crate::clock::coarse_monotonic_ms(),
        }
    }
}

impl SessionCounters {
    #[inline]
    pub fn client_message(&mut self, tag: u8) {
        self.client[CLIENT_INDEX[tag as usize] as usize] += 1;
    }

    #[inline]
    pub fn server_message(&mut self, tag: u8) {
        self.server[SERVER_INDEX[tag as usize] as usize] += 1;
    }

    #[inline]
    pub fn client_bytes(&mut self, n: usize) {
        self.bytes_client += n as u64;
    }

    #[inline]
    pub fn server_bytes(&mut self, n: usize) {
        self.bytes_server += n as u64;
    }

    /// Flushes when enough time has passed; called at every ReadyForQuery.
    #[inline]
    pub fn flush_if_due(&mut self, m: &Metrics) {
        if crate::clock::coarse_monotonic_ms().saturating_sub(self.last_flush_ms) >= FLUSH_EVERY_MS
        {
            self.flush(m);
        }
    }

    pub fn flush(&mut self, m: &Metrics) {
        for (i, n) in self.client.iter_mut().enumerate() {
            if *n > 0 {
                m.client_messages[i].inc_by(*n as u64);
                *n = 0;
            }
        }
        for (i, n) in self.server.iter_mut().enumerate() {
            if *n > 0 {
                m.server_messages[i].inc_by(*n as u64);
                *n = 0;
            }
        }
        m.bytes_client
            .inc_by(std::mem::take(&mut self.bytes_client));
        m.bytes_server
            .inc_by(std::mem::take(&mut self.bytes_server));
        m.statements_prepared
            .inc_by(u64::from(std::mem::take(&mut self.statements_prepared)));
        m.statements_reused
            .inc_by(u64::from(std::mem::take(&mut self.statements_reused)));
        self.last_flush_ms = crate::clock::coarse_monotonic_ms();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names() {
        let m = Metrics::new();
        let mut c = SessionCounters::default();
        c.client_message(b'Q');
        c.server_message(b'Z');
        c.server_message(0xff);
        c.client_bytes(10);
        c.flush(&m);
        let reading = GateReading {
            sessions: vec![("idle", 0)],
            shapes: vec![("integer", 2)],
            ..Default::default()
        };
        let text = m.render(&reading);
        assert!(
            text.contains("keyshift_sessions{shape=\"integer\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("keyshift_sessions{shape=\"uuid\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("keyshift_translated_statements_total{kind=\"read\",shape=\"uuid\"} 0")
        );
        assert!(text.contains("keyshift_translation_seconds_count 0"));
        assert!(
            text.contains(
                "keyshift_messages_total{direction=\"client_to_server\",type=\"Query\"} 1"
            )
        );
        assert!(
            text.contains(
                "keyshift_messages_total{direction=\"server_to_client\",type=\"other\"} 1"
            )
        );
        assert!(text.contains("keyshift_bytes_total{direction=\"client_to_server\"} 10"));
        assert!(text.contains("keyshift_client_connections{state=\"idle\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("keyshift_"), "{line}");
        }
    }
}
