//! Exactly once under real timing: clients that resume late, twice or past
//! the end; producers that are silent, paused or dead. Every socket sees each
//! `seq` once, in order, with no gap from where it started, and a producer
//! that is alive is never taken over.

mod common;

use chat_wire::EventKind;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Every frame of `request_id` (events and notices) until its end or `quiet` of silence.
async fn frames_of(ws: &mut Ws, request_id: &str, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let frame = match tokio::time::timeout(quiet, ws.next_json(quiet * 2)).await {
            Ok(frame) => frame,
            Err(_) => return out,
        };
        if frame["request_id"] != request_id {
            continue;
        }
        let end = matches!(frame["type"].as_str(), Some("done")) || (frame["type"] == "error" && frame["seq"].is_u64());
        out.push(frame);
        if end {
            return out;
        }
    }
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}

#[tokio::test]
async fn a_late_resume_after_live_events_repeats_nothing() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s");

    let mut first = Ws::connect(&backend, &session).await;
    let accepted = first.chat("drop me after three").await;
    for seq in 1..=3 {
        assert_eq!(first.next_event(&accepted.request_id, EVENT_WAIT).await.seq, seq);
    }
    first.drop_abruptly();

    // Reconnect on the same session; live events of the answer reach the new
    // socket first, and the `resume` comes 300 ms later, as a phone's would.
    let mut second = Ws::connect(&backend, &session).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.resume(&accepted.request_id, 3).await;
    // And once more, late and from further back: still nothing twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.resume(&accepted.request_id, 1).await;
    let frames = frames_of(&mut second, &accepted.request_id, Duration::from_secs(5)).await;
    let got = seqs(&frames);
    let expected: Vec<u64> = (got[0]..=Pace::SLOW.events()).collect();
    assert_eq!(got, expected, "each seq once, in order, to the end: {frames:?}");
    assert!(got[0] <= 4, "the socket starts no later than the resume point");
    assert_eq!(frames.last().unwrap()["type"], "done");
    second.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_resume_past_the_end_waits_and_never_takes_a_healthy_answer_over() {
    let redis = redis_url();
    let nodes = [AiNode::start(&redis, Pace::SLOW).await, AiNode::start(&redis, Pace::SLOW).await];
    let backend =
        Backend::builder(&redis, &[&nodes[0], &nodes[1]]).set("stream", "stall_timeout_ms", 500).start().await;
    backend.wait_healthy_nodes(2).await;
    let session = unique("s");

    let mut asker = Ws::connect(&backend, &session).await;
    let accepted = asker.chat("a healthy answer").await;
    assert_eq!(asker.next_event(&accepted.request_id, EVENT_WAIT).await.seq, 1);
    let mut greedy = Ws::connect(&backend, &session).await;
    greedy.resume(&accepted.request_id, 1_000).await;
    let mut greediest = Ws::connect(&backend, &session).await;
    greediest.resume(&accepted.request_id, u64::MAX).await;

    let rest = asker.until_end(&accepted.request_id).await;
    assert_eq!(rest.last().unwrap().kind, EventKind::Done);
    assert!(rest.iter().all(|e| e.epoch == Some(1)), "the producer was never replaced: {rest:?}");
    for ws in [&mut greedy, &mut greediest] {
        // Live events at or below their cursor are not sent (a chunk may come
        // before the resume frame is read); the end is told.
        let mut frame = ws.next_json(EVENT_WAIT).await;
        while frame["type"] == "chunk" {
            frame = ws.next_json(EVENT_WAIT).await;
        }
        assert_eq!(frame["code"], "resume_past_end", "{frame}");
        assert!(frame["seq"].is_null(), "a notice, not an event of the request: {frame}");
        ws.assert_silent(Duration::from_millis(300)).await;
    }
    assert_eq!(metric(&backend, "backend_takeovers_total{outcome=\"continued\"}").await, 0);
}

#[tokio::test]
async fn a_silent_producer_that_is_alive_is_not_taken_over() {
    let redis = redis_url();
    // The first piece takes 4 s (a model thinking), far past the 0.5 s stall timeout
    // and the 1.5 s lease: only the lease, renewed meanwhile, says the node is alive.
    let pace = Pace { first_token_ms: 4_000, tokens_per_second: 50.0, answer_tokens: 5 };
    let nodes = [AiNode::start(&redis, pace).await, AiNode::start(&redis, pace).await];
    let backend =
        Backend::builder(&redis, &[&nodes[0], &nodes[1]]).set("stream", "stall_timeout_ms", 500).start().await;
    backend.wait_healthy_nodes(2).await;

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("think first").await;
    let events = ws.until_end(&accepted.request_id).await;
    assert_complete(&events, 1);
    assert!(events.iter().all(|e| e.epoch == Some(1)), "{events:?}");
    assert!(
        metric(&backend, "backend_takeovers_total{outcome=\"producer_alive\"}").await >= 1,
        "the stall was checked"
    );
    assert_eq!(metric(&backend, "backend_takeovers_total{outcome=\"continued\"}").await, 0);
}

