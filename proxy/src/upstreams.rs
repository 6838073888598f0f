//! Upstream groups: the server list (swappable at runtime for `SIGHUP`), its
//! resolution into a Pingora ketama ring, and each backend's state (active
//! health verdict and the passive `max_fails`/`fail_timeout` window) that
//! decides whether the ring may hand it a request.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::selection::consistent::KetamaHashing;
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::UpstreamConfig;

/// Ring points per backend are 160 × this weight; more points make the
/// split between backends closer to even (1,600 points: within a few %).
const RING_WEIGHT: usize = 10;

/// Ring steps walked looking for an available backend before giving up.
const MAX_RING_STEPS: usize = 4096;

/// Health of one backend, shared by the selector, the checkers and status.
#[derive(Debug)]
pub struct BackendState {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The active checks' verdict; false until the first check passes, so a
    /// new backend gets no traffic before it has proven itself.
    healthy: AtomicBool,
    /// Whether any active check has completed (for `/upstreams`).
    checked: AtomicBool,
    /// Consecutive results that disagree with `healthy` (towards rise/fall).
    streak: AtomicU64,
    /// Passive check state.
    passive: Mutex<Passive>,
    /// Requests sent here, for `/upstreams`.
    pub requests: AtomicU64,
}

/// Recent failures seen by live traffic (nginx `max_fails`/`fail_timeout`).
#[derive(Debug, Default)]
struct Passive {
    /// Failure times within the current window.
    failures: VecDeque<Instant>,
    /// The backend is out until then after `max_fails` failures.
    down_until: Option<Instant>,
}

impl BackendState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            healthy: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            streak: AtomicU64::new(0),
            passive: Mutex::new(Passive::default()),
            requests: AtomicU64::new(0),
        }
    }

    /// Records an active check result; returns true when the verdict flipped.
    pub fn observe_check(&self, passed: bool, rise: u32, fall: u32) -> bool {
        self.checked.store(true, Ordering::Relaxed);
        let healthy = self.healthy.load(Ordering::Relaxed);
        if passed == healthy {
            self.streak.store(0, Ordering::Relaxed);
            return false;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if passed { rise } else { fall };
        if streak >= u64::from(needed) {
            self.healthy.store(passed, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            if passed {
                // A backend the checks bring back starts with a clean slate.
                *self.passive.lock().unwrap_or_else(|p| p.into_inner()) = Passive::default();
            }
            return true;
        }
        false
    }

    /// Records a failure of live traffic; returns true when it took the
    /// backend out.
    pub fn observe_failure(&self, now: Instant, max_fails: u32, window: Duration) -> bool {
        if max_fails == 0 {
            return false;
        }
        let mut p = self.passive.lock().unwrap_or_else(|p| p.into_inner());
        while p.failures.front().is_some_and(|t| now.duration_since(*t) >= window) {
            p.failures.pop_front();
        }
        p.failures.push_back(now);
        if p.failures.len() >= max_fails as usize {
            p.failures.clear();
            p.down_until = Some(now + window);
            return true;
        }
        false
    }

    /// The active verdict.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the passive check has the backend out at `now`.
    pub fn passively_down(&self, now: Instant) -> bool {
        let p = self.passive.lock().unwrap_or_else(|p| p.into_inner());
        p.down_until.is_some_and(|until| now < until)
    }

    /// Whether the selector may use this backend at `now`.
    pub fn available(&self, now: Instant) -> bool {
        self.healthy() && !self.passively_down(now)
    }
}

/// Service discovery over a list of `host:port` that `SIGHUP` can replace.
struct ServerList {
    /// Current list, as written in the configuration.
    servers: Arc<RwLock<Vec<String>>>,
    /// Last successful resolution of each name, kept when DNS hiccups so a
    /// transient failure does not empty the ring.
    resolved: Mutex<HashMap<String, Vec<SocketAddr>>>,
}

#[async_trait]
impl ServiceDiscovery for ServerList {
    async fn discover(&self) -> pingora_core::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let servers = self.servers.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut backends = BTreeSet::new();
        for server in servers {
            let addrs = match server.parse::<SocketAddr>() {
                Ok(addr) => vec![addr],
                Err(_) => match tokio::net::lookup_host(server.as_str()).await {
                    Ok(addrs) => {
                        let addrs: Vec<_> = addrs.collect();
                        self.remember(&server, &addrs);
                        addrs
                    }
                    Err(e) => {
                        log::warn!("upstream server {server:?} does not resolve: {e}");
                        self.recall(&server)
                    }
                },
            };
            backends.extend(addrs.into_iter().map(|addr| Backend {
                addr: PingoraAddr::Inet(addr),
                weight: RING_WEIGHT,
                ext: Default::default(),
            }));
        }
        Ok((backends, HashMap::new()))
    }
}

