//! An in-process stand-in for Redis, for the one-command cluster on a
//! machine without Redis: per-request event logs, request claims, session
//! histories and live fan-out, with the same bounds and lifetimes as the
//! Redis layout. It only works when the AI nodes and the backends share one
//! process (the `cluster` binary); Redis is the real thing.

use super::{Cancel, Emitted, Fence, Ledger, Page, Renewal, RequestRecord, NO_PRODUCER};
use crate::redis_conn::RedisError;
use crate::Event;
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Live events buffered for a lagging subscriber before it must refill from the logs.
const LIVE_CAPACITY: usize = 65_536;
/// Emits between two sweeps of expired entries.
const SWEEP_EVERY: u64 = 4096;

pub struct EmbeddedBus {
    inner: Mutex<Inner>,
    live: broadcast::Sender<(String, Arc<Event>)>,
    max_len: usize,
    ttl: Duration,
}

/// A claimed request, as the Redis claim hash and lease key hold it.
struct Claim {
    record: RequestRecord,
    lease_until: Option<Instant>,
    last: u64,
    ended: Option<u64>,
    /// When a reader last said it follows the request.
    followed: Instant,
}

impl Claim {
    fn lease_alive(&self) -> bool {
        self.lease_until.is_some_and(|t| t > Instant::now())
    }
}

#[derive(Default)]
struct Inner {
    logs: HashMap<String, (VecDeque<Event>, Instant)>,
    claims: HashMap<String, (Claim, Instant)>,
    histories: HashMap<String, (VecDeque<String>, Instant)>,
    emits: u64,
}

impl EmbeddedBus {
    /// `max_len` events kept per request, each entry living `ttl` past its last write.
    pub fn new(max_len: usize, ttl: Duration) -> Arc<EmbeddedBus> {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Arc::new(EmbeddedBus { inner: Mutex::new(Inner::default()), live, max_len, ttl })
    }

    /// Claims a request for `record.node` at epoch 1 with a lease; returns the holder when it was already claimed.
    pub fn claim(&self, request_id: &str, record: &RequestRecord, lease: Duration) -> Option<String> {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        match inner.claims.get(request_id) {
            Some((held, expires)) if *expires > now => Some(held.record.node.clone()),
            _ => {
                let claim = Claim {
                    record: RequestRecord { epoch: 1, cancelled: false, ..record.clone() },
                    lease_until: Some(now + lease),
                    last: 0,
                    ended: None,
                    followed: now,
                };
                inner.claims.insert(request_id.to_owned(), (claim, now + self.ttl));
                None
            }
        }
    }

    /// Moves the request from `expected` to the next epoch once its producer's lease has lapsed.
    pub fn fence(&self, request_id: &str, expected: u64) -> Fence {
        let mut inner = self.inner.lock().unwrap();
        match inner.claims.get_mut(request_id) {
            None => Fence::Moved(0),
            Some((claim, _)) if claim.ended.is_some() => Fence::Ended,
            Some((claim, _)) if claim.record.epoch != expected => Fence::Moved(claim.record.epoch),
            Some((claim, _)) if claim.lease_alive() => Fence::ProducerAlive,
            Some((claim, _)) => {
                claim.record.epoch += 1;
                claim.record.node = NO_PRODUCER.into();
                claim.lease_until = None;
                match claim.record.cancelled {
                    true => Fence::Cancelled(claim.record.epoch),
                    false => Fence::Won(claim.record.epoch),
                }
            }
        }
    }

    /// Marks a request cancelled (see `Ledger::cancel`).
    pub fn cancel(&self, request_id: &str) -> Cancel {
        let mut inner = self.inner.lock().unwrap();
        match inner.claims.get_mut(request_id) {
            None => Cancel::Unknown,
            Some((claim, _)) if claim.ended.is_some() => Cancel::Ended,
            Some((claim, _)) => {
                claim.record.cancelled = true;
                if claim.lease_alive() {
                    Cancel::Stopping
                } else {
                    Cancel::Orphaned
                }
            }
        }
    }

