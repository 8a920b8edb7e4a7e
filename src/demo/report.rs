//! The seeds' success criteria, checked one by one against the schema as the application
//! created it, and the demo's report.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use tokio_postgres::Client;

use super::seed::TABLES;
use super::workload::{Version, WorkloadResult};

/// One foreign key as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fk {
    pub table: String,
    pub name: String,
    pub column: String,
    pub parent: String,
    pub parent_column: String,
    pub on_delete: String,
    pub on_update: String,
    pub column_type: String,
    pub validated: bool,
}

/// One index: table, name, its columns by name, valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Index {
    pub table: String,
    pub name: String,
    pub columns: String,
    pub unique: bool,
    pub valid: bool,
}

/// The schema of the five tables, as the application sees it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// table → (primary key constraint, column, type).
    pub pks: BTreeMap<String, (String, String, String)>,
    pub fks: Vec<Fk>,
    pub indexes: Vec<Index>,
    pub counts: BTreeMap<String, i64>,
}

fn tables_array() -> Vec<String> {
    TABLES.iter().map(|t| t.to_string()).collect()
}

impl Snapshot {
    pub async fn take(c: &Client) -> Result<Snapshot, tokio_postgres::Error> {
        let tables = tables_array();
        let pks = c
            .query(
                "SELECT conrelid::regclass::text, conname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                 WHERE k.contype = 'p' AND k.conrelid::regclass::text = ANY($1)",
                &[&tables],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect();
        let fks = c
            .query(
                "SELECT conrelid::regclass::text, conname::text, a.attname::text, confrelid::regclass::text,
                        pa.attname::text, confdeltype::text, confupdtype::text,
                        format_type(a.atttypid, a.atttypmod), convalidated
                 FROM pg_constraint k
                 JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                 JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = k.confkey[1]
                 WHERE k.contype = 'f' AND k.conrelid::regclass::text = ANY($1)
                 ORDER BY 1, 2",
                &[&tables],
            )
            .await?
            .iter()
            .map(|r| Fk {
                table: r.get(0),
                name: r.get(1),
                column: r.get(2),
                parent: r.get(3),
                parent_column: r.get(4),
                on_delete: r.get(5),
                on_update: r.get(6),
                column_type: r.get(7),
                validated: r.get(8),
            })
            .collect();
        let indexes = c
            .query(
                "SELECT i.indrelid::regclass::text, ic.relname::text,
                        (SELECT string_agg(a.attname, ', ' ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
                        i.indisunique, i.indisvalid
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                 WHERE i.indrelid::regclass::text = ANY($1) ORDER BY 1, 2",
                &[&tables],
            )
            .await?
            .iter()
            .map(|r| Index {
                table: r.get(0),
                name: r.get(1),
                columns: r.get::<_, Option<String>>(2).unwrap_or_default(),
                unique: r.get(3),
                valid: r.get(4),
            })
            .collect();
        let mut counts = BTreeMap::new();
        for t in TABLES {
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await?
                .get(0);
            counts.insert(t.to_string(), n);
        }
        Ok(Snapshot {
            pks,
            fks,
            indexes,
            counts,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Criterion {
    pub criterion: String,
    pub passed: bool,
    pub detail: String,
}

fn criterion(name: &str, problems: Vec<String>, ok: String) -> Criterion {
    Criterion {
        criterion: name.into(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            ok
        } else {
            problems.join("; ")
        },
    }
}

/// The criteria that only need the schema, the data and what the clients committed.
pub async fn check(
    c: &Client,
    before: &Snapshot,
    start_counts: &BTreeMap<String, i64>,
    work: &WorkloadResult,
) -> Result<(Vec<Criterion>, Snapshot), tokio_postgres::Error> {
    let now = Snapshot::take(c).await?;
    let mut out = Vec::new();

    // 1. UUID primary keys on every table, under the names they had.
    let mut p = Vec::new();
    for t in TABLES {
        match (now.pks.get(t), before.pks.get(t)) {
            (Some((name, col, ty)), Some((was, _, _))) => {
                if ty != "uuid" || col != "id" {
                    p.push(format!("{t}: primary key on {col} ({ty})"));
                }
                if name != was {
                    p.push(format!("{t}: primary key {name}, was {was}"));
                }
            }
            _ => p.push(format!("{t}: no primary key")),
        }
    }
    out.push(criterion(
        "every table has a UUID primary key (same constraint names)",
        p,
        format!("{} of {} tables: id uuid", TABLES.len(), TABLES.len()),
    ));

    // 2. The FKs are the original ones: names, columns, parents, actions, validated.
    let key = |f: &Fk| {
        (
            f.table.clone(),
            f.name.clone(),
            f.column.clone(),
            f.parent.clone(),
            f.on_delete.clone(),
            f.on_update.clone(),
        )
    };
    let want: BTreeSet<_> = before.fks.iter().map(key).collect();
    let got: BTreeSet<_> = now.fks.iter().map(key).collect();
    let mut p: Vec<String> = want
        .difference(&got)
        .map(|k| format!("missing or changed: {} on {}", k.1, k.0))
        .chain(
            got.difference(&want)
                .map(|k| format!("unexpected: {} on {}", k.1, k.0)),
        )
        .collect();
    p.extend(
        now.fks
            .iter()
            .filter(|f| !f.validated)
            .map(|f| format!("{} is not validated", f.name)),
    );
    let actions: Vec<String> = now
        .fks
        .iter()
        .map(|f| format!("{} ON DELETE {}", f.name, action(&f.on_delete)))
        .collect();
    out.push(criterion(
        "foreign keys re-created with their original names and ON DELETE / ON UPDATE actions",
        p,
        actions.join(", "),
    ));

    // 3. Every FK references the parent's UUID key from a UUID column.
    let p: Vec<String> = now
        .fks
        .iter()
        .filter(|f| f.column_type != "uuid" || f.parent_column != "id")
        .map(|f| {
            format!(
                "{}: {} ({}) -> {}.{}",
                f.name, f.column, f.column_type, f.parent, f.parent_column
            )
        })
        .collect();
    out.push(criterion(
        "every foreign key is a uuid column referencing its parent's uuid id",
        p,
        format!("{} foreign keys", now.fks.len()),
    ));

    // 4. No orphans, whatever the constraints say.
    let mut p = Vec::new();
    for f in &now.fks {
        let sql = format!(
            "SELECT count(*) FROM {t} c LEFT JOIN {pt} p ON p.{pc} = c.{col} WHERE c.{col} IS NOT NULL AND p.{pc} IS NULL",
            t = f.table,
            pt = f.parent,
            pc = f.parent_column,
            col = f.column
        );
        let n: i64 = c.query_one(&sql, &[]).await?.get(0);
        if n > 0 {
            p.push(format!("{}: {n} orphaned rows", f.name));
        }
    }
    out.push(criterion(
        "no orphaned records",
        p,
        format!("0 orphans across {} foreign keys", now.fks.len()),
    ));

    // 5. Every committed row is there, and nothing else.
    let mut p = Vec::new();
    let mut total = 0;
    for t in TABLES {
        let want =
            start_counts.get(t).copied().unwrap_or(0) + work.net.get(t).copied().unwrap_or(0);
        let got = now.counts.get(t).copied().unwrap_or(-1);
        total += got;
        if want != got {
            p.push(format!("{t}: {got} rows, the clients committed {want}"));
        }
    }
    out.push(criterion(
        "row counts equal what the clients committed",
        p,
        format!("{total} rows in {} tables, as committed", TABLES.len()),
    ));

    // 6. Indexes: each original one is there under its name, on the same column names, valid.
    let mut p = Vec::new();
    for i in &before.indexes {
        match now
            .indexes
            .iter()
            .find(|x| x.name == i.name && x.table == i.table)
        {
            Some(x) if x.columns != i.columns || x.unique != i.unique => p.push(format!(
                "{}: now on ({}), was on ({})",
                i.name, x.columns, i.columns
            )),
            Some(x) if !x.valid => p.push(format!("{} is not valid", i.name)),
            Some(_) => {}
            None => p.push(format!("{} is gone", i.name)),
        }
    }
    p.extend(
        now.indexes
            .iter()
            .filter(|x| !x.valid)
            .map(|x| format!("{} is not valid", x.name)),
    );
    p.dedup();
    out.push(criterion(
        "indexes rebuilt and valid, under their names",
        p,
        format!(
            "{} indexes of the original schema, all valid",
            before.indexes.len()
        ),
    ));

    // 7. The way back: every row keeps its integer id, every FK its integer twin.
    let mut p = Vec::new();
    for t in TABLES {
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE id_legacy IS NULL"),
                &[],
            )
            .await?
            .get(0);
        if n > 0 {
            p.push(format!("{t}: {n} rows without their legacy integer id"));
        }
    }
    for f in &now.fks {
        let sql = format!(
            "SELECT count(*) FROM {t} c JOIN {pt} p ON p.id = c.{col} WHERE c.{col}_legacy IS DISTINCT FROM p.id_legacy",
            t = f.table,
            pt = f.parent,
            col = f.column
        );
        let n: i64 = c.query_one(&sql, &[]).await?.get(0);
        if n > 0 {
            p.push(format!(
                "{}: {n} rows whose legacy integer differs from the parent's",
                f.name
            ));
        }
    }
    out.push(criterion(
        "rollback possible: legacy integer ids kept and consistent",
        p,
        "every row has its id_legacy; every *_legacy FK matches its parent".into(),
    ));

    // 8. The application saw no error, in either version.
    out.push(criterion(
        "the application kept running without errors, both versions",
        work.error_samples.clone(),
        work.versions
            .iter()
            .map(|v| {
                format!(
                    "{:?} ({} shape): {} clients, {} transactions, 0 errors",
                    v.version, v.shape, v.clients, v.transactions
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    ));
    if work.errors > 0 && out.last().is_some_and(|c| c.passed) {
        if let Some(last) = out.last_mut() {
            last.passed = false;
            last.detail = format!("{} errors", work.errors);
        }
    }
    Ok((out, now))
}

fn action(code: &str) -> &'static str {
    match code {
        "c" => "CASCADE",
        "n" => "SET NULL",
        "d" => "SET DEFAULT",
        "r" => "RESTRICT",
        _ => "NO ACTION",
    }
}

/// V1 and V2 ran side by side, and each read rows the other wrote, in its own shape.
pub fn side_by_side(work: &WorkloadResult) -> Criterion {
    let name = "V1 (integer shape) and V2 (uuid shape) wrote side by side, each reading the other's rows in its own shape";
    let mut p = Vec::new();
    let mut ok = Vec::new();
    for v in [Version::V1, Version::V2] {
        match work.version(v) {
            None => p.push(format!("{v:?} did not run")),
            Some(r) if r.transactions == 0 => p.push(format!("{v:?} committed nothing")),
            Some(r) if r.other_rows_read == 0 => {
                p.push(format!("{v:?} never read a row the other version wrote"))
            }
            Some(r) => ok.push(format!(
                "{v:?} read {} rows of the other version with {} ids",
                r.other_rows_read, r.shape
            )),
        }
    }
    criterion(name, p, ok.join("; "))
}

/// CRUD through the proxy after the cutover, then ON DELETE CASCADE, in `version`'s shape:
/// uuid ids for V2 (what the UUID release does first), integer ids for V1 (still served
/// through keyshift's views). Leaves no row behind.
pub async fn crud_check(app: &Client, version: Version) -> Criterion {
    let ty = version.shape().as_str();
    let r = async {
        let tx_name = format!("crud-check-{:08x}", rand::random::<u32>());
        app.batch_execute("BEGIN").await?;
        let id: String = app
            .query_one(
                "INSERT INTO mcp_connectors (name) VALUES ($1) RETURNING id::text",
                &[&tx_name],
            )
            .await?
            .get(0);
        app.execute(
            &format!("INSERT INTO connector_access (connector_id, user_id) VALUES ($1::text::{ty}, 'crud@example.com')"),
            &[&id],
        )
        .await?;
        app.execute(
            &format!("INSERT INTO mcp_servers (connector_id, name, status) VALUES ($1::text::{ty}, $2, 'new')"),
            &[&id, &tx_name],
        )
        .await?;
        let read: i64 = app
            .query_one(
                &format!("SELECT count(*) FROM mcp_servers s JOIN connector_access a USING (connector_id) WHERE s.connector_id = $1::text::{ty}"),
                &[&id],
            )
            .await?
            .get(0);
        let updated = app
            .execute(
                &format!("UPDATE mcp_servers SET status = 'updated' WHERE connector_id = $1::text::{ty}"),
                &[&id],
            )
            .await?;
        app.execute(&format!("DELETE FROM mcp_connectors WHERE id = $1::text::{ty}"), &[&id])
            .await?;
        let left: i64 = app
            .query_one(
                &format!("SELECT (SELECT count(*) FROM connector_access WHERE connector_id = $1::text::{ty})
                      + (SELECT count(*) FROM mcp_servers WHERE connector_id = $1::text::{ty})"),
                &[&id],
            )
            .await?
            .get(0);
        app.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>((id, read, updated, left))
    }
    .await;
    let name = match version {
        Version::V2 => {
            "after the cutover, CRUD and ON DELETE CASCADE work with UUID ids, through the proxy in the uuid shape (V2)"
        }
        Version::V1 => {
            "after the cutover, CRUD and ON DELETE CASCADE still work with integer ids, through the proxy in the integer shape (V1)"
        }
    };
    match r {
        Ok((id, read, updated, left)) => {
            let mut p = Vec::new();
            let fits = match version {
                Version::V2 => uuid_shape(&id).is_some(),
                Version::V1 => id.parse::<i64>().is_ok(),
            };
            if !fits {
                p.push(format!("a new connector's id is {id:?}, not {ty}"));
            }
            if read != 1 || updated != 1 {
                p.push(format!(
                    "read {read} and updated {updated} rows, expected 1 and 1"
                ));
            }
            if left != 0 {
                p.push(format!(
                    "{left} child rows left after deleting their connector"
                ));
            }
            criterion(
                name,
                p,
                format!(
                    "new connector {id}: insert, read, update, delete cascaded to its access grant and server"
                ),
            )
        }
        Err(e) => {
            let _ = app.batch_execute("ROLLBACK").await;
            criterion(name, vec![crate::migrate::db::describe(&e)], String::new())
        }
    }
}

/// Some(version) when `s` looks like a canonical UUID.
fn uuid_shape(s: &str) -> Option<char> {
    let b = s.as_bytes();
    let dashes = [8, 13, 18, 23];
    if b.len() != 36 {
        return None;
    }
    for (i, c) in s.chars().enumerate() {
        if dashes.contains(&i) {
            if c != '-' {
                return None;
            }
        } else if !c.is_ascii_hexdigit() {
            return None;
        }
    }
    s.chars().nth(14)
}

/// How long one step took.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
    /// The longest any client waited for a statement during the step, in ms.
    pub max_client_wait_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backfill {
    pub rows_scanned: i64,
    pub rows_updated: i64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    pub harden_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cutover {
    pub swap_ms: f64,
    /// How long the proxy held its clients (its gate closed), as it reported.
    pub gate_closed_ms: Option<f64>,
    pub rounds: i32,
}

/// Everything the demo found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub passed: bool,
    pub server: String,
    pub database: String,
    pub seeded_rows: i64,
    pub rows_migrated: i64,
    pub backfill: Option<Backfill>,
    pub cutover: Option<Cutover>,
    pub clients: Option<WorkloadResult>,
    pub steps: Vec<StepTime>,
    pub criteria: Vec<Criterion>,
    /// Set when the demo stopped before the end.
    pub error: Option<String>,
    pub wall_seconds: f64,
}

impl Report {
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\nkeyshift demo report");
        let _ = writeln!(
            s,
            "  server               {} (database {})",
            self.server, self.database
        );
        let _ = writeln!(
            s,
            "  rows migrated        {} (seeded {})",
            self.rows_migrated, self.seeded_rows
        );
        if let Some(b) = &self.backfill {
            let _ = writeln!(
                s,
                "  backfill             {} rows in {:.1} s: {:.0} rows/s (then harden, {:.1} s)",
                b.rows_scanned, b.seconds, b.rows_per_sec, b.harden_seconds
            );
        }
        if let Some(c) = &self.cutover {
            let _ = writeln!(
                s,
                "  cutover              swap transaction {:.1} ms; the proxy held its clients {}",
                c.swap_ms,
                c.gate_closed_ms
                    .map_or("(not reported)".to_string(), |m| format!("{m:.1} ms"))
            );
        }
        if let Some(w) = &self.clients {
            let _ = writeln!(
                s,
                "  clients              {} clients, {} transactions, {} statements, {} errors",
                w.clients, w.transactions, w.statements, w.errors
            );
            for v in &w.versions {
                let _ = writeln!(
                    s,
                    "    {:<20} {} clients from {}: {} commits, {} errors; read {} rows of the other version in its shape",
                    format!("{:?} ({} shape)", v.version, v.shape),
                    v.clients,
                    v.started,
                    v.transactions,
                    v.errors,
                    v.other_rows_read
                );
            }
            let _ = writeln!(
                s,
                "  longest client wait  {:.1} ms (statement latency p50 {:.2} ms, p99 {:.2} ms)",
                w.max_wait_ms, w.p50_ms, w.p99_ms
            );
            for e in &w.error_samples {
                let _ = writeln!(s, "    error: {e}");
            }
        }
        let _ = writeln!(s, "  steps (seconds; longest client wait during each):");
        for st in &self.steps {
            let _ = writeln!(
                s,
                "    {:<14} {:>7.1} s   {:>8.1} ms",
                st.step, st.seconds, st.max_client_wait_ms
            );
        }
        let _ = writeln!(s, "  the seeds' success criteria:");
        for c in &self.criteria {
            let _ = writeln!(
                s,
                "    {}  {}\n          {}",
                if c.passed { "PASS" } else { "FAIL" },
                c.criterion,
                c.detail
            );
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  stopped early: {e}");
        }
        let _ = writeln!(
            s,
            "  {} in {:.0} s",
            if self.passed { "PASSED" } else { "FAILED" },
            self.wall_seconds
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shapes() {
        assert_eq!(
            uuid_shape("0190b6f2-3c4d-7e8f-9a0b-1c2d3e4f5a6b"),
            Some('7')
        );
        assert_eq!(uuid_shape("12"), None);
        assert_eq!(uuid_shape("0190b6f2x3c4d-7e8f-9a0b-1c2d3e4f5a6b"), None);
    }
}
