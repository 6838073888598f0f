//! `GET /ws/chat?session_id=...`: one client socket.
//!
//! One task per socket runs a `select!` over the client's frames, its
//! `Reader` (the hub's deliveries, stall checks, stored pages; shared with
//! SSE), finished dispatches, a ping tick and shutdown.
//! Dispatches run in their own tasks so a slow AI node never blocks the
//! stream of another request on the same socket.

use crate::auth::{self, Caller};
use crate::chat::{cancel_chat, start_chat, ApiError, ChatBody};
use crate::follow::{Out, ResumeError};
use crate::keys::AuthError;
use crate::limits::{quota, SOCKET_RESUMES_PER_SEC, SOCKET_RESUME_BURST};
use crate::nodes::Accepted;
use crate::reader::{Reader, TooSlow};
use crate::App;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chat_wire::Event;
use futures::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// How long a closing socket waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Chats one socket may have in dispatch at once.
const MAX_DISPATCHING: usize = 4;
/// Answers one socket remembers having started (for the per-key token counts).
const MAX_STARTED: usize = 256;

pub mod close {
    /// The server is going away (shutdown, idle client).
    pub const GOING_AWAY: u16 = 1001;
    /// This backend lost its event store: reconnect (to another) and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// A frame larger than `limits.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The client read slower than its queue allows; it may reconnect and resume.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Keys are on and the socket presented none that is valid.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The session is another key's (told as if it did not exist).
    pub const UNKNOWN_SESSION: u16 = 4404;
}

#[derive(Debug, Deserialize)]
pub struct WsParams {
    session_id: Option<String>,
}

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Chat {
        message: String,
        #[serde(default)]
        user_id: Option<String>,
    },
    Resume {
        request_id: String,
        #[serde(default)]
        after_seq: u64,
    },
    /// Stops a running answer; its readers get a stored `cancelled` error.
    Cancel { request_id: String },
}

/// Parses one client text frame (public for the fuzz targets in `fuzz/`).
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, serde_json::Error> {
    serde_json::from_str(text)
}

pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let session_id = params.session_id.unwrap_or_default();
    if let Err(e) = chat_wire::validate_id("session_id", &session_id) {
        return ApiError::invalid(e).into_response();
    }
    if app.metrics.ws_active.get() as usize >= app.config.max_sockets
        || app.draining.load(std::sync::atomic::Ordering::Relaxed)
    {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "this backend takes no more sockets")
            .into_response();
    }
    let ip = app.limits.client_ip(peer, &headers);
    // A browser cannot send headers on a WebSocket: it offers `chat` and
    // `bearer.<key>` as subprotocols, and `chat` is the one chosen.
    let ws = ws.protocols(["chat"]);
    // Refusals come as close codes after the upgrade: a browser sees those,
    // never the status of a refused upgrade.
    let refusal = match auth::caller(&app, &headers).await {
        Err(AuthError::Unavailable) => Err((close::TRY_AGAIN_LATER, "the key store is unreachable; try again")),
        Err(e) => Err((close::UNAUTHORIZED, e.message())),
        Ok(caller) => match auth::own_session(&app, &caller, &session_id).await {
            Ok(()) => Ok(caller),
            Err(e) if e.status == StatusCode::NOT_FOUND => Err((close::UNKNOWN_SESSION, "no such session")),
            Err(_) => Err((close::TRY_AGAIN_LATER, "the key store is unreachable; try again")),
        },
    };
    let caller = match refusal {
        Ok(caller) => caller,
        Err((code, reason)) => return ws.on_upgrade(move |socket| refuse(socket, code, reason)),
    };
    // The transport accepts up to 4x the limit so an oversized frame is read
    // whole and answered with a clean 1009 (the limit itself is checked on
    // each message); past 4x the transport errors out and the socket is closed.
    let hard_cap = app.config.max_frame_bytes.saturating_mul(4);
    ws.max_message_size(hard_cap).max_frame_size(hard_cap).read_buffer_size(WS_READ_BUFFER).on_upgrade(
        move |socket| async move {
            let tracker = app.sockets.clone();
            tracker.track_future(serve(app, socket, session_id, caller, ip)).await
        },
    )
}

/// Read buffer of each socket. tungstenite's default (128 KiB) is zero-filled
/// on the first read, so every idle socket kept 128 KiB resident; client
/// frames are small (a chat message), and a larger one still grows the buffer.
const WS_READ_BUFFER: usize = 2 * 1024;

/// Counts the socket in `ws_active` while it lives.
struct Active(Arc<App>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.metrics.ws_active.dec();
    }
}

