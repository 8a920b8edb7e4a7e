//! Configuration: one TOML file shared by every command, each key also settable by a flag and
//! by a `KEYSHIFT_*` environment variable. Precedence: flag > environment > file > default.
//!
//! Clap resolves flag-over-environment; this module lays the result over the file and the
//! defaults, and validates, naming the key in every error. `deploy/keyshift.toml` documents
//! every key and must stay in step with [`FileConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// TLS towards the upstream PostgreSQL, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without checking its certificate.
    Prefer,
    /// Always use TLS, without checking the certificate.
    Require,
    /// Always use TLS; the certificate must chain to `upstream_tls_ca` and match the host name.
    VerifyFull,
}

/// What `upstream` is, as far as keyshift's own server-side state goes (docs/configuration.md,
/// src/proxy/pooling.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamPooling {
    /// Not known: keyshift uses its own prepared statements only where a pooler's answer
    /// (its statement missing) can be undone unseen, and switches to `transaction` at the
    /// first such answer.
    Auto,
    /// PostgreSQL itself (or a TCP proxy): each client connection has one server connection
    /// for its whole life.
    None,
    /// A pooler in session mode: the same guarantee as `none`.
    Session,
    /// A pooler in transaction (or statement) mode: nothing keyshift prepares on a server
    /// connection outlives the transaction.
    Transaction,
    /// A pooler in transaction mode that keeps each client's protocol-level named prepared
    /// statements and prepares them on whichever server connection a transaction gets
    /// (PgBouncer 1.21 or later with `max_prepared_statements`): as `transaction`, except that
    /// keyshift prepares the client's named statements again at a rules change, through the
    /// pooler (a Close and a Parse of the same name), as it does with PostgreSQL itself.
    TransactionPrepared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The config file as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_listen: Option<String>,
    pub admin_token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub upstream_tls: Option<UpstreamTls>,
    pub upstream_tls_ca: Option<PathBuf>,
    pub max_client_connections: Option<usize>,
    pub max_message_bytes: Option<usize>,
    pub shutdown_grace: Option<String>,
    pub connect_timeout: Option<String>,
    pub startup_timeout: Option<String>,
    pub worker_threads: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub database_url: Option<String>,
    pub strict: Option<bool>,
    pub search_path: Option<Vec<String>>,
    pub proxy_id: Option<String>,
    pub rewrite_cache_entries: Option<usize>,
    pub server_statements: Option<usize>,
    pub upstream_pooling: Option<UpstreamPooling>,
    pub map_token: Option<String>,
    pub map_cache_entries: Option<usize>,
    /// `[[shape_rules]]`: the shape of sessions that do not name one (src/shape.rs).
    pub shape_rules: Option<Vec<crate::shape::ShapeRule>>,
    pub lock_timeout: Option<String>,
    pub ddl_retries: Option<u32>,
    pub uuid_version: Option<u8>,
    pub schemas: Option<Vec<String>>,
    pub tables: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub uuid_suffix: Option<String>,
    pub legacy_suffix: Option<String>,
    pub batch_size: Option<i64>,
    pub max_rows_per_sec: Option<u64>,
    pub jobs: Option<usize>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

