//! The backend's HTTP face: `POST /api/chat` (JSON or SSE), `GET
//! /api/ai-health`, `GET /health`, the WebSocket route, and the one JSON error
//! shape. Every answer carries `X-Backend-Id`.

use crate::auth::{self, Caller};
use crate::chat::{cancel_chat, start_chat, Cancelled, ChatBody};
use crate::follow::Out;
use crate::reader::{follow_one, Item, Reader};
use crate::resume::{last_event_id, open_resume};
use crate::{ws, App};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chat_wire::Event;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn router(app: Arc<App>) -> Router {
    let backend_id = HeaderValue::from_str(&app.config.backend_id).expect("backend ids are header-safe");
    // Everything under /api/ and /v1/ needs a key when keys are on.
    let guarded = Router::new()
        .route("/api/chat", post(chat))
        .route("/api/chat/{request_id}/events", get(resume_sse))
        .route("/api/chat/{request_id}", axum::routing::delete(cancel))
        .route("/api/ai-health", get(ai_health))
        .route("/api/usage", get(usage))
        .merge(crate::openai::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::require_key));
    Router::new()
        .merge(guarded)
        .route("/ws/chat", get(ws::upgrade))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/", get(page))
        .fallback(service_kit::http::not_found)
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .layer(middleware::from_fn(service_kit::http::access_log))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let id = backend_id.clone();
            async move {
                let mut res = next.run(req).await;
                res.headers_mut().insert("x-backend-id", id);
                res
            }
        }))
        .with_state(app)
}

pub use crate::errors::ApiError;

async fn chat(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    payload: Result<Json<ChatBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = payload?;
    let ip = app.limits.client_ip(peer, &headers);
    let request_id = chat_wire::new_request_id();
    let wants_sse =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        // Attach before dispatching so no event can pass unseen.
        chat_wire::validate_id("session_id", &body.session_id).map_err(ApiError::invalid)?;
        let mut reader = Reader::attach_for(&app, &body.session_id, &request_id).await;
        reader.follower.expect(&request_id);
        let session_id = body.session_id.clone();
        let accepted = start_chat(&app, &caller, ip, body, request_id.clone()).await?;
        log::info!("request_id={request_id} session_id={session_id} node={} sse", accepted.node_url);
        let first = reader.follower.start(&request_id).await;
        let charge = caller.0.as_ref().map(|k| k.id.clone());
        return Ok(sse(app, reader, request_id, first, charge).into_response());
    }
    let session_id = body.session_id.clone();
    let accepted = start_chat(&app, &caller, ip, body, request_id.clone()).await?;
    log::info!("request_id={request_id} session_id={session_id} node={}", accepted.node_url);
    let answer = json!({
        "request_id": request_id,
        "session_id": session_id,
        "node": accepted.node_url,
        "node_id": accepted.node_id,
        "backend": app.config.backend_id,
        "status": "accepted",
    });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// `DELETE /api/chat/{request_id}`: stops a running answer; every reader
/// gets a stored `error` with code `cancelled`. `202 cancelling`, or `200
/// ended` when it had ended already; `404` for an unknown id (or another
/// key's).
async fn cancel(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(request_id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let (status, word) = match cancel_chat(&app, &caller, &request_id).await? {
        Cancelled::Cancelling => (StatusCode::ACCEPTED, "cancelling"),
        Cancelled::Ended => (StatusCode::OK, "ended"),
    };
    Ok((status, Json(json!({"request_id": request_id, "status": word}))).into_response())
}

#[derive(Debug, Deserialize)]
struct ResumeParams {
    after_seq: Option<u64>,
}

/// `GET /api/chat/{request_id}/events`: the events of a request after
/// `Last-Event-ID` (or `?after_seq=`), as SSE, from any backend: a dropped
/// SSE stream resumes here with nothing lost or repeated.
async fn resume_sse(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(request_id): axum::extract::Path<String>,
    Query(params): Query<ResumeParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after_seq = last_event_id(&headers)?.or(params.after_seq).unwrap_or(0);
    match open_resume(&app, &caller, &request_id, after_seq).await? {
        Some((reader, first)) => Ok(sse(app, reader, request_id, first, None).into_response()),
        None => {
            // The client has the whole request already: an empty stream that ends.
            let empty = futures::stream::empty::<Result<SseEvent, Infallible>>();
            Ok(Sse::new(empty).into_response())
        }
    }
}

/// The events of one request as Server-Sent Events, ending after its `done`
/// or `error`. A reader dropped as too slow (or told the stored events are
/// gone) ends with an `error` event without an id, and may resume.
fn sse(
    app: Arc<App>,
    reader: Reader,
    request_id: String,
    first: Vec<Out>,
    charge: Option<String>,
) -> impl IntoResponse {
    let rx = follow_one(app, reader, request_id.clone(), first, charge);
    let stream = futures::stream::unfold((rx, request_id), |(mut rx, id)| async move {
        let event = match rx.recv().await? {
            Item::Event(e) => sse_event(&e),
            Item::Notice { code, message } => sse_notice(&id, code, &message),
        };
        Some((Ok::<_, Infallible>(event), (rx, id)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse_event(event: &Event) -> SseEvent {
    let kind = match event.kind {
        chat_wire::EventKind::Chunk => "chunk",
        chat_wire::EventKind::Done => "done",
        chat_wire::EventKind::Error => "error",
    };
    SseEvent::default().id(event.seq.to_string()).event(kind).data(event.to_json())
}

/// A reader-level `error` (not an event of the request: no `id`, no `seq`).
fn sse_notice(request_id: &str, code: &str, message: &str) -> SseEvent {
    let data = json!({"type": "error", "request_id": request_id, "code": code, "message": message});
    SseEvent::default().event("error").data(data.to_string())
}

/// `GET /api/usage`: the caller's key's own totals, this minute's counts
/// and its limits (404 with keys off: there is no one to count for).
async fn usage(State(app): State<Arc<App>>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    let (Some(keys), Some(key)) = (&app.keys, &caller.0) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "keys_off", "usage is counted per API key; keys are off"));
    };
    match keys.usage(key).await {
        Ok(usage) => Ok(Json(usage).into_response()),
        Err(e) => {
            log::warn!("usage of key {}: {e}", key.id);
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the key store is unreachable"))
        }
    }
}

async fn ai_health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let nodes = app.pool.status();
    let healthy = nodes.iter().filter(|n| n.status == "healthy").count();
    Json(json!({"total_nodes": nodes.len(), "healthy_nodes": healthy, "nodes": nodes}))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let draining = app.draining.load(Ordering::Relaxed);
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "backend_id": app.config.backend_id,
        "websockets": app.metrics.ws_active.get(),
        "sessions": app.hub.sessions(),
    });
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, Json(body)).into_response()
}

/// Readiness: 200 while the event store answers and the backend is not
/// draining, else 503 with the reason (for a proxy's health checks).
async fn ready(State(app): State<Arc<App>>) -> Response {
    let draining = app.draining.load(Ordering::Relaxed);
    let store = app.readiness.is_ready();
    let (status, reason) = match (draining, store) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, Some("draining")),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, Some("the event store is unreachable")),
        (false, true) => (StatusCode::OK, None),
    };
    let body = json!({
        "status": if reason.is_some() { "unready" } else { "ready" },
        "backend_id": app.config.backend_id,
        "reason": reason,
    });
    (status, Json(body)).into_response()
}

/// The chat page: one self-contained file, compiled in, no front-end build.
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../static/index.html"))
}
