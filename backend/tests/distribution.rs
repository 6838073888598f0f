//! Chats are spread round-robin over the healthy AI nodes, and a node that
//! dies is stepped over at once, before any health check has noticed.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};

#[tokio::test]
async fn nine_chats_over_three_healthy_nodes_go_three_to_each() {
    let redis = redis_url();
    let nodes = [
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
        AiNode::start(&redis, Pace::QUICK).await,
    ];
    let backend = Backend::start(&redis, &[&nodes[0], &nodes[1], &nodes[2]]).await;
    backend.wait_healthy_nodes(3).await;

    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..9 {
        let accepted = backend.chat(&unique("s"), &format!("question {i}")).await;
        *per_node.entry(accepted.node).or_default() += 1;
    }

    let expected: BTreeMap<String, usize> = nodes.iter().map(|n| (n.url.clone(), 3)).collect();
    assert_eq!(per_node, expected, "each node, named by its configured URL, takes three chats");
}

#[tokio::test]
async fn a_killed_node_is_stepped_over_before_the_health_check_notices() {
    let redis = redis_url();
    // The first piece comes late enough that the socket below is surely
    // subscribed before the answer starts.
    let pace = Pace { first_token_ms: 200, ..Pace::QUICK };
    let mut nodes =
        [AiNode::start(&redis, pace).await, AiNode::start(&redis, pace).await, AiNode::start(&redis, pace).await];
    // Only the check at start runs: whatever follows, the backend learns from
    // its own failed attempts.
    let backend = Backend::builder(&redis, &[&nodes[0], &nodes[1], &nodes[2]])
        .set("ai", "health_interval_ms", 60_000)
        .set("ai", "request_timeout_ms", 2_000)
        .start()
        .await;
    backend.wait_healthy_nodes(3).await;
    nodes[1].kill();
    let dead = nodes[1].url.clone();

    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..6 {
        let session = unique("s");
        let mut ws = Ws::connect(&backend, &session).await;
        let accepted = backend.chat(&session, &format!("still there? {i}")).await;
        assert_ne!(accepted.node, dead, "a dead node cannot have accepted the chat");
        let events = ws.until_end(&accepted.request_id).await;
        let text = assert_complete(&events, 1);
        assert!(!text.is_empty());
        assert_eq!(events.len() as u64, pace.events());
        *served_by.entry(accepted.node).or_default() += 1;
    }

    let survivors = BTreeSet::from([nodes[0].url.clone(), nodes[2].url.clone()]);
    assert_eq!(served_by.keys().cloned().collect::<BTreeSet<_>>(), survivors, "both survivors share the load");
}
