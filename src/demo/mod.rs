//! `keyshift demo`: a whole migration of seed 004's five tables under live traffic, on a
//! throwaway PostgreSQL (or in a database of its own on a server given by URL), narrated
//! step by step and checked against the seeds' success criteria.
//!
//! [`setup`] gets a server and the proxy, [`seed`] loads the data, [`workload`] runs the
//! application's clients, [`steps`] runs the migration through the library calls the CLI
//! makes, [`report`] checks the criteria and prints the result.

pub mod report;
pub mod seed;
pub mod setup;
pub mod steps;
pub mod workload;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::output::Format;
use report::{Report, Snapshot, StepTime};
use setup::{ProxyThread, SetupError, Target};
use steps::StepError;
use workload::Workload;

/// `keyshift demo --help`: the whole story, since the demo is the first thing a newcomer runs.
pub const LONG_ABOUT: &str = "\
Migrate the integer primary keys of seed 004's five tables (mcp_connectors, connector_access, \
mcp_servers, mcp_server_tokens, mcp_server_tools: the guide in seeds/004) to UUIDs while an \
application keeps writing to them, and check the result against the seeds' success criteria.

What it does, narrating each step in one sentence:
  1. starts a throwaway PostgreSQL from the local server binaries (initdb in a temporary \
directory, a free port; as root it runs them as the `postgres` OS user), or, with \
--database-url, creates database keyshift_demo_<random> on that server;
  2. loads the five tables with about --rows rows;
  3. starts a keyshift proxy in this process, linked to the database so that its dual-write \
rules follow the migration, and --clients application clients through it: inserts, FK \
updates, deletes (with ON DELETE CASCADE) and reads, in transactions, over the simple \
protocol, with statements prepared once (and used across the cutover) and prepared at each \
use. They follow the cutover contract of docs/cutover.md: ids are read back and sent as text, \
so the same code runs before and after the keys become UUIDs;
  4. runs, as `keyshift plan`, `expand`, `backfill` (progress bars on a terminal, then harden), \
`verify` and `cutover` would, with their default settings;
  5. verifies again: the seeds' success criteria one by one (UUID primary keys under their \
names; the foreign keys re-created with their original names and ON DELETE / ON UPDATE \
actions, on uuid columns; no orphans; row counts equal to what the clients committed; indexes \
rebuilt and valid; the legacy integers kept for a rollback; CRUD and ON DELETE CASCADE with \
UUID ids through the proxy; 0 client errors);
  6. prints a report: rows migrated, backfill rate, the cutover's swap time and how long the \
proxy held its clients, the longest any client waited for a statement (and p50 / p99), per \
step, and each criterion PASS or FAIL.

Exit code: 0 when every criterion passed and no client saw an error; 1 otherwise; 2 for bad \
usage (an unusable --database-url, or --database-url without --yes when stdin is not a \
terminal); 130 when interrupted.

