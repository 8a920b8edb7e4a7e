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
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{info, warn};

use super::Shared;
use super::statements::ActiveRewriter;
use crate::dualwrite::{self, Settings};
use crate::migrate::metrics::MigrateMetrics;
use crate::migrate::{progress, state};

/// How often the proxy proves it is alive and re-reads the state (a backstop for a missed
/// notification).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    State(#[from] state::StateError),
    #[error("the connection to the migrated database was lost")]
    Lost,
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
        self.refresh(client).await?;
        self.shared.control_connected.store(true, Ordering::Relaxed);
        info!(proxy_id = %self.id, rules_version = self.version, "linked to the migrated database");
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(_) => self.refresh(client).await?,
                    None => return Err(ControlError::Lost),
                },
                _ = tick.tick() => self.refresh(client).await?,
            }
        }
    }

    /// Reads the migration; rebuilds the rules when its version moved; heartbeats.
    async fn refresh(&mut self, client: &Client) -> Result<(), ControlError> {
        let migration = match state::load_migration(client).await {
            Ok(m) => m,
            // An unreadable plan must not take the rules away from running sessions.
            Err(state::StateError::Db(e)) => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "cannot read keyshift's state; keeping the current rules");
                return Ok(());
            }
        };
        match &migration {
            None if self.version != 0 => {
                info!("no migration in the database any more; passing every statement through");
                self.shared.set_rewriter(None);
                self.shared.metrics.rewrite.rules_version.set(0);
                self.version = 0;
            }
            None => {}
            Some(m) if m.rules_version != self.version => {
                match dualwrite::build(
                    client,
                    &m.plan,
                    m.phase,
                    m.rules_version as u64,
                    &self.settings,
                    self.shared.metrics.rewrite.clone(),
                )
                .await
                {
                    Ok(rw) => {
                        let mode = if rw.is_some() {
                            "dual-write"
                        } else {
                            "passthrough"
                        };
                        info!(phase = %m.phase, rules_version = m.rules_version, mode, "new rules in force");
                        self.shared.set_rewriter(rw.map(|r| ActiveRewriter {
                            database: self.database.clone(),
                            rewriter: Box::new(r),
                        }));
                        self.shared
                            .metrics
                            .rewrite
                            .rules_version
                            .set(m.rules_version);
                        self.version = m.rules_version;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot build rewrite rules; keeping the current ones")
                    }
                }
            }
            Some(_) => {}
        }
        if migration.is_some() {
            self.heartbeat(client).await?;
            if let Some(mm) = &self.migrate_metrics
                && let Ok(p) = progress::read(client).await
            {
                mm.observe(&p);
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, client: &Client) -> Result<(), ControlError> {
        let address = self.shared.cfg.listen.to_string();
        client
            .execute(
                "INSERT INTO keyshift.proxies (id, address, pid, version, heartbeat_at, acked_rules_version)
                 VALUES ($1, $2, $3, $4, now(), $5)
                 ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, pid = EXCLUDED.pid,
                   version = EXCLUDED.version, heartbeat_at = now(),
                   acked_rules_version = EXCLUDED.acked_rules_version",
                &[
                    &self.id,
                    &address,
                    &(std::process::id() as i32),
                    &env!("CARGO_PKG_VERSION"),
                    &self.version,
                ],
            )
            .await?;
        Ok(())
    }
}
