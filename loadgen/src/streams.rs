//! Chat streams over WebSockets: `sessions` sockets connect (at most
//! `connect_concurrency` handshakes at once), wait for each other, then each
//! sends `chats_per_session` chats one after the other, so up to `sessions`
//! answers stream at the same time.
//!
//! For every answer it checks completeness (each `seq` from 1 to the `done`
//! exactly once) and times the first chunk (from sending the chat) and every
//! event (from the AI node's `ts_us` stamp to arrival: publish-to-client).
//! Producer and reader share the machine's clock, so `ts_us` is comparable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_wire::{now_micros, Event, EventKind};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::{Barrier, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::latency::{histogram, Summary};
use crate::net::{connect, source_ip, target_addr};

/// What one run does.
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// `ws://host:port/ws/chat` (the session id is appended); several,
    /// separated by commas, take the sessions in turn (session `i` the
    /// `i % n`th): straight to each backend, as a front that costs nothing
    /// would spread them.
    pub url: String,
    /// Sockets, one session each.
    pub sessions: usize,
    /// Chats sent on each socket, one after the other.
    pub chats_per_session: usize,
    /// Handshakes in flight at once (a burst of thousands only measures the
    /// accept queue).
    pub connect_concurrency: usize,
    /// Loopback source addresses to spread the sockets over.
    pub source_ips: usize,
    /// Longest wait for one handshake.
    pub connect_timeout: Duration,
    /// Longest wait for one answer to end; past it the answer counts as incomplete.
    pub chat_timeout: Duration,
    /// Window over which the sessions' first chats start: session `i` starts
    /// `i / sessions` of the way in. Zero: all at once, so every answer's
    /// chunks are published in the same instants (a synchronized burst);
    /// one chunk interval: the same load with the phases spread evenly.
    pub start_spread: Duration,
    /// Makes session ids unique across runs (the backends keep history per session).
    pub run_id: String,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// The outcome of a run, as written to JSON.
#[derive(Debug, Serialize)]
pub struct StreamsReport {
    pub url: String,
    pub sessions: usize,
    pub chats_per_session: usize,
    /// Window the first chats were spread over (0: a synchronized burst).
    pub start_spread_ms: u64,
    /// Sockets that completed the handshake.
    pub connected: usize,
    pub connect_errors: usize,
    /// Chats sent.
    pub chats: u64,
    /// Answers that ended with `done` and every `seq` seen once.
    pub complete: u64,
    /// Answers that ended with an `error` event.
    pub error_events: u64,
    /// Answers that did not end within the timeout or whose socket closed.
    pub unfinished: u64,
    /// `seq` numbers below a `done` that never arrived.
    pub lost_chunks: u64,
    /// `seq` numbers that arrived more than once.
    pub duplicate_chunks: u64,
    /// Chunk events received.
    pub chunks: u64,
    /// Wall time from the first chat to the last answer's end.
    pub stream_secs: f64,
    pub chunks_per_sec: f64,
    /// Handshake time.
    pub connect: Summary,
    /// Chat sent to first chunk received.
    pub first_chunk: Summary,
    /// AI node's `ts_us` to arrival, every event.
    pub publish_to_client: Summary,
    /// The first few distinct error messages, for the operator.
    pub error_samples: Vec<String>,
}

/// Counters and histograms every session adds to.
#[derive(Default)]
struct Tally {
    connected: usize,
    connect_errors: usize,
    chats: u64,
    complete: u64,
    error_events: u64,
    unfinished: u64,
    lost_chunks: u64,
    duplicate_chunks: u64,
    chunks: u64,
    errors: Vec<String>,
}

impl Tally {
    fn note_error(&mut self, message: String) {
        if self.errors.len() < 10 && !self.errors.contains(&message) {
            self.errors.push(message);
        }
    }
}

struct Shared {
    tally: Mutex<Tally>,
    connect: Mutex<Histogram<u64>>,
    first_chunk: Mutex<Histogram<u64>>,
    publish: Mutex<Histogram<u64>>,
    bar: ProgressBar,
}

fn record(h: &Mutex<Histogram<u64>>, us: u64) {
    h.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(us.max(1));
}

