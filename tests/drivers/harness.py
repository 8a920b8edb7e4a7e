"""The line protocol every driver script speaks with tests/drivers.rs.

The script is long-lived so that its connection, and every statement its driver prepared, lives
across the lifecycle steps the Rust test runs in between. One command a line on stdin, one JSON
line on stdout per command:

    step <label>                                        -> {"ok": true, "rows": [...]}
    check <table> <name> <int> <uuid> <parent_int> <parent_uuid>
                                                        -> {"ok": true}
    copy <label>                                        -> {"ok": true, "rows": [...]}
    quit

A row is {"table", "name", "id", "parent"}: the key and FK as the session's shape shows them,
as strings. `copy` (pgjdbc and node-postgres only) copies posts and comments with
`COPY … FROM STDIN` in text, csv and binary, keys in its shape, and answers each copied row as
{"table", "name", "parent", "author"}: the names of the parents it was given (the user's name,
the post's title; author null when the copy wrote NULL), not keys, which COPY does not return. A failure is {"ok": false, "error": "...", "sqlstate": "..."}, and the script goes
on: the test wants every step's outcome, not just the first failure.
"""

import argparse
import json
import sys
import traceback


def args():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--user", default="postgres")
    # integer | uuid: the shape the script's models and SQL are written for.
    p.add_argument("--shape", default="integer")
    # How the shape is named at startup: none (the default shape) or the value to pass.
    p.add_argument("--shape-param", default="none")
    # A prefix that keeps this script's rows apart from another script's in the same database.
    p.add_argument("--tag", required=True)
    return p.parse_args()


class Mismatch(Exception):
    """What the driver answered is not what was written."""


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r} ({type(got).__name__}), want {want!r}")


def expect_type(what, value, ty):
    if not isinstance(value, ty) or isinstance(value, bool):
        raise Mismatch(f"{what}: got {value!r} of type {type(value).__name__}, want {ty.__name__}")


def row(table, name, id_, parent=None):
    return {"table": table, "name": name, "id": str(id_), "parent": None if parent is None else str(parent)}


def parse_check(parts):
    table, name, int_id, uuid_id, parent_int, parent_uuid = parts
    none = lambda v: None if v == "-" else v
    return {
        "table": table,
        "name": name,
        "int": int(int_id),
        "uuid": uuid_id,
        "parent_int": None if parent_int == "-" else int(parent_int),
        "parent_uuid": none(parent_uuid),
    }


def _reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _failure(e):
    sqlstate = getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate", None)
    orig = getattr(e, "orig", None)  # SQLAlchemy wraps the DBAPI error
    if sqlstate is None and orig is not None:
        sqlstate = getattr(orig, "sqlstate", None)
    traceback.print_exc(file=sys.stderr)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"ok": False, "error": f"{type(e).__name__}: {first}", "sqlstate": sqlstate}


def ready():
    """Said once the connection is up, so the test knows startup went through."""
    _reply({"ok": True, "ready": True})


def serve(step, check):
    """Blocking loop for synchronous drivers: step(label) -> rows; check(dict) -> None."""
    ready()
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        try:
            if parts[0] == "step":
                _reply({"ok": True, "rows": step(parts[1])})
            elif parts[0] == "check":
                check(parse_check(parts[1:]))
                _reply({"ok": True})
            else:
                _reply({"ok": False, "error": f"unknown command {parts[0]!r}"})
        except Exception as e:  # every failure is reported, and the session goes on
            _reply(_failure(e))


def fail_startup(e):
    """A connection refused at startup: one failure line, then exit 0 so the test reads it."""
    _reply(_failure(e))
    sys.exit(0)
