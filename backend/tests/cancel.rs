//! Cancellation: by a socket frame, by `DELETE /api/chat/{id}`, racing a
//! takeover, and by abandonment (no reader left). Every reader, on every
//! backend, gets one stored `error` with code `cancelled`; the node stops
//! generating; nothing continues the answer. With keys on, the tokens of the
//! answer are charged to its key and count against its per-minute limit.

mod common;

use chat_wire::{Event, EventKind};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Every stored event of `request_id`, read through `GET .../events` until the stream ends.
async fn stored(backend: &Backend, request_id: &str) -> Vec<Event> {
    let res = http().get(backend.url(&format!("/api/chat/{request_id}/events"))).send().await.unwrap();
    let body = tokio::time::timeout(STREAM_WAIT, res.text()).await.expect("the stream ends").unwrap();
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| Event::from_json(d).unwrap()).collect()
}

/// Asserts `events` are chunks 1..n then one `cancelled` error at n+1.
fn assert_cancelled(events: &[Event]) {
    let (last, chunks) = events.split_last().expect("events");
    assert_eq!(last.kind, EventKind::Error, "{last:?}");
    assert_eq!(last.code.as_deref(), Some("cancelled"), "{last:?}");
    assert!(chunks.iter().all(|e| e.kind == EventKind::Chunk));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "no gap, no repeat");
}

#[tokio::test]
async fn a_socket_cancels_its_answer_and_every_reader_gets_the_stored_end() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let first = Backend::start(&redis, &[&node]).await;
    let second = Backend::start(&redis, &[&node]).await;
    first.wait_healthy_nodes(1).await;
    let session = unique("s-cancel");
    let mut ws = Ws::connect(&first, &session).await;
    let mut watcher = Ws::connect(&second, &session).await;
    let accepted = ws.chat("a long answer, please").await;
    for _ in 0..3 {
        ws.next_event(&accepted.request_id, EVENT_WAIT).await;
    }
    ws.send_json(json!({"type": "cancel", "request_id": accepted.request_id})).await;
    let seen = ws.until_end(&accepted.request_id).await;
    let last = seen.last().unwrap();
    assert_eq!((last.kind, last.code.as_deref()), (EventKind::Error, Some("cancelled")), "{last:?}");
    let total = Pace::SLOW.events();
    assert!(last.seq < total, "the answer stopped early: {} of {total}", last.seq);
    let usage = last.usage.expect("the end carries usage");
    assert_eq!(usage.completion_tokens, last.seq - 1, "the chunks produced are counted");

    // The other backend's reader saw the same end, and the stored stream is whole.
    let watched = watcher.until_end(&accepted.request_id).await;
    assert_eq!(watched.last().unwrap(), last);
    let events = stored(&second, &accepted.request_id).await;
    assert_cancelled(&events);
    // The node stopped: nothing is stored after the end, whatever the wait.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(stored(&first, &accepted.request_id).await.len(), events.len());
}

#[tokio::test]
async fn delete_cancels_once_and_tells_an_ended_or_unknown_request_apart() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let accepted = backend.chat(&unique("s-del"), "long one").await;
    let url = backend.url(&format!("/api/chat/{}", accepted.request_id));

    let res = http().delete(&url).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "cancelling", "{body}");
    assert_cancelled(&stored(&backend, &accepted.request_id).await);
    let again: Value = http().delete(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["status"], "ended", "{again}");

    assert_eq!(
        assert_error(http().delete(backend.url("/api/chat/r-unknown")).send().await.unwrap(), 404).await,
        "unknown_request"
    );
    assert_eq!(
        assert_error(http().delete(backend.url("/api/chat/bad%20id")).send().await.unwrap(), 400).await,
        "invalid_request"
    );
    let mut ws = Ws::connect(&backend, &unique("s-del")).await;
    ws.send_json(json!({"type": "cancel", "request_id": "r-unknown"})).await;
    let frame = ws.next_json(EVENT_WAIT).await;
    assert_eq!((frame["type"].as_str(), frame["code"].as_str()), (Some("error"), Some("unknown_request")), "{frame}");
    assert_eq!(metric(&backend, "backend_cancels_total{how=\"client\"}").await, 1);
}