impl ServerList {
    fn remember(&self, name: &str, addrs: &[SocketAddr]) {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), addrs.to_vec());
    }

    fn recall(&self, name: &str) -> Vec<SocketAddr> {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned().unwrap_or_default()
    }
}

/// One upstream group: its settings, ring and backend states.
pub struct UpstreamGroup {
    /// The group's name; fixed for the group's life (a reload never renames a group).
    name: String,
    /// Settings; replaced on reload (server list and timeouts). Shared, so a
    /// request takes a snapshot without copying it.
    config: RwLock<Arc<UpstreamConfig>>,
    /// The list the discovery reads.
    servers: Arc<RwLock<Vec<String>>>,
    /// Pingora's ketama ring over the resolved servers.
    lb: LoadBalancer<KetamaHashing>,
    /// State of every backend currently in the ring.
    states: RwLock<HashMap<SocketAddr, Arc<BackendState>>>,
    /// Wakes the health checker right away (after a reload).
    pub check_now: Notify,
}

/// A backend as shown on `/upstreams`.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// Resolved address.
    pub addr: String,
    /// `up`, `down` (active checks), `failed` (passive), or `unchecked`.
    pub health: &'static str,
    /// Requests sent to it.
    pub requests: u64,
}

/// A group as shown on `/upstreams`.
#[derive(Debug, Serialize)]
pub struct GroupView {
    /// Group name.
    pub name: String,
    /// Configured servers.
    pub servers: Vec<String>,
    /// Resolved backends with their health.
    pub backends: Vec<BackendView>,
}

