//! The status listener's app, apart from public traffic: `/nginx-status`
//! (nginx `stub_status`, byte for byte), `/metrics` (Prometheus text) and
//! `/upstreams` (JSON: each group's backends and their health). With worker
//! processes the counters and metrics are every worker's; `/upstreams` is
//! the answering worker's view (each runs its own health checks).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::State;

/// Serves the status endpoints.
pub struct StatusApp {
    /// Counters, metrics and upstreams to report.
    state: Arc<State>,
}

impl StatusApp {
    /// A status app over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// The answer for `path`: status, content type, body.
    pub async fn answer(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/nginx-status" => (StatusCode::OK, "text/plain", self.state.stats.stub_status()),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::workers::gather::all_workers(&self.state).await,
            ),
            "/upstreams" => {
                let groups: Vec<_> = self.state.upstreams.all().iter().map(|g| g.view()).collect();
                let body = serde_json::json!({ "upstreams": groups }).to_string();
                (StatusCode::OK, "application/json", body)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "application/json",
                serde_json::json!({"error": {"code": "not_found", "message": "try /nginx-status, /metrics or /upstreams"}})
                    .to_string(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for StatusApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = self.answer(&path).await;
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .header("cache-control", "no-store")
            .body(body.into_bytes())
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