#[tokio::test]
async fn a_node_paused_past_its_lease_is_taken_over_and_fenced_off_when_it_wakes() {
    let redis = redis_url();
    let nodes = [AiNode::start(&redis, Pace::SLOW).await, AiNode::start(&redis, Pace::SLOW).await];
    let backend =
        Backend::builder(&redis, &[&nodes[0], &nodes[1]]).set("stream", "stall_timeout_ms", 500).start().await;
    backend.wait_healthy_nodes(2).await;
    let message = "pause in the middle";
    let mut reference = Ws::connect(&backend, &unique("s")).await;
    let accepted = reference.chat(message).await;
    let expected = assert_complete(&reference.until_end(&accepted.request_id).await, 1);

    // Paused for less than the lease: the same node finishes.
    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let short = ws.chat(message).await;
    let serving = nodes.iter().position(|n| n.url == short.node).unwrap();
    let mut events = vec![ws.next_event(&short.request_id, EVENT_WAIT).await];
    nodes[serving].pause();
    tokio::time::sleep(Duration::from_millis(NODE_LEASE_MS / 2)).await;
    nodes[serving].unpause();
    events.extend(ws.until_end(&short.request_id).await);
    assert_eq!(assert_complete(&events, 1), expected);
    assert!(events.iter().all(|e| e.epoch == Some(1)), "a short pause is no death: {events:?}");

    // Paused for three leases: another node continues; the old one, woken,
    // is fenced off and nothing it produced late reaches anyone.
    let long = ws.chat(message).await;
    let serving = nodes.iter().position(|n| n.url == long.node).unwrap();
    let mut events = vec![ws.next_event(&long.request_id, EVENT_WAIT).await];
    nodes[serving].pause();
    tokio::time::sleep(Duration::from_millis(NODE_LEASE_MS * 3)).await;
    nodes[serving].unpause();
    events.extend(ws.until_end(&long.request_id).await);
    assert_eq!(assert_complete(&events, 1), expected, "no text twice, none lost");
    assert_eq!(events.last().unwrap().epoch, Some(2), "{events:?}");
    assert_eq!(events.last().unwrap().node.as_deref(), Some(nodes[1 - serving].node_id.as_str()));
    ws.assert_silent(Duration::from_millis(1_000)).await;
    assert_eq!(metric(&backend, "backend_takeovers_total{outcome=\"continued\"}").await, 1);
}

#[tokio::test]
async fn resume_frames_are_rate_limited_and_the_socket_stays_open() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("resume me a lot").await;
    ws.until_end(&accepted.request_id).await;

    for _ in 0..200 {
        ws.send_json(json!({"type": "resume", "request_id": accepted.request_id, "after_seq": 0})).await;
    }
    let mut limited = 0;
    let mut replayed = 0;
    let mut frames = 0;
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(1), ws.next_json(Duration::from_secs(2))).await {
        frames += 1;
        match frame["code"].as_str() {
            Some("rate_limited") => limited += 1,
            _ if frame["seq"].is_u64() => replayed += 1,
            _ => {}
        }
    }
    assert!(limited >= 100, "most of 200 resume frames at once are refused: {limited} of {frames}");
    assert_eq!(replayed, 0, "a socket that has the whole answer is sent none of it again");
    assert!(metric(&backend, "backend_resumes_limited_total").await >= 100);
    // Still open, and still serving.
    let next = ws.chat("still here?").await;
    assert_complete(&ws.until_end(&next.request_id).await, 1);
}

