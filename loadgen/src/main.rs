//! `loadgen`: the benchmarks' load generator (see `benches/run.sh`).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Load generator for the benchmarks.")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A tiny HTTP backend: GET / (small), GET /health, POST /echo.
    HttpBackend {
        #[arg(long)]
        port: u16,
        /// Sent as X-Backend-Id.
        #[arg(long, default_value_t = 1)]
        id: u32,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Chat streams over WebSockets: completeness and latency.
    Ws {
        /// ws://host:port/ws/chat (several, comma-separated: sessions take them in turn)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        #[arg(long, default_value_t = 1)]
        chats_per_session: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Loopback source addresses (127.0.k.1) to spread sockets over.
        #[arg(long, default_value_t = 32)]
        source_ips: usize,
        /// Longest wait for one answer, in seconds.
        #[arg(long, default_value_t = 60)]
        chat_timeout: u64,
        /// Spread the sessions' first chats evenly over this many ms
        /// (0: all start together, a synchronized burst).
        #[arg(long, default_value_t = 0)]
        spread_ms: u64,
        /// Also write the JSON report here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        #[arg(long)]
        no_progress: bool,
    },
    /// The backplane alone: events per second through the ledger's EMIT
    /// script on one Redis (with its CPU) or a Redis Cluster.
    Ledger {
        /// redis://host:port or redis+cluster://host:port,...
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Requests producing at once (one event in flight each).
        #[arg(long, default_value_t = 64)]
        producers: usize,
        #[arg(long, default_value_t = 5)]
        secs: u64,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Idle WebSockets: how many stay open, memory per socket.
    Idle {
        /// ws://host:port/ws/chat
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        #[arg(long, default_value_t = 40)]
        source_ips: usize,
        /// Seconds to hold them once open.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// NAME=PID[,PID...]: processes whose memory to measure (repeatable).
        #[arg(long)]
        watch: Vec<String>,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        #[arg(long)]
        no_progress: bool,
    },
}

fn parse_watch(spec: &str) -> anyhow::Result<(String, Vec<u32>)> {
    let (name, pids) = spec.split_once('=').with_context(|| format!("--watch {spec:?}: expected NAME=PID[,PID]"))?;
    let pids = pids
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().parse().with_context(|| format!("--watch {spec:?}: bad pid {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    Ok((name.to_owned(), pids))
}

fn run_id() -> String {
    format!("{:x}", chat_wire::now_micros())
}

fn write_report(report: &impl serde::Serialize, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = out {
        std::fs::write(path, &json).with_context(|| format!("write {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Command::HttpBackend { port, id, threads } = args.command {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
        return rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            eprintln!("http-backend {id} on {}", listener.local_addr()?);
            loadgen::http_backend::run(listener, &format!("bench-{id}")).await?;
            anyhow::Ok(())
        });
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match args.command {
            Command::HttpBackend { .. } => unreachable!("handled above"),
            Command::Ws {
                url,
                sessions,
                chats_per_session,
                concurrency,
                source_ips,
                chat_timeout,
                spread_ms,
                out,
                no_progress,
            } => {
                let report = loadgen::streams::run(loadgen::streams::StreamsConfig {
                    url,
                    sessions,
                    chats_per_session,
                    connect_concurrency: concurrency,
                    source_ips,
                    connect_timeout: Duration::from_secs(20),
                    chat_timeout: Duration::from_secs(chat_timeout),
                    start_spread: Duration::from_millis(spread_ms),
                    run_id: run_id(),
                    progress: !no_progress,
                })
                .await?;
                write_report(&report, out.as_deref())
            }
            Command::Ledger { redis, producers, secs, out } => {
                let report = loadgen::ledger::run(loadgen::ledger::LedgerConfig {
                    redis_url: redis,
                    producers,
                    duration: Duration::from_secs(secs),
                    run_id: run_id(),
                })
                .await?;
                write_report(&report, out.as_deref())
            }
            Command::Idle { url, count, concurrency, source_ips, hold, watch, out, no_progress } => {
                let watch = watch.iter().map(|w| parse_watch(w)).collect::<anyhow::Result<_>>()?;
                let report = loadgen::idle::run(loadgen::idle::IdleConfig {
                    url,
                    count,
                    connect_concurrency: concurrency,
                    source_ips,
                    hold: Duration::from_secs(hold),
                    watch,
                    run_id: run_id(),
                    progress: !no_progress,
                })
                .await?;
                write_report(&report, out.as_deref())
            }
        }
    })
}
