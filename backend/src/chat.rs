//! The chat service: validation, rate limits and dispatch of one chat to an
//! AI node. Both faces call it, the HTTP one (`api`) and the WebSocket one
//! (`ws`), so neither reaches into the other.

use crate::auth::{self, Caller};
pub use crate::errors::ApiError;
use crate::limits::Limited;
use crate::nodes::{Accepted, DispatchError, NodeChat};
use crate::App;
use axum::http::StatusCode;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

/// 429 for the bucket that ran dry.
pub fn limited(which: Limited) -> ApiError {
    let what = match which {
        Limited::Session => "this session",
        Limited::Ip => "this client",
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many chats from {what}; slow down"))
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Deadline(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", e.to_string()),
            DispatchError::NoNode { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_node_available", e.to_string())
            }
            DispatchError::Rejected { .. } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub session_id: String,
    pub message: String,
    #[serde(default)]
    pub user_id: Option<String>,
}

/// Validates, rate-limits and dispatches one chat; the request id is fixed
/// here. With keys on, the session must be the caller's (claimed on first
/// use) and the key's limits must admit the request.
pub async fn start_chat(
    app: &App,
    caller: &Caller,
    ip: IpAddr,
    body: ChatBody,
    request_id: String,
) -> Result<Accepted, ApiError> {
    let result = async {
        chat_wire::validate_id("session_id", &body.session_id).map_err(ApiError::invalid)?;
        chat_wire::validate_message(&body.message).map_err(ApiError::invalid)?;
        if let Some(user) = &body.user_id {
            chat_wire::validate_id("user_id", user).map_err(ApiError::invalid)?;
        }
        if app.draining.load(Ordering::Relaxed) {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this backend is shutting down"));
        }
        app.limits.admit_chat(&body.session_id, ip).map_err(limited)?;
        auth::own_session(app, caller, &body.session_id).await?;
        auth::admit(app, caller, &request_id).await?;
        let chat = NodeChat {
            request_id: Some(request_id.clone()),
            session_id: body.session_id,
            message: body.message,
            user_id: body.user_id,
            takeover: None,
            owner: caller.0.as_ref().map(|k| k.id.clone()),
        };
        match app.pool.dispatch(&chat).await {
            Ok(accepted) => Ok(accepted),
            Err(e) => {
                auth::unadmit(app, caller, &request_id).await;
                Err(e.into())
            }
        }
    }
    .await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code,
    };
    app.metrics.chats.with_label_values(&[outcome]).inc();
    result
}

/// What a cancel found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// Marked: its producer (or a fencing backend) stores the `cancelled` end.
    Cancelling,
    /// It had ended already.
    Ended,
}

/// Cancels a running request of the caller's: its producer stops and every
/// reader gets a stored `error` with code `cancelled`. Another key's request
/// is unknown here (404).
pub async fn cancel_chat(app: &App, caller: &Caller, request_id: &str) -> Result<Cancelled, ApiError> {
    use chat_wire::ledger::Cancel;
    chat_wire::validate_id("request_id", request_id).map_err(ApiError::invalid)?;
    let unknown = || ApiError::new(StatusCode::NOT_FOUND, "unknown_request", "no such request, or it expired");
    if !auth::owns_request(app, caller, request_id).await {
        return Err(unknown());
    }
    let outcome = app.ledger.cancel(request_id).await.map_err(|e| {
        log::warn!("request_id={request_id} cancel: {e}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the event store is unreachable")
    })?;
    match outcome {
        Cancel::Unknown => Err(unknown()),
        Cancel::Ended => Ok(Cancelled::Ended),
        Cancel::Stopping => {
            app.metrics.cancels.with_label_values(&["client"]).inc();
            log::info!("request_id={request_id} cancel asked by key {}", caller.id());
            Ok(Cancelled::Cancelling)
        }
        Cancel::Orphaned => {
            // No producer holds a lease: fence it here and store the end.
            app.metrics.cancels.with_label_values(&["client"]).inc();
            app.takeovers.start(request_id);
            Ok(Cancelled::Cancelling)
        }
    }
}
