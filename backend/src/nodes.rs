//! The AI node pool: discovery of the configured nodes, their health checks,
//! and dispatching a chat to one of them, round-robin with retry.
//!
//! Selection and health are `pingora-load-balancing`'s (`LoadBalancer<RoundRobin>`
//! with an `HttpHealthCheck`); discovery re-resolves each node's host name, so
//! a compose service name that gains replicas gains nodes without a restart.

use crate::config::{Config, NodeUrl};
use crate::metrics::Metrics;
use async_trait::async_trait;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long one name resolution may take during discovery.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

pub use chat_wire::node_api::{NodeAccepted, NodeChat, Takeover};

/// A node's acceptance.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The node's URL as configured (or `http://ip:port` for one of several replicas behind a name).
    pub node_url: String,
    /// The node's own id, from its answer.
    pub node_id: String,
}

#[derive(Debug, Error)]
pub enum DispatchError {
    #[error("no AI node could take the request after {attempts} attempts: {last}")]
    NoNode { attempts: usize, last: String },
    #[error("no AI node answered within {0:?}")]
    Deadline(Duration),
    /// The node judged the request invalid; retrying elsewhere would not help.
    #[error("the AI node rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
}

/// One node's state for `/api/ai-health`.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub url: String,
    pub status: &'static str,
}

/// Attached to each `Backend`: where it came from.
#[derive(Debug, Clone)]
struct Origin {
    /// Shown to users: the configured URL, or `http://ip:port` when a name stands for several nodes.
    url: String,
    /// The configured URL this backend was resolved from.
    configured: String,
}

/// Resolves each configured URL's host to the node addresses behind it.
struct Discovery {
    nodes: Vec<NodeUrl>,
}

#[async_trait]
impl ServiceDiscovery for Discovery {
    async fn discover(&self) -> pingora_core::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut backends = BTreeSet::new();
        for node in &self.nodes {
            let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&node.authority)).await {
                Ok(Ok(addrs)) => addrs.collect::<BTreeSet<_>>(),
                Ok(Err(e)) => {
                    log::warn!("node={} cannot be resolved: {e}", node.url);
                    continue;
                }
                Err(_) => {
                    log::warn!("node={} resolution timed out", node.url);
                    continue;
                }
            };
            let several = addrs.len() > 1;
            for addr in addrs {
                let mut backend = Backend::new(&addr.to_string())?;
                let url = if several { format!("http://{addr}") } else { node.url.clone() };
                backend.ext.insert(Origin { url, configured: node.url.clone() });
                backends.insert(backend);
            }
        }
        Ok((backends, HashMap::new()))
    }
}

pub struct AiPool {
    lb: Arc<LoadBalancer<RoundRobin>>,
    configured: Vec<NodeUrl>,
    http: reqwest::Client,
    request_timeout: Duration,
    max_attempts: usize,
    deadline: Duration,
    metrics: Arc<Metrics>,
}

fn url_of(backend: &Backend) -> String {
    backend.ext.get::<Origin>().map(|o| o.url.clone()).unwrap_or_else(|| format!("http://{}", backend.addr))
}

