//! Shapes: the two ways a client connection can see the migrated tables (DESIGN "Shapes").
//!
//! `integer` is the original shape (`id` integer, its uuid in `id_uuid`, each FK an integer
//! with a `_uuid` twin); `uuid` is the shape after cutover (`id` uuid, the integer in
//! `id_legacy`, each FK a uuid with a `_legacy` twin). The *physical* shape (what the tables
//! look like right now) follows the phase; a session whose shape is not the physical one is
//! *translated*: the proxy points its table references at keyshift's views of its shape
//! (`keyshift_<shape>_<schema>.<table>`), created at expand. A view binds its columns by
//! position, so each view keeps serving its shape through the swap's renames and back.

use std::fmt;

use crate::migrate::state::Phase;

/// A session's shape, for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Integer,
    Uuid,
}

/// The startup parameter (and `-c` option) a client names its shape with.
pub const PARAMETER: &str = "keyshift.shape";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid value for parameter \"keyshift.shape\": \"{0}\" (use integer or uuid)")]
pub struct UnknownShape(pub String);

impl Shape {
    pub const ALL: [Shape; 2] = [Shape::Integer, Shape::Uuid];

    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Integer => "integer",
            Shape::Uuid => "uuid",
        }
    }

    /// PostgreSQL reads parameter values case-sensitively but enum GUCs case-insensitively;
    /// this is an enum, so `UUID` is accepted too.
    pub fn parse(s: &str) -> Result<Shape, UnknownShape> {
        match s.trim().to_ascii_lowercase().as_str() {
            "integer" => Ok(Shape::Integer),
            "uuid" => Ok(Shape::Uuid),
            _ => Err(UnknownShape(s.to_string())),
        }
    }

    /// What the migrated tables look like in `phase`: the uuid columns carry the original
    /// names from the swap's commit (`cut_over`) until a rollback commits. `None` while a
    /// cutover swaps them table by table (`cutting_over`): some are in each shape, and every
    /// session is translated.
    pub fn physical(phase: Phase) -> Option<Shape> {
        match phase {
            Phase::CuttingOver => None,
            Phase::CutOver | Phase::RollingBack | Phase::Finalizing | Phase::Finalized => {
                Some(Shape::Uuid)
            }
            _ => Some(Shape::Integer),
        }
    }

    /// Whether a new session may take this shape in `phase`; `Err` says why not and when it
    /// will work, for the startup refusal.
    pub fn available(self, phase: Phase) -> Result<(), String> {
        match (self, phase) {
            (
                Shape::Uuid,
                Phase::Expanding
                | Phase::Expanded
                | Phase::Backfilling
                | Phase::Backfilled
                | Phase::Hardening
                | Phase::Aborting,
            ) => Err(format!(
                "the uuid shape is served once the uuids are complete and enforced; the \
                 migration is in phase {phase}: it works after `keyshift harden` (phase hardened)"
            )),
            (Shape::Integer, Phase::Finalizing | Phase::Finalized) => Err(format!(
                "the integer shape is gone: the migration is in phase {phase} and the legacy \
                 integer columns are dropped; connect with keyshift.shape=uuid"
            )),
            _ => Ok(()),
        }
    }

    /// The other shape: the physical one whenever a session of this shape is translated.
    pub fn other(self) -> Shape {
        match self {
            Shape::Integer => Shape::Uuid,
            Shape::Uuid => Shape::Integer,
        }
    }

    /// The schema of keyshift's views of `schema`'s migrated tables in this shape.
    pub fn view_schema(self, schema: &str) -> String {
        format!("keyshift_{}_{}", self.as_str(), schema)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration rule giving the sessions it matches a shape (`[[shape_rules]]`): every
/// field given must match; `application_name` may use `*` for any run of characters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeRule {
    pub shape: Shape,
    pub user: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
}

impl ShapeRule {
    pub fn matches(&self, user: &str, database: &str, application_name: &str) -> bool {
        self.user.as_deref().is_none_or(|u| u == user)
            && self.database.as_deref().is_none_or(|d| d == database)
            && self
                .application_name
                .as_deref()
                .is_none_or(|p| glob(p.as_bytes(), application_name.as_bytes()))
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively_and_refuses_the_rest() {
        assert_eq!(Shape::parse("uuid"), Ok(Shape::Uuid));
        assert_eq!(Shape::parse(" Integer "), Ok(Shape::Integer));
        assert_eq!(Shape::parse("int"), Err(UnknownShape("int".into())));
    }

    #[test]
    fn physical_shape_turns_at_the_swap_and_back_at_rollback() {
        assert_eq!(Shape::physical(Phase::CuttingOver), None);
        assert_eq!(Shape::physical(Phase::CutOver), Some(Shape::Uuid));
        assert_eq!(Shape::physical(Phase::RollingBack), Some(Shape::Uuid));
        assert_eq!(Shape::physical(Phase::Hardened), Some(Shape::Integer));
    }

    #[test]
    fn uuid_waits_for_harden_and_integer_ends_at_finalize() {
        assert!(Shape::Uuid.available(Phase::Backfilled).is_err());
        assert!(Shape::Uuid.available(Phase::Hardened).is_ok());
        assert!(Shape::Integer.available(Phase::CutOver).is_ok());
        assert!(Shape::Integer.available(Phase::Finalized).is_err());
        assert_eq!(Shape::Uuid.view_schema("public"), "keyshift_uuid_public");
    }

    #[test]
    fn rules_match_every_field_given() {
        let r = ShapeRule {
            shape: Shape::Uuid,
            user: Some("app".into()),
            database: None,
            application_name: Some("billing-v2*".into()),
        };
        assert!(r.matches("app", "db", "billing-v2-worker"));
        assert!(!r.matches("app", "db", "billing-v1"));
        assert!(!r.matches("other", "db", "billing-v2"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"aXXbYc"));
        assert!(!glob(b"a*b", b"ac"));
    }
}
