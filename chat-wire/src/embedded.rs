//! An in-process stand-in for Redis, for the one-command cluster on a
//! machine without Redis: per-request event logs, request claims, session
//! histories and live fan-out, with the same bounds and lifetimes as the
//! Redis layout. It only works when the AI nodes and the backends share one
//! process (the `cluster` binary); Redis is the real thing.

use crate::ledger::RequestRecord;
use crate::Event;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Live events buffered for a lagging subscriber before it must refill from the logs.
const LIVE_CAPACITY: usize = 65_536;
/// Emits between two sweeps of expired entries.
const SWEEP_EVERY: u64 = 4096;

/// Where components exchange events: a Redis at a URL, or an embedded bus.
#[derive(Clone)]
pub enum Backplane {
    Redis(String),
    Embedded(Arc<EmbeddedBus>),
}

pub struct EmbeddedBus {
    inner: Mutex<Inner>,
    live: broadcast::Sender<(String, Arc<Event>)>,
    max_len: usize,
    ttl: Duration,
}

#[derive(Default)]
struct Inner {
    logs: HashMap<String, (VecDeque<Event>, Instant)>,
    claims: HashMap<String, (RequestRecord, Instant)>,
    histories: HashMap<String, (VecDeque<String>, Instant)>,
    emits: u64,
}

impl EmbeddedBus {
    /// `max_len` events kept per request, each entry living `ttl` past its last write.
    pub fn new(max_len: usize, ttl: Duration) -> Arc<EmbeddedBus> {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Arc::new(EmbeddedBus { inner: Mutex::new(Inner::default()), live, max_len, ttl })
    }

    /// Claims a request for `record.node` at epoch 1; returns the holder when it was already claimed.
    pub fn claim(&self, request_id: &str, record: &RequestRecord) -> Option<String> {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        match inner.claims.get(request_id) {
            Some((held, expires)) if *expires > now => Some(held.node.clone()),
            _ => {
                inner
                    .claims
                    .insert(request_id.to_owned(), (RequestRecord { epoch: 1, ..record.clone() }, now + self.ttl));
                None
            }
        }
    }

    /// Moves the request from `expected` to the next epoch; `Err(current)` when it is not at `expected`.
    pub fn fence(&self, request_id: &str, expected: u64) -> Result<u64, u64> {
        let mut inner = self.inner.lock().unwrap();
        match inner.claims.get_mut(request_id) {
            Some((record, _)) if record.epoch == expected => {
                record.epoch += 1;
                record.node = "takeover".into();
                Ok(record.epoch)
            }
            Some((record, _)) => Err(record.epoch),
            None => Err(0),
        }
    }

    /// Takes over the request at `epoch` for `node`; false when the epoch moved on.
    pub fn adopt(&self, request_id: &str, epoch: u64, node: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        match inner.claims.get_mut(request_id) {
            Some((record, _)) if record.epoch == epoch => {
                record.node = node.to_owned();
                true
            }
            _ => false,
        }
    }

    /// What was asked, by whom it is produced, at which epoch.
    pub fn record(&self, request_id: &str) -> Option<RequestRecord> {
        self.inner.lock().unwrap().claims.get(request_id).map(|(r, _)| r.clone())
    }

    /// Appends `event` to its request's log, then publishes it to the session's
    /// readers; refused (false) when the event's epoch is not the request's.
    pub fn emit(&self, session_id: &str, event: &Event) -> bool {
        {
            let mut inner = self.inner.lock().unwrap();
            if let (Some((record, _)), Some(epoch)) = (inner.claims.get(&event.request_id), event.epoch) {
                if record.epoch != epoch {
                    return false;
                }
            }
            let expires = Instant::now() + self.ttl;
            let (log, until) = inner.logs.entry(event.request_id.clone()).or_insert_with(|| (VecDeque::new(), expires));
            log.push_back(event.clone());
            while log.len() > self.max_len {
                log.pop_front();
            }
            *until = expires;
            if let Some(claim) = inner.claims.get_mut(&event.request_id) {
                claim.1 = expires;
            }
            inner.emits += 1;
            if inner.emits.is_multiple_of(SWEEP_EVERY) {
                inner.sweep();
            }
        }
        // No receiver is not an error: nobody is listening to this session.
        let _ = self.live.send((session_id.to_owned(), Arc::new(event.clone())));
        true
    }

    /// Every stored event of `request_id`; `None` when there is no such log.
    pub fn read(&self, request_id: &str) -> Option<Vec<Event>> {
        let inner = self.inner.lock().unwrap();
        inner
            .logs
            .get(request_id)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(log, _)| log.iter().cloned().collect())
    }

    /// Every live event of every session, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<(String, Arc<Event>)> {
        self.live.subscribe()
    }

    /// The session's history items, oldest first.
    pub fn history(&self, session_id: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        inner.histories.get(session_id).map(|(items, _)| items.iter().cloned().collect()).unwrap_or_default()
    }

    /// Appends history items, keeping the last `keep`, living `ttl` past this write.
    pub fn remember(&self, session_id: &str, items: Vec<String>, keep: usize, ttl: Duration) {
        let mut inner = self.inner.lock().unwrap();
        let (list, until) =
            inner.histories.entry(session_id.to_owned()).or_insert_with(|| (VecDeque::new(), Instant::now()));
        list.extend(items);
        while list.len() > keep {
            list.pop_front();
        }
        *until = Instant::now() + ttl;
    }
}

impl Inner {
    fn sweep(&mut self) {
        let now = Instant::now();
        self.logs.retain(|_, (_, until)| *until > now);
        self.claims.retain(|_, (_, until)| *until > now);
        self.histories.retain(|_, (_, until)| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn emitted_events_are_stored_before_they_are_seen_live() {
        let bus = EmbeddedBus::new(3, Duration::from_secs(60));
        let mut live = bus.subscribe();
        for seq in 1..=4 {
            assert!(bus.emit("s", &Event::chunk("r", seq, "x")));
        }
        let (session, first) = live.recv().await.unwrap();
        assert_eq!((session.as_str(), first.seq), ("s", 1));
        let stored: Vec<u64> = bus.read("r").unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(stored, [2, 3, 4], "the log is capped at max_len");
        assert!(bus.read("other").is_none());
    }

    fn record(node: &str) -> RequestRecord {
        RequestRecord { session_id: "s".into(), message: "m".into(), user_id: None, node: node.into(), epoch: 0 }
    }

    #[test]
    fn a_request_is_claimed_once_and_fenced_epochs_cannot_emit() {
        let bus = EmbeddedBus::new(10, Duration::from_secs(60));
        assert_eq!(bus.claim("r", &record("ai-1")), None);
        assert_eq!(bus.claim("r", &record("ai-2")), Some("ai-1".to_owned()));
        let mut old = Event::chunk("r", 1, "a");
        old.epoch = Some(1);
        assert!(bus.emit("s", &old));
        assert_eq!(bus.fence("r", 1), Ok(2));
        assert_eq!(bus.fence("r", 1), Err(2), "only one takeover wins");
        let mut late = Event::chunk("r", 2, "b");
        late.epoch = Some(1);
        assert!(!bus.emit("s", &late), "the old producer is fenced off");
        assert!(bus.adopt("r", 2, "ai-2"));
        late.epoch = Some(2);
        assert!(bus.emit("s", &late));
        assert_eq!(bus.record("r").unwrap().node, "ai-2");
    }
}
