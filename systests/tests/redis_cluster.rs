//! The backplane on a real Redis Cluster (three masters, three replicas,
//! started by the test): answers stream whole through sharded pub/sub from
//! sessions on every master, resume on another backend, and a master killed
//! mid-stream is replaced by its replica while the answer still ends whole.

mod common;

use chat_wire::keys;
use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Session ids, one whose channel lives on each master.
fn one_session_per_master(cluster: &OwnRedisCluster) -> Vec<String> {
    let mut masters = BTreeSet::new();
    let mut sessions = Vec::new();
    while masters.len() < 3 {
        let session = unique("s");
        if masters.insert(cluster.master_of(&keys::session_channel(&session))) {
            sessions.push(session);
        }
    }
    sessions
}

/// How many subscribers a shard channel has on the master serving it.
fn shard_subscribers(cluster: &OwnRedisCluster, channel: &str) -> i64 {
    let value = cluster.command_on(cluster.master_of(channel), &["PUBSUB", "SHARDNUMSUB", channel]).unwrap();
    let (_, count): (String, i64) = redis::from_redis_value(value).unwrap();
    count
}

#[tokio::test]
async fn answers_stream_whole_on_every_master_through_sharded_pubsub_and_resume_on_another_backend() {
    let cluster = OwnRedisCluster::start();
    let url = cluster.url();
    let node_a = AiNode::start(&url, Pace::QUICK).await;
    let node_b = AiNode::start(&url, Pace::QUICK).await;
    let first = Backend::start(&url, &[&node_a, &node_b]).await;
    let second = Backend::start(&url, &[&node_a, &node_b]).await;
    first.wait_healthy_nodes(2).await;
    second.wait_healthy_nodes(2).await;

    for session in one_session_per_master(&cluster) {
        let mut ws = Ws::connect(&first, &session).await;
        let channel = keys::session_channel(&session);
        // The socket's session is a shard channel on its slot's master,
        // subscribed once by this backend.
        assert!(
            eventually(Duration::from_secs(5), || async { shard_subscribers(&cluster, &channel) == 1 }).await,
            "{channel} has this backend as its one shard subscriber"
        );
        let accepted = ws.chat("hello cluster").await;
        let all = ws.until_end(&accepted.request_id).await;
        assert!(!assert_complete(&all, 1).is_empty());

        // The request's keys share a slot; its stream holds the whole answer.
        let stream = keys::request_stream(&accepted.request_id);
        assert_eq!(cluster.master_of(&stream), cluster.master_of(&keys::request_claim(&accepted.request_id)));
        assert_eq!(stored_events(&url, &accepted.request_id).await.len() as u64, Pace::QUICK.events());

        // Resumed on the other backend from the middle: the rest, once.
        let mut other = Ws::connect(&second, &session).await;
        other.resume(&accepted.request_id, 5).await;
        let rest = other.until_end(&accepted.request_id).await;
        assert_complete(&rest, 6);
        assert_eq!(deltas(&rest), deltas(&all[5..]), "the same events as the first reader got");
        drop(ws);
        drop(other);
        assert!(
            eventually(Duration::from_secs(5), || async { shard_subscribers(&cluster, &channel) == 0 }).await,
            "the last reader gone, {channel} is unsubscribed"
        );
    }
    // The first backend's readers had their events live (pub/sub), not
    // read back from the streams.
    let delivered = metric(&first, "backend_events_delivered_total").await;
    let replayed = metric(&first, "backend_events_replayed_total").await;
    assert!(delivered >= 3 * Pace::QUICK.events(), "{delivered}");
    assert!(replayed * 4 < delivered, "events came live: {replayed} of {delivered} were read back from streams");
}

fn deltas(events: &[chat_wire::Event]) -> Vec<Option<String>> {
    events.iter().map(|e| e.delta.clone()).collect()
}

/// Kills the master of a streaming request's slot: its replica is promoted,
/// and the answer the client reads still ends whole, without a gap or a
/// repeat. Replication is asynchronous, so the promoted replica may lack the
/// last events the dead master took; the test counts them (printed), and the
/// producer's next write, refused for its gap, hands the answer to a takeover
/// that continues from what the new master holds.
#[tokio::test]
async fn a_master_killed_mid_stream_is_replaced_by_its_replica_and_the_answer_ends_whole() {
    let mut cluster = OwnRedisCluster::start();
    let url = cluster.url();
    let pace = Pace { first_token_ms: 5, tokens_per_second: 10.0, answer_tokens: 80 };
    let node_a = AiNode::start(&url, pace).await;
    let node_b = AiNode::start(&url, pace).await;
    let backend = Backend::builder(&url, &[&node_a, &node_b]).set("stream", "stall_timeout_ms", 1_000).start().await;
    backend.wait_healthy_nodes(2).await;

    let session = unique("s");
    let mut ws = Ws::connect(&backend, &session).await;
    let accepted = ws.chat("a long answer across a failover").await;
    let mut events = Vec::new();
    while events.len() < 10 {
        events.push(ws.next_event(&accepted.request_id, EVENT_WAIT).await);
    }
    let master = cluster.master_of(&keys::request_stream(&accepted.request_id));
    let stored_at_kill = events.last().unwrap().seq;
    cluster.kill(master);
    let killed = Instant::now();
    let took = cluster.wait_failover(master, &keys::request_stream(&accepted.request_id), Duration::from_secs(30));
    let promoted = stored_events(&url, &accepted.request_id).await;
    let promoted_last = promoted.last().map_or(0, |e| e.seq);
    let lost = stored_at_kill.saturating_sub(promoted_last);
    println!(
        "failover of master {master}: replica serving after {took:?}; the client had seq {stored_at_kill} at the kill, \
         the promoted replica held up to seq {promoted_last} ({lost} acknowledged events not replicated)"
    );

    while !events.last().unwrap().is_terminal() {
        events.push(ws.next_event(&accepted.request_id, Duration::from_secs(30)).await);
    }
    let text = assert_complete(&events, 1);
    assert_eq!(events.len() as u64, pace.events(), "every piece once: {text}");
    println!("answer whole {:?} after the kill", killed.elapsed());

    // What the cluster keeps now agrees with what the client read.
    let stored: Vec<u64> = stored_events(&url, &accepted.request_id).await.iter().map(|e| e.seq).collect();
    assert_eq!(stored, (1..=pace.events()).collect::<Vec<u64>>(), "the stored stream is whole too");
}
