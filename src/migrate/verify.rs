//! `keyshift verify`: the seeds' success criteria, online. Scans go in keyset batches (plain
//! reads, ACCESS SHARE only), so verify can run on a busy database.

use std::fmt::Write as _;

use serde::Serialize;
use tokio_postgres::Client;

use super::db::{DbError, stmt_error};
use super::plan::{Plan, PlanFk, PlanTable};
use super::state::{self, Phase, StateError};
use crate::ident::{literal, qualified, quote};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no migration here: run `keyshift expand` first")]
    NotExpanded,
}

const EXAMPLES: usize = 10;
const SCAN_BATCH: i64 = 50_000;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    pub check: String,
    pub object: String,
    pub passed: bool,
    /// Offending rows (or objects).
    pub count: i64,
    /// Up to 10 keys (or ctids) of offending rows.
    pub examples: Vec<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub phase: Phase,
    pub passed: bool,
    pub checks: Vec<Check>,
}

fn check(name: &str, object: String, count: i64, examples: Vec<String>) -> Check {
    Check {
        check: name.into(),
        object,
        passed: count == 0,
        count,
        examples,
        note: None,
    }
}

struct Acc {
    count: i64,
    examples: Vec<String>,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            count: 0,
            examples: Vec::new(),
        }
    }
    fn add(&mut self, n: i64, ex: Option<Vec<String>>) {
        self.count += n;
        for e in ex.unwrap_or_default() {
            if self.examples.len() < EXAMPLES {
                self.examples.push(e);
            }
        }
    }
}

/// One batch over a table's key: `$1` the last key seen, `$2` the batch size.
pub fn key_scan_sql(t: &PlanTable) -> String {
    format!(
        "SELECT max(k)::bigint, count(*), count(*) FILTER (WHERE u IS NULL), \
(array_agg(k::text ORDER BY k) FILTER (WHERE u IS NULL))[1:{EXAMPLES}] \
FROM (SELECT {k} AS k, {u} AS u FROM {t} WHERE {k} > $1::bigint ORDER BY {k} LIMIT $2::bigint) s",
        k = quote(&t.key),
        u = quote(&t.uuid_column),
        t = qualified(&t.schema, &t.name),
    )
}

/// One batch over a child: NULL twins, twins that differ from the parent's uuid, orphans.
pub fn fk_scan_sql(f: &PlanFk) -> String {
    let c = qualified(&f.child_schema, &f.child_table);
    let rows = match &f.child_batch_key {
        Some(ck) => format!(
            "SELECT {ck} AS k, {ck}::text AS kt, {fk} AS fk, {fu} AS fu FROM {c} WHERE {ck} > $1::bigint ORDER BY {ck} LIMIT $2::bigint",
            ck = quote(ck),
            fk = quote(&f.child_column),
            fu = quote(&f.uuid_column),
        ),
        None => format!(
            "SELECT (ctid::text::point)[0]::bigint AS k, ctid::text AS kt, {fk} AS fk, {fu} AS fu FROM {c} \
WHERE ctid >= format('(%s,0)', $1::bigint)::tid AND ctid < format('(%s,0)', $1::bigint + $2::bigint / 50 + 1)::tid",
            fk = quote(&f.child_column),
            fu = quote(&f.uuid_column),
        ),
    };
    let next = match &f.child_batch_key {
        Some(_) => "max(s.k)::bigint".to_string(),
        None => format!(
            "CASE WHEN $1::bigint >= pg_relation_size({}::regclass) / current_setting('block_size')::bigint THEN NULL \
ELSE $1::bigint + $2::bigint / 50 END",
            literal(&c)
        ),
    };
    let null = "s.fk IS NOT NULL AND s.fu IS NULL";
    let differ = "s.fu IS NOT NULL AND s.fu IS DISTINCT FROM p.u";
    let orphan = "s.fk IS NOT NULL AND p.k IS NULL";
    format!(
        "SELECT {next}, count(*), \
count(*) FILTER (WHERE {null}), (array_agg(s.kt ORDER BY s.k) FILTER (WHERE {null}))[1:{EXAMPLES}], \
count(*) FILTER (WHERE {differ}), (array_agg(s.kt ORDER BY s.k) FILTER (WHERE {differ}))[1:{EXAMPLES}], \
count(*) FILTER (WHERE {orphan}), (array_agg(s.kt ORDER BY s.k) FILTER (WHERE {orphan}))[1:{EXAMPLES}] \
FROM ({rows}) s LEFT JOIN (SELECT {pk} AS k, {pu} AS u FROM {p}) p ON p.k = s.fk",
        pk = quote(&f.parent_key),
        pu = quote(&f.parent_uuid_column),
        p = qualified(&f.parent_schema, &f.parent_table),
    )
}

