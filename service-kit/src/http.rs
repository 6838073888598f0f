//! HTTP pieces the backend and the AI node serve alike: the one JSON error
//! shape `{"error": {"code", "message"}}`, the mapping of axum's JSON
//! rejections onto it, the access log line, the shutdown signal, and the
//! listener with Nagle's algorithm off.

use axum::extract::rejection::JsonRejection;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::Instant;

/// An error answer: status, machine code, human message. Internals are logged, not put here.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    /// 400 for a field that breaks the rules of `chat_wire::ids`.
    pub fn invalid(e: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
    }

    pub fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Bad JSON, wrong types and missing fields are 400 (not axum's 422); too large 413; not JSON 415.
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

/// The fallback route: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Middleware: one log line per request, at info (health checks at debug).
pub async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    // Health checks come every few seconds from every checker: keep them out of the info log.
    let level = if path == "/health" { log::Level::Debug } else { log::Level::Info };
    log::log!(
        level,
        "method={method} path={path} status={} duration_ms={:.1}",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    response
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// `listener` with `TCP_NODELAY` on every accepted connection, for
/// `axum::serve`. Without it Nagle's algorithm holds a small write while an
/// earlier one is unacknowledged: a chat's first chunk, written right after
/// the `accepted` frame, waited for the client's delayed ACK (about 20 ms).
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            log::debug!("TCP_NODELAY not set on an accepted connection: {e}");
        }
    }
    listener.tap_io(set as fn(&mut tokio::net::TcpStream))
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = super::no_delay(listener);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is off on an accepted connection");
        // A plain listener's connections have it off: the check above can fail.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(plain.local_addr().unwrap()).await.unwrap();
        assert!(!plain.accept().await.unwrap().0.nodelay().unwrap());
    }
}
