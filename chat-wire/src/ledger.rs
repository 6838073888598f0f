//! The ledger of requests: who produces each request, at which epoch, and the
//! events produced so far. Backed by Redis or by the embedded bus.
//!
//! Ownership is fenced by an epoch. The first node claims a request at the
//! first epoch. A takeover first `fence`s the request (epoch + 1, one winner),
//! then the new node `adopt`s it at that epoch. Every event carries its producer's
//! epoch, and `emit` stores and publishes it only when that epoch is still
//! the request's: a slow old node can never interleave with its successor.
//! In Redis each of these is one Lua script, so the check and the writes are
//! atomic; the stream is written before the event is published.

use crate::embedded::{Backplane, EmbeddedBus};
use crate::redis_conn::{RedisConn, RedisError};
use crate::{keys, Event};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A request as claimed: what was asked, and who produces it at which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub session_id: String,
    pub message: String,
    pub user_id: Option<String>,
    /// The producing node's id (`takeover` between a fence and an adoption).
    pub node: String,
    pub epoch: u64,
}

/// What `emit` did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitted {
    Published,
    /// The event's epoch is no longer the request's: another producer owns it.
    Fenced,
}

const CLAIM: &str = r"
local holder = redis.call('HGET', KEYS[1], 'node')
if holder then return holder end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', 1, 'session', ARGV[2], 'message', ARGV[3], 'user', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return false
";

const FENCE: &str = r"
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return {0, epoch} end
redis.call('HSET', KEYS[1], 'epoch', epoch + 1, 'node', 'takeover')
return {1, epoch + 1}
";

const ADOPT: &str = r"
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'node', ARGV[2])
return 1
";

const EMIT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and ARGV[1] ~= '' and tonumber(epoch) ~= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'seq', ARGV[2], 'event', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if epoch then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
";

pub enum Ledger {
    Redis {
        /// Boxed: a connection is much larger than the embedded variant.
        conn: Box<RedisConn>,
        /// Approximate cap of a request's stream.
        max_len: usize,
        /// Lifetime of a stream and a claim after their last write.
        ttl: Duration,
    },
    Embedded(Arc<EmbeddedBus>),
}

impl Ledger {
    /// The ledger on `backplane`; Redis calls are bounded by the given timeouts.
    pub fn on(
        backplane: &Backplane,
        connect_timeout: Duration,
        command_timeout: Duration,
        max_len: usize,
        ttl: Duration,
    ) -> Result<Ledger, RedisError> {
        Ok(match backplane {
            Backplane::Redis(url) => {
                Ledger::Redis { conn: Box::new(RedisConn::new(url, connect_timeout, command_timeout)?), max_len, ttl }
            }
            Backplane::Embedded(bus) => Ledger::Embedded(bus.clone()),
        })
    }

