//! Counters the status listener reports: nginx `stub_status` connection and
//! request counts, and the Prometheus registry (requests by status, latency,
//! upstream health, retries, active WebSockets, rejections).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Most worker processes (`server.processes`).
pub const MAX_WORKERS: usize = 64;

/// Words per worker in [`ConnectionStats`]' shared memory.
const SLOT: usize = 4;

/// nginx `stub_status` counters, in memory all worker processes share (see
/// [`crate::workers`]): the totals are common; each worker counts its own
/// open, reading and writing connections in a slot of its own, so a worker
/// that dies can be forgotten, and the report sums the slots. The slot also
/// says whether the worker's relay thread takes its siblings' tunnels.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionStats {
    /// Connections accepted.
    pub accepts: &'static AtomicU64,
    /// Connections handled (accepted and not refused by the connection limit).
    pub handled: &'static AtomicU64,
    /// Requests read.
    pub requests: &'static AtomicU64,
    /// Client connections this worker has open now (wrapping; see [`Self::gauge`]).
    pub active: &'static AtomicU64,
    /// Connections this worker is reading a first request header on now.
    pub reading: &'static AtomicU64,
    /// Requests this worker is processing or answering now.
    pub writing: &'static AtomicU64,
    /// 1 while this worker's relay thread takes its siblings' tunnels.
    pub relay_ready: &'static AtomicU64,
    /// Every worker's `[active, reading, writing, relay ready]`.
    gauges: &'static [AtomicU64],
}

impl ConnectionStats {
    /// Words the counters take in shared memory.
    pub const WORDS: usize = 3 + SLOT * MAX_WORKERS;

    /// The counters in `words` (at least [`Self::WORDS`] long), as seen by
    /// worker `worker` of `workers`.
    pub fn over(words: &'static [AtomicU64], worker: usize, workers: usize) -> Self {
        assert!(words.len() >= Self::WORDS && worker < workers && workers <= MAX_WORKERS);
        let mine = &words[3 + SLOT * worker..3 + SLOT * worker + SLOT];
        Self {
            accepts: &words[0],
            handled: &words[1],
            requests: &words[2],
            active: &mine[0],
            reading: &mine[1],
            writing: &mine[2],
            relay_ready: &mine[3],
            gauges: &words[3..3 + SLOT * workers],
        }
    }

    /// Counters of a single process, in memory of its own.
    pub fn private() -> Self {
        let words: Vec<AtomicU64> = (0..Self::WORDS).map(|_| AtomicU64::new(0)).collect();
        Self::over(Box::leak(words.into_boxed_slice()), 0, 1)
    }

