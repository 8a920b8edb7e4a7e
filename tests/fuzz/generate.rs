//! The seeded generator of client message sequences.
//!
//! A case is a few steps: simple queries, extended-protocol sequences (with or without Sync),
//! pipelines with an error in the middle, COPY in and out through both protocols,
//! FunctionCall, lone messages of every kind, writes to the migrated child tables repeated so
//! that keyshift prepares its own statements, keyshift's own statement names, DEALLOCATE and
//! DISCARD, and malformed messages (wrong lengths, missing terminators, bogus counts, unknown
//! tags). Some cases end with Terminate; some are written in small random chunks.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::wire::*;

/// One generated (or hand-written) case.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub msgs: Vec<Msg>,
    /// When set, the bytes are written in random small chunks (this seeds the cut points).
    pub split: Option<u64>,
}

impl Case {
    pub fn new(name: &str, msgs: Vec<Msg>) -> Case {
        Case {
            name: name.into(),
            msgs,
            split: None,
        }
    }

    pub fn ends_with_terminate(&self) -> bool {
        self.msgs
            .last()
            .is_some_and(|m| m.tag == b'X' && m.len.is_none())
    }

    pub fn readable(&self) -> String {
        let mut s = String::new();
        if let Some(seed) = self.split {
            s.push_str(&format!(
                "  (written in random chunks, split seed {seed})\n"
            ));
        }
        for m in &self.msgs {
            s.push_str("  ");
            s.push_str(&m.readable());
            if m.wait {
                s.push_str("    (then waits for the answers)");
            }
            s.push('\n');
        }
        s
    }
}

/// OIDs of two built-in functions for FunctionCall (`int4pl`, `upper(text)`).
#[derive(Clone, Copy)]
pub struct Oids {
    pub int4pl: u32,
    pub upper: u32,
}

/// The seed of case `index` of a run: every case can be run on its own.
pub fn case_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

pub fn generate(seed: u64, index: u64, oids: Oids) -> Case {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(case_seed(seed, index)),
        oids,
        out: Vec::new(),
    };
    let steps = g.rng.random_range(1..=7);
    for _ in 0..steps {
        g.step();
    }
    // Sometimes the client waits for the answers after a Sync or a Query: keyshift prepares
    // its own statements only when nothing is in flight.
    let wait_p = g.rng.random_range(0.0..0.6);
    for m in g.out.iter_mut() {
        if (m.tag == b'S' || m.tag == b'Q') && m.len.is_none() && g.rng.random_bool(wait_p) {
            m.wait = true;
        }
    }
    if g.rng.random_bool(0.15) {
        g.out.push(terminate());
    }
    let split = g.rng.random_bool(0.25).then(|| g.rng.random());
    Case {
        name: format!("seed {seed} case {index}"),
        msgs: g.out,
        split,
    }
}

struct Gen {
    rng: StdRng,
    oids: Oids,
    out: Vec<Msg>,
}

const READS: &[&str] = &[
    "SELECT 1",
    "SELECT 1/0",
    "SELEC 1",
    "",
    "SELECT id, connector_id, name FROM mcp_servers ORDER BY id",
    "SELECT count(*) FROM mcp_servers",
    "SELECT id, name FROM mcp_connectors ORDER BY id",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT a",
    "ROLLBACK TO SAVEPOINT a",
    "SET application_name = 'fz'",
    "LISTEN fz",
    "NOTIFY fz, 'hello'",
    "SHOW transaction_isolation",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    "DEALLOCATE s1",
    "DEALLOCATE keyshift_s1",
    "DEALLOCATE keyshift_q1",
    "PREPARE s1 AS SELECT 1",
    "EXECUTE s1",
    "PREPARE s2 AS INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
    "EXECUTE s2(1, 'e')",
    "EXECUTE keyshift_q1(1, 'x')",
    "SELECT * FROM nowhere",
];

/// Statements with parameters, for the extended protocol: (sql, parameter count).
const PARAM_SQL: &[(&str, usize)] = &[
    (
        "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
        2,
    ),
    (
        "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id, connector_id",
        2,
    ),
    (
        "INSERT INTO connector_access (connector_id, user_id) VALUES ($1, $2)",
        2,
    ),
    ("UPDATE mcp_servers SET connector_id = $1 WHERE id = $2", 2),
    ("SELECT $1::int + 1", 1),
    ("SELECT $1::text", 1),
    ("SELECT id, name FROM mcp_servers WHERE id = $1", 1),
    ("SELECT 1", 0),
    ("SELECT 1/0", 0),
    ("SELEC 1", 0),
    ("SELECT generate_series(1, 3)", 0),
    (
        "INSERT INTO mcp_servers (connector_id, name) SELECT id, 'sel' FROM mcp_connectors WHERE id <= 2",
        0,
    ),
    ("BEGIN", 0),
    ("COMMIT", 0),
    ("DEALLOCATE ALL", 0),
    ("", 0),
];

