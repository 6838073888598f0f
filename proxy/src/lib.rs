//! The edge proxy: a Pingora server with the public listener (plain and
//! optional TLS) routing by path prefix to upstream groups with sticky
//! ketama hashing, active and passive health checks, live upstream reload on
//! `SIGHUP`, limits, and a separate status listener.
//!
//! `main.rs` only parses flags and calls [`run`]; everything else is here.

#![warn(missing_docs)]

pub mod config;
pub mod connections;
pub mod edge;
pub mod h1;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod proxy_protocol;
pub mod reload;
pub mod signals;
pub mod status;
pub mod sticky;
pub mod upstreams;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;

use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use crate::config::{Config, Overrides};
use crate::connections::Connections;
use crate::edge::Edge;
use crate::health::HealthChecker;
use crate::limits::RateLimiter;
use crate::metrics::{ConnectionStats, Metrics};
use crate::reload::Reloader;
use crate::status::StatusApp;
use crate::upstreams::Upstreams;
use crate::workers::{Shared, Worker};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The TLS listener could not be set up.
    #[error("tls listener {addr}: {reason}")]
    Tls {
        /// The listener's address.
        addr: String,
        /// Pingora's complaint (missing or unreadable certificate or key).
        reason: String,
    },
    /// A runtime for start-up work could not be created.
    #[error("start-up runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// Worker processes could not be set up (shared memory, fork, signals).
    #[error("worker processes: {0}")]
    Workers(std::io::Error),
    /// Worker processes kept dying before they served.
    #[error("worker processes died before serving (see the log)")]
    WorkersFailed,
}

/// Everything the services share.
pub struct State {
    /// The checked configuration the process started with (upstream groups
    /// carry their own, reloadable copy).
    pub config: Config,
    /// Upstream groups with their rings and backend health.
    pub upstreams: Upstreams,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// nginx `stub_status` counters (shared by all worker processes).
    pub stats: ConnectionStats,
    /// Per-client request rate limit (shared by all worker processes).
    pub limiter: RateLimiter,
    /// Which worker process this is, with `server.processes` above 1.
    pub worker: Option<Worker>,
}

impl State {
    /// Builds the state of one serving process (resolves upstream names
    /// once): its counters and rate table in `shared`.
    pub async fn new(config: Config, shared: &Shared, worker: Option<Worker>) -> Arc<Self> {
        let upstreams = Upstreams::new(&config.upstreams).await;
        let limiter = shared.limiter(config.client.requests_per_second);
        let stats = shared.stats(worker.as_ref().map_or(0, |w| w.index));
        Arc::new(Self { config, upstreams, metrics: Metrics::new(), stats, limiter, worker })
    }
}

impl State {
    /// Records a failure of live traffic at `addr` (passive health check):
    /// after `max_fails` within `fail_timeout` the backend is out for `fail_timeout`.
    pub fn record_upstream_failure(&self, group: &upstreams::UpstreamGroup, addr: std::net::SocketAddr) {
        let config = group.config();
        if let Some(state) = group.state(&addr) {
            if state.observe_failure(std::time::Instant::now(), config.max_fails, config.fail_timeout) {
                log::warn!(
                    "upstream {}: backend {addr} out for {:?} after {} failures",
                    config.name,
                    config.fail_timeout,
                    config.max_fails
                );
                self.metrics.passive_ejections.with_label_values(&[&config.name]).inc();
                self.metrics.upstream_up.with_label_values(&[&config.name, &addr.to_string()]).set(0);
            }
        }
    }
}

/// How the process was started, beyond the configuration itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration file, read again on `SIGHUP`.
    pub config_path: PathBuf,
    /// Environment and command-line overrides, applied again on reload.
    pub overrides: Overrides,
    /// Take the listeners over from a running proxy (graceful upgrade).
    pub upgrade: bool,
    /// Detach into the background.
    pub daemon: bool,
}

/// Pingora's server settings, from our configuration (no YAML).
pub fn server_conf(config: &Config, daemon: bool) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        work_stealing: s.work_stealing,
        daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.shutdown_timeout.as_secs()),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool,
        max_retries: s.max_retries + 1,
        // See `quiet_timers`: Pingora sets this again when it starts.
        fast_timeout_to_tokio_threshold_seconds: Some(TOKIO_TIMEOUTS_FROM.as_secs()),
        ..ServerConf::default()
    }
}

/// Each proxied connection needs two descriptors (client and backend): like
/// nginx's `worker_rlimit_nofile`, raise the open-files limit to cover
/// `max_connections`, the hard limit too when the process may (root).
fn raise_open_files(max_connections: usize) {
    use rlimit::Resource;
    let want = (max_connections as u64).saturating_mul(2).saturating_add(1024);
    let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE) else { return };
    if soft >= want {
        return;
    }
    let raised = if hard < want && rlimit::setrlimit(Resource::NOFILE, want, want).is_ok() {
        want
    } else {
        let soft = want.min(hard);
        if rlimit::setrlimit(Resource::NOFILE, soft, hard).is_err() {
            return;
        }
        soft
    };
    if raised < want {
        log::warn!("open files limited to {raised}: fewer than 2 per client.max_connections ({max_connections})");
    }
}

/// Starts the proxy and serves until a signal ends it: in this process, or
/// with `server.processes` above 1 in worker processes under this one (see
/// [`workers`]). With one process it never returns on success (Pingora
/// exits the process).
pub fn run(config: Config, options: RunOptions) -> Result<(), ProxyError> {
    quiet_timers();
    raise_open_files(config.client.max_connections);
    let shared = Shared::new(config.server.processes).map_err(ProxyError::Workers)?;
    if config.server.processes > 1 {
        return workers::supervise(&config, &options, &shared, |worker, config| {
            serve(config, options.clone(), &shared, Some(worker))
        });
    }
    serve(config, options, &shared, None)
}

