//! The ledger's Lua scripts on a real Redis: claims, leases, fencing,
//! adoption and fenced emits behave as the embedded bus does.

use chat_wire::ledger::Backplane;
use chat_wire::ledger::{Cancel, Emitted, Fence, Ledger, Renewal, RequestRecord};
use chat_wire::Event;
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_millis(200);

fn ledger() -> Arc<dyn Ledger> {
    ledger_keeping(100)
}

fn ledger_keeping(max_len: usize) -> Arc<dyn Ledger> {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let second = Duration::from_secs(1);
    chat_wire::ledger::on(&Backplane::Redis(url), second, second, max_len, Duration::from_secs(300)).unwrap()
}

fn event(request_id: &str, seq: u64, node: &str, epoch: u64) -> Event {
    let mut e = Event::chunk(request_id, seq, format!("piece {seq} "));
    e.node = Some(node.into());
    e.epoch = Some(epoch);
    e
}

fn record(node: &str) -> RequestRecord {
    RequestRecord {
        session_id: "s-ledger".into(),
        message: "what is fencing?".into(),
        user_id: Some("u1".into()),
        node: node.into(),
        epoch: 1,
        owner: None,
        cancelled: false,
    }
}

#[tokio::test]
async fn a_takeover_waits_for_the_lease_fences_the_old_producer_off_and_one_node_continues() {
    let ledger = ledger();
    let id = chat_wire::new_request_id();
    assert_eq!(ledger.claim(&id, &record("ai-1"), LEASE).await.unwrap(), None);
    assert_eq!(ledger.claim(&id, &record("ai-2"), LEASE).await.unwrap(), Some("ai-1".into()));
    assert_eq!(ledger.emit("s-ledger", &event(&id, 1, "ai-1", 1)).await.unwrap(), Emitted::Published);

    // Alive (renewing) but silent: no takeover.
    for _ in 0..3 {
        tokio::time::sleep(LEASE / 2).await;
        assert_eq!(ledger.renew(&id, 1, "ai-1", LEASE, Duration::ZERO).await.unwrap(), Renewal::Held);
        assert_eq!(ledger.fence(&id, 1).await.unwrap(), Fence::ProducerAlive);
    }
    // Gone: the lease lapses and one backend wins the fence.
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(ledger.fence(&id, 1).await.unwrap(), Fence::Won(2));
    assert_eq!(ledger.fence(&id, 1).await.unwrap(), Fence::Moved(2), "one backend wins the fence");
    assert_eq!(ledger.emit("s-ledger", &event(&id, 2, "ai-1", 1)).await.unwrap(), Emitted::Fenced, "old node fenced");
    assert_eq!(
        ledger.renew(&id, 1, "ai-1", LEASE, Duration::ZERO).await.unwrap(),
        Renewal::Lost,
        "and it learns so when it renews"
    );
    assert!(!ledger.adopt(&id, 3, "ai-3", LEASE).await.unwrap(), "no adoption at an epoch not fenced");
    assert!(ledger.adopt(&id, 2, "ai-2", LEASE).await.unwrap());
    assert!(ledger.adopt(&id, 2, "ai-2", LEASE).await.unwrap(), "a repeated adoption by the same node holds");
    assert!(!ledger.adopt(&id, 2, "ai-3", LEASE).await.unwrap(), "a second node cannot adopt the same epoch");
    assert_eq!(ledger.emit("s-ledger", &event(&id, 2, "ai-3", 2)).await.unwrap(), Emitted::Fenced);
    assert_eq!(ledger.fence(&id, 2).await.unwrap(), Fence::ProducerAlive, "the adopter holds a lease");
    assert_eq!(ledger.emit("s-ledger", &event(&id, 2, "ai-2", 2)).await.unwrap(), Emitted::Published);

    let stored = ledger.read(&id).await.unwrap().unwrap();
    assert_eq!(stored.iter().map(|e| (e.seq, e.epoch)).collect::<Vec<_>>(), [(1, Some(1)), (2, Some(2))]);
    let now = ledger.record(&id).await.unwrap().unwrap();
    assert_eq!((now.node.as_str(), now.epoch, now.message.as_str()), ("ai-2", 2, "what is fencing?"));
    assert_eq!(now.user_id.as_deref(), Some("u1"));
    assert!(ledger.read("r-never-seen").await.unwrap().is_none());
    assert!(!ledger.page("r-never-seen", 0, 10).await.unwrap().known);
}

