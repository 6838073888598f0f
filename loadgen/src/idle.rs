//! Idle capacity: opens `count` WebSockets that never chat, holds them, and
//! reports how many the server kept open and how much the watched processes'
//! resident memory grew per socket.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::net::{connect, source_ip, target_addr};

/// What one run does.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// `ws://host:port/ws/chat` (the session id is appended).
    pub url: String,
    /// Sockets to open.
    pub count: usize,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    /// Loopback source addresses to spread the sockets over.
    pub source_ips: usize,
    /// How long to hold the sockets once all are open.
    pub hold: Duration,
    /// Processes whose resident memory is measured: name -> pids (summed).
    pub watch: Vec<(String, Vec<u32>)>,
    /// Makes session ids unique across runs.
    pub run_id: String,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Memory of one watched process group.
#[derive(Debug, Serialize)]
pub struct Memory {
    pub rss_before_kb: u64,
    pub rss_held_kb: u64,
    /// (held - before) / sockets held.
    pub kb_per_socket: f64,
}

/// The outcome of a run, as written to JSON.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub url: String,
    pub requested: usize,
    /// Handshakes that succeeded.
    pub opened: usize,
    pub failed: usize,
    /// Sockets still open at the end of the hold.
    pub held: usize,
    pub open_secs: f64,
    pub hold_secs: f64,
    pub memory: BTreeMap<String, Memory>,
    pub error_samples: Vec<String>,
}

/// Resident memory of a process in kB (0 when it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_of(watch: &[(String, Vec<u32>)]) -> Vec<u64> {
    watch.iter().map(|(_, pids)| pids.iter().map(|p| rss_kb(*p)).sum()).collect()
}

/// Opens, holds and counts the sockets.
pub async fn run(config: IdleConfig) -> anyhow::Result<IdleReport> {
    let addr = target_addr(&config.url).await?;
    let before = rss_of(&config.watch);
    let bar = if config.progress {
        let bar = ProgressBar::new(config.count as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} idle sockets {msg}")
                .expect("static template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let gate = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    let open = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<(usize, Vec<String>)>> = Arc::default();
    let started = Instant::now();
    let mut handshakes = Vec::with_capacity(config.count);
    for i in 0..config.count {
        let (gate, open, errors, bar) = (gate.clone(), open.clone(), errors.clone(), bar.clone());
        let url = format!("{}?session_id=idle-{}-{i}", config.url, config.run_id);
        let from = source_ip(i, config.source_ips);
        handshakes.push(tokio::spawn(async move {
            let ws = {
                let _permit = gate.acquire().await;
                connect(&url, addr, from, Duration::from_secs(20)).await
            };
            bar.inc(1);
            match ws {
                Ok(mut ws) => {
                    open.fetch_add(1, Ordering::Relaxed);
                    // Reading answers the server's pings; the socket counts as
                    // open until the server closes it.
                    tokio::spawn(async move {
                        while let Some(Ok(_)) = ws.next().await {}
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                    true
                }
                Err(e) => {
                    let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                    errors.0 += 1;
                    let message = format!("{e:#}");
                    if errors.1.len() < 10 && !errors.1.contains(&message) {
                        errors.1.push(message);
                    }
                    false
                }
            }
        }));
    }
    let mut opened = 0;
    for h in handshakes {
        opened += usize::from(h.await?);
    }
    let open_secs = started.elapsed().as_secs_f64();
    bar.finish_with_message(format!("{opened} open; holding {:?}", config.hold));
    tokio::time::sleep(config.hold).await;
    let held_rss = rss_of(&config.watch);
    let held = open.load(Ordering::Relaxed);
    let memory = config
        .watch
        .iter()
        .zip(before.iter().zip(held_rss))
        .map(|((name, _), (before, held_kb))| {
            let per = held_kb.saturating_sub(*before) as f64 / held.max(1) as f64;
            (name.clone(), Memory { rss_before_kb: *before, rss_held_kb: held_kb, kb_per_socket: per })
        })
        .collect();
    let (failed, error_samples) = std::mem::take(&mut *errors.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(IdleReport {
        url: config.url,
        requested: config.count,
        opened,
        failed,
        held,
        open_secs,
        hold_secs: config.hold.as_secs_f64(),
        memory,
        error_samples,
    })
}
