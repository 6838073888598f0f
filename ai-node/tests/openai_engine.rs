//! The `openai` engine against a local server speaking OpenAI's SSE wire
//! format: `data:` lines of `chat.completion.chunk`, ending with `[DONE]`.

mod common;

use ai_node::config::{EngineConfig, OpenAiConfig};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chat_wire::EventKind;
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the stub answers.
#[derive(Clone, Copy)]
enum Mode {
    /// Three pieces, then `[DONE]`.
    Complete,
    /// Two pieces, then the connection breaks.
    Broken,
    /// Two pieces, then a clean end without `[DONE]`.
    Truncated,
    /// 500 with an error body.
    ServerError,
    /// A piece every 50 ms, never ending; `closed` is set when the engine
    /// hangs up.
    Endless,
}

#[derive(Clone)]
struct Stub {
    mode: Mode,
    /// Request bodies the stub received, to check what the engine sends.
    seen: Arc<Mutex<Vec<Value>>>,
    /// An endless answer's stream was dropped: the client closed the request.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Sets its flag when dropped, with the stream that owns it.
struct HungUp(Arc<std::sync::atomic::AtomicBool>);

impl Drop for HungUp {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn sse_chunk(content: &str) -> Bytes {
    let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "stub",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    Bytes::from(format!("data: {chunk}\n\n"))
}

async fn completions(State(stub): State<Stub>, Json(body): Json<Value>) -> Response {
    stub.seen.lock().unwrap().push(body);
    let role = Bytes::from(format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})));
    let pieces: Vec<Result<Bytes, std::io::Error>> = match stub.mode {
        Mode::Complete => vec![
            Ok(role),
            Ok(sse_chunk("Hello")),
            Ok(sse_chunk(", ")),
            Ok(sse_chunk("world")),
            Ok(Bytes::from("data: [DONE]\n\n")),
        ],
        Mode::Broken => {
            vec![Ok(role), Ok(sse_chunk("Hel")), Ok(sse_chunk("lo")), Err(std::io::Error::other("model crashed"))]
        }
        Mode::Truncated => vec![Ok(role), Ok(sse_chunk("Hel")), Ok(sse_chunk("lo"))],
        Mode::ServerError => {
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "boom"}}))).into_response()
        }
        Mode::Endless => {
            let guard = HungUp(stub.closed.clone());
            let stream = futures::stream::unfold(guard, |guard| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, std::io::Error>(sse_chunk("more ")), guard))
            });
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap();
        }
    };
    let stream = futures::stream::iter(pieces).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        p
    });
    Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

use futures::StreamExt;

async fn start_stub(mode: Mode) -> (String, Stub) {
    let stub = Stub { mode, seen: Arc::default(), closed: Arc::default() };
    let app = Router::new().route("/v1/chat/completions", post(completions)).with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), stub)
}

async fn node_for(base_url: String, node_id: &str) -> TestNode {
    let mut config = fast_config(&redis_url(), node_id);
    config.engine = EngineConfig::OpenAi(OpenAiConfig {
        base_url,
        model: "stub-model".into(),
        api_key: Some("sk-test".into()),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        max_tokens: Some(64),
        system_prompt: Some("be brief".into()),
    });
    TestNode::start(config).await
}

async fn chat(node: &TestNode, session: &str, message: &str) -> String {
    let res =
        http().post(node.url("/chat")).json(&json!({"session_id": session, "message": message})).send().await.unwrap();
    assert_eq!(res.status(), 202);
    res.json::<Value>().await.unwrap()["request_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn streams_an_openai_compatible_answer_and_sends_the_history() {
    let (base, stub) = start_stub(Mode::Complete).await;
    let node = node_for(base, "ai-oa1").await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis_url(), &session).await;

    let first = chat(&node, &session, "hi there").await;
    let events = sub.until_end(&first).await;
    let text: String = events.iter().filter_map(|e| e.delta.clone()).collect();
    assert_eq!(text, "Hello, world");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(events.last().unwrap().kind, EventKind::Done);

    // The second request carries the first exchange as history.
    let second = chat(&node, &session, "and again").await;
    sub.until_end(&second).await;
    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(seen[0]["model"], "stub-model");
    assert_eq!(seen[0]["stream"], true);
    assert_eq!(seen[0]["max_tokens"], 64);
    let roles: Vec<&str> =
        seen[1]["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(seen[1]["messages"][2]["content"], "Hello, world");
    node.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_breaks_or_stops_before_done_ends_with_an_error_event() {
    for (mode, name) in [(Mode::Broken, "broken"), (Mode::Truncated, "truncated"), (Mode::ServerError, "server error")]
    {
        let (base, _stub) = start_stub(mode).await;
        let node = node_for(base, "ai-oa2").await;
        let session = unique("s");
        let mut sub = Subscriber::session(&redis_url(), &session).await;
        let request_id = chat(&node, &session, "hi").await;
        let events = sub.until_end(&request_id).await;
        let last = events.last().unwrap();
        assert_eq!(last.kind, EventKind::Error, "{name}");
        assert_eq!(last.code.as_deref(), Some("engine_failed"), "{name}");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "{name}");
        }
        if !matches!(mode, Mode::ServerError) {
            let text: String = events.iter().filter_map(|e| e.delta.clone()).collect();
            assert_eq!(text, "Hello", "{name}: what arrived before the break is kept");
        }
        node.shutdown().await;
    }
}

#[tokio::test]
async fn an_unreachable_model_server_ends_with_an_error_event() {
    let port = free_port();
    let node = node_for(format!("http://127.0.0.1:{port}/v1"), "ai-oa3").await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis_url(), &session).await;
    let request_id = chat(&node, &session, "hi").await;
    let events = sub.until_end(&request_id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].code.as_deref(), Some("engine_failed"));
    node.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_answer_closes_the_upstream_request() {
    let (base, stub) = start_stub(Mode::Endless).await;
    let node = node_for(base, "ai-oa-cancel").await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis_url(), &session).await;
    let id = chat(&node, &session, "never stop").await;
    for _ in 0..3 {
        sub.next(Duration::from_secs(5)).await;
    }
    assert!(!stub.closed.load(std::sync::atomic::Ordering::SeqCst), "streaming");

    // A backend marks it cancelled, as DELETE /api/chat/{id} does.
    let ledger = chat_wire::ledger::on(
        &chat_wire::ledger::Backplane::Redis(redis_url()),
        Duration::from_secs(2),
        Duration::from_secs(2),
        chat_wire::ledger::DEFAULT_MAX_LEN,
        chat_wire::ledger::DEFAULT_TTL,
    )
    .unwrap();
    assert_eq!(ledger.cancel(&id).await.unwrap(), chat_wire::ledger::Cancel::Stopping);
    let events = sub.until_end(&id).await;
    let end = events.last().unwrap();
    assert_eq!((end.kind, end.code.as_deref()), (EventKind::Error, Some("cancelled")), "{end:?}");
    let closed =
        eventually(Duration::from_secs(3), || async { stub.closed.load(std::sync::atomic::Ordering::SeqCst) }).await;
    assert!(closed, "the engine closed its upstream request");
    node.shutdown().await;
}
