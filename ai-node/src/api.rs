//! The node's HTTP face: `POST /chat` and `GET /health`, with every error in
//! the one JSON shape `{"error": {"code", "message"}}`.

use crate::engine::EngineError;
use crate::generation::Job;
use crate::store::Claim;
use crate::Node;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat_wire::ledger::RequestRecord;
use serde_json::json;
pub use service_kit::http::ApiError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `/health` waits for Redis before calling it unreachable.
const HEALTH_PING_TIMEOUT: Duration = Duration::from_millis(500);

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.max_body_bytes;
    let guarded = Router::new()
        .route("/chat", post(chat))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_secret));
    Router::new()
        .merge(guarded)
        .route("/health", get(health))
        .fallback(service_kit::http::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(service_kit::http::access_log))
        .with_state(node)
}

/// Middleware: with `server.secret` set, only a caller that sends it in
/// `X-Node-Secret` (a backend) may start or take over work; 401 otherwise.
async fn require_secret(
    State(node): State<Arc<Node>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if let Some(secret) = &node.config.secret {
        let presented =
            request.headers().get(chat_wire::node_api::SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !chat_wire::node_api::secret_matches(secret, presented) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this AI node takes work only from backends",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// The body of `POST /chat`: the backend-to-node contract, in `chat_wire`.
pub use chat_wire::node_api::{NodeAccepted, NodeChat as ChatRequest, Takeover};

async fn chat(
    State(node): State<Arc<Node>>,
    payload: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = payload?;
    req.validate().map_err(ApiError::invalid)?;
    let request_id = req.request_id.clone().unwrap_or_else(chat_wire::new_request_id);
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
    let store = &node.generator.store;
    let unavailable = |e: chat_wire::redis_conn::RedisError| {
        log::warn!("request_id={request_id} store failed: {e}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the event store is unreachable")
    };
    let mut job = Job {
        request_id: request_id.clone(),
        session_id: req.session_id.clone(),
        message: req.message.clone(),
        epoch: 1,
        after_seq: 0,
        prefix: String::new(),
    };
    let (holder, duplicate) = match req.takeover {
        Some(takeover) => {
            if !store.adopt(&request_id, takeover.epoch, &node.config.node_id).await.map_err(unavailable)? {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "stale_takeover",
                    "the request moved to another epoch",
                ));
            }
            job.epoch = takeover.epoch;
            job.after_seq = takeover.after_seq;
            job.prefix = takeover.text;
            log::info!("request_id={request_id} taken over at epoch {} after seq {}", job.epoch, job.after_seq);
            node.spawn(job, permit);
            (node.config.node_id.clone(), false)
        }
        None => {
            let record = RequestRecord {
                session_id: req.session_id.clone(),
                message: req.message,
                user_id: req.user_id,
                node: node.config.node_id.clone(),
                epoch: 1,
                owner: req.owner,
                cancelled: false,
            };
            match store.claim(&request_id, &record).await.map_err(unavailable)? {
                Claim::Taken(holder) => (holder, true),
                Claim::Won => {
                    node.spawn(job, permit);
                    (node.config.node_id.clone(), false)
                }
            }
        }
    };
    let body =
        NodeAccepted { request_id, session_id: req.session_id, node: holder, status: "accepted".into(), duplicate };
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
