//! Exactly-once, in-order delivery of a session's requests to one reader.
//!
//! A `Follower` keeps, for each request it follows, the last `seq` it passed
//! on. A live event is passed on only when it is the next one; an older one is
//! a duplicate and dropped; a newer one means a gap (a late join, a pub/sub
//! reconnect), and the gap is filled from the request's Redis stream, which
//! is never behind pub/sub. Resume is the same mechanism started from
//! `after_seq`. A followed request whose events stop for longer than the
//! stall timeout is handed to `takeover` (another node continues it); if it
//! is still silent a period later, it is ended with a `node_failed` error, so
//! nobody waits forever.

use crate::takeover::Takeovers;
use chat_wire::ledger::Ledger;
use chat_wire::redis_conn::RedisError;
use chat_wire::Event;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Finished request ids remembered per reader, to drop their late duplicates.
const FINISHED_MEMORY: usize = 512;
/// Requests followed at once by one reader; past it the oldest is dropped.
const MAX_FOLLOWED: usize = 64;

struct Track {
    last_seq: u64,
    last_progress: Instant,
    /// Set when a read of the stream found nothing new: the next stall check ends the request.
    suspect: bool,
}

/// Why a resume failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumeError {
    UnknownRequest,
    StoreUnavailable,
}

pub struct Follower {
    replay: Arc<Ledger>,
    /// Started for a request that went silent; `None` only ends such requests.
    takeovers: Option<Arc<Takeovers>>,
    tracks: HashMap<String, Track>,
    /// Order in which tracks were opened, to bound them.
    opened: VecDeque<String>,
    finished: HashSet<String>,
    finished_order: VecDeque<String>,
    /// Chats being dispatched by this reader (see `expect`).
    pending: HashSet<String>,
    stall_timeout: Duration,
}

impl Follower {
    pub fn new(replay: Arc<Ledger>, takeovers: Option<Arc<Takeovers>>, stall_timeout: Duration) -> Follower {
        Follower {
            replay,
            takeovers,
            tracks: HashMap::new(),
            opened: VecDeque::new(),
            finished: HashSet::new(),
            finished_order: VecDeque::new(),
            pending: HashSet::new(),
            stall_timeout,
        }
    }

    /// A chat this reader sent is being dispatched: hold its live events
    /// until `start`, so the client sees `accepted` before the first chunk.
    pub fn expect(&mut self, request_id: &str) {
        self.pending.insert(request_id.to_owned());
    }

    /// The chat was accepted: follow it from its beginning, with whatever was
    /// published while it was pending.
    pub async fn start(&mut self, request_id: &str) -> Vec<Event> {
        self.pending.remove(request_id);
        self.open(request_id, 0);
        self.fill(request_id).await.unwrap_or_default()
    }

