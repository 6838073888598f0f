//! What the ledger's two backings (Redis, `ledger`; the embedded bus,
//! `embedded`) answer in common: a request's record, the outcomes of `emit`
//! and `fence`, a page of stored events, and the retention defaults. Both
//! import this; neither imports the other's internals.

use crate::Event;
use std::time::Duration;

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
