//! The lean HTTP/1.1 path: plain-HTTP client connections served by one task
//! each, with the upstream connection taken from a lock-only pool, the
//! request head and the first body bytes sent in one write, and the
//! response head and body passed back in one write. No channel, no spawned
//! task per request (a WebSocket's tunnel goes to the relay thread)
//! and no per-request allocation beyond the buffers a connection keeps.
//!
//! It serves what nearly all traffic is: HTTP/1.1 requests in origin form
//! with a known method, one valid `Host`, no body or a `Content-Length`
//! body, and WebSocket upgrades (tunnelled after the backend's `101`).
//! Anything else (malformed or unusual framing, chunked request bodies,
//! `Expect`, other methods and versions, heads over 16 KiB) is handed with
//! the bytes already read to Pingora's proxy ([`crate::edge`]), which then
//! serves the rest of that connection. TLS connections go there too.
//!
//! Behaviour is the same on both paths: routing, sticky selection and
//! retries, passive health, limits and deadlines, forwarding headers and
//! `X-Request-Id`, the access log, `stub_status` counters and metrics.

pub mod head;
pub mod pool;
mod relay;
mod tunnel;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use self::head::{Chunks, Field, Forwarding, Framing, Parsed, ParsedResponse, RawHeaders, Request};
use crate::sticky::{self, Headers};
use crate::upstreams::UpstreamGroup;
use crate::State;

/// Room kept free in the client's read buffer before each read: a head and
/// a body of a few KB arrive in one read (a smaller room split a 4 KB POST
/// into two reads and two upstream writes).
const MIN_READ: usize = 16 * 1024;

/// Room kept free in the backend's read buffer before each read: most
/// responses arrive whole in one read.
const UPSTREAM_READ: usize = 8 * 1024;

/// What the lean path did with a connection.
pub enum Served {
    /// The connection is finished.
    Done,
    /// Pingora's proxy serves the rest of it, starting with these bytes.
    Elsewhere(Stream, BytesMut),
    /// The backend switched protocols: the rest is a tunnel.
    Tunnel(Tunnel),
}

/// A WebSocket after the backend's `101`, handed to the relay thread: the
/// connection's task, sized for HTTP (its buffers, the request state, the
/// boxed futures around it), ends when the tunnel starts, so a frame wakes
/// no task and an open WebSocket holds only what the tunnel needs.
pub struct Tunnel {
    client: Stream,
    upstream: TcpStream,
    idle: Duration,
    _gauge: WebSocketGauge,
}

impl Tunnel {
    /// Starts passing bytes both ways until either side closes or the
    /// WebSocket idle time passes with nothing moving; `hold` is dropped
    /// when it ends.
    pub fn start(self, hold: impl Send + 'static) {
        let Tunnel { client, upstream, idle, _gauge } = self;
        let state = _gauge.0.clone();
        // The relay worker takes the tunnel while its relay thread reads its
        // inbox and its descriptors have room for it (the limit is each
        // process's own, the same in every worker). Between this process's
        // count falling and the relay's rising, the shared open count is
        // one low for each tunnel in flight.
        let outbox = state.worker.as_ref().and_then(|w| w.relay_outbox.as_ref());
        let hand_to = outbox
            .filter(|o| state.stats.relay_ready_in(o.worker) && state.stats.open_in(o.worker) < relay_capacity())
            .map(|o| &*o.socket);
        let handed_over = tunnel::start(client, upstream, idle, Box::new((_gauge, hold)), hand_to);
        if outbox.is_some() {
            let outcome = if handed_over { "handed_over" } else { "kept" };
            state.metrics.websocket_handoffs.with_label_values(&[outcome]).inc();
        }
    }
}

/// Open connections a relay worker may have and still take a tunnel: two
/// descriptors each, within its open-files limit, less a reserve for
/// listeners, health checks and the pool.
fn relay_capacity() -> i64 {
    static CAPACITY: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *CAPACITY.get_or_init(|| {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        (i64::try_from(soft).unwrap_or(i64::MAX) - 1024).max(0) / 2
    })
}

