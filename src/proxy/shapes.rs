//! A connection's shape, decided once at startup (DESIGN "Shapes", src/shape.rs).
//!
//! In order: the startup parameter `keyshift.shape`, given directly (asyncpg
//! `server_settings`, pgjdbc's connection properties) or inside `options` as
//! `-c keyshift.shape=uuid` (libpq, psycopg, SQLAlchemy URLs); else the first matching
//! `[[shape_rules]]` entry; else the migration's default shape, kept in the database so that
//! every proxy agrees. keyshift takes the parameter out of the startup packet: PostgreSQL
//! would accept it as a placeholder setting, but a pooler behind keyshift may refuse unknown
//! parameters, and a later `SET keyshift.shape` must not look as if it changed anything.

use bytes::{BufMut, BytesMut};

use crate::migrate::state::Phase;
use crate::shape::{PARAMETER, Shape, ShapeRule, UnknownShape};

/// What the proxy knows of the migration, for decisions at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveMigration {
    pub phase: Phase,
    pub default_shape: Shape,
}

/// Why a connection is refused at startup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// SQLSTATE 22023, as PostgreSQL answers an invalid value for a parameter.
    #[error("{0}")]
    Unknown(#[from] UnknownShape),
    /// SQLSTATE 55000 (object not in prerequisite state).
    #[error("keyshift cannot serve the {shape} shape yet or any more: {why}")]
    Unavailable { shape: Shape, why: String },
}

/// The shape named in the startup parameters, if any: `keyshift.shape` itself wins over a
/// `-c keyshift.shape=…` inside `options`, as PostgreSQL lets a direct parameter win.
pub fn requested(params: &[(String, String)]) -> Result<Option<Shape>, UnknownShape> {
    if let Some((_, v)) = params.iter().find(|(k, _)| k == PARAMETER) {
        return Shape::parse(v).map(Some);
    }
    let Some((_, options)) = params.iter().find(|(k, _)| k == "options") else {
        return Ok(None);
    };
    let mut found = None;
    for (name, value) in option_settings(options) {
        if name == PARAMETER {
            found = Some(value);
        }
    }
    found.map(|v| Shape::parse(&v)).transpose()
}

/// The `-c name=value` / `--name=value` settings of an `options` string, split at unescaped
/// whitespace with `\` escaping the next character, as PostgreSQL's `pg_split_opts` does.
fn option_settings(options: &str) -> Vec<(String, String)> {
    let words = split_options(options);
    let mut out = Vec::new();
    let mut it = words.iter().peekable();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().map(String::as_str)
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest)
        } else {
            w.strip_prefix("--")
        };
        if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
            // PostgreSQL reads `-` in a setting's name as `_`.
            out.push((name.replace('-', "_"), value.to_string()));
        }
    }
    out
}

fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else {
            cur.push(c);
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The options string without its `keyshift.shape` settings, re-escaped; `None` when
/// nothing else is left.
fn options_without_shape(options: &str) -> Option<String> {
    let words = split_options(options);
    let mut kept: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let (setting, width) = if w == "-c" {
            (words.get(i + 1).map(String::as_str), 2)
        } else if let Some(rest) = w.strip_prefix("-c") {
            (Some(rest), 1)
        } else {
            (w.strip_prefix("--"), 1)
        };
        let is_shape = setting
            .and_then(|s| s.split_once('='))
            .is_some_and(|(n, _)| n.replace('-', "_") == PARAMETER);
        if !is_shape {
            kept.extend(
                words[i..(i + width).min(words.len())]
                    .iter()
                    .map(String::as_str),
            );
        }
        i += width;
    }
    if kept.is_empty() {
        return None;
    }
    let escaped: Vec<String> = kept
        .iter()
        .map(|w| {
            let mut s = String::with_capacity(w.len());
            for c in w.chars() {
                if c.is_ascii_whitespace() || c == '\\' {
                    s.push('\\');
                }
                s.push(c);
            }
            s
        })
        .collect();
    Some(escaped.join(" "))
}

