//! The ledger of requests, the backplane every backend and AI node shares:
//! who produces each request at which epoch, the events produced so far,
//! cancellation, and the sessions' histories. [`Ledger`] is the one face;
//! [`RedisLedger`] (`redis.rs`, Lua scripts) and [`EmbeddedBus`]
//! (`embedded.rs`, in-process, for the one-command cluster without Redis)
//! implement it, and [`on`] picks one from a [`Backplane`]. The types both
//! answer with, and the retention defaults, are here and nowhere else.
//!
//! Ownership is fenced by an epoch. The first node claims a request at the
//! first epoch. A takeover first `fence`s the request (epoch + 1, one
//! winner), then the new node `adopt`s it at that epoch. Every event carries
//! its producer's epoch, and `emit` stores and publishes it only when that
//! epoch is still the request's: a slow old node can never interleave with
//! its successor. The stream is written before the event is published.
//!
//! Live delivery (SUBSCRIBE, the embedded broadcast) is not in the trait: the
//! backend's hub holds one dedicated pub/sub connection per process and
//! reconnects it itself (`backend/src/hub.rs`), picking Redis or the
//! embedded bus from the same [`Backplane`].

mod embedded;
mod redis;

pub use embedded::EmbeddedBus;
pub use redis::RedisLedger;

use crate::redis_conn::RedisError;
use crate::Event;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// Where components exchange events: a Redis at a URL, or an embedded bus.
#[derive(Clone)]
pub enum Backplane {
    Redis(String),
    Embedded(Arc<EmbeddedBus>),
}

/// The ledger on `backplane`; Redis calls are bounded by the given timeouts,
/// streams capped at `max_len` events and kept `ttl` after their last write.
pub fn on(
    backplane: &Backplane,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_len: usize,
    ttl: Duration,
) -> Result<Arc<dyn Ledger>, RedisError> {
    Ok(match backplane {
        Backplane::Redis(url) => Arc::new(RedisLedger::new(url, connect_timeout, command_timeout, max_len, ttl)?),
        Backplane::Embedded(bus) => bus.clone(),
    })
}

/// What the backends and the AI nodes do with requests, whatever holds them.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Claims `request_id` for `record.node` at epoch 1 with a lease of
    /// `lease`; `Some(holder)` when it was claimed before.
    async fn claim(
        &self,
        request_id: &str,
        record: &RequestRecord,
        lease: Duration,
    ) -> Result<Option<String>, RedisError>;

    /// Moves the request from epoch `expected` to the next, only when its
    /// producer's lease has lapsed (the evidence that the producer is gone).
    async fn fence(&self, request_id: &str, expected: u64) -> Result<Fence, RedisError>;

    /// Takes the fenced request over at `epoch` for `node`, with a lease; false
    /// when the epoch moved on, the request ended, or another node adopted it.
    async fn adopt(&self, request_id: &str, epoch: u64, node: &str, lease: Duration) -> Result<bool, RedisError>;

    /// Renews the producer's lease (and the request's lifetime). `Lost` when
    /// `node` at `epoch` no longer produces the request: it must stop;
    /// `Cancelled` when it must end the request as cancelled, which includes
    /// an abandoned one: no reader touched it for `abandon_after` (zero: never).
    async fn renew(
        &self,
        request_id: &str,
        epoch: u64,
        node: &str,
        lease: Duration,
        abandon_after: Duration,
    ) -> Result<Renewal, RedisError>;

    /// Asks that a request stop: marks it cancelled. Its producer (or, with
    /// none alive, whoever fences it) stores an `error` with code `cancelled`.
    async fn cancel(&self, request_id: &str) -> Result<Cancel, RedisError>;

    /// Notes that a reader still follows these requests (see `renew`'s abandonment).
    async fn touch(&self, request_ids: &[String]) -> Result<(), RedisError>;

    /// Stores then publishes `event` on the session's channel, only when its
    /// producer (`event.node` at `event.epoch`) owns the request and its `seq`
    /// follows the last stored one. A `done` or `error` ends the request. The
    /// producer's retry of the last stored event (its answer was lost) is
    /// `Published` again, without a second copy.
    async fn emit(&self, session_id: &str, event: &Event) -> Result<Emitted, RedisError>;

    /// The request's record; `None` when it was never claimed or has expired.
    async fn record(&self, request_id: &str) -> Result<Option<RequestRecord>, RedisError>;

    /// Up to `count` stored events with `seq > after_seq`, and where the request stands.
    async fn page(&self, request_id: &str, after_seq: u64, count: usize) -> Result<Page, RedisError>;

    /// The items of a session's history, oldest first (JSON, one per turn).
    async fn history(&self, session_id: &str) -> Result<Vec<String>, RedisError>;

    /// Appends items to a session's history, keeping the last `keep`, living `ttl` past this write.
    async fn remember(
        &self,
        session_id: &str,
        items: Vec<String>,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), RedisError>;

    /// Whether the backing store answers.
    async fn ping(&self) -> Result<(), RedisError>;

    /// Every stored event of `request_id` in order (read in pages); `None`
    /// when none is stored.
    async fn read(&self, request_id: &str) -> Result<Option<Vec<Event>>, RedisError> {
        let mut all: Vec<Event> = Vec::new();
        loop {
            let after = all.last().map_or(0, |e| e.seq);
            let page = self.page(request_id, after, PAGE).await?;
            let full = page.events.len() == PAGE;
            all.extend(page.events);
            if !full {
                break;
            }
        }
        Ok(if all.is_empty() { None } else { Some(all) })
    }
}