    /// Zeroes worker `worker`'s gauges (it is gone, and its connections with it).
    pub fn forget_worker(words: &'static [AtomicU64], worker: usize) {
        for w in &words[3 + SLOT * worker..3 + SLOT * worker + SLOT] {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Sum over the workers of gauge `k` (0 active, 1 reading, 2 writing).
    /// Each slot only rises and falls by ones, so reading it as i64 undoes
    /// the wrap of a momentary fall below zero.
    fn gauge(&self, k: usize) -> i64 {
        self.gauges.iter().skip(k).step_by(SLOT).map(|w| w.load(Ordering::Relaxed) as i64).sum()
    }

    /// Client connections worker `worker` has open now.
    pub fn open_in(&self, worker: usize) -> i64 {
        self.gauges.get(SLOT * worker).map_or(0, |w| w.load(Ordering::Relaxed) as i64)
    }

    /// Whether worker `worker`'s relay thread is taking its siblings'
    /// tunnels (set by that thread; cleared when it stops or the worker is
    /// forgotten).
    pub fn relay_ready_in(&self, worker: usize) -> bool {
        self.gauges.get(SLOT * worker + 3).is_some_and(|w| w.load(Ordering::Acquire) == 1)
    }

    /// Client connections open now in every worker.
    pub fn open_connections(&self) -> i64 {
        self.gauge(0)
    }

    /// The exact nginx `stub_status` text.
    pub fn stub_status(&self) -> String {
        let active = self.gauge(0).max(0);
        let reading = self.gauge(1).clamp(0, active);
        let writing = self.gauge(2).clamp(0, active - reading);
        let waiting = active - reading - writing;
        format!(
            "Active connections: {active} \nserver accepts handled requests\n {} {} {} \nReading: {reading} Writing: {writing} Waiting: {waiting} \n",
            self.accepts.load(Ordering::Relaxed),
            self.handled.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

/// Prometheus metrics of the proxy, in their own registry.
pub struct Metrics {
    /// Registry `/metrics` renders.
    registry: Registry,
    /// Requests answered, by upstream group and status code.
    pub requests: IntCounterVec,
    /// Request duration, by upstream group.
    pub latency: HistogramVec,
    /// 1 when a backend is in service (active and passive checks), else 0.
    pub upstream_up: IntGaugeVec,
    /// Retries on another backend after a failed attempt, by group.
    pub retries: IntCounterVec,
    /// Backends taken out by passive checks, by group.
    pub passive_ejections: IntCounterVec,
    /// Upgraded (WebSocket) connections open now.
    pub websockets_active: IntGauge,
    /// Tunnels meant for a sibling worker's relay, by outcome: handed over,
    /// or kept here (that relay was not reading, had no descriptors to
    /// spare, or its socket took no more).
    pub websocket_handoffs: IntCounterVec,
    /// Requests refused by a limit, by reason.
    pub rejected: IntCounterVec,
    /// Configuration reloads, by result.
    pub reloads: IntCounterVec,
    /// Client connections open now.
    pub connections_active: IntGauge,
    /// Client connections accepted.
    pub connections_accepted: IntCounter,
    /// Resolved request metrics by group (see [`Metrics::group`]).
    groups: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<GroupMetrics>>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("proxy_requests_total", "Requests answered, by upstream group and status"),
            &["upstream", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("proxy_request_duration_seconds", "Request duration")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["upstream"],
        )
        .expect("valid metric");
        let upstream_up = IntGaugeVec::new(
            Opts::new("proxy_upstream_up", "1 when a backend is in service"),
            &["upstream", "backend"],
        )
        .expect("valid metric");
        let retries =
            IntCounterVec::new(Opts::new("proxy_upstream_retries_total", "Retries on another backend"), &["upstream"])
                .expect("valid metric");
        let passive_ejections = IntCounterVec::new(
            Opts::new("proxy_upstream_passive_ejections_total", "Backends taken out by failures of live traffic"),
            &["upstream"],
        )
        .expect("valid metric");
        let websockets_active =
            IntGauge::new("proxy_websockets_active", "Upgraded connections open now").expect("valid metric");
        let websocket_handoffs = IntCounterVec::new(
            Opts::new("proxy_websocket_handoffs_total", "WebSocket tunnels meant for another worker's relay thread"),
            &["outcome"],
        )
        .expect("valid metric");
        let rejected =
            IntCounterVec::new(Opts::new("proxy_rejected_total", "Requests refused by a limit"), &["reason"])
                .expect("valid metric");
        let reloads = IntCounterVec::new(Opts::new("proxy_config_reloads_total", "Configuration reloads"), &["result"])
            .expect("valid metric");
        let connections_active =
            IntGauge::new("proxy_connections_active", "Client connections open now").expect("valid metric");
        let connections_accepted =
            IntCounter::new("proxy_connections_accepted_total", "Client connections accepted").expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(upstream_up.clone()),
            Box::new(retries.clone()),
            Box::new(passive_ejections.clone()),
            Box::new(websockets_active.clone()),
            Box::new(websocket_handoffs.clone()),
            Box::new(rejected.clone()),
            Box::new(reloads.clone()),
            Box::new(connections_active.clone()),
            Box::new(connections_accepted.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            requests,
            latency,
            upstream_up,
            retries,
            passive_ejections,
            websockets_active,
            websocket_handoffs,
            rejected,
            reloads,
            connections_active,
            connections_accepted,
            groups: Default::default(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("metrics encoding failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One upstream group's request metrics, resolved once: the lean path keeps
/// it per connection, so a request costs no label lookup.
pub struct GroupMetrics {
    /// The group's duration histogram.
    latency: prometheus::Histogram,
    /// Request counters by status, resolved on first use.
    by_status: Box<[std::sync::OnceLock<IntCounter>]>,
    /// The group's name.
    name: String,
}

impl GroupMetrics {
    /// Counts a request answered with `status` that took `secs`.
    pub fn observe(&self, metrics: &Metrics, status: u16, secs: f64) {
        self.latency.observe(secs);
        match self.by_status.get(usize::from(status)) {
            Some(slot) => slot
                .get_or_init(|| {
                    metrics.requests.with_label_values(&[self.name.as_str(), status_label(status).as_str()])
                })
                .inc(),
            None => metrics.requests.with_label_values(&[self.name.as_str(), "0"]).inc(),
        }
    }

    /// The group these are for.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A status as its label ("0" for none or an invalid one).
fn status_label(status: u16) -> String {
    http::StatusCode::from_u16(status).map_or_else(|_| "0".to_string(), |c| c.as_str().to_string())
}

impl Metrics {
    /// The request metrics of group `name` (made on first use, then shared).
    pub fn group(&self, name: &str) -> std::sync::Arc<GroupMetrics> {
        if let Some(m) = self.groups.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return m.clone();
        }
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups
            .entry(name.to_string())
            .or_insert_with(|| {
                std::sync::Arc::new(GroupMetrics {
                    latency: self.latency.with_label_values(&[name]),
                    by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
                    name: name.to_string(),
                })
            })
            .clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_ready_only_while_its_worker_says_so_and_is_forgotten_with_it() {
        let words: &'static [AtomicU64] =
            Box::leak((0..ConnectionStats::WORDS).map(|_| AtomicU64::new(0)).collect::<Vec<_>>().into_boxed_slice());
        let (w0, w1) = (ConnectionStats::over(words, 0, 2), ConnectionStats::over(words, 1, 2));
        assert!(!w1.relay_ready_in(0));
        w0.relay_ready.store(1, Ordering::Release);
        w0.active.fetch_add(3, Ordering::Relaxed);
        w1.active.fetch_add(2, Ordering::Relaxed);
        assert!(w1.relay_ready_in(0) && !w1.relay_ready_in(1));
        assert_eq!((w1.open_in(0), w1.open_in(1), w1.open_connections()), (3, 2, 5));
        ConnectionStats::forget_worker(words, 0);
        assert!(!w1.relay_ready_in(0));
        assert_eq!((w1.open_in(0), w1.open_connections()), (0, 2));
    }

    #[test]
    fn stub_status_has_nginx_layout() {
        let s = ConnectionStats::private();
        s.accepts.store(16630948, Ordering::Relaxed);
        s.handled.store(16630948, Ordering::Relaxed);
        s.requests.store(31070465, Ordering::Relaxed);
        s.active.store(291, Ordering::Relaxed);
        s.reading.store(6, Ordering::Relaxed);
        s.writing.store(179, Ordering::Relaxed);
        assert_eq!(
            s.stub_status(),
            "Active connections: 291 \nserver accepts handled requests\n 16630948 16630948 31070465 \nReading: 6 Writing: 179 Waiting: 106 \n"
        );
    }

    #[test]
    fn metrics_render_names() {
        let m = Metrics::new();
        m.requests.with_label_values(&["backends", "200"]).inc();
        m.websockets_active.inc();
        let text = m.render();
        assert!(text.contains("proxy_requests_total{status=\"200\",upstream=\"backends\"} 1"), "{text}");
        assert!(text.contains("proxy_websockets_active 1"));
    }

    #[test]
    fn stub_status_sums_the_workers_and_a_forgotten_worker_counts_nothing() {
        let words: &'static [AtomicU64] =
            Box::leak((0..ConnectionStats::WORDS).map(|_| AtomicU64::new(0)).collect::<Vec<_>>().into_boxed_slice());
        let (a, b) = (ConnectionStats::over(words, 0, 2), ConnectionStats::over(words, 1, 2));
        a.active.fetch_add(3, Ordering::Relaxed);
        b.active.fetch_add(2, Ordering::Relaxed);
        b.writing.fetch_add(1, Ordering::Relaxed);
        a.requests.fetch_add(4, Ordering::Relaxed);
        b.requests.fetch_add(1, Ordering::Relaxed);
        assert_eq!(a.open_connections(), 5);
        assert!(b.stub_status().starts_with("Active connections: 5 \nserver accepts handled requests\n 0 0 5 \n"));
        assert!(a.stub_status().ends_with("Reading: 0 Writing: 1 Waiting: 4 \n"));
        ConnectionStats::forget_worker(words, 1);
        assert_eq!(a.open_connections(), 3);
        // A worker's reading count may dip below zero for a moment.
        a.reading.fetch_sub(1, Ordering::Relaxed);
        assert!(a.stub_status().ends_with("Reading: 0 Writing: 0 Waiting: 3 \n"), "{}", a.stub_status());
    }
}