/// Flags and environment variables for the proxy; `None` means "not given".
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ProxyArgs {
    /// The migrated database (keyshift's own connection: rules, heartbeats, cutover). Without
    /// it the proxy is a pure passthrough
    #[arg(
        long,
        env = "KEYSHIFT_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Refuse writes to migrated tables that keyshift cannot rewrite (SQLSTATE 0A000) instead
    /// of passing them through [default: false]
    #[arg(long, env = "KEYSHIFT_STRICT", value_name = "BOOL")]
    pub strict: Option<bool>,
    /// Schemas unqualified table names resolve through, comma-separated [default: public]
    #[arg(
        long,
        env = "KEYSHIFT_SEARCH_PATH",
        value_name = "SCHEMAS",
        value_delimiter = ','
    )]
    pub search_path: Option<Vec<String>>,
    /// This proxy's name in keyshift.proxies [default: <hostname>:<listen port>]
    #[arg(long, env = "KEYSHIFT_PROXY_ID", value_name = "ID")]
    pub proxy_id: Option<String>,
    /// Statements kept in the rewrite cache [default: 4096]
    #[arg(long, env = "KEYSHIFT_REWRITE_CACHE_ENTRIES", value_name = "N")]
    pub rewrite_cache_entries: Option<usize>,
    /// Rewritten statements keyshift prepares on the server per session for unnamed Parse
    /// messages, so they are planned once; 0 turns this off [default: 64]
    #[arg(long, env = "KEYSHIFT_SERVER_STATEMENTS", value_name = "N")]
    pub server_statements: Option<usize>,
    /// What the upstream is: `none` (PostgreSQL), `session` or `transaction` (a pooler in that
    /// mode), `auto` (find out: a pooler shows itself when keyshift's own statement is missing)
    /// [default: auto]
    #[arg(long, env = "KEYSHIFT_UPSTREAM_POOLING", value_enum)]
    pub upstream_pooling: Option<UpstreamPooling>,
    /// Bearer token required by the id-mapping endpoints (/v1/map/*); without one they are open
    #[arg(
        long,
        env = "KEYSHIFT_MAP_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub map_token: Option<String>,
    /// Id mappings kept in the proxy's lookup cache (about 100 bytes each) [default: 1000000]
    #[arg(long, env = "KEYSHIFT_MAP_CACHE_ENTRIES", value_name = "N")]
    pub map_cache_entries: Option<usize>,
    /// Address clients connect to [default: 127.0.0.1:6432]
    #[arg(long, env = "KEYSHIFT_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// The PostgreSQL server, host:port [default: 127.0.0.1:5432]
    #[arg(long, env = "KEYSHIFT_UPSTREAM", value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz, /v1/*) [default: 127.0.0.1:9187]
    #[arg(long, env = "KEYSHIFT_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Bearer token required by the admin endpoints that change state (/v1/pause, /v1/resume,
    /// /v1/cutover); without one they are refused
    #[arg(
        long,
        env = "KEYSHIFT_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// PEM certificate chain for client-facing TLS (with --tls-key)
    #[arg(long, env = "KEYSHIFT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for client-facing TLS (with --tls-cert)
    #[arg(long, env = "KEYSHIFT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TLS towards PostgreSQL [default: prefer]
    #[arg(long, env = "KEYSHIFT_UPSTREAM_TLS", value_enum)]
    pub upstream_tls: Option<UpstreamTls>,
    /// CA bundle (PEM) that verifies the upstream certificate with --upstream-tls verify-full
    #[arg(long, env = "KEYSHIFT_UPSTREAM_TLS_CA", value_name = "FILE")]
    pub upstream_tls_ca: Option<PathBuf>,
    /// Client connections accepted at once; beyond it clients get SQLSTATE 53300 [default: 1000]
    #[arg(long, env = "KEYSHIFT_MAX_CLIENT_CONNECTIONS", value_name = "N")]
    pub max_client_connections: Option<usize>,
    /// Largest protocol message accepted from either side, in bytes [default: 67108864]
    #[arg(long, env = "KEYSHIFT_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// On SIGTERM/SIGINT, how long sessions may run on before they are closed [default: 30s]
    #[arg(long, env = "KEYSHIFT_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Time allowed to reach PostgreSQL before a client gets SQLSTATE 08001 [default: 5s]
    #[arg(long, env = "KEYSHIFT_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Time a client has to finish its startup and authentication [default: 60s]
    #[arg(long, env = "KEYSHIFT_STARTUP_TIMEOUT", value_name = "DURATION")]
    pub startup_timeout: Option<String>,
    /// Threads, each running its own single-threaded runtime that owns whole sessions; 0 means one per two CPUs (at least one) [default: 0]
    #[arg(long, env = "KEYSHIFT_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Log format [default: text]
    #[arg(long, env = "KEYSHIFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `keyshift=debug` [default: info]
    #[arg(long, env = "KEYSHIFT_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// The proxy's resolved configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: String,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub upstream_tls: UpstreamTls,
    pub upstream_tls_ca: Option<PathBuf>,
    pub max_client_connections: usize,
    pub max_message_bytes: usize,
    pub shutdown_grace: Duration,
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
    pub worker_threads: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    pub database_url: Option<String>,
    pub strict: bool,
    pub search_path: Vec<String>,
    pub proxy_id: Option<String>,
    pub rewrite_cache_entries: usize,
    pub server_statements: usize,
    pub upstream_pooling: UpstreamPooling,
    pub map_token: Option<String>,
    pub map_cache_entries: usize,
    /// The shape of sessions that name none, by user, database and application_name.
    pub shape_rules: Vec<crate::shape::ShapeRule>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: ([127, 0, 0, 1], 6432).into(),
            upstream: "127.0.0.1:5432".into(),
            admin_listen: ([127, 0, 0, 1], 9187).into(),
            admin_token: None,
            tls_cert: None,
            tls_key: None,
            upstream_tls: UpstreamTls::Prefer,
            upstream_tls_ca: None,
            max_client_connections: 1000,
            max_message_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(60),
            worker_threads: 0,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            database_url: None,
            strict: false,
            search_path: vec!["public".into()],
            proxy_id: None,
            rewrite_cache_entries: 4096,
            server_statements: 64,
            upstream_pooling: UpstreamPooling::Auto,
            map_token: None,
            map_cache_entries: 1_000_000,
            shape_rules: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// Lays flags/environment over the file over the defaults, then validates.
    pub fn resolve(file: FileConfig, args: &ProxyArgs) -> Result<ProxyConfig, ConfigError> {
        let d = ProxyConfig::default();
        let pick = |a: &Option<String>, f: Option<String>| a.clone().or(f);
        let cfg = ProxyConfig {
            listen: match pick(&args.listen, file.listen) {
                Some(s) => parse_addr("listen", &s)?,
                None => d.listen,
            },
            upstream: match pick(&args.upstream, file.upstream) {
                Some(s) => validate_host_port("upstream", s)?,
                None => d.upstream,
            },
            admin_listen: match pick(&args.admin_listen, file.admin_listen) {
                Some(s) => parse_addr("admin_listen", &s)?,
                None => d.admin_listen,
            },
            admin_token: pick(&args.admin_token, file.admin_token).filter(|t| !t.is_empty()),
            tls_cert: args.tls_cert.clone().or(file.tls_cert),
            tls_key: args.tls_key.clone().or(file.tls_key),
            upstream_tls: args
                .upstream_tls
                .or(file.upstream_tls)
                .unwrap_or(d.upstream_tls),
            upstream_tls_ca: args.upstream_tls_ca.clone().or(file.upstream_tls_ca),
            max_client_connections: args
                .max_client_connections
                .or(file.max_client_connections)
                .unwrap_or(d.max_client_connections),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            shutdown_grace: opt_duration(
                "shutdown_grace",
                pick(&args.shutdown_grace, file.shutdown_grace),
            )?
            .unwrap_or(d.shutdown_grace),
            connect_timeout: opt_duration(
                "connect_timeout",
                pick(&args.connect_timeout, file.connect_timeout),
            )?
            .unwrap_or(d.connect_timeout),
            startup_timeout: opt_duration(
                "startup_timeout",
                pick(&args.startup_timeout, file.startup_timeout),
            )?
            .unwrap_or(d.startup_timeout),
            worker_threads: args
                .worker_threads
                .or(file.worker_threads)
                .unwrap_or(d.worker_threads),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            log_level: pick(&args.log_level, file.log_level).unwrap_or(d.log_level),
            database_url: args.database_url.clone().or(file.database_url),
            strict: args.strict.or(file.strict).unwrap_or(d.strict),
            search_path: args
                .search_path
                .clone()
                .or(file.search_path)
                .unwrap_or(d.search_path),
            proxy_id: pick(&args.proxy_id, file.proxy_id),
            rewrite_cache_entries: args
                .rewrite_cache_entries
                .or(file.rewrite_cache_entries)
                .unwrap_or(d.rewrite_cache_entries),
            server_statements: args
                .server_statements
                .or(file.server_statements)
                .unwrap_or(d.server_statements),
            upstream_pooling: args
                .upstream_pooling
                .or(file.upstream_pooling)
                .unwrap_or(d.upstream_pooling),
            map_token: pick(&args.map_token, file.map_token).filter(|t| !t.is_empty()),
            map_cache_entries: args
                .map_cache_entries
                .or(file.map_cache_entries)
                .unwrap_or(d.map_cache_entries),
            shape_rules: file.shape_rules.unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key",
                    "tls_cert is set but tls_key is not; set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert",
                    "tls_key is set but tls_cert is not; set both or neither",
                ));
            }
            _ => {}
        }
        if self.upstream_tls == UpstreamTls::VerifyFull && self.upstream_tls_ca.is_none() {
            return Err(invalid(
                "upstream_tls_ca",
                "upstream_tls = \"verify-full\" needs a CA file to verify the server's certificate",
            ));
        }
        if self.max_client_connections == 0 {
            return Err(invalid("max_client_connections", "must be at least 1"));
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid(
                "max_message_bytes",
                "must be at least 1024 (PostgreSQL's own messages need room)",
            ));
        }
        if self.max_message_bytes > i32::MAX as usize {
            return Err(invalid(
                "max_message_bytes",
                "must fit the protocol's 32-bit length (at most 2147483647)",
            ));
        }
        if let Some(url) = &self.database_url
            && let Err(e) = url.parse::<tokio_postgres::Config>()
        {
            return Err(invalid(
                "database_url",
                format!("not a PostgreSQL URL or conninfo: {e}"),
            ));
        }
        if self.search_path.is_empty() || self.search_path.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(
                "search_path",
                "must list at least one schema, without empty names",
            ));
        }
        if self.listen == self.admin_listen {
            return Err(invalid("admin_listen", "must differ from listen"));
        }
        Ok(())
    }
}

