//! Losing the Redis pub/sub connection mid-stream loses nothing: the backend
//! subscribes again and fills the gap from the stored events.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test]
async fn pubsub_connection_killed_mid_stream_loses_no_chunk() {
    // `CLIENT KILL TYPE pubsub` hits every subscriber of a Redis, so this test
    // has a Redis of its own.
    let redis = OwnRedis::start();
    let node = AiNode::start(&redis.url(), Pace::SLOW).await;
    let backend = Backend::start(&redis.url(), &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("keep talking").await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(ws.next_event(&accepted.request_id, EVENT_WAIT).await);
    }
    let killed = redis.kill_pubsub_clients();
    assert!(killed >= 1, "the backend holds a pub/sub connection to kill");

    events.extend(ws.until_end(&accepted.request_id).await);
    assert_complete(&events, 1);
    assert_eq!(events.len() as u64, Pace::SLOW.events(), "every chunk arrives once, then done");
    ws.assert_silent(Duration::from_millis(500)).await;

    // The new subscription serves requests started after the loss too.
    let next = ws.chat("and again").await;
    let events = ws.until_end(&next.request_id).await;
    assert_complete(&events, 1);
    assert_eq!(events.len() as u64, Pace::SLOW.events());
}
