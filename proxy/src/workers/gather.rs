//! `/metrics` over every worker: each worker serves its own Prometheus text
//! on a Unix socket ([`MetricsShare`]), and the worker that gets the scrape
//! reads its siblings' and sums them ([`merge`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::State;

/// Families that are each worker's view of one shared fact, not a share of a
/// total: the answering worker's own value is reported, not a sum.
const OWN_VIEW: &[&str] = &["proxy_upstream_up"];

/// Longest metrics text read from a sibling.
const MAX_TEXT: u64 = 16 << 20;

/// How long a sibling may take to answer.
const SIBLING_TIMEOUT: Duration = Duration::from_secs(2);

/// The background service serving this worker's metrics to its siblings.
pub struct MetricsShare {
    /// This worker's state (its metrics and its place among the workers).
    state: Arc<State>,
}

impl MetricsShare {
    /// Shares `state`'s metrics (its `worker` must be set).
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[async_trait]
impl BackgroundService for MetricsShare {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(worker) = &self.state.worker else { return };
        let path = worker.metrics_socket(worker.index);
        let _ = std::fs::remove_file(&path);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot share metrics on {}: {e}", path.display());
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut conn, _)) = accepted else { continue };
                    let text = self.state.metrics.render();
                    tokio::spawn(async move {
                        // A sibling that hangs up early (or the supervisor
                        // checking that we serve) is no error.
                        let _ = tokio::time::timeout(SIBLING_TIMEOUT, conn.write_all(text.as_bytes())).await;
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// This worker's metrics summed with every sibling's that answers, and
/// `proxy_workers`, how many were summed.
pub async fn all_workers(state: &State) -> String {
    let mut texts = vec![state.metrics.render()];
    if let Some(worker) = &state.worker {
        for index in (0..worker.count).filter(|&i| i != worker.index) {
            let path = worker.metrics_socket(index);
            let read = async {
                let mut text = String::new();
                UnixStream::connect(&path).await?.take(MAX_TEXT).read_to_string(&mut text).await?;
                std::io::Result::Ok(text)
            };
            match tokio::time::timeout(SIBLING_TIMEOUT, read).await {
                Ok(Ok(text)) => texts.push(text),
                Ok(Err(e)) => log::warn!("metrics of worker {index}: {e}"),
                Err(_) => log::warn!("metrics of worker {index}: no answer within {SIBLING_TIMEOUT:?}"),
            }
        }
    }
    let mut out = merge(&texts);
    out.push_str(&format!(
        "# HELP proxy_workers Worker processes whose metrics these are\n# TYPE proxy_workers gauge\nproxy_workers {}\n",
        texts.len()
    ));
    out
}

/// One metric family while merging.
struct Family {
    /// Its `# HELP` and `# TYPE` lines, from the first text that has them.
    head: Vec<String>,
    /// Whether the first text's values are kept rather than summed.
    own_view: bool,
    /// Samples (`name{labels}`, value) in first-seen order.
    samples: Vec<(String, f64)>,
    /// Where each sample is in `samples`.
    index: std::collections::HashMap<String, usize>,
}

/// Sums Prometheus text expositions sample by sample (the first text's
/// values alone for [`OWN_VIEW`] families), keeping the first text's order.
pub fn merge(texts: &[String]) -> String {
    let mut families: Vec<(String, Family)> = Vec::new();
    let find = |families: &mut Vec<(String, Family)>, name: &str| -> usize {
        families.iter().position(|(n, _)| n == name).unwrap_or_else(|| {
            let own_view = OWN_VIEW.contains(&name);
            families.push((
                name.to_string(),
                Family { head: Vec::new(), own_view, samples: Vec::new(), index: Default::default() },
            ));
            families.len() - 1
        })
    };
    for (t, text) in texts.iter().enumerate() {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let name = rest.split(' ').next().unwrap_or_default();
                let f = find(&mut families, name);
                current = Some(f);
                let family = &mut families[f].1;
                if family.head.len() < 2 && !family.head.iter().any(|h| h == line) {
                    family.head.push(line.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let f = match current {
                Some(f) => f,
                None => find(&mut families, key.split(['{', ' ']).next().unwrap_or(key)),
            };
            let family = &mut families[f].1;
            match family.index.get(key) {
                Some(_) if family.own_view && t > 0 => {}
                Some(&i) => family.samples[i].1 += value,
                None => {
                    family.index.insert(key.to_string(), family.samples.len());
                    family.samples.push((key.to_string(), value));
                }
            }
        }
    }
    let mut out = String::new();
    for (_, family) in families {
        for line in &family.head {
            out.push_str(line);
            out.push('\n');
        }
        for (key, value) in &family.samples {
            out.push_str(&format!("{key} {value}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "# HELP proxy_requests_total Requests\n# TYPE proxy_requests_total counter\n\
proxy_requests_total{status=\"200\",upstream=\"backends\"} 5\n\
# HELP proxy_request_duration_seconds Request duration\n# TYPE proxy_request_duration_seconds histogram\n\
proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"0.001\"} 4\n\
proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"+Inf\"} 5\n\
proxy_request_duration_seconds_sum{upstream=\"backends\"} 0.25\n\
proxy_request_duration_seconds_count{upstream=\"backends\"} 5\n\
# HELP proxy_upstream_up 1 when a backend is in service\n# TYPE proxy_upstream_up gauge\n\
proxy_upstream_up{backend=\"10.0.0.1:80\",upstream=\"backends\"} 1\n";

    const B: &str = "# HELP proxy_requests_total Requests\n# TYPE proxy_requests_total counter\n\
proxy_requests_total{status=\"200\",upstream=\"backends\"} 7\n\
proxy_requests_total{status=\"502\",upstream=\"backends\"} 1\n\
# HELP proxy_request_duration_seconds Request duration\n# TYPE proxy_request_duration_seconds histogram\n\
proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"0.001\"} 8\n\
proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"+Inf\"} 8\n\
proxy_request_duration_seconds_sum{upstream=\"backends\"} 0.5\n\
proxy_request_duration_seconds_count{upstream=\"backends\"} 8\n\
# HELP proxy_upstream_up 1 when a backend is in service\n# TYPE proxy_upstream_up gauge\n\
proxy_upstream_up{backend=\"10.0.0.1:80\",upstream=\"backends\"} 0\n";

    #[test]
    fn counters_and_histograms_are_summed_and_a_shared_fact_is_the_own_view() {
        let merged = merge(&[A.to_string(), B.to_string()]);
        for line in [
            "proxy_requests_total{status=\"200\",upstream=\"backends\"} 12\n",
            "proxy_requests_total{status=\"502\",upstream=\"backends\"} 1\n",
            "proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"0.001\"} 12\n",
            "proxy_request_duration_seconds_bucket{upstream=\"backends\",le=\"+Inf\"} 13\n",
            "proxy_request_duration_seconds_sum{upstream=\"backends\"} 0.75\n",
            "proxy_request_duration_seconds_count{upstream=\"backends\"} 13\n",
            "proxy_upstream_up{backend=\"10.0.0.1:80\",upstream=\"backends\"} 1\n",
        ] {
            assert!(merged.contains(line), "{line} missing:\n{merged}");
        }
        assert_eq!(merged.matches("# TYPE proxy_requests_total counter").count(), 1, "{merged}");
        assert_eq!(merged.matches("# HELP").count(), 3, "{merged}");
    }

    #[test]
    fn one_text_comes_back_as_it_was() {
        assert_eq!(merge(&[A.to_string()]), A);
    }

    #[test]
    fn the_real_registry_round_trips() {
        let m = crate::metrics::Metrics::new();
        m.requests.with_label_values(&["backends", "200"]).inc_by(3);
        m.group("backends").observe(&m, 200, 0.002);
        let text = m.render();
        assert_eq!(merge(&[text.clone()]), text);
        let twice = merge(&[text.clone(), text]);
        assert!(twice.contains("proxy_requests_total{status=\"200\",upstream=\"backends\"} 8"), "{twice}");
    }
}
