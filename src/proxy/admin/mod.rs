//! The admin HTTP endpoint, on `admin_listen`: Prometheus metrics, health, the pause gate,
//! the cutover coordinator and the id mapping.
//!
//! `GET /metrics`, `GET /healthz` and `GET /readyz` are open (Prometheus and orchestrators
//! scrape them); `GET /v1/status` is open too and shows no SQL. `POST /v1/pause`,
//! `POST /v1/resume` and `POST /v1/cutover` change traffic and need
//! `Authorization: Bearer <admin_token>`; without a configured token they are refused outright.
//! `/v1/map/*` (`map.rs`) serves the id mapping, open unless `map_token` is set. Both token
//! checks are in `auth.rs`.
//!
//! It is part of the proxy because it reads and drives the proxy's [`Shared`] state (gate,
//! metrics, rewriter, id-mapping service); the proxy spawns [`serve`] next to its listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::proxy::Shared;
use crate::proxy::gate::SessionState;

mod auth;
mod map;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route("/v1/cutover", post(cutover))
        .route("/v1/map/{table}", get(map::by_uuid).post(map::batch))
        .route("/v1/map/{table}/{legacy_id}", get(map::by_legacy))
        .with_state(shared);
    axum::serve(listener, app).await
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    if let Some(rw) = &*s.rewriter.load() {
        rw.rewriter.observe_metrics();
    }
    s.metrics.map.cache_entries.set(s.map.cache_len() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.gate.reading()),
    )
        .into_response()
}

/// Ready when PostgreSQL answers: a connection plus an SSLRequest answered with `S` or `N`
/// proves a PostgreSQL server is there, without credentials.
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(s.upstream.addr()).await?;
        use crate::proxy::wire::startup::{SSL_REQUEST_CODE, build_request};
        let req = build_request(SSL_REQUEST_CODE, &[]);
        tcp.write_all(&req).await?;
        let b = tcp.read_u8().await?;
        if b == b'S' || b == b'N' {
            Ok(())
        } else {
            Err(std::io::Error::other("not a PostgreSQL server"))
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "PostgreSQL at {} is not reachable: {e}\n",
                s.upstream.addr()
            ),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "PostgreSQL at {} did not answer within 2s\n",
                s.upstream.addr()
            ),
        )
            .into_response(),
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let counts = s.gate.counts();
    // The same groups the heartbeat reports, without the pids (this endpoint is open).
    let mut shapes = s.gate.shape_groups();
    for g in &mut shapes {
        g.backend_pids.clear();
    }
    let by_state: serde_json::Map<String, serde_json::Value> = SessionState::ALL
        .iter()
        .zip(counts)
        .map(|(st, n)| (st.as_str().to_string(), json!(n)))
        .collect();
    axum::Json(json!({
        "gate": if s.gate.is_closed() { "closed" } else { "open" },
        "gate_closed_ms": s.gate.closed_for().map(|d| d.as_millis() as u64),
        "sessions": by_state,
        "total_sessions": counts.iter().sum::<usize>(),
        "sessions_by_shape": crate::migrate::shapes::totals(&shapes),
        "shapes": shapes,
        "upstream": s.upstream.addr(),
        "rules_version": s.metrics.rewrite.rules_version.get(),
        "dual_write": s.rewriter.load().is_some(),
        "database_link": match (&s.cfg.database_url, s.control_connected.load(std::sync::atomic::Ordering::Relaxed)) {
            (None, _) => "disabled",
            (Some(_), true) => "connected",
            (Some(_), false) => "disconnected",
        },
        "id_map": s.map.status(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct PauseParams {
    /// How long to wait for busy sessions, e.g. `2s` (default 5s).
    timeout: Option<String>,
}

async fn pause(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(p): Query<PauseParams>,
) -> Response {
    if let Some(r) = auth::admin(&s, &headers) {
        return r;
    }
    let timeout = match p.timeout.as_deref().map(crate::config::parse_duration) {
        None => Duration::from_secs(5),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": format!("timeout: {e}")})),
            )
                .into_response();
        }
    };
    let out = s.gate.pause(timeout).await;
    let result = if out.drained { "drained" } else { "timeout" };
    s.metrics.pauses.with_label_values(&[result]).inc();
    let code = if out.drained {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (
        code,
        axum::Json(json!({
            "gate": "closed",
            "drained": out.drained,
            "waited_ms": out.waited_ms,
            "busy": out.busy,
        })),
    )
        .into_response()
}

async fn resume(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = auth::admin(&s, &headers) {
        return r;
    }
    let closed_for = s.gate.resume();
    if let Some(d) = closed_for {
        s.metrics.pause_duration.observe(d.as_secs_f64());
    }
    axum::Json(json!({
        "gate": "open",
        "closed_ms": closed_for.map(|d| d.as_millis() as u64),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct SwitchParams {
    /// `cutover` (default) or `rollback`.
    action: Option<String>,
    drain_timeout: Option<String>,
    lock_timeout: Option<String>,
    budget: Option<String>,
    #[serde(default)]
    terminate_blockers: bool,
    #[serde(default)]
    dry_run: bool,
    /// `keyshift cutover --by-table`.
    #[serde(default)]
    by_table: bool,
}

/// `POST /v1/cutover`: runs the coordinator (docs/cutover.md) from this proxy, against its
/// `database_url`; the same as `keyshift cutover` with the same options as query parameters.
async fn cutover(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(p): Query<SwitchParams>,
) -> Response {
    use crate::migrate::switch::{self, Action, SwitchError, SwitchOptions};
    if let Some(r) = auth::admin(&s, &headers) {
        return r;
    }
    let bad =
        |m: String| (StatusCode::BAD_REQUEST, axum::Json(json!({"error": m}))).into_response();
    let Some(url) = s.cfg.database_url.clone() else {
        return (
            StatusCode::CONFLICT,
            axum::Json(
                json!({"error": "this proxy has no database_url: it cannot coordinate a cutover"}),
            ),
        )
            .into_response();
    };
    let action = match p.action.as_deref() {
        None | Some("cutover") => Action::Cutover,
        Some("rollback") => Action::Rollback,
        Some(other) => return bad(format!("action: {other:?} is neither cutover nor rollback")),
    };
    let dur = |v: &Option<String>, key: &str, default: Duration| match v.as_deref() {
        None => Ok(default),
        Some(t) => crate::config::parse_duration(t).map_err(|e| format!("{key}: {e}")),
    };
    let settings = crate::migrate::Settings::default();
    let opts = match (
        dur(&p.drain_timeout, "drain_timeout", Duration::from_secs(2)),
        dur(&p.lock_timeout, "lock_timeout", settings.lock_timeout),
        dur(&p.budget, "budget", Duration::from_secs(10)),
    ) {
        (Ok(drain_timeout), Ok(lock_timeout), Ok(budget)) => SwitchOptions {
            action,
            drain_timeout,
            lock_timeout,
            budget,
            terminate_blockers: p.terminate_blockers,
            dry_run: p.dry_run,
            by_table: p.by_table,
        },
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return bad(e),
    };
    let client = match crate::migrate::db::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    match switch::run(&client, &opts, &settings).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(SwitchError::Refused(why)) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"result": "refused", "error": why})),
        )
            .into_response(),
        Err(SwitchError::Interrupted(why)) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"result": "interrupted", "error": why})),
        )
            .into_response(),
        Err(SwitchError::Aborted(why)) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"result": "aborted", "error": why})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
