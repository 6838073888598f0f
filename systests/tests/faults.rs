//! Faults the cluster must survive: Redis restarted mid-stream, and a client
//! that stops reading. Nothing hangs, no process exits, memory stays bounded.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[tokio::test]
async fn redis_restarted_mid_stream_every_component_recovers_and_nothing_hangs() {
    let mut redis = OwnRedis::start_persistent();
    let node = AiNode::start(&redis.url(), Pace::SLOW).await;
    let backend = Backend::builder(&redis.url(), &[&node]).set("stream", "stall_timeout_ms", 1_000).start().await;
    backend.wait_healthy_nodes(1).await;

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("a long answer across an outage").await;
    let first = ws.next_event(&accepted.request_id, EVENT_WAIT).await;
    assert_eq!(first.seq, 1);

    redis.stop();
    // During the outage: a clear 503 with the JSON error, quickly.
    let started = Instant::now();
    let res = backend.post_chat(&json!({"session_id": unique("s"), "message": "anyone?"})).await;
    assert_eq!(res.status(), 503, "a chat during the outage is refused");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal took {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();

    // The stream in flight completes or ends with a stored error event, with
    // no gap and no repeat: it never hangs.
    let mut last = first;
    while !last.is_terminal() {
        let event = ws.next_event(&accepted.request_id, Duration::from_secs(15)).await;
        assert_eq!(event.seq, last.seq + 1, "no gap, no repeat: {event:?} after {last:?}");
        last = event;
    }
    assert!(last.finish_reason.is_some() || last.code.is_some(), "{last:?}");

    // Everything reconnects on its own: a new chat streams completely on the same socket.
    let deadline = Instant::now() + Duration::from_secs(15);
    let accepted = loop {
        let res = backend.post_chat(&json!({"session_id": "probe", "message": "ping"})).await;
        if res.status() == 202 {
            break ws.chat("are you back?").await;
        }
        assert!(Instant::now() < deadline, "the cluster did not recover after Redis came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);
    assert!(alive(backend.pid()), "the backend is still running");
    let metrics = http().get(backend.metrics_url()).send().await.unwrap().text().await.unwrap();
    let reconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("backend_pubsub_reconnects_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(reconnects >= 1, "the pub/sub connection was re-made: {reconnects}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_1013_and_backend_memory_stays_bounded() {
    let redis = redis_url();
    // Fast, long answers: 100,000 events (about 13 MB), far more than the
    // socket buffers (loopback send buffers grow to 4 MB) and the queue hold.
    let pace = Pace { first_token_ms: 1, tokens_per_second: 0.0, answer_tokens: 10_000 };
    let node = AiNode::start(&redis, pace).await;
    let backend = Backend::builder(&redis, &[&node])
        .set("limits", "ws_send_queue", 64)
        .set("limits", "ws_send_timeout_ms", 1_000)
        .start()
        .await;
    backend.wait_healthy_nodes(1).await;
    let before = rss_kib(backend.pid());

    let url = backend.ws_url(&unique("s"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for i in 0..10 {
        let frame = json!({"type": "chat", "message": format!("flood me {i}")}).to_string();
        socket.send(Message::text(frame)).await.unwrap();
    }
    // Read nothing until the backend gives up on this socket (its sends block
    // once the kernel's buffers are full; the queue then overflows or a send
    // outlasts `ws_send_timeout`).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while metric(&backend, "backend_ws_slow_consumers_total ").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the backend never counted the slow consumer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = rss_kib(backend.pid());

    // The close frame is queued behind everything the client did not read: it
    // arrives once the client catches up (the backend lingers for the client's
    // close before it drops the socket).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut read = 0u64;
    let ending = loop {
        match tokio::time::timeout_at(deadline, socket.next()).await.expect("the socket was never closed") {
            Some(Ok(Message::Close(frame))) => break format!("close {:?}", frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => break format!("error {e}"),
            None => break "end".to_owned(),
        }
    };
    assert_eq!(ending, "close Some(1013)", "the socket ends with 1013 ({read} frames read first)");
    eprintln!("backend RSS: {before} KiB before, {during} KiB while the client did not read; {read} frames read");
    assert!(during < before + 8 * 1024, "memory grew from {before} to {during} KiB");
    assert!(alive(backend.pid()));
    // The backend still serves others (answers this long outrun any reader with a
    // 64-event queue, so the check is an accepted chat, not a streamed one).
    let accepted = backend.chat(&unique("s"), "still there?").await;
    assert!(!accepted.request_id.is_empty());
}

/// An `ai-node` process on a given port (to restart a killed node where it was).
fn spawn_node_on(url: &str, node_id: &str, redis_url: &str) -> Child {
    let addr = url.trim_start_matches("http://");
    Command::new(ai_node_bin())
        .env("LISTEN_ADDR", addr)
        .env("REDIS_URL", redis_url)
        .env("NODE_ID", node_id)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ai-node starts")
}

#[tokio::test]
async fn under_steady_load_a_killed_node_costs_no_chat_and_rejoins_after_its_health_check() {
    let redis = redis_url();
    let mut nodes = [
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
    ];
    let backend = Backend::builder(&redis, &[&nodes[0], &nodes[1], &nodes[2]])
        .set("ai", "health_interval_ms", 300)
        .set("limits", "session_burst", 10_000)
        .set("limits", "ip_burst", 10_000)
        .start()
        .await;
    backend.wait_healthy_nodes(3).await;
    let victim_url = nodes[0].url.clone();
    let victim_id = nodes[0].node_id.clone();

    // Steady load: one chat every 20 ms; every one must be accepted.
    let load = {
        let url = backend.url("/api/chat");
        tokio::spawn(async move {
            let client = http();
            let mut served = Vec::new();
            for i in 0..150 {
                let body = json!({"session_id": format!("load-{}", i % 7), "message": format!("load {i}")});
                let res = client.post(&url).json(&body).send().await.unwrap();
                assert_eq!(res.status(), 202, "chat {i} during the node's death was refused");
                let accepted: serde_json::Value = res.json().await.unwrap();
                served.push(accepted["node"].as_str().unwrap().to_owned());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            served
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].kill();
    let served = load.await.expect("no chat failed under load");
    assert_eq!(served.len(), 150);
    let after_kill = &served[served.len() - 50..];
    assert!(after_kill.iter().all(|n| *n != victim_url), "the dead node is stepped over once it is found out");

    // The node comes back on its address: the health check brings it back into rotation.
    let mut revived = spawn_node_on(&victim_url, &victim_id, &redis);
    let back = eventually(Duration::from_secs(15), || async {
        let health = backend.ai_health().await;
        health["healthy_nodes"] == 3
    })
    .await;
    assert!(back, "the restarted node rejoined");
    let mut nodes_seen = std::collections::HashSet::new();
    for i in 0..6 {
        nodes_seen.insert(backend.chat(&unique("s"), &format!("after {i}")).await.node);
    }
    let _ = revived.kill();
    let _ = revived.wait();
    assert!(nodes_seen.contains(&victim_url), "round-robin reaches the revived node again: {nodes_seen:?}");
}

#[tokio::test]
async fn a_backend_that_loses_redis_is_unready_and_closes_its_sockets_with_1012_then_is_ready_again() {
    let mut redis = OwnRedis::start_persistent();
    let node = AiNode::start(&redis.url(), Pace::QUICK).await;
    let backend =
        Backend::builder(&redis.url(), &[&node]).set("stream", "close_when_store_lost", "\"3s\"").start().await;
    backend.wait_healthy_nodes(1).await;
    let ready = || async { http().get(backend.url("/ready")).send().await.unwrap() };
    let res = ready().await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["status"], "ready");

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("hello").await;
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);

    redis.stop();
    let lost = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async { ready().await.status() == 503 }).await,
        "/ready answers 503 once Redis is gone"
    );
    let body: serde_json::Value = ready().await.json().await.unwrap();
    assert_eq!(body["status"], "unready", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("event store"), "{body}");
    // Liveness is not readiness: the process is still up.
    assert_eq!(http().get(backend.url("/health")).send().await.unwrap().status(), 200);

    let close = ws.close_frame(Duration::from_secs(15)).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    assert!(
        lost.elapsed() >= Duration::from_secs(2),
        "not before the store was lost for a while: {:?}",
        lost.elapsed()
    );

    redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || async { ready().await.status() == 200 }).await,
        "ready again once Redis answers"
    );
    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("back").await;
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);
}
