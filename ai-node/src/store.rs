//! Where a node's output goes: the `EventStore` interface and its Redis
//! implementation.
//!
//! Every event is appended to the request's stream and then published on the
//! session's channel, in one `MULTI`/`EXEC`, so storage is never behind
//! pub/sub: a reader that replays the stream after seeing a live event finds
//! that event there. The interface exists so the one-command cluster can run
//! on an in-process store where no Redis exists.

use async_trait::async_trait;
use chat_wire::embedded::EmbeddedBus;
use chat_wire::redis_conn::RedisConn;
use chat_wire::{keys, Event};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The store's errors are Redis's: unreachable, timed out, or refused.
pub type StoreError = chat_wire::redis_conn::RedisError;

/// One turn of a conversation, as kept in the session's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// `user` or `assistant`, as in OpenAI's message roles.
    pub role: String,
    pub content: String,
}

/// The outcome of claiming a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node now owns the request and must generate it.
    Won,
    /// The request was already claimed (by the named node): it is a repeat.
    Taken(String),
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Claims `request_id` for `node_id`, so a repeated request id does not start a second generation.
    async fn claim(&self, request_id: &str, node_id: &str) -> Result<Claim, StoreError>;
    /// Appends `event` to its request's stream, then publishes it on the session's channel.
    async fn emit(&self, session_id: &str, event: &Event) -> Result<(), StoreError>;
    /// The session's recent turns, oldest first.
    async fn history(&self, session_id: &str) -> Result<Vec<Turn>, StoreError>;
    /// Appends turns to the session's history, keeping it bounded.
    async fn remember(&self, session_id: &str, turns: &[Turn]) -> Result<(), StoreError>;
    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Limits and lifetimes of what the store keeps.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Approximate cap of a request's stream (`XADD MAXLEN ~`).
    pub stream_max_len: usize,
    /// Lifetime of a stream and a claim, renewed by each event.
    pub stream_ttl: Duration,
    pub history_max_turns: usize,
    pub history_ttl: Duration,
}

/// The Redis store, on a connection made on first use (see `chat_wire::redis_conn`).
pub struct RedisStore {
    conn: RedisConn,
    retention: Retention,
}

impl RedisStore {
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        Ok(RedisStore { conn: RedisConn::new(url, connect_timeout, command_timeout)?, retention })
    }

    async fn run<T: redis::FromRedisValue>(&self, build: impl FnOnce(&mut redis::Pipeline)) -> Result<T, StoreError> {
        let mut pipe = redis::pipe();
        build(&mut pipe);
        self.conn.query(&pipe).await
    }
}

#[async_trait]
impl EventStore for RedisStore {
    async fn claim(&self, request_id: &str, node_id: &str) -> Result<Claim, StoreError> {
        let key = keys::request_claim(request_id);
        let ttl = self.retention.stream_ttl.as_secs();
        // SET NX GET: one round trip that either claims or tells who holds it.
        let (previous,): (Option<String>,) = self
            .run(|p| {
                p.cmd("SET").arg(&key).arg(node_id).arg("NX").arg("GET").arg("EX").arg(ttl);
            })
            .await?;
        Ok(match previous {
            None => Claim::Won,
            Some(holder) => Claim::Taken(holder),
        })
    }

    async fn emit(&self, session_id: &str, event: &Event) -> Result<(), StoreError> {
        let stream = keys::request_stream(&event.request_id);
        let claim = keys::request_claim(&event.request_id);
        let channel = keys::session_channel(session_id);
        let json = event.to_json();
        let ttl = self.retention.stream_ttl.as_secs() as i64;
        let max_len = self.retention.stream_max_len;
        let seq = event.seq;
        let () = self
            .run(|p| {
                p.atomic()
                    .cmd("XADD")
                    .arg(&stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max_len)
                    .arg("*")
                    .arg("seq")
                    .arg(seq)
                    .arg("event")
                    .arg(&json)
                    .ignore()
                    .expire(&stream, ttl)
                    .ignore()
                    .expire(&claim, ttl)
                    .ignore()
                    .publish(&channel, &json)
                    .ignore();
            })
            .await?;
        Ok(())
    }

    async fn history(&self, session_id: &str) -> Result<Vec<Turn>, StoreError> {
        let key = keys::session_history(session_id);
        let (items,): (Vec<String>,) = self
            .run(|p| {
                p.lrange(&key, 0, -1);
            })
            .await?;
        // A turn that does not parse was written by something else: skip it rather than fail the chat.
        Ok(items.iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    async fn remember(&self, session_id: &str, turns: &[Turn]) -> Result<(), StoreError> {
        if turns.is_empty() || self.retention.history_max_turns == 0 {
            return Ok(());
        }
        let key = keys::session_history(session_id);
        let items: Vec<String> = turns.iter().map(|t| serde_json::to_string(t).expect("a turn serializes")).collect();
        let keep = self.retention.history_max_turns as isize;
        let ttl = self.retention.history_ttl.as_secs() as i64;
        let () = self
            .run(|p| {
                p.atomic().rpush(&key, items).ignore().ltrim(&key, -keep, -1).ignore().expire(&key, ttl).ignore();
            })
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let (_pong,): (String,) = self
            .run(|p| {
                p.cmd("PING");
            })
            .await?;
        Ok(())
    }
}

/// The embedded store: the same contract on an in-process bus, for the
/// one-command cluster where no Redis exists.
pub struct EmbeddedStore {
    bus: Arc<EmbeddedBus>,
    retention: Retention,
}

impl EmbeddedStore {
    pub fn new(bus: Arc<EmbeddedBus>, retention: Retention) -> Self {
        EmbeddedStore { bus, retention }
    }
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn claim(&self, request_id: &str, node_id: &str) -> Result<Claim, StoreError> {
        Ok(match self.bus.claim(request_id, node_id) {
            None => Claim::Won,
            Some(holder) => Claim::Taken(holder),
        })
    }

    async fn emit(&self, session_id: &str, event: &Event) -> Result<(), StoreError> {
        self.bus.emit(session_id, event);
        Ok(())
    }

    async fn history(&self, session_id: &str) -> Result<Vec<Turn>, StoreError> {
        Ok(self.bus.history(session_id).iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    async fn remember(&self, session_id: &str, turns: &[Turn]) -> Result<(), StoreError> {
        let items = turns.iter().map(|t| serde_json::to_string(t).expect("a turn serializes")).collect();
        self.bus.remember(session_id, items, self.retention.history_max_turns, self.retention.history_ttl);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