impl UpstreamGroup {
    /// Builds the group and resolves its servers once.
    pub async fn new(config: UpstreamConfig) -> Arc<Self> {
        let servers = Arc::new(RwLock::new(config.servers.clone()));
        let discovery = ServerList { servers: servers.clone(), resolved: Mutex::new(HashMap::new()) };
        let lb = LoadBalancer::from_backends(Backends::new(Box::new(discovery)));
        let group = Arc::new(Self {
            name: config.name.clone(),
            config: RwLock::new(Arc::new(config)),
            servers,
            lb,
            states: RwLock::new(HashMap::new()),
            check_now: Notify::new(),
        });
        group.refresh().await;
        group
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current settings.
    pub fn config(&self) -> Arc<UpstreamConfig> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies a reloaded configuration: new server list and settings.
    /// Existing connections are not touched; only new requests see it.
    pub async fn reconfigure(&self, config: UpstreamConfig) {
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = config.servers.clone();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.refresh().await;
        self.check_now.notify_one();
    }

    /// Re-resolves the servers, rebuilds the ring and syncs backend states.
    pub async fn refresh(&self) {
        if let Err(e) = self.lb.update().await {
            log::warn!("upstream {}: discovery failed: {e}", self.name());
            return;
        }
        let current: Vec<SocketAddr> =
            self.lb.backends().get_backend().iter().filter_map(|b| b.addr.as_inet().copied()).collect();
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        states.retain(|addr, _| current.contains(addr));
        for addr in current {
            states.entry(addr).or_insert_with(|| {
                log::info!("upstream {}: backend {addr} added (out until a health check passes)", self.name());
                Arc::new(BackendState::new(addr))
            });
        }
    }

    /// Every backend's state.
    pub fn states(&self) -> Vec<Arc<BackendState>> {
        let mut v: Vec<_> = self.states.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by_key(|s| s.addr);
        v
    }

    /// One backend's state.
    pub fn state(&self, addr: &SocketAddr) -> Option<Arc<BackendState>> {
        self.states.read().unwrap_or_else(|p| p.into_inner()).get(addr).cloned()
    }

    /// The first available backend on the ring from `key`, skipping `tried`
    /// (retries walk on to the next backend of the ring).
    pub fn select(&self, key: &[u8], tried: &[SocketAddr]) -> Option<SocketAddr> {
        self.select_inner(key, tried, false)
    }

    /// [`Self::select`], counting the request against the chosen backend (for `/upstreams`).
    pub fn select_counted(&self, key: &[u8], tried: &[SocketAddr]) -> Option<SocketAddr> {
        self.select_inner(key, tried, true)
    }

    fn select_inner(&self, key: &[u8], tried: &[SocketAddr], count: bool) -> Option<SocketAddr> {
        let now = Instant::now();
        let states = self.states.read().unwrap_or_else(|p| p.into_inner());
        let addr = self
            .lb
            .select_with(key, MAX_RING_STEPS, |b, _| {
                b.addr
                    .as_inet()
                    .is_some_and(|addr| !tried.contains(addr) && states.get(addr).is_some_and(|s| s.available(now)))
            })
            .and_then(|b| b.addr.as_inet().copied())?;
        if count {
            if let Some(state) = states.get(&addr) {
                state.requests.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(addr)
    }

    /// Status view.
    pub fn view(&self) -> GroupView {
        let now = Instant::now();
        let config = self.config();
        GroupView {
            name: config.name.clone(),
            servers: config.servers.clone(),
            backends: self
                .states()
                .iter()
                .map(|s| BackendView {
                    addr: s.addr.to_string(),
                    health: if !s.checked.load(Ordering::Relaxed) {
                        "unchecked"
                    } else if !s.healthy() {
                        "down"
                    } else if s.passively_down(now) {
                        "failed"
                    } else {
                        "up"
                    },
                    requests: s.requests.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// All groups by name.
pub struct Upstreams {
    /// Groups, sorted by name.
    groups: Vec<Arc<UpstreamGroup>>,
}

impl Upstreams {
    /// Builds every group of the configuration.
    pub async fn new(configs: &[UpstreamConfig]) -> Self {
        let mut groups = Vec::new();
        for c in configs {
            groups.push(UpstreamGroup::new(c.clone()).await);
        }
        Self { groups }
    }

    /// The group called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamGroup>> {
        self.groups.iter().find(|g| g.name() == name)
    }

    /// Every group.
    pub fn all(&self) -> &[Arc<UpstreamGroup>] {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;

    fn config(servers: &[&str]) -> UpstreamConfig {
        UpstreamConfig {
            name: "g".into(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            max_fails: 2,
            fail_timeout: Duration::from_secs(10),
            resolve_interval: Duration::from_secs(30),
            health: HealthConfig {
                path: "/health".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                rise: 1,
                fall: 1,
            },
        }
    }

    async fn all_up(servers: &[&str]) -> Arc<UpstreamGroup> {
        let g = UpstreamGroup::new(config(servers)).await;
        for s in g.states() {
            s.observe_check(true, 1, 1);
        }
        g
    }

    fn spread(g: &UpstreamGroup) -> HashMap<SocketAddr, Vec<u32>> {
        let mut by: HashMap<SocketAddr, Vec<u32>> = HashMap::new();
        for i in 0..1000u32 {
            let key = format!("127.0.{}.{}", i / 250, i % 250 + 1);
            by.entry(g.select(key.as_bytes(), &[]).unwrap()).or_default().push(i);
        }
        by
    }

    #[tokio::test]
    async fn clients_spread_evenly_and_removal_moves_only_that_share() {
        for base in [20000u16, 31234, 40999, 51111] {
            let servers: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i * 7)).collect();
            let refs: Vec<&str> = servers.iter().map(String::as_str).collect();
            let g = all_up(&refs).await;
            let before = spread(&g);
            for clients in before.values() {
                assert!(
                    (283..=383).contains(&clients.len()),
                    "{base}: {:?}",
                    before.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
                );
            }
            // Take one out: its clients move, nobody else's do.
            let gone: SocketAddr = servers[1].parse().unwrap();
            g.state(&gone).unwrap().observe_check(false, 1, 1);
            let after = spread(&g);
            for (addr, clients) in &before {
                if *addr != gone {
                    for c in clients {
                        assert!(after[addr].contains(c));
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn new_backends_are_out_until_checked() {
        let g = UpstreamGroup::new(config(&["127.0.0.1:1"])).await;
        assert_eq!(g.select(b"k", &[]), None);
        g.states()[0].observe_check(true, 1, 1);
        assert!(g.select(b"k", &[]).is_some());
    }

    #[test]
    fn passive_failures_take_a_backend_out_for_the_window() {
        let s = BackendState::new("127.0.0.1:1".parse().unwrap());
        s.observe_check(true, 1, 1);
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert!(!s.observe_failure(t0, 2, w));
        assert!(s.observe_failure(t0 + Duration::from_secs(1), 2, w));
        assert!(!s.available(t0 + Duration::from_secs(5)));
        assert!(s.available(t0 + Duration::from_secs(12)));
        // Failures further apart than the window do not add up.
        assert!(!s.observe_failure(t0 + Duration::from_secs(20), 2, w));
        assert!(!s.observe_failure(t0 + Duration::from_secs(31), 2, w));
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let s = BackendState::new("127.0.0.1:1".parse().unwrap());
        assert!(!s.observe_check(true, 2, 2));
        assert!(!s.healthy());
        assert!(s.observe_check(true, 2, 2));
        assert!(!s.observe_check(false, 2, 2));
        assert!(!s.observe_check(true, 2, 2));
        assert!(!s.observe_check(false, 2, 2));
        assert!(s.healthy());
        assert!(s.observe_check(false, 2, 2));
        assert!(!s.healthy());
    }
}
