//! The command line: parses arguments, loads configuration, runs one command. `anyhow` lives
//! here and nowhere else; exit codes are 0 (done), 1 (failed) and 2 (bad usage or configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{
    BackfillArgs, ConfigError, DbArgs, FileConfig, MigrateConfig, ProxyArgs, ProxyConfig,
    SelectArgs,
};

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

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the PostgreSQL proxy that applications connect to instead of PostgreSQL
    #[command(
        long_about = "Run the PostgreSQL proxy. Applications connect to it exactly as \
they would to PostgreSQL (session mode: one server connection per client connection). \
The admin HTTP endpoint serves /metrics (Prometheus), /healthz, /readyz, /v1/status, \
/v1/pause, /v1/resume and /v1/cutover (admin_token), and the id mapping on /v1/map (map_token).\n\n\
Every option can also be set in the config file (see deploy/keyshift.toml) or as a KEYSHIFT_* \
environment variable; flags win over the environment, which wins over the file."
    )]
    Proxy(ProxyArgs),
    /// Read the catalog and print what would be migrated, blockers included (changes nothing)
    #[command(
        long_about = "Read the catalog and print the plan: the tables whose integer primary key \
moves to UUID (every table of the chosen schemas whose primary key is one smallint, integer or \
bigint column, unless --table/--exclude say otherwise), parents before children, each with its \
key, row estimate and every foreign key that references it (child column, ON DELETE / ON UPDATE, \
whether it is indexed). Takes no lock.\n\n\
Blockers (composite FKs or FKs through another unique index onto a migrated key, partitioned or \
inherited tables, views, rules, policies, triggers and SQL-body functions that reference a column \
the cutover renames) are listed together, each with what to do, and make the exit code 2. \
With --sql, prints the SQL of every phase (expand, backfill, harden, cutover, rollback, finalize, \
abort). Once `expand` ran, prints the plan stored in the database."
    )]
    Plan(PlanCmd),
    /// Create schema keyshift and add the uuid columns (brief locks, under lock_timeout with retry)
    #[command(
        long_about = "Create schema keyshift (the migration's state, keyshift.uuid_v7()), store \
the plan, add `<key>_uuid uuid` to each migrated table and `<fk>_uuid uuid` beside each integer \
FK column (no default, so catalog-only), then set the key columns' default so that every new row \
gets a uuid. Each ALTER runs under lock_timeout and is retried with backoff, so it never waits in \
the lock queue while blocking the application. Idempotent: a second run changes nothing."
    )]
    Expand(ExpandCmd),
    /// Fill the uuid columns of existing rows in short batches, then harden; after cutover, repair the legacy integers
    #[command(
        long_about = "Fill the key uuids of existing rows, then every FK twin from its parent, \
then a catch-up pass over each FK that repairs NULL or stale twins left by writes that bypassed \
the proxy. Keyset batches along the integer key, each one short transaction that also saves its \
cursor: kill it at any moment and run it again, it resumes exactly where it stopped. Locks: the \
rows of one batch. Running it again once done starts a new catch-up round.\n\n\
Then hardens (see `keyshift harden --help`) unless --skip-harden. Progress: a bar per task on a \
terminal, a log line every few seconds otherwise.\n\n\
After cutover (phase cut_over) it runs the catch-up in reverse, so that a rollback finds the \
integer side whole: legacy keys still NULL get one from the column's default, then every \
`<fk>_legacy` that is NULL or differs from its parent's `<key>_legacy` (found through the uuid \
FK) is set from it, in batches of --batch-size, each re-checking its rows. It does not change \
the phase and does not harden; stopped, it is simply run again."
    )]
    Backfill(BackfillCmd),
    /// Build unique indexes, CHECKs and shadow FKs online (rerun the last stage of backfill)
    #[command(
        long_about = "Build, without blocking reads or writes: a unique index on each key uuid \
(CREATE INDEX CONCURRENTLY; an INVALID index left by an interrupted build is dropped and rebuilt), \
a mirror of every index on an integer FK column on its uuid twin, CHECK (<key>_uuid IS NOT NULL) \
and shadow FKs <fk>_uuid -> parent(<key>_uuid) with the same ON DELETE / ON UPDATE actions, each \
added NOT VALID (a brief lock under lock_timeout) then VALIDATEd (no blocking lock). Idempotent."
    )]
    Harden(HardenCmd),
    /// Check the success criteria online (after cutover: the legacy side); exit 0 when all pass, 1 otherwise
    #[command(
        long_about = "Check, with batched reads only: no NULL uuid, key uuids unique, every FK \
uuid equal to its parent's uuid, no orphans, constraints validated, indexes valid. Prints counts \
and up to 10 example keys per failed check. Exit code 0 when all pass, 1 otherwise.\n\n\
After cutover (phase cut_over) it checks the legacy side, which a rollback needs: no NULL \
legacy key, legacy keys unique, no NULL `<fk>_legacy` where the uuid FK is set, every \
`<fk>_legacy` equal to its parent's legacy key, no uuid FK pointing at no parent. \
`keyshift backfill` repairs what it finds; `keyshift rollback` runs these checks first."
    )]
    Verify(VerifyCmd),
    /// Show the phase, backfill progress, recent events and registered proxies
    Status(StatusCmd),
    /// Before cutover: remove everything keyshift added, leaving the schema as it was
    #[command(
        long_about = "Before cutover: drop the shadow FKs, CHECKs, indexes and uuid columns \
keyshift added, then schema keyshift, so that the schema is exactly as before expand. Brief \
locks under lock_timeout with retry; indexes are dropped CONCURRENTLY. Idempotent. After cutover \
it refuses: use `keyshift rollback`."
    )]
    Abort(AbortCmd),
    /// Make the uuid columns the keys: pause every proxy, swap in one transaction, resume
    #[command(
        long_about = "The one step that holds traffic. Refuses unless the phase is \
hardened, `verify` passes and every registered proxy with a fresh heartbeat applies the current \
rules. Then: every proxy closes its gate (idle sessions are held, transactions run on until \
they end, up to --drain-timeout), the swap runs in ONE transaction under --lock-timeout \
(catalog-only: SET NOT NULL proven by the validated CHECKs, integer FKs and PKs dropped, the \
uuid unique index promoted to primary key, renames), the proxies switch to reverse dual-write \
and reopen. A lock timeout reopens the gates and retries within --budget. On any failure \
everything is rolled back and the gates reopen; the exit code is 1 and the message names the \
sessions or locks that blocked. Prints how long each proxy held its clients. Protocol: \
docs/cutover.md."
    )]
    Cutover(SwitchCmd),
    /// Undo a cutover: the inverse swap, same protocol (valid until finalize)
    #[command(
        long_about = "Undo a cutover: the inverse swap, with the cutover's protocol and flags. \
Needs phase cut_over. First, before building anything, the checks of `keyshift verify` on the \
legacy side: NULL or stale legacy integers (writes that bypassed the proxy after cutover) make \
it refuse, naming the tables, counts and example keys; `keyshift backfill` repairs them. Then, \
without blocking writes, it rebuilds the integer FKs and keys and harden's uuid side; then one \
swap transaction (which also fills nullable legacy FKs left NULL since the check) takes the \
migration back to phase hardened. Protocol: docs/cutover.md."
    )]
    Rollback(SwitchCmd),
    /// Drop the legacy integer columns and keyshift's objects once you are sure (no way back)
    #[command(
        long_about = "Drop the legacy integer columns and keyshift's objects: the end of the \
migration, with no way back (restore from backup). Needs phase cut_over.\n\n\
Refused while the default shape is integer (`keyshift shape default uuid` first) or while any \
live proxy serves an integer-shaped session: those read the columns finalize drops. finalize \
asks every proxy for its sessions at that moment (not their last heartbeat) and names them \
by proxy, user, database and application_name. Retire them (move V1 to keyshift.shape=uuid, \
or stop it), or pass --terminate to end their server backends (pg_terminate_backend) after a \
prompt or --yes. A proxy that does not answer makes finalize refuse: it may serve V1."
    )]
    Finalize(FinalizeCmd),
    /// Show or set the default shape: what new connections that name none see
    #[command(
        long_about = "A shape is how a client connection sees the migrated tables, for its \
whole life, whatever the physical phase: `integer` is the original (`id` integer, the uuid in \
`id_uuid`, each FK an integer beside its `_uuid` twin); `uuid` is the final one (`id` uuid, \
the integer in `id_legacy`, each FK a uuid beside its `_legacy` twin). The proxy serves each \
session in its shape before and after the cutover, so the old application version (V1, \
integer ids) and the new one (V2, uuid ids) can run side by side.\n\n\
A session's shape is, in this order: the startup parameter keyshift.shape (directly, or \
`-c keyshift.shape=uuid` in options), else the first matching shape rule of the proxy's \
configuration, else the migration's default, kept in the database so that every proxy \
agrees. The default is integer from expand on.",
        subcommand_required = true
    )]
    Shape(ShapeCmd),
    /// Look up the id mapping (integer id <-> uuid), or export all of it
    #[command(
        long_about = "Look up the id mapping that external systems (caches, search indexes, URLs, \
a warehouse) need while they still hold integer ids: `keyshift map TABLE ID` prints the uuid of \
an integer id, or the integer id of a uuid. `keyshift map export` streams the whole mapping as \
CSV or JSON lines, with COPY, in constant memory.\n\n\
Works from `expand` (rows get their uuid as backfill reaches them) until `finalize`, and after \
`finalize --keep-map` from keyshift.id_map_archive. The same mapping is in SQL as the view \
keyshift.id_map (table_name, legacy_id, uuid) and over HTTP on every proxy: GET \
/v1/map/{table}/{legacy_id}, GET /v1/map/{table}?uuid=..., POST /v1/map/{table}. \
Exit code 1 when the id has no row.",
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Map(MapCmd),
    // --- demo: its flags and everything it does live in src/demo ---
    /// See keyshift work: migrate seed 004's five tables under live traffic, start to finish
    #[command(long_about = crate::demo::LONG_ABOUT)]
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShapeCmd {
    #[command(subcommand)]
    pub sub: ShapeSub,
}