/// Connection and DDL flags shared by the migration commands.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL of the database to migrate, e.g. postgres://app@db:5432/app (key: database_url)
    #[arg(
        long,
        env = "KEYSHIFT_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Lock timeout of each DDL that takes a lock blocking traffic; on timeout it is retried
    /// with backoff, so it never queues in front of the application [default: 500ms]
    #[arg(long, env = "KEYSHIFT_LOCK_TIMEOUT", value_name = "DURATION")]
    pub lock_timeout: Option<String>,
    /// Retries of a DDL that hit lock_timeout before giving up [default: 30]
    #[arg(long, env = "KEYSHIFT_DDL_RETRIES", value_name = "N")]
    pub ddl_retries: Option<u32>,
}

/// What to migrate and how to name things (`plan`, `expand`).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct SelectArgs {
    /// Schema whose tables are migrated; repeatable [default: public]
    #[arg(
        long = "schema",
        env = "KEYSHIFT_SCHEMAS",
        value_name = "SCHEMA",
        value_delimiter = ','
    )]
    pub schemas: Vec<String>,
    /// Migrate only this table (`name` or `schema.name`); repeatable [default: every table
    /// whose primary key is one smallint, integer or bigint column]
    #[arg(
        long = "table",
        env = "KEYSHIFT_TABLES",
        value_name = "TABLE",
        value_delimiter = ','
    )]
    pub tables: Vec<String>,
    /// Leave this table's key alone (`name` or `schema.name`); repeatable
    #[arg(
        long = "exclude",
        env = "KEYSHIFT_EXCLUDE",
        value_name = "TABLE",
        value_delimiter = ','
    )]
    pub exclude: Vec<String>,
    /// UUID version of new keys: 7 (time-ordered, keyshift.uuid_v7()) or 4 (gen_random_uuid()) [default: 7]
    #[arg(long, env = "KEYSHIFT_UUID_VERSION", value_name = "4|7")]
    pub uuid_version: Option<u8>,
    /// Suffix of the new uuid columns before cutover [default: _uuid]
    #[arg(long, env = "KEYSHIFT_UUID_SUFFIX", value_name = "SUFFIX")]
    pub uuid_suffix: Option<String>,
    /// Suffix the integer columns take at cutover [default: _legacy]
    #[arg(long, env = "KEYSHIFT_LEGACY_SUFFIX", value_name = "SUFFIX")]
    pub legacy_suffix: Option<String>,
}

