//! Robustness: arbitrary text and random token soups never panic, never yield a mangled
//! statement, and random well-formed writes are all rewritten.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::forward;
use super::*;

/// Everything the rewriter returns must hold these, whatever the input.
#[track_caller]
fn check(rules: &RuleSet, sql: &str) -> Outcome {
    let out = rewrite(rules, sql);
    assert!(
        !out.skipped()
            .iter()
            .any(|s| s.reason == SkipReason::Internal),
        "internal error on {sql:?}: {out:?}"
    );
    if let Outcome::Rewritten { sql: new, .. } = &out {
        // Only insertions: the original is a subsequence of the rewrite.
        let mut rest = new.chars();
        assert!(
            sql.chars().all(|c| rest.any(|d| d == c)),
            "not an insertion-only edit:\n{sql}\n{new}"
        );
        let mut original = 0;
        let mut rewritten = 0;
        if let Ok(src) = edit::Source::tokenize(sql) {
            original = src.pieces().len();
        }
        if let Ok(src) = edit::Source::tokenize(new) {
            rewritten = src.pieces().len();
        }
        assert_eq!(
            original, rewritten,
            "statement count changed:\n{sql}\n{new}"
        );
        assert_eq!(
            placeholders(sql),
            placeholders(new),
            "parameters changed:\n{sql}\n{new}"
        );
    }
    out
}