Needs PostgreSQL 13 or newer. Without --database-url, its server binaries (`initdb`, \
`postgres`, `pg_isready`; `psql` for --keep-running) are looked for in $KEYSHIFT_PG_BIN, on \
PATH, then under /usr/lib/postgresql/*/bin; if there are none it says what to install \
(`apt-get install postgresql`, `dnf install postgresql-server`, `brew install postgresql@16`).

Ctrl-C (or SIGTERM) at any moment stops the clients and the proxy and removes what the demo \
created: the throwaway server and its directory, or the keyshift_demo_* database. With \
--keep-running, everything stays up after the report, with the psql commands to look around \
(through the proxy and direct), until Ctrl-C.

--database-url asks before creating and dropping its database when stdin is a terminal; \
without a terminal it refuses unless --yes is given (nobody could answer). The throwaway \
server needs no confirmation: it touches nothing of yours. The demo reads no config file and \
no KEYSHIFT_* variable, so it never runs against the database a real migration is \
configured for.

Examples:
  keyshift demo                                   # about a minute, release build
  keyshift demo --rows 20000 --format json        # small, machine-readable report
  keyshift demo --keep-running                    # then look around with psql
  keyshift demo --database-url postgres://postgres@db:5432/postgres --yes";

/// The flags of `keyshift demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// About how many rows to load into the five tables before migrating them (per connector:
    /// 2 access grants, 3 servers, 4 tokens, 6 tools)
    #[arg(long, default_value_t = DEFAULT_ROWS, value_name = "N")]
    pub rows: u64,
    /// Application clients running through the proxy for the whole demo
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub clients: usize,
    /// Run against this existing server instead of a throwaway one, in a database of its
    /// own (keyshift_demo_<random>, created through this URL and dropped at the end); the
    /// URL's user must be allowed to create databases
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// At the end, leave the proxy and the database up and print the psql commands to look
    /// around, until Ctrl-C
    #[arg(long)]
    pub keep_running: bool,
    /// Do not ask before creating and dropping the demo database on the server of
    /// --database-url (required there when stdin is not a terminal)
    #[arg(long)]
    pub yes: bool,
    /// Address the demo's proxy listens on (port 0: any free port)
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Report format on stdout; the narration and progress go to stderr either way
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// About a minute for the whole demo in release mode on a 2-core machine.
pub const DEFAULT_ROWS: u64 = 600_000;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("{what}: {}", crate::migrate::db::describe(.source))]
    Sql {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

fn sql_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DemoError {
    move |source| DemoError::Sql { what, source }
}

/// The steps during which the clients' waits are measured, in order.
pub const STEPS: [&str; 7] = [
    "warm-up",
    "plan",
    "expand",
    "backfill",
    "verify",
    "cutover",
    "verify again",
];

/// Narration goes to stderr, one sentence a step; the report goes to stdout.
fn say(msg: &str) {
    eprintln!("\n==> {msg}");
}

fn note(msg: &str) {
    eprintln!("    {msg}");
}

/// Entry point from the CLI: asks what must be asked, runs, prints, cleans up.
pub fn main(args: &DemoArgs) -> ExitCode {
    crate::logging::init(
        crate::config::LogFormat::Text,
        "warn,keyshift::migrate::progress=info",
    );
    let target = match &args.database_url {
        Some(url) => match Target::existing(url) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("keyshift demo: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if let Some(t) = &target
        && !args.yes
    {
        match confirm(t) {
            Ok(true) => {}
            Ok(false) => {
                eprintln!("keyshift demo: not confirmed, nothing done");
                return ExitCode::from(1);
            }
            Err(msg) => {
                eprintln!("keyshift demo: {msg}");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyshift demo: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(rt.block_on(run(args.clone(), target)))
}

/// Asks before touching the user's server. Without a terminal nobody can answer: refuse.
fn confirm(t: &Target) -> Result<bool, String> {
    use std::io::{BufRead, Write};
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "--database-url: the demo would create database {} on {}:{} and drop it at the end; pass --yes to confirm when stdin is not a terminal",
            t.ep.dbname, t.ep.host, t.ep.port
        ));
    }
    eprint!(
        "The demo creates database {} on {}:{} as {}, migrates it under load and drops it at the end; it touches nothing else. Go on? [y/N] ",
        t.ep.dbname, t.ep.host, t.ep.port, t.ep.user
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// What is running, so that whatever happens it can be stopped in order.
struct Running {
    target: Option<Target>,
    proxy: Option<ProxyThread>,
    workload: Option<Workload>,
    step: Arc<AtomicUsize>,
    report: Report,
    steps: Vec<(String, f64, Option<usize>)>,
}

/// Runs the demo; returns the exit code: 0 when every criterion passed with no client
/// error, 1 otherwise, 130 when interrupted.
pub async fn run(args: DemoArgs, target: Option<Target>) -> u8 {
    let started = Instant::now();
    let mut run = Running {
        target,
        proxy: None,
        workload: None,
        step: Arc::new(AtomicUsize::new(0)),
        report: Report {
            passed: false,
            server: String::new(),
            database: String::new(),
            seeded_rows: 0,
            rows_migrated: 0,
            backfill: None,
            cutover: None,
            clients: None,
            steps: Vec::new(),
            criteria: Vec::new(),
            error: None,
            wall_seconds: 0.0,
        },
        steps: Vec::new(),
    };
    let result = tokio::select! {
        r = body(&args, &mut run) => r,
        _ = interrupted() => Err(DemoError::Interrupted),
    };
    let interrupted_early = matches!(result, Err(DemoError::Interrupted));
    if let Err(e) = &result {
        if !interrupted_early {
            eprintln!("\nkeyshift demo: {e}");
        }
        run.report.error = Some(e.to_string());
    }
    // Clients still running after a failure: stop them and keep what they saw. After an
    // interrupt nobody reads the report: they are just dropped (aborted).
    if let Some(w) = run.workload.take()
        && !interrupted_early
    {
        match tokio::time::timeout(Duration::from_secs(15), w.stop()).await {
            Ok(r) => run.report.clients = Some(r),
            Err(_) => eprintln!("keyshift demo: the clients did not stop within 15 s"),
        }
    }
    finish_report(&mut run, started);
    let passed = run.report.passed;
    if !interrupted_early {
        match args.format {
            // Nothing ran: the error said it all.
            Format::Text if run.report.server.is_empty() => {}
            Format::Text => print!("{}", run.report.render_text()),
            Format::Json => match serde_json::to_string_pretty(&run.report) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("keyshift demo: {e}"),
            },
        }
        if args.keep_running
            && let (Some(t), Some(p)) = (&run.target, &run.proxy)
        {
            keep_running_banner(t, p);
            interrupted().await;
        }
    }
    cleanup(&mut run).await;
    if interrupted_early {
        eprintln!("keyshift demo: interrupted; everything it started is stopped and removed");
        130
    } else if passed {
        0
    } else {
        1
    }
}

fn finish_report(run: &mut Running, started: Instant) {
    let by_step = run
        .report
        .clients
        .as_ref()
        .map(|c| c.max_wait_ms_by_step.clone())
        .unwrap_or_default();
    run.report.steps = run
        .steps
        .iter()
        .map(|(name, secs, idx)| StepTime {
            step: name.clone(),
            seconds: *secs,
            max_client_wait_ms: idx.and_then(|i| by_step.get(i).copied()).unwrap_or(0.0),
        })
        .collect();
    run.report.wall_seconds = started.elapsed().as_secs_f64();
    let errors = run.report.clients.as_ref().map_or(0, |c| c.errors);
    run.report.passed = run.report.error.is_none()
        && errors == 0
        && !run.report.criteria.is_empty()
        && run.report.criteria.iter().all(|c| c.passed);
}

fn keep_running_banner(t: &Target, p: &ProxyThread) {
    let t = &t.ep;
    let psql = crate::pgcluster::find_bin_dir()
        .map(|d| d.join("psql"))
        .filter(|p| p.is_file())
        .map_or("psql".to_string(), |p| p.display().to_string());
    let pw = if t.has_password {
        " (with PGPASSWORD set to the URL's password)"
    } else {
        ""
    };
    eprintln!(
        "\nThe proxy and the database stay up until Ctrl-C{pw}:\n  \
         through keyshift:  {psql} \"host={} port={} dbname={} user={}\"\n  \
         direct:            {psql} \"host={} port={} dbname={} user={}\"\n  \
         proxy status:      curl -s http://{}/v1/status\n  \
         metrics:           curl -s http://{}/metrics | grep keyshift_\n  \
         migration state:   SELECT * FROM keyshift.events ORDER BY at;",
        p.addr.ip(),
        p.addr.port(),
        t.dbname,
        t.user,
        t.host,
        t.port,
        t.dbname,
        t.user,
        p.admin,
        p.admin
    );
}

async fn cleanup(run: &mut Running) {
    if let Some(w) = run.workload.take() {
        drop(w);
    }
    if let Some(p) = run.proxy.take() {
        p.stop().await;
    }
    if let Some(t) = run.target.take() {
        let throwaway = t.is_throwaway();
        let name = t.ep.dbname.clone();
        for problem in t.teardown().await {
            eprintln!("keyshift demo: cleaning up: {problem}");
        }
        if throwaway {
            eprintln!("keyshift demo: stopped the throwaway PostgreSQL and removed its files");
        } else {
            eprintln!("keyshift demo: dropped database {name}");
        }
    }
}

/// Starts timing a step; `idx` is its index in [`STEPS`] when clients run during it.
fn begin(run: &Running, idx: Option<usize>) -> Instant {
    if let Some(i) = idx {
        run.step.store(i, Ordering::Relaxed);
    }
    Instant::now()
}

fn end(run: &mut Running, name: &str, t: Instant, idx: Option<usize>) {
    run.steps
        .push((name.to_string(), t.elapsed().as_secs_f64(), idx));
}

async fn body(args: &DemoArgs, run: &mut Running) -> Result<(), DemoError> {
    // The server.
    let t = begin(run, None);
    let target = match run.target.take() {
        Some(t) => {
            say(&format!(
                "Creating database {} on {}:{} for the demo; it is dropped at the end.",
                t.ep.dbname, t.ep.host, t.ep.port
            ));
            t
        }
        None => {
            let bin = crate::pgcluster::find_bin_dir();
            say(&format!(
                "Starting a throwaway PostgreSQL from {} (in a temporary directory, removed at the end).",
                bin.map_or("the local server binaries".to_string(), |b| b
                    .display()
                    .to_string())
            ));
            Target::throwaway()?
        }
    };
    // In `run` before anything can fail or be interrupted, so that cleanup finds it.
    let target = run.target.insert(target);
    target.ready().await?;
    target.create_database().await?;
    let ep = target.ep.clone();
    run.report.server = format!("{}:{}", ep.host, ep.port);
    run.report.database = ep.dbname.clone();
    let url = ep.url();
    end(run, "server", t, None);

    // The application's schema and data, as seed 004 left them.
    let t = begin(run, None);
    let connectors = seed::connectors_for(args.rows);
    say(&format!(
        "Loading seed 004's five tables (mcp_connectors, connector_access, mcp_servers, mcp_server_tokens, mcp_server_tools) with about {} rows.",
        args.rows
    ));
    let direct = crate::migrate::db::connect(&url)
        .await
        .map_err(StepError::from)?;
    direct
        .batch_execute(&format!(
            "{}{}{}",
            seed::SEED_004,
            seed::APP_INDEXES,
            seed::rows_sql(args.rows)
        ))
        .await
        .map_err(sql_err("loading the seed data"))?;
    let before = Snapshot::take(&direct)
        .await
        .map_err(sql_err("reading the schema before the migration"))?;
    run.report.seeded_rows = before.counts.values().sum();
    note(&format!(
        "{} rows loaded in {:.1} s",
        run.report.seeded_rows,
        t.elapsed().as_secs_f64()
    ));
    end(run, "load", t, None);

    // The proxy and the application.
    let t = begin(run, Some(0));
    let proxy = ProxyThread::start(setup::proxy_config(&ep, args.listen)).await?;
    let app_cfg = ep.through(proxy.addr);
    say(&format!(
        "Starting the keyshift proxy on {} in front of PostgreSQL, then {} application clients through it (simple protocol, statements prepared once, statements prepared at each use), writing and reading in transactions for the whole demo.",
        proxy.addr, args.clients
    ));
    run.proxy = Some(proxy);
    let w = Workload::start(
        &app_cfg,
        args.clients,
        connectors,
        run.step.clone(),
        STEPS.len(),
    )
    .await
    .map_err(sql_err(
        "connecting the application's clients through the proxy",
    ))?;
    run.workload = Some(w);
    tokio::time::sleep(Duration::from_secs(2)).await;
    progress_note(run);
    end(run, "warm-up", t, Some(0));

    let settings = crate::migrate::Settings::default();

    let t = begin(run, Some(1));
    say(
        "keyshift plan: reads the catalog and decides what moves (the tables whose integer key becomes a UUID, parents first, and every foreign key that follows), without changing anything.",
    );
    let p = steps::plan(&direct).await?;
    note(&format!(
        "{} tables, {} foreign keys, no blockers: {}",
        p.tables.len(),
        p.foreign_keys().count(),
        p.tables
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    ));
    end(run, "plan", t, Some(1));

    let t = begin(run, Some(2));
    say(&format!(
        "keyshift expand: adds id_uuid to every table (new rows get a UUIDv7 by default) and a _uuid twin beside every foreign key, each ALTER catalog-only under a {} ms lock_timeout; from now on the proxy fills the twins of every write.",
        settings.lock_timeout.as_millis()
    ));
    steps::expand(&direct, &settings).await?;
    note(&format!("done in {:.2} s", t.elapsed().as_secs_f64()));
    progress_note(run);
    end(run, "expand", t, Some(2));

    let t = begin(run, Some(3));
    say(&format!(
        "keyshift backfill: fills the uuids of the existing rows in batches of {}, one short transaction each, while the clients keep writing; then harden builds the unique indexes, CHECKs and shadow foreign keys online.",
        settings.batch_size
    ));
    let b = steps::backfill(&direct, &url, &settings).await?;
    let secs = b.summary.elapsed.as_secs_f64().max(0.001);
    run.report.backfill = Some(report::Backfill {
        rows_scanned: b.summary.rows_scanned,
        rows_updated: b.summary.rows_updated,
        seconds: secs,
        rows_per_sec: b.summary.rows_scanned as f64 / secs,
        harden_seconds: b.harden_time.as_secs_f64(),
    });
    note(&format!(
        "{} rows scanned, {} updated in {:.1} s ({:.0} rows/s); harden: {} change(s) in {:.1} s",
        b.summary.rows_scanned,
        b.summary.rows_updated,
        secs,
        b.summary.rows_scanned as f64 / secs,
        b.harden_changes,
        b.harden_time.as_secs_f64()
    ));
    progress_note(run);
    end(run, "backfill", t, Some(3));

    let t = begin(run, Some(4));
    say(
        "keyshift verify: checks online that no uuid is missing or duplicated, every foreign key twin equals its parent's uuid, and every constraint and index is valid.",
    );
    let v = steps::verify(&direct).await?;
    note(&format!(
        "all {} checks passed in {:.1} s",
        v.checks.len(),
        t.elapsed().as_secs_f64()
    ));
    end(run, "verify", t, Some(4));

    let t = begin(run, Some(5));
    say(
        "keyshift cutover: the proxy holds new transactions for a moment, one catalog-only transaction makes the uuid columns the keys under the original names, and the proxy lets the clients go on under the new rules.",
    );
    let sw = steps::cutover(&direct, &settings).await?;
    let gate = sw
        .pauses
        .iter()
        .filter_map(|p| p.pause_ms)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    run.report.cutover = Some(report::Cutover {
        swap_ms: sw.swap_ms,
        gate_closed_ms: gate,
        rounds: sw.rounds,
    });
    for line in crate::migrate::switch::render_text(&sw).lines() {
        note(line);
    }
    // A moment of traffic under the new rules before the clients stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    progress_note(run);
    end(run, "cutover", t, Some(5));

    let t = begin(run, Some(6));
    say(
        "Verify again: the seeds' success criteria, one by one, on the migrated schema and against what the clients committed.",
    );
    let Some(w) = run.workload.take() else {
        unreachable!("the clients run from the warm-up to here")
    };
    let work = w.stop().await;
    run.report.clients = Some(work.clone());
    let (mut criteria, after) = report::check(&direct, &before, &before.counts, &work)
        .await
        .map_err(sql_err("checking the success criteria"))?;
    run.report.rows_migrated = after.counts.values().sum();
    let app = setup::connect(&app_cfg, "the proxy").await?;
    criteria.push(report::crud_check(&app).await);
    let phase = crate::migrate::state::load_migration(&direct)
        .await
        .ok()
        .flatten()
        .map(|m| m.phase);
    criteria.push(report::Criterion {
        criterion: "the migration is recorded as cut over (keyshift status)".into(),
        passed: phase == Some(crate::migrate::state::Phase::CutOver),
        detail: format!(
            "phase {}",
            phase.map_or("none".to_string(), |p| p.to_string())
        ),
    });
    run.report.criteria = criteria;
    end(run, "verify again", t, Some(6));
    Ok(())
}

/// One line on how the clients are doing.
fn progress_note(run: &Running) {
    if let Some(w) = &run.workload {
        note(&format!(
            "clients: {} transactions committed so far, {} errors",
            w.committed(),
            w.failed()
        ));
    }
}
