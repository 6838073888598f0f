//! Bad input on every endpoint gets a clear answer in the contract's shape,
//! and the process serves normally afterwards.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

/// Below the message limit (32,768 characters) plus JSON, above the body limit.
const BODY_LIMIT: usize = 40_000;
const FRAME_LIMIT: usize = 65_536;

async fn backend_with_limits(redis: &str, node: &AiNode) -> Backend {
    let backend = Backend::builder(redis, &[node])
        .set("limits", "max_body_bytes", BODY_LIMIT)
        .set("limits", "max_frame_bytes", FRAME_LIMIT)
        .start()
        .await;
    backend.wait_healthy_nodes(1).await;
    backend
}

/// A normal chat still streams to the end.
async fn assert_still_serves(backend: &Backend) {
    let session = unique("s");
    let mut ws = Ws::connect(backend, &session).await;
    let accepted = ws.chat("are you still there?").await;
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);
    let res = backend.post_chat(&json!({"session_id": session, "message": "and over REST?"})).await;
    assert_eq!(res.status(), 202);
}

#[tokio::test]
async fn rest_chat_rejects_bad_json_wrong_types_missing_fields_and_bad_ids_with_400() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = backend_with_limits(&redis, &node).await;

    let malformed = ["{\"session_id\": \"s-1\", \"message\":", "not json at all", "", "[1, 2]", "null"];
    for body in malformed {
        let res = http()
            .post(backend.url("/api/chat"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(res, 400).await;
    }

    let too_long_message = "a".repeat(chat_wire::MAX_MESSAGE_CHARS + 1);
    let bad_bodies = [
        json!({"session_id": 42, "message": "hi"}),
        json!({"session_id": "s-1", "message": ["hi"]}),
        json!({"session_id": "s-1", "message": "hi", "user_id": 7}),
        json!({"message": "hi"}),
        json!({"session_id": "s-1"}),
        json!({}),
        json!({"session_id": "s-1", "message": ""}),
        json!({"session_id": "s-1", "message": "   "}),
        json!({"session_id": "s-1", "message": too_long_message}),
        json!({"session_id": "", "message": "hi"}),
        json!({"session_id": "a b", "message": "hi"}),
        json!({"session_id": "s/1", "message": "hi"}),
        json!({"session_id": "s*", "message": "hi"}),
        json!({"session_id": "é", "message": "hi"}),
        json!({"session_id": "x".repeat(129), "message": "hi"}),
        json!({"session_id": "s-1", "message": "hi", "user_id": "u 1"}),
    ];
    for body in bad_bodies {
        let res = backend.post_chat(&body).await;
        let status = res.status();
        assert_eq!(status, 400, "for {}", &body.to_string()[..body.to_string().len().min(120)]);
        assert_error(res, 400).await;
    }

    assert_still_serves(&backend).await;
}

#[tokio::test]
async fn rest_chat_rejects_an_oversized_body_with_413_and_non_json_with_415() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = backend_with_limits(&redis, &node).await;

    let oversized = json!({"session_id": "s-1", "message": "a".repeat(BODY_LIMIT * 2)});
    assert_error(backend.post_chat(&oversized).await, 413).await;

    let valid = json!({"session_id": "s-1", "message": "hi"}).to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = http().post(backend.url("/api/chat")).body(valid.clone());
        if let Some(content_type) = content_type {
            req = req.header("content-type", content_type);
        }
        assert_error(req.send().await.unwrap(), 415).await;
    }

    assert_still_serves(&backend).await;
}

#[tokio::test]
async fn websocket_upgrade_with_a_bad_or_missing_session_id_is_refused_with_400() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = backend_with_limits(&redis, &node).await;

    let base = format!("ws://127.0.0.1:{}/ws/chat", backend.port);
    let long = "x".repeat(129);
    let queries = ["".to_owned(), "?session_id=".into(), "?session_id=a%20b".into(), "?session_id=%C3%A9".into()];
    let queries = queries.into_iter().chain([format!("?session_id={long}"), "?other=s-1".into()]);
    for query in queries {
        let url = format!("{base}{query}");
        let refused = tokio::time::timeout(EVENT_WAIT, tokio_tungstenite::connect_async(&url)).await.unwrap();
        match refused {
            Err(tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), 400, "for {url}");
                assert!(res.headers().contains_key("x-backend-id"), "for {url}");
            }
            Err(e) => panic!("{url}: expected HTTP 400, got {e}"),
            Ok(_) => panic!("{url}: the upgrade was accepted"),
        }
    }

    assert_still_serves(&backend).await;
}

#[tokio::test]
async fn websocket_bad_frames_get_invalid_frame_and_the_socket_keeps_working() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = backend_with_limits(&redis, &node).await;
    let mut ws = Ws::connect(&backend, &unique("s")).await;

    let bad_frames = [
        "hello".to_owned(),
        "{\"type\": \"chat\", ".into(),
        "[]".into(),
        json!({"type": "dance"}).to_string(),
        json!({"kind": "chat", "message": "hi"}).to_string(),
        json!({"type": "chat"}).to_string(),
        json!({"type": "chat", "message": 5}).to_string(),
        json!({"type": "resume", "request_id": "r-1", "after_seq": "three"}).to_string(),
        json!({"type": "resume", "request_id": "r-1", "after_seq": -1}).to_string(),
    ];
    for frame in bad_frames {
        ws.send(Message::text(frame.clone())).await;
        let answer = ws.next_json(EVENT_WAIT).await;
        assert_eq!(answer["type"], "error", "for {frame}: {answer}");
        assert_eq!(answer["code"], "invalid_frame", "for {frame}: {answer}");
    }

    ws.resume(&chat_wire::new_request_id(), 0).await;
    let answer = ws.next_json(EVENT_WAIT).await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unknown_request", "{answer}");

    let accepted = ws.chat("after all that").await;
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);
    assert_still_serves(&backend).await;
}

#[tokio::test]
async fn websocket_frame_over_the_limit_closes_the_socket_with_1009() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = backend_with_limits(&redis, &node).await;
    let mut ws = Ws::connect(&backend, &unique("s")).await;

    let huge = json!({"type": "chat", "message": "a".repeat(FRAME_LIMIT + 1)}).to_string();
    ws.send(Message::text(huge)).await;
    let close = ws.close_frame(EVENT_WAIT).await.expect("the close frame carries a code");
    assert_eq!(close.code, CloseCode::Size, "close code 1009, got {}", u16::from(close.code));

    assert_still_serves(&backend).await;
}

#[tokio::test]
async fn no_reachable_ai_node_gives_503_with_a_json_error() {
    let redis = redis_url();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let backend = Backend::builder_for_urls(&redis, vec![closed.clone()])
        .set("ai", "request_timeout_ms", 500)
        .set("ai", "dispatch_deadline_ms", 2_000)
        .start()
        .await;

    let health = backend.ai_health().await;
    assert_eq!(health["total_nodes"], 1, "{health}");
    assert_eq!(health["healthy_nodes"], 0, "{health}");
    assert_eq!(health["nodes"][0]["url"], closed.as_str(), "{health}");
    assert_eq!(health["nodes"][0]["status"], "unhealthy", "{health}");

    let started = std::time::Instant::now();
    let res = backend.post_chat(&json!({"session_id": unique("s"), "message": "anyone?"})).await;
    assert_error(res, 503).await;
    assert!(started.elapsed() < Duration::from_secs(5), "503 within the dispatch deadline");

    let ok: Value = http().get(backend.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ok["status"], "ok", "the backend itself is fine: {ok}");
}
