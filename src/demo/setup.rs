//! Where the demo runs: a throwaway cluster of its own, or a database of its own on a server
//! the user points at; and the proxy, in this process on a thread of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_postgres::{Client, Config, NoTls};

use crate::config::ProxyConfig;
use crate::pgcluster::{Cluster, ClusterError, ClusterOptions};
use crate::proxy::{Proxy, ProxyError, Shared};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the thread running the throwaway PostgreSQL stopped unexpectedly")]
    ClusterThread,
    #[error("--database-url {0:?} is not a PostgreSQL URL or connection string: {1}")]
    BadUrl(String, tokio_postgres::Error),
    #[error("--database-url must name a TCP host (the proxy connects to it over TCP)")]
    NoTcpHost,
    #[error("cannot connect to {what}: {source}")]
    Connect {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("{what}: {source}")]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("starting the proxy: {0}")]
    Proxy(#[from] ProxyError),
    #[error("starting the proxy: {0}")]
    ProxyThread(std::io::Error),
}

/// How to reach the demo's server and database.
#[derive(Clone)]
pub struct Endpoint {
    /// How to reach the server as a superuser, database `postgres` (or the URL's own).
    admin: Config,
    /// The demo's database.
    pub dbname: String,
    /// `host:port` for the proxy's upstream.
    pub upstream: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub has_password: bool,
}

/// The server the demo uses and the database it works in.
pub struct Target {
    pub ep: Endpoint,
    /// Set in throwaway mode; stopping it removes the server and its files.
    cluster: Option<ClusterThread>,
    created: bool,
}

impl Target {
    /// Starts a throwaway cluster from the local server binaries, on a thread of its own;
    /// [`Target::ready`] waits for it. Kept by the caller from now on, so that an interrupt
    /// during initdb still stops the server and removes its files.
    pub fn throwaway() -> Result<Target, SetupError> {
        let cluster = ClusterThread::spawn()?;
        Ok(Target {
            ep: Endpoint {
                admin: Config::new(),
                dbname: "keyshift_demo".into(),
                upstream: String::new(),
                host: "127.0.0.1".into(),
                port: 0,
                user: "postgres".into(),
                has_password: false,
            },
            cluster: Some(cluster),
            created: false,
        })
    }

    /// Waits until the throwaway server accepts connections (nothing to wait for otherwise).
    pub async fn ready(&mut self) -> Result<(), SetupError> {
        let Some(rx) = self.cluster.as_mut().and_then(|c| c.ready.take()) else {
            return Ok(());
        };
        let port = rx.await.map_err(|_| SetupError::ClusterThread)??;
        let ep = &mut self.ep;
        ep.admin
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres");
        ep.upstream = format!("127.0.0.1:{port}");
        ep.port = port;
        Ok(())
    }

    /// An existing server, reached through `url`; the demo's database gets a random name.
    pub fn existing(url: &str) -> Result<Target, SetupError> {
        let mut admin: Config = url
            .parse()
            .map_err(|e| SetupError::BadUrl(url.to_string(), e))?;
        let host = admin
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .ok_or(SetupError::NoTcpHost)?;
        let port = admin.get_ports().first().copied().unwrap_or(5432);
        let user = admin
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        admin.user(&user);
        let has_password = admin.get_password().is_some();
        Ok(Target {
            ep: Endpoint {
                upstream: format!("{host}:{port}"),
                dbname: format!("keyshift_demo_{:08x}", rand::random::<u32>()),
                admin,
                host,
                port,
                user,
                has_password,
            },
            cluster: None,
            created: false,
        })
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    /// Creates the demo database (dropping a leftover of the same name in throwaway mode).
    pub async fn create_database(&mut self) -> Result<(), SetupError> {
        let admin = connect(&self.ep.admin, "the server").await?;
        let name = crate::ident::quote(&self.ep.dbname);
        sql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name}"),
            "dropping a leftover demo database",
        )
        .await?;
        sql(
            &admin,
            &format!("CREATE DATABASE {name}"),
            "creating the demo database",
        )
        .await?;
        self.created = true;
        Ok(())
    }

    /// Drops the demo database (first ending every session in it) and stops the throwaway
    /// cluster, if any. Errors are reported, not returned: this runs on the way out.
    pub async fn teardown(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.created && self.cluster.is_none() {
            let r = async {
                let admin = connect(&self.ep.admin, "the server").await?;
                let name = crate::ident::quote(&self.ep.dbname);
                // WITH (FORCE): PostgreSQL 13+, the oldest keyshift supports.
                sql(
                    &admin,
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    "dropping the demo database",
                )
                .await
            }
            .await;
            if let Err(e) = r {
                problems.push(format!("{e}; drop database {} by hand", self.ep.dbname));
            }
        }
        if let Some(c) = self.cluster.take()
            && let Err(e) = c.stop().await
        {
            problems.push(e.to_string());
        }
        problems
    }
}