/// The StartupMessage without `keyshift.shape` (direct or in `options`); `None` when the
/// client did not name it, so the original bytes go upstream unchanged.
pub fn strip(packet: &[u8], params: &[(String, String)]) -> Option<BytesMut> {
    let direct = params.iter().any(|(k, _)| k == PARAMETER);
    let in_options = params
        .iter()
        .any(|(k, v)| k == "options" && option_settings(v).iter().any(|(n, _)| n == PARAMETER));
    if !direct && !in_options {
        return None;
    }
    let version = packet.get(4..8)?;
    let mut body = BytesMut::new();
    body.put_slice(version);
    for (k, v) in params {
        if k == PARAMETER {
            continue;
        }
        let v = if k == "options" {
            match options_without_shape(v) {
                Some(v) => v,
                None => continue,
            }
        } else {
            v.clone()
        };
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(&body);
    Some(out)
}

/// The session's shape. With no migration the parameter is accepted and the session is
/// served as it is (its shape still recorded); with one, a shape the phase cannot serve is
/// refused.
pub fn decide(
    requested: Option<Shape>,
    rules: &[ShapeRule],
    (user, database, application_name): (&str, &str, &str),
    migration: Option<&LiveMigration>,
) -> Result<Shape, Refusal> {
    let shape = requested
        .or_else(|| {
            rules
                .iter()
                .find(|r| r.matches(user, database, application_name))
                .map(|r| r.shape)
        })
        .or(migration.map(|m| m.default_shape))
        .unwrap_or(Shape::Integer);
    if let Some(m) = migration {
        shape
            .available(m.phase)
            .map_err(|why| Refusal::Unavailable { shape, why })?;
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_parameter_comes_direct_or_inside_options() {
        assert_eq!(
            requested(&params(&[("keyshift.shape", "uuid")])),
            Ok(Some(Shape::Uuid))
        );
        for o in [
            "-c keyshift.shape=uuid",
            "-ckeyshift.shape=uuid",
            "--keyshift.shape=uuid",
            "-c statement_timeout=5s -c keyshift.shape=uuid",
        ] {
            assert_eq!(
                requested(&params(&[("options", o)])),
                Ok(Some(Shape::Uuid)),
                "{o}"
            );
        }
        assert_eq!(
            requested(&params(&[("options", "-c search_path=a")])),
            Ok(None)
        );
        assert_eq!(
            requested(&params(&[("keyshift.shape", "bogus")])),
            Err(UnknownShape("bogus".into()))
        );
    }

    #[test]
    fn strip_removes_only_the_shape_and_keeps_escapes() {
        let p = params(&[
            ("user", "u"),
            ("keyshift.shape", "uuid"),
            (
                "options",
                r"-c keyshift.shape=uuid -c application_name=a\ b",
            ),
        ]);
        let mut pkt = vec![0, 0, 0, 0, 0, 3, 0, 0];
        for (k, v) in &p {
            pkt.extend_from_slice(k.as_bytes());
            pkt.push(0);
            pkt.extend_from_slice(v.as_bytes());
            pkt.push(0);
        }
        pkt.push(0);
        let out = strip(&pkt, &p).unwrap();
        let back = crate::proxy::wire::startup::startup_params(&out).unwrap();
        assert_eq!(
            back,
            params(&[("user", "u"), ("options", r"-c application_name=a\ b")])
        );
        assert_eq!(&out[..4], &(out.len() as u32).to_be_bytes());
        assert!(strip(&pkt, &params(&[("user", "u")])).is_none());
    }

    #[test]
    fn decide_takes_parameter_then_rules_then_default_and_checks_the_phase() {
        let m = LiveMigration {
            phase: Phase::Backfilled,
            default_shape: Shape::Integer,
        };
        let rules = [ShapeRule {
            shape: Shape::Uuid,
            user: None,
            database: None,
            application_name: Some("v2*".into()),
        }];
        let who = ("u", "d", "v2-web");
        assert!(matches!(
            decide(None, &rules, who, Some(&m)),
            Err(Refusal::Unavailable {
                shape: Shape::Uuid,
                ..
            })
        ));
        let hardened = LiveMigration {
            phase: Phase::Hardened,
            ..m
        };
        assert_eq!(decide(None, &rules, who, Some(&hardened)), Ok(Shape::Uuid));
        assert_eq!(
            decide(Some(Shape::Integer), &rules, who, Some(&hardened)),
            Ok(Shape::Integer)
        );
        assert_eq!(
            decide(None, &rules, ("u", "d", "v1"), Some(&hardened)),
            Ok(Shape::Integer)
        );
        // No migration: accepted, recorded, not enforced.
        assert_eq!(decide(Some(Shape::Uuid), &[], who, None), Ok(Shape::Uuid));
        let finalized = LiveMigration {
            phase: Phase::Finalized,
            default_shape: Shape::Uuid,
        };
        assert!(decide(Some(Shape::Integer), &[], who, Some(&finalized)).is_err());
    }
}