/// Backfill pacing.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct BackfillArgs {
    /// Rows per batch; each batch is one short transaction [default: 5000]
    #[arg(long, env = "KEYSHIFT_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<i64>,
    /// Throttle: at most this many rows per second; 0 means no limit [default: 0]
    #[arg(long, env = "KEYSHIFT_MAX_ROWS_PER_SEC", value_name = "N")]
    pub max_rows_per_sec: Option<u64>,
    /// Connections filling tables side by side (tables of one dependency level; FKs) [default: 1]
    #[arg(long, env = "KEYSHIFT_JOBS", value_name = "N")]
    pub jobs: Option<usize>,
}

/// The migration commands' resolved configuration.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    pub database_url: String,
    pub settings: crate::migrate::Settings,
    pub plan: crate::migrate::plan::PlanOptions,
}

impl MigrateConfig {
    /// Lays flags/environment over the file over the defaults, then validates.
    pub fn resolve(
        file: FileConfig,
        db: &DbArgs,
        sel: Option<&SelectArgs>,
        bf: Option<&BackfillArgs>,
    ) -> Result<MigrateConfig, ConfigError> {
        let sel = sel.cloned().unwrap_or_default();
        let bf = bf.cloned().unwrap_or_default();
        let d = crate::migrate::Settings::default();
        let dp = crate::migrate::plan::PlanOptions::default();
        let list = |a: Vec<String>, f: Option<Vec<String>>| if a.is_empty() { f } else { Some(a) };
        let database_url = db.database_url.clone().or(file.database_url).ok_or_else(|| {
            invalid(
                "database_url",
                "not set: give --database-url, KEYSHIFT_DATABASE_URL, or database_url in the config file",
            )
        })?;
        if let Err(e) = database_url.parse::<tokio_postgres::Config>() {
            return Err(invalid(
                "database_url",
                format!("not a PostgreSQL URL or connection string: {e}"),
            ));
        }
        let lock_timeout = opt_duration(
            "lock_timeout",
            db.lock_timeout.clone().or(file.lock_timeout),
        )?
        .unwrap_or(d.lock_timeout);
        if lock_timeout.is_zero() || lock_timeout > Duration::from_secs(600) {
            return Err(invalid("lock_timeout", "must be between 1ms and 10m"));
        }
        let uuid_version = sel
            .uuid_version
            .or(file.uuid_version)
            .unwrap_or(dp.uuid_version);
        if uuid_version != 4 && uuid_version != 7 {
            return Err(invalid(
                "uuid_version",
                format!("{uuid_version} is not 4 or 7"),
            ));
        }
        let batch_size = bf.batch_size.or(file.batch_size).unwrap_or(d.batch_size);
        if !(1..=1_000_000).contains(&batch_size) {
            return Err(invalid("batch_size", "must be between 1 and 1000000"));
        }
        let jobs = bf.jobs.or(file.jobs).unwrap_or(d.jobs);
        if !(1..=32).contains(&jobs) {
            return Err(invalid("jobs", "must be between 1 and 32"));
        }
        let uuid_suffix = sel
            .uuid_suffix
            .or(file.uuid_suffix)
            .unwrap_or(dp.uuid_suffix);
        let legacy_suffix = sel
            .legacy_suffix
            .or(file.legacy_suffix)
            .unwrap_or(dp.legacy_suffix);
        for (key, v) in [
            ("uuid_suffix", &uuid_suffix),
            ("legacy_suffix", &legacy_suffix),
        ] {
            let ok = !v.is_empty()
                && v.len() <= 20
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(invalid(
                    key,
                    format!("{v:?}: use 1 to 20 characters among a-z, 0-9 and _"),
                ));
            }
        }
        if uuid_suffix == legacy_suffix {
            return Err(invalid("legacy_suffix", "must differ from uuid_suffix"));
        }
        let schemas = list(sel.schemas, file.schemas).unwrap_or(dp.schemas);
        if schemas.is_empty() || schemas.iter().any(|s| s.is_empty()) {
            return Err(invalid(
                "schemas",
                "must name at least one schema, with no empty name",
            ));
        }
        Ok(MigrateConfig {
            database_url,
            settings: crate::migrate::Settings {
                lock_timeout,
                ddl_retries: db.ddl_retries.or(file.ddl_retries).unwrap_or(d.ddl_retries),
                batch_size,
                jobs,
                max_rows_per_sec: bf
                    .max_rows_per_sec
                    .or(file.max_rows_per_sec)
                    .filter(|n| *n > 0),
            },
            plan: crate::migrate::plan::PlanOptions {
                schemas,
                tables: list(sel.tables, file.tables).unwrap_or_default(),
                exclude: list(sel.exclude, file.exclude).unwrap_or_default(),
                uuid_version,
                uuid_suffix,
                legacy_suffix,
            },
        })
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            key,
            format!(
                "{s:?} is not an IP address with a port, e.g. \"127.0.0.1:6432\" or \"[::]:6432\""
            ),
        )
    })
}

