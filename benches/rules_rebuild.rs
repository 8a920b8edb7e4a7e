//! The proxy's rebuild of its rules at 1,000 tables, without the database: the schema of
//! benches/big_schema.sh (500 parents, 500 children with 4 integer FKs each: 2,000 FKs) is
//! planned as `keyshift plan` would, and the control link's work at a swap is timed piece by
//! piece. `after_swap` is what replaces the catalog reads while the gate is held
//! (src/proxy/reading.rs); `build` is `dualwrite::build`, both rule sets (the physical
//! shape's and the translated one's), for the phase before and after the cutover. Each
//! figure is the first of 50 runs and the fastest (the machine is shared); benches/big_schema.sh
//! measures the same in a running proxy, catalog reads included.
//!
//! Run: `cargo bench --bench rules_rebuild`

use std::hint::black_box;
use std::time::Instant;

use keyshift::metrics::Metrics;
use keyshift::migrate::catalog::{Catalog, Column, ForeignKey, PrimaryKey, Table};
use keyshift::migrate::plan::{Plan, PlanOptions, build};
use keyshift::migrate::state::Phase;
use keyshift::proxy::dualwrite::{self, Settings};
use keyshift::proxy::reading::Reading;
use keyshift::rewrite::TableColumns;
use keyshift::shape::Shape;

const TABLES: usize = 1000;

fn column(name: &str, type_name: &str) -> Column {
    Column {
        name: name.into(),
        type_name: type_name.into(),
        not_null: name == "id",
        default: (name == "id").then(|| "nextval('s'::regclass)".into()),
        identity: None,
    }
}

fn table(name: &str, columns: Vec<Column>) -> Table {
    Table {
        schema: "public".into(),
        name: name.into(),
        kind: "r".into(),
        row_estimate: 10,
        columns,
        primary_key: Some(PrimaryKey {
            constraint: format!("{name}_pkey"),
            index: format!("{name}_pkey"),
            columns: vec!["id".into()],
        }),
        ..Default::default()
    }
}

/// benches/big_schema.sh's schema: `p<i> (id, name)`, `c<i> (id, 4 FKs, v)`.
fn plan() -> (Plan, Reading) {
    let half = TABLES / 2;
    let mut cat = Catalog::default();
    for i in 0..half {
        cat.tables.push(table(
            &format!("p{i}"),
            vec![column("id", "integer"), column("name", "text")],
        ));
    }
    let mut columns = Vec::new();
    for i in 0..half {
        let parents: Vec<usize> = (0..4).map(|k| (i * 4 + k) % half).collect();
        let mut cols = vec![column("id", "integer")];
        for p in &parents {
            cols.push(column(&format!("p{p}_id"), "integer"));
            cat.foreign_keys.push(ForeignKey {
                name: format!("c{i}_p{p}_id_fkey"),
                child_schema: "public".into(),
                child_table: format!("c{i}"),
                child_columns: vec![format!("p{p}_id")],
                parent_schema: "public".into(),
                parent_table: format!("p{p}"),
                parent_columns: vec!["id".into()],
                parent_index: format!("p{p}_pkey"),
                on_update: "a".into(),
                on_delete: "a".into(),
                validated: true,
                ..Default::default()
            });
        }
        cols.push(column("v", "text"));
        // As expand leaves them: the twins after the application's columns.
        let mut names: Vec<String> = cols.iter().map(|c| c.name.clone()).collect();
        names.push("id_uuid".into());
        names.extend(parents.iter().map(|p| format!("p{p}_id_uuid")));
        columns.push(TableColumns {
            schema: "public".into(),
            table: format!("c{i}"),
            columns: names,
        });
        cat.tables.push(table(&format!("c{i}"), cols));
    }
    let plan = build(&cat, &PlanOptions::default());
    assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
    assert_eq!(plan.tables.len(), TABLES);
    assert_eq!(plan.foreign_keys().count(), TABLES * 2);
    let reading = Reading {
        shape: Shape::Integer,
        through_views: false,
        columns,
        shadows: Vec::new(),
        integer_copies: Vec::new(),
        uuid_copies: Vec::new(),
    };
    (plan, reading)
}

/// (first run, fastest of 50), in milliseconds; what `f` returns is dropped outside the
/// timing (the control link drops the rules it replaces once the gate is open). The first
/// run is the one a proxy makes: its allocator has not held such a rule set before.
fn timed<T>(mut f: impl FnMut() -> T) -> (f64, f64) {
    let runs: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            let out = black_box(f());
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            drop(out);
            ms
        })
        .collect();
    (runs[0], runs.iter().copied().fold(f64::INFINITY, f64::min))
}

fn main() {
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; run `cargo bench --bench rules_rebuild` for real figures");
    }
    let (plan, hardened) = plan();
    let cut_over = hardened.after_swap(&plan).expect("derivable");
    let metrics = Metrics::new();
    let settings = Settings::default();
    let rules = |phase: Phase, reading: &Reading| {
        dualwrite::build(
            &plan,
            phase,
            reading,
            1,
            &settings,
            metrics.rewrite.clone(),
            metrics.translation.clone(),
        )
        .expect("valid plan")
        .expect("a phase with rules")
    };
    let derive = timed(|| hardened.after_swap(&plan));
    let before = timed(|| rules(Phase::Hardened, &hardened));
    let after = timed(|| rules(Phase::CutOver, &cut_over));
    println!(
        "{TABLES} tables, {} FKs, ms (first run, fastest of 50):",
        plan.foreign_keys().count()
    );
    let row = |what: &str, (first, best): (f64, f64)| {
        println!("  {what:<56} {first:7.2} {best:7.2}");
    };
    row(
        "Reading::after_swap (the cutover's reading, derived)",
        derive,
    );
    row(
        "dualwrite::build, hardened (integer + translated uuid)",
        before,
    );
    row(
        "dualwrite::build, cut_over (uuid + translated integer)",
        after,
    );
    row(
        "a cutover's rebuild from the derived reading",
        (derive.0 + after.0, derive.1 + after.1),
    );
}
