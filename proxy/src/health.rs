//! Active health checks, run as a Pingora background service: every group
//! probes each backend with Pingora's `HttpHealthCheck` (GET the configured
//! path, 200 is healthy) on its interval, applies the rise/fall counts, keeps
//! the `proxy_upstream_up` gauge current, and re-resolves server names.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;

use crate::config::HealthConfig;
use crate::upstreams::UpstreamGroup;
use crate::State;

/// The background service checking every group.
pub struct HealthChecker {
    /// Groups and metrics.
    state: Arc<State>,
}

impl HealthChecker {
    /// A checker over every group of `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for group in self.state.upstreams.all() {
            tasks.spawn(check_forever(group.clone(), self.state.clone()));
        }
        // Checks stop with the process; nothing to drain.
        let _ = shutdown.changed().await;
        tasks.abort_all();
    }
}

/// A group's probe, built for its health settings. Pingora's check carries
/// a connector, which loads the system's CA certificates when built: it is
/// built once and again only when a reload changes the settings.
pub struct Probe {
    /// The settings it was built for.
    settings: HealthConfig,
    /// Pingora's check; `None` when the path is unusable (logged once).
    check: Option<Arc<HttpHealthCheck>>,
}

impl Probe {
    /// The probe for `settings`.
    pub fn new(settings: &HealthConfig) -> Self {
        Self { settings: settings.clone(), check: build_check(settings).map(Arc::new) }
    }

    /// The same probe, rebuilt first if `settings` changed.
    fn for_settings(&mut self, settings: &HealthConfig) -> &Self {
        if self.settings != *settings {
            *self = Self::new(settings);
        }
        self
    }
}

/// Pingora's HTTP check for `health`: GET the path, 200 is healthy.
fn build_check(health: &HealthConfig) -> Option<HttpHealthCheck> {
    let mut check = HttpHealthCheck::new("proxy-health-check", false);
    check.req = match RequestHeader::build("GET", health.path.as_bytes(), None) {
        Ok(mut req) => {
            req.insert_header("host", "proxy-health-check").ok()?;
            req.insert_header("user-agent", "proxy-health-check").ok()?;
            req
        }
        Err(e) => {
            log::error!("health check path {:?} is unusable: {e}", health.path);
            return None;
        }
    };
    check.peer_template.options.connection_timeout = Some(health.timeout);
    check.peer_template.options.read_timeout = Some(health.timeout);
    check.peer_template.options.write_timeout = Some(health.timeout);
    Some(check)
}

/// Checks a group on its interval, or at once when a reload asks.
async fn check_forever(group: Arc<UpstreamGroup>, state: Arc<State>) {
    let mut resolved_at = Instant::now();
    let mut reported: HashSet<String> = HashSet::new();
    let mut probe = Probe::new(&group.config().health);
    loop {
        let config = group.config();
        if resolved_at.elapsed() >= config.resolve_interval {
            group.refresh().await;
            resolved_at = Instant::now();
        }
        check_once(&group, probe.for_settings(&config.health), &state, &mut reported).await;
        tokio::select! {
            _ = tokio::time::sleep(config.health.interval) => {}
            _ = group.check_now.notified() => {}
        }
    }
}

/// One round of checks over every backend of a group, in parallel.
pub async fn check_once(group: &UpstreamGroup, probe: &Probe, state: &State, reported: &mut HashSet<String>) {
    let Some(check) = &probe.check else { return };
    let health = &probe.settings;
    let name = group.name();
    let mut round = tokio::task::JoinSet::new();
    for backend in group.states() {
        let check = check.clone();
        let timeout = health.timeout + Duration::from_millis(100);
        round.spawn(async move {
            let target = Backend { addr: PingoraAddr::Inet(backend.addr), weight: 1, ext: Default::default() };
            let result = match tokio::time::timeout(timeout, check.check(&target)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            (backend, result)
        });
    }
    let (rise, fall) = (health.rise, health.fall);
    while let Some(joined) = round.join_next().await {
        let Ok((backend, result)) = joined else { continue };
        if backend.observe_check(result.is_ok(), rise, fall) {
            match &result {
                Ok(()) => log::info!("upstream {name}: backend {} is healthy", backend.addr),
                Err(e) => log::warn!("upstream {name}: backend {} is unhealthy: {e}", backend.addr),
            }
        }
    }
    // Keep the gauge to the current backends only.
    let now = Instant::now();
    let mut current = HashSet::new();
    for backend in group.states() {
        let addr = backend.addr.to_string();
        state.metrics.upstream_up.with_label_values(&[name, addr.as_str()]).set(i64::from(backend.available(now)));
        current.insert(addr);
    }
    for gone in reported.difference(&current) {
        let _ = state.metrics.upstream_up.remove_label_values(&[name, gone.as_str()]);
    }
    *reported = current;
}