#[derive(Debug, Subcommand)]
pub enum ShapeSub {
    /// Print the default shape, or set it to integer or uuid (new connections only)
    #[command(
        long_about = "Without a value, print the migration's default shape. With one, set it: \
it applies to connections opened from now on that name no keyshift.shape and match no shape \
rule; connections already open keep the shape they started with (a shape never changes under \
a session). Every proxy picks the change up at once (NOTIFY keyshift), and the change is \
logged in keyshift.events.\n\n\
`uuid` is refused before the migration is hardened (the uuids are not yet complete and \
enforced); `integer` is refused once finalize has started (the integer columns go). Switch \
to `uuid` when V1 is retired or names its shape, before `keyshift finalize`, which refuses \
while the default is integer."
    )]
    Default(ShapeDefaultCmd),
}

#[derive(Debug, clap::Args)]
pub struct ShapeDefaultCmd {
    /// integer or uuid; omit it to print the current default
    #[arg(value_parser = parse_shape)]
    pub shape: Option<crate::shape::Shape>,
    #[command(flatten)]
    pub db: DbArgs,
}

fn parse_shape(s: &str) -> Result<crate::shape::Shape, String> {
    crate::shape::Shape::parse(s).map_err(|_| format!("{s:?} is not a shape: use integer or uuid"))
}