/// Closes a socket refused at the door with `code`.
async fn refuse(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
    let _ = tokio::time::timeout(CLOSE_LINGER, socket.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(CLOSE_LINGER, socket.next()).await;
}

async fn serve(app: Arc<App>, socket: WebSocket, session_id: String, caller: Caller, ip: IpAddr) {
    app.metrics.ws_active.inc();
    let _active = Active(app.clone());
    let (mut tx, mut rx) = socket.split();
    let mut reader = Reader::attach(&app, &session_id).await;
    // Boxed: a channel allocates a block of 32 slots up front, and every
    // socket has one (an unboxed slot is ~90 bytes, ~3 KB per idle socket).
    let (done_tx, mut done_rx) = mpsc::channel::<Box<(String, Result<Accepted, ApiError>)>>(MAX_DISPATCHING);
    let mut dispatching = 0usize;
    // Answers this socket started, whose tokens it counts for its key at their end.
    let mut started: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut resumes: Option<Box<DefaultDirectRateLimiter>> = None;
    // The first ping one interval after the upgrade, not at once: a socket
    // just opened is known to be alive.
    let ping_every = app.config.ws_ping_interval;
    let mut ping_tick = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    let shutdown = app.shutdown.clone();
    let mut evacuation = app.readiness.evacuation();

    let close = loop {
        // Everything to send in this turn, in order.
        let mut out: Vec<Outgoing> = Vec::new();
        tokio::select! {
            frame = rx.next() => {
                last_heard = Instant::now();
                match frame {
                    None => break None,
                    Some(Ok(Message::Close(_))) => {
                        // RFC 6455 §5.5.1: tungstenite has queued the echo of
                        // the client's close (its own code); send it, so the
                        // client sees a clean close, not a reset.
                        let _ = tokio::time::timeout(app.config.ws_send_timeout, tx.close()).await;
                        break None;
                    }
                    Some(Err(e)) if past_hard_cap(&e) => break Some((close::TOO_BIG, "frame too large")),
                    Some(Err(_)) => break None,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Text(t))) if t.len() > app.config.max_frame_bytes => break Some((close::TOO_BIG, "frame too large")),
                    Some(Ok(Message::Binary(b))) if b.len() > app.config.max_frame_bytes => break Some((close::TOO_BIG, "frame too large")),
                    Some(Ok(Message::Binary(_))) => out.push(invalid_frame("binary frames are not accepted; send JSON text")),
                    Some(Ok(Message::Text(text))) => match parse_client_frame(&text) {
                        Err(e) => out.push(invalid_frame(&format!("not a chat, resume or cancel frame: {e}"))),
                        Ok(ClientFrame::Chat { message, user_id }) => {
                            if dispatching >= MAX_DISPATCHING {
                                out.push(error_frame(None, "rate_limited", "too many chats in flight on this socket"));
                            } else {
                                let request_id = chat_wire::new_request_id();
                                reader.follower.expect(&request_id);
                                if caller.0.is_some() && started.len() < MAX_STARTED {
                                    started.insert(request_id.clone());
                                }
                                dispatching += 1;
                                let body = ChatBody { session_id: session_id.clone(), message, user_id };
                                let (app, done_tx, caller) = (app.clone(), done_tx.clone(), caller.clone());
                                tokio::spawn(async move {
                                    let result = start_chat(&app, &caller, ip, body, request_id.clone()).await;
                                    let _ = done_tx.send(Box::new((request_id, result))).await;
                                });
                            }
                        }
                        Ok(ClientFrame::Cancel { request_id }) => {
                            // The stored `cancelled` error reaches every reader, this one too.
                            if let Err(e) = cancel_chat(&app, &caller, &request_id).await {
                                out.push(error_frame(Some(&request_id), e.code, &e.message));
                            }
                        }
                        Ok(ClientFrame::Resume { request_id, after_seq }) => {
                            let socket_bucket = resumes.get_or_insert_with(|| {
                                Box::new(RateLimiter::direct(quota(SOCKET_RESUMES_PER_SEC, SOCKET_RESUME_BURST)))
                            });
                            if let Err(e) = chat_wire::validate_id("request_id", &request_id) {
                                out.push(invalid_frame(&e.to_string()));
                            } else if socket_bucket.check().is_err() || !app.limits.admit_resume(&session_id) {
                                app.metrics.resumes_limited.inc();
                                out.push(error_frame(Some(&request_id), "rate_limited", "too many resume frames; slow down"));
                            } else if !auth::owns_request(&app, &caller, &request_id).await {
                                out.push(error_frame(Some(&request_id), "unknown_request", "no such request, or it expired"));
                            } else {
                                match reader.follower.resume(&request_id, after_seq).await {
                                    Ok(replayed) => {
                                        app.metrics.events_replayed.inc_by(replayed.len() as u64);
                                        out.extend(replayed.into_iter().map(Outgoing::from));
                                    }
                                    Err(ResumeError::UnknownRequest) => out.push(error_frame(Some(&request_id), "unknown_request", "no such request, or it expired")),
                                    Err(ResumeError::StoreUnavailable) => out.push(error_frame(Some(&request_id), "store_unavailable", "the event store is unreachable; try again")),
                                }
                            }
                        }
                    },
                }
            }
            wake = reader.wake() => match reader.handle(wake).await {
                Ok(events) => out.extend(events.into_iter().map(Outgoing::from)),
                Err(TooSlow) => {
                    log::warn!("session_id={session_id} socket too slow; closing");
                    break Some((close::TRY_AGAIN_LATER, "reader too slow; reconnect and resume"));
                }
            },
            Some(done) = done_rx.recv() => {
                let (request_id, result) = *done;
                dispatching -= 1;
                match result {
                    Ok(accepted) => {
                        log::info!("request_id={request_id} session_id={session_id} node={} ws", accepted.node_url);
                        out.push(Outgoing::Frame(json!({"type": "accepted", "request_id": request_id, "node": accepted.node_url, "node_id": accepted.node_id, "backend": app.config.backend_id}).to_string()));
                        out.extend(reader.follower.start(&request_id).await.into_iter().map(Outgoing::from));
                    }
                    Err(e) => {
                        reader.follower.forget(&request_id);
                        started.remove(&request_id);
                        out.push(error_frame(Some(&request_id), e.code, &e.message));
                    }
                }
            }
            _ = ping_tick.tick() => {
                if last_heard.elapsed() > app.config.ws_client_timeout {
                    break Some((close::GOING_AWAY, "no frame from the client in time"));
                }
                out.push(Outgoing::Ping);
            }
            _ = shutdown.cancelled() => break Some((close::GOING_AWAY, "server shutting down")),
            // (The guard `wait_for` returns is dropped at once: it is not `Send`.)
            _ = async { drop(evacuation.wait_for(|lost| *lost).await) } => {
                break Some((close::SERVICE_RESTART, "this backend lost its event store; reconnect and resume"))
            }
        }
        out.extend(reader.follower.take_notices().into_iter().map(Outgoing::from));
        if out.is_empty() {
            continue;
        }
        let send_all = async {
            for o in out {
                let message = match o {
                    Outgoing::Ping => Message::Ping(Default::default()),
                    Outgoing::Frame(text) => Message::Text(Utf8Bytes::from(text)),
                    Outgoing::Event(e) => {
                        app.metrics.observe_delivery(e.ts_us);
                        if let (true, Some(key), Some(usage)) = (e.is_terminal(), &caller.0, e.usage) {
                            if started.remove(&e.request_id) {
                                app.metrics.charge(&key.id, usage);
                            }
                        }
                        Message::Text(Utf8Bytes::from(e.to_json()))
                    }
                };
                tx.feed(message).await?;
            }
            tx.flush().await
        };
        match tokio::time::timeout(app.config.ws_send_timeout, send_all).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break None,
            Err(_) => {
                app.metrics.slow_consumers.inc();
                break Some((close::TRY_AGAIN_LATER, "reader too slow; reconnect and resume"));
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
        let _ = tokio::time::timeout(app.config.ws_send_timeout, tx.send(Message::Close(Some(frame)))).await;
        // Wait briefly for the client's close, reading what it still sends: a
        // socket dropped with unread data answers with a reset, and the client
        // could lose the close frame (and its code) to it.
        let drain = async {
            let mut frames = 0;
            while let Some(frame) = rx.next().await {
                frames += 1;
                if frames > 64 || matches!(frame, Ok(Message::Close(_))) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
    }
}

/// Whether the transport refused a frame past its hard cap (tungstenite's
/// capacity error, under axum's error type).
fn past_hard_cap(e: &axum::Error) -> bool {
    let inner = std::error::Error::source(e).and_then(|s| s.downcast_ref::<tungstenite::Error>());
    matches!(inner, Some(tungstenite::Error::Capacity(_)))
}

/// One frame to send to the client.
enum Outgoing {
    Ping,
    /// A JSON text frame made here (`accepted`, a socket-level `error`).
    Frame(String),
    Event(Event),
}

impl From<Out> for Outgoing {
    fn from(out: Out) -> Outgoing {
        match out {
            Out::Event(e) => Outgoing::Event(e),
            Out::Notice { request_id, code, message } => error_frame(Some(&request_id), code, &message),
        }
    }
}

fn error_frame(request_id: Option<&str>, code: &str, message: &str) -> Outgoing {
    Outgoing::Frame(
        match request_id {
            Some(id) => json!({"type": "error", "request_id": id, "code": code, "message": message}),
            None => json!({"type": "error", "code": code, "message": message}),
        }
        .to_string(),
    )
}

fn invalid_frame(message: &str) -> Outgoing {
    error_frame(None, "invalid_frame", message)
}