/// Takes tunnels handed over by sibling workers on `socket` into this
/// process's relay thread, counting each as an open connection and
/// WebSocket here (see [`relay`]). Call before serving.
pub fn relay_for_siblings(state: &Arc<State>, socket: std::os::unix::net::UnixDatagram) {
    let ready = state.stats.relay_ready;
    let state = state.clone();
    let adopt = Box::new(move || -> Box<dyn Send> {
        Box::new((WebSocketGauge::open(state.clone()), crate::connections::OpenConnection::open(state.clone())))
    });
    relay::Relay::start_with_inbox(relay::Inbox { socket, adopt, ready });
}

/// The lean path's shared part.
pub struct Lean {
    /// Configuration, upstreams and counters.
    state: Arc<State>,
    /// Idle upstream connections.
    pool: pool::Pool,
}

/// How a request ended, for the connection loop.
enum Next {
    /// Read the next request.
    Keep,
    /// Close the connection.
    Close,
    /// The backend switched protocols: tunnel bytes both ways.
    Tunnel(TcpStream),
}

/// One connection's reusable buffers and facts.
struct Conn {
    /// The client.
    stream: Stream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// Bytes read from the backend and not yet passed on.
    up: BytesMut,
    /// What is about to be written (a head and the first body bytes).
    out: Vec<u8>,
    /// The TCP peer.
    peer: IpAddr,
    /// The peer as text, for the forwarding headers and the sticky key.
    peer_text: String,
    /// Scratch for `X-Forwarded-For`.
    forwarded_for: String,
    /// The request metrics of the group last routed to.
    metrics: Option<Arc<crate::metrics::GroupMetrics>>,
    /// Parsed header ranges, reused from request to request.
    fields: Vec<Field>,
    /// The process is shutting down: answer with `Connection: close`.
    draining: bool,
    /// Says when the process starts shutting down.
    shutdown: ShutdownWatch,
}

/// Per-request facts for the answer and the log.
struct Exchange {
    start: Instant,
    request_id: RequestId,
    client: IpAddr,
    group: Option<Arc<UpstreamGroup>>,
    upstream: Option<SocketAddr>,
    status: u16,
    bytes: u64,
    method: head::Method,
    path: String,
}

/// `X-Request-Id`, the client's when acceptable, else a new UUID; kept
/// inline, the head it came from is overwritten by later reads.
struct RequestId {
    bytes: [u8; 128],
    len: usize,
}