#[derive(Debug, clap::Args)]
pub struct MapCmd {
    #[command(subcommand)]
    pub export: Option<MapSub>,
    /// The table: `schema.table`, or its name
    #[arg(required = true)]
    pub table: Option<String>,
    /// An integer id (prints its uuid) or a uuid (prints its integer id)
    #[arg(required = true)]
    pub id: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum MapSub {
    /// Stream the whole mapping (every table, or --table ...) as CSV or JSON lines
    #[command(
        long_about = "Stream the whole mapping with COPY, in constant memory, for bulk updates of \
external systems: CSV (`table_name,legacy_id,uuid`, with a header) or JSON lines. A progress bar \
shows on a terminal. With --output, the file is written as FILE.partial and renamed when \
complete, so an interrupted export never looks finished. Reads only; takes no lock that blocks \
the application."
    )]
    Export(MapExportCmd),
}

#[derive(Debug, clap::Args)]
pub struct MapExportCmd {
    /// Export only this table (`schema.table` or name); repeatable [default: every mapped table]
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = crate::map::export::ExportFormat::Csv)]
    pub format: crate::map::export::ExportFormat,
    /// Write to this file instead of stdout
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArgs,
}

pub use crate::output::Format;

#[derive(Debug, clap::Args)]
pub struct PlanCmd {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Also print the SQL of every phase
    #[arg(long)]
    pub sql: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExpandCmd {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub select: SelectArgs,
}

#[derive(Debug, clap::Args)]
pub struct BackfillCmd {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub backfill: BackfillArgs,
    /// Stop after the backfill; run `keyshift harden` later
    #[arg(long)]
    pub skip_harden: bool,
}

#[derive(Debug, clap::Args)]
pub struct HardenCmd {
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct VerifyCmd {
    #[command(flatten)]
    pub db: DbArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, clap::Args)]
pub struct StatusCmd {
    #[command(flatten)]
    pub db: DbArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, clap::Args)]
