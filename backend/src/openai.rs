//! The OpenAI-compatible face: `POST /v1/chat/completions` (streamed as
//! OpenAI's SSE chunks ending with `data: [DONE]`, or whole), `GET
//! /v1/models`, and errors in OpenAI's shape, so OpenAI's SDKs work
//! unchanged against the proxy.
//!
//! An answer here is an ordinary request of the chat service: it has a
//! `request_id` and a session, is produced by an AI node, stored and
//! published like any other, and can be followed or resumed through
//! `/ws/chat` and `/api/chat/{request_id}/events` too. The session is the
//! `X-Session-Id` header, else the `user` field, else a new one; it is sent
//! back in `X-Session-Id`. Only the last message (a `user` one) is the
//! prompt: the session's earlier turns are the history the node keeps, not
//! the client's copies. The completion id is `chatcmpl-<request_id>`; each
//! SSE chunk carries the event's seq as its `id`, and a dropped stream
//! resumes at `GET /v1/chat/completions/{id}/events` with `Last-Event-ID`,
//! on any backend.

use crate::auth::Caller;
use crate::chat::{start_chat, ChatBody};
use crate::errors::{error_body, ApiError, OpenAiError};
use crate::follow::Out;
use crate::reader::{follow_one, Item, Reader};
use crate::resume::{last_event_id, open_resume};
use crate::App;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chat_wire::{Event, EventKind, Usage};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

/// The `/v1` routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/chat/completions/{id}/events", get(resume))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/{*rest}", axum::routing::any(|| async { OpenAiError(ApiError::not_found()) }))
}

fn bad_request(message: impl Into<String>) -> OpenAiError {
    OpenAiError(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message))
}

/// A chat completion request. Fields OpenAI defines that do not change
/// what this gateway does (`temperature`, `max_tokens`, ...) are accepted
/// and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or parts of which the `text` ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> Result<String, OpenAiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(bad_request(format!("content parts of type {kind:?} are not supported")))
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

/// One answer being produced: what every chunk repeats.
#[derive(Clone)]
struct Completion {
    id: String,
    model: String,
    created: u64,
    /// The API key whose answer this reader started (its tokens go to the metrics).
    charge: Option<String>,
}

impl Completion {
    fn new(request_id: &str, model: String) -> Completion {
        let created = chat_wire::now_micros() / 1_000_000;
        Completion { id: format!("chatcmpl-{request_id}"), model, created, charge: None }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, include_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(usage),
        })
    }
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    })
}

/// The request id inside a completion id (`chatcmpl-r-...`), or the id itself.
fn request_id_of(completion_id: &str) -> &str {
    completion_id.strip_prefix("chatcmpl-").unwrap_or(completion_id)
}

