//! The ledger's Lua scripts on a real Redis: claims, fencing, adoption and
//! fenced emits behave as the embedded bus does.

use chat_wire::embedded::Backplane;
use chat_wire::ledger::{Emitted, Ledger, RequestRecord};
use chat_wire::Event;
use std::time::Duration;

fn ledger() -> Ledger {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let second = Duration::from_secs(1);
    Ledger::on(&Backplane::Redis(url), second, second, 100, Duration::from_secs(300)).unwrap()
}

fn event(request_id: &str, seq: u64, epoch: u64) -> Event {
    let mut e = Event::chunk(request_id, seq, format!("piece {seq} "));
    e.epoch = Some(epoch);
    e
}

#[tokio::test]
async fn a_takeover_fences_the_old_producer_off_and_the_new_one_continues() {
    let ledger = ledger();
    let request_id = chat_wire::new_request_id();
    let record = RequestRecord {
        session_id: "s-ledger".into(),
        message: "what is fencing?".into(),
        user_id: Some("u1".into()),
        node: "ai-1".into(),
        epoch: 1,
    };
    assert_eq!(ledger.claim(&request_id, &record).await.unwrap(), None);
    assert_eq!(
        ledger.claim(&request_id, &RequestRecord { node: "ai-2".into(), ..record.clone() }).await.unwrap(),
        Some("ai-1".into())
    );
    assert_eq!(ledger.emit("s-ledger", &event(&request_id, 1, 1)).await.unwrap(), Emitted::Published);

    assert_eq!(ledger.fence(&request_id, 1).await.unwrap(), Ok(2));
    assert_eq!(ledger.fence(&request_id, 1).await.unwrap(), Err(2), "one backend wins the fence");
    assert_eq!(
        ledger.emit("s-ledger", &event(&request_id, 2, 1)).await.unwrap(),
        Emitted::Fenced,
        "the old node is fenced off"
    );
    assert!(!ledger.adopt(&request_id, 3, "ai-3").await.unwrap(), "no adoption at an epoch not fenced");
    assert!(ledger.adopt(&request_id, 2, "ai-2").await.unwrap());
    assert_eq!(ledger.emit("s-ledger", &event(&request_id, 2, 2)).await.unwrap(), Emitted::Published);

    let stored = ledger.read(&request_id).await.unwrap().unwrap();
    assert_eq!(stored.iter().map(|e| (e.seq, e.epoch)).collect::<Vec<_>>(), [(1, Some(1)), (2, Some(2))]);
    let now = ledger.record(&request_id).await.unwrap().unwrap();
    assert_eq!((now.node.as_str(), now.epoch, now.message.as_str()), ("ai-2", 2, "what is fencing?"));
    assert_eq!(now.user_id.as_deref(), Some("u1"));
    assert!(ledger.read("r-never-seen").await.unwrap().is_none());
}
