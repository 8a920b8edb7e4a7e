"""asyncpg with its statement cache on (binary format throughout), for tests/drivers.rs.

Statements run through conn.fetch*/execute* are prepared once and cached by SQL text; `ins_post`
is an explicit prepared statement kept for the whole session. Both are made at the first step
and reused at every later one, so the steps after cutover and rollback run statements the
driver prepared (and whose result types it cached) before them.
"""

import asyncio
import uuid

import asyncpg

from harness import args, expect, expect_type, row, serve, fail_startup, Mismatch

A = args()
INTEGER = A.shape == "integer"


async def main():
    settings = {} if A.shape_param == "none" else {"keyshift.shape": A.shape_param}
    try:
        conn = await asyncpg.connect(
            host=A.host, port=A.port, user=A.user, database=A.db, server_settings=settings
        )
    except Exception as e:
        fail_startup(e)
    prepared = {}

    async def ins_post(*a):
        if "post" not in prepared:
            prepared["post"] = await conn.prepare(
                "INSERT INTO posts (user_id, title) VALUES ($1, $2) RETURNING id, user_id"
                if INTEGER
                else "INSERT INTO posts (id, user_id, title) VALUES ($1, $2, $3) RETURNING id, user_id"
            )
        return await prepared["post"].fetchrow(*a)

    async def step_integer(label):
        n = f"{A.tag}-{label}"
        uid = await conn.fetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", n)
        expect_type("users.id from INSERT ... RETURNING id", uid, int)
        r = await conn.fetchrow("SELECT id, name FROM users WHERE id = $1", uid)
        if r is None:
            raise Mismatch(f"SELECT by id {uid} found no row")
        expect("users.id read back", r["id"], uid)
        expect("users.name read back", r["name"], n)
        p1 = await ins_post(uid, f"{n}-p1")
        expect("posts.user_id from RETURNING", p1["user_id"], uid)
        await conn.executemany(
            "INSERT INTO posts (user_id, title) VALUES ($1, $2)", [(uid, f"{n}-p2"), (uid, f"{n}-p3")]
        )
        posts = await conn.fetch("SELECT id, user_id, title FROM posts WHERE user_id = $1 ORDER BY id", uid)
        expect("titles of the user's posts", [p["title"] for p in posts], [f"{n}-p{i}" for i in (1, 2, 3)])
        expect("the posts' user_id", {p["user_id"] for p in posts}, {uid})
        expect("the first post's id", posts[0]["id"], p1["id"])
        c = await conn.fetchrow(
            "INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3) RETURNING id, post_id, author_id",
            p1["id"], uid, f"{n}-c1",
        )
        expect("comments.post_id from RETURNING", c["post_id"], p1["id"])
        expect("comments.author_id from RETURNING", c["author_id"], uid)
        seed = await conn.fetchrow("SELECT id, name FROM users WHERE id = $1", 1)
        expect("the seed user 1", (seed["id"], seed["name"]), (1, "u1"))
        # Cascade: a throwaway user with a post, deleted in a transaction.
        async with conn.transaction():
            gone = await conn.fetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", f"{n}-gone")
            await ins_post(gone, f"{n}-gone-p")
            expect("DELETE of the throwaway user", await conn.execute("DELETE FROM users WHERE id = $1", gone), "DELETE 1")
            left = await conn.fetchval("SELECT count(*) FROM posts WHERE user_id = $1", gone)
            expect("posts left after the cascade", left, 0)
        return [row("users", n, uid)] + [row("posts", p["title"], p["id"], uid) for p in posts] + [
            row("comments", f"{n}-c1", c["id"], p1["id"])
        ]

    async def step_uuid(label):
        n = f"{A.tag}-{label}"
        uid = uuid.uuid4()
        got = await conn.fetchval("INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id", uid, n)
        expect_type("users.id from INSERT ... RETURNING id", got, uuid.UUID)
        expect("users.id from RETURNING", str(got), str(uid))
        dflt = await conn.fetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", f"{n}-d")
        expect_type("users.id given by the default", dflt, uuid.UUID)
        r = await conn.fetchrow("SELECT id, id_legacy, name FROM users WHERE id = $1", uid)
        if r is None:
            raise Mismatch(f"SELECT by id {uid} found no row")
        expect("users.name read back", r["name"], n)
        expect_type("users.id_legacy", r["id_legacy"], int)
        p1 = await ins_post(uuid.uuid4(), uid, f"{n}-p1")
        expect("posts.user_id from RETURNING", str(p1["user_id"]), str(uid))
        await conn.executemany(
            "INSERT INTO posts (id, user_id, title) VALUES ($1, $2, $3)",
            [(uuid.uuid4(), uid, f"{n}-p2"), (uuid.uuid4(), uid, f"{n}-p3")],
        )
        posts = await conn.fetch("SELECT id, user_id, title FROM posts WHERE user_id = $1 ORDER BY title", uid)
        expect("titles of the user's posts", [p["title"] for p in posts], [f"{n}-p{i}" for i in (1, 2, 3)])
        expect("the posts' user_id", {str(p["user_id"]) for p in posts}, {str(uid)})
        cid = uuid.uuid4()
        c = await conn.fetchrow(
            "INSERT INTO comments (id, post_id, author_id, body) VALUES ($1, $2, $3, $4) RETURNING id, post_id, author_id",
            cid, p1["id"], uid, f"{n}-c1",
        )
        expect("comments.id from RETURNING", str(c["id"]), str(cid))
        expect("comments.post_id from RETURNING", str(c["post_id"]), str(p1["id"]))
        seed = await conn.fetchrow("SELECT id, name FROM users WHERE id_legacy = $1", 1)
        expect("the seed user with id_legacy 1", seed and seed["name"], "u1")
        async with conn.transaction():
            gone = uuid.uuid4()
            await conn.execute("INSERT INTO users (id, name) VALUES ($1, $2)", gone, f"{n}-gone")
            await ins_post(uuid.uuid4(), gone, f"{n}-gone-p")
            expect("DELETE of the throwaway user", await conn.execute("DELETE FROM users WHERE id = $1", gone), "DELETE 1")
            left = await conn.fetchval("SELECT count(*) FROM posts WHERE user_id = $1", gone)
            expect("posts left after the cascade", left, 0)
        return (
            [row("users", n, uid), row("users", f"{n}-d", dflt)]
            + [row("posts", p["title"], p["id"], uid) for p in posts]
            + [row("comments", f"{n}-c1", cid, p1["id"])]
        )

    async def check(w):
        # Rows the other shape wrote, read in this session's shape.
        if INTEGER:
            if w["table"] == "users":
                r = await conn.fetchrow("SELECT id, id_uuid, name FROM users WHERE id = $1", w["int"])
                got = r and (r["name"], str(r["id_uuid"]))
                expect(f"users {w['int']}", got, (w["name"], w["uuid"]))
            else:
                r = await conn.fetchrow(
                    "SELECT id, id_uuid, title, user_id, user_id_uuid FROM posts WHERE id = $1", w["int"]
                )
                got = r and (r["title"], str(r["id_uuid"]), r["user_id"], str(r["user_id_uuid"]))
                expect(f"posts {w['int']}", got, (w["name"], w["uuid"], w["parent_int"], w["parent_uuid"]))
        else:
            u = uuid.UUID(w["uuid"])
            if w["table"] == "users":
                r = await conn.fetchrow("SELECT id, id_legacy, name FROM users WHERE id = $1", u)
                got = r and (r["name"], r["id_legacy"])
                expect(f"users {u}", got, (w["name"], w["int"]))
            else:
                r = await conn.fetchrow(
                    "SELECT id, id_legacy, title, user_id, user_id_legacy FROM posts WHERE id = $1", u
                )
                got = r and (r["title"], r["id_legacy"], str(r["user_id"]), r["user_id_legacy"])
                expect(f"posts {u}", got, (w["name"], w["int"], w["parent_uuid"], w["parent_int"]))

    return conn, (step_integer if INTEGER else step_uuid), check


# One event loop for the whole run, driven a command at a time by the blocking line loop: the
# connection and its statement cache live on it between commands.
loop = asyncio.new_event_loop()
conn, step, check = loop.run_until_complete(main())
serve(lambda label: loop.run_until_complete(step(label)), lambda w: loop.run_until_complete(check(w)))
loop.run_until_complete(conn.close())
