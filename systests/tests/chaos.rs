//! Randomized exactly-once: clients on shared and separate sessions chat,
//! drop their sockets at random points, reconnect to a random backend after
//! 0-2 s and resume (at once, late, twice, or first past the end), while AI
//! nodes are frozen (SIGSTOP) for less and for more than their lease, one is
//! killed half way, and one is slow (2 s to its first piece). Nodes tag their
//! text with their id, so two producers of one answer show.
//!
//! For every socket and request: seqs strictly increasing with no gap from
//! where the socket started, epochs never going back, every event equal to
//! the stored one; for every client: the whole answer across its sockets;
//! for every answer with more than one producer: the earlier producer was
//! frozen past its lease while the answer ran.
//!
//! The seed is printed; `CHAOS_SEED=<seed>` replays a run, `CHAOS_SECS`
//! makes it longer (default 15 s).

mod common;

use chat_wire::ledger::Backplane;
use chat_wire::Event;
use common::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;

/// What one socket received of one request, in order.
#[derive(Debug, Default, Clone)]
struct SocketLog {
    events: Vec<Event>,
}

/// One client's view of one answer: every socket it used.
#[derive(Debug)]
struct Answer {
    request_id: String,
    sockets: Vec<SocketLog>,
    started: Instant,
    ended: Instant,
}

/// A node frozen from `from` to `to`; `long` when past its lease.
#[derive(Debug, Clone)]
struct Freeze {
    node_id: String,
    from: Instant,
    to: Instant,
    long: bool,
}

#[tokio::test]
async fn random_disconnects_resumes_and_frozen_nodes_keep_every_socket_exactly_once() {
    let seed: u64 = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let secs: u64 = std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    eprintln!("chaos seed {seed} for {secs} s (replay: CHAOS_SEED={seed} cargo test -p systests --test chaos)");

    let redis = redis_url();
    let pace = Pace { first_token_ms: 5, tokens_per_second: 20.0, answer_tokens: 24 };
    // The third node is slow: 2 s to its first piece (past the stall timeout
    // and the lease), then 5 pieces a second. Slow is alive: never taken over.
    let slow = Pace { first_token_ms: 2_000, tokens_per_second: 5.0, answer_tokens: 24 };
    let started = [
        AiNode::start_tagged(&redis, pace).await,
        AiNode::start_tagged(&redis, pace).await,
        AiNode::start_tagged(&redis, slow).await,
    ];
    let refs: Vec<&AiNode> = started.iter().collect();
    let backends = Arc::new([
        Backend::builder(&redis, &refs).set("stream", "stall_timeout_ms", 500).start().await,
        Backend::builder(&redis, &refs).set("stream", "stall_timeout_ms", 500).start().await,
    ]);
    for b in backends.iter() {
        b.wait_healthy_nodes(3).await;
    }
    let ids: Vec<String> = started.iter().map(|n| n.node_id.clone()).collect();
    let nodes: Arc<Vec<Mutex<AiNode>>> = Arc::new(started.into_iter().map(Mutex::new).collect());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let shared = [unique("shared"), unique("shared")];
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let freezes = Arc::new(Mutex::new(Vec::<Freeze>::new()));

    // Freezes one node at a time, now short, now long, and once, half way,
    // kills one of the fast ones (SIGKILL; counted as a freeze that never
    // ends). Never all at once: a frozen node's answers need a live one.
    let chaos = {
        let (nodes, freezes, ids) = (nodes.clone(), freezes.clone(), ids.clone());
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
            let half_way = Instant::now() + Duration::from_secs(secs / 2);
            let mut killed: Option<usize> = None;
            while Instant::now() + Duration::from_secs(6) < deadline {
                tokio::time::sleep(Duration::from_millis(rng.u64(500..2_000))).await;
                if killed.is_none() && Instant::now() > half_way {
                    let victim = rng.usize(0..2);
                    let from = Instant::now();
                    nodes[victim].lock().unwrap().kill();
                    let to = from + Duration::from_secs(3_600);
                    freezes.lock().unwrap().push(Freeze { node_id: ids[victim].clone(), from, to, long: true });
                    killed = Some(victim);
                    continue;
                }
                let pick = loop {
                    let n = rng.usize(0..3);
                    if Some(n) != killed {
                        break n;
                    }
                };
                let long = rng.bool();
                let hold = if long { NODE_LEASE_MS * 3 } else { NODE_LEASE_MS / 3 };
                let from = Instant::now();
                nodes[pick].lock().unwrap().pause();
                tokio::time::sleep(Duration::from_millis(hold)).await;
                nodes[pick].lock().unwrap().unpause();
                freezes.lock().unwrap().push(Freeze { node_id: ids[pick].clone(), from, to: Instant::now(), long });
            }
        })
    };

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (backends, answers, shared) = (backends.clone(), answers.clone(), shared.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(c as u64 + 1));
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let session = if rng.bool() { shared[rng.usize(0..2)].clone() } else { unique("own") };
                let answer = one_answer(&backends[..], &session, &mut rng, &format!("client {c} question {n}")).await;
                answers.lock().unwrap().push(answer);
            }
        }));
    }
    for client in clients {
        client.await.expect("a client task panicked (see above)");
    }
    chaos.await.unwrap();

    let ledger = chat_wire::ledger::on(
        &Backplane::Redis(redis.clone()),
        Duration::from_secs(2),
        Duration::from_secs(2),
        10_000,
        Duration::from_secs(300),
    )
    .unwrap();
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let freezes = freezes.lock().unwrap().clone();
    let mut taken_over = 0;
    for answer in &answers {
        let stored = ledger.read(&answer.request_id).await.unwrap().expect("the answer is stored");
        let by_seq: BTreeMap<u64, &Event> = stored.iter().map(|e| (e.seq, e)).collect();
        assert_eq!(
            by_seq.keys().copied().collect::<Vec<_>>(),
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "stored seqs 1..n, none twice: {}",
            answer.request_id
        );
        assert!(
            stored.last().unwrap().is_terminal() && stored.iter().filter(|e| e.is_terminal()).count() == 1,
            "one end, last: {stored:?}"
        );
        for (i, socket) in answer.sockets.iter().enumerate() {
            let seqs: Vec<u64> = socket.events.iter().map(|e| e.seq).collect();
            if let Some(first) = seqs.first() {
                let contiguous: Vec<u64> = (*first..*first + seqs.len() as u64).collect();
                assert_eq!(seqs, contiguous, "socket {i} of {}: strictly increasing, no gap", answer.request_id);
            }
            let epochs: Vec<u64> = socket.events.iter().map(|e| e.epoch.unwrap_or(0)).collect();
            assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "socket {i}: no older epoch after a newer: {epochs:?}");
            for e in &socket.events {
                let kept = by_seq[&e.seq];
                assert_eq!(
                    (&e.delta, e.epoch, &e.node),
                    (&kept.delta, kept.epoch, &kept.node),
                    "what the socket got is what is stored"
                );
            }
        }
        let mut have: Vec<u64> = answer.sockets.iter().flat_map(|s| s.events.iter().map(|e| e.seq)).collect();
        have.sort_unstable();
        have.dedup();
        assert_eq!(
            have,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "the client has the whole answer {}",
            answer.request_id
        );

        // Every change of producer follows a freeze past the lease of the one before.
        for pair in stored.windows(2) {
            if pair[0].epoch != pair[1].epoch {
                taken_over += 1;
                let old = pair[0].node.as_deref().unwrap_or_default();
                let frozen = freezes
                    .iter()
                    .any(|f| f.long && f.node_id == old && f.from < answer.ended && f.to > answer.started);
                assert!(
                    frozen,
                    "{} was taken from {old}, which was neither killed nor frozen past its lease while it ran",
                    answer.request_id
                );
            }
        }
    }
    let resumed = answers.iter().filter(|a| a.sockets.len() > 1).count();
    eprintln!(
        "chaos seed {seed}: {} answers, {resumed} over two sockets, {taken_over} producer changes, {} freezes ({} long)",
        answers.len(),
        freezes.len(),
        freezes.iter().filter(|f| f.long).count()
    );
    assert!(answers.len() >= CLIENTS, "every client finished at least one answer");
    assert!(resumed >= 1, "some answers were resumed");
}

