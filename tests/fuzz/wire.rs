//! Frontend messages as the fuzzer builds them (well-formed or not), their readable form, and
//! backend messages normalised for comparison.

use std::fmt::Write as _;

/// One frontend message: a tag, a body, and the length field actually sent (`None`: the true
/// length, `body.len() + 4`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
    pub len: Option<u32>,
    /// The client waits for answers after this message (a separate write 10 ms later).
    pub wait: bool,
}

impl Msg {
    pub fn new(tag: u8, body: Vec<u8>) -> Msg {
        Msg {
            tag,
            body,
            len: None,
            wait: false,
        }
    }

    /// This message, then a wait for the answers.
    pub fn then_wait(mut self) -> Msg {
        self.wait = true;
        self
    }

    pub fn declared_len(&self) -> u32 {
        self.len.unwrap_or(self.body.len() as u32 + 4)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        out.extend_from_slice(&self.declared_len().to_be_bytes());
        out.extend_from_slice(&self.body);
    }

    /// The readable form: decoded when the message is well-formed, else the raw bytes with
    /// the declared length (`C len=5 raw="S"`).
    pub fn readable(&self) -> String {
        if self.len.is_none()
            && let Some(s) = decode_frontend(self.tag, &self.body)
        {
            return s;
        }
        format!(
            "{} len={} raw=\"{}\"",
            tag_char(self.tag),
            self.declared_len(),
            esc(&self.body)
        )
    }
}

