//! Where a node's output goes: the request ledger (claims, epochs, fenced
//! events; see `chat_wire::ledger`) and the sessions' conversation history,
//! on Redis or on the embedded bus of the one-process cluster.

use chat_wire::ledger::Backplane;
use chat_wire::ledger::{Emitted, Ledger, Renewal, RequestRecord};
use chat_wire::Event;
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

/// Limits and lifetimes of what the store keeps.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Approximate cap of a request's stream (`XADD MAXLEN ~`).
    pub stream_max_len: usize,
    /// Lifetime of a stream and a claim, renewed by each event.
    pub stream_ttl: Duration,
    /// The producer's lease on a request (see `chat_wire::ledger`).
    pub lease: Duration,
    /// A request no reader followed for this long is cancelled (zero: never).
    pub abandon_after: Duration,
    pub history_max_turns: usize,
    pub history_ttl: Duration,
}

pub struct Store {
    ledger: Arc<dyn Ledger>,
    retention: Retention,
}

impl Store {
    pub fn on(
        backplane: &Backplane,
        connect_timeout: Duration,
        command_timeout: Duration,
        retention: Retention,
    ) -> Result<Store, StoreError> {
        let ledger = chat_wire::ledger::on(
            backplane,
            connect_timeout,
            command_timeout,
            retention.stream_max_len,
            retention.stream_ttl,
        )?;
        Ok(Store { ledger, retention })
    }

    /// Claims a request, so a repeated request id does not start a second generation.
    pub async fn claim(&self, request_id: &str, record: &RequestRecord) -> Result<Claim, StoreError> {
        Ok(match self.ledger.claim(request_id, record, self.retention.lease).await? {
            None => Claim::Won,
            Some(holder) => Claim::Taken(holder),
        })
    }

    /// Takes over a request fenced at `epoch` by a backend.
    pub async fn adopt(&self, request_id: &str, epoch: u64, node_id: &str) -> Result<bool, StoreError> {
        self.ledger.adopt(request_id, epoch, node_id, self.retention.lease).await
    }

    /// Renews this producer's lease: `Lost` when it was fenced off,
    /// `Cancelled` when it must end the request as cancelled.
    pub async fn renew(&self, request_id: &str, epoch: u64, node_id: &str) -> Result<Renewal, StoreError> {
        self.ledger.renew(request_id, epoch, node_id, self.retention.lease, self.retention.abandon_after).await
    }

    /// The lease, which the producer renews every third of.
    pub fn lease(&self) -> Duration {
        self.retention.lease
    }

    /// Most events one answer may store: the stream keeps them all, so a
    /// late reader or a takeover always finds the whole answer.
    pub fn max_events(&self) -> u64 {
        self.retention.stream_max_len as u64
    }

    /// Stores then publishes an event, unless a takeover fenced this producer off.
    pub async fn emit(&self, session_id: &str, event: &Event) -> Result<Emitted, StoreError> {
        self.ledger.emit(session_id, event).await
    }

    /// The session's recent turns, oldest first. A turn that does not parse is skipped.
    pub async fn history(&self, session_id: &str) -> Result<Vec<Turn>, StoreError> {
        let items = self.ledger.history(session_id).await?;
        Ok(items.iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    /// Appends turns to the session's history, keeping it bounded.
    pub async fn remember(&self, session_id: &str, turns: &[Turn]) -> Result<(), StoreError> {
        let keep = self.retention.history_max_turns;
        if turns.is_empty() || keep == 0 {
            return Ok(());
        }
        let items: Vec<String> = turns.iter().map(|t| serde_json::to_string(t).expect("a turn serializes")).collect();
        self.ledger.remember(session_id, items, keep, self.retention.history_ttl).await
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.ledger.ping().await
    }
}