pub struct SwitchCmd {
    #[command(flatten)]
    pub db: DbArgs,
    /// How long sessions inside a transaction may run on while the proxies drain
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Total time allowed for retries after lock timeouts
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub budget: std::time::Duration,
    /// End the backends of sessions that keep the drain or the locks from completing
    #[arg(long)]
    pub terminate_blockers: bool,
    /// Run the whole protocol, swap included, then roll the swap back
    #[arg(long)]
    pub dry_run: bool,
    /// Cutover only: a pause that just changes the phase, then the tables swapped group by
    /// group (children before parents), gates open, each group briefly locking its tables
    /// and their parents (one whose locks do not come is swapped under a pause of its own).
    /// The pause no longer grows with the number of tables. The application's views,
    /// policies and other objects over migrated columns stay on the integer columns until
    /// the last group, then are rebuilt over the uuids in one transaction, like a group.
    /// Rerun it to resume an interrupted one
    #[arg(long)]
    pub by_table: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, clap::Args)]
pub struct FinalizeCmd {
    #[command(flatten)]
    pub db: DbArgs,
    /// Do not ask for confirmation
    #[arg(long)]
    pub yes: bool,
    /// End the server backends of integer-shaped sessions (on every proxy) instead of
    /// refusing; their clients get PostgreSQL's 57P01 "terminating connection"
    #[arg(long)]
    pub terminate: bool,
    /// Keep the id mapping in keyshift.id_map_archive (table_name, legacy_id, uuid), so old
    /// integer links can still be resolved (SQL view keyshift.id_map, /v1/map, `keyshift map`)
    #[arg(long)]
    pub keep_map: bool,
}

#[derive(Debug, clap::Args)]
pub struct AbortCmd {
    #[command(flatten)]
    pub db: DbArgs,
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
        Command::Plan(ref c) => {
            migrate_cmd(&cli.config, &c.db, Some(&c.select), None, "plan", |cfg| {
                run_plan(cfg, c.format, c.sql)
            })
        }
        Command::Expand(ref c) => migrate_cmd(
            &cli.config,
            &c.db,
            Some(&c.select),
            None,
            "expand",
            run_expand,
        ),
        Command::Backfill(ref c) => migrate_cmd(
            &cli.config,
            &c.db,
            None,
            Some(&c.backfill),
            "backfill",
            |cfg| run_backfill(cfg, c.skip_harden),
        ),
        Command::Harden(ref c) => migrate_cmd(&cli.config, &c.db, None, None, "harden", run_harden),
        Command::Verify(ref c) => migrate_cmd(&cli.config, &c.db, None, None, "verify", |cfg| {
            run_verify(cfg, c.format)
        }),
        Command::Status(ref c) => migrate_cmd(&cli.config, &c.db, None, None, "status", |cfg| {
            run_status(cfg, c.format)
        }),
        Command::Abort(ref c) => migrate_cmd(&cli.config, &c.db, None, None, "abort", run_abort),
        Command::Cutover(ref c) => migrate_cmd(&cli.config, &c.db, None, None, "cutover", |cfg| {
            run_switch(cfg, c, crate::migrate::switch::Action::Cutover)
        }),
        Command::Rollback(ref c) => {
            migrate_cmd(&cli.config, &c.db, None, None, "rollback", |cfg| {
                run_switch(cfg, c, crate::migrate::switch::Action::Rollback)
            })
        }
        Command::Finalize(ref c) => {
            migrate_cmd(&cli.config, &c.db, None, None, "finalize", |cfg| {
                run_finalize(cfg, c)
            })
        }
        Command::Shape(ShapeCmd {
            sub: ShapeSub::Default(ref c),
        }) => migrate_cmd(&cli.config, &c.db, None, None, "shape default", |cfg| {
            run_shape_default(cfg, c.shape)
        }),
        Command::Map(ref c) => match &c.export {
            Some(MapSub::Export(e)) => {
                migrate_cmd(&cli.config, &e.db, None, None, "map export", |cfg| {
                    run_map_export(cfg, e)
                })
            }
            None => migrate_cmd(&cli.config, &c.db, None, None, "map", |cfg| run_map(cfg, c)),
        },
        // The demo takes no config file: it builds its own server, proxy and settings.
        Command::Demo(ref c) => crate::demo::main(c),
    }
}

