//! The session under a differential protocol fuzzer (tests/fuzz/): every case goes to
//! PostgreSQL directly and through keyshift (with a migration's rewriter live), and must get
//! the same answer; after each, no panic, the session has left the gate, a fresh client works
//! and `/v1/pause` drains.
//!
//! First a fixed list of named cases (each a failure the fuzzer found once), then generated
//! ones: `KEYSHIFT_FUZZ_SEED` (a number, or `random`), `KEYSHIFT_FUZZ_CASES` (how many),
//! `KEYSHIFT_FUZZ_CASE` (only that one, to reproduce), `KEYSHIFT_FUZZ_MINIMISE=0` (report
//! failures as found). `benches/fuzz.sh` runs long ones.
mod common;
mod fuzz;
mod migrate_support;

use std::time::Instant;

use fuzz::generate::Case;
use fuzz::wire::*;

const INS: &str = "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)";
const UPD: &str = "UPDATE mcp_servers SET connector_id = $1 WHERE id = $2";

/// Parse, Bind, Execute, Sync of the unnamed statement `INS`.
fn unnamed_insert(name: &str) -> Vec<Msg> {
    vec![
        parse("", INS, &[]),
        bind("", "", &[Some("1"), Some(name)]),
        execute("", 0),
        sync().then_wait(),
    ]
}

/// The same INSERT twice, so that keyshift prepares it as `keyshift_s1`, then `rest`.
fn after_aliasing(rest: Vec<Msg>) -> Vec<Msg> {
    let mut v = unnamed_insert("a");
    v.extend(unnamed_insert("b"));
    v.extend(rest);
    v
}

