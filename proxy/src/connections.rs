//! Client connections: the connection limit and the nginx `stub_status`
//! connection counts, then the lean HTTP/1.1 path ([`crate::h1`]) for plain
//! connections, or Pingora's HTTP proxy for TLS and for whatever the lean
//! path hands over. In front of Pingora's proxy: keepalive, and the
//! whole-header deadline that cuts slowloris clients (Pingora's own read
//! timeout restarts on every byte, so a trickling client would never time out).

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use crate::h1::{Lean, Served};
use crate::{proxy_protocol, sticky, State};

/// Marks that a request's header has been read, so the deadline no longer
/// applies. Handed to the proxy through the session's connection context;
/// Pingora returns it to [`crate::edge::Edge`] right after the header is read.
pub struct HeaderToken {
    /// Set once the header has been read (or the request ended).
    done: AtomicBool,
    /// Whether this request counts as `Reading` in `stub_status` until done.
    counted_reading: bool,
    /// Where `Reading` is counted.
    state: Arc<State>,
}

impl HeaderToken {
    /// Records that the header phase is over (idempotent).
    pub fn finish(&self) {
        if !self.done.swap(true, Ordering::AcqRel) && self.counted_reading {
            self.state.stats.reading.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Marker kept between requests of one connection, so the next request
/// knows it arrives on a reused (keepalive) connection.
pub struct Reused;

/// The per-connection layer: limit and counts, then the HTTP layer.
pub struct Connections<A> {
    /// The lean path, unless `server.fast_path` is off.
    lean: Option<Lean>,
    /// The per-request layer in front of Pingora's proxy.
    requests: Arc<Requests<A>>,
}

impl<A> Connections<A> {
    /// Wraps `proxy` (Pingora's `HttpProxy`).
    pub fn new(proxy: A, state: Arc<State>) -> Self {
        let lean = state.config.server.fast_path.then(|| Lean::new(state.clone()));
        Self { lean, requests: Arc::new(Requests { proxy: Arc::new(proxy), state }) }
    }
}

/// How often the timer anchor ([`anchor_timers`]) wakes.
const ANCHOR_PERIOD: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`ANCHOR_PERIOD`] on the calling thread's
/// runtime (started once per thread, ended by `shutdown`). Tokio's timer
/// wheel writes to its driver's eventfd whenever a new timer is due before
/// the earliest one it will wake for, whether or not the thread is asleep;
/// with per-request deadlines of seconds and no earlier timer, that is one
/// `write` for most requests. With the anchor due sooner, a request's
/// deadline never is the earliest.
fn anchor_timers(shutdown: &ShutdownWatch) {
    thread_local! {
        static ANCHORED: Cell<bool> = const { Cell::new(false) };
    }
    if ANCHORED.with(|a| a.replace(true)) {
        return;
    }
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        while !*shutdown.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(ANCHOR_PERIOD) => {}
                changed = shutdown.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Counts an open client connection until dropped, however it ends.
pub(crate) struct OpenConnection(Arc<State>);

impl OpenConnection {
    pub(crate) fn open(state: Arc<State>) -> Self {
        state.stats.active.fetch_add(1, Ordering::Relaxed);
        state.metrics.connections_active.inc();
        Self(state)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections_active.dec();
    }
}

#[async_trait]
impl<A> ServerApp for Connections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        anchor_timers(shutdown);
        let state = &self.requests.state;
        state.stats.accepts.fetch_add(1, Ordering::Relaxed);
        state.metrics.connections_accepted.inc();
        let guard = OpenConnection::open(state.clone());
        if state.stats.open_connections() > state.config.client.max_connections as i64 {
            // Like nginx: accepted, not handled, closed without an answer.
            state.metrics.rejected.with_label_values(&["connection_limit"]).inc();
            log::warn!("connection limit {} reached, closing a new connection", state.config.client.max_connections);
            return None;
        }
        state.stats.handled.fetch_add(1, Ordering::Relaxed);
        let plain = stream.get_ssl_digest().is_none();
        // A trusted balancer's connection starts with the PROXY protocol
        // header naming the client; the bytes after it start the request.
        let mut prefix = BytesMut::new();
        let from_balancer = !state.config.client.proxy_protocol_from.is_empty()
            && plain
            && stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
                .is_some_and(|ip| sticky::is_trusted(ip, &state.config.client.proxy_protocol_from));
        if from_balancer {
            match proxy_protocol::accept(&mut stream, state.config.client.header_timeout).await {
                Ok(rest) => prefix = rest,
                Err(e) => {
                    state.metrics.rejected.with_label_values(&["proxy_protocol"]).inc();
                    log::info!("closing a connection from a PROXY protocol peer: {e}");
                    return None;
                }
            }
        }
        let out = match &self.lean {
            Some(lean) if plain => match lean.serve(stream, prefix, shutdown).await {
                Served::Done => None,
                Served::Tunnel(tunnel) => {
                    // The connection stays counted as open until its tunnel ends.
                    tunnel.start(guard);
                    return None;
                }
                Served::Elsewhere(stream, prefix) => self.requests.serve_http1(stream, prefix, shutdown).await,
            },
            _ if !prefix.is_empty() => self.requests.serve_http1(stream, prefix, shutdown).await,
            _ => self.requests.process_new(stream, shutdown).await,
        };
        drop(guard);
        out
    }

    async fn cleanup(&self) {
        self.requests.proxy.http_cleanup().await;
    }
}

/// The per-request layer in front of the proxy.
pub struct Requests<A> {
    /// Pingora's HTTP proxy.
    proxy: Arc<A>,
    /// Shared state (config, counters).
    state: Arc<State>,
}

impl<A> Requests<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Serves an HTTP/1 connection whose first bytes were already read
    /// (`prefix`), request after request, like Pingora's own loop.
    async fn serve_http1(
        self: &Arc<Self>,
        stream: Stream,
        prefix: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut session = ServerSession::new_http1(stream);
        if !prefix.is_empty() {
            session.set_pipelined_prefix(prefix);
        }
        let mut result = self.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(ReusedHttpStream::consume) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.process_new_http(session, shutdown).await;
        }
        None
    }
}