impl Endpoint {
    /// Connection settings for the demo database, directly.
    pub fn direct(&self) -> Config {
        let mut c = self.admin.clone();
        c.dbname(&self.dbname);
        c
    }

    /// Connection settings for the demo database through a proxy at `addr`.
    pub fn through(&self, addr: SocketAddr) -> Config {
        let mut c = Config::new();
        c.host(addr.ip().to_string())
            .port(addr.port())
            .dbname(&self.dbname)
            .user(&self.user)
            .application_name("keyshift-demo-app");
        if let Some(p) = self.admin.get_password() {
            c.password(p);
        }
        c
    }

    /// A libpq URL of the demo database, for keyshift's own connections and the proxy's link.
    pub fn url(&self) -> String {
        let mut s = format!("postgres://{}", enc(&self.user));
        if let Some(p) = self.admin.get_password() {
            s.push(':');
            s.push_str(&enc(&String::from_utf8_lossy(p)));
        }
        s.push_str(&format!(
            "@{}:{}/{}",
            url_host(&self.host),
            self.port,
            enc(&self.dbname)
        ));
        s
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn url_host(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

/// Connects without TLS and drives the connection on a task.
pub async fn connect(cfg: &Config, what: &str) -> Result<Client, SetupError> {
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|source| SetupError::Connect {
            what: what.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn sql(c: &Client, sql: &str, what: &str) -> Result<(), SetupError> {
    c.batch_execute(sql)
        .await
        .map_err(|source| SetupError::Sql {
            what: what.to_string(),
            source,
        })
}

/// The throwaway cluster, owned by a thread of its own: the server is tied to the lifetime of
/// the thread that started it (`PR_SET_PDEATHSIG`), so not a thread of tokio's blocking pool,
/// which ends idle threads.
struct ClusterThread {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    ready: Option<tokio::sync::oneshot::Receiver<Result<u16, ClusterError>>>,
}

impl ClusterThread {
    fn spawn() -> Result<ClusterThread, SetupError> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keyshift-demo-pg".into())
            .spawn(move || match Cluster::start(&ClusterOptions::default()) {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(c.port()));
                    // Until told to stop, or until the demo drops its handle.
                    let _ = stop_rx.recv();
                    drop(c);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| ClusterError::Io("starting the cluster thread", e))?;
        Ok(ClusterThread {
            stop,
            thread,
            ready: Some(ready_rx),
        })
    }

    /// Stops the server and removes its directory; returns when that is done.
    async fn stop(self) -> Result<(), SetupError> {
        let _ = self.stop.send(());
        let t = self.thread;
        tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|_| SetupError::ClusterThread)?
            .map_err(|_| SetupError::ClusterThread)
    }
}

/// The proxy, on a thread and runtime of its own like `keyshift proxy`, so that the demo's
/// clients and steps never share a scheduler with the relay they measure.
pub struct ProxyThread {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyThread {
    pub async fn start(cfg: ProxyConfig) -> Result<ProxyThread, SetupError> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SetupError::ProxyThread)?;
        let thread = std::thread::Builder::new()
            .name("keyshift-demo-proxy".into())
            .spawn(move || {
                rt.block_on(async move {
                    let proxy = match Proxy::bind(cfg).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ =
                        ready_tx.send(Ok((proxy.local_addr(), proxy.admin_addr(), proxy.shared())));
                    if let Err(e) = proxy
                        .run(async move {
                            let _ = stop_rx.await;
                        })
                        .await
                    {
                        tracing::warn!("demo proxy: {e}");
                    }
                })
            })
            .map_err(SetupError::ProxyThread)?;
        match ready_rx.await {
            Ok(Ok((addr, admin, shared))) => Ok(ProxyThread {
                addr,
                admin,
                shared,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SetupError::ProxyThread(std::io::Error::other(
                "the proxy thread ended before it was ready",
            ))),
        }
    }

    /// Stops accepting, lets sessions end (its `shutdown_grace`), stops the database link.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The proxy's configuration for the demo: ephemeral ports unless `listen` says otherwise,
/// dual-write rules from the demo database, a short shutdown grace.
pub fn proxy_config(ep: &Endpoint, listen: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        listen,
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream: ep.upstream.clone(),
        database_url: Some(ep.url()),
        proxy_id: Some("keyshift-demo".into()),
        shutdown_grace: std::time::Duration::from_secs(2),
        worker_threads: 1,
        ..ProxyConfig::default()
    }
}