#[tokio::test]
async fn emits_are_refused_without_a_claim_an_epoch_or_the_next_seq_and_after_the_end() {
    let ledger = ledger();
    let id = chat_wire::new_request_id();
    assert_eq!(ledger.emit("s", &event(&id, 1, "ai-1", 1)).await.unwrap(), Emitted::Fenced, "no claim");
    ledger.claim(&id, &record("ai-1"), LEASE).await.unwrap();
    let mut no_epoch = event(&id, 1, "ai-1", 1);
    no_epoch.epoch = None;
    assert_eq!(ledger.emit("s", &no_epoch).await.unwrap(), Emitted::Fenced, "no epoch");
    assert_eq!(ledger.emit("s", &event(&id, 2, "ai-1", 1)).await.unwrap(), Emitted::Fenced, "a gap");
    assert_eq!(ledger.emit("s", &event(&id, 1, "ai-1", 1)).await.unwrap(), Emitted::Published);
    assert_eq!(ledger.emit("s", &event(&id, 1, "ai-1", 1)).await.unwrap(), Emitted::Published, "a retry");
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().len(), 1, "is not stored twice");
    assert_eq!(ledger.emit("s", &event(&id, 1, "ai-2", 1)).await.unwrap(), Emitted::Fenced, "nor by another");
    let mut done = Event::done(&id, 2, "stop");
    done.node = Some("ai-1".into());
    done.epoch = Some(1);
    assert_eq!(ledger.emit("s", &done).await.unwrap(), Emitted::Published);
    assert_eq!(ledger.emit("s", &event(&id, 3, "ai-1", 1)).await.unwrap(), Emitted::Fenced, "after the end");
    assert_eq!(ledger.fence(&id, 1).await.unwrap(), Fence::Ended);

    let page = ledger.page(&id, 1, 10).await.unwrap();
    assert_eq!((page.known, page.last_seq, page.ended), (true, 2, Some(2)));
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2], "a page starts after the cursor");
    assert!(ledger.page(&id, u64::MAX, 10).await.unwrap().events.is_empty(), "a cursor at the very end is fine");
}

#[tokio::test]
async fn a_long_stream_is_read_in_pages() {
    let ledger = ledger_keeping(10_000);
    let id = chat_wire::new_request_id();
    ledger.claim(&id, &record("ai-1"), Duration::from_secs(5)).await.unwrap();
    for seq in 1..=600 {
        assert_eq!(ledger.emit("s", &event(&id, seq, "ai-1", 1)).await.unwrap(), Emitted::Published);
    }
    let first = ledger.page(&id, 0, chat_wire::ledger::PAGE).await.unwrap();
    assert_eq!(first.events.len(), chat_wire::ledger::PAGE);
    assert_eq!(first.last_seq, 600);
    let all = ledger.read(&id).await.unwrap().unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=600).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_cancelled_request_takes_no_more_chunks_only_its_end_and_is_never_continued() {
    let ledger = ledger();
    let id = chat_wire::new_request_id();
    assert_eq!(ledger.cancel(&id).await.unwrap(), Cancel::Unknown);
    assert_eq!(ledger.claim(&id, &record("ai-1"), LEASE).await.unwrap(), None);
    assert_eq!(ledger.emit("s", &event(&id, 1, "ai-1", 1)).await.unwrap(), Emitted::Published);
    assert_eq!(ledger.cancel(&id).await.unwrap(), Cancel::Stopping, "the producer holds its lease");
    assert!(ledger.record(&id).await.unwrap().unwrap().cancelled);
    assert_eq!(ledger.emit("s", &event(&id, 2, "ai-1", 1)).await.unwrap(), Emitted::Cancelled, "no more chunks");
    assert_eq!(ledger.renew(&id, 1, "ai-1", LEASE, Duration::ZERO).await.unwrap(), Renewal::Cancelled);
    let mut end = Event::error(&id, 2, "cancelled", "cancelled by the client");
    end.node = Some("ai-1".into());
    end.epoch = Some(1);
    assert_eq!(ledger.emit("s", &end).await.unwrap(), Emitted::Published, "its end is taken");
    assert_eq!(ledger.cancel(&id).await.unwrap(), Cancel::Ended);

    // With its producer gone, the fencer stores the end and nobody continues it.
    let orphan = chat_wire::new_request_id();
    ledger.claim(&orphan, &record("ai-1"), Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(ledger.cancel(&orphan).await.unwrap(), Cancel::Orphaned);
    assert_eq!(ledger.fence(&orphan, 1).await.unwrap(), Fence::Cancelled(2));
    assert!(!ledger.adopt(&orphan, 2, "ai-2", LEASE).await.unwrap(), "no node continues a cancelled request");
    let mut end = Event::error(&orphan, 1, "cancelled", "cancelled by the client");
    end.node = Some(chat_wire::ledger::NO_PRODUCER.into());
    end.epoch = Some(2);
    assert_eq!(ledger.emit("s", &end).await.unwrap(), Emitted::Published, "the fencer stores the end");
}

#[tokio::test]
async fn a_request_no_reader_touches_is_abandoned_and_a_touched_one_is_not() {
    let ledger = ledger();
    let (left, kept) = (chat_wire::new_request_id(), chat_wire::new_request_id());
    for id in [&left, &kept] {
        ledger.claim(id, &record("ai-1"), LEASE).await.unwrap();
    }
    let abandon = Duration::from_secs(1);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        ledger.touch(std::slice::from_ref(&kept)).await.unwrap();
    }
    assert_eq!(ledger.renew(&kept, 1, "ai-1", LEASE, abandon).await.unwrap(), Renewal::Held);
    assert_eq!(ledger.renew(&left, 1, "ai-1", LEASE, abandon).await.unwrap(), Renewal::Cancelled);
    assert!(ledger.record(&left).await.unwrap().unwrap().cancelled);
}
