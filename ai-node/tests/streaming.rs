//! A node publishes every answer chunk by chunk, stores it for replay, and
//! treats a repeated request id as the same request.

mod common;

use ai_node::config::EngineConfig;
use ai_node::engine::synthetic_text;
use chat_wire::EventKind;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn subscriber_sees_every_chunk_in_order_then_done_and_the_stream_replays_them() {
    let redis = redis_url();
    let node = TestNode::start(fast_config(&redis, "ai-t1")).await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis, &session).await;

    let res = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": session, "message": "tell me about streams", "user_id": "u1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["node"], "ai-t1");
    assert_eq!(body["session_id"], session.as_str());
    let request_id = body["request_id"].as_str().unwrap().to_owned();
    assert!(request_id.starts_with("r-"));

    let events = sub.until_end(&request_id).await;
    let expected = synthetic_text("tell me about streams", 12);
    assert_eq!(events.len(), expected.len() + 1);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq must count from 1 without gaps");
        assert_eq!(e.node.as_deref(), Some("ai-t1"));
        assert!(e.ts_us.unwrap() > 0);
    }
    let text: String = events.iter().filter_map(|e| e.delta.clone()).collect();
    assert_eq!(text, expected.concat());
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Done);
    assert_eq!(last.finish_reason.as_deref(), Some("stop"));

    assert_eq!(stored_events(&redis, &request_id).await, events, "the stream replays exactly what was published");
    node.shutdown().await;
}

#[tokio::test]
async fn same_request_id_twice_yields_one_stream() {
    let redis = redis_url();
    let node = TestNode::start(fast_config(&redis, "ai-t2")).await;
    let session = unique("s");
    let request_id = unique("r");
    let mut sub = Subscriber::session(&redis, &session).await;
    let body = json!({"session_id": session, "message": "once only", "request_id": request_id});

    let first: Value = http().post(node.url("/chat")).json(&body).send().await.unwrap().json().await.unwrap();
    let second = http().post(node.url("/chat")).json(&body).send().await.unwrap();
    assert_eq!(second.status(), 202, "a retried call is accepted");
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["request_id"], request_id.as_str());
    assert_eq!(second["node"], "ai-t2");

    let events = sub.until_end(&request_id).await;
    assert_eq!(events.len(), 13);
    sub.assert_silent(Duration::from_millis(300)).await;
    assert_eq!(stored_events(&redis, &request_id).await.len(), 13, "one generation stored, not two");
    node.shutdown().await;
}

#[tokio::test]
async fn injected_mid_stream_death_ends_with_an_error_event() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-t3");
    if let EngineConfig::Synthetic(s) = &mut config.engine {
        s.die_ratio = 1.0;
    }
    let node = TestNode::start(config).await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis, &session).await;
    let body: Value = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": session, "message": "doomed"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let request_id = body["request_id"].as_str().unwrap();
    let events = sub.until_end(request_id).await;
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Error);
    assert_eq!(last.code.as_deref(), Some("engine_failed"));
    assert!(events.len() <= 12, "the answer died before its end");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    node.shutdown().await;
}

#[tokio::test]
async fn refused_requests_get_503_and_stay_unclaimed_for_another_node() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-t4");
    if let EngineConfig::Synthetic(s) = &mut config.engine {
        s.refuse_ratio = 1.0;
    }
    let refusing = TestNode::start(config).await;
    let healthy = TestNode::start(fast_config(&redis, "ai-t5")).await;
    let session = unique("s");
    let request_id = unique("r");
    let body = json!({"session_id": session, "message": "hello", "request_id": request_id});

    let res = http().post(refusing.url("/chat")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "engine_refused");

    let mut sub = Subscriber::session(&redis, &session).await;
    let res: Value = http().post(healthy.url("/chat")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(res["duplicate"], false, "the refusing node must not have claimed the id");
    assert_eq!(sub.until_end(&request_id).await.last().unwrap().kind, EventKind::Done);
    refusing.shutdown().await;
    healthy.shutdown().await;
}

#[tokio::test]
async fn history_of_the_session_is_kept_and_bounded() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-t6");
    config.history_max_turns = 4;
    let node = TestNode::start(config).await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis, &session).await;
    for i in 0..3 {
        let body: Value = http()
            .post(node.url("/chat"))
            .json(&json!({"session_id": session, "message": format!("question {i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        sub.until_end(body["request_id"].as_str().unwrap()).await;
    }
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = chat_wire::keys::session_history(&session);
    let history: Vec<String> = eventually_value(|| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async::<Vec<String>>(&mut conn).await.unwrap() }
    })
    .await;
    assert_eq!(history.len(), 4, "bounded to max_turns");
    let first: Value = serde_json::from_str(&history[0]).unwrap();
    assert_eq!(first["role"], "user");
    assert_eq!(first["content"], "question 1");
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0, "history expires");
    node.shutdown().await;
}

/// History is written right after `done`; wait until the third answer's turns land.
async fn eventually_value<F, Fut>(mut read: F) -> Vec<String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let mut last = Vec::new();
    for _ in 0..40 {
        last = read().await;
        if last.last().is_some_and(|s| s.contains("assistant")) && last.iter().any(|s| s.contains("question 2")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test]
async fn shutdown_ends_in_flight_streams_with_an_error_after_the_grace_period() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-t7");
    if let EngineConfig::Synthetic(s) = &mut config.engine {
        s.tokens_per_second = 5.0;
        s.answer_tokens = 100;
    }
    config.shutdown_grace = Duration::from_millis(300);
    let node = TestNode::start(config).await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis, &session).await;
    let body: Value = http()
        .post(node.url("/chat"))
        .json(&json!({"session_id": session, "message": "a long one"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let request_id = body["request_id"].as_str().unwrap().to_owned();
    assert_eq!(sub.next(Duration::from_secs(5)).await.seq, 1);
    let health = node.url("/health");
    let chat = node.url("/chat");
    let draining = tokio::spawn(node.shutdown());
    // While draining, health says 503 and new chats are refused.
    assert!(
        eventually(Duration::from_secs(2), || {
            let health = health.clone();
            async move { http().get(&health).send().await.map(|r| r.status() == 503).unwrap_or(false) }
        })
        .await
    );
    let refused = http().post(&chat).json(&json!({"session_id": session, "message": "more"})).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let events = sub.until_end(&request_id).await;
    let last = events.last().unwrap();
    assert_eq!(last.code.as_deref(), Some("node_shutdown"));
    draining.await.unwrap();
}

#[tokio::test]
async fn an_answer_longer_than_the_stream_keeps_is_cut_with_length_and_stored_whole() {
    let redis = redis_url();
    let mut config = fast_config(&redis, "ai-t-long");
    config.stream_max_len = 16;
    if let EngineConfig::Synthetic(s) = &mut config.engine {
        s.answer_tokens = 40;
    }
    let node = TestNode::start(config).await;
    let session = unique("s");
    let mut sub = Subscriber::session(&redis, &session).await;
    let res =
        http().post(node.url("/chat")).json(&json!({"session_id": session, "message": "go on and on"})).send().await;
    let body: Value = res.unwrap().json().await.unwrap();
    let request_id = body["request_id"].as_str().unwrap().to_owned();

    let events = sub.until_end(&request_id).await;
    assert_eq!(events.len(), 16, "15 chunks and the end fill the stream's 16 entries");
    let last = events.last().unwrap();
    assert_eq!((last.kind, last.finish_reason.as_deref()), (EventKind::Done, Some("length")));
    assert_eq!(stored_events(&redis, &request_id).await, events, "nothing was trimmed: a late reader gets it all");
    node.shutdown().await;
}