pub fn encode_all(msgs: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

fn tag_char(t: u8) -> String {
    if t.is_ascii_graphic() {
        (t as char).to_string()
    } else {
        format!("\\x{t:02x}")
    }
}

/// Bytes as a string literal body: printable ASCII as is, `\0`, `\t`, `\n`, else `\xNN`.
pub fn esc(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        match c {
            0 => s.push_str("\\0"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s
}

// ---- builders ---------------------------------------------------------------------------

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn query(sql: &str) -> Msg {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    Msg::new(b'Q', b)
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Msg {
    parse_counted(name, sql, types.len() as i16, types)
}

pub fn parse_counted(name: &str, sql: &str, count: i16, types: &[u32]) -> Msg {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&count.to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    Msg::new(b'P', b)
}

/// A Bind with text parameters; `None` is NULL.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>]) -> Msg {
    bind_counted(
        portal,
        stmt,
        (0, &[]),
        (params.len() as i16, params),
        (0, &[]),
    )
}

/// A Bind whose three counts are given apart from the lists they count.
pub fn bind_counted(
    portal: &str,
    stmt: &str,
    fmts: (i16, &[i16]),
    params: (i16, &[Option<&str>]),
    results: (i16, &[i16]),
) -> Msg {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.extend_from_slice(&fmts.0.to_be_bytes());
    for f in fmts.1 {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&params.0.to_be_bytes());
    for p in params.1 {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&results.0.to_be_bytes());
    for f in results.1 {
        b.extend_from_slice(&f.to_be_bytes());
    }
    Msg::new(b'B', b)
}

pub fn describe(kind: u8, name: &str) -> Msg {
    let mut b = vec![kind];
    cstr(&mut b, name);
    Msg::new(b'D', b)
}

pub fn execute(portal: &str, max_rows: i32) -> Msg {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    Msg::new(b'E', b)
}

pub fn close(kind: u8, name: &str) -> Msg {
    let mut b = vec![kind];
    cstr(&mut b, name);
    Msg::new(b'C', b)
}

pub fn sync() -> Msg {
    Msg::new(b'S', vec![])
}

pub fn flush() -> Msg {
    Msg::new(b'H', vec![])
}

pub fn terminate() -> Msg {
    Msg::new(b'X', vec![])
}

/// FunctionCall with text arguments and a text result.
pub fn function_call(oid: u32, nargs: i16, args: &[&str]) -> Msg {
    let mut b = oid.to_be_bytes().to_vec();
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&nargs.to_be_bytes());
    for a in args {
        b.extend_from_slice(&(a.len() as i32).to_be_bytes());
        b.extend_from_slice(a.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    Msg::new(b'F', b)
}

pub fn copy_data(data: &str) -> Msg {
    Msg::new(b'd', data.as_bytes().to_vec())
}

pub fn copy_done() -> Msg {
    Msg::new(b'c', vec![])
}

pub fn copy_fail(why: &str) -> Msg {
    let mut b = Vec::new();
    cstr(&mut b, why);
    Msg::new(b'f', b)
}

// ---- decoding, for the readable form -------------------------------------------------------

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let n = self.0.iter().position(|&b| b == 0)?;
        let s = &self.0[..n];
        self.0 = &self.0[n + 1..];
        Some(s)
    }
    fn i16(&mut self) -> Option<i16> {
        let v = i16::from_be_bytes(self.0.get(..2)?.try_into().ok()?);
        self.0 = &self.0[2..];
        Some(v)
    }
    fn i32(&mut self) -> Option<i32> {
        let v = i32::from_be_bytes(self.0.get(..4)?.try_into().ok()?);
        self.0 = &self.0[4..];
        Some(v)
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.0.get(..n)?;
        self.0 = &self.0[n..];
        Some(v)
    }
    fn u8(&mut self) -> Option<u8> {
        let v = *self.0.first()?;
        self.0 = &self.0[1..];
        Some(v)
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
    fn values(&mut self, n: i16) -> Option<Vec<String>> {
        let mut v = Vec::new();
        for _ in 0..n.max(0) {
            let len = self.i32()?;
            if len < 0 {
                v.push("NULL".into());
            } else {
                v.push(format!("\"{}\"", esc(self.bytes(len as usize)?)));
            }
        }
        Some(v)
    }
    fn i16s(&mut self, n: i16) -> Option<Vec<i16>> {
        (0..n.max(0)).map(|_| self.i16()).collect()
    }
}

fn decode_frontend(tag: u8, body: &[u8]) -> Option<String> {
    let mut r = Rd(body);
    let s = match tag {
        b'Q' => format!("Q \"{}\"", esc(r.cstr()?)),
        b'P' => {
            let name = r.cstr()?;
            let sql = r.cstr()?;
            let n = r.i16()?;
            let types: Vec<i32> = (0..n.max(0)).map(|_| r.i32()).collect::<Option<_>>()?;
            let mut s = format!("P \"{}\" \"{}\"", esc(name), esc(sql));
            if !types.is_empty() {
                let _ = write!(s, " types={types:?}");
            }
            s
        }
        b'B' => {
            let portal = r.cstr()?;
            let stmt = r.cstr()?;
            let nf = r.i16()?;
            let fmts = r.i16s(nf)?;
            let np = r.i16()?;
            let params = r.values(np)?;
            let nr = r.i16()?;
            let res = r.i16s(nr)?;
            let mut s = format!(
                "B portal=\"{}\" stmt=\"{}\" params=[{}]",
                esc(portal),
                esc(stmt),
                params.join(", ")
            );
            if !fmts.is_empty() {
                let _ = write!(s, " formats={fmts:?}");
            }
            if !res.is_empty() {
                let _ = write!(s, " result_formats={res:?}");
            }
            s
        }
        b'D' | b'C' => {
            let kind = r.u8()?;
            if kind != b'S' && kind != b'P' {
                return None;
            }
            format!("{} {} \"{}\"", tag as char, kind as char, esc(r.cstr()?))
        }
        b'E' => {
            let portal = r.cstr()?;
            let max = r.i32()?;
            format!("E portal=\"{}\" max_rows={max}", esc(portal))
        }
        b'S' | b'H' | b'c' | b'X' => (tag as char).to_string(),
        b'F' => {
            let oid = r.i32()?;
            let nf = r.i16()?;
            let fmts = r.i16s(nf)?;
            let na = r.i16()?;
            let args = r.values(na)?;
            let res = r.i16()?;
            let mut s = format!("F oid={oid} args=[{}]", args.join(", "));
            if !fmts.is_empty() {
                let _ = write!(s, " formats={fmts:?}");
            }
            if res != 0 {
                let _ = write!(s, " result_format={res}");
            }
            s
        }
        b'd' => return Some(format!("d \"{}\"", esc(body))),
        b'f' => format!("f \"{}\"", esc(r.cstr()?)),
        _ => return None,
    };
    r.end()?;
    Some(s)
}

// ---- backend messages --------------------------------------------------------------------

/// One backend message in a normalised, readable form. What legitimately differs between two
/// databases (a table's OID in RowDescription, the pid in a notification) is blanked out.
pub fn normalise_backend(tag: u8, body: &[u8]) -> String {
    backend(tag, body).unwrap_or_else(|| format!("{} raw=\"{}\"", tag_char(tag), esc(body)))
}

fn backend(tag: u8, body: &[u8]) -> Option<String> {
    let mut r = Rd(body);
    let s = match tag {
        b'E' | b'N' => {
            let mut sev = String::new();
            let mut code = String::new();
            let mut rest = String::new();
            loop {
                let f = r.u8()?;
                if f == 0 {
                    break;
                }
                let v = r.cstr()?;
                match f {
                    // Severity (localised and not), and where in PostgreSQL's source: the
                    // same server, and not part of the answer.
                    b'V' | b'F' | b'L' | b'R' => {}
                    b'S' => sev = String::from_utf8_lossy(v).into_owned(),
                    b'C' => code = String::from_utf8_lossy(v).into_owned(),
                    // What a row of the migrated database legitimately holds beyond the
                    // twin's: uuids, and twin columns the rewriter filled.
                    b'D' if v.starts_with(b"Failing row contains") => {
                        let d = blank_uuids(&String::from_utf8_lossy(v)).replace("null", "<uuid>");
                        let _ = write!(rest, " D=\"{}\"", esc(d.as_bytes()));
                    }
                    _ => {
                        let v = blank_uuids(&String::from_utf8_lossy(v));
                        let _ = write!(rest, " {}=\"{}\"", f as char, esc(v.as_bytes()));
                    }
                }
            }
            format!("{} {sev} {code}{rest}", tag as char)
        }
        b'T' => {
            let n = r.i16()?;
            let mut cols = Vec::new();
            for _ in 0..n {
                let name = r.cstr()?;
                let _table = r.i32()?;
                let att = r.i16()?;
                let typ = r.i32()?;
                let _typlen = r.i16()?;
                let typmod = r.i32()?;
                let fmt = r.i16()?;
                cols.push(format!(
                    "{}:{typ}{}{}{}",
                    esc(name),
                    if att != 0 {
                        format!("@{att}")
                    } else {
                        String::new()
                    },
                    if typmod != -1 {
                        format!("({typmod})")
                    } else {
                        String::new()
                    },
                    if fmt != 0 { "/bin" } else { "" }
                ));
            }
            format!("T [{}]", cols.join(", "))
        }
        b'D' => {
            let n = r.i16()?;
            format!("D [{}]", r.values(n)?.join(", "))
        }
        b'C' => format!("C \"{}\"", esc(r.cstr()?)),
        b'Z' => format!("Z {}", r.u8()? as char),
        b'1' => "ParseComplete".into(),
        b'2' => "BindComplete".into(),
        b'3' => "CloseComplete".into(),
        b'n' => "NoData".into(),
        b's' => "PortalSuspended".into(),
        b'I' => "EmptyQuery".into(),
        b'c' => "CopyDone".into(),
        b'd' => format!("d \"{}\"", esc(r.bytes(body.len())?)),
        b't' => {
            let n = r.i16()?;
            let oids: Vec<i32> = (0..n).map(|_| r.i32()).collect::<Option<_>>()?;
            format!("ParameterDescription {oids:?}")
        }
        b'S' => {
            let k = r.cstr()?;
            let v = r.cstr()?;
            format!("ParameterStatus {}={}", esc(k), esc(v))
        }
        b'A' => {
            let _pid = r.i32()?;
            let ch = r.cstr()?;
            let payload = r.cstr()?;
            format!("Notification {} \"{}\"", esc(ch), esc(payload))
        }
        b'G' | b'H' | b'W' => {
            let fmt = r.u8()?;
            let n = r.i16()?;
            let f = r.i16s(n)?;
            let name = match tag {
                b'G' => "CopyInResponse",
                b'H' => "CopyOutResponse",
                _ => "CopyBothResponse",
            };
            format!("{name} {fmt} {f:?}")
        }
        b'V' => {
            let v = r.values(1)?;
            format!("FunctionCallResponse {}", v[0])
        }
        b'K' => "BackendKeyData".into(),
        _ => return None,
    };
    r.end()?;
    Some(s)
}

/// Every UUID in `s` replaced by `<uuid>` (generated keys differ between the two databases).
pub fn blank_uuids(s: &str) -> String {
    let b = s.as_bytes();
    let is_uuid = |w: &[u8]| {
        w.len() == 36
            && w.iter().enumerate().all(|(i, &c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == b'-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    };
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if i + 36 <= b.len() && is_uuid(&b[i..i + 36]) {
            out.push_str("<uuid>");
            i += 36;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The fields of a normalised ErrorResponse or NoticeResponse (`X="..."`), by code.
pub fn fields(m: &str) -> std::collections::BTreeMap<char, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut rest = m;
    while let Some(i) = rest.find("=\"") {
        let code = rest[..i].chars().last().unwrap_or('?');
        let after = &rest[i + 2..];
        let mut end = after.len();
        let mut esc = false;
        for (j, c) in after.char_indices() {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                end = j;
                break;
            }
        }
        out.insert(code, after[..end].to_string());
        rest = &after[(end + 1).min(after.len())..];
    }
    out
}

/// A short form of a normalised backend message, for grouping failures: the tag and, for
/// errors, severity and SQLSTATE; for CommandComplete, its first word.
pub fn short(m: &str) -> String {
    let mut w = m.split_whitespace();
    match w.next() {
        Some(t @ ("E" | "N")) => {
            format!("{t} {} {}", w.next().unwrap_or(""), w.next().unwrap_or(""))
        }
        Some("C") => format!(
            "C {}",
            w.next()
                .unwrap_or("")
                .trim_start_matches('"')
                .trim_end_matches('"')
        ),
        Some("Z") => m.to_string(),
        Some(t) if t.starts_with('<') => m.split(':').next().unwrap_or(m).to_string(),
        Some(t) => t.to_string(),
        None => String::new(),
    }
}