/// Pingora's own timeouts of a second or more (the 60 s handshake deadline
/// on every accepted connection, connect and health-check timeouts) go on
/// Tokio's timer rather than Pingora's "fast timeout", whose clock thread,
/// once started, wakes 100 times a second in every worker for the life of
/// the process, idle or not. Tokio's timer costs nothing until a timeout is
/// pending (a plain-TCP handshake never is). Set before the first health
/// check, which runs before Pingora applies its server settings.
fn quiet_timers() {
    pingora::prelude::fast_timeout::set_fast_timeout_to_tokio_threshold(Some(TOKIO_TIMEOUTS_FROM));
}

/// Pingora timeouts longer than this whole number of seconds use Tokio's
/// timer ([`quiet_timers`]).
const TOKIO_TIMEOUTS_FROM: std::time::Duration = std::time::Duration::ZERO;

/// Serves in this process: the whole proxy, or one worker of several.
fn serve(config: Config, options: RunOptions, shared: &Shared, worker: Option<Worker>) -> Result<(), ProxyError> {
    reload::catch_sighup_early();
    if worker.is_some() {
        // Pingora would log a failed bind and serve on without the listener;
        // a worker that cannot share a port exits instead (and its supervisor
        // stops after three such).
        workers::check_ports_shareable(&config).map_err(ProxyError::Workers)?;
    }
    let startup = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let state = startup.block_on(async {
        let state = State::new(config.clone(), shared, worker.clone()).await;
        if let Some(inbox) = worker.as_ref().and_then(|w| w.relay_inbox.as_ref()) {
            // Until this relay reads, siblings keep their tunnels.
            match inbox.try_clone() {
                Ok(socket) => h1::relay_for_siblings(&state, socket),
                Err(e) => log::error!("cannot take WebSocket tunnels from the other workers: {e}"),
            }
        }
        // One round of checks before listening: a process taking over the
        // listeners (graceful upgrade) must not answer 503 while it learns
        // which backends are up.
        for group in state.upstreams.all() {
            let probe = health::Probe::new(&group.config().health);
            health::check_once(group, &probe, &state, &mut Default::default()).await;
        }
        state
    });
    drop(startup);

    // A worker is neither a daemon (its supervisor may be) nor handed
    // listeners: it binds its own beside its siblings (and, in an upgrade,
    // beside the old proxy's workers).
    let alone = worker.is_none();
    let opt = Opt { upgrade: options.upgrade && alone, daemon: options.daemon && alone, ..Opt::default() };
    let mut conf = server_conf(&config, options.daemon && alone);
    if let Some(w) = &worker {
        conf.upgrade_sock = w.dir.join(format!("worker-{}.upgrade", w.index)).to_string_lossy().into_owned();
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `-u` this returns once the running proxy has handed over its
    // listeners (or exits 1 when none does, leaving that one serving).
    server.bootstrap();
    if alone && !options.daemon {
        // Pingora writes the pid file only when it daemonizes. Written after
        // the hand-over, so `kill -QUIT $(cat pid_file)` during an upgrade
        // still reaches the old process.
        let pid_file = &config.server.pid_file;
        if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
            log::warn!("cannot write the pid file {pid_file}: {e}");
        }
    }

    let reloader = Reloader::new(options.config_path.clone(), options.overrides.clone(), state.clone());
    server.add_service(background_service("reload", reloader));
    server.add_service(background_service("health checks", HealthChecker::new(state.clone())));
    if !alone {
        server.add_service(background_service("metrics share", workers::gather::MetricsShare::new(state.clone())));
    }
    // Workers share each port: the kernel spreads connections over them.
    let shared_port = |l: ListenerConfig| {
        if alone {
            return l;
        }
        let mut options = TcpSocketOptions::default();
        options.so_reuseport = Some(true);
        l.tcp_socket_options(options)
    };

    let proxy = pingora_proxy::http_proxy(&server.configuration, Edge::new(state.clone()));
    let mut public = Service::new("proxy".to_string(), Connections::new(proxy, state.clone()));
    let buffers = L4BufferSettings::new(config.client.read_buffer, config.client.write_buffer);
    // The lean path reads into and writes from buffers of its own (sized
    // from the same settings); the socket's own would only copy twice.
    let plain_buffers = if config.server.fast_path { L4BufferSettings::unbuffered() } else { buffers };
    public.add_listener(shared_port(ListenerConfig::tcp(config.listen.public.to_string()).l4_buffer(plain_buffers)));
    if let Some(tls) = &config.listen.tls {
        let addr = tls.addr.to_string();
        let settings = TlsSettings::intermediate(&tls.cert.to_string_lossy(), &tls.key.to_string_lossy())
            .map_err(|e| ProxyError::Tls { addr: addr.clone(), reason: e.to_string() })?;
        public.add_listener(shared_port(ListenerConfig::tcp(addr).tls(settings).l4_buffer(buffers)));
    }
    server.add_service(public);

    let mut status = Service::new("status".to_string(), StatusApp::new(state));
    status.add_listener(shared_port(ListenerConfig::tcp(config.listen.status.to_string())));
    server.add_service(status);

    log::info!("proxy listening on {} (status on {})", config.listen.public, config.listen.status);
    let signals = signals::Signals::new(&server.configuration.upgrade_sock);
    server.run(RunArgs { shutdown_signal: Box::new(signals) });
    std::process::exit(0)
}
