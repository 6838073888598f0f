//! A tiny HTTP backend for the proxy benchmarks: `GET /` answers a small
//! body, `GET /health` answers `ok`, `POST /echo` answers the body it got.
//! Every answer carries `X-Backend-Id`, like the real backends. It does as
//! little as possible so that the proxy in front, not the backend, is what a
//! benchmark measures.

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

/// The router of backend `id`.
pub fn router(id: &str) -> Router {
    let value = HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    Router::new()
        .route("/", get(|| async { "hello from a benchmark backend\n" }))
        .route("/health", get(|| async { "ok" }))
        .route("/echo", post(|body: Bytes| async move { body }))
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let value = value.clone();
            async move {
                res.headers_mut().insert(HeaderName::from_static("x-backend-id"), value);
                res
            }
        }))
}

/// Serves `router(id)` on `listener` until the process ends.
pub async fn run(listener: TcpListener, id: &str) -> std::io::Result<()> {
    axum::serve(service_kit::http::no_delay(listener), router(id)).await
}
