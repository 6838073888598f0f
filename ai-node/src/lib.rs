//! The AI node: accepts chat requests, generates each answer in the
//! background with an `Engine`, and publishes it chunk by chunk through an
//! `EventStore` (Redis).
//!
//! `run` serves on a listener the caller binds, until `shutdown` resolves;
//! then it drains: health turns 503, new chats are refused, in-flight answers
//! get the grace period to finish and are ended with an `error` event after it.

pub mod api;
pub mod config;
pub mod engine;
pub mod generation;
pub mod store;

use chat_wire::ledger::Backplane;
use config::Config;
use generation::{Generator, Job, Outcome};
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use store::{Retention, Store};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long cancelled streams get to publish their final `error` event.
const CANCEL_FLUSH: Duration = Duration::from_secs(3);

/// The running node's shared state.
pub struct Node {
    pub config: Config,
    pub generator: Arc<Generator>,
    /// One permit per stream being generated; empty means 503.
    pub permits: Arc<Semaphore>,
    /// Set on shutdown: health answers 503 and chats are refused.
    pub draining: AtomicBool,
    /// The generation tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled when the grace period is over.
    cancel: CancellationToken,
}

impl Node {
    pub fn new(config: Config, store: Arc<Store>, engine: Arc<dyn engine::Engine>) -> Arc<Node> {
        let generator = Arc::new(Generator { node_id: config.node_id.clone(), store, engine });
        Arc::new(Node {
            permits: Arc::new(Semaphore::new(config.max_concurrent_streams)),
            config,
            generator,
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        })
    }

    /// Streams being generated now.
    pub fn in_flight(&self) -> usize {
        self.config.max_concurrent_streams - self.permits.available_permits()
    }

    fn spawn(&self, job: Job, permit: OwnedSemaphorePermit) {
        let generator = self.generator.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let request_id = job.request_id.clone();
            let outcome = generator.run(job, cancel).await;
            drop(permit);
            match outcome {
                Outcome::Done { chunks } => log::debug!("request_id={request_id} done chunks={chunks}"),
                other => log::warn!("request_id={request_id} ended: {other:?}"),
            }
        });
    }
}

/// The Redis store the configuration names.
pub fn redis_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    store_on(config, &Backplane::Redis(config.redis_url.clone()))
}

/// The store on `backplane`: Redis, or the embedded bus of the one-process cluster.
pub fn store_on(config: &Config, backplane: &Backplane) -> anyhow::Result<Arc<Store>> {
    let retention = Retention {
        stream_max_len: config.stream_max_len,
        stream_ttl: config.stream_ttl,
        lease: config.stream_lease,
        abandon_after: config.stream_abandon_after,
        history_max_turns: config.history_max_turns,
        history_ttl: config.stream_ttl.max(config.history_ttl),
    };
    Ok(Arc::new(Store::on(backplane, config.redis_connect_timeout, config.redis_command_timeout, retention)?))
}

/// Serves `node` on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop_serving = CancellationToken::new();
    let server = axum::serve(service_kit::http::no_delay(listener), api::router(node.clone()))
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    log::info!(
        "node_id={} draining: {} streams in flight, grace {:?}",
        node.config.node_id,
        node.in_flight(),
        node.config.shutdown_grace
    );
    node.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    node.tasks.close();
    if tokio::time::timeout(node.config.shutdown_grace, node.tasks.wait()).await.is_err() {
        log::warn!("grace period over: ending {} streams with an error event", node.in_flight());
        node.cancel.cancel();
        let _ = tokio::time::timeout(CANCEL_FLUSH, node.tasks.wait()).await;
    }
    stop_serving.cancel();
    server.await.map_err(std::io::Error::other)?
}
