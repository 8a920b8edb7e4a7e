//! Connections to the PostgreSQL server: TCP, then TLS as configured.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use super::wire::startup::{self as frame, CANCEL_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::config::{ProxyConfig, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} connecting to PostgreSQL at {addr}")]
    Timeout { addr: String, timeout: Duration },
    #[error("PostgreSQL at {0} does not support TLS, and upstream_tls requires it")]
    NoTls(String),
    #[error("PostgreSQL at {addr}: TLS handshake failed: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("PostgreSQL at {0} answered the SSL request with an unexpected byte")]
    BadAnswer(String),
    #[error("upstream host {0:?} is not a valid TLS server name")]
    BadName(String),
}

/// Where and how to reach PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    addr: Arc<str>,
    host: Arc<str>,
    mode: UpstreamTls,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &ProxyConfig, tls: Option<Arc<ClientConfig>>) -> Upstream {
        let host = cfg
            .upstream
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&cfg.upstream);
        Upstream {
            addr: cfg.upstream.as_str().into(),
            host: host.into(),
            mode: cfg.upstream_tls,
            tls,
            timeout: cfg.connect_timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Connects within the connect timeout, negotiating TLS per `upstream_tls`.
    pub async fn connect(&self) -> Result<Stream, UpstreamError> {
        match tokio::time::timeout(self.timeout, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                addr: self.addr.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    async fn connect_inner(&self) -> Result<Stream, UpstreamError> {
        let addr = self.addr.to_string();
        let connect_err = |source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        };
        let mut tcp = TcpStream::connect(&*self.addr).await.map_err(connect_err)?;
        // Every message is a round trip someone waits on: never let Nagle hold one back.
        tcp.set_nodelay(true).map_err(connect_err)?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let req = frame::build_request(SSL_REQUEST_CODE, &[]);
        tcp.write_all(&req).await.map_err(connect_err)?;
        let answer = tcp.read_u8().await.map_err(connect_err)?;
        match answer {
            b'S' => {
                let name = ServerName::try_from(self.host.to_string())
                    .map_err(|_| UpstreamError::BadName(self.host.to_string()))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let s = connector.connect(name, tcp).await.map_err(|source| {
                    UpstreamError::Handshake {
                        addr: addr.clone(),
                        source,
                    }
                })?;
                Ok(Stream::ClientTls(Box::new(s)))
            }
            b'N' if self.mode == UpstreamTls::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => Err(UpstreamError::NoTls(addr)),
            _ => Err(UpstreamError::BadAnswer(addr)),
        }
    }

    /// Sends a CancelRequest for an upstream backend on a new connection, as libpq does.
    pub async fn cancel(&self, pid: u32, secret: u32) -> Result<(), UpstreamError> {
        let mut s = self.connect().await?;
        let pkt = frame::build_request(CANCEL_REQUEST_CODE, &[pid, secret]);
        let io_err = |source| UpstreamError::Connect {
            addr: self.addr.to_string(),
            source,
        };
        s.write_all(&pkt).await.map_err(io_err)?;
        s.flush().await.map_err(io_err)?;
        // The server closes the connection once it has read the request.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(self.timeout, s.read(&mut sink)).await;
        Ok(())
    }
}