const NAMES: &[&str] = &["", "", "", "s1", "s2", "keyshift_s1", "keyshift_q1"];

impl Gen {
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.rng.random_range(0..xs.len())]
    }

    fn fk(&mut self) -> String {
        match self.rng.random_range(0..10) {
            0 => "999".into(),
            1 => "NULL".into(),
            2 => "'abc'".into(),
            n => ((n % 5) + 1).to_string(),
        }
    }

    fn param(&mut self) -> Option<String> {
        match self.rng.random_range(0..10) {
            0 => None,
            1 => Some("999".into()),
            2 => Some("abc".into()),
            n => Some(((n % 5) + 1).to_string()),
        }
    }

    /// A write to a migrated child table, literals varied so that its shape repeats.
    fn write_sql(&mut self) -> String {
        let k = self.fk();
        let n = self.rng.random_range(1..6);
        match self.rng.random_range(0..7) {
            0 => format!("INSERT INTO mcp_servers (connector_id, name) VALUES ({k}, 'w{n}')"),
            1 => format!(
                "INSERT INTO mcp_servers (connector_id, name) VALUES ({k}, 'r{n}') RETURNING id, connector_id"
            ),
            2 => {
                format!("INSERT INTO connector_access (connector_id, user_id) VALUES ({k}, 'u{n}')")
            }
            3 => format!("UPDATE mcp_servers SET connector_id = {k} WHERE id = {n}"),
            4 => format!("INSERT INTO mcp_servers VALUES (DEFAULT, {k}, 'pos', 'on')"),
            5 => format!(
                "INSERT INTO mcp_servers (connector_id, name) VALUES ({k}, 'a'), ({n}, 'b')"
            ),
            _ => format!("DELETE FROM mcp_servers WHERE id = {n}"),
        }
    }

    fn params(&mut self, n: usize) -> Vec<Option<String>> {
        (0..n).map(|_| self.param()).collect()
    }

    fn bind_params(&mut self, portal: &str, stmt: &str, n: usize) -> Msg {
        let p = self.params(n);
        let refs: Vec<Option<&str>> = p.iter().map(|v| v.as_deref()).collect();
        bind(portal, stmt, &refs)
    }

    fn step(&mut self) {
        match self.rng.random_range(0..100) {
            0..16 => {
                let sql = if self.rng.random_bool(0.5) {
                    self.write_sql()
                } else if self.rng.random_bool(0.1) {
                    "SELECT 1; SELECT 1/0; SELECT 2".into()
                } else {
                    self.pick(READS).to_string()
                };
                self.out.push(query(&sql));
            }
            16..38 => self.extended(),
            38..48 => self.repeated_writes(),
            48..55 => self.copy_in_simple(),
            55..59 => self.copy_in_extended(),
            59..61 => {
                let m = query("COPY (SELECT id, name FROM mcp_servers ORDER BY id) TO STDOUT");
                self.out.push(m);
            }
            61..66 => self.function_call(),
            66..75 => self.lone(),
            75..81 => self.error_pipeline(),
            81..86 => self.own_names(),
            _ => self.malformed(),
        }
    }

    /// Parse/Bind/Describe/Execute, with Sync, Flush, or nothing at the end.
    fn extended(&mut self) {
        let &(sql, n) = self.pick(PARAM_SQL);
        let name = *self.pick(NAMES);
        let portal = if self.rng.random_bool(0.8) { "" } else { "p1" };
        if self.rng.random_bool(0.9) {
            let types: Vec<u32> = if n > 0 && self.rng.random_bool(0.3) {
                vec![23; n]
            } else {
                vec![]
            };
            self.out.push(parse(name, sql, &types));
        }
        if self.rng.random_bool(0.3) {
            self.out.push(describe(b'S', name));
        }
        let b = self.bind_params(portal, name, n);
        self.out.push(b);
        if self.rng.random_bool(0.5) {
            self.out.push(describe(b'P', portal));
        }
        let max = if self.rng.random_bool(0.15) { 1 } else { 0 };
        self.out.push(execute(portal, max));
        if self.rng.random_bool(0.2) {
            self.out.push(close(b'P', portal));
        }
        if self.rng.random_bool(0.15) {
            self.out.push(close(b'S', name));
        }
        match self.rng.random_range(0..10) {
            0..7 => self.out.push(sync()),
            7 => self.out.push(flush()),
            _ => {}
        }
    }

    /// The same write 2 to 4 times, so keyshift prepares it (keyshift_s<N> for an unnamed
    /// Parse, keyshift_q<N> for a simple Query of literals), then maybe DEALLOCATE or DISCARD.
    fn repeated_writes(&mut self) {
        let times = self.rng.random_range(2..=4);
        let simple = self.rng.random_bool(0.5);
        let &(sql, n) = self.pick(&PARAM_SQL[..4]);
        for _ in 0..times {
            if simple {
                let k = self.fk();
                let i = self.rng.random_range(1..6);
                self.out.push(query(&format!(
                    "INSERT INTO mcp_servers (connector_id, name) VALUES ({k}, 'q{i}')"
                )));
            } else {
                self.out.push(parse("", sql, &[]));
                let b = self.bind_params("", "", n);
                self.out.push(b);
                if self.rng.random_bool(0.3) {
                    self.out.push(describe(b'P', ""));
                }
                self.out.push(execute("", 0));
                if self.rng.random_bool(0.8) {
                    self.out.push(sync());
                }
            }
        }
        match self.rng.random_range(0..8) {
            0 => self.out.push(query("DEALLOCATE ALL")),
            1 => self.out.push(query("DISCARD ALL")),
            2 => {
                self.out.push(parse("s3", "DEALLOCATE ALL", &[]));
                self.out.push(bind("", "s3", &[]));
                self.out.push(execute("", 0));
                self.out.push(bind("", "", &[Some("1"), Some("x")]));
                self.out.push(execute("", 0));
                self.out.push(sync());
            }
            3 => {
                // The unnamed statement replaced by a Parse PostgreSQL rejects, then Bind.
                self.out.push(parse("", "SELEC 1", &[]));
                self.out.push(sync());
                self.out.push(bind("", "", &[Some("1"), Some("x")]));
                self.out.push(execute("", 0));
                self.out.push(sync());
            }
            _ => {}
        }
    }

    fn copy_rows(&mut self) -> Vec<Msg> {
        let mut v = Vec::new();
        for _ in 0..self.rng.random_range(0..4) {
            let row = match self.rng.random_range(0..10) {
                0 => "999\tbad fk\n".to_string(),
                1 => "abc\tbad int\n".to_string(),
                2 => "1\tno newline".to_string(),
                n => format!("{}\tcopied{n}\n", (n % 5) + 1),
            };
            v.push(copy_data(&row));
        }
        v
    }

    fn copy_end(&mut self) {
        match self.rng.random_range(0..10) {
            0..6 => self.out.push(copy_done()),
            6 | 7 => self.out.push(copy_fail("client gave up")),
            8 => self.out.push(query("SELECT 1")),
            _ => {}
        }
    }

    fn copy_in_simple(&mut self) {
        self.out.push(query(if self.rng.random_bool(0.8) {
            "COPY mcp_servers (connector_id, name) FROM STDIN"
        } else {
            "COPY mcp_connectors (name) FROM STDIN"
        }));
        let rows = self.copy_rows();
        for r in rows {
            self.out.push(r);
            if self.rng.random_bool(0.2) {
                let m = if self.rng.random_bool(0.5) {
                    sync()
                } else {
                    flush()
                };
                self.out.push(m);
            }
        }
        self.copy_end();
    }

    fn copy_in_extended(&mut self) {
        self.out.push(parse(
            "",
            "COPY mcp_servers (connector_id, name) FROM STDIN",
            &[],
        ));
        self.out.push(bind("", "", &[]));
        if self.rng.random_bool(0.5) {
            self.out.push(describe(b'P', ""));
        }
        self.out.push(execute("", 0));
        if self.rng.random_bool(0.7) {
            self.out.push(sync());
        }
        let rows = self.copy_rows();
        self.out.extend(rows);
        self.copy_end();
        if self.rng.random_bool(0.8) {
            self.out.push(sync());
        }
    }

    fn function_call(&mut self) {
        let m = match self.rng.random_range(0..5) {
            0 | 1 => function_call(self.oids.int4pl, 2, &["1", "2"]),
            2 => function_call(self.oids.upper, 1, &["abc"]),
            3 => function_call(1, 0, &[]),
            _ => function_call(self.oids.int4pl, 2, &["x", "2"]),
        };
        self.out.push(m);
    }

    fn lone(&mut self) {
        let name = *self.pick(NAMES);
        let m = match self.rng.random_range(0..12) {
            0 => sync(),
            1 => flush(),
            2 => close(b'S', name),
            3 => close(b'P', "p1"),
            4 => describe(b'S', name),
            5 => describe(b'P', ""),
            6 => execute("", 0),
            7 => copy_data("1\tstray\n"),
            8 => copy_done(),
            9 => copy_fail("stray"),
            10 => bind("", name, &[]),
            _ => parse(name, "SELECT 2", &[]),
        };
        self.out.push(m);
    }

    /// An error in the middle of a pipeline, then messages PostgreSQL skips until Sync
    /// (a Query and a FunctionCall among them), then Sync.
    fn error_pipeline(&mut self) {
        self.out.push(parse("", "SELECT 1", &[]));
        self.out.push(bind("", "", &[]));
        self.out.push(execute("", 0));
        let bad = *self.pick(&["SELEC 1", "SELECT 1/0", "SELECT * FROM nowhere"]);
        self.out.push(parse("", bad, &[]));
        self.out.push(bind("", "", &[]));
        self.out.push(execute("", 0));
        for _ in 0..self.rng.random_range(0..3) {
            let m = match self.rng.random_range(0..6) {
                0 => query("SELECT 1"),
                1 => function_call(self.oids.int4pl, 2, &["1", "2"]),
                2 => copy_data("x\n"),
                3 => flush(),
                4 => parse(
                    "",
                    "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
                    &[],
                ),
                _ => execute("", 0),
            };
            self.out.push(m);
        }
        if self.rng.random_bool(0.85) {
            self.out.push(sync());
        }
    }

    /// Statement names keyshift uses for itself, after writes that make it prepare them.
    fn own_names(&mut self) {
        for _ in 0..2 {
            self.out.push(parse(
                "",
                "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
                &[],
            ));
            self.out.push(bind("", "", &[Some("1"), Some("k")]));
            self.out.push(execute("", 0));
            self.out.push(sync());
        }
        let m = match self.rng.random_range(0..6) {
            0 => query("DEALLOCATE keyshift_s1"),
            1 => parse("keyshift_s1", "SELECT 1", &[]),
            2 => query("EXECUTE keyshift_s1(1, 'own')"),
            3 => close(b'S', "keyshift_s1"),
            4 => describe(b'S', "keyshift_s1"),
            _ => query("PREPARE keyshift_q1 AS SELECT 1"),
        };
        self.out.push(m);
        self.out.push(sync());
    }

    /// A message of a random kind made wrong in one way.
    fn malformed(&mut self) {
        // Sometimes a valid message first, in the same write.
        if self.rng.random_bool(0.3) {
            self.out.push(query("SELECT 1"));
        }
        let m = match self.rng.random_range(0..16) {
            // Close or Describe whose body is just the kind byte.
            0 => Msg::new(b'C', b"S".to_vec()),
            1 => Msg::new(
                if self.rng.random_bool(0.5) {
                    b'C'
                } else {
                    b'D'
                },
                b"P".to_vec(),
            ),
            2 => close(b'X', "s1"),
            3 => describe(b'Q', ""),
            // Unknown tags.
            4 => Msg::new(*self.pick(b"!Zyp\x00\xff"), b"junk".to_vec()),
            // Bogus counts.
            5 => bind_counted(
                "",
                "",
                (0, &[]),
                (*self.pick(&[3i16, -1, 0x7fff]), &[Some("1")]),
                (0, &[]),
            ),
            6 => bind_counted("", "", (3, &[0]), (0, &[]), (0, &[])),
            7 => bind_counted("", "", (0, &[]), (0, &[]), (2, &[0])),
            8 => parse_counted("", "SELECT $1::int", 4, &[23]),
            9 => {
                let mut m = function_call(self.oids.int4pl, 2, &["1", "2"]);
                m.body[6..8].copy_from_slice(&5i16.to_be_bytes());
                m
            }
            // Missing terminators and trailing garbage.
            10 => {
                let mut m = query("SELECT 1");
                m.body.pop();
                m
            }
            11 => {
                let mut m = query(&self.write_sql());
                m.body.extend_from_slice(b"garbage\0");
                m
            }
            12 => Msg::new(b'E', b"".to_vec()),
            13 => Msg::new(*self.pick(b"SHcX"), b"extra".to_vec()),
            14 => {
                let mut m = parse("", "SELECT 1", &[]);
                m.body.truncate(m.body.len() - 2);
                m
            }
            _ => self.valid_any(),
        };
        let mut m = m;
        // Wrong lengths, on any of the above.
        if self.rng.random_bool(0.3) {
            let real = m.body.len() as i64 + 4;
            let delta = *self.pick(&[-3i64, -2, -1, 1, 2, 7, 100_000]);
            let l = (real + delta).max(0);
            m.len = Some(l as u32);
        }
        self.out.push(m);
    }

    fn valid_any(&mut self) -> Msg {
        match self.rng.random_range(0..6) {
            0 => query("SELECT 1"),
            1 => parse("", "SELECT 1", &[]),
            2 => bind("", "", &[]),
            3 => execute("", 0),
            4 => copy_data("1\tx\n"),
            _ => function_call(self.oids.int4pl, 2, &["1", "2"]),
        }
    }
}