#[async_trait]
impl<A> HttpServerApp for Requests<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if session.is_http2() {
            // HTTP/2 streams carry no per-connection context to signal the
            // end of the header; h2 is not offered, but never cut a stream.
            return self.proxy.process_new_http(session, shutdown).await;
        }
        let client = &self.state.config.client;
        // Requests pipelined behind this one are answered in order (Pingora
        // carries the bytes read past this request to the next session).
        session.set_pipelining_enabled(true);
        let reused =
            session.take_connection_user_context().is_some_and(|ctx: Box<dyn Any + Send + Sync>| ctx.is::<Reused>());
        if *shutdown.borrow() || client.keepalive_timeout.is_zero() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(client.keepalive_timeout.as_secs().max(1)));
        }
        session.set_read_timeout(Some(client.header_timeout));

        // A reused connection may first sit idle for the keepalive time.
        let deadline = if reused { client.keepalive_timeout + client.header_timeout } else { client.header_timeout };
        if !reused {
            self.state.stats.reading.fetch_add(1, Ordering::Relaxed);
        }
        let token =
            Arc::new(HeaderToken { done: AtomicBool::new(false), counted_reading: !reused, state: self.state.clone() });
        session.set_connection_user_context(Some(Box::new(token.clone())));

        let request = self.proxy.process_new_http(session, shutdown);
        tokio::pin!(request);
        let out = tokio::select! {
            out = &mut request => out,
            _ = tokio::time::sleep(deadline) => {
                if token.is_done() {
                    request.await
                } else {
                    if !reused {
                        self.state.metrics.rejected.with_label_values(&["header_timeout"]).inc();
                        log::info!("request header not complete within {:?}, closing", client.header_timeout);
                    }
                    None
                }
            }
        };
        token.finish();
        out
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        self.proxy.h2_options()
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