/// `worker_threads = 0`: one runtime per two CPUs, at least one. A runtime per CPU made each
/// thread sleep and wake more often (fewer sessions each, so fewer events per `epoll_wait`):
/// on 2 CPUs shared with PostgreSQL and pgbench, 1.9 context switches per transaction against
/// 0.7 with one runtime, and 20-25 µs of proxy CPU per transaction against 15-19, for the same
/// throughput (docs/benchmarks.md, 2026-12-03). Half the CPUs still lets the relay use a
/// bigger machine: a runtime relays 25-40k transactions per second here at under half a core.
fn default_worker_threads(cpus: usize) -> usize {
    (cpus / 2).max(1)
}

fn run_proxy(cfg: ProxyConfig) -> anyhow::Result<()> {
    // One single-threaded runtime per thread, each owning whole sessions (see
    // `Proxy::with_workers` for why not tokio's work-stealing runtime). The main thread's
    // runtime also runs the listener, the admin endpoint and the signal handlers.
    let threads = match cfg.worker_threads {
        0 => default_worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get())),
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

/// Resolves the configuration (exit 2 on error), runs the command on a small runtime, and
/// maps its result to an exit code.
fn migrate_cmd(
    config: &Option<PathBuf>,
    db: &DbArgs,
    select: Option<&SelectArgs>,
    backfill: Option<&BackfillArgs>,
    name: &str,
    f: impl FnOnce(MigrateConfig) -> anyhow::Result<ExitCode>,
) -> ExitCode {
    let cfg = match load_file(config)
        .and_then(|file| MigrateConfig::resolve(file, db, select, backfill))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyshift {name}: {e}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(crate::config::LogFormat::Text, "info");
    match f(cfg) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyshift {name}: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_switch(
    cfg: MigrateConfig,
    c: &SwitchCmd,
    action: crate::migrate::switch::Action,
) -> anyhow::Result<ExitCode> {
    use crate::migrate::switch::{self, SwitchError, SwitchOptions};
    let opts = SwitchOptions {
        action,
        drain_timeout: c.drain_timeout,
        lock_timeout: cfg.settings.lock_timeout,
        budget: c.budget,
        terminate_blockers: c.terminate_blockers,
        dry_run: c.dry_run,
        by_table: c.by_table,
    };
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        match switch::run(&client, &opts, &cfg.settings).await {
            Ok(r) => {
                match c.format {
                    Format::Json => print_json(&r)?,
                    Format::Text => print!("{}", switch::render_text(&r)),
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(SwitchError::Refused(why)) => {
                eprintln!("keyshift {}: refused: {why}", action.as_str());
                Ok(ExitCode::from(1))
            }
            Err(SwitchError::Interrupted(why)) => {
                eprintln!(
                    "keyshift {}: stopped partway, phase cutting_over, traffic flowing: {why}",
                    action.as_str()
                );
                Ok(ExitCode::from(1))
            }
            Err(SwitchError::Aborted(why)) => {
                eprintln!(
                    "keyshift {}: aborted, nothing changed, traffic resumed: {why}",
                    action.as_str()
                );
                Ok(ExitCode::from(1))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run_finalize(cfg: MigrateConfig, c: &FinalizeCmd) -> anyhow::Result<ExitCode> {
    use crate::migrate::switch::{self, SwitchError};
    use std::io::{BufRead, IsTerminal, Write};
    if !c.yes && !std::io::stdin().is_terminal() {
        eprintln!(
            "keyshift finalize: drops the legacy integer columns for good; pass --yes to confirm when not at a terminal"
        );
        return Ok(ExitCode::from(2));
    }
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        // Refuse before asking: a prompt for something that cannot happen wastes the
        // operator's attention; and the prompt names the sessions --terminate would end.
        let check = match switch::finalize_check(&client, c.terminate).await {
            Ok(check) => check,
            Err(SwitchError::Refused(why)) => {
                eprintln!("keyshift finalize: refused: {why}");
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        };
        if !c.yes {
            if c.terminate && !check.integer.is_empty() {
                eprint!(
                    "--terminate ends these sessions' server backends now:\n{}",
                    check.render_sessions()
                );
            }
            eprint!(
                "finalize drops the legacy integer columns and keyshift's state: there is no way back. Type 'finalize' to go on: "
            );
            std::io::stderr().flush()?;
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            if line.trim() != "finalize" {
                eprintln!("keyshift finalize: not confirmed, nothing changed");
                return Ok(ExitCode::from(1));
            }
        }
        match switch::finalize(&client, &cfg.settings, c.keep_map, c.terminate).await {
            Ok(r) => {
                if r.terminated > 0 {
                    println!(
                        "ended {} integer-shaped session(s) (--terminate)",
                        r.terminated
                    );
                }
                for l in &r.late {
                    println!(
                        "warning: connected in the integer shape while finalize started, will fail from now on: {l}"
                    );
                }
                println!(
                    "finalized: the legacy columns and keyshift's state are gone; the proxies pass everything through{}",
                    if c.keep_map {
                        "; the id mapping stays in keyshift.id_map_archive"
                    } else {
                        ""
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(SwitchError::Refused(why)) => {
                eprintln!("keyshift finalize: refused: {why}");
                Ok(ExitCode::from(1))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run_shape_default(
    cfg: MigrateConfig,
    shape: Option<crate::shape::Shape>,
) -> anyhow::Result<ExitCode> {
    use crate::migrate::shapes::{self, DefaultChange, ShapeError};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let result = match shape {
            None => shapes::current_default(&client).await.and_then(|d| {
                let (_, d) = d.ok_or(ShapeError::NoMigration)?;
                println!("{d}");
                Ok(())
            }),
            Some(to) => shapes::set_default(&client, to).await.map(|change| match change {
                DefaultChange::Unchanged(d) => {
                    println!("the default shape is already {d}; nothing changed")
                }
                DefaultChange::Changed { from, to } => println!(
                    "default shape: {from} -> {to}. New connections that name no keyshift.shape and match no rule now get the {to} shape; open connections keep theirs (`keyshift status` lists them by shape)"
                ),
            }),
        };
        match result {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e @ (ShapeError::Refused(_) | ShapeError::NoMigration)) => {
                eprintln!("keyshift shape default: refused: {e}");
                Ok(ExitCode::from(1))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run_map(cfg: MigrateConfig, c: &MapCmd) -> anyhow::Result<ExitCode> {
    use crate::map::export;
    let (Some(table), Some(id)) = (&c.table, &c.id) else {
        eprintln!("keyshift map: give TABLE and ID (or `keyshift map export`)");
        return Ok(ExitCode::from(2));
    };
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let cat = match export::catalog(&client).await {
            Ok(cat) => cat,
            Err(e @ export::ExportError::NoMapping) => {
                eprintln!("keyshift map: {e}");
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        };
        let t = match export::resolve(&cat, table) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("keyshift map: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        match export::lookup_one(&client, &cat, t, id).await {
            Ok(Some((legacy, uuid))) => {
                match c.format {
                    Format::Json => print_json(&serde_json::json!({
                        "table": t.name, "legacy_id": legacy, "uuid": uuid
                    }))?,
                    Format::Text if id.trim().parse::<i64>().is_ok() => println!("{uuid}"),
                    Format::Text => println!("{legacy}"),
                }
                Ok(ExitCode::SUCCESS)
            }
            Ok(None) => {
                eprintln!("keyshift map: {} has no row with id {}", t.name, id.trim());
                Ok(ExitCode::from(1))
            }
            Err(e @ export::LookupError::BadId(_)) => {
                eprintln!("keyshift map: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run_map_export(cfg: MigrateConfig, c: &MapExportCmd) -> anyhow::Result<ExitCode> {
    use crate::map::export::{self, ExportError};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let started = std::time::Instant::now();
        match export::export(&client, &c.tables, c.format, c.output.as_deref()).await {
            Ok(rows) => {
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "keyshift map export: {rows} rows in {secs:.1}s{}",
                    c.output
                        .as_ref()
                        .map(|p| format!(" to {}", p.display()))
                        .unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ (ExportError::NoMapping | ExportError::UnknownTable { .. })) => {
                eprintln!("keyshift map export: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run_plan(cfg: MigrateConfig, format: Format, sql: bool) -> anyhow::Result<ExitCode> {
    use crate::migrate::{catalog, ddl, plan, state};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let (p, stored) = match state::load(&client).await? {
            Some((p, phase)) => (p, Some(phase)),
            None => (plan::build(&catalog::read(&client).await?, &cfg.plan), None),
        };
        match format {
            Format::Text => {
                if let Some(phase) = stored {
                    println!(
                        "(the plan stored by `keyshift expand`; the migration is in phase {phase})"
                    );
                }
                print!("{}", plan::render_text(&p));
                if sql {
                    println!();
                    print!("{}", ddl::render_sql(&p));
                }
            }
            Format::Json => {
                let mut v = serde_json::to_value(&p)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("phase".into(), serde_json::to_value(stored)?);
                    if sql {
                        let mut phases = serde_json::Map::new();
                        for (name, steps) in ddl::all_phases(&p) {
                            phases.insert(name.to_string(), serde_json::to_value(steps)?);
                        }
                        o.insert("sql".into(), serde_json::Value::Object(phases));
                    }
                }
                print_json(&v)?;
            }
        }
        Ok(if p.is_blocked() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn run_expand(cfg: MigrateConfig) -> anyhow::Result<ExitCode> {
    use crate::migrate::expand::{self, ExpandError};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        match expand::run(&client, &cfg.plan, &cfg.settings).await {
            Ok(p) => {
                eprintln!(
                    "keyshift expand: done; {} table(s) and {} foreign key(s) have their uuid columns. Next: `keyshift backfill`",
                    p.tables.len(),
                    p.foreign_keys().count()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ ExpandError::Blocked(_)) => {
                eprintln!("keyshift expand: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run_backfill(cfg: MigrateConfig, skip_harden: bool) -> anyhow::Result<ExitCode> {
    use crate::migrate::{backfill, harden};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let mut extra = Vec::new();
        for _ in 1..cfg.settings.jobs {
            extra.push(crate::migrate::db::connect(&cfg.database_url).await?);
        }
        let sum = backfill::run(&client, &extra, &cfg.settings).await?;
        let secs = sum.elapsed.as_secs_f64();
        if sum.after_cutover {
            // Nothing to harden after cutover: the uuid side is in force.
            eprintln!(
                "keyshift backfill (after cutover): {} legacy integer(s) repaired in {secs:.1}s. Next: `keyshift verify`",
                sum.rows_updated
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "keyshift backfill: {} rows scanned, {} updated in {:.1}s ({:.0} rows/s)",
            sum.rows_scanned,
            sum.rows_updated,
            secs,
            sum.rows_scanned as f64 / secs.max(0.001)
        );
        if !skip_harden {
            let n = harden::run(&client, &cfg.settings).await?;
            eprintln!("keyshift harden: done ({n} change(s)). Next: `keyshift verify`");
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn run_harden(cfg: MigrateConfig) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let n = crate::migrate::harden::run(&client, &cfg.settings).await?;
        eprintln!("keyshift harden: done ({n} change(s)). Next: `keyshift verify`");
        Ok(ExitCode::SUCCESS)
    })
}

fn run_verify(cfg: MigrateConfig, format: Format) -> anyhow::Result<ExitCode> {
    use crate::migrate::verify;
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let r = verify::run(&client).await?;
        match format {
            Format::Text => print!("{}", verify::render_text(&r)),
            Format::Json => print_json(&r)?,
        }
        Ok(if r.passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

fn run_status(cfg: MigrateConfig, format: Format) -> anyhow::Result<ExitCode> {
    use crate::migrate::status;
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        let st = status::run(&client).await?;
        match format {
            Format::Text => print!("{}", status::render_text(&st)),
            Format::Json => print_json(&st)?,
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn run_abort(cfg: MigrateConfig) -> anyhow::Result<ExitCode> {
    use crate::migrate::abort::{self, Outcome};
    runtime()?.block_on(async {
        let client = crate::migrate::db::connect(&cfg.database_url).await?;
        match abort::run(&client, &cfg.settings).await? {
            Outcome::Removed => {
                eprintln!("keyshift abort: done; everything keyshift added is gone")
            }
            Outcome::NothingToDo => {
                eprintln!("keyshift abort: nothing to remove (no schema keyshift)")
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