/// Runs the streams and reports what the clients saw.
pub async fn run(config: StreamsConfig) -> anyhow::Result<StreamsReport> {
    let mut targets = Vec::new();
    for url in config.url.split(',') {
        targets.push((url.to_string(), target_addr(url).await?));
    }
    let targets = Arc::new(targets);
    let bar = if config.progress {
        let bar = ProgressBar::new((config.sessions * config.chats_per_session) as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} answers {msg}")
                .expect("static template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.set_message("connecting");
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        connect: Mutex::new(histogram()),
        first_chunk: Mutex::new(histogram()),
        publish: Mutex::new(histogram()),
        bar,
    });
    let gate = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    // Everyone (connected or not) meets here, plus this task, which starts the clock.
    let barrier = Arc::new(Barrier::new(config.sessions + 1));
    let mut tasks = Vec::with_capacity(config.sessions);
    for i in 0..config.sessions {
        let (shared, gate, barrier, config) = (shared.clone(), gate.clone(), barrier.clone(), config.clone());
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let (url, addr) = &targets[i % targets.len()];
            session(i, url, *addr, &config, &shared, &gate, &barrier).await
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    shared.bar.set_message("streaming");
    for t in tasks {
        t.await?;
    }
    let stream_secs = started.elapsed().as_secs_f64();
    shared.bar.finish_with_message("done");
    let t = std::mem::take(&mut *shared.tally.lock().unwrap_or_else(|p| p.into_inner()));
    let summary = |h: &Mutex<Histogram<u64>>| Summary::of(&h.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(StreamsReport {
        url: config.url,
        sessions: config.sessions,
        start_spread_ms: config.start_spread.as_millis() as u64,
        chats_per_session: config.chats_per_session,
        connected: t.connected,
        connect_errors: t.connect_errors,
        chats: t.chats,
        complete: t.complete,
        error_events: t.error_events,
        unfinished: t.unfinished,
        lost_chunks: t.lost_chunks,
        duplicate_chunks: t.duplicate_chunks,
        chunks: t.chunks,
        stream_secs,
        chunks_per_sec: t.chunks as f64 / stream_secs.max(1e-9),
        connect: summary(&shared.connect),
        first_chunk: summary(&shared.first_chunk),
        publish_to_client: summary(&shared.publish),
        error_samples: t.errors,
    })
}

async fn session(
    i: usize,
    url: &str,
    addr: std::net::SocketAddr,
    config: &StreamsConfig,
    shared: &Shared,
    gate: &Semaphore,
    barrier: &Barrier,
) {
    let url = format!("{url}?session_id=bench-{}-{i}", config.run_id);
    let connected = {
        let _permit = gate.acquire().await;
        let t0 = Instant::now();
        let ws = connect(&url, addr, source_ip(i, config.source_ips), config.connect_timeout).await;
        if ws.is_ok() {
            record(&shared.connect, t0.elapsed().as_micros() as u64);
        }
        ws
    };
    let mut ws = match connected {
        Ok(ws) => {
            shared.tally.lock().unwrap_or_else(|p| p.into_inner()).connected += 1;
            ws
        }
        Err(e) => {
            {
                let mut t = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
                t.connect_errors += 1;
                t.note_error(format!("{e:#}"));
            }
            barrier.wait().await;
            return;
        }
    };
    barrier.wait().await;
    if !config.start_spread.is_zero() {
        tokio::time::sleep(config.start_spread.mul_f64(i as f64 / config.sessions as f64)).await;
    }
    for _ in 0..config.chats_per_session {
        let outcome = chat(&mut ws, config.chat_timeout, shared).await;
        shared.bar.inc(1);
        let keep_going = {
            let mut t = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
            t.chats += 1;
            tally_answer(&mut t, outcome)
        };
        if !keep_going {
            // The socket is in an unknown state: stop this session.
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// Adds one answer to the tally; false when the session cannot go on.
fn tally_answer(t: &mut Tally, outcome: Answer) -> bool {
    match outcome {
        Answer::Complete { lost, duplicates, chunks } => {
            t.chunks += chunks;
            t.lost_chunks += lost;
            t.duplicate_chunks += duplicates;
            if lost == 0 && duplicates == 0 {
                t.complete += 1;
            }
        }
        Answer::ErrorEvent(message, chunks) => {
            t.chunks += chunks;
            t.error_events += 1;
            t.note_error(message);
        }
        Answer::Unfinished(message) => {
            t.unfinished += 1;
            t.note_error(message);
            return false;
        }
    }
    true
}

enum Answer {
    Complete { lost: u64, duplicates: u64, chunks: u64 },
    ErrorEvent(String, u64),
    Unfinished(String),
}

/// Sends one chat and reads its answer to the end.
async fn chat(ws: &mut crate::net::Ws, timeout: Duration, shared: &Shared) -> Answer {
    let frame = r#"{"type":"chat","message":"benchmark: tell me something"}"#;
    let sent = Instant::now();
    if let Err(e) = ws.send(Message::text(frame)).await {
        return Answer::Unfinished(format!("send: {e}"));
    }
    let mut first_chunk = true;
    // seq -> times seen, per request id (only one request is expected).
    let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
    let mut chunks = 0u64;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Answer::Unfinished(format!("no end of answer within {timeout:?}")),
            Ok(None) => return Answer::Unfinished("socket closed".into()),
            Ok(Some(Err(e))) => return Answer::Unfinished(format!("socket: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        let text = match next {
            Message::Text(t) => t,
            Message::Close(c) => return Answer::Unfinished(format!("closed by server: {c:?}")),
            _ => continue,
        };
        let Ok(event) = Event::from_json(text.as_str()) else {
            // `accepted` and other non-stream frames.
            if text.contains(r#""type":"error""#) {
                return Answer::ErrorEvent(text.to_string(), chunks);
            }
            continue;
        };
        if let Some(ts) = event.ts_us {
            record(&shared.publish, now_micros().saturating_sub(ts));
        }
        let seqs = seen.entry(event.request_id.clone()).or_default();
        let idx = event.seq as usize;
        if seqs.len() <= idx {
            seqs.resize(idx + 1, 0);
        }
        seqs[idx] = seqs[idx].saturating_add(1);
        match event.kind {
            EventKind::Chunk => {
                chunks += 1;
                if first_chunk {
                    first_chunk = false;
                    record(&shared.first_chunk, sent.elapsed().as_micros() as u64);
                }
            }
            EventKind::Error => {
                let message = format!("{}: {}", event.code.unwrap_or_default(), event.message.unwrap_or_default());
                return Answer::ErrorEvent(message, chunks);
            }
            EventKind::Done => {
                let seqs = &seen[&event.request_id];
                let upto = event.seq as usize;
                let lost = (1..=upto).filter(|s| seqs.get(*s).copied().unwrap_or(0) == 0).count() as u64;
                let duplicates = seqs.iter().map(|n| u64::from(n.saturating_sub(1))).sum();
                return Answer::Complete { lost, duplicates, chunks };
            }
        }
    }
}
