//! `cluster`: the whole system with one command, for a laptop or a demo.
//!
//! Runs the AI nodes and the backends in this process (each on its own
//! listener, as separate services would be), starts the real `proxy` binary
//! in front of them, waits until everything is healthy and prints what runs
//! where. Redis is used when one answers (or `--redis`/`REDIS_URL` names
//! one); otherwise the components share an embedded in-process bus. Ctrl-C
//! stops everything: the proxy first, then the backends (close frames), then
//! the AI nodes (drain).

use anyhow::{bail, Context};
use chat_wire::ledger::{Backplane, EmbeddedBus};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Parser)]
#[command(version, about = "Run the whole chat cluster: proxy, backends and AI nodes.")]
struct Args {
    /// Public port of the proxy (0: a free one, printed).
    #[arg(long, env = "CLUSTER_PORT", default_value_t = 8080)]
    port: u16,
    /// Status port of the proxy (/nginx-status, /metrics, /upstreams), on 127.0.0.1 (0: a free one).
    #[arg(long, env = "CLUSTER_STATUS_PORT", default_value_t = 8090)]
    status_port: u16,
    /// AI nodes to run.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Backends to run.
    #[arg(long, default_value_t = 3)]
    backends: usize,
    /// Redis to use; without it, 127.0.0.1:6379 when it answers, else the embedded bus.
    #[arg(long, env = "REDIS_URL")]
    redis: Option<String>,
    /// Use the embedded bus even when a Redis answers.
    #[arg(long)]
    embedded: bool,
    /// Folder of the configuration files (ai-node.toml, backend.toml, proxy.toml).
    #[arg(long, default_value = "conf")]
    conf: PathBuf,
    /// The proxy binary; by default the `proxy` next to this one.
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Turn API keys on (they need Redis); issue one with `backend new-key --id NAME`.
    #[arg(long)]
    api_keys: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = Args::parse();
    args.port = free_port_if_zero(args.port)?;
    args.status_port = free_port_if_zero(args.status_port)?;
    let (backplane, redis_note) = choose_backplane(&args).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // AI nodes, internal, on loopback ports the OS picks.
    let node_config =
        ai_node::config::load(Some(&args.conf.join("ai-node.toml")), &|_| None).map_err(anyhow::Error::msg)?;
    let mut services = Vec::new();
    let mut node_urls = Vec::new();
    for i in 1..=args.nodes {
        let mut config = node_config.clone();
        config.node_id = format!("ai-{i}");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        node_urls.push(format!("http://{}", listener.local_addr()?));
        let store = ai_node::store_on(&config, &backplane)?;
        let engine = ai_node::engine::from_config(&config.engine)?;
        let node = ai_node::Node::new(config, store, engine);
        services.push(("ai", tokio::spawn(ai_node::run(listener, node, stopped(&stop_rx)))));
    }

    // Backends, internal, each with its own metrics listener.
    let mut backend_config =
        backend::config::load(Some(&args.conf.join("backend.toml")), &|_| None).map_err(anyhow::Error::msg)?;
    if args.api_keys && backend_config.auth.is_none() {
        let cache = Duration::from_secs(5);
        backend_config.auth = Some(backend::config::AuthConfig { file_keys: Default::default(), cache });
    }
    let mut backend_addrs = Vec::new();
    let mut metrics_addrs = Vec::new();
    let mut backend_tasks = Vec::new();
    let mut apps = Vec::new();
    for i in 1..=args.backends {
        let mut config = backend_config.clone();
        config.backend_id = format!("backend-{i}");
        config.ai_nodes = node_urls
            .iter()
            .map(|u| backend::config::NodeUrl { url: u.clone(), authority: u[7..].to_owned() })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        backend_addrs.push(listener.local_addr()?);
        metrics_addrs.push(metrics.local_addr()?);
        let app = backend::App::start_on(config, &backplane).await?;
        apps.push(app.clone());
        backend_tasks.push(tokio::spawn(backend::run(listener, Some(metrics), app, stopped(&stop_rx))));
    }

