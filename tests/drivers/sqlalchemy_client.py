"""A SQLAlchemy 2 ORM application (psycopg 3 underneath), for tests/drivers.rs.

`--shape integer` is V1: integer models, keys from the server's sequences. `--shape uuid` is
V2: the same tables with uuid models and client-generated uuid4 keys, as in seed 004's "after"
models. Neither maps the other shape's twin columns; the checks read them with text SQL.

psycopg's prepare_threshold is 1 so that every statement is server-prepared from its first
use: a long-running application reaches psycopg's default threshold (5) long before a cutover.
"""

import uuid
from typing import Optional

from sqlalchemy import ForeignKey, create_engine, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from harness import args, expect, expect_type, row, serve, fail_startup, Mismatch

A = args()
INTEGER = A.shape == "integer"
K = int if INTEGER else uuid.UUID


def key():
    return mapped_column(primary_key=True) if INTEGER else mapped_column(primary_key=True, default=uuid.uuid4)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[K] = key()
    name: Mapped[str]
    posts: Mapped[list["Post"]] = relationship(back_populates="user", cascade="all, delete-orphan", order_by="Post.title")


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[K] = key()
    user_id: Mapped[K] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str]
    user: Mapped[User] = relationship(back_populates="posts")
    comments: Mapped[list["Comment"]] = relationship(back_populates="post", cascade="all, delete-orphan")


class Comment(Base):
    __tablename__ = "comments"
    id: Mapped[K] = key()
    post_id: Mapped[K] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"))
    author_id: Mapped[Optional[K]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    body: Mapped[str]
    post: Mapped[Post] = relationship(back_populates="comments")


# The shape goes in the URL's options, as a SQLAlchemy application configures it.
options = "" if A.shape_param == "none" else f"?options=-c%20keyshift.shape%3D{A.shape_param}"
engine = create_engine(
    f"postgresql+psycopg://{A.user}@{A.host}:{A.port}/{A.db}{options}",
    connect_args={"prepare_threshold": 1},
    # One connection for the whole run, so its prepared statements live across the steps.
    pool_size=1,
    max_overflow=0,
)
try:
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
except Exception as e:
    fail_startup(e)


def step(label):
    n = f"{A.tag}-{label}"
    with Session(engine) as s:
        u = User(name=n, posts=[Post(title=f"{n}-p1", comments=[Comment(body=f"{n}-c1")]), Post(title=f"{n}-p2")])
        s.add(u)
        s.flush()
        u.posts[0].comments[0].author_id = u.id
        s.commit()
        uid = u.id
        expect_type("User.id after flush", uid, K)
        # ORM bulk insert with RETURNING: insertmanyvalues, one statement for the batch.
        batch = [{"user_id": uid, "title": f"{n}-p{i}"} for i in (3, 4)]
        if not INTEGER:
            for b in batch:
                b["id"] = uuid.uuid4()
        ids = s.scalars(insert(Post).returning(Post.id, sort_by_parameter_order=True), batch).all()
        s.commit()
        for i in ids:
            expect_type("Post.id from the bulk insert", i, K)
        if not INTEGER:
            expect("ids returned by the bulk insert", ids, [b["id"] for b in batch])
    with Session(engine) as s:
        u = s.get(User, uid)
        if u is None:
            raise Mismatch(f"session.get(User, {uid!r}) found nothing")
        expect("User.name", u.name, n)
        # Lazy load of the relationship.
        posts = u.posts
        expect("titles of the user's posts", [p.title for p in posts], [f"{n}-p{i}" for i in (1, 2, 3, 4)])
        expect("Post.user_id", {p.user_id for p in posts}, {uid})
        expect("ids of the bulk-inserted posts", [p.id for p in posts[2:]], ids)
    with Session(engine) as s:
        u = s.scalars(
            select(User).where(User.id == uid).options(selectinload(User.posts).selectinload(Post.comments))
        ).one()
        comments = [(c.body, c.author_id) for p in u.posts for c in p.comments]
        expect("comments loaded with selectinload", comments, [(f"{n}-c1", uid)])
        p1 = u.posts[0]
        c1 = p1.comments[0]
        if INTEGER:
            seed = s.get(User, 1)
            expect("the seed user 1", seed and seed.name, "u1")
        else:
            seed = s.execute(text("SELECT name FROM users WHERE id_legacy = :i"), {"i": 1}).scalar_one_or_none()
            expect("the seed user with id_legacy 1", seed, "u1")
        rows = (
            [row("users", n, uid)]
            + [row("posts", p.title, p.id, uid) for p in u.posts]
            + [row("comments", c1.body, c1.id, p1.id)]
        )
    # Cascade: the ORM loads and deletes the children, then the parent.
    with Session(engine) as s:
        g = User(name=f"{n}-gone", posts=[Post(title=f"{n}-gone-p", comments=[Comment(body=f"{n}-gone-c")])])
        s.add(g)
        s.commit()
        gid, gpid, gcid = g.id, g.posts[0].id, g.posts[0].comments[0].id
        s.delete(g)
        s.commit()
        expect("the deleted user", s.get(User, gid), None)
        expect("its post, deleted by the cascade", s.get(Post, gpid), None)
        expect("its comment, deleted by the cascade", s.get(Comment, gcid), None)
    return rows


def check(w):
    # Rows the other shape wrote, through this shape's models, and the twin column by SQL.
    with Session(engine) as s:
        k = w["int"] if INTEGER else uuid.UUID(w["uuid"])
        twin, want_twin = ("id_uuid", w["uuid"]) if INTEGER else ("id_legacy", w["int"])
        if w["table"] == "users":
            u = s.get(User, k)
            expect(f"User {k}", u and u.name, w["name"])
            t = s.execute(text(f"SELECT {twin} FROM users WHERE id = :k"), {"k": k}).scalar_one()
        else:
            p = s.get(Post, k)
            expect(f"Post {k}", p and p.title, w["name"])
            want_parent = w["parent_int"] if INTEGER else uuid.UUID(w["parent_uuid"])
            expect(f"Post {k}.user_id", p.user_id, want_parent)
            expect(f"Post {k}.user.name", p.user.name, w["name"].rsplit("-p", 1)[0])
            t = s.execute(text(f"SELECT {twin} FROM posts WHERE id = :k"), {"k": k}).scalar_one()
        expect(f"{w['table']} {k}.{twin}", str(t) if INTEGER else t, want_twin)


serve(step, check)
