// node-postgres with named prepared statements ({name, text, values}), for tests/drivers.rs.
// node-postgres parses each statement once per connection under its name and from then on only
// binds it: the statements named at the first step are the ones every later step runs, after
// cutover and rollback too. `copy <label>` copies rows into the child tables with
// pg-copy-streams' from(), in text, csv and binary (a PGCOPY stream built by hand); it is
// required only then. Line protocol: tests/drivers/harness.py.
'use strict';
const { Client } = require('pg');
const readline = require('readline');
const crypto = require('crypto');
const { Readable } = require('stream');
const { pipeline } = require('stream/promises');

const A = { host: '127.0.0.1', user: 'postgres', shape: 'integer', 'shape-param': 'none' };
for (let i = 2; i < process.argv.length; i += 2) A[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const INTEGER = A.shape === 'integer';

class Mismatch extends Error {}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
function expect(what, got, want) {
  if (!same(got, want)) throw new Mismatch(`${what}: got ${JSON.stringify(got)} (${typeof got}), want ${JSON.stringify(want)}`);
}
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
function expectKey(what, v) {
  const ok = INTEGER ? Number.isInteger(v) : typeof v === 'string' && UUID_RE.test(v);
  if (!ok) throw new Mismatch(`${what}: got ${JSON.stringify(v)} (${typeof v}), want ${INTEGER ? 'an integer' : 'a uuid'}`);
}
const row = (table, name, id, parent) => ({ table, name, id: String(id), parent: parent == null ? null : String(parent) });
const reply = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const client = new Client({
  host: A.host,
  port: Number(A.port),
  user: A.user,
  database: A.db,
  ...(A['shape-param'] === 'none' ? {} : { options: `-c keyshift.shape=${A['shape-param']}` }),
});
const q = (name, text, values) => client.query({ name, text, values });

async function inTransaction(body) {
  await client.query('BEGIN');
  try {
    await body();
    await client.query('COMMIT');
  } catch (e) {
    await client.query('ROLLBACK').catch(() => {});
    throw e;
  }
}

// The throwaway user's delete reaches its posts through the FK's ON DELETE CASCADE.
async function deleteCascades(gone) {
  expect('rows deleted', (await q('del_user', 'DELETE FROM users WHERE id = $1', [gone])).rowCount, 1);
  expect('posts left after the cascade', (await q('count_posts', 'SELECT count(*)::int AS n FROM posts WHERE user_id = $1', [gone])).rows[0].n, 0);
}

async function stepInteger(label) {
  const n = `${A.tag}-${label}`;
  const uid = (await q('ins_user', 'INSERT INTO users (name) VALUES ($1) RETURNING id', [n])).rows[0].id;
  expectKey('users.id from INSERT ... RETURNING id', uid);
  const r = (await q('sel_user', 'SELECT id, name FROM users WHERE id = $1', [uid])).rows;
  expect('users row read back', r, [{ id: uid, name: n }]);
  const pids = [];
  for (const i of [1, 2, 3]) {
    const p = (await q('ins_post', 'INSERT INTO posts (user_id, title) VALUES ($1, $2) RETURNING id, user_id', [uid, `${n}-p${i}`])).rows[0];
    expect('posts.user_id from RETURNING', p.user_id, uid);
    pids.push(p.id);
  }
  const posts = (await q('sel_posts', 'SELECT id, user_id, title FROM posts WHERE user_id = $1 ORDER BY id', [uid])).rows;
  expect('the user\'s posts', posts, pids.map((id, k) => ({ id, user_id: uid, title: `${n}-p${k + 1}` })));
  const c = (await q('ins_comment', 'INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3) RETURNING id, post_id, author_id', [pids[0], uid, `${n}-c1`])).rows[0];
  expect('comment\'s post_id and author_id', [c.post_id, c.author_id], [pids[0], uid]);
  expect('the seed user 1', (await q('sel_user', 'SELECT id, name FROM users WHERE id = $1', [1])).rows, [{ id: 1, name: 'u1' }]);
  await inTransaction(async () => {
    const gone = (await q('ins_user', 'INSERT INTO users (name) VALUES ($1) RETURNING id', [`${n}-gone`])).rows[0].id;
    await q('ins_post', 'INSERT INTO posts (user_id, title) VALUES ($1, $2) RETURNING id, user_id', [gone, `${n}-gone-p`]);
    await deleteCascades(gone);
  });
  return [row('users', n, uid), ...pids.map((p, k) => row('posts', `${n}-p${k + 1}`, p, uid)), row('comments', `${n}-c1`, c.id, pids[0])];
}

async function stepUuid(label) {
  const n = `${A.tag}-${label}`;
  const uid = crypto.randomUUID();
  const got = (await q('ins_user', 'INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id', [uid, n])).rows[0].id;
  expect('users.id from RETURNING', got, uid);
  const dflt = (await q('ins_user_default', 'INSERT INTO users (name) VALUES ($1) RETURNING id', [`${n}-d`])).rows[0].id;
  expectKey('users.id given by the default', dflt);
  const r = (await q('sel_user', 'SELECT id, id_legacy, name FROM users WHERE id = $1', [uid])).rows;
  if (r.length !== 1 || !Number.isInteger(r[0].id_legacy)) throw new Mismatch(`users row read back: ${JSON.stringify(r)}`);
  expect('users row read back', [r[0].id, r[0].name], [uid, n]);
  const pids = [];
  for (const i of [1, 2, 3]) {
    const pid = crypto.randomUUID();
    const p = (await q('ins_post', 'INSERT INTO posts (id, user_id, title) VALUES ($1, $2, $3) RETURNING id, user_id', [pid, uid, `${n}-p${i}`])).rows[0];
    expect('posts id and user_id from RETURNING', [p.id, p.user_id], [pid, uid]);
    pids.push(pid);
  }
  const posts = (await q('sel_posts', 'SELECT id, user_id, title FROM posts WHERE user_id = $1 ORDER BY title', [uid])).rows;
  expect('the user\'s posts', posts, pids.map((id, k) => ({ id, user_id: uid, title: `${n}-p${k + 1}` })));
  const cid = crypto.randomUUID();
  const c = (await q('ins_comment', 'INSERT INTO comments (id, post_id, author_id, body) VALUES ($1, $2, $3, $4) RETURNING id, post_id, author_id', [cid, pids[0], uid, `${n}-c1`])).rows[0];
  expect('comment from RETURNING', [c.id, c.post_id, c.author_id], [cid, pids[0], uid]);
  expect('the seed user with id_legacy 1', (await q('sel_legacy', 'SELECT name FROM users WHERE id_legacy = $1', [1])).rows, [{ name: 'u1' }]);
  await inTransaction(async () => {
    const gone = crypto.randomUUID();
    await q('ins_user', 'INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id', [gone, `${n}-gone`]);
    await q('ins_post', 'INSERT INTO posts (id, user_id, title) VALUES ($1, $2, $3) RETURNING id, user_id', [crypto.randomUUID(), gone, `${n}-gone-p`]);
    await deleteCascades(gone);
  });
  return [row('users', n, uid), row('users', `${n}-d`, dflt), ...pids.map((p, k) => row('posts', `${n}-p${k + 1}`, p, uid)), row('comments', `${n}-c1`, cid, pids[0])];
}

// Parents by name, as this session's shape shows their keys (numbers or uuid strings).
async function keysByName(sql) {
  const out = {};
  for (const r of (await client.query(sql)).rows) {
    expectKey(`id of ${r.name}`, r.id);
    out[r.name] = r.id;
  }
  return out;
}

// One binary COPY stream: `PGCOPY\n\377\r\n\0`, flags, header extension, rows, trailer. A
// number is an int4, a uuid-looking string a uuid, any other string text, null NULL.
function pgcopy(rows) {
  const parts = [Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1'), Buffer.alloc(8)];
  const int = (n, bytes) => {
    const b = Buffer.alloc(bytes);
    if (bytes === 2) b.writeInt16BE(n); else b.writeInt32BE(n);
    return b;
  };
  for (const row of rows) {
    parts.push(int(row.length, 2));
    for (const v of row) {
      let bytes = null;
      if (typeof v === 'number') bytes = int(v, 4);
      else if (typeof v === 'string' && UUID_RE.test(v)) bytes = Buffer.from(v.replace(/-/g, ''), 'hex');
      else if (typeof v === 'string') bytes = Buffer.from(v, 'utf8');
      parts.push(int(bytes === null ? -1 : bytes.length, 4));
      if (bytes !== null) parts.push(bytes);
    }
  }
  parts.push(int(-1, 2));
  return Buffer.concat(parts);
}

// COPY ... FROM STDIN through pg-copy-streams' from(), the whole body in one chunk.
async function copyIn(what, sql, body, want) {
  const { from } = require('pg-copy-streams');
  const stream = client.query(from(sql));
  await pipeline(Readable.from([typeof body === 'string' ? Buffer.from(body, 'utf8') : body]), stream);
  expect(`rows copied by ${what}`, stream.rowCount, want);
}

const copyRow = (table, name, parent, author = null) => ({ table, name, parent, author });

// COPY into posts (user_id NOT NULL) and comments (post_id NOT NULL, author_id nullable) in
// text, csv and binary, keys in this session's shape: the parents are looked up by name first.
// Answers each copied row with the names of the parents it was given.
async function copy(label) {
  const n = `${A.tag}-${label}`;
  const u = await keysByName("SELECT id, name FROM users WHERE name IN ('u1', 'u2', 'u3')");
  const p = await keysByName("SELECT id, title AS name FROM posts WHERE title IN ('p1', 'p2', 'p3')");
  expect('parents found', Object.keys(u).length + Object.keys(p).length, 6);
  await copyIn('text', 'COPY posts (user_id, title) FROM STDIN', `${u.u1}\t${n}-post-text\n`, 1);
  await copyIn('csv', 'COPY posts (title, user_id) FROM STDIN (FORMAT csv)', `"${n}-post-csv, quoted",${u.u2}\n`, 1);
  await copyIn('binary', 'COPY posts (user_id, title) FROM STDIN (FORMAT binary)', pgcopy([[u.u3, `${n}-post-bin`]]), 1);
  // Comments: two FKs, one of them NULL in every format's spelling.
  await copyIn('text', 'COPY comments (post_id, author_id, body) FROM STDIN',
    `${p.p1}\t${u.u1}\t${n}-comment-text\n${p.p2}\t\\N\t${n}-comment-text-null\n`, 2);
  await copyIn('csv', 'COPY comments (body, post_id, author_id) FROM STDIN (FORMAT csv)',
    `${n}-comment-csv,${p.p2},${u.u2}\n${n}-comment-csv-null,${p.p3},\n`, 2);
  await copyIn('binary', 'COPY comments (post_id, author_id, body) FROM STDIN (FORMAT binary)',
    pgcopy([[p.p3, u.u3, `${n}-comment-bin`], [p.p1, null, `${n}-comment-bin-null`]]), 2);
  return [
    copyRow('posts', `${n}-post-text`, 'u1'),
    copyRow('posts', `${n}-post-csv, quoted`, 'u2'),
    copyRow('posts', `${n}-post-bin`, 'u3'),
    copyRow('comments', `${n}-comment-text`, 'p1', 'u1'),
    copyRow('comments', `${n}-comment-text-null`, 'p2'),
    copyRow('comments', `${n}-comment-csv`, 'p2', 'u2'),
    copyRow('comments', `${n}-comment-csv-null`, 'p3'),
    copyRow('comments', `${n}-comment-bin`, 'p3', 'u3'),
    copyRow('comments', `${n}-comment-bin-null`, 'p1'),
  ];
}

// Rows the other shape wrote, read in this session's shape.
async function check([table, name, int, uuid, parentInt, parentUuid]) {
  int = Number(int);
  parentInt = parentInt === '-' ? null : Number(parentInt);
  if (INTEGER) {
    if (table === 'users') {
      const r = (await q('chk_user', 'SELECT id, id_uuid, name FROM users WHERE id = $1', [int])).rows;
      expect(`users ${int}`, r, [{ id: int, id_uuid: uuid, name }]);
    } else {
      const r = (await q('chk_post', 'SELECT id, id_uuid, title, user_id, user_id_uuid FROM posts WHERE id = $1', [int])).rows;
      expect(`posts ${int}`, r, [{ id: int, id_uuid: uuid, title: name, user_id: parentInt, user_id_uuid: parentUuid }]);
    }
  } else if (table === 'users') {
    const r = (await q('chk_user', 'SELECT id, id_legacy, name FROM users WHERE id = $1', [uuid])).rows;
    expect(`users ${uuid}`, r, [{ id: uuid, id_legacy: int, name }]);
  } else {
    const r = (await q('chk_post', 'SELECT id, id_legacy, title, user_id, user_id_legacy FROM posts WHERE id = $1', [uuid])).rows;
    expect(`posts ${uuid}`, r, [{ id: uuid, id_legacy: int, title: name, user_id: parentUuid, user_id_legacy: parentInt }]);
  }
}

function failure(e) {
  console.error(e && e.stack ? e.stack : e);
  const first = String((e && e.message) || e).split('\n')[0];
  return { ok: false, error: `${(e && e.constructor && e.constructor.name) || 'Error'}: ${first}`, sqlstate: (e && e.code) || null };
}

async function main() {
  try {
    await client.connect();
  } catch (e) {
    reply(failure(e));
    return;
  }
  // An error on an idle connection would otherwise crash the process unreported.
  client.on('error', (e) => console.error('connection error:', e.message));
  reply({ ok: true, ready: true });
  const rl = readline.createInterface({ input: process.stdin });
  // Commands run one at a time, in order: the test waits for each answer anyway.
  for await (const line of rl) {
    const parts = line.trim().split(/\s+/);
    if (!parts[0]) continue;
    if (parts[0] === 'quit') break;
    try {
      if (parts[0] === 'step') reply({ ok: true, rows: await (INTEGER ? stepInteger : stepUuid)(parts[1]) });
      else if (parts[0] === 'copy') reply({ ok: true, rows: await copy(parts[1]) });
      else if (parts[0] === 'check') { await check(parts.slice(1)); reply({ ok: true }); }
      else reply({ ok: false, error: `unknown command ${parts[0]}` });
    } catch (e) {
      reply(failure(e));
    }
  }
  await client.end().catch(() => {});
}

main();