    async fn script<T: redis::FromRedisValue>(
        conn: &RedisConn,
        source: &str,
        keys: &[String],
        args: Vec<String>,
    ) -> Result<T, RedisError> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("EVAL").arg(source).arg(keys.len());
        for k in keys {
            cmd.arg(k);
        }
        for a in args {
            cmd.arg(a);
        }
        let (value,): (T,) = conn.query(&pipe).await?;
        Ok(value)
    }

    /// Claims `request_id` for `record.node` at epoch 1; `Some(holder)` when it was claimed before.
    pub async fn claim(&self, request_id: &str, record: &RequestRecord) -> Result<Option<String>, RedisError> {
        match self {
            Ledger::Embedded(bus) => Ok(bus.claim(request_id, record)),
            Ledger::Redis { conn, ttl, .. } => {
                let args = vec![
                    record.node.clone(),
                    record.session_id.clone(),
                    record.message.clone(),
                    record.user_id.clone().unwrap_or_default(),
                    ttl.as_secs().to_string(),
                ];
                Self::script(conn, CLAIM, &[keys::request_claim(request_id)], args).await
            }
        }
    }

    /// Moves the request from epoch `expected` to the next; `Err(current)` when another got there first.
    pub async fn fence(&self, request_id: &str, expected: u64) -> Result<Result<u64, u64>, RedisError> {
        match self {
            Ledger::Embedded(bus) => Ok(bus.fence(request_id, expected)),
            Ledger::Redis { conn, .. } => {
                let (won, epoch): (i64, u64) =
                    Self::script(conn, FENCE, &[keys::request_claim(request_id)], vec![expected.to_string()]).await?;
                Ok(if won == 1 { Ok(epoch) } else { Err(epoch) })
            }
        }
    }

    /// Takes the request over at `epoch` for `node`; false when the epoch moved on.
    pub async fn adopt(&self, request_id: &str, epoch: u64, node: &str) -> Result<bool, RedisError> {
        match self {
            Ledger::Embedded(bus) => Ok(bus.adopt(request_id, epoch, node)),
            Ledger::Redis { conn, .. } => {
                let args = vec![epoch.to_string(), node.to_owned()];
                let adopted: i64 = Self::script(conn, ADOPT, &[keys::request_claim(request_id)], args).await?;
                Ok(adopted == 1)
            }
        }
    }

    /// Stores then publishes `event` on the session's channel, unless its epoch is stale.
    pub async fn emit(&self, session_id: &str, event: &Event) -> Result<Emitted, RedisError> {
        let published = match self {
            Ledger::Embedded(bus) => bus.emit(session_id, event),
            Ledger::Redis { conn, max_len, ttl } => {
                let args = vec![
                    event.epoch.map(|e| e.to_string()).unwrap_or_default(),
                    event.seq.to_string(),
                    event.to_json(),
                    keys::session_channel(session_id),
                    max_len.to_string(),
                    ttl.as_secs().to_string(),
                ];
                let keys = [keys::request_claim(&event.request_id), keys::request_stream(&event.request_id)];
                Self::script::<i64>(conn, EMIT, &keys, args).await? == 1
            }
        };
        Ok(if published { Emitted::Published } else { Emitted::Fenced })
    }

    /// The request's record; `None` when it was never claimed or has expired.
    pub async fn record(&self, request_id: &str) -> Result<Option<RequestRecord>, RedisError> {
        match self {
            Ledger::Embedded(bus) => Ok(bus.record(request_id)),
            Ledger::Redis { conn, .. } => {
                let mut pipe = redis::pipe();
                pipe.hgetall(keys::request_claim(request_id));
                let (fields,): (HashMap<String, String>,) = conn.query(&pipe).await?;
                let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
                if fields.is_empty() {
                    return Ok(None);
                }
                Ok(Some(RequestRecord {
                    session_id: get("session"),
                    message: get("message"),
                    user_id: Some(get("user")).filter(|u| !u.is_empty()),
                    node: get("node"),
                    epoch: get("epoch").parse().unwrap_or(0),
                }))
            }
        }
    }

    /// Every stored event of `request_id` in order; `None` when none is stored.
    pub async fn read(&self, request_id: &str) -> Result<Option<Vec<Event>>, RedisError> {
        let conn = match self {
            Ledger::Embedded(bus) => return Ok(bus.read(request_id)),
            Ledger::Redis { conn, .. } => conn,
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE").arg(keys::request_stream(request_id)).arg("-").arg("+");
        let (entries,): (Vec<(String, HashMap<String, String>)>,) = conn.query(&pipe).await?;
        if entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            entries.into_iter().filter_map(|(_, f)| f.get("event").and_then(|j| Event::from_json(j).ok())).collect(),
        ))
    }

    /// The Redis connection, for callers that keep more than the ledger there.
    pub fn redis(&self) -> Option<&RedisConn> {
        match self {
            Ledger::Redis { conn, .. } => Some(conn),
            Ledger::Embedded(_) => None,
        }
    }

    /// The embedded bus, when that is the backing store.
    pub fn embedded(&self) -> Option<&Arc<EmbeddedBus>> {
        match self {
            Ledger::Embedded(bus) => Some(bus),
            Ledger::Redis { .. } => None,
        }
    }

    /// Whether the backing store answers.
    pub async fn ping(&self) -> Result<(), RedisError> {
        match self {
            Ledger::Embedded(_) => Ok(()),
            Ledger::Redis { conn, .. } => {
                let mut pipe = redis::pipe();
                pipe.cmd("PING");
                conn.query::<(String,)>(&pipe).await.map(|_| ())
            }
        }
    }
}
