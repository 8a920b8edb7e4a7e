//! `keyshift demo` end to end, as a newcomer runs it: the real binary, small --rows, its JSON
//! report asserted (0 client errors, every criterion PASS, rows migrated, the cutover's pause
//! reported). Once on a throwaway cluster of its own, once with --database-url against the
//! harness's server, where the demo database must be gone afterwards.
mod common;

use std::process::{Command, Output, Stdio};

/// Small enough for a debug build on two cores; the JSON report on stdout.
const SMALL: [&str; 7] = [
    "--rows",
    "20000",
    "--clients",
    "6",
    "--yes",
    "--format",
    "json",
];

fn demo(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyshift"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYSHIFT_") && k != "KEYSHIFT_PG_BIN" {
            cmd.env_remove(k);
        }
    }
    cmd.arg("demo")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run keyshift demo")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The report's own verdict, checked field by field so that a failure says which.
fn assert_report(o: &Output) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e})\n{}", text(o)));
    let clients = &r["clients"];
    assert_eq!(clients["errors"], 0, "client errors\n{}", text(o));
    assert!(
        clients["transactions"].as_u64().unwrap_or(0) > 0,
        "the clients committed nothing\n{}",
        text(o)
    );
    let criteria = r["criteria"].as_array().expect("criteria");
    assert!(criteria.len() >= 8, "{criteria:#?}");
    for c in criteria {
        assert_eq!(c["passed"], true, "criterion failed: {c}\n{}", text(o));
    }
    assert!(r["rows_migrated"].as_i64().unwrap_or(0) > 0, "{}", text(o));
    assert!(
        r["backfill"]["rows_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        text(o)
    );
    assert!(
        r["cutover"]["gate_closed_ms"].as_f64().is_some(),
        "the cutover's pause is not reported\n{}",
        text(o)
    );
    assert!(clients["max_wait_ms"].as_f64().is_some(), "{}", text(o));
    assert_eq!(r["passed"], true, "{}", text(o));
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    println!(
        "demo: {} rows migrated in {:.1} s; backfill {:.0} rows/s; gate closed {} ms; longest client wait {} ms",
        r["rows_migrated"],
        r["wall_seconds"].as_f64().unwrap_or(0.0),
        r["backfill"]["rows_per_sec"].as_f64().unwrap_or(0.0),
        r["cutover"]["gate_closed_ms"],
        clients["max_wait_ms"]
    );
    r
}

#[test]
fn demo_on_a_throwaway_cluster_passes_its_own_report() {
    let o = demo(&SMALL);
    let r = assert_report(&o);
    assert_eq!(r["database"], "keyshift_demo");
    // The narration went to stderr, one line a step.
    let err = String::from_utf8_lossy(&o.stderr);
    for step in [
        "keyshift plan",
        "keyshift expand",
        "keyshift backfill",
        "keyshift verify",
        "keyshift cutover",
        "Verify again",
    ] {
        assert!(err.contains(step), "no narration for {step}\n{}", text(&o));
    }
}

#[tokio::test]
async fn demo_with_database_url_runs_in_its_own_database_and_drops_it() {
    let srv = common::server();
    let url = srv.url("postgres");
    let o = tokio::task::spawn_blocking(move || {
        let mut args = vec!["--database-url", &url];
        args.extend(SMALL);
        demo(&args)
    })
    .await
    .unwrap();
    let r = assert_report(&o);
    let name = r["database"].as_str().expect("database").to_string();
    assert!(name.starts_with("keyshift_demo_"), "{name}");
    let admin = common::connect(&srv.url("postgres")).await;
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the demo database {name} is still there");
}

#[test]
fn database_url_without_a_terminal_needs_yes_and_help_explains() {
    let o = demo(&["--database-url", "postgres://nobody@127.0.0.1:1/postgres"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--yes"),
        "{}",
        text(&o)
    );
    let o = demo(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for what in [
        "--rows",
        "--keep-running",
        "--database-url",
        "--yes",
        "--format",
        "Ctrl-C",
        "apt-get install postgresql",
        "brew install postgresql@16",
    ] {
        assert!(
            help.contains(what),
            "--help does not mention {what}\n{help}"
        );
    }
}