impl AiPool {
    /// Builds the pool and runs discovery and one health check round, so no
    /// node is used before a check has passed.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<AiPool>> {
        let discovery = Discovery { nodes: config.ai_nodes.clone() };
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(discovery)));
        let mut check = HttpHealthCheck::new("ai-node", false);
        let mut req = RequestHeader::build("GET", config.health_path.as_bytes(), None)?;
        req.append_header("Host", "ai-node")?;
        check.req = req;
        check.consecutive_success = config.healthy_after;
        check.consecutive_failure = config.unhealthy_after;
        check.peer_template.options.connection_timeout = Some(config.health_timeout);
        check.peer_template.options.read_timeout = Some(config.health_timeout);
        lb.set_health_check(Box::new(check));
        lb.health_check_frequency = Some(config.health_interval);
        lb.update_frequency = Some(config.discovery_interval);
        lb.parallel_health_check = true;
        lb.update().await?;
        lb.backends().run_health_check(true).await;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(secret) = &config.node_secret {
            let mut value = reqwest::header::HeaderValue::from_str(secret)?;
            value.set_sensitive(true);
            headers.insert(chat_wire::node_api::SECRET_HEADER, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Arc::new(AiPool {
            lb: Arc::new(lb),
            configured: config.ai_nodes.clone(),
            http,
            request_timeout: config.request_timeout,
            max_attempts: config.max_attempts,
            deadline: config.dispatch_deadline,
            metrics,
        }))
    }

    /// Runs discovery and health checks until `shutdown` turns true.
    pub fn spawn_background(&self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let lb = self.lb.clone();
        tokio::spawn(async move { lb.start(shutdown).await });
    }

    /// Every node with its health, for `/api/ai-health`.
    pub fn status(&self) -> Vec<NodeStatus> {
        let backends = self.lb.backends().get_backend();
        let mut out: Vec<NodeStatus> = backends
            .iter()
            .map(|b| NodeStatus {
                url: url_of(b),
                status: if self.lb.backends().ready(b) { "healthy" } else { "unhealthy" },
            })
            .collect();
        // A configured node that does not resolve is still listed, as unhealthy.
        for node in &self.configured {
            let resolved = backends.iter().any(|b| b.ext.get::<Origin>().is_some_and(|o| o.configured == node.url));
            if !resolved {
                out.push(NodeStatus { url: node.url.clone(), status: "unhealthy" });
            }
        }
        out.sort_by(|a, b| a.url.cmp(&b.url));
        for s in &out {
            self.metrics.node_healthy.with_label_values(&[&s.url]).set(i64::from(s.status == "healthy"));
        }
        out
    }

    /// Sends `chat` to the next healthy node; on a connect failure, a timeout or
    /// a 5xx, to the next one not yet tried, within the attempt and time bounds.
    pub async fn dispatch(&self, chat: &NodeChat) -> Result<Accepted, DispatchError> {
        let started = Instant::now();
        let mut tried: Vec<Backend> = Vec::new();
        let mut last = String::from("no healthy AI node");
        for attempt in 0..self.max_attempts {
            let Some(backend) = self.lb.select_with(b"", 256, |b, healthy| healthy && !tried.contains(b)) else {
                break;
            };
            tried.push(backend.clone());
            if attempt > 0 {
                self.metrics.retries.inc();
            }
            let url = url_of(&backend);
            let remaining = self.deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(DispatchError::Deadline(self.deadline));
            }
            let target = format!("http://{}/chat", backend.addr);
            let outcome =
                tokio::time::timeout(self.request_timeout.min(remaining), self.http.post(&target).json(chat).send())
                    .await;
            let failure = match outcome {
                Err(_) => format!("{url} timed out"),
                Ok(Err(e)) => format!("{url}: {e}"),
                Ok(Ok(resp)) if resp.status().as_u16() == 202 => {
                    let node_id = match tokio::time::timeout(remaining, resp.json::<NodeAccepted>()).await {
                        Ok(Ok(body)) => body.node,
                        _ => String::new(),
                    };
                    self.metrics.dispatch.with_label_values(&[&url, "accepted"]).inc();
                    return Ok(Accepted { node_url: url, node_id });
                }
                // A node that refuses our secret is misconfigured, not the
                // client's fault: try the next one.
                Ok(Ok(resp)) if resp.status().as_u16() == 401 => {
                    log::error!("{url} refused this backend's ai.node_secret (X-Node-Secret); check both configs");
                    format!("{url} refused the node secret")
                }
                Ok(Ok(resp)) if resp.status().is_client_error() && resp.status().as_u16() != 429 => {
                    let status = resp.status().as_u16();
                    let message = resp.text().await.unwrap_or_default().chars().take(300).collect();
                    self.metrics.dispatch.with_label_values(&[&url, "rejected"]).inc();
                    return Err(DispatchError::Rejected { status, message });
                }
                Ok(Ok(resp)) => format!("{url} answered {}", resp.status()),
            };
            log::warn!(
                "request_id={} attempt={} failed: {failure}",
                chat.request_id.as_deref().unwrap_or("-"),
                attempt + 1
            );
            self.metrics.dispatch.with_label_values(&[&url, "failed"]).inc();
            last = failure;
        }
        Err(DispatchError::NoNode { attempts: tried.len(), last })
    }
}