async fn scalar_rows(
    client: &Client,
    sql: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, DbError> {
    client
        .query(sql, args)
        .await
        .map_err(|e| stmt_error(sql, e))
}

/// Index validity: `None` when missing.
async fn index_valid(client: &Client, schema: &str, name: &str) -> Result<Option<bool>, DbError> {
    let sql = "SELECT bool_or(i.indisvalid) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
               JOIN pg_namespace n ON n.oid = ic.relnamespace WHERE n.nspname = $1 AND ic.relname = $2";
    Ok(scalar_rows(client, sql, &[&schema, &name]).await?[0].get(0))
}

async fn constraint_valid(
    client: &Client,
    schema: &str,
    table: &str,
    name: &str,
) -> Result<Option<bool>, DbError> {
    let sql = "SELECT bool_or(con.convalidated) FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 AND con.conname = $3";
    Ok(scalar_rows(client, sql, &[&schema, &table, &name]).await?[0].get(0))
}

fn presence_check(name: &str, object: String, state: Option<bool>, what: &str) -> Check {
    let (count, note) = match state {
        Some(true) => (0, None),
        Some(false) => (
            1,
            Some(format!(
                "{what} exists but is not valid; run `keyshift harden`"
            )),
        ),
        None => (1, Some(format!("{what} is missing; run `keyshift harden`"))),
    };
    Check {
        check: name.into(),
        object,
        passed: count == 0,
        count,
        examples: Vec::new(),
        note,
    }
}

pub async fn run(client: &Client) -> Result<Report, VerifyError> {
    let Some((plan, phase)) = state::load(client).await? else {
        return Err(VerifyError::NotExpanded);
    };
    let checks = if phase.is_after_cutover() {
        vec![Check {
            check: "phase".into(),
            object: "migration".into(),
            passed: true,
            count: 0,
            examples: Vec::new(),
            note: Some(format!(
                "phase {phase}: verify checks the state before cutover; nothing to do"
            )),
        }]
    } else {
        checks(client, &plan).await?
    };
    let passed = checks.iter().all(|c| c.passed);
    Ok(Report {
        phase,
        passed,
        checks,
    })
}

async fn checks(client: &Client, plan: &Plan) -> Result<Vec<Check>, VerifyError> {
    let mut out = Vec::new();
    for t in &plan.tables {
        let tname = qualified(&t.schema, &t.name);
        let sql = key_scan_sql(t);
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(|e| stmt_error(&sql, e))?;
        let mut cursor = i64::MIN;
        let mut nulls = Acc::new();
        loop {
            let r = client
                .query_one(&stmt, &[&cursor, &SCAN_BATCH])
                .await
                .map_err(|e| stmt_error(&sql, e))?;
            let next: Option<i64> = r.get(0);
            nulls.add(r.get(2), r.get(3));
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        out.push(check(
            "no NULL key uuid",
            format!("{tname}.{}", t.uuid_column),
            nulls.count,
            nulls.examples,
        ));

        let valid = index_valid(client, &t.schema, &t.uuid_index).await?;
        if valid == Some(true) {
            let mut c = check(
                "key uuids unique",
                format!("{tname}.{}", t.uuid_column),
                0,
                Vec::new(),
            );
            c.note = Some(format!("enforced by unique index {}", t.uuid_index));
            out.push(c);
        } else {
            let sql = format!(
                "SELECT count(*) OVER (), u::text FROM (SELECT {u} AS u FROM {tname} WHERE {u} IS NOT NULL GROUP BY {u} HAVING count(*) > 1) d LIMIT {EXAMPLES}",
                u = quote(&t.uuid_column)
            );
            let rows = scalar_rows(client, &sql, &[]).await?;
            let count = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0);
            out.push(check(
                "key uuids unique",
                format!("{tname}.{}", t.uuid_column),
                count,
                rows.iter().map(|r| r.get::<_, String>(1)).collect(),
            ));
        }
        out.push(presence_check(
            "unique index valid",
            qualified(&t.schema, &t.uuid_index),
            valid,
            "the index",
        ));
        let cv = constraint_valid(client, &t.schema, &t.name, &t.not_null_check).await?;
        out.push(presence_check(
            "NOT NULL check validated",
            format!("{tname} {}", t.not_null_check),
            cv,
            "the CHECK",
        ));
    }
    for (_, f) in plan.foreign_keys() {
        let cname = format!(
            "{}.{}",
            qualified(&f.child_schema, &f.child_table),
            f.uuid_column
        );
        let sql = fk_scan_sql(f);
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(|e| stmt_error(&sql, e))?;
        let mut cursor = if f.child_batch_key.is_some() {
            i64::MIN
        } else {
            0
        };
        let (mut nulls, mut differ, mut orphans) = (Acc::new(), Acc::new(), Acc::new());
        loop {
            let r = client
                .query_one(&stmt, &[&cursor, &SCAN_BATCH])
                .await
                .map_err(|e| stmt_error(&sql, e))?;
            let next: Option<i64> = r.get(0);
            nulls.add(r.get(2), r.get(3));
            differ.add(r.get(4), r.get(5));
            orphans.add(r.get(6), r.get(7));
            match next {
                Some(n) if f.child_batch_key.is_none() => cursor = n + 1,
                Some(n) => cursor = n,
                None => break,
            }
        }
        out.push(check(
            "no NULL FK uuid",
            cname.clone(),
            nulls.count,
            nulls.examples,
        ));
        out.push(check(
            "FK uuid equals the parent's uuid",
            cname.clone(),
            differ.count,
            differ.examples,
        ));
        out.push(check(
            "no orphans",
            cname.clone(),
            orphans.count,
            orphans.examples,
        ));
        let cv = constraint_valid(
            client,
            &f.child_schema,
            &f.child_table,
            &f.shadow_constraint,
        )
        .await?;
        out.push(presence_check(
            "shadow FK validated",
            format!(
                "{} {}",
                qualified(&f.child_schema, &f.child_table),
                f.shadow_constraint
            ),
            cv,
            "the shadow foreign key",
        ));
        for i in &f.indexes {
            let v = index_valid(client, &f.child_schema, &i.uuid_name).await?;
            out.push(presence_check(
                "mirrored index valid",
                qualified(&f.child_schema, &i.uuid_name),
                v,
                "the index",
            ));
        }
    }
    Ok(out)
}

pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "keyshift verify (phase {})", r.phase);
    for c in &r.checks {
        let _ = write!(
            s,
            "{}  {:<34} {:<50} {}",
            if c.passed { "PASS" } else { "FAIL" },
            c.check,
            c.object,
            c.count
        );
        if !c.examples.is_empty() {
            let _ = write!(s, "  e.g. {}", c.examples.join(", "));
        }
        if let Some(n) = &c.note {
            let _ = write!(s, "  ({n})");
        }
        s.push('\n');
    }
    let failed = r.checks.iter().filter(|c| !c.passed).count();
    if failed == 0 {
        let _ = writeln!(s, "all {} checks passed", r.checks.len());
    } else {
        let _ = writeln!(
            s,
            "{failed} of {} checks failed; NULL or stale uuids: run `keyshift backfill` again (its catch-up pass fixes them); missing constraints or indexes: `keyshift harden`",
            r.checks.len()
        );
    }
    s
}
