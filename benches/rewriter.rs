//! Rewriter micro-benchmark: a typical ~200-character INSERT into a migrated child table,
//! cached and uncached, and a statement that touches no migrated table (prescan only).
//! Each figure is the median of 5 rounds; the plain sqlparser parse of the same INSERT is
//! measured side by side as the reference the uncached rewrite is compared with.
//!
//! Run: `cargo bench --bench rewriter`

use std::hint::black_box;
use std::time::Instant;

use keyshift::rewrite::{
    ClientView, Direction, FkPlan, Outcome, ParentPlan, PlanRules, RewriteCache, RuleSet,
    TableColumns, rewrite,
};

const INSERT: &str = "INSERT INTO order_items (order_id, product_id, quantity, unit_price, note, \
created_at) VALUES ($1, $2, $3, $4, $5, now()) RETURNING order_items.id, order_items.created_at, \
order_items.quantity";

const UNRELATED: &str = "SELECT abalance, bid, filler FROM pgbench_accounts WHERE aid = $1 AND \
bid IN (SELECT bid FROM pgbench_branches WHERE bbalance > $2) ORDER BY aid LIMIT 10";

fn rules() -> RuleSet {
    let parent = |t: &str| ParentPlan {
        schema: "public".into(),
        table: t.into(),
        key_column: "id".into(),
        uuid_column: "id_uuid".into(),
    };
    let fk = |c: &str, p: &str| FkPlan {
        schema: "public".into(),
        table: "order_items".into(),
        column: c.into(),
        uuid_column: format!("{c}_uuid"),
        column_type: "bigint".into(),
        parent_schema: "public".into(),
        parent_table: p.into(),
        parent_key_column: "id".into(),
        parent_uuid_column: "id_uuid".into(),
    };
    let plan = PlanRules {
        parents: vec![parent("orders"), parent("products")],
        fks: vec![fk("order_id", "orders"), fk("product_id", "products")],
        columns: vec![TableColumns {
            schema: "public".into(),
            table: "order_items".into(),
            columns: [
                "id",
                "order_id",
                "product_id",
                "quantity",
                "unit_price",
                "note",
                "created_at",
            ]
            .map(String::from)
            .to_vec(),
        }],
        ..PlanRules::default()
    };
    RuleSet::build(
        &plan,
        Direction::Forward,
        ClientView::Physical,
        vec!["public".into()],
        1,
    )
    .expect("valid plan")
}

/// Nanoseconds per call of `f`, median of 5 rounds of `n` calls.
fn measure(n: u32, mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    let rules = rules();
    match rewrite(&rules, INSERT) {
        Outcome::Rewritten { sql, .. } => {
            println!("input  ({} chars): {INSERT}", INSERT.len());
            println!("output ({} chars): {sql}", sql.len());
        }
        other => panic!("the benchmark INSERT must be rewritten: {other:?}"),
    }
    let cache = RewriteCache::new(4096, 64 * 1024);
    cache.rewrite(&rules, INSERT);

    let dialect = sqlparser::dialect::PostgreSqlDialect {};
    let parse = measure(20_000, || {
        black_box(sqlparser::parser::Parser::parse_sql(&dialect, black_box(INSERT)).is_ok());
    });
    let uncached = measure(20_000, || {
        black_box(rewrite(&rules, black_box(INSERT)));
    });
    let cached = measure(1_000_000, || {
        black_box(cache.rewrite(&rules, black_box(INSERT)));
    });
    let unrelated = measure(1_000_000, || {
        black_box(cache.rewrite(&rules, black_box(UNRELATED)));
    });

    println!();
    println!("| case | per statement | target | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| sqlparser parse only (reference) | {:.2} µs | – | 1.00 × parse |",
        parse / 1e3
    );
    println!(
        "| uncached rewrite | {:.2} µs | ≤ 30 µs | {:.2} × parse |",
        uncached / 1e3,
        uncached / parse
    );
    println!(
        "| cached rewrite | {:.3} µs | ≤ 2 µs | {:.3} × parse |",
        cached / 1e3,
        cached / parse
    );
    println!(
        "| no migrated table ({} chars, prescan only) | {:.3} µs | – | {:.3} × parse |",
        UNRELATED.len(),
        unrelated / 1e3,
        unrelated / parse
    );
}
