//! The proxy itself: one [`ProxyHttp`] implementation that routes by path
//! prefix, pins clients to a backend on the ketama ring, retries a failed
//! connect on the next backend, feeds the passive health checks, enforces
//! the request limits, sets the forwarding headers, and writes the access log.

use std::any::Any;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::connections::{HeaderToken, Reused};
use crate::sticky;
use crate::upstreams::UpstreamGroup;
use crate::State;

/// Idle upstream connections are kept this long for reuse.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// The `ProxyHttp` implementation.
pub struct Edge {
    /// Configuration, upstreams and counters.
    state: Arc<State>,
}

impl Edge {
    /// A proxy over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// Per-request state across Pingora's phases.
pub struct RequestCtx {
    /// When the request header was read.
    start: Instant,
    /// Keeps `stub_status` Writing and the WebSocket gauge right, even when
    /// a request ends on an unexpected path.
    in_flight: Option<InFlight>,
    /// `X-Request-Id`, taken from the client or generated.
    request_id: String,
    /// The client as the proxy believes it (see [`sticky::client_ip`]).
    client: Option<IpAddr>,
    /// The TCP peer.
    peer: Option<IpAddr>,
    /// The routed group.
    group: Option<Arc<UpstreamGroup>>,
    /// Bytes hashed onto the ring.
    key: Vec<u8>,
    /// Backends tried so far (retries skip them).
    tried: Vec<SocketAddr>,
    /// Whether the client asked for a protocol upgrade.
    upgrade: bool,
    /// Request body bytes seen, against the body limit.
    body_bytes: u64,
    /// Status the proxy answered itself, for the log when no header was written.
    answered: Option<u16>,
}

/// Counts a request as in flight until dropped.
struct InFlight {
    /// Where the counts live.
    state: Arc<State>,
    /// Whether this request became a WebSocket (counted in the gauge).
    websocket: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.stats.writing.fetch_sub(1, Ordering::Relaxed);
        if self.websocket {
            self.state.metrics.websockets_active.dec();
        }
    }
}

/// Whether a client-supplied request id is safe to pass on.
fn acceptable_request_id(id: &str) -> bool {
    crate::h1::acceptable_request_id(id.as_bytes())
}

/// Writes a JSON error answer (`{"error": {"code", "message"}}`).
async fn answer(session: &mut Session, status: u16, code: &str, message: &str, request_id: &str) -> Result<()> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut header = ResponseHeader::build(status, Some(5))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", request_id)?;
    if status == 429 {
        header.insert_header("retry-after", "1")?;
    }
    session.write_response_header(Box::new(header), false).await?;
    session.write_response_body(Some(Bytes::from(body)), true).await
}

impl Edge {
    fn group_name(ctx: &RequestCtx) -> &str {
        ctx.group.as_ref().map_or("-", |g| g.name())
    }

