//! `keyshift verify`: the seeds' success criteria, online. Scans go in keyset batches (plain
//! reads, ACCESS SHARE only), so verify can run on a busy database.
//!
//! Before cutover it checks the uuid side; in phase cut_over the legacy side, the same way
//! ([`legacy_checks`]): what a rollback needs, and what `keyshift rollback` checks first.

use std::fmt::Write as _;

use serde::Serialize;
use tokio_postgres::Client;

use super::db::{DbError, stmt_error};
use super::ddl::{self, Twin};
use super::partitions;
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
    twin_scan_sql(f, &Twin::uuid_side(f))
}

/// After cutover, one batch over a child: NULL legacy integers where the uuid FK is set,
/// legacy integers that differ from the parent's legacy key, uuid FKs pointing at no parent.
pub fn legacy_fk_scan_sql(plan: &Plan, f: &PlanFk) -> String {
    twin_scan_sql(f, &Twin::legacy_side(plan, f))
}

/// One batch over a child along `side.batch_key` (or ctid pages): `$1` the cursor, `$2` the
/// batch size. Returns the next cursor, the rows seen, then count and examples of: twins
/// NULL where the link is set, twins that differ from the parent's value, links to no parent.
fn twin_scan_sql(f: &PlanFk, side: &Twin) -> String {
    let c = qualified(&f.child_schema, &f.child_table);
    let (fk, fu) = (quote(&side.link), quote(&side.twin));
    let rows = match &side.batch_key {
        Some(ck) => format!(
            "SELECT {ck} AS k, {ck}::text AS kt, {fk} AS fk, {fu} AS fu FROM {c} WHERE {ck} > $1::bigint ORDER BY {ck} LIMIT $2::bigint",
            ck = quote(ck),
        ),
        None => format!(
            "SELECT (ctid::text::point)[0]::bigint AS k, ctid::text AS kt, {fk} AS fk, {fu} AS fu FROM {c} \
WHERE ctid >= format('(%s,0)', $1::bigint)::tid AND ctid < format('(%s,0)', $1::bigint + $2::bigint / 50 + 1)::tid",
        ),
    };
    let next = match &side.batch_key {
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
        pk = quote(&side.parent_key),
        pu = quote(&side.value),
        p = qualified(&f.parent_schema, &f.parent_table),
    )
}

