//! API keys at the door: the middleware that puts the caller's key on every
//! `/api/*` and `/v1/*` request (401 without one), and the checks the chat
//! service and the readers make with it: a session, and every request in
//! it, is its owner key's alone (another key gets `404`, as for a session
//! that does not exist); a key's requests are admitted against its limits
//! (429). With keys off every caller is anonymous and every check passes.

use crate::errors::{ApiError, OpenAiError};
use crate::keys::{AuthError, Key, Over};
use crate::App;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Who is asking: the key, or no one when keys are off.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Key>);

impl Caller {
    /// The key's id, for logs and metrics (`-` when keys are off).
    pub fn id(&self) -> &str {
        self.0.as_ref().map_or("-", |k| k.id.as_str())
    }
}

/// The 401 (or 503) of a request without a usable key.
pub fn unauthorized(e: AuthError) -> ApiError {
    match e {
        AuthError::Unavailable => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.message()),
        AuthError::Missing | AuthError::Invalid => {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", e.message())
        }
    }
}

/// Who presented `headers`, when keys are on.
pub async fn caller(app: &App, headers: &axum::http::HeaderMap) -> Result<Caller, AuthError> {
    let Some(keys) = &app.keys else { return Ok(Caller(None)) };
    let key = keys.check(crate::keys::presented(headers).as_deref()).await;
    app.metrics
        .auth
        .with_label_values(&[match &key {
            Ok(_) => "ok",
            Err(AuthError::Missing) => "missing",
            Err(AuthError::Invalid) => "invalid",
            Err(AuthError::Unavailable) => "unavailable",
        }])
        .inc();
    Ok(Caller(Some(key?)))
}

/// Middleware: puts the [`Caller`] on the request, or answers 401 in the
/// face's own error shape (OpenAI's under `/v1`).
pub async fn require_key(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    match caller(&app, request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) if request.uri().path().starts_with("/v1/") => OpenAiError(unauthorized(e)).into_response(),
        Err(e) => unauthorized(e).into_response(),
    }
}

/// 404 for a session that is another key's: nothing about it is revealed.
pub fn unknown_session() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_session", "no such session")
}

fn store_unavailable(e: impl std::fmt::Display) -> ApiError {
    log::warn!("key store: {e}");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the key store is unreachable; try again")
}

/// Passes when `session_id` is the caller's (claiming it on first use).
pub async fn own_session(app: &App, caller: &Caller, session_id: &str) -> Result<(), ApiError> {
    let (Some(keys), Some(key)) = (&app.keys, &caller.0) else { return Ok(()) };
    match keys.own_session(session_id, &key.id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(unknown_session()),
        Err(e) => Err(store_unavailable(e)),
    }
}

/// Admits one request of the caller's key against its limits.
pub async fn admit(app: &App, caller: &Caller, request_id: &str) -> Result<(), ApiError> {
    let (Some(keys), Some(key)) = (&app.keys, &caller.0) else { return Ok(()) };
    let over = keys.admit(key, request_id).await.map_err(store_unavailable)?;
    let outcome = match over {
        Ok(()) => "admitted",
        Err(Over::RequestsPerMinute) => "requests_per_minute",
        Err(Over::TokensPerMinute) => "tokens_per_minute",
        Err(Over::ConcurrentStreams) => "concurrent_streams",
    };
    app.metrics.key_requests.with_label_values(&[&key.id, outcome]).inc();
    over.map_err(|over| {
        let message = match over {
            Over::RequestsPerMinute => {
                format!("key {} made its {} requests of this minute", key.id, key.requests_per_minute)
            }
            Over::TokensPerMinute => format!("key {} used its {} tokens of this minute", key.id, key.tokens_per_minute),
            Over::ConcurrentStreams => {
                format!("key {} has {} answers running; wait for one to end", key.id, key.concurrent_streams)
            }
        };
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "key_limited", message)
    })
}

/// Takes back the admission of a request no node started.
pub async fn unadmit(app: &App, caller: &Caller, request_id: &str) {
    if let (Some(keys), Some(key)) = (&app.keys, &caller.0) {
        if let Err(e) = keys.unadmit(key, request_id).await {
            log::warn!("request_id={request_id} admission not taken back: {e}");
        }
    }
}

/// Whether the caller may read `request_id` (keys off: anyone). An unknown
/// request, or one whose record cannot be read, is not the caller's; the
/// reader then answers `unknown_request` as for any unknown id.
pub async fn owns_request(app: &App, caller: &Caller, request_id: &str) -> bool {
    if app.keys.is_none() || caller.0.is_none() {
        return true;
    }
    match app.ledger.record(request_id).await {
        Ok(Some(record)) => own_session(app, caller, &record.session_id).await.is_ok(),
        _ => false,
    }
}