    // The proxy, the only public port.
    let proxy_bin = match &args.proxy_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("proxy"),
    };
    let backends_list = backend_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let mut proxy = tokio::process::Command::new(&proxy_bin)
        .arg("--config")
        .arg(args.conf.join("proxy.toml"))
        .env("PROXY_LISTEN", format!("0.0.0.0:{}", args.port))
        .env("PROXY_STATUS_LISTEN", format!("127.0.0.1:{}", args.status_port))
        .env("PROXY_BACKENDS", &backends_list)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the proxy at {}", proxy_bin.display()))?;

    let public = format!("http://127.0.0.1:{}", args.port);
    wait_healthy(&public, args.nodes, &apps, &mut proxy).await?;
    print_table(
        &args,
        &redis_note,
        &node_urls,
        &backend_addrs,
        &metrics_addrs,
        &proxy_bin,
        backend_config.auth.is_some(),
    );

    tokio::select! {
        _ = service_kit::http::shutdown_signal() => println!("\nstopping..."),
        status = proxy.wait() => println!("the proxy exited ({status:?}); stopping..."),
    }
    if let Some(pid) = proxy.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), proxy.wait()).await;
    let _ = stop_tx.send(true);
    for task in backend_tasks {
        let _ = task.await;
    }
    for (_, task) in services {
        let _ = task.await;
    }
    println!("stopped.");
    Ok(())
}

/// `port`, or a port free now when it is 0 (the proxy binds it right after).
fn free_port_if_zero(port: u16) -> anyhow::Result<u16> {
    if port != 0 {
        return Ok(port);
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Redis when asked for or when one answers on the default address; the embedded bus otherwise.
async fn choose_backplane(args: &Args) -> anyhow::Result<(Backplane, String)> {
    let embedded =
        || Backplane::Embedded(EmbeddedBus::new(chat_wire::ledger::DEFAULT_MAX_LEN, chat_wire::ledger::DEFAULT_TTL));
    if args.embedded {
        return Ok((embedded(), "embedded in-process bus (--embedded)".into()));
    }
    let url = args.redis.clone().unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    if redis_answers(&url).await {
        return Ok((Backplane::Redis(url.clone()), url));
    }
    if args.redis.is_some() {
        bail!("no Redis answers at {url}");
    }
    println!("no Redis answers at {url}: using the embedded in-process bus (events live in this process only)");
    Ok((embedded(), "embedded in-process bus (no Redis found)".into()))
}

/// Whether Redis (or a Redis Cluster, `redis+cluster://...`) answers a PING.
async fn redis_answers(url: &str) -> bool {
    let second = Duration::from_secs(1);
    let Ok(redis) = chat_wire::redis_conn::RedisConn::new(url, second, second) else { return false };
    let mut pipe = redis::pipe();
    pipe.cmd("PING");
    redis.query::<(String,)>(&pipe).await.is_ok()
}

/// Waits until the proxy passes `/health` to a backend and every backend
/// sees every node healthy (`/api/ai-health` may need a key: asked in process).
async fn wait_healthy(
    public: &str,
    nodes: usize,
    apps: &[std::sync::Arc<backend::App>],
    proxy: &mut tokio::process::Child,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("{public}/health");
    loop {
        if let Some(status) = proxy.try_wait()? {
            bail!("the proxy exited during start-up ({status}); is port {public} free?");
        }
        let proxied = http.get(&url).send().await.is_ok_and(|res| res.status().is_success());
        let healthy = |app: &std::sync::Arc<backend::App>| {
            app.pool.status().iter().filter(|n| n.status == "healthy").count() == nodes
        };
        if proxied && apps.iter().all(healthy) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not become healthy within 30 s ({url})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_table(
    args: &Args,
    redis: &str,
    nodes: &[String],
    backends: &[std::net::SocketAddr],
    metrics: &[std::net::SocketAddr],
    proxy_bin: &Path,
    keys_on: bool,
) {
    println!();
    println!("chat cluster is up");
    println!("  chat page       http://localhost:{}/", args.port);
    println!(
        "  API             http://localhost:{}/api/chat   /api/ai-health   ws://localhost:{}/ws/chat?session_id=...",
        args.port, args.port
    );
    println!(
        "  proxy status    http://127.0.0.1:{}/nginx-status   /metrics   /upstreams   ({})",
        args.status_port,
        proxy_bin.display()
    );
    for (i, (b, m)) in backends.iter().zip(metrics).enumerate() {
        println!("  backend-{}       http://{b}   metrics http://{m}/metrics", i + 1);
    }
    for (i, n) in nodes.iter().enumerate() {
        println!("  ai-{}            {n}", i + 1);
    }
    println!(
        "  OpenAI API      http://localhost:{}/v1   (any OpenAI SDK: base_url=http://localhost:{}/v1)",
        args.port, args.port
    );
    println!("  events          {redis}");
    if keys_on {
        println!("  API keys        on ([auth] in conf/backend.toml; issue one: backend new-key --id NAME)");
    } else {
        println!("  API keys        off: anyone who reaches the port can chat and read any session");
        println!("                  (on in docker-compose.yml; [auth] in conf/backend.toml)");
    }
    println!("Ctrl-C stops everything.");
}