#[tokio::test]
async fn an_sse_stream_resumes_on_another_backend_with_last_event_id() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let backends = [Backend::start(&redis, &[&node]).await, Backend::start(&redis, &[&node]).await];
    backends[0].wait_healthy_nodes(1).await;
    let session = unique("s");

    let res = http()
        .post(backends[0].url("/api/chat"))
        .header("accept", "text/event-stream")
        .json(&json!({"session_id": session, "message": "stream me over SSE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut text = String::new();
    use futures::StreamExt;
    while text.matches("\n\n").count() < 3 {
        let chunk = tokio::time::timeout(EVENT_WAIT, body.next()).await.expect("SSE in time").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(body);
    let first: Vec<Value> = sse_data(&text);
    let request_id = first[0]["request_id"].as_str().unwrap().to_owned();
    let last_id = first.last().unwrap()["seq"].as_u64().unwrap();

    let res = http()
        .get(backends[1].url(&format!("/api/chat/{request_id}/events")))
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rest = sse_data(&tokio::time::timeout(Duration::from_secs(15), res.text()).await.unwrap().unwrap());
    let all: Vec<u64> = first.iter().chain(&rest).map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(all, (1..=Pace::SLOW.events()).collect::<Vec<_>>(), "nothing lost, nothing twice");
    assert_eq!(rest.last().unwrap()["type"], "done");

    let unknown = http().get(backends[1].url("/api/chat/r-nothing-here/events")).send().await.unwrap();
    assert_error(unknown, 404).await;
    let bad = http()
        .get(backends[1].url(&format!("/api/chat/{request_id}/events")))
        .header("last-event-id", "seven")
        .send()
        .await
        .unwrap();
    assert_error(bad, 400).await;
}

/// The JSON `data:` of every complete SSE event in `text`.
fn sse_data(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect()
}

#[tokio::test]
async fn an_sse_reader_too_slow_gets_a_last_error_and_resumes_the_rest() {
    let redis = redis_url();
    // 40,000 events as fast as the node can: about 10 MB of SSE, more than
    // the socket buffers and the backend's 64-event queue hold.
    let pace = Pace { first_token_ms: 1, tokens_per_second: 0.0, answer_tokens: 40_000 };
    let node = AiNode::start_keeping(&redis, pace, 50_000).await;
    let backend = Backend::builder(&redis, &[&node])
        .set("limits", "ws_send_queue", 64)
        .set("limits", "ws_send_timeout_ms", 5_000)
        .start()
        .await;
    backend.wait_healthy_nodes(1).await;

    // No overall timeout on these long bodies: the deadlines below bound them.
    let web = reqwest::Client::new();
    let res = web
        .post(backend.url("/api/chat"))
        .header("accept", "text/event-stream")
        .json(&json!({"session_id": unique("s"), "message": "flood the stream"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Read nothing until the backend gives up on this reader.
    let slow = "backend_ws_slow_consumers_total ";
    assert!(eventually(Duration::from_secs(40), || async { metric(&backend, slow).await > 0 }).await, "never dropped");
    let text = tokio::time::timeout(Duration::from_secs(60), res.text()).await.expect("the stream ends").unwrap();
    let got = sse_data(&text);
    let last = got.last().unwrap();
    assert_eq!((last["type"].as_str(), last["code"].as_str()), (Some("error"), Some("too_slow")), "{last}");
    assert!(!text.trim_end().rsplit("\n\n").next().unwrap().contains("id:"), "the notice has no id");
    let seqs: Vec<u64> = got.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "in order, no gap, up to the drop");
    let request_id = got[0]["request_id"].as_str().unwrap();

    // Resumed once the answer is whole (resumed while the producer still
    // outran it, this reader would be dropped again, as it should be).
    let client = redis::Client::open(redis.as_str()).unwrap();
    let ended = eventually(Duration::from_secs(60), || {
        let client = client.clone();
        let key = chat_wire::keys::request_claim(&request_id);
        async move {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let ended: Option<u64> = redis::cmd("HGET").arg(key).arg("ended").query_async(&mut conn).await.unwrap();
            ended.is_some()
        }
    });
    assert!(ended.await, "the answer ended");
    let rest = web
        .get(backend.url(&format!("/api/chat/{request_id}/events")))
        .header("last-event-id", seqs.len().to_string())
        .send()
        .await
        .unwrap();
    let rest = sse_data(&tokio::time::timeout(Duration::from_secs(60), rest.text()).await.unwrap().unwrap());
    let resumed: Vec<u64> = rest.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let all: Vec<u64> = seqs.iter().copied().chain(resumed.iter().copied()).collect();
    let first_wrong = all.iter().enumerate().find(|(i, s)| **s != *i as u64 + 1);
    assert!(
        first_wrong.is_none() && all.len() as u64 == pace.events(),
        "the resume brings the rest, nothing twice: {} before the drop, {} resumed (from {:?}), {} in all, first out of place {first_wrong:?}; last resumed frame {}",
        seqs.len(),
        resumed.len(),
        resumed.first(),
        all.len(),
        rest.last().map(|v| v.to_string()).unwrap_or_default()
    );
}
