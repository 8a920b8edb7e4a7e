//! keyshift: move the integer primary keys of a live PostgreSQL database to UUIDs with no
//! downtime. See `docs/architecture.md` for a walk through the code.

pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod ident;
pub mod logging;
pub mod map;
pub mod metrics;
pub mod migrate;
pub mod output;
pub mod pgcluster;
pub mod proxy;
pub mod rewrite;
pub mod shape;
