// pgjdbc with prepareThreshold=1 (server-prepared from the first execution) and binary transfer
// (on by default), for tests/drivers.rs; run as a single-file source program:
//   java -cp /usr/share/java/postgresql.jar Pgjdbc.java --port P --db D --tag T [--shape uuid]
// Every PreparedStatement is made at the first step and kept, so the steps after cutover and
// rollback execute statements pgjdbc prepared, and whose result types it cached, before them.
// `copy <label>` copies rows into the child tables with pgjdbc's CopyManager, in text, csv and
// binary (a PGCOPY stream built by hand). Line protocol: tests/drivers/harness.py.
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.StringReader;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Properties;
import java.util.UUID;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Pgjdbc {
    static Map<String, String> a = new HashMap<>();
    static boolean integer;
    static Connection conn;
    static Map<String, PreparedStatement> stmts = new HashMap<>();

    static class Mismatch extends RuntimeException {
        Mismatch(String m) { super(m); }
    }

    static void expect(String what, Object got, Object want) {
        if (!Objects.equals(got, want)) {
            String ty = got == null ? "null" : got.getClass().getSimpleName();
            throw new Mismatch(what + ": got " + got + " (" + ty + "), want " + want);
        }
    }

    static PreparedStatement ps(String sql) throws SQLException {
        PreparedStatement s = stmts.get(sql);
        if (s == null) {
            s = conn.prepareStatement(sql);
            stmts.put(sql, s);
        }
        return s;
    }

    static PreparedStatement psKeys(String sql) throws SQLException {
        String k = "keys:" + sql;
        PreparedStatement s = stmts.get(k);
        if (s == null) {
            s = conn.prepareStatement(sql, new String[] {"id"});
            stmts.put(k, s);
        }
        return s;
    }

    static ResultSet one(PreparedStatement s, Object... params) throws SQLException {
        for (int i = 0; i < params.length; i++) s.setObject(i + 1, params[i]);
        ResultSet r = s.executeQuery();
        if (!r.next()) throw new Mismatch("no row from " + s);
        return r;
    }

    /** The key as the driver decodes it: getInt and getLong must agree for an integer. */
    static Object key(ResultSet r, String col) throws SQLException {
        if (!integer) {
            Object o = r.getObject(col);
            if (!(o instanceof UUID)) throw new Mismatch(col + ": got " + o + " (" + (o == null ? "null" : o.getClass().getSimpleName()) + "), want a UUID");
            return o;
        }
        int i = r.getInt(col);
        long l = r.getLong(col);
        expect(col + " read with getLong vs getInt", l, (long) i);
        Object o = r.getObject(col);
        expect(col + " read with getObject", o, i);
        return i;
    }

    static String row(String table, String name, Object id, Object parent) {
        return "{\"table\":" + js(table) + ",\"name\":" + js(name) + ",\"id\":" + js(String.valueOf(id))
            + ",\"parent\":" + (parent == null ? "null" : js(String.valueOf(parent))) + "}";
    }

    static String js(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    static List<String> stepInteger(String label) throws SQLException {
        String n = a.get("tag") + "-" + label;
        Object uid = key(one(ps("INSERT INTO users (name) VALUES (?) RETURNING id"), n), "id");
        ResultSet r = one(ps("SELECT id, name FROM users WHERE id = ?"), uid);
        expect("users.id read back", key(r, "id"), uid);
        expect("users.name read back", r.getString("name"), n);
        // A batch with generated keys, as JPA implementations insert.
        PreparedStatement b = psKeys("INSERT INTO posts (user_id, title) VALUES (?, ?)");
        for (int i = 1; i <= 3; i++) {
            b.setObject(1, uid);
            b.setString(2, n + "-p" + i);
            b.addBatch();
        }
        int[] counts = b.executeBatch();
        expect("batch update counts", counts.length, 3);
        List<Object> pids = new ArrayList<>();
        ResultSet keys = b.getGeneratedKeys();
        while (keys.next()) pids.add(key(keys, "id"));
        expect("generated keys of the batch", pids.size(), 3);
        checkPosts(ps("SELECT id, user_id, title FROM posts WHERE user_id = ? ORDER BY id"), uid, pids, n);
        ResultSet c = one(ps("INSERT INTO comments (post_id, author_id, body) VALUES (?, ?, ?) RETURNING id, post_id, author_id"), pids.get(0), uid, n + "-c1");
        Object cid = key(c, "id");
        expect("comment post_id", key(c, "post_id"), pids.get(0));
        expect("comment author_id", key(c, "author_id"), uid);
        expect("the seed user 1", one(ps("SELECT id, name FROM users WHERE id = ?"), 1).getString("name"), "u1");
        cascade(n, null);
        List<String> rows = new ArrayList<>();
        rows.add(row("users", n, uid, null));
        for (int i = 0; i < 3; i++) rows.add(row("posts", n + "-p" + (i + 1), pids.get(i), uid));
        rows.add(row("comments", n + "-c1", cid, pids.get(0)));
        return rows;
    }

    static List<String> stepUuid(String label) throws SQLException {
        String n = a.get("tag") + "-" + label;
        UUID uid = UUID.randomUUID();
        expect("users.id from RETURNING", key(one(ps("INSERT INTO users (id, name) VALUES (?, ?) RETURNING id"), uid, n), "id"), uid);
        Object dflt = key(one(ps("INSERT INTO users (name) VALUES (?) RETURNING id"), n + "-d"), "id");
        ResultSet r = one(ps("SELECT id, id_legacy, name FROM users WHERE id = ?"), uid);
        expect("users.name read back", r.getString("name"), n);
        expect("users.id_legacy type", r.getObject("id_legacy") instanceof Integer, true);
        PreparedStatement b = ps("INSERT INTO posts (id, user_id, title) VALUES (?, ?, ?)");
        List<UUID> pids = new ArrayList<>();
        for (int i = 1; i <= 3; i++) {
            UUID pid = UUID.randomUUID();
            pids.add(pid);
            b.setObject(1, pid);
            b.setObject(2, uid);
            b.setString(3, n + "-p" + i);
            b.addBatch();
        }
        expect("batch update counts", b.executeBatch().length, 3);
        checkPosts(ps("SELECT id, user_id, title FROM posts WHERE user_id = ? ORDER BY title"), uid, pids, n);
        UUID cid = UUID.randomUUID();
        ResultSet c = one(ps("INSERT INTO comments (id, post_id, author_id, body) VALUES (?, ?, ?, ?) RETURNING id, post_id, author_id"), cid, pids.get(0), uid, n + "-c1");
        expect("comment id", key(c, "id"), cid);
        expect("comment post_id", key(c, "post_id"), pids.get(0));
        expect("the seed user with id_legacy 1", one(ps("SELECT name FROM users WHERE id_legacy = ?"), 1).getString("name"), "u1");
        cascade(n, UUID.randomUUID());
        List<String> rows = new ArrayList<>();
        rows.add(row("users", n, uid, null));
        rows.add(row("users", n + "-d", dflt, null));
        for (int i = 0; i < 3; i++) rows.add(row("posts", n + "-p" + (i + 1), pids.get(i), uid));
        rows.add(row("comments", n + "-c1", cid, pids.get(0)));
        return rows;
    }

    /** The user's three posts, read back: ids, FK and titles as written. */
    static void checkPosts(PreparedStatement sel, Object uid, List<?> pids, String n) throws SQLException {
        sel.setObject(1, uid);
        ResultSet posts = sel.executeQuery();
        int k = 0;
        while (posts.next()) {
            expect("post " + k + " id", key(posts, "id"), pids.get(k));
            expect("post " + k + " user_id", key(posts, "user_id"), uid);
            expect("post " + k + " title", posts.getString("title"), n + "-p" + (k + 1));
            k++;
        }
        expect("posts of the user", k, 3);
    }

    /** A throwaway user with a post, deleted in a transaction: the FK's ON DELETE CASCADE. */
    static void cascade(String n, UUID gone) throws SQLException {
        conn.setAutoCommit(false);
        try {
            Object g;
            if (gone == null) {
                g = key(one(ps("INSERT INTO users (name) VALUES (?) RETURNING id"), n + "-gone"), "id");
                one(ps("INSERT INTO posts (user_id, title) VALUES (?, ?) RETURNING id"), g, n + "-gone-p");
            } else {
                g = key(one(ps("INSERT INTO users (id, name) VALUES (?, ?) RETURNING id"), gone, n + "-gone"), "id");
                one(ps("INSERT INTO posts (id, user_id, title) VALUES (?, ?, ?) RETURNING id"), UUID.randomUUID(), g, n + "-gone-p");
            }
            PreparedStatement d = ps("DELETE FROM users WHERE id = ?");
            d.setObject(1, g);
            expect("rows deleted", d.executeUpdate(), 1);
            expect("posts left after the cascade", one(ps("SELECT count(*) FROM posts WHERE user_id = ?"), g).getLong(1), 0L);
            conn.commit();
        } catch (SQLException | RuntimeException e) {
            conn.rollback();
            throw e;
        } finally {
            conn.setAutoCommit(true);
        }
    }

    /** Parents by name, as this session's shape shows their keys (Integer or UUID). */
    static Map<String, Object> keysByName(String sql) throws SQLException {
        Map<String, Object> out = new HashMap<>();
        try (Statement s = conn.createStatement(); ResultSet r = s.executeQuery(sql)) {
            while (r.next()) out.put(r.getString(2), key(r, "id"));
        }
        return out;
    }

    /** COPY's text (and csv) form of a key: an Integer's digits, a UUID's canonical form. */
    static String txt(Object key) {
        return key.toString();
    }

    /** One binary COPY stream: `PGCOPY\n\377\r\n\0`, flags, header extension, rows, trailer. */
    static byte[] pgcopy(List<Object[]> rows) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        DataOutputStream out = new DataOutputStream(buf);
        out.write(new byte[] {'P', 'G', 'C', 'O', 'P', 'Y', '\n', (byte) 0xff, '\r', '\n', 0});
        out.writeInt(0);
        out.writeInt(0);
        for (Object[] row : rows) {
            out.writeShort(row.length);
            for (Object v : row) {
                if (v == null) {
                    out.writeInt(-1);
                } else if (v instanceof Integer) {
                    out.writeInt(4);
                    out.writeInt((Integer) v);
                } else if (v instanceof UUID) {
                    out.writeInt(16);
                    out.writeLong(((UUID) v).getMostSignificantBits());
                    out.writeLong(((UUID) v).getLeastSignificantBits());
                } else {
                    byte[] b = ((String) v).getBytes(StandardCharsets.UTF_8);
                    out.writeInt(b.length);
                    out.write(b);
                }
            }
        }
        out.writeShort(-1);
        out.flush();
        return buf.toByteArray();
    }

    static void copied(String what, long got, int want) {
        expect("rows copied by " + what, got, (long) want);
    }

    /** A copied row and the names of its parents (author: comments only, null when NULL). */
    static String copyRow(String table, String name, String parent, String author) {
        return "{\"table\":" + js(table) + ",\"name\":" + js(name) + ",\"parent\":" + js(parent)
            + ",\"author\":" + (author == null ? "null" : js(author)) + "}";
    }

    /**
     * COPY … FROM STDIN into posts (user_id NOT NULL) and comments (post_id NOT NULL, author_id
     * nullable) in text, csv and binary, keys in this session's shape: the parents are looked up
     * by name first. Answers each copied row with the names of the parents it was given.
     */
    static List<String> copy(String label) throws SQLException, IOException {
        String n = a.get("tag") + "-" + label;
        CopyManager cm = conn.unwrap(PGConnection.class).getCopyAPI();
        Map<String, Object> users = keysByName("SELECT id, name FROM users WHERE name IN ('u1', 'u2', 'u3')");
        Map<String, Object> posts = keysByName("SELECT id, title FROM posts WHERE title IN ('p1', 'p2', 'p3')");
        expect("parents found", users.size() + posts.size(), 6);
        List<String> rows = new ArrayList<>();
        copied("text", cm.copyIn("COPY posts (user_id, title) FROM STDIN",
            new StringReader(txt(users.get("u1")) + "\t" + n + "-post-text\n")), 1);
        rows.add(copyRow("posts", n + "-post-text", "u1", null));
        copied("csv", cm.copyIn("COPY posts (title, user_id) FROM STDIN (FORMAT csv)",
            new StringReader("\"" + n + "-post-csv, quoted\"," + txt(users.get("u2")) + "\n")), 1);
        rows.add(copyRow("posts", n + "-post-csv, quoted", "u2", null));
        List<Object[]> bin = new ArrayList<>();
        bin.add(new Object[] {users.get("u3"), n + "-post-bin"});
        copied("binary", cm.copyIn("COPY posts (user_id, title) FROM STDIN (FORMAT binary)",
            new ByteArrayInputStream(pgcopy(bin))), 1);
        rows.add(copyRow("posts", n + "-post-bin", "u3", null));

        // Comments: two FKs, one of them NULL in every format's spelling.
        copied("text", cm.copyIn("COPY comments (post_id, author_id, body) FROM STDIN",
            new StringReader(txt(posts.get("p1")) + "\t" + txt(users.get("u1")) + "\t" + n + "-comment-text\n"
                + txt(posts.get("p2")) + "\t\\N\t" + n + "-comment-text-null\n")), 2);
        rows.add(copyRow("comments", n + "-comment-text", "p1", "u1"));
        rows.add(copyRow("comments", n + "-comment-text-null", "p2", null));
        copied("csv", cm.copyIn("COPY comments (body, post_id, author_id) FROM STDIN (FORMAT csv)",
            new StringReader(n + "-comment-csv," + txt(posts.get("p2")) + "," + txt(users.get("u2")) + "\n"
                + n + "-comment-csv-null," + txt(posts.get("p3")) + ",\n")), 2);
        rows.add(copyRow("comments", n + "-comment-csv", "p2", "u2"));
        rows.add(copyRow("comments", n + "-comment-csv-null", "p3", null));
        bin.clear();
        bin.add(new Object[] {posts.get("p3"), users.get("u3"), n + "-comment-bin"});
        bin.add(new Object[] {posts.get("p1"), null, n + "-comment-bin-null"});
        copied("binary", cm.copyIn("COPY comments (post_id, author_id, body) FROM STDIN (FORMAT binary)",
            new ByteArrayInputStream(pgcopy(bin))), 2);
        rows.add(copyRow("comments", n + "-comment-bin", "p3", "u3"));
        rows.add(copyRow("comments", n + "-comment-bin-null", "p1", null));
        return rows;
    }

    /** Rows the other shape wrote, read in this session's shape. */
    static void check(String[] p) throws SQLException {
        String table = p[1], name = p[2];
        Integer legacy = Integer.valueOf(p[3]);
        UUID u = UUID.fromString(p[4]);
        Integer parentInt = p[5].equals("-") ? null : Integer.valueOf(p[5]);
        UUID parentUuid = p[6].equals("-") ? null : UUID.fromString(p[6]);
        if (integer) {
            if (table.equals("users")) {
                ResultSet r = one(ps("SELECT id, id_uuid, name FROM users WHERE id = ?"), legacy);
                expect("users " + legacy, List.of(r.getObject("id"), r.getObject("id_uuid"), r.getString("name")), List.of(legacy, u, name));
            } else {
                ResultSet r = one(ps("SELECT id, id_uuid, title, user_id, user_id_uuid FROM posts WHERE id = ?"), legacy);
                expect("posts " + legacy, List.of(r.getObject("id_uuid"), r.getString("title"), r.getObject("user_id"), r.getObject("user_id_uuid")), List.of(u, name, parentInt, parentUuid));
            }
        } else if (table.equals("users")) {
            ResultSet r = one(ps("SELECT id, id_legacy, name FROM users WHERE id = ?"), u);
            expect("users " + u, List.of(r.getObject("id"), r.getObject("id_legacy"), r.getString("name")), List.of(u, legacy, name));
        } else {
            ResultSet r = one(ps("SELECT id, id_legacy, title, user_id, user_id_legacy FROM posts WHERE id = ?"), u);
            expect("posts " + u, List.of(r.getObject("id_legacy"), r.getString("title"), r.getObject("user_id"), r.getObject("user_id_legacy")), List.of(legacy, name, parentUuid, parentInt));
        }
    }

    static String failure(Throwable e) {
        e.printStackTrace();
        String state = e instanceof SQLException ? ((SQLException) e).getSQLState() : null;
        String msg = String.valueOf(e.getMessage()).split("\n")[0];
        return "{\"ok\":false,\"error\":" + js(e.getClass().getSimpleName() + ": " + msg) + ",\"sqlstate\":" + (state == null ? "null" : js(state)) + "}";
    }

    public static void main(String[] args) throws Exception {
        a.put("host", "127.0.0.1");
        a.put("user", "postgres");
        a.put("shape", "integer");
        a.put("shape-param", "none");
        for (int i = 0; i + 1 < args.length; i += 2) a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
        integer = a.get("shape").equals("integer");
        Properties props = new Properties();
        props.setProperty("user", a.get("user"));
        props.setProperty("prepareThreshold", "1");
        if (!a.get("shape-param").equals("none")) props.setProperty("options", "-c keyshift.shape=" + a.get("shape-param"));
        try {
            conn = DriverManager.getConnection("jdbc:postgresql://" + a.get("host") + ":" + a.get("port") + "/" + a.get("db"), props);
        } catch (SQLException e) {
            System.out.println(failure(e));
            return;
        }
        System.out.println("{\"ok\":true,\"ready\":true}");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            String[] p = line.trim().split("\\s+");
            if (p[0].isEmpty()) continue;
            if (p[0].equals("quit")) break;
            try {
                if (p[0].equals("step")) {
                    List<String> rows = integer ? stepInteger(p[1]) : stepUuid(p[1]);
                    System.out.println("{\"ok\":true,\"rows\":[" + String.join(",", rows) + "]}");
                } else if (p[0].equals("copy")) {
                    System.out.println("{\"ok\":true,\"rows\":[" + String.join(",", copy(p[1])) + "]}");
                } else if (p[0].equals("check")) {
                    check(p);
                    System.out.println("{\"ok\":true}");
                } else {
                    System.out.println("{\"ok\":false,\"error\":" + js("unknown command " + p[0]) + "}");
                }
            } catch (Throwable e) {
                System.out.println(failure(e));
            }
            System.out.flush();
        }
        conn.close();
    }
}