    fn record_upstream_failure(&self, ctx: &RequestCtx, addr: SocketAddr) {
        if let Some(group) = &ctx.group {
            self.state.record_upstream_failure(group, addr);
        }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            start: Instant::now(),
            in_flight: None,
            request_id: String::new(),
            client: None,
            peer: None,
            group: None,
            key: Vec::new(),
            tried: Vec::new(),
            upgrade: false,
            body_bytes: 0,
            answered: None,
        }
    }

    fn on_connection_reuse(&self, _session: &mut Session, _ctx: &mut Self::CTX, prev: Box<dyn Any + Send + Sync>) {
        // The connection layer's token: the header is in, the deadline is off.
        if let Ok(token) = prev.downcast::<Arc<HeaderToken>>() {
            token.finish();
        }
    }

    fn persist_connection_context(&self, _session: &Session, _ctx: &Self::CTX) -> Option<Box<dyn Any + Send + Sync>> {
        Some(Box::new(Reused))
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        ctx.start = Instant::now();
        self.state.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.state.stats.writing.fetch_add(1, Ordering::Relaxed);
        ctx.in_flight = Some(InFlight { state: self.state.clone(), websocket: false });
        ctx.request_id = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| acceptable_request_id(id))
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let config = &self.state.config;
        let peer =
            session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let client = sticky::client_ip(peer, &session.req_header().headers, &config.client.trusted_proxies);
        ctx.peer = Some(peer);
        ctx.client = Some(client);

        if !self.state.limiter.allow(client) {
            self.state.metrics.rejected.with_label_values(&["rate_limit"]).inc();
            ctx.answered = Some(429);
            answer(session, 429, "rate_limited", "too many requests", &ctx.request_id).await?;
            return Ok(true);
        }

        if let Err(why) = check_host(session.req_header()) {
            self.state.metrics.rejected.with_label_values(&["bad_host"]).inc();
            ctx.answered = Some(400);
            session.set_keepalive(None);
            answer(session, 400, "bad_request", why, &ctx.request_id).await?;
            return Ok(true);
        }

        let head = session.req_header();
        let head_bytes = head.method.as_str().len()
            + head.uri.to_string().len()
            + head.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
        if head_bytes > config.client.max_header_bytes {
            self.state.metrics.rejected.with_label_values(&["header_too_large"]).inc();
            ctx.answered = Some(431);
            session.set_keepalive(None);
            answer(session, 431, "header_too_large", "request head too large", &ctx.request_id).await?;
            return Ok(true);
        }

        let too_large = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|len| len > config.client.max_body_bytes);
        if too_large {
            self.state.metrics.rejected.with_label_values(&["body_too_large"]).inc();
            ctx.answered = Some(413);
            // The body is left unread: the connection cannot carry another request.
            session.set_keepalive(None);
            answer(session, 413, "payload_too_large", "request body too large", &ctx.request_id).await?;
            return Ok(true);
        }

        let path = session.req_header().uri.path().to_string();
        let group = config.route(&path).and_then(|name| self.state.upstreams.get(name));
        let Some(group) = group else {
            ctx.answered = Some(404);
            answer(session, 404, "not_found", "no route for this path", &ctx.request_id).await?;
            return Ok(true);
        };
        ctx.group = Some(group.clone());
        ctx.key = config.sticky.hash_input(client, &session.req_header().headers);
        if session.is_upgrade_req() {
            let req = session.req_header();
            if !crate::h1::head::is_websocket_upgrade(req.method == http::Method::GET, &req.headers) {
                // Not a real upgrade: served as a plain request, under the
                // body limit and deadlines of one (Pingora would tunnel it).
                session.req_header_mut().remove_header("upgrade");
            }
        }
        ctx.upgrade = session.is_upgrade_req();
        // Pingora's downstream read timeout also cuts upgraded connections
        // (pingora#255): a WebSocket gets the WebSocket idle time instead.
        let read_timeout = if ctx.upgrade { config.websocket_idle_timeout } else { config.client.body_timeout };
        session.set_read_timeout(Some(read_timeout));
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.upgrade {
            return Ok(());
        }
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > self.state.config.client.max_body_bytes {
                self.state.metrics.rejected.with_label_values(&["body_too_large"]).inc();
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        let group =
            ctx.group.clone().ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream group routed"))?;
        let config = group.config();
        let Some(addr) = group.select(&ctx.key, &ctx.tried) else {
            return Error::e_explain(
                ErrorType::HTTPStatus(503),
                format!("upstream {}: no backend available", config.name),
            );
        };
        if !ctx.tried.is_empty() {
            self.state.metrics.retries.with_label_values(&[&config.name]).inc();
        }
        ctx.tried.push(addr);
        if let Some(state) = group.state(&addr) {
            state.requests.fetch_add(1, Ordering::Relaxed);
        }
        let mut peer = HttpPeer::new(addr, false, String::new());
        if !self.state.config.server.work_stealing {
            // Each thread runs its own runtime, and a connection wakes the
            // runtime that opened it: reusing only this thread's upstream
            // connections keeps every request on one thread.
            peer.group_key = crate::h1::pool::thread_key();
        }
        peer.options.connection_timeout = Some(config.connect_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        peer.options.read_timeout =
            Some(if ctx.upgrade { self.state.config.websocket_idle_timeout } else { config.read_timeout });
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(addr) = peer._address.as_inet().copied() {
            self.record_upstream_failure(ctx, addr);
        }
        // Nothing reached the backend: safe to try the next one on the ring.
        if ctx.tried.len() <= self.state.config.server.max_retries {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let addr = peer._address.as_inet().copied();
        if client_reused {
            // A pooled connection the backend had already closed says nothing
            // about the backend: a retry may pick the same one again, so the
            // client stays where it is pinned.
            if ctx.tried.last().copied() == addr {
                ctx.tried.pop();
            }
        } else if e.esource() == &ErrorSource::Upstream {
            if let Some(addr) = addr {
                self.record_upstream_failure(ctx, addr);
            }
        }
        let mut e = e.more_context(format!("peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let trusted = &self.state.config.client.trusted_proxies;
        let peer = ctx.peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let peer_trusted = sticky::is_trusted(peer, trusted);
        // Only a trusted proxy's chain is kept; anyone else's is replaced.
        let forwarded_for = match session.req_header().headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(chain) if peer_trusted && !chain.trim().is_empty() => format!("{chain}, {peer}"),
            _ => peer.to_string(),
        };
        let tls = session.digest().and_then(|d| d.ssl_digest.as_ref()).is_some();
        let proto = match session.req_header().headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
            Some(p) if peer_trusted && (p == "http" || p == "https") => p.to_string(),
            _ if tls => "https".to_string(),
            _ => "http".to_string(),
        };
        upstream.insert_header("x-forwarded-for", forwarded_for)?;
        upstream.insert_header("x-real-ip", ctx.client.unwrap_or(peer).to_string())?;
        upstream.insert_header("x-forwarded-proto", proto)?;
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        response.insert_header("x-request-id", ctx.request_id.as_str())?;
        if response.status.as_u16() == 101 {
            if let Some(flight) = ctx.in_flight.as_mut() {
                if !flight.websocket {
                    flight.websocket = true;
                    self.state.metrics.websockets_active.inc();
                }
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Self::CTX) -> FailToProxy {
        let (code, name, message) = match e.etype() {
            ErrorType::HTTPStatus(413) => (413, "payload_too_large", "request body too large"),
            ErrorType::HTTPStatus(503) => (503, "no_backend", "no backend available"),
            ErrorType::HTTPStatus(code) => (*code, "error", "request failed"),
            _ => match e.esource() {
                ErrorSource::Upstream => match e.etype() {
                    ErrorType::ConnectTimedout | ErrorType::ReadTimedout => {
                        (504, "upstream_timeout", "backend timed out")
                    }
                    _ => (502, "bad_gateway", "backend failed"),
                },
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::ReadTimedout => (408, "request_timeout", "request body timed out"),
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => (0, "", ""),
                    _ => (400, "bad_request", "bad request"),
                },
                ErrorSource::Internal | ErrorSource::Unset => (500, "internal", "internal error"),
            },
        };
        if code == 408 {
            self.state.metrics.rejected.with_label_values(&["body_timeout"]).inc();
        }
        // Nothing can be written once a response has started (e.g. a
        // WebSocket that broke): the connection just closes.
        if code > 0 && session.response_written().is_none() {
            ctx.answered = Some(code);
            if let Err(err) = answer(session, code, name, message, &ctx.request_id).await {
                log::debug!("could not send the error answer: {err}");
            }
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        // A client that leaves mid-answer (a chat page closed during an SSE
        // stream) is an ordinary event: info, like nginx, not an error.
        let client_left = error.esource() == &ErrorSource::Downstream
            && matches!(error.etype(), ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError);
        if client_left {
            log::info!("client closed the connection before the answer ended: {error}");
        }
        client_left
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map(|r| r.status.as_u16()).or(ctx.answered).unwrap_or(0);
        let group = Self::group_name(ctx);
        let elapsed = ctx.start.elapsed();
        let metrics = &self.state.metrics;
        let code = http::StatusCode::from_u16(status).ok();
        metrics.requests.with_label_values(&[group, code.as_ref().map_or("0", |c| c.as_str())]).inc();
        metrics.latency.with_label_values(&[group]).observe(elapsed.as_secs_f64());
        // The access line is built only when the access log is on.
        if log::log_enabled!(target: "access", log::Level::Info) {
            let req = session.req_header();
            let upstream = ctx.tried.last().map_or_else(|| "-".to_string(), ToString::to_string);
            let error = e.map(|e| format!(" error=\"{e}\"")).unwrap_or_default();
            log::info!(
                target: "access",
                "client={} method={} path={} status={} upstream={} duration_ms={} bytes={} request_id={}{}",
                ctx.client.map_or_else(|| "-".to_string(), |c| c.to_string()),
                req.method,
                req.uri.path(),
                status,
                upstream,
                elapsed.as_millis(),
                session.body_bytes_sent(),
                ctx.request_id,
                error,
            );
        }
        // Ends the in-flight count now rather than when the context drops.
        ctx.in_flight = None;
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host, and it must be a
/// valid authority (an empty one is allowed); HTTP/1.0 may leave it out.
fn check_host(req: &RequestHeader) -> std::result::Result<(), &'static str> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version == http::Version::HTTP_10 => Ok(()),
        (None, _) => Err("an HTTP/1.1 request needs a Host header"),
        (Some(_), Some(_)) => Err("more than one Host header"),
        (Some(host), None) => match host.to_str() {
            Ok("") => Ok(()),
            Ok(h) if h.parse::<http::uri::Authority>().is_ok() => Ok(()),
            _ => Err("the Host header is not a valid host"),
        },
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn http11_requests_need_one_valid_host() {
        let req = |version, hosts: &[&str]| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.set_version(version);
            for h in hosts {
                r.append_header("host", *h).unwrap();
            }
            r
        };
        assert!(check_host(&req(http::Version::HTTP_11, &["example.com:8080"])).is_ok());
        assert!(check_host(&req(http::Version::HTTP_11, &[""])).is_ok());
        assert!(check_host(&req(http::Version::HTTP_10, &[])).is_ok());
        assert!(check_host(&req(http::Version::HTTP_11, &[])).is_err());
        assert!(check_host(&req(http::Version::HTTP_11, &["a b"])).is_err());
        assert!(check_host(&req(http::Version::HTTP_11, &["a", "b"])).is_err());
    }
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        assert!(acceptable_request_id("r-123_abc.def:9"));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("a b"));
        assert!(!acceptable_request_id(&"x".repeat(129)));
    }
}
