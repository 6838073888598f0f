//! The backend: the API gateway in front of the AI nodes.
//!
//! It validates and rate-limits chats, dispatches each to an AI node
//! round-robin with retry (`nodes`), and streams every answer to the
//! session's WebSockets and SSE readers as the chunks arrive over Redis
//! pub/sub (`hub`), exactly once and in order (`follow`).

pub mod api;
pub mod auth;
pub mod chat;
pub mod config;
pub mod errors;
pub mod follow;
pub mod hub;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod nodes;
pub mod openai;
pub mod reader;
pub mod readiness;
pub mod resume;
pub mod takeover;
pub mod ws;

use chat_wire::ledger::Backplane;
use chat_wire::ledger::Ledger;
use config::Config;
use hub::Hub;
use limits::Limits;
use metrics::Metrics;
use nodes::AiPool;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use takeover::Takeovers;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cap and lifetime of what the backend itself stores (a takeover's `node_failed`).
const STREAM_MAX_LEN: usize = chat_wire::ledger::DEFAULT_MAX_LEN;
const STREAM_TTL: Duration = chat_wire::ledger::DEFAULT_TTL;

/// How often followed requests are checked for stalls.
pub const STALL_TICK: Duration = Duration::from_millis(250);

/// The running backend's shared state.
pub struct App {
    pub config: Config,
    pub pool: Arc<AiPool>,
    pub hub: Arc<Hub>,
    pub ledger: Arc<dyn Ledger>,
    pub takeovers: Arc<Takeovers>,
    /// API keys, when `auth.enabled` (they need Redis: ownership and limits are shared).
    pub keys: Option<keys::Keys>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: health answers 503, chats and new sockets are refused.
    pub draining: AtomicBool,
    /// Whether the event store answers (`/ready`), and when sockets must move.
    pub readiness: readiness::Readiness,
    /// Cancelled on shutdown: every socket sends a close frame and ends.
    pub shutdown: CancellationToken,
    /// The socket tasks, so shutdown can wait for their close frames.
    pub sockets: TaskTracker,
}

impl App {
    /// Connects to the configured Redis and checks every AI node once.
    pub async fn start(config: Config) -> anyhow::Result<Arc<App>> {
        let backplane = Backplane::Redis(config.redis_url.clone());
        App::start_on(config, &backplane).await
    }

    /// As `start`, on the given backplane (the embedded bus of the one-process cluster).
    pub async fn start_on(config: Config, backplane: &Backplane) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::new());
        let pool = AiPool::start(&config, metrics.clone()).await?;
        let hub = Hub::start(backplane, config.ws_send_queue, metrics.clone())?;
        let ledger = chat_wire::ledger::on(
            backplane,
            config.redis_connect_timeout,
            config.redis_command_timeout,
            STREAM_MAX_LEN,
            STREAM_TTL,
        )?;
        let takeovers = Takeovers::new(ledger.clone(), pool.clone(), metrics.clone());
        let keys = match (&config.auth, backplane) {
            (None, _) => {
                log::warn!("API keys are off: anyone who can reach the proxy can chat and read any session");
                None
            }
            (Some(auth), Backplane::Redis(url)) => {
                let redis = chat_wire::redis_conn::RedisConn::new(
                    url,
                    config.redis_connect_timeout,
                    config.redis_command_timeout,
                )?;
                Some(keys::Keys::new(auth.file_keys.clone(), redis, auth.cache))
            }
            (Some(_), _) => anyhow::bail!("API keys (auth.enabled) need Redis: ownership and limits are shared"),
        };
        let limits = Limits::new(
            config.session_rate_per_sec,
            config.session_burst,
            config.ip_rate_per_sec,
            config.ip_burst,
            config.trusted_proxies.clone(),
        );
        Ok(Arc::new(App {
            pool,
            hub,
            ledger,
            takeovers,
            keys,
            limits,
            metrics,
            draining: AtomicBool::new(false),
            readiness: Default::default(),
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            config,
        }))
    }
}

/// Serves `app` on `listener` (and `/metrics` on `metrics_listener`) until
/// `shutdown` resolves; then drains within the grace period.
pub async fn run(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_checks, checks_stopped) = tokio::sync::watch::channel(false);
    app.pool.spawn_background(checks_stopped.clone());
    let readiness = readiness::Readiness::spawn(app.clone(), checks_stopped);
    let pruner = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                app.limits.prune();
            }
        })
    };
    if let Some(l) = metrics_listener {
        let metrics = app.metrics.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
            }),
        );
        tokio::spawn(async move { axum::serve(service_kit::http::no_delay(l), router).await });
    }
    let stop_serving = CancellationToken::new();
    let server = axum::serve(
        service_kit::http::no_delay(listener),
        api::router(app.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    log::info!("backend_id={} draining: {} sockets", app.config.backend_id, app.metrics.ws_active.get());
    app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    app.shutdown.cancel();
    app.sockets.close();
    let _ = tokio::time::timeout(app.config.shutdown_grace, app.sockets.wait()).await;
    stop_serving.cancel();
    let _ = stop_checks.send(true);
    pruner.abort();
    readiness.abort();
    match tokio::time::timeout(app.config.shutdown_grace, server).await {
        Ok(joined) => joined.map_err(std::io::Error::other)?,
        Err(_) => Ok(()),
    }
}

/// Binds the configured listeners (`metrics_listen_addr` may be off).
pub async fn bind(config: &Config) -> std::io::Result<(TcpListener, Option<TcpListener>)> {
    let main = TcpListener::bind(config.listen_addr).await?;
    let metrics = match config.metrics_listen_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    Ok((main, metrics))
}