/// Failures found on the relay before its rewrite (issue 12), as minimal sequences.
fn named_cases() -> Vec<Case> {
    let copy_in = "COPY mcp_servers (connector_id, name) FROM STDIN";
    vec![
        Case::new(
            "close with body just S",
            vec![Msg::new(b'C', b"S".to_vec())],
        ),
        Case::new(
            "describe with body just P",
            vec![Msg::new(b'D', b"P".to_vec())],
        ),
        Case::new(
            "extended COPY, then Sync",
            vec![
                parse("", copy_in, &[]),
                bind("", "", &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
                copy_data("1\tx\n"),
                copy_done(),
                sync(),
            ],
        ),
        Case::new(
            // A rewritten INSERT (keyshift's own statement, guarded under
            // upstream_pooling = auto) with an extended COPY pipelined behind it: the guard
            // held the CopyData until a ReadyForQuery that only comes after it.
            "rewritten INSERT, then an extended COPY in the same sequence",
            vec![
                parse(
                    "",
                    "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id, connector_id",
                    &[],
                ),
                bind("", "", &[Some("1"), Some("4")]),
                parse("", copy_in, &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
                copy_data("999\tbad fk\n"),
                copy_done(),
            ],
        ),
        Case::new(
            "Sync inside simple COPY",
            vec![
                query(copy_in),
                copy_data("1\tx\n"),
                sync(),
                flush(),
                copy_done(),
            ],
        ),
        Case::new(
            "Query while skipping to Sync",
            vec![
                parse("", "SELEC 1", &[]),
                bind("", "", &[]),
                execute("", 0),
                query("SELECT 1"),
                sync(),
            ],
        ),
        Case::new(
            "FunctionCall while skipping to Sync",
            vec![
                parse("", "SELEC 1", &[]),
                function_call(177, 2, &["1", "2"]),
                sync(),
            ],
        ),
        Case::new(
            "CopyData after a failed COPY",
            vec![
                query(copy_in),
                copy_data("abc\tx\n"),
                copy_done(),
                copy_data("1\ty\n"),
                copy_done(),
                query("SELECT 1"),
            ],
        ),
        Case::new(
            "error in flight while keyshift prepares keyshift_s1",
            [
                unnamed_insert("a"),
                vec![
                    parse("", "SELECT 1/0", &[]),
                    bind("", "", &[]),
                    execute("", 0),
                ],
                unnamed_insert("b"),
                unnamed_insert("c"),
            ]
            .concat(),
        ),
        Case::new(
            "DEALLOCATE ALL through a named statement, then Bind of the unnamed",
            after_aliasing(vec![
                parse("s3", "DEALLOCATE ALL", &[]),
                bind("", "s3", &[]),
                execute("", 0),
                sync(),
                bind("", "", &[Some("1"), Some("c")]),
                execute("", 0),
                sync(),
            ]),
        ),
        Case::new(
            "unnamed Parse rejected before replacing, then Bind",
            after_aliasing(vec![
                parse_counted("", INS, 3, &[23]),
                sync(),
                bind("", "", &[Some("1"), Some("c")]),
                execute("", 0),
                sync(),
            ]),
        ),
        Case::new(
            "Query with garbage after its NUL",
            vec![{
                let mut m = query("INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'x')");
                m.body.extend_from_slice(b"garbage\0");
                m
            }],
        ),
        Case::new(
            "Terminate right after a Query",
            vec![query("SELECT 1"), terminate()],
        ),
        Case::new(
            "bad tag after a valid message",
            vec![query("SELECT 1"), Msg::new(b'!', b"junk".to_vec())],
        ),
        Case::new(
            "PostgreSQL's own FATAL",
            vec![Msg::new(b'p', b"junk\0".to_vec())],
        ),
        Case::new(
            "Parse during simple COPY: PostgreSQL's FATAL, then keyshift's",
            vec![
                query(copy_in).then_wait(),
                parse("", "SELECT 1", &[]),
                sync(),
            ],
        ),
        Case::new(
            "DEALLOCATE keyshift_s1",
            after_aliasing(vec![query("DEALLOCATE keyshift_s1")]),
        ),
        Case::new(
            "Parse keyshift_s1",
            after_aliasing(vec![parse("keyshift_s1", "SELECT 1", &[]), sync()]),
        ),
        Case::new(
            "EXECUTE keyshift_q1 after a repeated INSERT",
            vec![
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'a')").then_wait(),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'b')").then_wait(),
                query("EXECUTE keyshift_q1(3, 'c')"),
            ],
        ),
        Case::new(
            "length shorter than the header",
            vec![Msg {
                tag: b'Q',
                body: vec![],
                len: Some(1),
                wait: false,
            }],
        ),
        Case::new("unknown tag", vec![Msg::new(b'!', b"junk".to_vec())]),
        Case::new(
            "EXECUTE keyshift_s1",
            after_aliasing(vec![query("EXECUTE keyshift_s1(1, 'own')")]),
        ),
        Case::new(
            "Describe keyshift_s1",
            after_aliasing(vec![describe(b'S', "keyshift_s1"), sync()]),
        ),
        Case::new(
            "an error naming keyshift's statement in place of the unnamed one",
            vec![
                parse(
                    "",
                    "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
                    &[],
                ),
                parse(
                    "",
                    "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2)",
                    &[],
                ),
                sync().then_wait(),
                bind("", "", &[]),
            ],
        ),
        Case::new(
            "an unnamed Parse skipped after an error leaves keyshift's statement the unnamed one",
            vec![
                parse(
                    "",
                    "UPDATE mcp_servers SET connector_id = $1 WHERE id = $2",
                    &[],
                ),
                parse(
                    "",
                    "UPDATE mcp_servers SET connector_id = $1 WHERE id = $2",
                    &[],
                ),
                sync().then_wait(),
                parse(
                    "",
                    "UPDATE mcp_servers SET connector_id = $1 WHERE id = $2",
                    &[],
                ),
                bind("", "", &[Some("5"), Some("abc")]),
                parse("", "SELEC 1", &[]),
                sync(),
                bind("", "", &[Some("1"), Some("x")]),
            ],
        ),
        Case::new(
            "error position in a rewritten UPDATE",
            vec![query(
                "UPDATE mcp_servers SET connector_id = 'abc' WHERE id = 4",
            )],
        ),
        Case::new(
            "UPDATE with garbage after its NUL",
            vec![{
                let mut m = query("UPDATE mcp_servers SET connector_id = 3 WHERE id = 4");
                m.body.extend_from_slice(b"garbage\0");
                m
            }],
        ),
        Case::new(
            "Terminate right after a FunctionCall",
            vec![function_call(177, 2, &["1", "2"]), terminate()],
        ),
        Case::new(
            "Terminate right after a failing COPY row",
            vec![
                query(copy_in).then_wait(),
                copy_data("abc\tx\n"),
                terminate(),
            ],
        ),
        Case::new(
            "Describe whose length covers the next message's first bytes",
            vec![
                query("SELECT 1").then_wait(),
                Msg {
                    tag: b'D',
                    body: b"P".to_vec(),
                    len: Some(7),
                    wait: false,
                },
            ],
        ),
        Case::new(
            "Close longer than PostgreSQL's limit for it",
            vec![Msg {
                tag: b'C',
                body: b"Xs1\0".to_vec(),
                len: Some(100_008),
                wait: false,
            }],
        ),
        Case::new(
            "FunctionCall with a bogus argument count",
            vec![{
                let mut m = function_call(177, 2, &["1", "2"]);
                m.body[6..8].copy_from_slice(&5i16.to_be_bytes());
                m
            }],
        ),
        Case::new(
            "Bind with a bogus parameter count, then a Query while skipping",
            vec![
                bind_counted("", "", (0, &[]), (-1, &[Some("1")]), (0, &[])),
                query("SELECT 1").then_wait(),
            ],
        ),
        Case::new(
            // The second run of a rewritten UPDATE goes through keyshift's statement, guarded
            // under upstream_pooling = auto; its Execute fails on the FK, and the guard, taking
            // the pipelined Query for the sequence's end, held the client's Sync from
            // PostgreSQL, which skips to that Sync: the session hung.
            "guarded rewritten UPDATE fails on its Execute, a Query pipelined behind it",
            vec![
                parse("", UPD, &[]),
                bind("", "", &[Some("5"), None]),
                copy_data("4\tcopied3\n"),
                copy_done(),
                parse("", "SELEC 1", &[]),
                sync().then_wait(),
                parse("", UPD, &[]),
                bind("", "", &[Some("999"), Some("4")]),
                execute("", 0),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (5, 'q5')"),
            ],
        ),
        Case::new(
            // PostgreSQL refuses a Parse during COPY from its type byte; keyshift waited for
            // the 100,000 bytes its length promised (seed 9308, case 157).
            "a Parse with a long length word during COPY",
            vec![
                query(copy_in).then_wait(),
                Msg {
                    tag: b'P',
                    body: b"\0SELECT 1\0".to_vec(),
                    len: Some(100_014),
                    wait: false,
                },
            ],
        ),
        Case::new(
            // The same, with the COPY started by an Execute and the Query pipelined before
            // PostgreSQL's CopyInResponse (seed 9405, case 516).
            "a long Query pipelined behind an extended COPY",
            vec![
                sync().then_wait(),
                parse("", copy_in, &[]),
                bind("", "", &[]),
                execute("", 0),
                Msg {
                    tag: b'Q',
                    body: b"SELECT 1".to_vec(),
                    len: Some(100_012),
                    wait: false,
                },
            ],
        ),
        Case::new(
            // The client closes its side inside a CopyData: PostgreSQL says "unexpected EOF",
            // keyshift closed without a word (seed 9308, case 265).
            "the client closes inside a CopyData",
            vec![
                query(copy_in).then_wait(),
                Msg {
                    tag: b'd',
                    body: b"1\tx\n".to_vec(),
                    len: Some(15),
                    wait: false,
                },
                terminate(),
            ],
        ),
        Case::new(
            // The COPY fails on its first row, and the long Query pipelined behind it is read
            // by PostgreSQL as any other message: its type byte went ahead, the rest never
            // comes whole.
            "a failing COPY row, a long Query pipelined behind it",
            vec![
                query(copy_in).then_wait(),
                copy_data("abc\tx\n"),
                Msg {
                    tag: b'Q',
                    body: b"SELECT 1".to_vec(),
                    len: Some(100_012),
                    wait: false,
                },
            ],
        ),
        Case {
            // Written in small chunks: the Query's type byte goes ahead while PostgreSQL may
            // still be in the COPY; the COPY had failed on its row, so PostgreSQL reads the
            // Query, and keyshift completes the begun message with an empty Query of its own
            // before sending the client's (seed 9501, case 216).
            split: Some(11_951_250_694_203_093_056),
            ..Case::new(
                "a Query split after a failing COPY row",
                vec![
                    query(copy_in).then_wait(),
                    copy_data("abc\tbad int\n"),
                    query("SELECT 1"),
                ],
            )
        },
        Case {
            // The same with a Parse: completed by a Parse of keyshift's own, closed at once
            // (seed 9505, case 325).
            split: Some(11_813_650_054_467_656_419),
            ..Case::new(
                "a Parse split after a failing COPY row",
                vec![
                    query("COPY mcp_connectors (name) FROM STDIN").then_wait(),
                    copy_data("1\tcopied5\n"),
                    parse("", INS, &[]),
                ],
            )
        },
        Case::new(
            // A Bind of the unnamed statement malformed after its names went as it came, to
            // the server's unnamed statement rather than keyshift's standing for it: the
            // error counted the wrong statement's parameters (seeds 9600 and 9603, cases 591 and 523).
            "a Bind with a bogus parameter count while keyshift's statement stands for the unnamed one",
            vec![
                parse("", UPD, &[]),
                bind("", "", &[Some("4"), Some("4")]),
                sync().then_wait(),
                parse("", UPD, &[]),
                bind("", "", &[Some("1"), Some("1")]),
                sync().then_wait(),
                parse("", UPD, &[]),
                bind("", "", &[None, Some("3")]),
                Msg {
                    tag: b'B',
                    body: b"\0\0\0\0\0\x03\0\0\0\x011\0\0".to_vec(),
                    len: Some(17),
                    wait: false,
                },
            ],
        ),
        Case::new(
            // The fourth unnamed Parse, rewritten but not keyshift's statement (an error is
            // due before it), is skipped by PostgreSQL: the client's unnamed statement is still
            // the one keyshift's statement stood for, which the Bind after Sync must meet
            // (seed 9700, case 146).
            "a rewritten unnamed Parse skipped after an error, then Bind",
            vec![
                parse("", UPD, &[]),
                bind("", "", &[Some("4"), Some("5")]),
                sync().then_wait(),
                parse("", UPD, &[]),
                bind("", "", &[Some("4"), Some("5")]),
                sync(),
                parse("", UPD, &[]),
                bind("", "", &[Some("abc"), Some("999")]),
                parse("", UPD, &[]),
                sync(),
                bind("", "", &[Some("1"), Some("x")]),
            ],
        ),
        Case::new(
            // A Bind whose length covers the next message's first bytes, while keyshift is to
            // restore the client's unnamed statement: PostgreSQL ends the session in silence;
            // a restoring Parse sent first changed that (seed 9802, case 490).
            "a Bind longer than its body while keyshift is to restore the unnamed statement",
            {
                let mut v = unnamed_insert("k");
                v.extend(unnamed_insert("k"));
                v.extend([
                    describe(b'S', "keyshift_s1"),
                    sync(),
                    query(copy_in).then_wait(),
                    copy_data("1\tno newline"),
                    copy_data("2\tcopied6\n"),
                    copy_fail("client gave up"),
                    parse("keyshift_q1", "SELEC 1", &[]),
                    bind("", "keyshift_q1", &[]),
                    execute("", 1),
                    close(b'P', ""),
                    sync(),
                    function_call(1, 0, &[]),
                    Msg {
                        tag: b'B',
                        body: b"\0\0\0\0\0\0\0\x02\0\0".to_vec(),
                        len: Some(16),
                        wait: false,
                    },
                    query("INSERT INTO mcp_servers (connector_id, name) VALUES (5, 'w5')")
                        .then_wait(),
                ]);
                v
            },
        ),
        Case::new(
            // A DISCARD ALL pipelined behind a Bind that fails had keyshift forget its
            // statement before the error came back naming it (seed 9302, case 272).
            "a Bind error naming keyshift's statement, DISCARD ALL pipelined behind",
            after_aliasing(vec![
                parse("", INS, &[]),
                bind("", "", &[Some("5")]),
                query("DISCARD ALL"),
            ]),
        ),
        Case::new(
            // Two unnamed Parses skipped after an error while keyshift's statement stood for
            // the unnamed one: the first carried what to restore, the second, sent while the
            // first was unanswered, did not, and the Bind after Sync met the server's unnamed
            // statement ("requires 0") (seed 9801, case 230).
            "two unnamed Parses skipped after an error, then Bind",
            after_aliasing(vec![
                parse("", INS, &[]),
                bind("", "", &[Some("abc"), Some("n")]),
                parse("", INS, &[]),
                parse("", INS, &[]),
                describe(b'P', ""),
                sync(),
                bind("", "", &[Some("x"), Some("n")]),
            ]),
        ),
        Case::new(
            // A simple Query drops the unnamed statement only if it runs: skipped after an
            // error, the statement keyshift's stood for is still the client's.
            "a Query skipped after an error, then Bind",
            after_aliasing(vec![
                parse("", INS, &[]),
                bind("", "", &[Some("abc"), Some("n")]),
                query("SELECT 1"),
                sync(),
                bind("", "", &[Some("x"), Some("n")]),
            ]),
        ),
        Case::new(
            "a Close of the unnamed statement skipped after an error, then Bind",
            after_aliasing(vec![
                parse("", INS, &[]),
                bind("", "", &[Some("abc"), Some("n")]),
                close(b'S', ""),
                sync(),
                bind("", "", &[Some("x"), Some("n")]),
            ]),
        ),
        Case::new(
            // keyshift's Parse restoring the client's unnamed statement (after a DEALLOCATE
            // ALL dropped keyshift's) is refused in a failed transaction, where the client's
            // Bind would have been: after ROLLBACK the statement is still the client's.
            "the restoring Parse refused in a failed transaction, then Bind after ROLLBACK",
            after_aliasing(vec![
                parse("b", "BEGIN", &[]),
                bind("", "b", &[]),
                execute("", 0),
                sync().then_wait(),
                parse("s3", "DEALLOCATE ALL", &[]),
                bind("", "s3", &[]),
                execute("", 0),
                sync().then_wait(),
                parse("e", "SELEC 1", &[]),
                sync().then_wait(),
                bind("", "", &[Some("1"), Some("n")]),
                execute("", 0),
                sync().then_wait(),
                parse("r", "ROLLBACK", &[]),
                bind("", "r", &[]),
                execute("", 0),
                sync().then_wait(),
                bind("", "", &[Some("x"), Some("n")]),
                execute("", 0),
                sync(),
            ]),
        ),
        Case::new(
            // A Parse pipelined behind a COPY while keyshift's restoring Parse was unanswered:
            // its Bind waited for PostgreSQL's answer to that Parse, which PostgreSQL sends
            // only at the Sync behind the Bind (a hang while this was being fixed).
            "a Parse pipelined behind a COPY while the unnamed statement is being restored",
            after_aliasing(vec![
                parse("s3", "DEALLOCATE ALL", &[]),
                bind("", "s3", &[]),
                execute("", 0),
                bind("", "", &[Some("1"), Some("x")]),
                execute("", 0),
                sync(),
                query("COPY mcp_connectors (name) FROM STDIN"),
                copy_data("1\tcopied5\n"),
                copy_fail("client gave up"),
                parse("", "SELECT $1::int + 1", &[]),
                bind("", "", &[Some("4")]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
        ),
        Case {
            split: Some(18_407_848_537_589_978_637),
            ..Case::new(
                // A Sync after a failed COPY's last row was taken as read inside the COPY: the
                // queue skipped the Bind after it and waited for a ReadyForQuery that never came,
                // the session `active` in the gate (seed 10305, case 268).
                "extended COPY, a Sync inside, a failing row, a Sync, then a Bind",
                vec![
                    parse("", copy_in, &[]),
                    bind("", "", &[]),
                    execute("", 0),
                    sync(),
                    copy_data("abc\tbad int\n"),
                    sync(),
                    bind("", "s1", &[]),
                    parse("", "SELECT 2", &[]),
                    function_call(177, 2, &["x", "2"]),
                    Msg {
                        tag: b'Q',
                        body: b"SELECT 1".to_vec(),
                        len: Some(12),
                        wait: false,
                    },
                ],
            )
        },
        Case::new(
            // The same with a CopyFail behind the Sync (a row failed, not the CopyFail): the
            // INSERT's error then lost its position mapped back (seed 10303, case 465).
            "simple COPY, a failing row, a Sync, a CopyFail, then a rewritten INSERT",
            vec![
                query("COPY mcp_connectors (name) FROM STDIN"),
                copy_data("4\tcopied8\n"),
                sync(),
                copy_fail("client gave up"),
                parse("x", UPD, &[]),
                sync(),
                query("INSERT INTO mcp_servers VALUES (DEFAULT, 'abc', 'pos', 'on')").then_wait(),
            ],
        ),
        Case::new(
            // The same with a CopyDone behind the Sync, taken as read (the last row could
            // have failed there), then a malformed Describe: the Sync's ReadyForQuery came
            // while the Describe was unanswered and was taken for a later Query's (seed
            // 10702, case 55).
            "simple COPY, a failing row, a Sync, a CopyDone, a bad Describe, then an INSERT",
            vec![
                query("COPY mcp_connectors (name) FROM STDIN"),
                copy_data("2\tcopied6\n"),
                sync(),
                Msg::new(b'c', Vec::new()),
                Msg {
                    tag: b'D',
                    body: b"Q\0".to_vec(),
                    len: Some(6),
                    wait: false,
                },
                query("PREPARE s1 AS SELECT 1"),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES ('abc', 'q2')"),
                sync(),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES ('abc', 'q2')")
                    .then_wait(),
            ],
        ),
        Case {
            // Written in small chunks (the Describe's type byte ends one): the Describe of a
            // named statement keyshift tracks had its type byte sent ahead while the COPY
            // looked alive, and PostgreSQL, whose COPY had failed on its row, read it as any
            // other. keyshift refused it and ended the session; it now reads it whole and
            // lets it go (seed 10704, case 197).
            split: Some(9),
            ..Case::new(
                "a Describe of a tracked statement split after a failing COPY row",
                vec![
                    parse("s1", "SELECT 1", &[]),
                    sync().then_wait(),
                    query("COPY mcp_connectors (name) FROM STDIN").then_wait(),
                    copy_data("1\tcopied5\n"),
                    describe(b'S', "s1"),
                    sync().then_wait(),
                ],
            )
        },
        Case::new(
            // The same with a Describe longer than PostgreSQL reads (10,000 bytes), never
            // whole: PostgreSQL ends the session on its length word, without a word; keyshift
            // refused it as a message it must read (seed 10704, case 197).
            "a failing COPY row, then an over-long Describe while a statement is tracked",
            vec![
                parse("s1", "SELECT 1", &[]),
                sync().then_wait(),
                query("COPY mcp_connectors (name) FROM STDIN").then_wait(),
                copy_data("1\tcopied5\n"),
                Msg {
                    tag: b'D',
                    body: b"P".to_vec(),
                    len: Some(100_005),
                    wait: false,
                },
            ],
        ),
        Case::new(
            // keyshift's statement dropped by DEALLOCATE ALL, then an extended COPY with a
            // Sync inside it, cancelled: PostgreSQL ignored that Sync and skips to the next.
            // The queue took the sequence as ended, the session as idle, and keyshift's own
            // Close and Sync, sent at the next message, ended PostgreSQL's skip: the client's
            // Close ran (seed 10901, case 95).
            "keyshift's statement dropped, then an extended COPY with a Sync inside, cancelled",
            vec![
                sync(),
                copy_done(),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (5, 'q2')").then_wait(),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'q1')").then_wait(),
                query("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'q1')"),
                query("DEALLOCATE ALL"),
                parse("", "COPY mcp_servers (connector_id, name) FROM STDIN", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
                copy_fail("client gave up"),
                Msg::new(
                    b'Q',
                    b"UPDATE mcp_servers SET connector_id = NULL WHERE id = 4\0garbage\0".to_vec(),
                )
                .then_wait(),
                close(b'S', ""),
            ],
        ),
    ]
}

fn run(default_cases: u64) {
    let plan = fuzz::Plan::from_env(default_cases);
    let start = Instant::now();
    let mut f = fuzz::Fuzzer::new();
    let setup = start.elapsed();
    let named = named_cases();
    let mut findings = fuzz::run_all(&mut f, &named, &plan);
    let ran = f.cases_run;
    let took = start.elapsed();
    eprintln!(
        "fuzz: seed {}: {ran} cases ({} named), {took:.1?} (setup {setup:.1?}), {} distinct failure(s)",
        plan.seed,
        named.len(),
        findings.by_sig.len()
    );
    if findings.is_empty() {
        return;
    }
    eprint!("fuzz summary:\n{}", findings.summary());
    let report = findings.render(plan.minimise.then_some(&mut f));
    panic!(
        "{} distinct failure(s) (seed {}):\n{report}",
        findings.by_sig.len(),
        plan.seed
    );
}

#[test]
fn fuzz_session() {
    run(300);
}

/// A long run (`benches/fuzz.sh`): thousands of cases.
#[test]
#[ignore]
fn fuzz_session_long() {
    run(3000);
}
