//! Exactly-once, in-order delivery of a session's requests to one reader (a
//! WebSocket or an SSE response).
//!
//! For each request it follows, a `Follower` keeps the last `seq` this
//! reader has passed on, and the `after_seq` of the client's last `resume`;
//! the cursor is the higher of the two. Nothing at or below the cursor is
//! passed on, and nothing passed on is ever passed on again, whatever arrives
//! (live events, a `resume`, a refill). A live event is passed on when it is
//! the next one; a newer one means a gap (a late join, a pub/sub reconnect),
//! filled from the request's stream, which is never behind pub/sub and is
//! read in pages from the cursor.
//!
//! Silence is not death: a request whose stream has not grown for the stall
//! timeout is read once more and then offered to `takeover`, which fences it
//! only when its producer's lease has lapsed (a paused or dead node). Every
//! end a reader sees is a stored `done` or `error`; nothing is made up here.
//!
//! Bounds: `MAX_FOLLOWED` requests followed at once (past it the oldest is
//! parked with its cursor, and a `resume` picks it up again), `LEFT_MEMORY`
//! cursors of requests no longer followed; one page of stored events per turn.

use crate::takeover::Takeovers;
use chat_wire::ledger::{Ledger, Page, PAGE};
use chat_wire::Event;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests followed at once by one reader; past it the oldest is parked.
const MAX_FOLLOWED: usize = 64;
/// Cursors kept of requests no longer followed (ended or parked).
const LEFT_MEMORY: usize = 4096;

struct Track {
    /// The last `seq` this reader passed on.
    sent: u64,
    /// The `after_seq` of the client's last `resume`: what it says it has.
    floor: u64,
    /// The highest `seq` known to be stored: the producer's progress.
    seen: u64,
    /// When `seen` last grew (or the request was last offered for takeover).
    last_progress: Instant,
}

impl Track {
    /// Nothing at or below it is passed on.
    fn cursor(&self) -> u64 {
        self.sent.max(self.floor)
    }
}

/// What a reader sends: an event of a request, or a notice about one (a
/// socket-level `error` frame without `seq`, never stored).
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Event(Event),
    Notice { request_id: String, code: &'static str, message: String },
}

impl Out {
    fn notice(request_id: &str, code: &'static str, message: impl Into<String>) -> Out {
        Out::Notice { request_id: request_id.to_owned(), code, message: message.into() }
    }
}

/// Why a resume failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumeError {
    UnknownRequest,
    StoreUnavailable,
}

pub struct Follower {
    ledger: Arc<dyn Ledger>,
    takeovers: Arc<Takeovers>,
    tracks: HashMap<String, Track>,
    /// Order in which tracks were opened, to bound them.
    opened: VecDeque<String>,
    /// Cursors of requests this reader no longer follows.
    left: HashMap<String, u64>,
    left_order: VecDeque<String>,
    /// Some cursor was forgotten: a request first seen mid-way might have been
    /// sent before, so only requests seen from `seq` 1 are followed unasked.
    forgot: bool,
    /// Chats being dispatched by this reader (see `expect`).
    pending: HashSet<String>,
    /// Requests with more stored events than one page passed on.
    behind: VecDeque<String>,
    /// Follow this request only (an SSE response), not the session's others.
    only: Option<String>,
    /// Notices to send with the next output (a request parked past `MAX_FOLLOWED`).
    notices: Vec<Out>,
    stall_timeout: Duration,
    /// When this reader last told the ledger which requests it follows.
    last_touch: Instant,
}

/// How often a reader tells the ledger it still follows its requests; a
/// request no reader touched for the node's `stream.abandon_after` (at least
/// three times this) is cancelled: its client left.
pub const TOUCH_EVERY: Duration = Duration::from_secs(5);

impl Follower {
    pub fn new(ledger: Arc<dyn Ledger>, takeovers: Arc<Takeovers>, stall_timeout: Duration) -> Follower {
        Follower {
            ledger,
            takeovers,
            tracks: HashMap::new(),
            opened: VecDeque::new(),
            left: HashMap::new(),
            left_order: VecDeque::new(),
            forgot: false,
            pending: HashSet::new(),
            behind: VecDeque::new(),
            only: None,
            notices: Vec::new(),
            stall_timeout,
            last_touch: Instant::now(),
        }
    }

    /// A follower of `request_id` alone (an SSE response): live events of the
    /// session's other requests are ignored.
    pub fn only(mut self, request_id: &str) -> Follower {
        self.only = Some(request_id.to_owned());
        self
    }