impl RequestId {
    fn new(given: Option<&[u8]>) -> Self {
        let mut id = RequestId { bytes: [0; 128], len: 0 };
        match given.filter(|v| acceptable_request_id(v)) {
            Some(v) => {
                id.bytes[..v.len()].copy_from_slice(v);
                id.len = v.len();
            }
            None => {
                let uuid = uuid::Uuid::new_v4();
                id.len = uuid.hyphenated().encode_lower(&mut id.bytes[..36]).len();
            }
        }
        id
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Same rule as Pingora's path: 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn acceptable_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Why an exchange failed, and whose fault it was.
enum Failure {
    /// The client went away or broke the protocol: nobody to answer.
    Client,
    /// The client was too slow sending its body.
    ClientTimeout,
    /// The backend failed before its response started.
    Upstream { status: u16, code: &'static str, message: &'static str },
    /// The backend failed after its response started: the connection closes.
    UpstreamMidway,
}

impl Lean {
    /// The lean path over `state`.
    pub fn new(state: Arc<State>) -> Self {
        let server = &state.config.server;
        let pool = pool::Pool::new(server.upstream_keepalive_pool, !server.work_stealing);
        Self { state, pool }
    }

    /// Serves a plain-HTTP client connection whose first bytes, if any,
    /// were read already (`prefix`: what followed a PROXY protocol header).
    pub async fn serve(&self, stream: Stream, prefix: BytesMut, shutdown: &ShutdownWatch) -> Served {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut conn = Conn {
            stream,
            buf: if prefix.is_empty() { BytesMut::with_capacity(MIN_READ) } else { prefix },
            up: BytesMut::new(),
            out: Vec::new(),
            peer,
            peer_text: peer.to_string(),
            forwarded_for: String::new(),
            metrics: None,
            fields: Vec::new(),
            draining: *shutdown.borrow(),
            shutdown: shutdown.clone(),
        };
        let mut shutdown = shutdown.clone();
        let stats = &self.state.stats;
        stats.reading.fetch_add(1, Ordering::Relaxed);
        let mut reading = true;
        let mut first = true;
        let served = loop {
            let head = self.read_head(&mut conn, first, &mut shutdown).await;
            if std::mem::take(&mut reading) {
                stats.reading.fetch_sub(1, Ordering::Relaxed);
            }
            let req = match head {
                Ok(Parsed::Request(req)) => req,
                Ok(Parsed::Elsewhere) => break Served::Elsewhere(conn.stream, conn.buf),
                Ok(Parsed::Partial) | Err(_) => break Served::Done,
            };
            first = false;
            match self.exchange(&mut conn, req).await {
                Next::Keep => continue,
                Next::Close => break Served::Done,
                Next::Tunnel(upstream) => {
                    break Served::Tunnel(Tunnel {
                        client: conn.stream,
                        upstream,
                        idle: self.state.config.websocket_idle_timeout,
                        _gauge: WebSocketGauge::open(self.state.clone()),
                    });
                }
            }
        };
        served
    }

    /// Reads until `conn.buf` starts with a whole request head (or what is
    /// there is for Pingora's path). `Err` when the connection should close:
    /// the client left, sent nothing for the keep-alive time, or not a whole
    /// head within the header deadline.
    async fn read_head(&self, conn: &mut Conn, first: bool, shutdown: &mut ShutdownWatch) -> io::Result<Parsed> {
        let client = &self.state.config.client;
        let mut header_deadline = None;
        loop {
            if !conn.buf.is_empty() {
                match head::parse_request(&conn.buf, std::mem::take(&mut conn.fields)) {
                    Parsed::Partial => {}
                    done => return Ok(done),
                }
            }
            if conn.buf.is_empty() && !first {
                // Between requests: wait for the next one, closing after the
                // keep-alive time. While the process drains (the grace
                // period, after which Pingora drops every task), a client
                // that sends one more request is answered with `Connection:
                // close` rather than losing it to a connection closed under it.
                let idle = if conn.draining { self.state.config.server.grace_period } else { client.keepalive_timeout };
                tokio::select! {
                    biased;
                    read = read_some(&mut conn.stream, &mut conn.buf, MIN_READ) => {
                        if read? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    _ = tokio::time::sleep(idle) => return Err(io::ErrorKind::TimedOut.into()),
                    _ = shutdown.changed(), if !conn.draining => conn.draining = true,
                }
                continue;
            }
            let deadline = *header_deadline.get_or_insert_with(|| tokio::time::Instant::now() + client.header_timeout);
            match tokio::time::timeout_at(deadline, read_some(&mut conn.stream, &mut conn.buf, MIN_READ)).await {
                Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    if first {
                        self.state.metrics.rejected.with_label_values(&["header_timeout"]).inc();
                        log::info!("request header not complete within {:?}, closing", client.header_timeout);
                    }
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
        }
    }

    /// Serves one request whose head is at the start of `conn.buf`.
    async fn exchange(&self, conn: &mut Conn, mut req: Request) -> Next {
        conn.draining |= *conn.shutdown.borrow();
        let state = &self.state;
        let config = &state.config;
        state.stats.requests.fetch_add(1, Ordering::Relaxed);
        state.stats.writing.fetch_add(1, Ordering::Relaxed);
        let _writing = Writing(state);

        let headers = RawHeaders { buf: &conn.buf, fields: &req.fields };
        let given_id = req.fields.iter().find(|f| f.kind == head::Kind::RequestId).map(|f| &conn.buf[f.value.clone()]);
        let target = &conn.buf[req.target.clone()];
        let path_end = target.iter().position(|b| *b == b'?').unwrap_or(target.len());
        let path = std::str::from_utf8(&target[..path_end]).unwrap_or("/");
        let mut ex = Exchange {
            start: Instant::now(),
            request_id: RequestId::new(given_id),
            client: sticky::client_ip(conn.peer, &headers, &config.client.trusted_proxies),
            group: None,
            upstream: None,
            status: 0,
            bytes: 0,
            method: req.method,
            path: if log::log_enabled!(target: "access", log::Level::Info) { path.to_string() } else { String::new() },
        };
        let closing = req.close || conn.draining || config.client.keepalive_timeout.is_zero();

        let refusal = if !state.limiter.allow(ex.client) {
            state.metrics.rejected.with_label_values(&["rate_limit"]).inc();
            Some((429, "rate_limited", "too many requests", false))
        } else if req.body > config.client.max_body_bytes {
            state.metrics.rejected.with_label_values(&["body_too_large"]).inc();
            // The body is left unread: the connection cannot carry another request.
            Some((413, "payload_too_large", "request body too large", true))
        } else {
            ex.group = config.route(path).and_then(|name| state.upstreams.get(name)).cloned();
            ex.group.is_none().then_some((404, "not_found", "no route for this path", false))
        };
        if let Some((status, code, message, must_close)) = refusal {
            let close = closing || must_close;
            // A refused request's body, when it is already here, is skipped;
            // otherwise the connection closes rather than read it.
            let skip = req.len as u64 + req.body;
            let close = close || (conn.buf.len() as u64) < skip;
            if !close {
                conn.buf.advance(skip as usize);
            }
            ex.status = status;
            let next = self.answer(conn, &mut ex, status, code, message, close).await;
            self.finish(conn, &ex);
            return next;
        }
        let group = ex.group.clone().expect("routed above");
        let key = match &config.sticky {
            sticky::StickyKey::Ip if ex.client == conn.peer => conn.peer_text.as_bytes().to_vec(),
            rule => rule.hash_input(ex.client, &headers),
        };

        // The backend's head: the client's end-to-end headers and ours.
        let trusted = sticky::is_trusted(conn.peer, &config.client.trusted_proxies);
        let mut forwarded_for = std::mem::take(&mut conn.forwarded_for);
        forwarded_for.clear();
        if trusted {
            if let Some(chain) = headers.first("x-forwarded-for").and_then(|v| std::str::from_utf8(v).ok()) {
                if !chain.trim().is_empty() {
                    forwarded_for.push_str(chain);
                    forwarded_for.push_str(", ");
                }
            }
        }
        forwarded_for.push_str(&conn.peer_text);
        let client_text = if ex.client == conn.peer { None } else { Some(ex.client.to_string()) };
        let proto: &[u8] = match headers.first("x-forwarded-proto") {
            Some(p) if trusted && (p == b"http" || p == b"https") => p,
            _ => b"http",
        };
        conn.out.clear();
        head::write_upstream_request(
            &mut conn.out,
            &conn.buf,
            &req,
            &Forwarding {
                forwarded_for: forwarded_for.as_bytes(),
                real_ip: client_text.as_deref().unwrap_or(&conn.peer_text).as_bytes(),
                proto,
                request_id: ex.request_id.as_bytes(),
            },
        );
        let in_buf = (conn.buf.len() - req.len).min(req.body as usize);
        conn.out.extend_from_slice(&conn.buf[req.len..req.len + in_buf]);
        conn.buf.advance(req.len + in_buf);
        let body_left = req.body - in_buf as u64;
        conn.fields = std::mem::take(&mut req.fields);
        conn.forwarded_for = forwarded_for;

        let result = self.forward(conn, &req, &mut ex, &group, &key, body_left, closing).await;
        let next = match result {
            Ok(next) => next,
            Err(Failure::Client) => Next::Close,
            Err(Failure::ClientTimeout) => {
                state.metrics.rejected.with_label_values(&["body_timeout"]).inc();
                ex.status = 408;
                self.answer(conn, &mut ex, 408, "request_timeout", "request body timed out", true).await
            }
            Err(Failure::Upstream { status, code, message }) => {
                ex.status = status;
                self.answer(conn, &mut ex, status, code, message, true).await
            }
            Err(Failure::UpstreamMidway) => Next::Close,
        };
        self.finish(conn, &ex);
        next
    }

    /// Picks a backend, sends the request and passes the response back.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        conn: &mut Conn,
        req: &Request,
        ex: &mut Exchange,
        group: &Arc<UpstreamGroup>,
        key: &[u8],
        body_left: u64,
        closing: bool,
    ) -> Result<Next, Failure> {
        let state = &self.state;
        let config = group.config();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut fresh_only = false;
        loop {
            let Some(addr) = group.select_counted(key, &tried) else {
                return Err(Failure::Upstream { status: 503, code: "no_backend", message: "no backend available" });
            };
            if !tried.is_empty() && !fresh_only {
                state.metrics.retries.with_label_values(&[group.name()]).inc();
            }
            tried.push(addr);
            ex.upstream = Some(addr);

            // A pooled connection, unless the last one turned out closed.
            let pooled = if fresh_only { None } else { self.pool.take(addr) };
            // Before a body that cannot be sent twice, check that the pooled
            // connection is still open (the backend may have closed it idle).
            let pooled = pooled.filter(|c| (req.method.idempotent() && body_left == 0) || still_open(c));
            let reused = pooled.is_some();
            let mut upstream = match pooled {
                Some(c) => c,
                None => match connect(addr, config.connect_timeout).await {
                    Ok(c) => c,
                    Err(e) if local_shortage(&e) => {
                        // Out of descriptors or ports here: no backend is to blame.
                        log::warn!("upstream {}: cannot open a connection to {addr}: {e}", group.name());
                        return Err(Failure::Upstream {
                            status: 503,
                            code: "overloaded",
                            message: "the proxy is out of connections; retry",
                        });
                    }
                    Err(e) => {
                        let timed_out = e.kind() == io::ErrorKind::TimedOut;
                        log::warn!("upstream {}: connect to {addr} failed: {e}", group.name());
                        state.record_upstream_failure(group, addr);
                        fresh_only = false;
                        if tried.len() <= state.config.server.max_retries {
                            continue;
                        }
                        return Err(if timed_out {
                            Failure::Upstream { status: 504, code: "upstream_timeout", message: "backend timed out" }
                        } else {
                            Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" }
                        });
                    }
                },
            };

            // The head and the body bytes already here, in one write.
            let sent = timeout(config.read_timeout, upstream.write_all(&conn.out)).await;
            if !matches!(sent, Ok(Ok(()))) {
                if reused {
                    // A closed pooled connection says nothing about the backend.
                    tried.pop();
                    fresh_only = true;
                    continue;
                }
                state.record_upstream_failure(group, addr);
                return Err(Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" });
            }
            if body_left > 0 {
                self.send_body(conn, &mut upstream, body_left, config.read_timeout).await?;
            }

            // The response head.
            conn.up.clear();
            let response = loop {
                match timeout(config.read_timeout, read_some(&mut upstream, &mut conn.up, UPSTREAM_READ)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    outcome => {
                        let nothing_back = conn.up.is_empty();
                        if reused && nothing_back && body_left == 0 && req.method.idempotent() && outcome.is_ok() {
                            tried.pop();
                            fresh_only = true;
                            break None;
                        }
                        state.record_upstream_failure(group, addr);
                        return Err(if outcome.is_err() {
                            Failure::Upstream { status: 504, code: "upstream_timeout", message: "backend timed out" }
                        } else {
                            Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" }
                        });
                    }
                }
                conn.out.clear();
                match head::parse_response(
                    &conn.up,
                    req.method == head::Method::Head,
                    ex.request_id.as_bytes(),
                    closing,
                    &mut conn.out,
                ) {
                    ParsedResponse::Partial => continue,
                    ParsedResponse::Invalid => {
                        state.record_upstream_failure(group, addr);
                        return Err(Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" });
                    }
                    ParsedResponse::Response(r) if (100..200).contains(&r.status) && r.status != 101 => {
                        // An interim response the client did not ask for (no Expect).
                        conn.up.advance(r.len);
                        continue;
                    }
                    ParsedResponse::Response(r) => break Some(r),
                }
            };
            let Some(response) = response else { continue };
            ex.status = response.status;

            if response.status == 101 {
                if !req.websocket {
                    state.record_upstream_failure(group, addr);
                    return Err(Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" });
                }
                // The tunnel starts with what either side sent past its head.
                conn.out.extend_from_slice(&conn.up[response.len..]);
                if !conn.buf.is_empty() && upstream.write_all(&conn.buf).await.is_err() {
                    return Err(Failure::UpstreamMidway);
                }
                conn.buf.clear();
                write_client(&mut conn.stream, &conn.out).await?;
                ex.bytes += conn.out.len() as u64;
                return Ok(Next::Tunnel(upstream));
            }
            // The head and the body bytes already here, in one write.
            conn.up.advance(response.len);
            let mut chunks = Chunks::Size;
            let mut left = match response.framing {
                Framing::Length(n) => n,
                _ => 0,
            };
            let mut done = take_body(&mut conn.up, response.framing, &mut left, &mut chunks, &mut conn.out)?;
            write_client(&mut conn.stream, &conn.out).await?;
            ex.bytes += conn.out.len() as u64;

            while !done {
                match timeout(config.read_timeout, read_some(&mut upstream, &mut conn.up, UPSTREAM_READ)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) if response.framing == Framing::Close => break,
                    outcome => {
                        log::info!(
                            "upstream {}: {addr} ended its response early ({})",
                            group.name(),
                            if outcome.is_err() { "timed out" } else { "closed" }
                        );
                        state.record_upstream_failure(group, addr);
                        return Err(Failure::UpstreamMidway);
                    }
                }
                conn.out.clear();
                done = take_body(&mut conn.up, response.framing, &mut left, &mut chunks, &mut conn.out)?;
                if !conn.out.is_empty() {
                    write_client(&mut conn.stream, &conn.out).await?;
                    ex.bytes += conn.out.len() as u64;
                }
            }
            let reusable = response.framing != Framing::Close && !response.close && conn.up.is_empty();
            if reusable {
                self.pool.put(addr, upstream);
            }
            let close = closing || response.framing == Framing::Close;
            return Ok(if close { Next::Close } else { Next::Keep });
        }
    }

    /// Streams the rest of a `Content-Length` body from the client to the backend.
    async fn send_body(
        &self,
        conn: &mut Conn,
        upstream: &mut TcpStream,
        mut left: u64,
        write_timeout: Duration,
    ) -> Result<(), Failure> {
        let body_timeout = self.state.config.client.body_timeout;
        while left > 0 {
            if conn.buf.is_empty() {
                match timeout(body_timeout, read_some(&mut conn.stream, &mut conn.buf, MIN_READ)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Err(Failure::Client),
                    Err(_) => return Err(Failure::ClientTimeout),
                }
            }
            let take = (conn.buf.len() as u64).min(left) as usize;
            match timeout(write_timeout, upstream.write_all(&conn.buf[..take])).await {
                Ok(Ok(())) => {}
                _ => return Err(Failure::Upstream { status: 502, code: "bad_gateway", message: "backend failed" }),
            }
            conn.buf.advance(take);
            left -= take as u64;
        }
        Ok(())
    }

    /// Answers with the proxy's own JSON error.
    async fn answer(
        &self,
        conn: &mut Conn,
        ex: &mut Exchange,
        status: u16,
        code: &str,
        message: &str,
        close: bool,
    ) -> Next {
        let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
        let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        conn.out.clear();
        use std::io::Write;
        let _ = write!(
            conn.out,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: ",
            body.len()
        );
        conn.out.extend_from_slice(ex.request_id.as_bytes());
        conn.out.extend_from_slice(b"\r\n");
        if status == 429 {
            conn.out.extend_from_slice(b"Retry-After: 1\r\n");
        }
        if close {
            conn.out.extend_from_slice(b"Connection: close\r\n");
        }
        conn.out.extend_from_slice(b"\r\n");
        conn.out.extend_from_slice(body.as_bytes());
        ex.bytes += conn.out.len() as u64;
        match write_client(&mut conn.stream, &conn.out).await {
            Ok(()) if !close => Next::Keep,
            Ok(()) => {
                linger(&mut conn.stream, &mut conn.buf).await;
                Next::Close
            }
            Err(_) => Next::Close,
        }
    }

    /// Metrics and the access line of a finished request.
    fn finish(&self, conn: &mut Conn, ex: &Exchange) {
        let metrics = &self.state.metrics;
        let name = ex.group.as_ref().map_or("-", |g| g.name());
        let elapsed = ex.start.elapsed();
        if conn.metrics.as_ref().is_none_or(|m| m.name() != name) {
            conn.metrics = Some(metrics.group(name));
        }
        if let Some(m) = &conn.metrics {
            m.observe(metrics, ex.status, elapsed.as_secs_f64());
        }
        if log::log_enabled!(target: "access", log::Level::Info) {
            log::info!(
                target: "access",
                "client={} method={} path={} status={} upstream={} duration_ms={} bytes={} request_id={}",
                ex.client,
                ex.method.as_str(),
                ex.path,
                ex.status,
                ex.upstream.map_or_else(|| "-".to_string(), |a| a.to_string()),
                elapsed.as_millis(),
                ex.bytes,
                String::from_utf8_lossy(ex.request_id.as_bytes()),
            );
        }
    }
}

/// Moves the body bytes in `up` that belong to this response into `out`;
/// true once the body is complete.
fn take_body(
    up: &mut BytesMut,
    framing: Framing,
    left: &mut u64,
    chunks: &mut Chunks,
    out: &mut Vec<u8>,
) -> Result<bool, Failure> {
    let take = match framing {
        Framing::Empty => 0,
        Framing::Length(_) => (up.len() as u64).min(*left) as usize,
        Framing::Chunked => chunks.advance(up).map_err(|()| Failure::UpstreamMidway)?,
        Framing::Close => up.len(),
    };
    out.extend_from_slice(&up[..take]);
    up.advance(take);
    Ok(match framing {
        Framing::Empty => true,
        Framing::Length(_) => {
            *left -= take as u64;
            *left == 0
        }
        Framing::Chunked => *chunks == Chunks::Done,
        Framing::Close => false,
    })
}

/// Reads what is there into `buf`, with room for at least `room` bytes.
async fn read_some<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut BytesMut,
    room: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < room {
        buf.reserve(room);
    }
    stream.read_buf(buf).await
}

/// Closes the sending side, then reads and drops what the client still
/// sends (a refused body) for a moment, like nginx's lingering close:
/// closing with unread bytes would send a reset, and the client could lose
/// the answer to it.
async fn linger(stream: &mut Stream, buf: &mut BytesMut) {
    const LINGER: Duration = Duration::from_secs(2);
    const MAX_DRAINED: usize = 1 << 20;
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut drained = 0;
    while drained < MAX_DRAINED {
        buf.clear();
        match tokio::time::timeout_at(deadline, read_some(stream, buf, MIN_READ)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// Writes to the client; a failure means the client left.
async fn write_client(stream: &mut Stream, bytes: &[u8]) -> Result<(), Failure> {
    stream.write_all(bytes).await.map_err(|_| Failure::Client)?;
    stream.flush().await.map_err(|_| Failure::Client)
}

/// A new connection to a backend, with Nagle off.
async fn connect(addr: SocketAddr, within: Duration) -> io::Result<TcpStream> {
    let stream =
        timeout(within, TcpStream::connect(addr)).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connect that failed for want of local resources (descriptors, memory,
/// ports), which says nothing about the backend.
fn local_shortage(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 99))
}

/// Whether a pooled connection is still open: nothing to read yet (a closed
/// one reads end-of-file, a confused one has bytes waiting).
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Keeps `stub_status` Writing right however a request ends.
struct Writing<'a>(&'a State);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.stats.writing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts an open tunnel in the WebSocket gauge.
struct WebSocketGauge(Arc<State>);

impl WebSocketGauge {
    fn open(state: Arc<State>) -> Self {
        state.metrics.websockets_active.inc();
        Self(state)
    }
}

impl Drop for WebSocketGauge {
    fn drop(&mut self) {
        self.0.metrics.websockets_active.dec();
    }
}
