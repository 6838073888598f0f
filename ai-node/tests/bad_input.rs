//! Bad input gets a 4xx with the JSON error shape, and the node keeps serving.

mod common;

use ai_node::config::EngineConfig;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn post_raw(node: &TestNode, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = http().post(node.url("/chat")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.expect("every error is JSON");
    (status, body)
}

#[tokio::test]
async fn malformed_and_invalid_requests_get_the_contract_errors() {
    let node = TestNode::start(fast_config(&redis_url(), "ai-bad")).await;
    let json_ct = Some("application/json");
    let long_message = "a".repeat(32_769);
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        ("malformed json", json_ct, b"{\"session_id\": ".to_vec(), 400),
        ("not an object", json_ct, b"[1,2]".to_vec(), 400),
        ("missing message", json_ct, br#"{"session_id":"s1"}"#.to_vec(), 400),
        ("missing session", json_ct, br#"{"message":"hi"}"#.to_vec(), 400),
        ("wrong type", json_ct, br#"{"session_id":5,"message":"hi"}"#.to_vec(), 400),
        ("empty message", json_ct, br#"{"session_id":"s1","message":""}"#.to_vec(), 400),
        ("blank message", json_ct, br#"{"session_id":"s1","message":"   "}"#.to_vec(), 400),
        (
            "oversized message",
            json_ct,
            json!({"session_id": "s1", "message": long_message}).to_string().into_bytes(),
            400,
        ),
        ("session with space", json_ct, br#"{"session_id":"a b","message":"hi"}"#.to_vec(), 400),
        ("session with glob", json_ct, br#"{"session_id":"a*","message":"hi"}"#.to_vec(), 400),
        ("empty session", json_ct, br#"{"session_id":"","message":"hi"}"#.to_vec(), 400),
        (
            "long session",
            json_ct,
            json!({"session_id": "s".repeat(129), "message": "hi"}).to_string().into_bytes(),
            400,
        ),
        ("bad user id", json_ct, br#"{"session_id":"s1","message":"hi","user_id":"u/1"}"#.to_vec(), 400),
        ("bad request id", json_ct, br#"{"session_id":"s1","message":"hi","request_id":"r 1"}"#.to_vec(), 400),
        ("invalid utf-8", json_ct, b"{\"session_id\":\"s1\",\"message\":\"\xff\xfe\"}".to_vec(), 400),
        ("not json", Some("text/plain"), br#"{"session_id":"s1","message":"hi"}"#.to_vec(), 415),
        ("no content type", None, br#"{"session_id":"s1","message":"hi"}"#.to_vec(), 415),
        ("body too large", json_ct, vec![b' '; 300 * 1024], 413),
    ];
    for (name, ct, body, want) in cases {
        let (status, err) = post_raw(&node, ct, body).await;
        assert_eq!(status, want, "{name}: {err}");
        assert!(err["error"]["code"].is_string() && err["error"]["message"].is_string(), "{name}: {err}");
    }
    let res = http().get(node.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "not_found");

    // Still serving.
    let res = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": unique("s"), "message": "still there?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    node.shutdown().await;
}

#[tokio::test]
async fn past_the_concurrency_limit_the_node_answers_503() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-full");
    config.max_concurrent_streams = 2;
    if let EngineConfig::Synthetic(s) = &mut config.engine {
        s.first_token = Duration::from_secs(2);
    }
    let node = TestNode::start(config).await;
    for _ in 0..2 {
        let res = http()
            .post(node.url("/chat"))
            .json(&json!({"session_id": unique("s"), "message": "slow"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
    }
    let res = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": unique("s"), "message": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "overloaded");
    let health: Value = http().get(node.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["in_flight"], 2);
    node.shutdown().await;
}
