"""psycopg 3 with server-side prepared statements (`prepare=True`), text and binary cursors,
executemany with RETURNING, for tests/drivers.rs. Integer shape only: the application this
models was written for integer keys.

Every statement is prepared at the first step and reused at every later one, so the steps after
cutover and rollback run statements psycopg prepared before them.
"""

import psycopg

from harness import args, expect, expect_type, row, serve, fail_startup, Mismatch

A = args()
if A.shape != "integer":
    raise SystemExit("psycopg_client.py models an integer-keyed application only")

try:
    conn = psycopg.connect(
        host=A.host,
        port=A.port,
        user=A.user,
        dbname=A.db,
        autocommit=True,
        **({} if A.shape_param == "none" else {"options": f"-c keyshift.shape={A.shape_param}"}),
    )
except Exception as e:
    fail_startup(e)

text = conn.cursor()
binary = conn.cursor(binary=True)


def one(cur, sql, params):
    return cur.execute(sql, params, prepare=True).fetchone()


def step(label):
    n = f"{A.tag}-{label}"
    (uid,) = one(text, "INSERT INTO users (name) VALUES (%s) RETURNING id", (n,))
    expect_type("users.id from INSERT ... RETURNING id", uid, int)
    for cur in (text, binary):
        r = one(cur, "SELECT id, name FROM users WHERE id = %s", (uid,))
        if r is None:
            raise Mismatch(f"SELECT by id {uid} found no row ({'binary' if cur is binary else 'text'})")
        expect("users row read back", tuple(r), (uid, n))
    # executemany with RETURNING runs in a pipeline, one result set a row.
    text.executemany(
        "INSERT INTO posts (user_id, title) VALUES (%s, %s) RETURNING id, user_id",
        [(uid, f"{n}-p{i}") for i in (1, 2, 3)],
        returning=True,
    )
    pids = []
    while True:
        pid, puid = text.fetchone()
        expect("posts.user_id from RETURNING", puid, uid)
        pids.append(pid)
        if not text.nextset():
            break
    got = binary.execute(
        "SELECT id, user_id, title FROM posts WHERE user_id = %s ORDER BY id", (uid,), prepare=True
    ).fetchall()
    expect("the user's posts", [tuple(r) for r in got], [(p, uid, f"{n}-p{i}") for p, i in zip(pids, (1, 2, 3))])
    cid, cpost, cauthor = one(
        binary,
        "INSERT INTO comments (post_id, author_id, body) VALUES (%s, %s, %s) RETURNING id, post_id, author_id",
        (pids[0], uid, f"{n}-c1"),
    )
    expect("comment's post_id and author_id", (cpost, cauthor), (pids[0], uid))
    expect("the seed user 1", tuple(one(binary, "SELECT id, name FROM users WHERE id = %s", (1,))), (1, "u1"))
    with conn.transaction():
        (gone,) = one(text, "INSERT INTO users (name) VALUES (%s) RETURNING id", (f"{n}-gone",))
        one(text, "INSERT INTO posts (user_id, title) VALUES (%s, %s) RETURNING id", (gone, f"{n}-gone-p"))
        text.execute("DELETE FROM users WHERE id = %s", (gone,), prepare=True)
        expect("rows deleted", text.rowcount, 1)
        (left,) = one(text, "SELECT count(*) FROM posts WHERE user_id = %s", (gone,))
        expect("posts left after the cascade", left, 0)
    return (
        [row("users", n, uid)]
        + [row("posts", f"{n}-p{i}", p, uid) for p, i in zip(pids, (1, 2, 3))]
        + [row("comments", f"{n}-c1", cid, pids[0])]
    )


def check(w):
    raise Mismatch("psycopg_client.py does not take part in the two-shape tests")


serve(step, check)
