//! The online schema side of a migration: `plan`, `expand`, `backfill`, `harden`, `verify`,
//! `status` and `abort`, and keyshift's views per shape ([`views`]).
//!
//! Data flows one way: [`catalog`] reads PostgreSQL into plain structs, [`plan`] turns them
//! into a [`plan::Plan`] (pure), [`ddl`] turns a plan into the SQL of every phase (pure), and
//! the command modules run that SQL, keeping their state in schema `keyshift` ([`state`]).
//! The proxy reads the same state through [`state::load`] and [`progress::read`].

pub mod abort;
pub mod autovacuum;
pub mod backfill;
pub mod by_table;
pub mod carry;
pub mod catalog;
pub mod db;
pub mod ddl;
pub mod eta;
pub mod expand;
pub mod fill;
pub mod harden;
pub mod metrics;
pub mod mirror;
pub mod partitions;
pub mod plan;
pub mod progress;
pub mod shapes;
pub mod state;
pub mod status;
pub mod switch;
pub mod verify;
pub mod views;

use std::time::Duration;

/// Settings shared by the migration commands, already resolved from flags, environment,
/// config file and defaults (see `config::MigrateConfig`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub lock_timeout: Duration,
    pub ddl_retries: u32,
    pub batch_size: i64,
    pub max_rows_per_sec: Option<u64>,
    /// Backfill connections working at once (tables of the same dependency level, FKs).
    pub jobs: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lock_timeout: Duration::from_millis(500),
            ddl_retries: 30,
            batch_size: 5000,
            max_rows_per_sec: None,
            jobs: 1,
        }
    }
}
