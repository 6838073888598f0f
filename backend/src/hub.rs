//! The pub/sub hub: one dedicated Redis pub/sub connection per backend
//! process, subscribed to exactly the sessions that have a socket (or SSE
//! stream) attached here, fanned out in-process.
//!
//! A session is subscribed when its first reader attaches and unsubscribed
//! when its last one leaves; both go through one lock so they cannot cross.
//! When the connection drops, the hub reconnects, subscribes every attached
//! session again, and tells every reader to `Refill` from the streams, which
//! closes whatever gap the outage made. A reader whose queue is full is
//! detached (its receiver ends), so a slow reader costs a bounded queue.
//!
//! On a Redis Cluster the sessions are shard channels (`SSUBSCRIBE`): each
//! lives on the master of its slot, and redis-rs's cluster connection holds
//! one connection per master this backend needs, subscribes again by itself
//! after a reconnection or a failover, and confirms each time; a confirmation
//! of a session already subscribed means a gap, so its readers refill.

use crate::metrics::Metrics;
use chat_wire::ledger::{Backplane, EmbeddedBus};
use chat_wire::{keys, Event};
use futures::StreamExt;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one SUBSCRIBE/UNSUBSCRIBE or connection attempt may take.
const PUBSUB_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a reader receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A live event of the session.
    Event(Arc<Event>),
    /// The connection was re-made: events may have been missed; read them from the streams.
    Refill,
}

struct Reader {
    id: u64,
    tx: mpsc::Sender<Delivery>,
}

/// Where live events come from.
enum Source {
    Redis(redis::Client),
    /// A Redis Cluster, by its seed nodes.
    Cluster(Vec<String>),
    /// The embedded bus carries every session; the hub picks the attached ones.
    Embedded(Arc<EmbeddedBus>),
}

pub struct Hub {
    source: Source,
    /// Attached readers by session id.
    readers: Mutex<HashMap<String, Vec<Reader>>>,
    /// The current connection's command half; `None` while disconnected.
    sink: tokio::sync::Mutex<Option<Sink>>,
    /// Cluster only: sessions whose `SSUBSCRIBE` failed (their slot's master
    /// was unreachable), tried again until it takes.
    pending: Mutex<HashSet<String>>,
    next_id: AtomicU64,
    /// A SUBSCRIBE failed on a connection that stays up: the connection task
    /// drops it and reconnects, which subscribes every session again.
    reconnect: tokio::sync::Notify,
    queue: usize,
    metrics: Arc<Metrics>,
}

/// A reader's attachment; detaches on drop.
pub struct Attachment {
    pub rx: mpsc::Receiver<Delivery>,
    hub: Arc<Hub>,
    session_id: String,
    id: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let hub = self.hub.clone();
        let session = std::mem::take(&mut self.session_id);
        let id = self.id;
        tokio::spawn(async move { hub.detach(&session, id).await });
    }
}

