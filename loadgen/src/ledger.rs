//! The backplane alone: how many events per second one Redis (a shard) or a
//! Redis Cluster takes through the ledger's own `EMIT` script, the write
//! every chunk of every answer makes. `producers` requests are claimed and
//! each emits chunks back to back (one in flight per request, as an AI node
//! does), with a few-word delta like a real chunk.
//!
//! On one Redis the report includes the server's CPU seconds (`INFO cpu`),
//! so events per Redis core follow.

use crate::latency::{histogram, Summary};
use chat_wire::ledger::{self, Backplane, Emitted, RequestRecord};
use chat_wire::Event;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct LedgerConfig {
    pub redis_url: String,
    pub producers: usize,
    pub duration: Duration,
    pub run_id: String,
}

#[derive(Serialize)]
pub struct LedgerReport {
    pub redis_url: String,
    pub producers: usize,
    pub seconds: f64,
    pub events: u64,
    pub events_per_sec: f64,
    pub failed: u64,
    /// Time of one `emit` (script round trip).
    pub emit: Summary,
    /// The Redis server's CPU seconds (user + system) over the run; one Redis only.
    pub redis_cpu_s: Option<f64>,
    /// Events per second of Redis CPU: what one fully busy shard core takes.
    pub events_per_redis_cpu_s: Option<f64>,
    /// Growth of the Redis's `used_memory` per stored event (stream entry
    /// and its share of the claim); one Redis only.
    pub redis_bytes_per_event: Option<f64>,
}

const NODE: &str = "loadgen-ledger";

pub async fn run(config: LedgerConfig) -> anyhow::Result<LedgerReport> {
    let second = Duration::from_secs(2);
    let backplane = Backplane::Redis(config.redis_url.clone());
    // Streams are not trimmed within a run, so memory per event is what an answer keeps.
    let ledger = ledger::on(&backplane, second, second, 1_000_000, Duration::from_secs(300))?;
    let cpu_before = redis_cpu(&config.redis_url).await;
    let memory_before = redis_info_field(&config.redis_url, "memory", "used_memory").await;
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut tasks = Vec::new();
    for i in 0..config.producers {
        let ledger = ledger.clone();
        let request_id = format!("cap-{}-{i}", config.run_id);
        let session_id = format!("cap-{}-s{i}", config.run_id);
        tasks.push(tokio::spawn(async move { produce(ledger, request_id, session_id, deadline).await }));
    }
    let mut latencies = histogram();
    let (mut events, mut failed) = (0u64, 0u64);
    for task in tasks {
        let (hist, ok, bad) = task.await?;
        latencies.add(hist)?;
        events += ok;
        failed += bad;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, redis_cpu(&config.redis_url).await) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let memory = match (memory_before, redis_info_field(&config.redis_url, "memory", "used_memory").await) {
        (Some(a), Some(b)) if events > 0 => Some((b - a) / events as f64),
        _ => None,
    };
    Ok(LedgerReport {
        redis_url: config.redis_url,
        producers: config.producers,
        seconds,
        events,
        events_per_sec: events as f64 / seconds,
        failed,
        emit: Summary::of(&latencies),
        redis_cpu_s: cpu,
        events_per_redis_cpu_s: cpu.filter(|c| *c > 0.0).map(|c| events as f64 / c),
        redis_bytes_per_event: memory,
    })
}

/// One request's producer: claim, then chunks until the deadline.
async fn produce(
    ledger: Arc<dyn ledger::Ledger>,
    request_id: String,
    session_id: String,
    deadline: Instant,
) -> (hdrhistogram::Histogram<u64>, u64, u64) {
    let mut hist = histogram();
    let record = RequestRecord {
        session_id: session_id.clone(),
        message: "capacity".into(),
        user_id: None,
        node: NODE.into(),
        epoch: 1,
        owner: None,
        cancelled: false,
    };
    if ledger.claim(&request_id, &record, Duration::from_secs(60)).await.is_err() {
        return (hist, 0, 1);
    }
    let (mut ok, mut failed) = (0, 0);
    let mut seq = 1;
    while Instant::now() < deadline {
        let mut event = Event::chunk(&request_id, seq, " a few words");
        event.node = Some(NODE.into());
        event.epoch = Some(1);
        event.ts_us = Some(chat_wire::now_micros());
        let sent = Instant::now();
        match ledger.emit(&session_id, &event).await {
            Ok(Emitted::Published) => {
                ok += 1;
                seq += 1;
                let _ = hist.record(sent.elapsed().as_micros() as u64);
            }
            _ => {
                failed += 1;
                break;
            }
        }
    }
    (hist, ok, failed)
}

/// `used_cpu_user + used_cpu_sys` of a single Redis; `None` on a cluster.
async fn redis_cpu(url: &str) -> Option<f64> {
    let user = redis_info_field(url, "cpu", "used_cpu_user").await?;
    Some(user + redis_info_field(url, "cpu", "used_cpu_sys").await?)
}

/// One numeric field of `INFO section` of a single Redis; `None` on a cluster.
async fn redis_info_field(url: &str, section: &str, name: &str) -> Option<f64> {
    if chat_wire::redis_conn::is_cluster(url) {
        return None;
    }
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg(section).query_async(&mut conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<f64>().ok())
}
