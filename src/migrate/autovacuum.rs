//! Autovacuum in the way of a brief lock.
//!
//! An autovacuum worker holds SHARE UPDATE EXCLUSIVE on the table it vacuums, for as long as
//! the vacuum lasts: seconds on the benchmark's tables under load, minutes to hours on a big
//! table. PostgreSQL cancels it for a waiting lock request (unless it runs to prevent
//! wraparound), but only once the request has waited `deadlock_timeout` (1 s by default):
//! that is when the waiter runs its deadlock check and finds the worker in the way. keyshift's
//! brief steps give up long before (`lock_timeout` 500 ms, a `--by-table` group 50 ms), so
//! the check never ran and a table being vacuumed could not be locked at all: every retry
//! timed out, and the report said "no blocking session found". Seen in
//! `BY_TABLE=1 SCHEMA_OBJECTS=1 benches/cutover.sh`: a group under a pause of its own failed
//! two rounds of 50 ms while every client was drained, with autovacuum visiting those tables
//! every minute; reproduced by hand with a vacuum slowed by `autovacuum_vacuum_cost_delay`:
//! `LOCK` under `lock_timeout = 500ms` fails, under 1.5 s it is granted after 1 s.
//!
//! So keyshift does what PostgreSQL would do, sooner: before a retry (and before each round
//! of a pause, outside it), it cancels the autovacuum workers that hold a lock on a table the
//! step names (or on a partition or TOAST table of one, or on keyshift's shadows of
//! materialized views, which the swap moves), with `pg_cancel_backend`, as PostgreSQL's
//! deadlock check does. Autovacuum comes back to the table at its next round.
//! A vacuum to prevent wraparound is left alone, as PostgreSQL leaves it, and named.
//! Cancelling needs superuser (a worker runs as the bootstrap superuser) or, from
//! PostgreSQL 18, `pg_signal_autovacuum_worker`: without it, the warning says so and what to
//! do.

use tokio_postgres::Client;
use tracing::warn;

use crate::ident::qualified;

/// The autovacuum workers of this database that hold a lock on a relation, with every name
/// keyshift's SQL could call it by: the relation, the tables a TOAST table belongs to, and
/// the partitioned tables above a partition.
const WORKERS: &str = "
SELECT a.pid, a.query LIKE '%(to prevent wraparound)%' AS wraparound, n.nspname::text, c.relname::text
  FROM pg_stat_activity a
  JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted
  JOIN LATERAL (SELECT coalesce((SELECT t.oid FROM pg_class t WHERE t.reltoastrelid = l.relation), l.relation) AS rel) r ON true
  JOIN LATERAL (SELECT r.rel AS relid UNION SELECT relid FROM pg_partition_ancestors(r.rel)) up ON true
  JOIN pg_class c ON c.oid = up.relid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE a.backend_type = 'autovacuum worker' AND a.datname = current_database()
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// One worker in the way.
struct Worker {
    pid: i32,
    wraparound: bool,
    table: String,
}

/// Cancels the autovacuum workers that hold a lock on a table `sql` names, so that its next
/// try can get its lock; returns how many were cancelled. Never fails: what it cannot do, it
/// says in a warning (the step's own retries and errors go on as before).
pub async fn yield_to(client: &Client, sql: &str) -> usize {
    let rows = match client.query(WORKERS, &[]).await {
        Ok(rows) => rows,
        Err(e) => {
            warn!("could not list autovacuum workers: {e}");
            return 0;
        }
    };
    let mut in_the_way: Vec<Worker> = Vec::new();
    for r in &rows {
        let table = qualified(r.get(2), r.get(3));
        let w = Worker {
            pid: r.get(0),
            wraparound: r.get(1),
            table,
        };
        // keyshift's shadows of materialized views are moved by statements the swap reads
        // from a table, not named in its SQL.
        let ours = w.table.starts_with("keyshift_shadow.");
        if (ours || names(sql, &w.table)) && !in_the_way.iter().any(|x| x.pid == w.pid) {
            in_the_way.push(w);
        }
    }
    let mut cancelled = 0;
    for w in in_the_way {
        if w.wraparound {
            warn!(
                pid = w.pid,
                "autovacuum to prevent wraparound holds {}: PostgreSQL does not cancel it and neither does keyshift; the step waits for it (see pg_stat_progress_vacuum)",
                w.table
            );
            continue;
        }
        match client
            .query_one("SELECT pg_cancel_backend($1)", &[&w.pid])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => {
                cancelled += 1;
                warn!(
                    pid = w.pid,
                    "cancelled the autovacuum of {}, which held a lock this step needs (PostgreSQL would have once the lock had waited deadlock_timeout); it comes back to the table later",
                    w.table
                );
            }
            Ok(_) => {}
            Err(e) => warn!(
                pid = w.pid,
                "autovacuum holds {} and keyshift cannot cancel it ({e}): run `SELECT pg_cancel_backend({})` as a superuser, or grant keyshift's role pg_signal_autovacuum_worker (PostgreSQL 18+)",
                w.table,
                w.pid
            ),
        }
    }
    cancelled
}

/// Whether `sql` names `table` (as keyshift writes it, `ident::qualified`) as a whole name:
/// `public.users` is not named by `public.users_archive`.
fn names(sql: &str, table: &str) -> bool {
    let part = |c: char| c.is_alphanumeric() || c == '_' || c == '$' || c == '"';
    sql.match_indices(table).any(|(i, m)| {
        let before = sql[..i].chars().next_back();
        let after = sql[i + m.len()..].chars().next();
        !before.is_some_and(|c| part(c) || c == '.') && !after.is_some_and(part)
    })
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn a_table_is_named_only_whole() {
        let sql = "LOCK TABLE public.users, public.\"Order\" IN ACCESS EXCLUSIVE MODE";
        assert!(names(sql, "public.users"));
        assert!(names(sql, "public.\"Order\""));
        assert!(!names(sql, "public.user"));
        assert!(!names("LOCK TABLE public.users_archive", "public.users"));
        assert!(!names("LOCK TABLE other.public.users", "public.users"));
        assert!(names(
            "SELECT keyshift.carry_finish('public.users')",
            "public.users"
        ));
        assert!(names("ALTER TABLE public.users\nRENAME", "public.users"));
    }
}
