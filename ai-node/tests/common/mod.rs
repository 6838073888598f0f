//! The AI node's own harness: nodes in this process on free ports, and
//! subscribers of a session's events; the rest (Redis, polling, ports) is
//! the workspace's (`testkit`).
#![allow(dead_code, unused_imports)]

pub use testkit::{eventually, free_port, redis_url, stored_events, unique, OwnRedis};

use ai_node::config::{Config, EngineConfig, SyntheticConfig};
use ai_node::Node;
use chat_wire::{keys, Event};
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A configuration for a fast synthetic node on a free port.
pub fn fast_config(redis_url: &str, node_id: &str) -> Config {
    let mut config = Config::defaults();
    config.redis_url = redis_url.to_owned();
    config.node_id = node_id.to_owned();
    config.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.redis_connect_timeout = Duration::from_millis(500);
    config.redis_command_timeout = Duration::from_millis(500);
    config.shutdown_grace = Duration::from_millis(500);
    config.engine = EngineConfig::Synthetic(SyntheticConfig {
        first_token: Duration::from_millis(5),
        tokens_per_second: 0.0,
        answer_tokens: 12,
        refuse_ratio: 0.0,
        die_ratio: 0.0,
        tag: String::new(),
    });
    config
}

/// A node serving in this process on a real socket.
pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        let store = ai_node::redis_store(&config).unwrap();
        let engine = ai_node::engine::from_config(&config.engine).unwrap();
        let listener = tokio::net::TcpListener::bind(config.listen_addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = Node::new(config, store, engine);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(ai_node::run(listener, node.clone(), async move {
            let _ = stopped.await;
        }));
        TestNode { addr, node, stop: Some(stop), served: Some(served) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends the shutdown signal and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.served.take().unwrap().await.unwrap().unwrap();
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// A live subscription to one session's channel.
pub struct Subscriber {
    messages: futures::stream::BoxStream<'static, String>,
}

impl Subscriber {
    pub async fn session(redis_url: &str, session_id: &str) -> Subscriber {
        let client = redis::Client::open(redis_url).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(keys::session_channel(session_id)).await.unwrap();
        let messages = pubsub.into_on_message().map(|m| m.get_payload::<String>().unwrap()).boxed();
        Subscriber { messages }
    }

    /// The next event, or a panic after `within`.
    pub async fn next(&mut self, within: Duration) -> Event {
        let raw = tokio::time::timeout(within, self.messages.next())
            .await
            .expect("no event in time")
            .expect("subscription ended");
        Event::from_json(&raw).unwrap()
    }

    /// Every event of one request up to and including its terminal event.
    pub async fn until_end(&mut self, request_id: &str) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let e = self.next(Duration::from_secs(10)).await;
            if e.request_id != request_id {
                continue;
            }
            let end = e.is_terminal();
            events.push(e);
            if end {
                return events;
            }
        }
    }

    /// Asserts that nothing more arrives within `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Ok(Some(raw)) = tokio::time::timeout(quiet, self.messages.next()).await {
            panic!("unexpected event {raw}");
        }
    }
}