impl Hub {
    /// Starts the hub and its connection task.
    pub fn start(backplane: &Backplane, queue: usize, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Hub>> {
        let source = match backplane {
            Backplane::Redis(url) => match chat_wire::redis_conn::cluster_nodes(url) {
                Some(nodes) => Source::Cluster(nodes),
                None => Source::Redis(redis::Client::open(url.as_str())?),
            },
            Backplane::Embedded(bus) => Source::Embedded(bus.clone()),
        };
        let hub = Arc::new(Hub {
            source,
            readers: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            reconnect: tokio::sync::Notify::new(),
            queue,
            metrics,
        });
        match &hub.source {
            Source::Redis(client) => tokio::spawn(hub.clone().run(client.clone())),
            Source::Cluster(nodes) => tokio::spawn(hub.clone().run_cluster(nodes.clone())),
            Source::Embedded(bus) => tokio::spawn(hub.clone().run_embedded(bus.subscribe())),
        };
        Ok(hub)
    }

    /// Attaches a reader to `session_id`; subscribes the session when it is the first.
    pub async fn attach(self: &Arc<Self>, session_id: &str) -> Attachment {
        let (tx, rx) = mpsc::channel(self.queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut sink = self.sink.lock().await;
        let first = {
            let mut readers = self.readers.lock().unwrap();
            let list = readers.entry(session_id.to_owned()).or_default();
            list.push(Reader { id, tx });
            list.len() == 1
        };
        if first {
            if let Some(s) = sink.as_mut() {
                let channel = keys::session_channel(session_id);
                if let Err(e) = s.subscribe(&channel).await {
                    match s {
                        // Reconnect: the new connection subscribes every attached
                        // session, and readers refill what passed meanwhile.
                        Sink::Single(_) => {
                            log::warn!("subscribe {channel} failed, reconnecting: {e}");
                            self.reconnect.notify_one();
                        }
                        // The connection task tries again, then refills.
                        Sink::Cluster(_) => {
                            log::warn!("ssubscribe {channel} failed, trying again: {e}");
                            self.pending.lock().unwrap().insert(session_id.to_owned());
                        }
                    }
                }
            }
        }
        Attachment { rx, hub: self.clone(), session_id: session_id.to_owned(), id }
    }

    async fn detach(&self, session_id: &str, id: u64) {
        let mut sink = self.sink.lock().await;
        let last = {
            let mut readers = self.readers.lock().unwrap();
            match readers.get_mut(session_id) {
                Some(list) => {
                    list.retain(|r| r.id != id);
                    let empty = list.is_empty();
                    if empty {
                        readers.remove(session_id);
                    }
                    empty
                }
                None => false,
            }
        };
        if last {
            self.pending.lock().unwrap().remove(session_id);
            if let Some(s) = sink.as_mut() {
                let _ = s.unsubscribe(&keys::session_channel(session_id)).await;
            }
        }
    }

    /// Sessions with readers attached here.
    pub fn sessions(&self) -> usize {
        self.readers.lock().unwrap().len()
    }

    /// Keeps a connection: connect, subscribe all, read until it drops, repeat.
    /// The embedded bus: every event of every session arrives here; a lag is a gap, so readers refill.
    async fn run_embedded(self: Arc<Self>, mut live: tokio::sync::broadcast::Receiver<(String, Arc<Event>)>) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match live.recv().await {
                Ok((session, event)) => self.deliver(&session, Delivery::Event(event)),
                Err(RecvError::Lagged(missed)) => {
                    log::warn!("embedded bus: {missed} events passed unseen; refilling every reader");
                    self.broadcast_refill();
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    async fn run(self: Arc<Self>, client: redis::Client) {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            let pubsub = connect_until("pub/sub", &mut backoff, || client.get_async_pubsub()).await;
            let (mut sink, mut stream) = pubsub.split();
            {
                let mut current = self.sink.lock().await;
                let sessions: Vec<String> = self.readers.lock().unwrap().keys().cloned().collect();
                let mut ok = true;
                for session in &sessions {
                    if bounded(sink.subscribe(keys::session_channel(session))).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if !ok {
                    log::warn!("re-subscribing {} sessions failed; reconnecting in {backoff:?}", sessions.len());
                    drop(current);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                *current = Some(Sink::Single(sink));
            }
            backoff = Duration::from_millis(50);
            if !first {
                self.metrics.pubsub_reconnects.inc();
                log::info!("pub/sub reconnected; refilling every attached reader");
            }
            // Also after the first connection: readers attached before it
            // (or while it was being made) may have missed events.
            self.broadcast_refill();
            first = false;
            loop {
                let msg = tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                    _ = self.reconnect.notified() => break,
                };
                let channel = msg.get_channel_name().to_owned();
                let Ok(payload) = msg.get_payload::<String>() else { continue };
                let Ok(event) = Event::from_json(&payload) else {
                    log::warn!("unreadable event on {channel}");
                    continue;
                };
                if let Some(session) = keys::session_of_channel(&channel) {
                    self.deliver(session, Delivery::Event(Arc::new(event)));
                }
            }
            log::warn!("pub/sub connection lost or a subscription failed; reconnecting");
            *self.sink.lock().await = None;
        }
    }

    /// A Redis Cluster: one cluster connection (RESP3) whose pushes carry
    /// the shard channels' messages and subscription confirmations.
    async fn run_cluster(self: Arc<Self>, nodes: Vec<String>) {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let client = match chat_wire::redis_conn::cluster_client(nodes, PUBSUB_TIMEOUT, PUBSUB_TIMEOUT, Some(tx)) {
            Ok(c) => c,
            Err(e) => {
                log::error!("redis cluster: {e}; live events are off, readers rely on polling the streams");
                return;
            }
        };
        let mut backoff = Duration::from_millis(50);
        let conn = connect_until("cluster pub/sub", &mut backoff, || client.get_async_connection()).await;
        {
            let mut current = self.sink.lock().await;
            let sessions: Vec<String> = self.readers.lock().unwrap().keys().cloned().collect();
            self.pending.lock().unwrap().extend(sessions);
            *current = Some(Sink::Cluster(conn));
        }
        self.broadcast_refill();
        // Channels confirmed once: a later confirmation is a resubscription.
        let mut confirmed: HashSet<String> = HashSet::new();
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let push = tokio::select! {
                push = pushes.recv() => match push {
                    Some(push) => push,
                    None => return,
                },
                _ = retry.tick() => {
                    self.subscribe_pending().await;
                    continue;
                }
            };
            let channel = push.data.first().and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
            match (push.kind, channel) {
                (redis::PushKind::SMessage, Some(channel)) => {
                    let Some(payload) = push.data.get(1).and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    else {
                        continue;
                    };
                    let Ok(event) = Event::from_json(&payload) else {
                        log::warn!("unreadable event on {channel}");
                        continue;
                    };
                    if let Some(session) = keys::session_of_channel(&channel) {
                        self.deliver(session, Delivery::Event(Arc::new(event)));
                    }
                }
                (redis::PushKind::SSubscribe, Some(channel)) => {
                    if !confirmed.insert(channel.clone()) {
                        // Subscribed again after a reconnection or a slot
                        // move: what was published meanwhile is in the streams.
                        self.metrics.pubsub_reconnects.inc();
                        if let Some(session) = keys::session_of_channel(&channel) {
                            log::info!("{channel} subscribed again; its readers refill");
                            self.deliver(session, Delivery::Refill);
                        }
                    }
                }
                (redis::PushKind::SUnsubscribe, Some(channel)) => {
                    confirmed.remove(&channel);
                }
                _ => {}
            }
        }
    }

    /// Cluster only: subscribes the sessions whose first try failed, and
    /// refills their readers once it takes.
    async fn subscribe_pending(&self) {
        if self.pending.lock().unwrap().is_empty() {
            return;
        }
        let mut sink = self.sink.lock().await;
        let Some(s) = sink.as_mut() else { return };
        let sessions: Vec<String> = self.pending.lock().unwrap().iter().cloned().collect();
        for session in sessions {
            if !self.readers.lock().unwrap().contains_key(&session) {
                self.pending.lock().unwrap().remove(&session);
                continue;
            }
            if s.subscribe(&keys::session_channel(&session)).await.is_ok() {
                self.pending.lock().unwrap().remove(&session);
                self.deliver(&session, Delivery::Refill);
            }
        }
    }

    fn deliver(&self, session_id: &str, delivery: Delivery) {
        let mut readers = self.readers.lock().unwrap();
        if let Some(list) = readers.get_mut(session_id) {
            list.retain(|r| match r.tx.try_send(delivery.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Dropping the sender ends the reader's queue: it closes with 1013.
                    self.metrics.slow_consumers.inc();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    fn broadcast_refill(&self) {
        let sessions: Vec<String> = self.readers.lock().unwrap().keys().cloned().collect();
        for session in sessions {
            self.deliver(&session, Delivery::Refill);
        }
    }
}

/// Tries `connect` (each try bounded) until it succeeds, waiting `backoff`
/// after a failure and doubling it up to `MAX_BACKOFF`.
async fn connect_until<T, Fut>(what: &str, backoff: &mut Duration, mut connect: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    loop {
        match tokio::time::timeout(PUBSUB_TIMEOUT, connect()).await {
            Ok(Ok(conn)) => return conn,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                log::warn!("{what} connection failed, retrying in {backoff:?}: {why}");
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The command half of the live-event connection.
enum Sink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channel: &str) -> Result<(), String> {
        match self {
            Sink::Single(s) => bounded(s.subscribe(channel)).await,
            Sink::Cluster(c) => bounded(c.ssubscribe(channel)).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<(), String> {
        match self {
            Sink::Single(s) => bounded(s.unsubscribe(channel)).await,
            Sink::Cluster(c) => bounded(c.sunsubscribe(channel)).await,
        }
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(PUBSUB_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {PUBSUB_TIMEOUT:?}")),
    }
}
