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
    // One single-threaded runtime per thread, each owning whole sessions (see
    // `Proxy::with_workers` for why not tokio's work-stealing runtime). The main thread's
    // runtime also runs the listener, the admin endpoint and the signal handlers.
    let threads = match cfg.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    let mut threads_running = Vec::new();
    for i in 1..threads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        let mut stop = stop_rx.clone();
        threads_running.push(
            std::thread::Builder::new()
                .name(format!("keyshift-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                })?,
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let proxy = crate::proxy::Proxy::bind(cfg).await?.with_workers(handles);
        proxy.run_until_signal().await?;
        Ok(())
    });
    // Sessions have ended (or been closed) by now: stop the workers.
    let _ = stop_tx.send(true);
    for t in threads_running {
        let _ = t.join();
    }
    result
}