async fn completions(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    payload: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let Json(req) = payload?;
    if !app.config.openai_models.contains(&req.model) {
        let message = format!("the model {:?} does not exist; GET /v1/models lists the models", req.model);
        let body = error_body(StatusCode::NOT_FOUND, "model_not_found", &message, Some("model"));
        return Ok((StatusCode::NOT_FOUND, Json(body)).into_response());
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n = 1 is supported"));
    }
    let Some(last) = req.messages.last() else { return Err(bad_request("messages must not be empty")) };
    if last.role != "user" {
        return Err(bad_request(format!("the last message must have role \"user\", not {:?}", last.role)));
    }
    let message = match &last.content {
        Some(content) => content.text()?,
        None => return Err(bad_request("the last message has no content")),
    };
    let session_id = match (headers.get("x-session-id"), &req.user) {
        (Some(v), _) => v.to_str().map_err(|_| bad_request("X-Session-Id must be visible ASCII"))?.to_owned(),
        (None, Some(user)) => user.clone(),
        (None, None) => format!("oai-{}", chat_wire::new_request_id()),
    };
    chat_wire::validate_id("session_id", &session_id).map_err(|e| OpenAiError(ApiError::invalid(e)))?;
    let ip = app.limits.client_ip(peer, &headers);
    let request_id = chat_wire::new_request_id();
    // Attach before dispatching so no event can pass unseen.
    let mut reader = Reader::attach_for(&app, &session_id, &request_id).await;
    reader.follower.expect(&request_id);
    let body = ChatBody { session_id: session_id.clone(), message, user_id: None };
    let accepted = start_chat(&app, &caller, ip, body, request_id.clone()).await?;
    log::info!("request_id={request_id} session_id={session_id} node={} v1 stream={}", accepted.node_url, req.stream);
    let first = reader.follower.start(&request_id).await;
    let mut completion = Completion::new(&request_id, req.model);
    completion.charge = caller.0.as_ref().map(|k| k.id.clone());
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let mut response = if req.stream {
        stream(app, reader, request_id, first, completion, include_usage, true).into_response()
    } else {
        whole(app, reader, request_id, first, completion).await?
    };
    if let Ok(v) = HeaderValue::from_str(&session_id) {
        response.headers_mut().insert("x-session-id", v);
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct ResumeParams {
    after_seq: Option<u64>,
    #[serde(default)]
    include_usage: bool,
    #[serde(default)]
    model: Option<String>,
}

/// `GET /v1/chat/completions/{id}/events`: the rest of a streamed answer
/// after `Last-Event-ID` (or `?after_seq=`), as OpenAI chunks, from any backend.
async fn resume(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    axum::extract::Query(params): axum::extract::Query<ResumeParams>,
    headers: HeaderMap,
) -> Result<Response, OpenAiError> {
    let request_id = request_id_of(&id).to_owned();
    let after_seq = last_event_id(&headers)?.or(params.after_seq).unwrap_or(0);
    let model = params.model.unwrap_or_else(|| app.config.openai_models[0].clone());
    let completion = Completion::new(&request_id, model);
    Ok(match open_resume(&app, &caller, &request_id, after_seq).await? {
        Some((reader, first)) => {
            stream(app, reader, request_id, first, completion, params.include_usage, after_seq == 0).into_response()
        }
        None => {
            let done = futures::stream::once(async { Ok::<_, Infallible>(SseEvent::default().data("[DONE]")) });
            Sse::new(done).into_response()
        }
    })
}

/// The answer as OpenAI's SSE chunks: a role chunk (on a fresh start), a
/// content chunk per event, a final chunk with the finish reason, the usage
/// chunk when asked, then `data: [DONE]`. An `error` event, or a reader-level
/// notice, ends the stream with `data: {"error": ...}` (no `[DONE]`).
fn stream(
    app: Arc<App>,
    reader: Reader,
    request_id: String,
    first: Vec<Out>,
    completion: Completion,
    include_usage: bool,
    announce_role: bool,
) -> impl IntoResponse {
    let rx = follow_one(app, reader, request_id, first, completion.charge.clone());
    let role = announce_role.then(|| {
        let chunk = completion.chunk(json!({"role": "assistant", "content": ""}), None, include_usage);
        SseEvent::default().data(chunk.to_string())
    });
    let head = futures::stream::iter(role.map(Ok::<_, Infallible>));
    let body =
        futures::stream::unfold((rx, completion, Vec::<SseEvent>::new()), move |(mut rx, c, mut queued)| async move {
            if queued.is_empty() {
                queued = match rx.recv().await? {
                    Item::Event(e) => sse_of_event(&c, &e, include_usage),
                    Item::Notice { code, message } => {
                        let status = StatusCode::SERVICE_UNAVAILABLE;
                        vec![SseEvent::default().data(error_body(status, code, &message, None).to_string())]
                    }
                };
                queued.reverse();
            }
            let next = queued.pop()?;
            Some((Ok::<_, Infallible>(next), (rx, c, queued)))
        });
    Sse::new(futures::StreamExt::chain(head, body)).keep_alive(KeepAlive::default())
}

/// The SSE events one stored event becomes, in order.
fn sse_of_event(c: &Completion, e: &Event, include_usage: bool) -> Vec<SseEvent> {
    let id = e.seq.to_string();
    match e.kind {
        EventKind::Chunk => {
            let delta = json!({"content": e.delta.clone().unwrap_or_default()});
            vec![SseEvent::default().id(id).data(c.chunk(delta, None, include_usage).to_string())]
        }
        EventKind::Done => {
            let reason = e.finish_reason.as_deref().unwrap_or("stop");
            let mut out =
                vec![SseEvent::default().id(id).data(c.chunk(json!({}), Some(reason), include_usage).to_string())];
            if include_usage {
                out.push(SseEvent::default().data(c.usage_chunk(e.usage.unwrap_or_default()).to_string()));
            }
            out.push(SseEvent::default().data("[DONE]"));
            out
        }
        EventKind::Error => {
            let (status, code, message) = failure(e);
            vec![SseEvent::default().id(id).data(error_body(status, code, &message, None).to_string())]
        }
    }
}

/// The status, code and message an `error` event stands for.
fn failure(e: &Event) -> (StatusCode, &str, String) {
    let code = e.code.as_deref().unwrap_or("error");
    let status = match code {
        "cancelled" => StatusCode::CONFLICT,
        "node_failed" | "node_shutdown" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    (status, code, e.message.clone().unwrap_or_else(|| "the answer failed".into()))
}

/// `stream: false`: waits for the whole answer (at most
/// `openai.completion_timeout`) and answers one `chat.completion`.
async fn whole(
    app: Arc<App>,
    reader: Reader,
    request_id: String,
    first: Vec<Out>,
    c: Completion,
) -> Result<Response, OpenAiError> {
    let deadline = app.config.completion_timeout;
    let mut rx = follow_one(app, reader, request_id, first, c.charge.clone());
    let mut text = String::new();
    let collected = tokio::time::timeout(deadline, async {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Event(e) if e.kind == EventKind::Chunk => text.push_str(e.delta.as_deref().unwrap_or_default()),
                Item::Event(e) => return Ok(e),
                Item::Notice { code, message } => {
                    return Err(OpenAiError(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)))
                }
            }
        }
        Err(OpenAiError(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_lost",
            "the answer's stream ended early",
        )))
    })
    .await;
    let end = match collected {
        Ok(end) => end?,
        Err(_) => {
            let message = format!("no whole answer within {deadline:?}; stream it instead");
            return Err(OpenAiError(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)));
        }
    };
    if end.kind == EventKind::Error {
        let (status, code, message) = failure(&end);
        return Ok((status, Json(error_body(status, code, &message, None))).into_response());
    }
    let body = json!({
        "id": c.id,
        "object": "chat.completion",
        "created": c.created,
        "model": c.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": end.finish_reason.as_deref().unwrap_or("stop"),
        }],
        "usage": usage_json(end.usage.unwrap_or_default()),
    });
    Ok(Json(body).into_response())
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "chat-gateway"})
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.config.openai_models.iter().map(|m| model_json(m)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model(State(app): State<Arc<App>>, Path(model): Path<String>) -> Result<Json<Value>, OpenAiError> {
    if app.config.openai_models.contains(&model) {
        return Ok(Json(model_json(&model)));
    }
    Err(OpenAiError(ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("the model {model:?} does not exist"),
    )))
}