    /// Notes that a reader follows these requests.
    pub fn touch(&self, request_ids: &[String]) {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        for id in request_ids {
            if let Some((claim, _)) = inner.claims.get_mut(id) {
                claim.followed = now;
            }
        }
    }

    /// Takes the fenced request over at `epoch` for `node`; false when the
    /// epoch moved on, the request ended, or another node adopted it.
    pub fn adopt(&self, request_id: &str, epoch: u64, node: &str, lease: Duration) -> bool {
        let mut inner = self.inner.lock().unwrap();
        match inner.claims.get_mut(request_id) {
            Some((claim, _))
                if claim.record.epoch == epoch
                    && claim.ended.is_none()
                    && !claim.record.cancelled
                    && (claim.record.node == NO_PRODUCER || claim.record.node == node) =>
            {
                claim.record.node = node.to_owned();
                claim.lease_until = Some(Instant::now() + lease);
                true
            }
            _ => false,
        }
    }

    /// Renews the lease of `node` at `epoch` (see `Ledger::renew`).
    pub fn renew(&self, request_id: &str, epoch: u64, node: &str, lease: Duration, abandon_after: Duration) -> Renewal {
        let mut inner = self.inner.lock().unwrap();
        let ttl = self.ttl;
        let renewed = match inner.claims.get_mut(request_id) {
            Some((claim, expires))
                if claim.record.epoch == epoch && claim.record.node == node && claim.ended.is_none() =>
            {
                let now = Instant::now();
                claim.lease_until = Some(now + lease);
                *expires = now + ttl;
                if !abandon_after.is_zero() && now.duration_since(claim.followed) > abandon_after {
                    claim.record.cancelled = true;
                }
                match claim.record.cancelled {
                    true => Renewal::Cancelled,
                    false => Renewal::Held,
                }
            }
            _ => Renewal::Lost,
        };
        if renewed != Renewal::Lost {
            if let Some((_, until)) = inner.logs.get_mut(request_id) {
                *until = Instant::now() + ttl;
            }
        }
        renewed
    }

    /// What was asked, by whom it is produced, at which epoch.
    pub fn record(&self, request_id: &str) -> Option<RequestRecord> {
        self.inner.lock().unwrap().claims.get(request_id).map(|(c, _)| c.record.clone())
    }

    /// Appends `event` to its request's log, then publishes it to the session's
    /// readers; refused unless its producer and epoch own the request and its
    /// `seq` follows the last stored one (see `Ledger::emit`).
    pub fn emit(&self, session_id: &str, event: &Event) -> Emitted {
        {
            let mut inner = self.inner.lock().unwrap();
            let expires = Instant::now() + self.ttl;
            let producer = event.node.as_deref().unwrap_or(NO_PRODUCER);
            match inner.claims.get_mut(&event.request_id) {
                Some((claim, _))
                    if Some(claim.record.epoch) == event.epoch
                        && claim.record.node == producer
                        && event.seq == claim.last =>
                {
                    // The producer's retry of what is stored already.
                    return Emitted::Published;
                }
                Some((claim, _))
                    if Some(claim.record.epoch) == event.epoch
                        && claim.record.node == producer
                        && claim.ended.is_none()
                        && claim.record.cancelled
                        && !event.is_terminal() =>
                {
                    return Emitted::Cancelled;
                }
                Some((claim, until))
                    if Some(claim.record.epoch) == event.epoch
                        && claim.record.node == producer
                        && claim.ended.is_none()
                        && event.seq == claim.last + 1 =>
                {
                    claim.last = event.seq;
                    if event.is_terminal() {
                        claim.ended = Some(event.seq);
                        claim.lease_until = None;
                    }
                    *until = expires;
                }
                _ => return Emitted::Fenced,
            }
            let (log, until) = inner.logs.entry(event.request_id.clone()).or_insert_with(|| (VecDeque::new(), expires));
            log.push_back(event.clone());
            while log.len() > self.max_len {
                log.pop_front();
            }
            *until = expires;
            inner.emits += 1;
            if inner.emits.is_multiple_of(SWEEP_EVERY) {
                inner.sweep();
            }
        }
        // No receiver is not an error: nobody is listening to this session.
        let _ = self.live.send((session_id.to_owned(), Arc::new(event.clone())));
        Emitted::Published
    }

