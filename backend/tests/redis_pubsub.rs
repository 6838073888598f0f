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

#[tokio::test]
async fn a_subscribe_refused_on_a_live_connection_is_retried_until_it_holds() {
    // The backend connects as a user whose channel rights an ACL change takes
    // away and gives back: its SUBSCRIBE then fails on a connection that stays up.
    let redis = OwnRedis::start();
    redis.command(&["ACL", "SETUSER", "gateway", "on", ">pw", "~*", "allchannels", "+@all"]);
    let gateway_url = redis.url().replace("redis://", "redis://gateway:pw@");
    let node = AiNode::start(&redis.url(), Pace::QUICK).await;
    // Stall checks a minute apart: the answer below can only come live.
    let backend = Backend::builder(&gateway_url, &[&node]).set("stream", "stall_timeout_ms", 60_000).start().await;
    backend.wait_healthy_nodes(1).await;
    let reconnects = "backend_pubsub_reconnects_total ";
    let before = metric(&backend, reconnects).await;

    redis.command(&["ACL", "SETUSER", "gateway", "resetchannels"]);
    let mut ws = Ws::connect(&backend, &unique("s")).await;
    // The socket's SUBSCRIBE is refused (NOPERM); give the rights back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.command(&["ACL", "SETUSER", "gateway", "allchannels"]);

    // The backend reconnects and subscribes every attached session again
    // (counted only once they all hold), within its backoff of at most 2 s.
    let resubscribed = eventually(Duration::from_secs(10), || async { metric(&backend, reconnects).await > before });
    assert!(resubscribed.await, "the refused SUBSCRIBE was never retried");
    let accepted = ws.chat("are you subscribed?").await;
    let events = ws.until_end(&accepted.request_id).await;
    assert_complete(&events, 1);
    assert_eq!(events.len() as u64, Pace::QUICK.events(), "the answer came live, whole");
}