    /// Notices waiting to be sent (call after each of the other methods).
    pub fn take_notices(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.notices)
    }

    /// A chat this reader sent is being dispatched: hold its live events
    /// until `start`, so the client sees `accepted` before the first chunk.
    pub fn expect(&mut self, request_id: &str) {
        self.pending.insert(request_id.to_owned());
    }

    /// The chat was accepted: follow it from its beginning, with whatever was
    /// published while it was pending.
    pub async fn start(&mut self, request_id: &str) -> Vec<Out> {
        self.pending.remove(request_id);
        if !self.tracks.contains_key(request_id) {
            // A resume may have come first: what it sent is not sent again.
            let sent = self.left.get(request_id).copied().unwrap_or(0);
            self.open(request_id, sent);
        }
        self.fill(request_id).await.unwrap_or_default()
    }

    /// The chat's dispatch failed: stop expecting it.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
        // Remembered, so a node that started it after all streams nothing here.
        self.finish_at(request_id, 0);
    }

    pub fn is_following(&self, request_id: &str) -> bool {
        self.tracks.contains_key(request_id)
    }

    /// Whether stored events wait to be passed on (call `catch_up`).
    pub fn is_behind(&self) -> bool {
        !self.behind.is_empty()
    }

    /// The next page of the request that is furthest behind.
    pub async fn catch_up(&mut self) -> Vec<Out> {
        match self.behind.pop_front() {
            Some(id) => self.fill(&id).await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// A live event: returns what to pass on, in order (possibly several after a gap, possibly none).
    pub async fn on_live(&mut self, event: &Event) -> Vec<Out> {
        let id = &event.request_id;
        if self.pending.contains(id) || self.left.contains_key(id) {
            return Vec::new();
        }
        if !self.tracks.contains_key(id) {
            if (self.forgot && event.seq > 1) || self.only.as_ref().is_some_and(|only| only != id) {
                return Vec::new();
            }
            self.open(id, 0);
        }
        let track = self.tracks.get_mut(id).expect("opened above");
        if event.seq > track.seen {
            track.seen = event.seq;
            track.last_progress = Instant::now();
        }
        if event.seq <= track.cursor() {
            if event.is_terminal() {
                // The request ended at or below what this reader already has.
                let past_end = event.seq < track.floor;
                self.finish(id);
                if past_end {
                    return vec![past_end_notice(id, event.seq)];
                }
            }
            return Vec::new();
        }
        if event.seq == track.cursor() + 1 {
            return self.accept(id, vec![event.clone()]);
        }
        // A gap: the stream has everything up to this event (it is written before it is published).
        let id = id.clone();
        self.fill(&id).await.unwrap_or_default()
    }

    /// Resume from `after_seq`: stored events after it (and after anything
    /// this reader already sent of the request), then live ones. A later
    /// resume may ask from further back; what was sent is never sent again.
    pub async fn resume(&mut self, request_id: &str, after_seq: u64) -> Result<Vec<Out>, ResumeError> {
        let sent = self.tracks.get(request_id).map(|t| t.sent).or_else(|| self.left.get(request_id).copied());
        let sent = sent.unwrap_or(0);
        let cursor = after_seq.max(sent);
        let page = match self.ledger.page(request_id, cursor, PAGE).await {
            Ok(page) if page.known => page,
            Ok(_) => return Err(ResumeError::UnknownRequest),
            Err(e) => {
                log::warn!("request_id={request_id} resume failed: {e}");
                return Err(ResumeError::StoreUnavailable);
            }
        };
        self.pending.remove(request_id);
        if let Some(end) = page.ended.filter(|end| *end <= cursor) {
            // The client (or this reader) already has the whole request.
            self.finish_at(request_id, sent);
            return Ok(if after_seq > end { vec![past_end_notice(request_id, end)] } else { Vec::new() });
        }
        if self.tracks.contains_key(request_id) {
            self.opened.retain(|id| id != request_id);
            self.opened.push_back(request_id.to_owned());
        } else {
            self.open(request_id, 0);
        }
        let track = self.tracks.get_mut(request_id).expect("opened above");
        track.sent = sent;
        track.floor = after_seq;
        track.seen = track.seen.max(page.last_seq);
        track.last_progress = Instant::now();
        Ok(self.take_page(request_id, page))
    }

    /// After a pub/sub reconnect: fills every followed request from its stream.
    pub async fn refill_all(&mut self) -> Vec<Out> {
        let ids: Vec<String> = self.tracks.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.fill(&id).await.unwrap_or_default());
        }
        out
    }

    /// Requests whose streams stopped growing for the stall timeout: read
    /// once more; those still silent are offered for takeover, which happens
    /// only if their producer's lease has lapsed.
    pub async fn check_stalls(&mut self) -> Vec<Out> {
        let now = Instant::now();
        if now.duration_since(self.last_touch) >= TOUCH_EVERY && !self.tracks.is_empty() {
            self.last_touch = now;
            let followed: Vec<String> = self.tracks.keys().cloned().collect();
            if let Err(e) = self.ledger.touch(&followed).await {
                log::warn!("could not note {} followed requests: {e}", followed.len());
            }
        }
        let stalled: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| now.duration_since(t.last_progress) >= self.stall_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in stalled {
            let seen_before = self.tracks.get(&id).map_or(0, |t| t.seen);
            let page = match self.ledger.page(&id, self.tracks.get(&id).map_or(0, |t| t.cursor()), PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    log::warn!("request_id={id} stall check: store unavailable: {e}");
                    continue;
                }
            };
            if !page.known {
                // Expired or never stored: nothing more will come.
                self.finish(&id);
                out.push(Out::notice(&id, "unknown_request", "no such request, or it expired"));
                continue;
            }
            let grew = page.last_seq > seen_before;
            out.extend(self.take_page(&id, page));
            let Some(track) = self.tracks.get_mut(&id) else { continue };
            track.last_progress = now;
            if !grew {
                self.takeovers.start(&id);
            }
        }
        out
    }

    fn open(&mut self, request_id: &str, sent: u64) {
        if self.tracks.len() >= MAX_FOLLOWED {
            while let Some(old) = self.opened.pop_front() {
                if let Some(track) = self.tracks.remove(&old) {
                    // Parked: its live events are no longer passed on; a resume picks it up.
                    self.behind.retain(|id| *id != old);
                    self.remember(&old, track.sent);
                    let why =
                        format!("more than {MAX_FOLLOWED} requests followed at once; resume to follow this one again");
                    self.notices.push(Out::notice(&old, "parked", why));
                    break;
                }
            }
        }
        if self.left.remove(request_id).is_some() {
            self.left_order.retain(|id| id != request_id);
        }
        self.opened.push_back(request_id.to_owned());
        self.tracks.insert(request_id.to_owned(), Track { sent, floor: 0, seen: sent, last_progress: Instant::now() });
    }

    fn remember(&mut self, request_id: &str, sent: u64) {
        if let Some(kept) = self.left.get_mut(request_id) {
            *kept = (*kept).max(sent);
        } else {
            self.left.insert(request_id.to_owned(), sent);
            self.left_order.push_back(request_id.to_owned());
            if self.left_order.len() > LEFT_MEMORY {
                if let Some(old) = self.left_order.pop_front() {
                    self.left.remove(&old);
                    self.forgot = true;
                }
            }
        }
    }

    fn finish(&mut self, request_id: &str) {
        let sent = self.tracks.get(request_id).map_or(0, |t| t.sent);
        self.finish_at(request_id, sent);
    }

    fn finish_at(&mut self, request_id: &str, sent: u64) {
        if self.tracks.remove(request_id).is_some() {
            self.opened.retain(|id| id != request_id);
        }
        self.behind.retain(|id| id != request_id);
        self.remember(request_id, sent);
    }

    async fn fill(&mut self, request_id: &str) -> Result<Vec<Out>, chat_wire::redis_conn::RedisError> {
        let Some(cursor) = self.tracks.get(request_id).map(|t| t.cursor()) else { return Ok(Vec::new()) };
        let page = self.ledger.page(request_id, cursor, PAGE).await?;
        Ok(self.take_page(request_id, page))
    }

    /// Passes on the stored events that continue the track; notes a full page
    /// as behind (more to read) and the progress the page shows.
    fn take_page(&mut self, request_id: &str, page: Page) -> Vec<Out> {
        let full = page.events.len() >= PAGE;
        if let Some(track) = self.tracks.get_mut(request_id) {
            if page.last_seq > track.seen {
                track.seen = page.last_seq;
                track.last_progress = Instant::now();
            }
        }
        let first = page.events.first().map(|e| e.seq);
        let Some(track) = self.tracks.get(request_id) else { return Vec::new() };
        let cursor = track.cursor();
        if let Some(end) = page.ended.filter(|end| *end <= cursor) {
            // Ended at or below what this reader has (a resume past the end).
            let past_end = end < track.floor;
            self.finish(request_id);
            return if past_end { vec![past_end_notice(request_id, end)] } else { Vec::new() };
        }
        if first.is_some_and(|seq| seq > cursor + 1) {
            // Only trimming can open a gap in a stream, and answers are cut
            // before the trim length: say so rather than skip.
            self.finish(request_id);
            return vec![Out::notice(request_id, "events_trimmed", "the stored events of this request were trimmed")];
        }
        let out = self.accept(request_id, page.events);
        if full && self.tracks.contains_key(request_id) && !self.behind.iter().any(|id| id == request_id) {
            self.behind.push_back(request_id.to_owned());
        }
        out
    }

    /// Passes on the contiguous run of events that continues the track.
    fn accept(&mut self, request_id: &str, events: Vec<Event>) -> Vec<Out> {
        let Some(track) = self.tracks.get_mut(request_id) else { return Vec::new() };
        let mut out = Vec::new();
        let mut ended = false;
        for e in events {
            if e.request_id == request_id && e.seq == track.cursor() + 1 {
                track.sent = e.seq;
                ended = e.is_terminal();
                out.push(Out::Event(e));
                if ended {
                    break;
                }
            }
        }
        if ended {
            self.finish(request_id);
        }
        out
    }
}

fn past_end_notice(request_id: &str, end: u64) -> Out {
    Out::notice(
        request_id,
        "resume_past_end",
        format!("the request ended at seq {end}, before the after_seq asked for"),
    )
}
