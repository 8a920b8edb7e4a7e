//! Lookups: the cache first, then one query per request for every miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

use super::cache::{GenCache, Id, Key};
use super::catalog::{self, MapCatalog, MapTable};
use crate::metrics::MapMetrics;

/// Ids accepted in one batch request.
pub const MAX_BATCH: usize = 10_000;
/// Connections the mapping may hold to the database, besides the control link.
const POOL_SIZE: usize = 4;
/// A lookup that cannot get an answer in this time is reported unavailable (HTTP 503).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("this proxy has no database_url, so it cannot read the id mapping")]
    NoDatabase,
    #[error(
        "there is no id mapping in this database: no migration, and no archive kept by `finalize --keep-map`"
    )]
    NoMapping,
    #[error("unknown table {name:?}: the mapped tables are {known}")]
    UnknownTable { name: String, known: String },
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

/// The catalog in force and the cache that goes with it.
struct MapState {
    catalog: Arc<MapCatalog>,
    cache: Arc<GenCache<Key, Id>>,
}

pub struct MapService {
    url: Option<String>,
    search_path: Vec<String>,
    capacity: usize,
    state: ArcSwapOption<MapState>,
    pool: Pool,
    metrics: MapMetrics,
    /// Serialises catalog loads done on demand.
    loading: tokio::sync::Mutex<()>,
}

/// What a lookup found, in the order asked: `Some(other side)` or `None` (no such row).
pub struct Answer {
    pub table: String,
    pub found: Vec<Option<Id>>,
}

