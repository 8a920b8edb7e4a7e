//! Who may call what on the admin listener: the one place bearer tokens are checked.
//!
//! Two policies, one check. Endpoints that change traffic (`/v1/pause`, `/v1/resume`,
//! `/v1/cutover`) need `admin_token` and are refused outright when it is not configured, so a
//! forgotten token never leaves them open. The id mapping (`/v1/map/*`) reads data the
//! application already exposes and is open unless `map_token` is set.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::proxy::Shared;

/// `None` when the request carries the admin token, else the response refusing it.
pub(super) fn admin(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.cfg.admin_token else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                axum::Json(
                    json!({"error": "admin_token is not configured; set it to use this endpoint"}),
                ),
            )
                .into_response(),
        );
    };
    require_bearer(headers, token, "admin_token")
}

/// `None` when the id mapping is open or the request carries the map token, else the 401.
pub(super) fn map(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let token = s.cfg.map_token.as_ref()?;
    require_bearer(headers, token, "map_token")
}

/// `None` when the request carries `Authorization: Bearer <token>`, else the 401 that names
/// the configuration key holding the token.
fn require_bearer(headers: &HeaderMap, token: &str, key: &str) -> Option<Response> {
    (!bearer_matches(headers, token)).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({
                "error": format!("missing or wrong bearer token (Authorization: Bearer <{key}>)")
            })),
        )
            .into_response()
    })
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

/// Equal slices, in a time that does not depend on where they first differ, so the token
/// cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_must_match_exactly() {
        assert!(bearer_matches(&with_auth("Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cretx"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn refusal_names_the_key() {
        let r = require_bearer(&HeaderMap::new(), "t", "map_token").expect("refused");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
