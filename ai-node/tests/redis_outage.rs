//! With Redis gone the node says so (503 on /health and /chat) without
//! panicking, and serves again as soon as Redis is back.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn node_answers_503_while_redis_is_down_and_recovers_when_it_returns() {
    let mut redis = OwnRedis::start();
    let node = TestNode::start(fast_config(&redis.url(), "ai-outage")).await;
    let health = node.url("/health");

    let ok: Value = http().get(&health).send().await.unwrap().json().await.unwrap();
    assert_eq!(ok["redis"], "ok");
    assert_eq!(ok["node_id"], "ai-outage");

    redis.stop();
    let down = http().get(&health).send().await.unwrap();
    assert_eq!(down.status(), 503);
    assert_eq!(down.json::<Value>().await.unwrap()["redis"], "unreachable");
    let chat = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": "s-outage", "message": "anyone?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 503);
    assert_eq!(chat.json::<Value>().await.unwrap()["error"]["code"], "store_unavailable");

    redis.restart();
    let recovered = eventually(Duration::from_secs(10), || {
        let health = health.clone();
        async move { http().get(&health).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    assert!(recovered, "health returns to 200 once Redis is back");

    let mut sub = Subscriber::session(&redis.url(), "s-outage").await;
    let res = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": "s-outage", "message": "back?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let request_id = res.json::<Value>().await.unwrap()["request_id"].as_str().unwrap().to_owned();
    assert!(sub.until_end(&request_id).await.last().unwrap().finish_reason.is_some());
    node.shutdown().await;
}

#[tokio::test]
async fn node_started_before_redis_serves_once_redis_comes_up() {
    let mut redis = OwnRedis::start();
    redis.stop();
    let node = TestNode::start(fast_config(&redis.url(), "ai-early")).await;
    assert_eq!(http().get(node.url("/health")).send().await.unwrap().status(), 503);
    redis.restart();
    let health = node.url("/health");
    assert!(
        eventually(Duration::from_secs(10), || {
            let health = health.clone();
            async move { http().get(&health).send().await.map(|r| r.status() == 200).unwrap_or(false) }
        })
        .await
    );
    node.shutdown().await;
}
