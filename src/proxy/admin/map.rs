//! `/v1/map` on the admin listener: the id mapping ([`crate::map::MapService`]) over HTTP, for
//! systems outside the database.
//!
//! `GET /v1/map/{table}/{legacy_id}`, `GET /v1/map/{table}?uuid=…` and
//! `POST /v1/map/{table}` with `{"legacy_ids": [...]}` or `{"uuids": [...]}` (at most
//! [`MAX_BATCH`]). `{table}` is `schema.table`, or a bare name found through `search_path`.
//! With `map_token` configured, requests need `Authorization: Bearer <map_token>` ([`auth::map`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth;
use crate::map::cache::Id;
use crate::map::service::{MAX_BATCH, MapError};
use crate::proxy::Shared;

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(json!({"error": msg.into()}))).into_response()
}

fn map_error(e: MapError) -> Response {
    let code = match e {
        MapError::UnknownTable { .. } | MapError::NoMapping => StatusCode::NOT_FOUND,
        MapError::NoDatabase | MapError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, e.to_string())
}

fn uuid_str(u: u128) -> String {
    uuid::Uuid::from_u128(u).to_string()
}

/// A legacy id from a path segment or a JSON value (numbers, or strings of digits for
/// clients whose numbers lose precision beyond 2^53).
fn parse_legacy(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("legacy id {n} is not a 64-bit integer")),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("legacy id {s:?} is not an integer")),
        other => Err(format!("legacy id {other} is not an integer")),
    }
}

fn parse_uuid(v: &Value) -> Result<u128, String> {
    match v {
        Value::String(s) => uuid::Uuid::parse_str(s.trim())
            .map(|u| u.as_u128())
            .map_err(|e| format!("uuid {s:?} is malformed: {e}")),
        other => Err(format!("uuid {other} is not a string")),
    }
}

fn one(table: &str, id: Id, other: Id) -> Value {
    let (l, u) = match (id, other) {
        (Id::Legacy(l), Id::Uuid(u)) | (Id::Uuid(u), Id::Legacy(l)) => (l, u),
        _ => unreachable!("a mapping pairs a legacy id with a uuid"),
    };
    json!({"table": table, "legacy_id": l, "uuid": uuid_str(u)})
}

async fn single(s: &Shared, table: &str, id: Id) -> Response {
    match s.map.lookup(table, &[id]).await {
        Ok(a) => match a.found.first().copied().flatten() {
            Some(other) => axum::Json(one(&a.table, id, other)).into_response(),
            None => {
                let what = match id {
                    Id::Legacy(l) => format!("legacy id {l}"),
                    Id::Uuid(u) => format!("uuid {}", uuid_str(u)),
                };
                error(
                    StatusCode::NOT_FOUND,
                    format!("{} has no row with {what}", a.table),
                )
            }
        },
        Err(e) => map_error(e),
    }
}

/// `GET /v1/map/{table}/{legacy_id}`
pub async fn by_legacy(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((table, id)): Path<(String, String)>,
) -> Response {
    if let Some(r) = auth::map(&s, &headers) {
        return r;
    }
    match parse_legacy(&Value::String(id)) {
        Ok(l) => single(&s, &table, Id::Legacy(l)).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

#[derive(Deserialize)]
pub struct UuidParam {
    uuid: Option<String>,
}

/// `GET /v1/map/{table}?uuid=…`
pub async fn by_uuid(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(table): Path<String>,
    Query(p): Query<UuidParam>,
) -> Response {
    if let Some(r) = auth::map(&s, &headers) {
        return r;
    }
    let Some(u) = p.uuid else {
        return error(
            StatusCode::BAD_REQUEST,
            "give a uuid (GET /v1/map/{table}?uuid=...) or a legacy id (GET /v1/map/{table}/{legacy_id})",
        );
    };
    match parse_uuid(&Value::String(u)) {
        Ok(u) => single(&s, &table, Id::Uuid(u)).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `POST /v1/map/{table}` with `{"legacy_ids": [...]}` or `{"uuids": [...]}`: answers
/// `{"table", "mappings": [{"legacy_id", "uuid"}...], "not_found": [...]}`, mappings in the
/// order asked.
pub async fn batch(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(table): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = auth::map(&s, &headers) {
        return r;
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let (list, legacy) = match (body.get("legacy_ids"), body.get("uuids")) {
        (Some(Value::Array(a)), None) => (a, true),
        (None, Some(Value::Array(a))) => (a, false),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                r#"the body must be {"legacy_ids": [...]} or {"uuids": [...]}"#,
            );
        }
    };
    if list.len() > MAX_BATCH {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} ids: at most {MAX_BATCH} per request", list.len()),
        );
    }
    let ids: Result<Vec<Id>, String> = list
        .iter()
        .map(|v| {
            if legacy {
                parse_legacy(v).map(Id::Legacy)
            } else {
                parse_uuid(v).map(Id::Uuid)
            }
        })
        .collect();
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s.map.lookup(&table, &ids).await {
        Ok(a) => {
            let mut mappings = Vec::with_capacity(ids.len());
            let mut not_found = Vec::new();
            for (id, f) in ids.iter().zip(&a.found) {
                match (f, id) {
                    (Some(other), _) => {
                        let mut m = one(&a.table, *id, *other);
                        if let Value::Object(o) = &mut m {
                            o.remove("table");
                        }
                        mappings.push(m);
                    }
                    (None, Id::Legacy(l)) => not_found.push(json!(l)),
                    (None, Id::Uuid(u)) => not_found.push(json!(uuid_str(*u))),
                }
            }
            axum::Json(json!({"table": a.table, "mappings": mappings, "not_found": not_found}))
                .into_response()
        }
        Err(e) => map_error(e),
    }
}