/// One answer, maybe over two sockets: chat, read some, maybe drop the
/// socket, wait, reconnect to a random backend and resume in a random way.
async fn one_answer(backends: &[Backend], session: &str, rng: &mut fastrand::Rng, message: &str) -> Answer {
    let started = Instant::now();
    let mut ws = Ws::connect(&backends[rng.usize(0..backends.len())], session).await;
    let accepted = ws.chat(message).await;
    let id = accepted.request_id.clone();
    let mut first = SocketLog::default();
    let cut = if rng.u8(0..10) < 6 { Some(rng.usize(0..12)) } else { None };
    loop {
        if cut == Some(first.events.len()) {
            break;
        }
        let e = ws.next_event(&id, Duration::from_secs(20)).await;
        let end = e.is_terminal();
        first.events.push(e);
        if end {
            return Answer { request_id: id, sockets: vec![first], started, ended: Instant::now() };
        }
    }
    ws.drop_abruptly();
    tokio::time::sleep(Duration::from_millis(rng.u64(0..2_000))).await;
    let last = first.events.last().map_or(0, |e| e.seq);
    let mut ws = Ws::connect(&backends[rng.usize(0..backends.len())], session).await;
    let strategy = rng.u8(0..4);
    match strategy {
        0 => ws.resume(&id, last).await,
        1 => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ws.resume(&id, last).await;
        }
        2 => {
            ws.resume(&id, last).await;
            ws.resume(&id, last).await;
        }
        _ => {
            // First past the end, then from where it really is.
            ws.resume(&id, last + 1_000).await;
            ws.resume(&id, last).await;
        }
    }
    let mut second = SocketLog::default();
    loop {
        let frame = ws.next_json(Duration::from_secs(20)).await;
        if frame["request_id"] != id.as_str() {
            continue;
        }
        if frame["seq"].is_null() {
            // Only the resume past the end may be answered with a notice.
            assert!(strategy == 3 && frame["code"] == "resume_past_end", "unexpected notice {frame}");
            continue;
        }
        let e = Event::from_json(&frame.to_string()).unwrap();
        let end = e.is_terminal();
        second.events.push(e);
        if end {
            return Answer { request_id: id, sockets: vec![first, second], started, ended: Instant::now() };
        }
    }
}
