//! The id mapping, integer id ↔ UUID, for everything outside the database: the SQL view
//! `keyshift.id_map` (src/migrate/ddl.rs), the cached lookup service that the proxy serves on
//! `/v1/map` (src/proxy/admin/map.rs), and `keyshift map` / `keyshift map export` for
//! operators. The proxy calls into this module, never the other way round.

pub mod cache;
pub mod catalog;
pub mod export;
pub mod service;

pub use service::{MapError, MapService};
