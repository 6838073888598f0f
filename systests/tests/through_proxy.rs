//! The whole chat flow as a client sees it: the real edge proxy in front of
//! three real backends in front of real AI nodes, all on one Redis. These are
//! the old system's own verification steps (AI health through the proxy, ten
//! chats spread over the nodes, a stopped node stepped over) plus a WebSocket
//! through the proxy, the proxy's status listener, and a backend killed under
//! a streaming client that resumes on another one and misses nothing.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Upper bound on one whole test, so a hang fails instead of stalling the run.
const TEST_WAIT: Duration = Duration::from_secs(120);

fn backends_group(upstreams: &Value) -> Vec<Value> {
    upstreams["upstreams"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["name"] == "backends").or(groups.first()))
        .and_then(|g| g["backends"].as_array())
        .cloned()
        .unwrap_or_default()
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// `POST /api/chat` through the proxy, as in the old system's curl check;
/// returns the answering backend's id and the 202 body.
async fn chat_through(proxy: &EdgeProxy, session_id: &str, message: &str) -> (String, Value) {
    let res = http()
        .post(proxy.url("/api/chat"))
        .json(&json!({"session_id": session_id, "message": message, "user_id": "user1"}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let backend_id = header(&res, "x-backend-id").expect("a chat answer carries X-Backend-Id");
    assert!(header(&res, "x-request-id").is_some(), "the proxy adds X-Request-Id");
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 202, "chat {message} not accepted: {body}");
    assert_eq!(body["status"], "accepted", "{body}");
    assert_eq!(body["session_id"], session_id, "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    (backend_id, body)
}

/// The counters line of nginx `stub_status` text: accepts, handled, requests.
fn stub_status_counters(text: &str) -> [u64; 3] {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "stub_status has four lines: {text:?}");
    assert!(lines[0].starts_with("Active connections: "), "{text:?}");
    assert_eq!(lines[1], "server accepts handled requests", "{text:?}");
    assert!(lines[3].starts_with("Reading: ") && lines[3].contains(" Writing: ") && lines[3].contains(" Waiting: "));
    let nums: Vec<u64> = lines[2].split_whitespace().map(|n| n.parse().expect("a counter")).collect();
    assert_eq!(nums.len(), 3, "{text:?}");
    [nums[0], nums[1], nums[2]]
}

/// Builds (or checks) the binaries before the clock starts: a cold build can
/// take longer than a whole test may.
fn build_binaries() {
    ai_node_bin();
    proxy_bin();
}

#[tokio::test]
async fn the_old_systems_checks_pass_through_the_proxy() {
    build_binaries();
    tokio::time::timeout(TEST_WAIT, old_systems_checks()).await.expect("the test ran out of time");
}

async fn old_systems_checks() {
    let redis = redis_url();
    let mut nodes = [
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
    ];
    let node_refs = [&nodes[0], &nodes[1], &nodes[2]];
    let backends = [
        Backend::start(&redis, &node_refs).await,
        Backend::start(&redis, &node_refs).await,
        Backend::start(&redis, &node_refs).await,
    ];
    for backend in &backends {
        backend.wait_healthy_nodes(3).await;
    }
    let backend_ids: BTreeSet<String> = backends.iter().map(|b| b.backend_id.clone()).collect();
    let proxy = EdgeProxy::start(&[&backends[0], &backends[1], &backends[2]]).await;

    // 1. `curl http://localhost:8080/api/ai-health` shows all AI nodes.
    let last = std::cell::RefCell::new(Value::Null);
    let healthy = eventually(Duration::from_secs(15), || {
        let last = &last;
        let url = proxy.url("/api/ai-health");
        async move {
            let Ok(res) = http().get(url).send().await else { return false };
            if res.status() != 200 {
                return false;
            }
            let backend_id = header(&res, "x-backend-id");
            let request_id = header(&res, "x-request-id");
            let body: Value = res.json().await.unwrap_or_default();
            *last.borrow_mut() = json!({"backend": backend_id, "request_id": request_id, "body": body});
            body["total_nodes"] == 3 && body["healthy_nodes"] == 3
        }
    })
    .await;
    let last = last.into_inner();
    assert!(healthy, "ai-health through the proxy never showed 3 healthy of 3: {last}");
    let sticky = last["backend"].as_str().expect("ai-health answer carries X-Backend-Id").to_owned();
    assert!(backend_ids.contains(&sticky), "X-Backend-Id {sticky} names one of {backend_ids:?}");
    assert!(last["request_id"].as_str().is_some_and(|id| !id.is_empty()), "the proxy adds X-Request-Id: {last}");
    let listed: BTreeSet<&str> =
        last["body"]["nodes"].as_array().unwrap().iter().map(|n| n["url"].as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    assert_eq!(listed, expected, "ai-health lists every AI node: {last}");

    // 2. Ten chats from one client: one sticky backend, spread over the nodes.
    let session = unique("test");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=10 {
        let (backend_id, body) = chat_through(&proxy, &session, &i.to_string()).await;
        assert_eq!(backend_id, sticky, "one client stays on one backend");
        *per_node.entry(body["node"].as_str().expect("node").to_owned()).or_default() += 1;
    }
    let used: BTreeSet<&str> = per_node.keys().map(String::as_str).collect();
    assert_eq!(used, expected, "ten chats reach all three nodes: {per_node:?}");
    assert!(per_node.values().all(|n| (3..=4).contains(n)), "round-robin gives each node 3 or 4: {per_node:?}");

    // 3. A stopped AI node: chats still succeed, through the others.
    nodes[1].kill();
    let dead = nodes[1].url.clone();
    for i in 1..=6 {
        let (_, body) = chat_through(&proxy, &session, &format!("after the kill {i}")).await;
        assert_ne!(body["node"], dead.as_str(), "a dead node cannot have accepted the chat: {body}");
    }

    // A WebSocket through the proxy streams a whole answer.
    let (mut ws, ws_backend) = Ws::connect_url(&proxy.ws_url(&unique("s"))).await;
    assert!(ws_backend.is_some_and(|id| backend_ids.contains(&id)), "the upgrade answer carries X-Backend-Id");
    let accepted = ws.chat("tell me a story").await;
    assert_ne!(accepted.node, dead);
    let events = ws.until_end(&accepted.request_id).await;
    let text = assert_complete(&events, 1);
    assert!(!text.trim().is_empty(), "the deltas make a non-empty answer");
    assert_eq!(events.len() as u64, Pace::QUICK.events());

    // The proxy's status listener counts the traffic and lists the backends.
    let res = http().get(proxy.status_url("/nginx-status")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let [accepts, handled, requests] = stub_status_counters(&text);
    assert!(accepts > 0 && handled > 0 && requests > 0, "counters count: {text:?}");
    assert!(requests >= 17, "at least the ai-health, 16 chats and the upgrade were counted: {text:?}");
    let upstreams: Value = http().get(proxy.status_url("/upstreams")).send().await.unwrap().json().await.unwrap();
    let mut listed: Vec<String> =
        backends_group(&upstreams).iter().map(|b| b["addr"].as_str().unwrap_or_default().to_owned()).collect();
    listed.sort();
    let mut expected: Vec<String> = backends.iter().map(|b| format!("127.0.0.1:{}", b.port)).collect();
    expected.sort();
    assert_eq!(listed, expected, "/upstreams lists the three backends: {upstreams}");
}

#[tokio::test]
async fn a_backend_killed_mid_stream_loses_nothing_for_a_client_that_resumes_through_the_proxy() {
    build_binaries();
    tokio::time::timeout(TEST_WAIT, backend_killed_mid_stream()).await.expect("the test ran out of time");
}

async fn backend_killed_mid_stream() {
    /// Events the client has read when its backend dies.
    const SEEN_BEFORE_KILL: u64 = 5;
    // About four seconds of answer: the kill lands well inside it.
    let pace = Pace { first_token_ms: 5, tokens_per_second: 10.0, answer_tokens: 40 };
    let redis = redis_url();
    let nodes = [AiNode::start(&redis, pace).await, AiNode::start(&redis, pace).await];
    let node_refs = [&nodes[0], &nodes[1]];
    let mut backends: Vec<Option<Backend>> = Vec::new();
    for _ in 0..3 {
        let backend = Backend::start(&redis, &node_refs).await;
        backend.wait_healthy_nodes(2).await;
        backends.push(Some(backend));
    }
    let proxy = {
        let refs: Vec<&Backend> = backends.iter().flatten().collect();
        EdgeProxy::start(&refs).await
    };

    let session = unique("s");
    let (mut ws, first_backend) = Ws::connect_url(&proxy.ws_url(&session)).await;
    let first_backend = first_backend.expect("the upgrade answer carries X-Backend-Id");
    let accepted = ws.chat("a long answer, please").await;
    let mut seen = Vec::new();
    for _ in 0..SEEN_BEFORE_KILL {
        seen.push(ws.next_event(&accepted.request_id, EVENT_WAIT).await);
    }

    // SIGKILL the backend this client's socket goes through.
    let victim = backends
        .iter_mut()
        .find(|b| b.as_ref().is_some_and(|b| b.backend_id == first_backend))
        .expect("the socket's backend is one of ours");
    drop(victim.take());
    let killed_at = Instant::now();

    // The proxy must cut the client's socket; whatever arrived before counts as seen.
    let (more, cut) = ws
        .events_until_cut(&accepted.request_id, Duration::from_secs(10))
        .await
        .expect("the proxy neither cut the socket nor ended the stream within 10 s of the backend's death");
    seen.extend(more);
    assert!(cut, "the stream cannot have ended on a dead backend's socket: {seen:?}");
    let cut_after = killed_at.elapsed();
    drop(ws);
    assert!(!seen.last().unwrap().is_terminal(), "the kill landed mid-stream: {seen:?}");
    let last_seq = seen.last().unwrap().seq;

    // Reconnect through the proxy: it lands on a live backend; resume after
    // the last seq seen.
    let (mut ws, second_backend) = Ws::connect_url(&proxy.ws_url(&session)).await;
    let second_backend = second_backend.expect("the upgrade answer carries X-Backend-Id");
    assert_ne!(second_backend, first_backend, "the proxy cannot route to a dead backend");
    ws.resume(&accepted.request_id, last_seq).await;
    let rest = ws.until_end(&accepted.request_id).await;
    assert_complete(&rest, last_seq + 1);

    let mut all = seen;
    all.extend(rest);
    let text = assert_complete(&all, 1);
    assert!(!text.trim().is_empty());
    assert_eq!(all.len() as u64, pace.events(), "every seq once, 1 to done (socket cut {cut_after:?} after the kill)");
    ws.assert_silent(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn every_websocket_through_the_proxy_carries_frames_both_ways() {
    build_binaries();
    tokio::time::timeout(TEST_WAIT, many_websockets()).await.expect("the test ran out of time");
}

/// Opens socket after socket through the proxy, each after a plain request
/// that leaves a warm upstream connection for the upgrade to reuse, and each
/// must answer a first frame sent right after the upgrade. A tunnel the proxy
/// tears down at once shows up as a reset or EOF instead of an answer: Pingora
/// 0.9.1 takes the end of the upgrade request's empty body, when it is handled
/// after a fast backend's 101, for the end of the tunnel
/// (cloudflare/pingora#946, `proxy_handle_upstream` in `proxy_h1.rs`).
async fn many_websockets() {
    const SOCKETS: usize = 100;
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    let proxy = EdgeProxy::start(&[&backend]).await;
    for i in 0..SOCKETS {
        // Leaves an idle upstream connection in the proxy's pool for the
        // upgrade to reuse, as a client's earlier requests would.
        let res = http().get(proxy.url("/api/ai-health")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let (mut ws, _) = Ws::connect_url(&proxy.ws_url(&unique("s"))).await;
        ws.send_json(json!({"type": "no-such-frame", "n": i})).await;
        let frame = ws
            .next_frame_or_cut(EVENT_WAIT)
            .await
            .unwrap_or_else(|cut| panic!("socket {i} of {SOCKETS} through the proxy was cut before any answer: {cut}"));
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["code"], "invalid_frame", "{frame}");
    }
}

#[tokio::test]
async fn two_thousand_sockets_opening_chatting_and_closing_at_random_never_mark_a_backend_down() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;

    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backends = [Backend::start(&redis, &[&node]).await, Backend::start(&redis, &[&node]).await];
    for b in &backends {
        b.wait_healthy_nodes(1).await;
    }
    let proxy = EdgeProxy::start(&[&backends[0], &backends[1]]).await;

    // Watches the proxy's view of the backends all along (checks every 200 ms, fall = 1).
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (stop, url) = (stop.clone(), proxy.status_url("/upstreams"));
        tokio::spawn(async move {
            let mut downs = Vec::new();
            while !stop.is_cancelled() {
                if let Ok(res) = http().get(&url).send().await {
                    let v: Value = res.json().await.unwrap_or_default();
                    for b in backends_group(&v) {
                        if b["health"] != "up" {
                            downs.push(b.to_string());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            downs
        })
    };

    let seed = 0x005e_edc4_u64;
    let opened = std::sync::atomic::AtomicU64::new(0);
    futures::stream::iter(0..2_000u64)
        .for_each_concurrent(50, |i| {
            let url = proxy.ws_url(&unique("churn"));
            let opened = &opened;
            async move {
                let mut rng = fastrand::Rng::with_seed(seed + i);
                let Ok(Ok((mut ws, _))) =
                    tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url.as_str())).await
                else {
                    return;
                };
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if rng.bool() {
                    let chat = json!({"type": "chat", "message": format!("churn {i}")}).to_string();
                    let _ = ws.send(Message::text(chat)).await;
                    for _ in 0..rng.usize(0..4) {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                    }
                }
                if rng.bool() {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                }
                // Dropped at once either way: with or without a close, unread frames or not.
                drop(ws);
            }
        })
        .await;
    stop.cancel();
    let downs = watcher.await.unwrap();
    assert!(opened.into_inner() >= 1_900, "the sockets opened");
    assert!(downs.is_empty(), "a healthy backend was marked down: {downs:?}");
    let metrics = http().get(proxy.status_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let ejections: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("proxy_upstream_passive_ejections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(ejections, 0, "no passive ejection: {metrics}");
}