/// After cutover: the rows of `t` whose legacy key is NULL, and up to 10 of their (uuid)
/// keys. Not batched: harden's unique index on the legacy key serves `IS NULL` (and the
/// column is NOT NULL on PostgreSQL 13 to 17 unless an operator dropped that).
pub fn legacy_key_null_sql(t: &PlanTable) -> String {
    format!(
        "SELECT count(*), (array_agg(k::text ORDER BY k))[1:{EXAMPLES}] FROM (SELECT {k} AS k FROM {t} WHERE {l} IS NULL) s",
        k = quote(&t.key),
        l = quote(&t.legacy_column),
        t = qualified(&t.schema, &t.name),
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
    let mut checks = if phase == Phase::CutOver {
        legacy_checks(client, &plan).await?
    } else if phase.is_after_cutover() {
        vec![Check {
            check: "phase".into(),
            object: "migration".into(),
            passed: true,
            count: 0,
            examples: Vec::new(),
            note: Some(format!(
                "phase {phase}: verify checks the uuid side before cutover and the legacy side in phase cut_over; nothing to do"
            )),
        }]
    } else {
        checks(client, &plan).await?
    };
    if phase != Phase::Expanding {
        checks.extend(fill_check(client, &plan, phase).await?);
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(Report {
        phase,
        passed,
        checks,
    })
}

/// keyshift's fill triggers (src/migrate/fill.rs) for this phase, on every child: without
/// them, writes that bypass the proxy leave a side of their FKs unfilled.
async fn fill_check(
    client: &Client,
    plan: &Plan,
    phase: Phase,
) -> Result<Option<Check>, VerifyError> {
    if super::fill::expected(phase).is_none() {
        return Ok(None);
    }
    let sql = "SELECT … FROM pg_trigger (fill triggers)";
    let all = super::fill::off(client, plan, phase)
        .await
        .map_err(|e| super::db::stmt_error(sql, e))?;
    let off: Vec<String> = all
        .iter()
        .filter(|(_, off)| *off)
        .map(|(t, _)| t.clone())
        .collect();
    let mut c = check(
        "fill triggers enabled",
        format!("{} child table(s)", all.len()),
        off.len() as i64,
        off.into_iter().take(EXAMPLES).collect(),
    );
    if !c.passed {
        c.note = Some(
            "enable them again (docs/runbook.md#fill-triggers), then run `keyshift backfill` to repair what was written meanwhile".into(),
        );
    }
    Ok(Some(c))
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

        let (valid, index, lacking) =
            key_index_valid(client, t, &t.uuid_column, &t.uuid_index).await?;
        out.push(unique_check(client, t, "key uuids unique", &t.uuid_column, &index, valid).await?);
        out.push(match lacking {
            // A partition created or attached since harden: cutover's preparation builds
            // its index before the pause (as harden or backfill would).
            Some(l) if !l.is_empty() => Check {
                note: Some(format!(
                    "{} partition(s) without it yet (created or attached since harden): {}; cutover's preparation builds it before the pause, `keyshift harden` builds it now",
                    l.len(),
                    l.join(", ")
                )),
                ..check("unique index valid", index, 0, Vec::new())
            },
            _ => presence_check("unique index valid", index, valid, "the index"),
        });
        let cv = constraint_valid(client, &t.schema, &t.name, &t.not_null_check).await?;
        out.push(presence_check(
            "NOT NULL check validated",
            format!("{tname} {}", t.not_null_check),
            cv,
            "the CHECK",
        ));
    }
    for (_, f) in plan.foreign_keys() {
        // A partitioned child is scanned leaf by leaf (ctids are per partition): a partition
        // attached with NULL twins is named.
        for f in partitions::leaf_fks(client, f).await? {
            out.extend(fk_checks(client, &f).await?);
        }
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

/// The twins of one child (or leaf partition): none NULL, all equal to the parent's uuid,
/// no orphans.
async fn fk_checks(client: &Client, f: &PlanFk) -> Result<[Check; 3], VerifyError> {
    let cname = format!(
        "{}.{}",
        qualified(&f.child_schema, &f.child_table),
        f.uuid_column
    );
    let [nulls, differ, orphans] =
        scan_child(client, &fk_scan_sql(f), f.child_batch_key.is_some()).await?;
    Ok([
        check(
            "no NULL FK uuid",
            cname.clone(),
            nulls.count,
            nulls.examples,
        ),
        check(
            "FK uuid equals the parent's uuid",
            cname.clone(),
            differ.count,
            differ.examples,
        ),
        check("no orphans", cname, orphans.count, orphans.examples),
    ])
}

/// Whether harden's unique index named after `name_column` (`name` on a plain table; on a
/// partitioned one, on each leaf partition) is valid, how to name it, and on a partitioned
/// table the partitions without a valid one.
async fn key_index_valid(
    client: &Client,
    t: &PlanTable,
    name_column: &str,
    name: &str,
) -> Result<(Option<bool>, String, Option<Vec<String>>), DbError> {
    if t.partitioned() {
        let lacking = partitions::leaves_without_key_index(client, t, name_column).await?;
        let suffix = partitions::key_index_suffix(name_column);
        return Ok((
            Some(lacking.is_empty()),
            format!(
                "{}: <partition>{suffix} on each partition",
                qualified(&t.schema, &t.name)
            ),
            Some(lacking),
        ));
    }
    Ok((
        index_valid(client, &t.schema, name).await?,
        qualified(&t.schema, name),
        None,
    ))
}

/// A uniqueness check of `column` (with the partition key, on a partitioned table: the key
/// to be): enforced when `index` is valid, else counted.
async fn unique_check(
    client: &Client,
    t: &PlanTable,
    name: &str,
    column: &str,
    index: &str,
    valid: Option<bool>,
) -> Result<Check, VerifyError> {
    let tname = qualified(&t.schema, &t.name);
    let object = format!("{tname}.{column}");
    if valid == Some(true) {
        let mut c = check(name, object, 0, Vec::new());
        c.note = Some(format!("enforced by unique index {index}"));
        return Ok(c);
    }
    let mut group = quote(column).into_owned();
    for c in t.partitioned_pk.iter().filter(|c| **c != t.key) {
        group.push_str(", ");
        group.push_str(&quote(c));
    }
    let sql = format!(
        "SELECT count(*) OVER (), u::text FROM (SELECT {u} AS u FROM {tname} WHERE {u} IS NOT NULL GROUP BY {group} HAVING count(*) > 1) d LIMIT {EXAMPLES}",
        u = quote(column)
    );
    let rows = scalar_rows(client, &sql, &[]).await?;
    let count = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0);
    Ok(check(
        name,
        object,
        count,
        rows.iter().map(|r| r.get::<_, String>(1)).collect(),
    ))
}

/// Runs a child scan ([`twin_scan_sql`]) to its end: NULL twins, differing twins, orphans.
async fn scan_child(client: &Client, sql: &str, by_key: bool) -> Result<[Acc; 3], VerifyError> {
    let stmt = client.prepare(sql).await.map_err(|e| stmt_error(sql, e))?;
    let mut cursor = if by_key { i64::MIN } else { 0 };
    let (mut nulls, mut differ, mut orphans) = (Acc::new(), Acc::new(), Acc::new());
    loop {
        let r = client
            .query_one(&stmt, &[&cursor, &SCAN_BATCH])
            .await
            .map_err(|e| stmt_error(sql, e))?;
        let next: Option<i64> = r.get(0);
        nulls.add(r.get(2), r.get(3));
        differ.add(r.get(4), r.get(5));
        orphans.add(r.get(6), r.get(7));
        match next {
            Some(n) if !by_key => cursor = n + 1,
            Some(n) => cursor = n,
            None => break,
        }
    }
    Ok([nulls, differ, orphans])
}

/// What repairs the legacy side, for the notes of failed checks after cutover.
pub const LEGACY_REPAIR: &str = "run `keyshift backfill`: in phase cut_over it sets each legacy integer from the parent's, through the uuid FK";

/// After cutover (phase cut_over), the legacy side as a rollback needs it: per table no NULL
/// legacy key and legacy keys unique; per FK no NULL `<fk>_legacy` where the uuid FK is
/// set, every `<fk>_legacy` equal to the parent's legacy key, no uuid FK pointing at no
/// parent. Keyset batches along each child's integer key (its legacy key, for a migrated
/// child), as before cutover.
pub async fn legacy_checks(client: &Client, plan: &Plan) -> Result<Vec<Check>, VerifyError> {
    let mut out = Vec::new();
    for t in &plan.tables {
        let tname = qualified(&t.schema, &t.name);
        let sql = legacy_key_null_sql(t);
        let r = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| stmt_error(&sql, e))?;
        let mut c = check(
            "no NULL legacy key",
            format!("{tname}.{}", t.legacy_column),
            r.get(0),
            r.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
        );
        if !c.passed {
            c.note = Some(format!(
                "examples are values of {}; {}",
                t.key,
                match ddl::legacy_key_catchup(t) {
                    Some(_) =>
                        "run `keyshift backfill`: it gives them one from the column's default"
                            .into(),
                    None => format!(
                        "the key has no default to take one from: set {} by hand",
                        t.legacy_column
                    ),
                }
            ));
        }
        out.push(c);
        let (valid, index, _) =
            key_index_valid(client, t, &t.legacy_column, &ddl::legacy_key_index(t)).await?;
        let mut c = unique_check(
            client,
            t,
            "legacy keys unique",
            &t.legacy_column,
            &index,
            valid,
        )
        .await?;
        if !c.passed {
            c.note = Some(format!(
                "give the duplicates new ones (UPDATE … SET {} = DEFAULT WHERE {} = …), then run `keyshift backfill`: it re-links their children",
                t.legacy_column, t.key
            ));
        }
        out.push(c);
    }
    for f in partitions::expand_fks(client, plan).await? {
        let f = &f;
        let side = Twin::legacy_side(plan, f);
        let ctable = qualified(&f.child_schema, &f.child_table);
        let cname = format!("{ctable}.{}", f.legacy_column);
        let [nulls, differ, orphans] = scan_child(
            client,
            &legacy_fk_scan_sql(plan, f),
            side.batch_key.is_some(),
        )
        .await?;
        let keys = match &side.batch_key {
            Some(k) => format!("examples are values of {ctable}.{k}"),
            None => format!("examples are ctids of {ctable}"),
        };
        let repair = format!("{keys}; {LEGACY_REPAIR}");
        let with_note = |mut c: Check, note: &str| {
            if !c.passed {
                c.note = Some(note.to_string());
            }
            c
        };
        out.push(with_note(
            check(
                "no NULL FK legacy",
                cname.clone(),
                nulls.count,
                nulls.examples,
            ),
            &repair,
        ));
        out.push(with_note(
            check(
                "FK legacy equals parent's legacy",
                cname.clone(),
                differ.count,
                differ.examples,
            ),
            &repair,
        ));
        out.push(with_note(
            check(
                "no orphans",
                format!("{ctable}.{}", f.child_column),
                orphans.count,
                orphans.examples,
            ),
            &format!(
                "{keys}; their uuid FK names no parent row (written with the FK's triggers off?): fix or delete these rows by hand, `keyshift backfill` cannot"
            ),
        ));
    }
    Ok(out)
}

/// The failed checks, one per line: what, where, how many, examples, what to do.
pub fn render_failures(r: &Report) -> String {
    let mut s = String::new();
    for c in r.checks.iter().filter(|c| !c.passed) {
        let _ = write!(s, "  {}: {}: {} row(s)", c.check, c.object, c.count);
        if !c.examples.is_empty() {
            let _ = write!(s, ", e.g. {}", c.examples.join(", "));
        }
        if let Some(n) = &c.note {
            let _ = write!(s, " ({n})");
        }
        s.push('\n');
    }
    s
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
    } else if r.phase == Phase::CutOver {
        let _ = writeln!(
            s,
            "{failed} of {} checks failed; NULL or stale legacy integers: run `keyshift backfill` (in phase cut_over its catch-up repairs the legacy side), then `keyshift verify` again; a rollback refuses until they pass",
            r.checks.len()
        );
    } else {
        let _ = writeln!(
            s,
            "{failed} of {} checks failed; NULL or stale uuids: run `keyshift backfill` again (its catch-up pass fixes them); missing constraints or indexes: `keyshift harden`",
            r.checks.len()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::plan::{PlanOptions, build};

    #[test]
    fn after_cutover_the_scan_reads_the_legacy_side_through_the_uuid_fk() {
        let p = build(
            &crate::migrate::plan::tests::sample(),
            &PlanOptions::default(),
        );
        let f = &p.table("public", "connectors").unwrap().referenced_by[0];
        let before = fk_scan_sql(f);
        assert!(
            before.contains("SELECT id AS k, id::text AS kt, connector_id AS fk, connector_id_uuid AS fu FROM public.servers WHERE id > $1::bigint"),
            "{before}"
        );
        assert!(
            before
                .ends_with("(SELECT id AS k, id_uuid AS u FROM public.connectors) p ON p.k = s.fk")
        );
        // After cutover: batches along the child's legacy key, the uuid FK (now named
        // connector_id) as the link, the legacy integer as the twin, the parent's legacy key
        // as the value.
        let after = legacy_fk_scan_sql(&p, f);
        assert!(
            after.contains("SELECT id_legacy AS k, id_legacy::text AS kt, connector_id AS fk, connector_id_legacy AS fu FROM public.servers WHERE id_legacy > $1::bigint ORDER BY id_legacy"),
            "{after}"
        );
        assert!(
            after.ends_with(
                "(SELECT id AS k, id_legacy AS u FROM public.connectors) p ON p.k = s.fk"
            )
        );
        let t = p.table("public", "servers").unwrap();
        assert_eq!(
            legacy_key_null_sql(t),
            "SELECT count(*), (array_agg(k::text ORDER BY k))[1:10] FROM (SELECT id AS k FROM public.servers WHERE id_legacy IS NULL) s"
        );
    }
}
