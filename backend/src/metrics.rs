//! Prometheus metrics of the backend, served on an internal listener (never
//! through the proxy's public routes).

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    /// Chat requests by outcome (`accepted`, `invalid`, `rate_limited`, `no_node`, ...).
    pub chats: IntCounterVec,
    /// Dispatch attempts by node URL and outcome (`accepted`, `failed`, `rejected`).
    pub dispatch: IntCounterVec,
    /// Attempts after the first for one chat.
    pub retries: IntCounter,
    /// 1 for a healthy node, 0 otherwise, as last reported.
    pub node_healthy: IntGaugeVec,
    pub ws_active: IntGauge,
    /// Events written to sockets and SSE streams.
    pub events_delivered: IntCounter,
    /// Events read back from a request's stream (resume, gaps, reconnects).
    pub events_replayed: IntCounter,
    pub resumes_limited: IntCounter,
    /// From the AI node's publish stamp to the write to the client.
    pub publish_to_socket: Histogram,
    pub pubsub_reconnects: IntCounter,
    /// Sockets closed because they read slower than their queue allows.
    pub slow_consumers: IntCounter,
    /// Requests ended with `node_failed` because their events stopped.
    pub stalls: IntCounter,
    /// Mid-stream takeovers by outcome (`continued`, `failed`, `lost_race`, ...).
    pub takeovers: IntCounterVec,
    /// Key checks by outcome (`ok`, `missing`, `invalid`, `unavailable`); keys on only.
    pub auth: IntCounterVec,
    /// Admissions of each API key's requests by outcome (`admitted`, or the limit hit).
    pub key_requests: IntCounterVec,
    /// Requests cancelled, by how (`client`, `abandoned`).
    pub cancels: IntCounterVec,
    /// Tokens of each API key's answers (`prompt`, `completion`), counted by
    /// the reader that started the answer when it sees its end.
    pub key_tokens: IntCounterVec,
}

impl Metrics {
    /// Counts the tokens of an answer of `key`.
    pub fn charge(&self, key: &str, usage: chat_wire::Usage) {
        self.key_tokens.with_label_values(&[key, "prompt"]).inc_by(usage.prompt_tokens);
        self.key_tokens.with_label_values(&[key, "completion"]).inc_by(usage.completion_tokens);
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        let chats =
            IntCounterVec::new(Opts::new("backend_chat_requests_total", "Chat requests by outcome"), &["outcome"])
                .unwrap();
        let dispatch = IntCounterVec::new(
            Opts::new("backend_dispatch_attempts_total", "Dispatch attempts by AI node and outcome"),
            &["node", "outcome"],
        )
        .unwrap();
        let retries = IntCounter::new("backend_dispatch_retries_total", "Dispatch attempts after the first").unwrap();
        let node_healthy =
            IntGaugeVec::new(Opts::new("backend_ai_node_healthy", "AI node health (1 healthy)"), &["node"]).unwrap();
        let ws_active = IntGauge::new("backend_ws_active", "Open WebSockets").unwrap();
        let events_delivered = IntCounter::new("backend_events_delivered_total", "Events written to clients").unwrap();
        let events_replayed =
            IntCounter::new("backend_events_replayed_total", "Events read back from streams").unwrap();
        let resumes_limited =
            IntCounter::new("backend_resumes_limited_total", "Resume frames refused by a rate limit").unwrap();
        let publish_to_socket = Histogram::with_opts(
            HistogramOpts::new(
                "backend_publish_to_socket_seconds",
                "From the AI node's publish to the write to the client",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )
        .unwrap();
        let pubsub_reconnects = IntCounter::new("backend_pubsub_reconnects_total", "Pub/sub reconnections").unwrap();
        let slow_consumers =
            IntCounter::new("backend_ws_slow_consumers_total", "Sockets closed for reading too slowly").unwrap();
        let stalls =
            IntCounter::new("backend_stalled_requests_total", "Requests ended with a stored node_failed").unwrap();
        let takeovers =
            IntCounterVec::new(Opts::new("backend_takeovers_total", "Mid-stream takeovers by outcome"), &["outcome"])
                .unwrap();
        let auth =
            IntCounterVec::new(Opts::new("backend_auth_total", "API key checks by outcome"), &["outcome"]).unwrap();
        let key_requests = IntCounterVec::new(
            Opts::new("backend_key_requests_total", "Requests of each API key by admission outcome"),
            &["key", "outcome"],
        )
        .unwrap();
        let cancels =
            IntCounterVec::new(Opts::new("backend_cancels_total", "Requests cancelled, by how"), &["how"]).unwrap();
        let key_tokens = IntCounterVec::new(
            Opts::new("backend_key_tokens_total", "Tokens of each API key's answers, by kind"),
            &["key", "kind"],
        )
        .unwrap();
        for c in [
            Box::new(auth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(key_requests.clone()),
            Box::new(cancels.clone()),
            Box::new(key_tokens.clone()),
            Box::new(chats.clone()),
            Box::new(dispatch.clone()),
            Box::new(retries.clone()),
            Box::new(node_healthy.clone()),
            Box::new(ws_active.clone()),
            Box::new(events_delivered.clone()),
            Box::new(events_replayed.clone()),
            Box::new(resumes_limited.clone()),
            Box::new(publish_to_socket.clone()),
            Box::new(pubsub_reconnects.clone()),
            Box::new(slow_consumers.clone()),
            Box::new(stalls.clone()),
            Box::new(takeovers.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            chats,
            dispatch,
            retries,
            node_healthy,
            ws_active,
            events_delivered,
            events_replayed,
            resumes_limited,
            publish_to_socket,
            pubsub_reconnects,
            slow_consumers,
            stalls,
            takeovers,
            auth,
            key_requests,
            cancels,
            key_tokens,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }

    /// Records the latency of an event stamped `ts_us` by its producer.
    pub fn observe_delivery(&self, ts_us: Option<u64>) {
        self.events_delivered.inc();
        if let Some(ts) = ts_us {
            let now = chat_wire::now_micros();
            if now >= ts {
                self.publish_to_socket.observe((now - ts) as f64 / 1e6);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
