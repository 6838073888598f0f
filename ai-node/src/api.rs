//! The node's HTTP face: `POST /chat` and `GET /health`, with every error in
//! the one JSON shape `{"error": {"code", "message"}}`.

use crate::engine::EngineError;
use crate::generation::Job;
use crate::store::Claim;
use crate::Node;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long `/health` waits for Redis before calling it unreachable.
const HEALTH_PING_TIMEOUT: Duration = Duration::from_millis(500);

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.max_body_bytes;
    Router::new()
        .route("/chat", post(chat))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(access_log))
        .with_state(node)
}

/// An error answer: status, machine code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message),
        }
    }
}

/// The body of `POST /chat`. Unknown fields are ignored: callers may add some.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub session_id: String,
    pub message: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}

async fn chat(
    State(node): State<Arc<Node>>,
    payload: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = payload?;
    let invalid = |e: chat_wire::InvalidInput| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    chat_wire::validate_id("session_id", &req.session_id).map_err(invalid)?;
    chat_wire::validate_message(&req.message).map_err(invalid)?;
    if let Some(user) = &req.user_id {
        chat_wire::validate_id("user_id", user).map_err(invalid)?;
    }
    let request_id = match req.request_id {
        Some(id) => {
            chat_wire::validate_id("request_id", &id).map_err(invalid)?;
            id
        }
        None => chat_wire::new_request_id(),
    };
    if node.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this AI node is shutting down"));
    }
    // Every refusal happens before the claim, so the caller can retry the same id elsewhere.
    let permit = node.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("this AI node is at its limit of {} streams", node.config.max_concurrent_streams),
        )
    })?;
    node.generator
        .engine
        .admit()
        .map_err(|e: EngineError| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_refused", e.to_string()))?;
    let claim = node.generator.store.claim(&request_id, &node.config.node_id).await.map_err(|e| {
        log::warn!("request_id={request_id} claim failed: {e}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the event store is unreachable")
    })?;
    let (holder, duplicate) = match claim {
        Claim::Taken(holder) => (holder, true),
        Claim::Won => {
            let job = Job { request_id: request_id.clone(), session_id: req.session_id.clone(), message: req.message };
            node.spawn(job, permit);
            (node.config.node_id.clone(), false)
        }
    };
    let body = json!({
        "request_id": request_id,
        "session_id": req.session_id,
        "node": holder,
        "status": "accepted",
        "duplicate": duplicate,
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

async fn health(State(node): State<Arc<Node>>) -> Response {
    let redis_ok = matches!(tokio::time::timeout(HEALTH_PING_TIMEOUT, node.generator.store.ping()).await, Ok(Ok(())));
    let draining = node.draining.load(Ordering::Relaxed);
    let healthy = redis_ok && !draining;
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if healthy { "ok" } else if draining { "draining" } else { "redis_unreachable" },
        "node_id": node.config.node_id,
        "in_flight": node.in_flight(),
        "max_concurrent_streams": node.config.max_concurrent_streams,
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "draining": draining,
    });
    (status, Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// One log line per request, at info.
async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    log::info!(
        "method={method} path={path} status={} duration_ms={:.1}",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    response
}