#[tokio::test]
async fn a_cancel_racing_a_takeover_ends_the_answer_and_nothing_continues_it() {
    let redis = redis_url();
    let mut paused = AiNode::start(&redis, Pace::SLOW).await;
    // No stall check offers it for takeover first: the cancel finds it orphaned.
    let backend = Backend::builder(&redis, &[&paused]).set("stream", "stall_timeout", "\"30s\"").start().await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s-race");
    let mut ws = Ws::connect(&backend, &session).await;
    let accepted = ws.chat("long").await;
    ws.next_event(&accepted.request_id, EVENT_WAIT).await;
    // The producer freezes; once its lease lapses the request has no producer.
    paused.pause();
    let spare = AiNode::start(&redis, Pace::QUICK).await;
    tokio::time::sleep(Duration::from_millis(NODE_LEASE_MS + 500)).await;
    let res = http().delete(backend.url(&format!("/api/chat/{}", accepted.request_id))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let seen = ws.until_end(&accepted.request_id).await;
    assert_eq!(seen.last().unwrap().code.as_deref(), Some("cancelled"));

    // The frozen node wakes: nothing it still sends is stored, and no node continued it.
    paused.unpause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = stored(&backend, &accepted.request_id).await;
    assert_cancelled(&events);
    assert!(events.iter().all(|e| e.node.as_deref() != Some(spare.node_id.as_str())), "the spare node took nothing");
    assert_eq!(
        metric(&backend, "backend_takeovers_total{outcome=\"cancelled\"}").await,
        1,
        "the backend stored the end"
    );
    paused.kill();
}

#[tokio::test]
async fn an_answer_no_reader_follows_is_cancelled_as_abandoned() {
    let redis = redis_url();
    let slow = Pace { first_token_ms: 5, tokens_per_second: 4.0, answer_tokens: 400 };
    let node = AiNode::start_configured(&redis, slow, "[stream]\nabandon_after = \"15s\"\n").await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s-left");
    // Followed by a socket for a while, then the client leaves.
    let mut ws = Ws::connect(&backend, &session).await;
    let accepted = ws.chat("tell me everything").await;
    ws.next_event(&accepted.request_id, EVENT_WAIT).await;
    ws.drop_abruptly();
    // Within abandon_after plus a lease renewal the node stores the end.
    let ended = eventually(Duration::from_secs(40), || async {
        let page = stored_events(&redis, &accepted.request_id).await;
        page.last().is_some_and(|e| e.code.as_deref() == Some("cancelled"))
    })
    .await;
    assert!(ended, "an abandoned answer is cancelled");
    let events = stored(&backend, &accepted.request_id).await;
    assert_cancelled(&events);
    assert!(events.len() < 400, "it stopped long before its end");
}

#[tokio::test]
async fn a_keys_answers_are_charged_to_it_and_held_to_its_tokens_per_minute() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let key = unique("sk-tpm");
    let id = unique("tpm");
    let file = dir.path().join("keys.toml");
    std::fs::write(
        &file,
        format!(
            "[[key]]\nid = \"{id}\"\nsha256 = \"{}\"\ntokens_per_minute = 30\nconcurrent_streams = 1\n",
            backend::keys::hash(&key)
        ),
    )
    .unwrap();
    let backend = Backend::builder(&redis, &[&node])
        .set("auth", "enabled", true)
        .set("auth", "keys_file", format!("{:?}", file.display().to_string()))
        .start()
        .await;
    let healthy = eventually(Duration::from_secs(10), || async {
        let res = http().get(backend.url("/api/ai-health")).bearer_auth(&key).send().await.unwrap();
        res.json::<Value>().await.unwrap()["healthy_nodes"].as_u64() >= Some(1)
    })
    .await;
    assert!(healthy);
    let chat = || {
        http()
            .post(backend.url("/api/chat"))
            .bearer_auth(&key)
            .header("accept", "text/event-stream")
            .json(&json!({"session_id": unique("s"), "message": "hi"}))
            .send()
    };
    // Answers of 19 pieces and a short prompt, each read to its end: one
    // runs at a time (an ended one frees its slot) until the key has used
    // 30 tokens this minute; then it is refused for its tokens.
    let mut answered = 0;
    let refused = loop {
        let res = chat().await.unwrap();
        if res.status() == 429 {
            break res.json::<Value>().await.unwrap();
        }
        assert_eq!(res.status(), 200, "only the token limit refuses: the streams one is freed at each end");
        let body = tokio::time::timeout(STREAM_WAIT, res.text()).await.unwrap().unwrap();
        assert!(body.contains("event: done"), "{body}");
        answered += 1;
        assert!(answered <= 6, "30 tokens a minute never held");
    };
    assert!(answered >= 2, "{answered} answers of ~21 tokens before 30 a minute");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("tokens"), "refused for its tokens: {refused}");
    let usage: Value =
        http().get(backend.url("/api/usage")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["requests"], answered, "{usage}");
    assert_eq!(usage["completion_tokens"], answered * (Pace::QUICK.events() - 1), "{usage}");
    assert_eq!(usage["running"], 0, "{usage}");
    let counted = metric(&backend, &format!("backend_key_tokens_total{{key=\"{id}\",kind=\"completion\"}}")).await;
    assert_eq!(counted, answered * (Pace::QUICK.events() - 1), "per-key tokens in the metrics");
}
