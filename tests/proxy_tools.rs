//! The proxy under PostgreSQL's own client tools: psql (with \copy, \lo_import, LATIN1,
//! TLS, every password auth method) and pgbench in all three query modes.
mod common;

use std::io::Write;
use std::process::{Command, Output};

use common::proxy::{TestProxy, test_config};

fn psql(port: u16, conninfo_extra: &str, db: &str, user: &str) -> Command {
    let mut cmd = Command::new(common::pg_tool("psql"));
    cmd.arg("-X")
        .args(["-v", "ON_ERROR_STOP=1", "-At"])
        .arg(format!(
            "host=127.0.0.1 port={port} dbname={db} user={user} {conninfo_extra}"
        ))
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE");
    cmd
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn psql_command_and_script_with_copy_and_large_objects() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let port = p.addr.port();
    let out = ok(psql(port, "", &db.name, "postgres")
        .args(["-c", "SELECT 40 + 2"])
        .output()
        .unwrap());
    assert_eq!(out.trim(), "42");

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    let mut f = std::fs::File::create(&csv).unwrap();
    for i in 0..500 {
        writeln!(f, "{i},name {i}").unwrap();
    }
    drop(f);
    let blob = dir.path().join("blob.bin");
    let blob_data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&blob, &blob_data).unwrap();
    let outcsv = dir.path().join("out.csv");
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE TABLE people (id int primary key, name text);\n\
             \\copy people FROM '{csv}' WITH (FORMAT csv)\n\
             \\copy (SELECT * FROM people ORDER BY id) TO '{outcsv}' WITH (FORMAT csv)\n\
             BEGIN;\n\
             \\lo_import '{blob}'\n\
             SELECT length(lo_get(:LASTOID));\n\
             SELECT md5(lo_get(:LASTOID));\n\
             COMMIT;\n\
             SELECT count(*) FROM people;\n",
            csv = csv.display(),
            outcsv = outcsv.display(),
            blob = blob.display()
        ),
    )
    .unwrap();
    let out = ok(psql(port, "", &db.name, "postgres")
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("lo_import ")), "{out}");
    assert!(lines.contains(&"200000"), "{out}");
    let md5 = format!("{:x}", md5_of(&blob_data));
    assert!(lines.contains(&md5.as_str()), "{out} (want {md5})");
    assert_eq!(lines.last(), Some(&"500"));
    assert_eq!(
        std::fs::read_to_string(&outcsv).unwrap(),
        std::fs::read_to_string(&csv).unwrap()
    );
}

/// Minimal MD5 so the test does not need another crate: RFC 1321.
fn md5_of(data: &[u8]) -> u128 {
    let s: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32)
        .collect();
    let (mut a0, mut b0, mut c0, mut d0) =
        (0x67452301u32, 0xefcdab89u32, 0x98badcfeu32, 0x10325476u32);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_le_bytes());
    for chunk in msg.chunks(64) {
        let m: Vec<u32> = chunk
            .chunks(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(s[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a0.to_le_bytes());
    out[4..8].copy_from_slice(&b0.to_le_bytes());
    out[8..12].copy_from_slice(&c0.to_le_bytes());
    out[12..].copy_from_slice(&d0.to_le_bytes());
    u128::from_be_bytes(out)
}

#[tokio::test]
async fn latin1_client_bytes_arrive_unchanged() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("latin1.sql");
    // 'café' and 'naïve' in LATIN1: bytes that are not valid UTF-8.
    let mut sql = b"CREATE TABLE l (s text);\nINSERT INTO l VALUES ('caf".to_vec();
    sql.push(0xe9);
    sql.extend_from_slice(b"'), ('na");
    sql.push(0xef);
    sql.extend_from_slice(b"ve');\nSELECT s FROM l ORDER BY s;\n");
    std::fs::write(&script, &sql).unwrap();
    let out = psql(p.addr.port(), "", &db.name, "postgres")
        .arg("-q")
        .env("PGCLIENTENCODING", "LATIN1")
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read back in LATIN1 through the proxy: the same bytes.
    assert_eq!(out.stdout, b"caf\xe9\nna\xefve\n");
    // Stored correctly in the UTF-8 database.
    let c = db.client().await;
    let rows: Vec<String> = c
        .query("SELECT s FROM l ORDER BY s", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec!["café", "naïve"]);
}

#[tokio::test]
async fn password_methods_are_relayed() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let port = p.addr.port();
    for (user, password) in [common::SCRAM_USER, common::MD5_USER, common::PASSWORD_USER] {
        let out = psql(port, "", &db.name, user)
            .env("PGPASSWORD", password)
            .args(["-c", "SELECT current_user"])
            .output()
            .unwrap();
        assert_eq!(ok(out).trim(), user);
        // A wrong password gets PostgreSQL's own message.
        let out = psql(port, "", &db.name, user)
            .env("PGPASSWORD", "wrong")
            .args(["-c", "SELECT 1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{user}: {err}"
        );
    }
    // tokio-postgres speaks SCRAM too.
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{port}/{}",
        common::SCRAM_USER.0,
        common::SCRAM_USER.1,
        db.name
    );
    let c = common::connect(&url).await;
    let u: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(u, common::SCRAM_USER.0);
}

#[tokio::test]
async fn client_tls_is_terminated_with_rustls() {
    let db = common::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // A CA and a server certificate for "localhost", made for this test.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyshift test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();

    let mut cfg = test_config();
    cfg.tls_cert = Some(cert_pem);
    cfg.tls_key = Some(key_pem);
    let p = TestProxy::start_with(cfg);
    let port = p.addr.port();
    // verify-full checks the host name, so connect by name (the later host= wins).
    let mut cmd = psql(
        port,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            ca_pem.display()
        ),
        &db.name,
        common::SCRAM_USER.0,
    );
    let out = cmd
        .env("PGPASSWORD", common::SCRAM_USER.1)
        .arg("-c")
        .arg("\\conninfo")
        .output()
        .unwrap();
    let text = ok(out);
    assert!(text.contains("SSL connection"), "{text}");
    // Without TLS configured the proxy answers N and sslmode=require fails cleanly.
    let p2 = TestProxy::start();
    let out = psql(p2.addr.port(), "sslmode=require", &db.name, "postgres")
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server does not support SSL"));
    // sslmode=prefer falls back to plain text.
    let out = psql(p2.addr.port(), "sslmode=prefer", &db.name, "postgres")
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    assert_eq!(ok(out).trim(), "1");
}

#[tokio::test]
async fn pgbench_in_every_query_mode_without_failures() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let port = p.addr.port();
    common::pgbench(port, &db.name, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = common::pgbench(
            port,
            &db.name,
            &["-T", "5", "-c", "4", "-j", "2", "-M", mode],
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .unwrap_or_else(|| panic!("{out}"));
        let n: u64 = processed.split('/').next().unwrap().trim().parse().unwrap();
        assert!(n > 0, "{mode}: {out}");
        let failed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(failed.starts_with("0 "), "{mode}: {out}");
    }
}