    /// The chat's dispatch failed: stop expecting it.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
        self.tracks.remove(request_id);
    }

    pub fn is_following(&self, request_id: &str) -> bool {
        self.tracks.contains_key(request_id)
    }

    fn open(&mut self, request_id: &str, after_seq: u64) {
        if self.tracks.len() >= MAX_FOLLOWED {
            while let Some(old) = self.opened.pop_front() {
                if self.tracks.remove(&old).is_some() {
                    break;
                }
            }
        }
        self.finished.remove(request_id);
        self.opened.push_back(request_id.to_owned());
        self.tracks.insert(
            request_id.to_owned(),
            Track { last_seq: after_seq, last_progress: Instant::now(), suspect: false },
        );
    }

    fn finish(&mut self, request_id: &str) {
        self.tracks.remove(request_id);
        if self.finished.insert(request_id.to_owned()) {
            self.finished_order.push_back(request_id.to_owned());
            if self.finished_order.len() > FINISHED_MEMORY {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    /// A live event: returns what to pass on, in order (possibly several after a gap, possibly none).
    pub async fn on_live(&mut self, event: &Event) -> Vec<Event> {
        if self.finished.contains(&event.request_id) || self.pending.contains(&event.request_id) {
            return Vec::new();
        }
        let last = match self.tracks.get(&event.request_id) {
            Some(t) => t.last_seq,
            None => {
                self.open(&event.request_id, 0);
                0
            }
        };
        if event.seq <= last {
            return Vec::new();
        }
        if event.seq == last + 1 {
            return self.accept(vec![event.clone()]);
        }
        // A gap: the stream has everything up to this event (it is written before it is published).
        let request_id = event.request_id.clone();
        self.fill(&request_id).await.unwrap_or_default()
    }

    /// Resume from `after_seq`: stored events after it now, live ones after that.
    pub async fn resume(&mut self, request_id: &str, after_seq: u64) -> Result<Vec<Event>, ResumeError> {
        let stored = match self.replay.read(request_id).await {
            Ok(Some(events)) => events,
            Ok(None) => return Err(ResumeError::UnknownRequest),
            Err(e) => {
                log::warn!("request_id={request_id} resume failed: {e}");
                return Err(ResumeError::StoreUnavailable);
            }
        };
        let ended_before = stored.iter().any(|e| e.is_terminal() && e.seq <= after_seq);
        self.open(request_id, after_seq);
        let out = self.accept_stored(request_id, stored);
        if ended_before {
            // The client already has the whole request.
            self.finish(request_id);
        }
        Ok(out)
    }

    /// After a pub/sub reconnect: fills every followed request from its stream.
    pub async fn refill_all(&mut self) -> Vec<Event> {
        let ids: Vec<String> = self.tracks.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.fill(&id).await.unwrap_or_default());
        }
        out
    }

    /// Requests silent past the stall timeout: read their streams once more;
    /// those still silent are ended with `node_failed`.
    pub async fn check_stalls(&mut self) -> Vec<Event> {
        let now = Instant::now();
        let stalled: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| now.duration_since(t.last_progress) >= self.stall_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in stalled {
            let found = self.fill(&id).await.unwrap_or_default();
            if !found.is_empty() {
                out.extend(found);
                continue;
            }
            let Some(track) = self.tracks.get_mut(&id) else { continue };
            if !track.suspect {
                // The producer went silent: another node takes the request over (one
                // backend wins the fence); readers give it one more stall period.
                track.suspect = true;
                track.last_progress = now;
                if let Some(takeovers) = &self.takeovers {
                    takeovers.start(&id);
                }
                continue;
            }
            let seq = track.last_seq + 1;
            let message = format!("no event from the AI node for {:?}", self.stall_timeout);
            out.push(Event::error(&id, seq, "node_failed", message));
            self.finish(&id);
        }
        out
    }

    async fn fill(&mut self, request_id: &str) -> Result<Vec<Event>, RedisError> {
        let stored = self.replay.read(request_id).await?.unwrap_or_default();
        Ok(self.accept_stored(request_id, stored))
    }

    fn accept_stored(&mut self, request_id: &str, mut stored: Vec<Event>) -> Vec<Event> {
        stored.sort_by_key(|e| e.seq);
        stored.retain(|e| e.request_id == request_id);
        self.accept(stored)
    }

    /// Passes on the contiguous run of events that continues the track.
    fn accept(&mut self, events: Vec<Event>) -> Vec<Event> {
        let Some(first) = events.first() else { return Vec::new() };
        let id = first.request_id.clone();
        let Some(track) = self.tracks.get_mut(&id) else { return Vec::new() };
        let mut out = Vec::new();
        for e in events {
            if e.seq == track.last_seq + 1 {
                track.last_seq = e.seq;
                out.push(e);
            }
        }
        if !out.is_empty() {
            track.last_progress = Instant::now();
            track.suspect = false;
        }
        if out.last().is_some_and(|e| e.is_terminal()) {
            self.finish(&id);
        }
        out
    }
}