    /// Up to `count` stored events with `seq > after_seq`, and where the request stands.
    pub fn page(&self, request_id: &str, after_seq: u64, count: usize) -> Page {
        let inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let events: Vec<Event> = inner
            .logs
            .get(request_id)
            .filter(|(_, until)| *until > now)
            .map(|(log, _)| log.iter().filter(|e| e.seq > after_seq).take(count).cloned().collect())
            .unwrap_or_default();
        let claim = inner.claims.get(request_id).filter(|(_, until)| *until > now).map(|(c, _)| c);
        Page {
            known: claim.is_some() || !events.is_empty(),
            last_seq: claim.map_or(0, |c| c.last).max(events.last().map_or(0, |e| e.seq)),
            ended: claim.and_then(|c| c.ended).or_else(|| events.iter().find(|e| e.is_terminal()).map(|e| e.seq)),
            events,
        }
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

/// The ledger's face of the bus; each operation is the bus's own, at once.
#[async_trait]
impl Ledger for EmbeddedBus {
    async fn claim(
        &self,
        request_id: &str,
        record: &RequestRecord,
        lease: Duration,
    ) -> Result<Option<String>, RedisError> {
        Ok(EmbeddedBus::claim(self, request_id, record, lease))
    }

    async fn fence(&self, request_id: &str, expected: u64) -> Result<Fence, RedisError> {
        Ok(EmbeddedBus::fence(self, request_id, expected))
    }

    async fn adopt(&self, request_id: &str, epoch: u64, node: &str, lease: Duration) -> Result<bool, RedisError> {
        Ok(EmbeddedBus::adopt(self, request_id, epoch, node, lease))
    }

    async fn renew(
        &self,
        request_id: &str,
        epoch: u64,
        node: &str,
        lease: Duration,
        abandon_after: Duration,
    ) -> Result<Renewal, RedisError> {
        Ok(EmbeddedBus::renew(self, request_id, epoch, node, lease, abandon_after))
    }

    async fn cancel(&self, request_id: &str) -> Result<Cancel, RedisError> {
        Ok(EmbeddedBus::cancel(self, request_id))
    }

    async fn touch(&self, request_ids: &[String]) -> Result<(), RedisError> {
        EmbeddedBus::touch(self, request_ids);
        Ok(())
    }

    async fn emit(&self, session_id: &str, event: &Event) -> Result<Emitted, RedisError> {
        Ok(EmbeddedBus::emit(self, session_id, event))
    }

    async fn record(&self, request_id: &str) -> Result<Option<RequestRecord>, RedisError> {
        Ok(EmbeddedBus::record(self, request_id))
    }

    async fn page(&self, request_id: &str, after_seq: u64, count: usize) -> Result<Page, RedisError> {
        Ok(EmbeddedBus::page(self, request_id, after_seq, count))
    }

    async fn history(&self, session_id: &str) -> Result<Vec<String>, RedisError> {
        Ok(EmbeddedBus::history(self, session_id))
    }

    async fn remember(
        &self,
        session_id: &str,
        items: Vec<String>,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        EmbeddedBus::remember(self, session_id, items, keep, ttl);
        Ok(())
    }

    async fn ping(&self) -> Result<(), RedisError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(50);

    fn emitted(bus: &EmbeddedBus, session: &str, e: &Event) -> bool {
        bus.emit(session, e) == Emitted::Published
    }

    fn record(node: &str) -> RequestRecord {
        RequestRecord {
            session_id: "s".into(),
            message: "m".into(),
            user_id: None,
            node: node.into(),
            epoch: 0,
            owner: None,
            cancelled: false,
        }
    }

    fn by(node: &str, epoch: u64, e: Event) -> Event {
        Event { node: Some(node.into()), epoch: Some(epoch), ..e }
    }

    #[tokio::test]
    async fn emitted_events_are_stored_before_they_are_seen_live() {
        let bus = EmbeddedBus::new(3, Duration::from_secs(60));
        let mut live = bus.subscribe();
        assert_eq!(bus.claim("r", &record("ai-1"), LEASE), None);
        for seq in 1..=4 {
            assert!(emitted(&bus, "s", &by("ai-1", 1, Event::chunk("r", seq, "x"))));
        }
        let (session, first) = live.recv().await.unwrap();
        assert_eq!((session.as_str(), first.seq), ("s", 1));
        let stored: Vec<u64> = bus.page("r", 0, 10).events.iter().map(|e| e.seq).collect();
        assert_eq!(stored, [2, 3, 4], "the log is capped at max_len");
        assert_eq!(bus.page("r", 2, 1).events.len(), 1, "pages start after the cursor");
        assert!(!bus.page("other", 0, 10).known);
    }

    #[test]
    fn a_request_is_claimed_once_and_taken_over_only_after_its_lease_lapsed() {
        let bus = EmbeddedBus::new(10, Duration::from_secs(60));
        assert_eq!(bus.claim("r", &record("ai-1"), LEASE), None);
        assert_eq!(bus.claim("r", &record("ai-2"), LEASE), Some("ai-1".to_owned()));
        assert!(emitted(&bus, "s", &by("ai-1", 1, Event::chunk("r", 1, "a"))));
        assert!(emitted(&bus, "s", &by("ai-1", 1, Event::chunk("r", 1, "a"))), "a retry of the last is taken...");
        assert_eq!(bus.page("r", 0, 10).events.len(), 1, "...and not stored twice");
        assert!(!emitted(&bus, "s", &by("ai-2", 1, Event::chunk("r", 1, "a"))), "nor by another producer");
        assert!(!emitted(&bus, "s", &by("ai-1", 1, Event::chunk("r", 3, "a"))), "nor past a gap");
        assert!(!emitted(&bus, "s", &Event::chunk("r", 2, "a")), "an event without producer or epoch is refused");
        assert_eq!(bus.fence("r", 1), Fence::ProducerAlive);
        std::thread::sleep(LEASE * 2);
        assert_eq!(bus.fence("r", 1), Fence::Won(2));
        assert_eq!(bus.fence("r", 1), Fence::Moved(2), "only one takeover wins");
        assert!(!emitted(&bus, "s", &by("ai-1", 1, Event::chunk("r", 2, "b"))), "the old producer is fenced off");
        assert!(!(bus.renew("r", 1, "ai-1", LEASE, Duration::ZERO) == Renewal::Held), "and learns it when it renews");
        assert!(bus.adopt("r", 2, "ai-2", LEASE));
        assert!(!bus.adopt("r", 2, "ai-3", LEASE), "one node adopts an epoch");
        assert!(!emitted(&bus, "s", &by("ai-3", 2, Event::chunk("r", 2, "b"))));
        assert!(emitted(&bus, "s", &by("ai-2", 2, Event::done("r", 2, "stop"))));
        assert_eq!(bus.record("r").unwrap().node, "ai-2");
        assert_eq!(bus.page("r", 0, 10).ended, Some(2));
        assert_eq!(bus.fence("r", 2), Fence::Ended);
        assert!(!emitted(&bus, "s", &by("ai-2", 2, Event::chunk("r", 3, "late"))), "nothing is stored after the end");
    }
}
