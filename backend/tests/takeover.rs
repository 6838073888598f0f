//! Mid-stream takeover: an AI node killed while it streams an answer; another
//! node continues it after the text already sent, and the client receives the
//! rest with `seq` continuing: no gap, no repeat, the same text as an
//! undisturbed answer.

mod common;

use chat_wire::EventKind;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn another_node_continues_the_answer_of_a_node_killed_mid_stream() {
    let redis = redis_url();
    let mut nodes = [AiNode::start(&redis, Pace::SLOW).await, AiNode::start(&redis, Pace::SLOW).await];
    let backend =
        Backend::builder(&redis, &[&nodes[0], &nodes[1]]).set("stream", "stall_timeout_ms", 1_000).start().await;
    backend.wait_healthy_nodes(2).await;
    let message = "tell me how takeovers work";

    // The undisturbed answer, for comparison (the synthetic engine is deterministic).
    let mut reference = Ws::connect(&backend, &unique("s")).await;
    let accepted = reference.chat(message).await;
    let expected = assert_complete(&reference.until_end(&accepted.request_id).await, 1);

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat(message).await;
    let serving = nodes.iter().position(|n| n.url == accepted.node).expect("one of ours");
    let survivor = nodes[1 - serving].node_id.clone();
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(ws.next_event(&accepted.request_id, EVENT_WAIT).await);
    }
    nodes[serving].kill();
    loop {
        let event = ws.next_event(&accepted.request_id, Duration::from_secs(8)).await;
        let end = event.is_terminal();
        events.push(event);
        if end {
            break;
        }
    }

    let text = assert_complete(&events, 1);
    assert_eq!(events.last().unwrap().kind, EventKind::Done, "{:?}", events.last());
    assert_eq!(text, expected, "the continuation neither repeats nor drops text");
    let last = events.last().unwrap();
    assert_eq!(last.node.as_deref(), Some(survivor.as_str()), "the surviving node finished it");
    assert_eq!(last.epoch, Some(2));
    assert!(events.iter().take(3).all(|e| e.epoch == Some(1)));
    ws.assert_silent(Duration::from_millis(500)).await;

    let metrics = http().get(backend.metrics_url()).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("backend_takeovers_total{outcome=\"continued\"} 1"), "{metrics}");
}
