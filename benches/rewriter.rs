//! Rewriter micro-benchmark: a typical ~200-character INSERT into a migrated child table,
//! cached and uncached, and a statement that touches no migrated table (prescan only).
//! The machine is shared, so the cases are measured interleaved, batch by batch, and each
//! figure is the fastest batch (the cost without interference) next to the median batch.
//! The plain sqlparser parse of the same INSERT is measured side by side as the reference
//! the uncached rewrite is compared with.
//!
//! The prescan and the cached rewrite are measured again with 1,000 more migrated tables
//! (2,000 more FKs) in the rules, side by side: their cost per statement must not grow with
//! the schema (issue [scale], deliverable 4).
//!
//! Run: `cargo bench --bench rewriter`

use std::hint::black_box;
use std::time::Instant;

use keyshift::rewrite::{
    ClientView, Direction, FkPlan, Outcome, ParentPlan, PlanRules, RewriteCache, RuleSet,
    TableColumns, rewrite, rewrite_verified,
};

const INSERT: &str = "INSERT INTO order_items (order_id, product_id, quantity, unit_price, note, \
created_at) VALUES ($1, $2, $3, $4, $5, now()) RETURNING order_items.id, order_items.created_at, \
order_items.quantity";

const UNRELATED: &str = "SELECT abalance, bid, filler FROM pgbench_accounts WHERE aid = $1 AND \
bid IN (SELECT bid FROM pgbench_branches WHERE bbalance > $2) ORDER BY aid LIMIT 10";

/// The rules for `order_items` and its two parents, with `extra` more tables (half parents,
/// half children with 4 FKs each: 2 × `extra` FKs).
fn rules(extra: usize) -> RuleSet {
    let parent = |t: &str| ParentPlan {
        schema: "public".into(),
        table: t.into(),
        key_column: "id".into(),
        uuid_column: "id_uuid".into(),
        legacy_column: "id_legacy".into(),
    };
    let fk = |c: &str, p: &str| FkPlan {
        schema: "public".into(),
        table: "order_items".into(),
        column: c.into(),
        uuid_column: format!("{c}_uuid"),
        legacy_column: format!("{c}_legacy"),
        column_type: "bigint".into(),
        parent_schema: "public".into(),
        parent_table: p.into(),
        parent_key_column: "id".into(),
        parent_uuid_column: "id_uuid".into(),
        parent_legacy_column: "id_legacy".into(),
        // As in production: a missing parent fails as the FK would.
        constraint: Some(format!("order_items_{c}_fkey")),
    };
    let half = extra / 2;
    let mut parents = vec![parent("orders"), parent("products")];
    parents.extend((0..half).map(|i| parent(&format!("big_p{i}"))));
    let mut fks = vec![fk("order_id", "orders"), fk("product_id", "products")];
    for i in 0..half {
        for k in 0..4 {
            let p = format!("big_p{}", (i * 4 + k) % half);
            fks.push(FkPlan {
                table: format!("big_c{i}"),
                constraint: Some(format!("big_c{i}_{p}_id_fkey")),
                ..fk(&format!("{p}_id"), &p)
            });
        }
    }
    let plan = PlanRules {
        parents,
        fks,
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

type Case<'a> = (&'a str, u32, Box<dyn FnMut() + 'a>);

/// Per case: (fastest, median) nanoseconds per call over `batches` interleaved batches.
fn measure(cases: &mut [Case], batches: usize) -> Vec<(f64, f64)> {
    let mut samples = vec![Vec::with_capacity(batches); cases.len()];
    for _ in 0..batches {
        for (i, (_, n, f)) in cases.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..*n {
                f();
            }
            samples[i].push(t.elapsed().as_nanos() as f64 / f64::from(*n));
        }
    }
    samples
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        })
        .collect()
}

