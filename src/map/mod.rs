//! The id mapping, integer id ↔ UUID, for everything outside the database: the SQL view
//! `keyshift.id_map` (src/migrate/ddl.rs), `/v1/map` on the proxy's admin listener with a
//! cache, and `keyshift map` / `keyshift map export` for operators.

pub mod cache;
pub mod catalog;
pub mod export;
pub mod http;
pub mod service;

pub use service::{MapError, MapService};