/// A request as claimed: what was asked, and who produces it at which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub session_id: String,
    pub message: String,
    pub user_id: Option<String>,
    /// The producing node's id (`takeover` between a fence and an adoption).
    pub node: String,
    pub epoch: u64,
    /// The id of the API key that started it (`None` with keys off).
    pub owner: Option<String>,
    /// A cancel was asked; the request ends with a stored `cancelled` error.
    pub cancelled: bool,
}

/// What `emit` did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitted {
    Published,
    /// Refused: the event's producer no longer owns the request (another epoch,
    /// another node, the request already ended or was never claimed), or its
    /// `seq` does not follow the last stored one.
    Fenced,
    /// Refused: the request was cancelled. Its producer stores its
    /// `cancelled` end (a terminal event is still taken) and stops.
    Cancelled,
}

/// The outcome of `renew`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still the producer; the lease runs on.
    Held,
    /// No longer the producer (a takeover fenced it, or the request ended).
    Lost,
    /// Still the producer, and the request was cancelled (asked for, or
    /// abandoned: no reader touched it in time): store the end and stop.
    Cancelled,
}

/// The outcome of `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// No such request (never claimed, or expired).
    Unknown,
    /// It had ended already; nothing changes.
    Ended,
    /// Marked cancelled; its producer is alive and stores the end.
    Stopping,
    /// Marked cancelled, and no producer holds a lease: whoever fences it
    /// (`Fence::Cancelled`) stores the end.
    Orphaned,
}

/// The outcome of `fence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The request is at this new epoch, produced by nobody until a node adopts it.
    Won(u64),
    /// The request is not at the expected epoch (or was never claimed: 0).
    Moved(u64),
    /// The producer's lease is still renewed: it is alive, only silent.
    ProducerAlive,
    /// The request has a stored `done` or `error`.
    Ended,
    /// Fenced at this new epoch, but the request was cancelled: nobody
    /// continues it; the fencer stores its `cancelled` end.
    Cancelled(u64),
}

/// Stored events of a request from a cursor on, one page at a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Events with `seq` above the cursor, in order, at most the page size.
    pub events: Vec<Event>,
    /// The request was claimed (or has stored events): it exists.
    pub known: bool,
    /// The last stored `seq` (0 when none).
    pub last_seq: u64,
    /// The `seq` of the stored `done`/`error`, when the request has ended.
    pub ended: Option<u64>,
}

/// Events kept per request unless configured otherwise (`XADD MAXLEN ~`):
/// the AI node's `stream.max_len` default, the backend's and the embedded
/// bus's cap.
pub const DEFAULT_MAX_LEN: usize = 10_000;
/// How long a request's stream and claim live after their last write unless
/// configured otherwise (the AI node's `stream.ttl_secs` default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Events read per round trip (`XRANGE ... COUNT`).
pub const PAGE: usize = 256;

/// The node a backend-made event (an `error` after a failed takeover) is stored for.
pub const NO_PRODUCER: &str = "takeover";