fn main() {
    if cfg!(debug_assertions) {
        // `rewrite` re-parses its output in debug builds: the figures would mislead.
        eprintln!("warning: debug build; run `cargo bench --bench rewriter` for real figures");
    }
    // The rules' own build for 1,000 tables with 2,000 FKs, without the catalog reads the
    // proxy does first (benches/big_schema.sh measures those with it): the fastest of 20.
    let build_ms = (0..20)
        .map(|_| {
            let t = Instant::now();
            black_box(rules(1000));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "RuleSet::build for 1,000 more tables (2,000 more FKs): {build_ms:.2} ms (fastest of 20)"
    );
    let big = rules(1000);
    let rules = rules(0);
    match rewrite(&rules, INSERT) {
        Outcome::Rewritten { sql, .. } => {
            println!("input  ({} chars): {INSERT}", INSERT.len());
            println!("output ({} chars): {sql}", sql.len());
        }
        other => panic!("the benchmark INSERT must be rewritten: {other:?}"),
    }
    let cache = RewriteCache::new(4096, 64 * 1024);
    cache.rewrite(&rules, INSERT);
    let big_cache = RewriteCache::new(4096, 64 * 1024);
    big_cache.rewrite(&big, INSERT);

    // The INSERT with other literals: a text cache never sees these twice, the shape cache
    // answers them all after the first.
    let variants: Vec<String> = (0..50_000)
        .map(|i| {
            format!(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price, note, created_at) \
                 VALUES ({}, {}, 3, 9.99, 'gift {i}', now()) RETURNING order_items.id, order_items.created_at, \
                 order_items.quantity",
                i % 997 + 1,
                i % 113 + 1
            )
        })
        .collect();
    let shape_cache = RewriteCache::new(4096, 64 * 1024);
    shape_cache.rewrite(&rules, &variants[0]);
    let cache_for_variants = &shape_cache;
    let next = std::cell::Cell::new(1usize);
    let dialect = sqlparser::dialect::PostgreSqlDialect {};
    let mut cases: Vec<Case> = vec![
        (
            "sqlparser tokenize + parse only (reference)",
            200,
            Box::new(|| {
                black_box(
                    sqlparser::parser::Parser::parse_sql(&dialect, black_box(INSERT)).is_ok(),
                );
            }),
        ),
        (
            "uncached rewrite (`rewrite`)",
            200,
            Box::new(|| {
                black_box(rewrite(&rules, black_box(INSERT)));
            }),
        ),
        (
            "uncached rewrite, output re-parsed (`rewrite_verified`)",
            200,
            Box::new(|| {
                black_box(rewrite_verified(&rules, black_box(INSERT)));
            }),
        ),
        (
            "cached rewrite (`RewriteCache::rewrite`)",
            20_000,
            Box::new(|| {
                black_box(cache.rewrite(&rules, black_box(INSERT)));
            }),
        ),
        (
            "same shape, new literals each time (normalize + substitute)",
            20_000,
            Box::new(|| {
                let i = next.get();
                next.set((i + 1) % variants.len());
                black_box(cache_for_variants.rewrite(&rules, black_box(&variants[i])));
            }),
        ),
        (
            "no migrated table (prescan only)",
            20_000,
            Box::new(|| {
                black_box(cache.rewrite(&rules, black_box(UNRELATED)));
            }),
        ),
        (
            "no migrated table (prescan only), 1,000 more migrated tables",
            20_000,
            Box::new(|| {
                black_box(big_cache.rewrite(&big, black_box(UNRELATED)));
            }),
        ),
        (
            "cached rewrite, 1,000 more migrated tables",
            20_000,
            Box::new(|| {
                black_box(big_cache.rewrite(&big, black_box(INSERT)));
            }),
        ),
        (
            "uncached rewrite, 1,000 more migrated tables",
            200,
            Box::new(|| {
                black_box(rewrite(&big, black_box(INSERT)));
            }),
        ),
    ];
    let results = measure(&mut cases, 100);
    let parse = results[0].0;
    let targets = [
        "–",
        "≤ 30 µs",
        "–",
        "≤ 2 µs",
        "≤ 2 µs",
        "–",
        "as without",
        "as without",
        "as without",
    ];

    println!();
    println!("| case | fastest batch | median batch | target | fastest ÷ parse |");
    println!("|---|---|---|---|---|");
    for (((name, _, _), (fast, median)), target) in cases.iter().zip(&results).zip(targets) {
        println!(
            "| {name} | {:.2} µs | {:.2} µs | {target} | {:.3} |",
            fast / 1e3,
            median / 1e3,
            fast / parse
        );
    }
    println!();
    // The same statement with and without the 1,000 tables: (with, without) rows above.
    for (with, without) in [(6, 5), (7, 3), (8, 1)] {
        println!(
            "{} ÷ without them: {:.2} (fastest batches)",
            cases[with].0,
            results[with].0 / results[without].0
        );
    }
    println!(
        "INSERT: {} chars; unrelated statement: {} chars",
        INSERT.len(),
        UNRELATED.len()
    );
}