impl MapService {
    pub fn new(
        url: Option<String>,
        search_path: Vec<String>,
        capacity: usize,
        metrics: MapMetrics,
    ) -> MapService {
        MapService {
            pool: Pool::new(url.clone()),
            url,
            search_path,
            capacity,
            state: ArcSwapOption::empty(),
            metrics,
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Puts a catalog in force. The cache survives when the catalog describes the same
    /// mapping (a cutover or rollback moves columns, not values).
    pub fn set_catalog(&self, catalog: Option<MapCatalog>) {
        let current = self.state.load_full();
        let next = catalog.map(|c| {
            let cache = match &current {
                Some(s) if s.catalog.stamp == c.stamp && s.catalog.names() == c.names() => {
                    s.cache.clone()
                }
                _ => Arc::new(GenCache::new(self.capacity)),
            };
            Arc::new(MapState {
                catalog: Arc::new(c),
                cache,
            })
        });
        let changed = match (&current, &next) {
            (Some(a), Some(b)) => a.catalog != b.catalog,
            (None, None) => false,
            _ => true,
        };
        if changed {
            match &next {
                Some(s) => info!(
                    tables = s.catalog.tables.len(),
                    source = ?s.catalog.source,
                    "id mapping catalog in force"
                ),
                None => info!("no id mapping in the database"),
            }
        }
        self.state.store(next);
    }

    /// Reads the catalog from the database now (on demand, or after a lookup found the
    /// columns moved).
    pub async fn reload(&self) -> Result<(), MapError> {
        let _one = self.loading.lock().await;
        let conn = self.pool.get().await?;
        let cat = tokio::time::timeout(QUERY_TIMEOUT, catalog::load(&conn.client))
            .await
            .map_err(|_| MapError::Unavailable("no answer in time".into()))?
            .map_err(|e| MapError::Unavailable(e.to_string()))?;
        self.set_catalog(cat);
        Ok(())
    }

    /// For `/v1/status`: where the mapping is read from, how many tables, cached ids.
    pub fn status(&self) -> serde_json::Value {
        match self.state.load().as_ref() {
            None if self.url.is_none() => serde_json::json!({"source": "disabled"}),
            None => serde_json::json!({"source": "none"}),
            Some(s) => serde_json::json!({
                "source": match s.catalog.source {
                    super::catalog::Source::Live => "live",
                    super::catalog::Source::Archive => "archive",
                },
                "tables": s.catalog.tables.len(),
                "cache_entries": s.cache.len(),
            }),
        }
    }

    pub fn cache_len(&self) -> usize {
        self.state.load().as_ref().map_or(0, |s| s.cache.len())
    }

    pub fn metrics(&self) -> &MapMetrics {
        &self.metrics
    }

    async fn state(&self) -> Result<Arc<MapState>, MapError> {
        if self.url.is_none() {
            return Err(MapError::NoDatabase);
        }
        if let Some(s) = self.state.load_full() {
            return Ok(s);
        }
        self.reload().await?;
        self.state.load_full().ok_or(MapError::NoMapping)
    }

    /// Looks up `ids` (all of one side) in `table`. Hits come from the cache; the misses
    /// are read in one query.
    pub async fn lookup(&self, table: &str, ids: &[Id]) -> Result<Answer, MapError> {
        let started = Instant::now();
        let out = self.lookup_inner(table, ids).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        out
    }

    async fn lookup_inner(&self, table: &str, ids: &[Id]) -> Result<Answer, MapError> {
        let mut retried = false;
        loop {
            let st = self.state().await?;
            let Some((idx, t)) = st.catalog.resolve(table, &self.search_path) else {
                return Err(MapError::UnknownTable {
                    name: table.to_string(),
                    known: st.catalog.names().join(", "),
                });
            };
            let mut found: Vec<Option<Id>> =
                ids.iter().map(|id| st.cache.get(&(idx, *id))).collect();
            let hits = found.iter().filter(|f| f.is_some()).count();
            self.metrics.hit.inc_by(hits as u64);
            let misses: Vec<usize> = (0..ids.len()).filter(|&i| found[i].is_none()).collect();
            if misses.is_empty() {
                return Ok(Answer {
                    table: t.name.clone(),
                    found,
                });
            }
            match self.fetch(&st.catalog, t, ids, &misses).await {
                Ok(rows) => {
                    for &i in &misses {
                        if let Some(other) = rows.get(&ids[i]) {
                            found[i] = Some(*other);
                            st.cache.insert((idx, ids[i]), *other);
                        }
                    }
                    let got = misses.iter().filter(|&&i| found[i].is_some()).count();
                    self.metrics.miss.inc_by(got as u64);
                    self.metrics.not_found.inc_by((misses.len() - got) as u64);
                    return Ok(Answer {
                        table: t.name.clone(),
                        found,
                    });
                }
                // The columns moved under us (a cutover or rollback committed before the
                // control link brought the new catalog): read the catalog again, once.
                Err(FetchError::Moved) if !retried => {
                    retried = true;
                    self.reload().await?;
                }
                Err(e) => {
                    self.metrics.error.inc_by(misses.len() as u64);
                    return Err(match e {
                        FetchError::Moved => MapError::Unavailable(
                            "the mapped tables changed during the lookup; retry".into(),
                        ),
                        FetchError::Map(e) => e,
                    });
                }
            }
        }
    }

    /// Reads the other side of `ids[misses]` in one round trip.
    async fn fetch(
        &self,
        cat: &MapCatalog,
        t: &MapTable,
        ids: &[Id],
        misses: &[usize],
    ) -> Result<HashMap<Id, Id>, FetchError> {
        let mut legacy: Vec<i64> = Vec::new();
        let mut uuids: Vec<String> = Vec::new();
        for &i in misses {
            match ids[i] {
                Id::Legacy(l) => legacy.push(l),
                Id::Uuid(u) => uuids.push(uuid::Uuid::from_u128(u).to_string()),
            }
        }
        let mut conn = self.pool.get().await?;
        let work = async {
            let mut out = HashMap::new();
            let mut collect = |rows: Vec<tokio_postgres::Row>, by_legacy: bool| {
                for r in rows {
                    let l: i64 = r.get(0);
                    let u: String = r.get(1);
                    let Ok(u) = uuid::Uuid::parse_str(&u) else {
                        continue;
                    };
                    let (k, v) = if by_legacy {
                        (Id::Legacy(l), Id::Uuid(u.as_u128()))
                    } else {
                        (Id::Uuid(u.as_u128()), Id::Legacy(l))
                    };
                    out.insert(k, v);
                }
            };
            if !legacy.is_empty() {
                let stmt = conn.prepare(&cat.by_legacy_sql(t)).await?;
                collect(conn.client.query(&stmt, &[&legacy]).await?, true);
            }
            if !uuids.is_empty() {
                let stmt = conn.prepare(&cat.by_uuid_sql(t)).await?;
                collect(conn.client.query(&stmt, &[&uuids]).await?, false);
            }
            Ok::<_, tokio_postgres::Error>(out)
        };
        let outcome = tokio::time::timeout(QUERY_TIMEOUT, work).await;
        match outcome {
            Err(_) => {
                conn.broken = true;
                Err(FetchError::Map(MapError::Unavailable(
                    "no answer within 5s".into(),
                )))
            }
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => {
                conn.stmts.clear();
                let code = e.code();
                if code == Some(&SqlState::UNDEFINED_COLUMN)
                    || code == Some(&SqlState::UNDEFINED_TABLE)
                    || code == Some(&SqlState::FEATURE_NOT_SUPPORTED)
                {
                    return Err(FetchError::Moved);
                }
                if e.is_closed() || e.as_db_error().is_none() {
                    conn.broken = true;
                }
                warn!(error = %crate::migrate::db::describe(&e), "id mapping lookup failed");
                Err(FetchError::Map(MapError::Unavailable(
                    crate::migrate::db::describe(&e),
                )))
            }
        }
    }
}

enum FetchError {
    Moved,
    Map(MapError),
}

impl From<MapError> for FetchError {
    fn from(e: MapError) -> Self {
        FetchError::Map(e)
    }
}

/// A few connections to `database_url`, opened on demand and kept while they work.
struct Pool {
    url: Option<String>,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

struct Conn {
    client: Client,
    /// Prepared lookups by SQL text: a hit is one round trip (Bind/Execute).
    stmts: HashMap<String, Statement>,
}

struct PooledConn<'a> {
    conn: Option<Conn>,
    pool: &'a Pool,
    broken: bool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Pool {
    fn new(url: Option<String>) -> Pool {
        Pool {
            url,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(POOL_SIZE),
        }
    }

    async fn get(&self) -> Result<PooledConn<'_>, MapError> {
        let url = self.url.as_deref().ok_or(MapError::NoDatabase)?;
        let permit = tokio::time::timeout(QUERY_TIMEOUT, self.permits.acquire())
            .await
            .map_err(|_| MapError::Unavailable("every mapping connection is busy".into()))?
            .map_err(|_| MapError::Unavailable("shutting down".into()))?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) if !c.client.is_closed() => c,
            _ => {
                let client =
                    tokio::time::timeout(Duration::from_secs(3), crate::migrate::db::connect(url))
                        .await
                        .map_err(|_| MapError::Unavailable("connecting timed out after 3s".into()))?
                        .map_err(|e| MapError::Unavailable(first_line(&e.to_string())))?;
                Conn {
                    client,
                    stmts: HashMap::new(),
                }
            }
        };
        Ok(PooledConn {
            conn: Some(conn),
            pool: self,
            broken: false,
            _permit: permit,
        })
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

impl PooledConn<'_> {
    async fn prepare(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let conn = self.conn_mut();
        if let Some(s) = conn.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = conn.client.prepare(sql).await?;
        if conn.stmts.len() >= 64 {
            conn.stmts.clear();
        }
        conn.stmts.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn conn_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("a pooled connection is present until drop"))
    }
}

impl std::ops::Deref for PooledConn<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("a pooled connection is present until drop"))
    }
}

impl std::ops::DerefMut for PooledConn<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn_mut()
    }
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.broken
            && !c.client.is_closed()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}
