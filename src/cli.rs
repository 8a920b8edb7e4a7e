//! The command line: parses arguments, loads configuration, runs one command. `anyhow` lives
//! here and nowhere else; exit codes are 0 (done), 1 (failed) and 2 (bad usage or configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, FileConfig, ProxyArgs, ProxyConfig};

#[derive(Debug, Parser)]
#[command(
    name = "keyshift",
    version,
    about = "Move integer primary keys of a live PostgreSQL database to UUIDs, with no downtime",
    long_about = "keyshift moves the integer primary keys of a live PostgreSQL database, and every \
foreign key that references them, to UUIDs while the application keeps running. It is a \
PostgreSQL wire-protocol proxy that applications connect to unchanged, and the operator \
commands that drive the migration. All durable state lives in the target database."
)]
pub struct Cli {
    /// Configuration file (TOML); every key can also be given as a flag or KEYSHIFT_* variable
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "KEYSHIFT_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the PostgreSQL proxy that applications connect to instead of PostgreSQL
    #[command(
        long_about = "Run the PostgreSQL proxy. Applications connect to it exactly as \
they would to PostgreSQL (session mode: one server connection per client connection). \
The admin HTTP endpoint serves /metrics (Prometheus), /healthz, /readyz and /v1/{status,pause,resume}.\n\n\
Every option can also be set in the config file (see deploy/keyshift.toml) or as a KEYSHIFT_* \
environment variable; flags win over the environment, which wins over the file."
    )]
    Proxy(ProxyArgs),
}

fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, ConfigError> {
    match path {
        Some(p) => FileConfig::load(p),
        None => Ok(FileConfig::default()),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy(ref args) => {
            let cfg = match load_file(&cli.config).and_then(|f| ProxyConfig::resolve(f, args)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("keyshift: {e}");
                    return ExitCode::from(2);
                }
            };
            crate::logging::init(cfg.log_format, &cfg.log_level);
            match run_proxy(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keyshift proxy: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn run_proxy(cfg: ProxyConfig) -> anyhow::Result<()> {
    let mut builder = if cfg.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if cfg.worker_threads > 1 {
            b.worker_threads(cfg.worker_threads);
        }
        b
    };
    let rt = builder.enable_all().build()?;
    rt.block_on(async move {
        let proxy = crate::proxy::Proxy::bind(cfg).await?;
        proxy.run_until_signal().await?;
        Ok(())
    })
}
