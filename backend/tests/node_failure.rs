//! An AI node that dies mid-answer goes quiet rather than saying so; the
//! backend notices the silence and ends the request with an error event.

mod common;

use chat_wire::EventKind;
use common::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn node_killed_mid_stream_ends_the_request_with_node_failed_within_the_stall_deadline() {
    let redis = redis_url();
    // A long answer: it would run for 20 s if the node lived.
    let pace = Pace { first_token_ms: 5, tokens_per_second: 10.0, answer_tokens: 200 };
    let mut node = AiNode::start(&redis, pace).await;
    let backend = Backend::builder(&redis, &[&node]).set("stream", "stall_timeout_ms", 1_500).start().await;
    backend.wait_healthy_nodes(1).await;

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("this will not end well").await;
    let mut last_seq = 0;
    for _ in 0..2 {
        let event = ws.next_event(&accepted.request_id, EVENT_WAIT).await;
        assert_eq!(event.kind, EventKind::Chunk);
        last_seq = event.seq;
    }
    node.kill();
    let killed_at = Instant::now();

    // Chunks already on their way may still arrive; then the error.
    let error = loop {
        let event = ws.next_event(&accepted.request_id, Duration::from_secs(6)).await;
        assert_eq!(event.seq, last_seq + 1, "seq neither repeats nor skips: {event:?}");
        last_seq = event.seq;
        if event.is_terminal() {
            break event;
        }
    };
    let waited = killed_at.elapsed();
    assert_eq!(error.kind, EventKind::Error, "{error:?}");
    assert_eq!(error.code.as_deref(), Some("node_failed"), "{error:?}");
    assert!(error.message.as_deref().is_some_and(|m| !m.is_empty()), "{error:?}");
    assert!(waited < Duration::from_secs(6), "error came {waited:?} after the kill");
    ws.assert_silent(Duration::from_millis(500)).await;
}
