//! The PostgreSQL wire-protocol proxy (work in progress).
use crate::config::ProxyConfig;

pub struct Proxy {
    _cfg: ProxyConfig,
}

impl Proxy {
    pub async fn bind(cfg: ProxyConfig) -> anyhow::Result<Proxy> {
        Ok(Proxy { _cfg: cfg })
    }
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        anyhow::bail!("not yet")
    }
}