fn validate_host_port(key: &'static str, s: String) -> Result<String, ConfigError> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(s)
    } else {
        Err(invalid(
            key,
            format!("{s:?} is not host:port, e.g. \"db.internal:5432\""),
        ))
    }
}

/// Parses durations such as `500ms`, `30s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"500ms\", \"30s\" or \"2m\"")
    })
}

fn opt_duration(key: &'static str, s: Option<String>) -> Result<Option<Duration>, ConfigError> {
    s.map(|s| parse_duration(&s).map_err(|m| invalid(key, m)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str, args: &ProxyArgs) -> Result<ProxyConfig, ConfigError> {
        let file = FileConfig::parse(text).map_err(|message| ConfigError::Parse {
            path: "t.toml".into(),
            message,
        })?;
        ProxyConfig::resolve(file, args)
    }

    #[test]
    fn defaults() {
        let c = resolve("", &ProxyArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(c.upstream, "127.0.0.1:5432");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9187");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn upstream_pooling_values_from_the_file_and_the_flag() {
        for (text, want) in [
            ("auto", UpstreamPooling::Auto),
            ("transaction", UpstreamPooling::Transaction),
            ("transaction-prepared", UpstreamPooling::TransactionPrepared),
        ] {
            let c = resolve(
                &format!("upstream_pooling = \"{text}\""),
                &ProxyArgs::default(),
            )
            .unwrap();
            assert_eq!(c.upstream_pooling, want, "{text}");
            assert_eq!(
                <UpstreamPooling as clap::ValueEnum>::from_str(text, false),
                Ok(want)
            );
        }
        assert!(resolve("upstream_pooling = \"prepared\"", &ProxyArgs::default()).is_err());
    }

    #[test]
    fn flag_beats_file() {
        let args = ProxyArgs {
            listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let c = resolve("listen = \"127.0.0.1:6000\"\nupstream = \"db:5433\"", &args).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.upstream, "db:5433");
    }

    fn migrate(text: &str, db: &DbArgs) -> Result<MigrateConfig, ConfigError> {
        let file = FileConfig::parse(text).map_err(|message| ConfigError::Parse {
            path: "t.toml".into(),
            message,
        })?;
        MigrateConfig::resolve(file, db, None, None)
    }

    #[test]
    fn migrate_keys() {
        let db = DbArgs::default();
        let e = migrate("", &db).unwrap_err();
        assert!(e.to_string().contains("`database_url`"), "{e}");
        let base = "database_url = \"postgres://u@h/d\"\n";
        let c = migrate(base, &db).unwrap();
        assert_eq!(c.settings.lock_timeout, Duration::from_millis(500));
        assert_eq!(c.plan.schemas, ["public"]);
        assert_eq!(c.plan.uuid_version, 7);
        let c = migrate(
            &format!("{base}schemas = [\"app\", \"b\"]\nuuid_version = 4\nlock_timeout = \"2s\""),
            &db,
        )
        .unwrap();
        assert_eq!(c.plan.schemas, ["app", "b"]);
        assert_eq!(c.plan.uuid_version, 4);
        assert_eq!(c.settings.lock_timeout, Duration::from_secs(2));
        let flag = DbArgs {
            lock_timeout: Some("100ms".into()),
            ..Default::default()
        };
        let c = migrate(&format!("{base}lock_timeout = \"2s\""), &flag).unwrap();
        assert_eq!(c.settings.lock_timeout, Duration::from_millis(100));
        for (bad, key) in [
            ("uuid_version = 5", "`uuid_version`"),
            ("lock_timeout = \"soon\"", "`lock_timeout`"),
            ("batch_size = 0", "`batch_size`"),
            ("uuid_suffix = \"-X\"", "`uuid_suffix`"),
            ("legacy_suffix = \"_uuid\"", "`legacy_suffix`"),
            ("schemas = []", "`schemas`"),
        ] {
            let e = migrate(&format!("{base}{bad}"), &db).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = resolve("listen = \"nope\"", &ProxyArgs::default()).unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
        let e = resolve("shutdown_grace = \"soon\"", &ProxyArgs::default()).unwrap_err();
        assert!(e.to_string().contains("`shutdown_grace`"), "{e}");
        let e = resolve("lisen = \"127.0.0.1:1\"", &ProxyArgs::default()).unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = resolve("max_client_connections = \"ten\"", &ProxyArgs::default()).unwrap_err();
        assert!(e.to_string().contains("max_client_connections"), "{e}");
        let e = resolve("tls_cert = \"a.pem\"", &ProxyArgs::default()).unwrap_err();
        assert!(e.to_string().contains("`tls_key`"), "{e}");
    }
}