/// The set of `$n` placeholders.
fn placeholders(sql: &str) -> Vec<String> {
    let mut v: Vec<String> = edit::Source::tokenize(sql)
        .map(|s| {
            s.raw
                .iter()
                .filter_map(|t| match &t.token {
                    sqlparser::tokenizer::Token::Placeholder(p) => Some(p.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

const SOUP: &[&str] = &[
    "INSERT",
    "INTO",
    "c",
    "public.c",
    "\"c\"",
    "app.\"Orders\"",
    "(",
    ")",
    ",",
    "a",
    "p_id",
    "parent_id",
    "\"AccountId\"",
    "p_id_uuid",
    "VALUES",
    "SELECT",
    "FROM",
    "p",
    "WHERE",
    "=",
    "$1",
    "$2",
    "7",
    "'x'",
    "'é€'",
    "NULL",
    "DEFAULT",
    "ON",
    "CONFLICT",
    "DO",
    "UPDATE",
    "SET",
    "NOTHING",
    "EXCLUDED.p_id",
    "RETURNING",
    "*",
    "WITH",
    "AS",
    "MERGE",
    "USING",
    "WHEN",
    "MATCHED",
    "NOT",
    "THEN",
    "DELETE",
    "CASE",
    "END",
    "::",
    "bigint",
    "+",
    "-",
    ";",
    "--x\n",
    "/* c */",
    "UNION",
    "ALL",
    "ORDER",
    "BY",
    "DISTINCT",
    "IS",
    "ONLY",
    "$$b$$",
    "E'\\''",
    "[",
    "]",
    "U&\"c\"",
    "OVERRIDING",
    "SYSTEM",
    "VALUE",
    "id",
    "x",
    ".",
    "\"",
    "'",
    "$",
    "(((",
];

fn soup(rng: &mut StdRng) -> String {
    let n = rng.random_range(0..40);
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(SOUP[rng.random_range(0..SOUP.len())]);
        if rng.random_bool(0.8) {
            s.push(' ');
        }
    }
    s
}

/// A well-formed write with a few tokens inserted, deleted or repeated.
fn mutated(rng: &mut StdRng) -> String {
    let sql = well_formed(rng);
    let mut words: Vec<String> = sql.split(' ').map(String::from).collect();
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..words.len());
        match rng.random_range(0..3) {
            0 => words.insert(at, SOUP[rng.random_range(0..SOUP.len())].to_string()),
            1 if words.len() > 1 => {
                words.remove(at);
            }
            _ => {
                let w = words[at].clone();
                words.insert(at, w);
            }
        }
    }
    words.join(" ")
}

fn arbitrary(rng: &mut StdRng) -> String {
    const CHARS: &[char] = &[
        'c', ' ', '(', ')', ',', '\'', '"', '$', ';', '-', '/', '*', '\n', '\r', 'é', '😀', '\\',
        'E', 'U', '&', '1', ':', '=', '[', ']', '.', 'p', '_', 'i', 'd', '\0',
    ];
    let prefix = [
        "INSERT INTO c (p_id) VALUES (",
        "UPDATE c SET p_id = ",
        "",
        "INSERT INTO c ",
    ];
    let mut s = prefix[rng.random_range(0..prefix.len())].to_string();
    for _ in 0..rng.random_range(0..60) {
        s.push(CHARS[rng.random_range(0..CHARS.len())]);
    }
    s
}

#[test]
fn arbitrary_text_never_breaks_it() {
    let r = forward();
    let mut rng = StdRng::seed_from_u64(0x6b65_7973);
    let mut rewritten = 0;
    for _ in 0..20_000 {
        rewritten += matches!(check(&r, &arbitrary(&mut rng)), Outcome::Rewritten { .. }) as usize;
    }
    // The generator must reach the rewriting path, not only the parser's errors.
    assert!(rewritten > 100, "only {rewritten} rewritten");
}

#[test]
fn token_soups_never_break_it() {
    let r = forward();
    let mut rng = StdRng::seed_from_u64(42);
    let (mut rewritten, mut invalid) = (0, 0);
    for i in 0..20_000 {
        let sql = if i % 2 == 0 {
            soup(&mut rng)
        } else {
            mutated(&mut rng)
        };
        let out = check(&r, &sql);
        rewritten += matches!(out, Outcome::Rewritten { .. }) as usize;
        if out
            .skipped()
            .iter()
            .any(|s| s.reason == SkipReason::Invalid)
        {
            // sqlparser accepts a few things PostgreSQL does not (`SELECT SELECT NULL`);
            // the rewrite of those fails verification and the original is kept.
            invalid += 1;
        }
    }
    eprintln!("rewritten {rewritten}, invalid {invalid}");
    // Mutations of valid writes must often stay valid and reach the rewriting path.
    assert!(rewritten > 500, "only {rewritten} rewritten");
    assert!(invalid < rewritten / 20, "{invalid} invalid rewrites");
}

/// A random value expression for an FK.
fn value(rng: &mut StdRng, param: &mut usize) -> String {
    match rng.random_range(0..8) {
        0 => "NULL".into(),
        1 => rng.random_range(0..1000).to_string(),
        2 | 3 => {
            *param += 1;
            format!("${param}")
        }
        4 => {
            *param += 1;
            format!("${param}::int + 1")
        }
        5 => "(SELECT max(id) FROM p)".into(),
        6 => "CASE WHEN true THEN 1 ELSE 2 END".into(),
        _ => "- -3 /* neg */".into(),
    }
}

fn well_formed(rng: &mut StdRng) -> String {
    let mut param = 0;
    let table = ["c", "public.c", "\"c\"", "C"][rng.random_range(0..4)];
    match rng.random_range(0..5) {
        4 => {
            let v = value(rng, &mut param);
            format!(
                "WITH x AS (INSERT INTO p (name) VALUES ('n') RETURNING id), y AS (SELECT 1) INSERT INTO {table} (p_id, parent_id) SELECT id, {v} FROM x"
            )
        }
        0 => {
            let rows: Vec<String> = (0..rng.random_range(1..5))
                .map(|_| {
                    let a = value(rng, &mut param);
                    let b = value(rng, &mut param);
                    format!("('a', {a}, {b})")
                })
                .collect();
            format!(
                "INSERT INTO {table} (a, p_id, parent_id) VALUES {} RETURNING id",
                rows.join(", ")
            )
        }
        1 => {
            let v = value(rng, &mut param);
            format!("UPDATE {table} AS t SET a = 'u', p_id = {v} WHERE t.id = 5")
        }
        2 => {
            let v = value(rng, &mut param);
            let w = value(rng, &mut param);
            format!(
                "INSERT INTO {table} (a, p_id) VALUES ('k', {v}) ON CONFLICT (a) DO UPDATE SET p_id = {w}"
            )
        }
        _ => {
            let v = value(rng, &mut param);
            format!("WITH x AS (SELECT 1) INSERT INTO {table} (p_id, a) SELECT {v}, 'q' FROM x")
        }
    }
}

#[test]
fn random_well_formed_writes_are_all_rewritten() {
    let r = forward();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..3_000 {
        let sql = well_formed(&mut rng);
        match check(&r, &sql) {
            Outcome::Rewritten { skipped, .. } => assert!(skipped.is_empty(), "{sql}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[test]
fn deep_nesting_and_huge_input_are_refused_not_crashed() {
    let r = forward();
    let deep = format!(
        "INSERT INTO c (p_id) VALUES ({}1{})",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    assert_eq!(check(&r, &deep).skipped()[0].reason, SkipReason::ParseError);
    let comments = format!(
        "INSERT INTO c (p_id) VALUES (1 {}{})",
        "/*".repeat(50_000),
        "*/".repeat(50_000)
    );
    check(&r, &comments);
    let huge = format!(
        "INSERT INTO c (p_id) VALUES {}",
        vec!["(1)"; MAX_SQL_BYTES / 3].join(",")
    );
    assert_eq!(check(&r, &huge).skipped()[0].reason, SkipReason::TooLong);
}

/// Through the shape cache, every text gets exactly its own rewrite: literal-only variants of
/// well-formed writes (which hit shapes), and soups and arbitrary strings (which mostly do
/// not normalize, or whose shapes are marked not cacheable).
#[test]
fn the_shape_cache_answers_exactly_what_the_rewriter_would() {
    let r = forward();
    let cache = super::RewriteCache::new(4096, 64 * 1024);
    let mut rng = StdRng::seed_from_u64(0x5348_4150);
    let with_literals = |rng: &mut StdRng| {
        // Well-formed writes without parameters, with fresh literals each time.
        let sql = well_formed(rng);
        let mut out = String::new();
        for part in sql.split('$') {
            if out.is_empty() && !sql.starts_with('$') {
                out.push_str(part);
                continue;
            }
            let digits = part.chars().take_while(char::is_ascii_digit).count();
            out.push_str(&rng.random_range(0..100_000).to_string());
            out.push_str(&part[digits..]);
        }
        out.replace("'n'", &format!("'n{}'", rng.random_range(0..9)))
    };
    let mut hits_before = 0;
    for i in 0..6_000 {
        let sql = match i % 3 {
            0 => with_literals(&mut rng),
            1 => soup(&mut rng),
            _ => mutated(&mut rng),
        };
        assert_eq!(*cache.rewrite(&r, &sql), super::rewrite(&r, &sql), "{sql}");
        if i == 5_999 {
            hits_before = cache.hits();
        }
    }
    assert!(
        hits_before > 500,
        "the shapes were hardly used: {hits_before} hits"
    );
}

/// The prescan never hides a statement the parser would rewrite or skip: with every statement
/// parsed, whatever its tokens, the outcome is the same.
#[test]
fn the_prescan_never_hides_what_the_parser_finds() {
    let r = forward();
    let mut rng = StdRng::seed_from_u64(0x7072_6573);
    let mut found = 0;
    for i in 0..20_000 {
        let sql = match i % 3 {
            0 => soup(&mut rng),
            1 => mutated(&mut rng),
            _ => arbitrary(&mut rng),
        };
        let unscanned = super::rewrite_unscanned(&r, &sql);
        if unscanned == Outcome::Unchanged {
            continue;
        }
        found += 1;
        // Verified as the unscanned one is (release builds' `rewrite` does not re-parse its
        // output, so under `--release` the two would differ on texts that do not parse).
        let scanned = super::rewrite_verified(&r, &sql);
        if let Outcome::Rewritten {
            sql: new, changes, ..
        } = &unscanned
        {
            assert!(
                matches!(&scanned, Outcome::Rewritten { sql: s, changes: c, .. } if s == new && c == changes),
                "{sql}\nscanned: {scanned:?}\nunscanned: {unscanned:?}"
            );
        }
        // The same skips, each counted once: where sqlparser splits a text PostgreSQL reads
        // as one statement, every piece of it may report it.
        let distinct = |o: &Outcome| {
            let mut v: Vec<_> = o
                .skipped()
                .iter()
                .map(|s| (s.table.clone(), s.reason))
                .collect();
            v.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
            v.dedup();
            v
        };
        assert_eq!(
            distinct(&scanned),
            distinct(&unscanned),
            "{sql}\nscanned: {scanned:?}\nunscanned: {unscanned:?}"
        );
    }
    assert!(found > 1_000, "only {found} found");
}
