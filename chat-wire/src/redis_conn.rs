//! A Redis command connection made on first use and kept afterwards, to one
//! Redis or to a Redis Cluster.
//!
//! redis-rs's `ConnectionManager` re-connects after a drop, but it cannot be
//! built while Redis is down; this wrapper builds it lazily, so a process that
//! starts before Redis serves as soon as Redis answers. Every call is bounded
//! by the command timeout, whatever redis-rs does.
//!
//! A URL `redis+cluster://host:port,host:port` (or `rediss+cluster://`) names
//! a Redis Cluster by some of its nodes: commands then go through redis-rs's
//! cluster connection, which follows the slot map (and its changes after a
//! failover) and sends each command to the master of its key's slot.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::OnceCell;

#[derive(Debug, Error)]
pub enum RedisError {
    #[error("redis is unreachable: {0}")]
    Unreachable(String),
    #[error("redis timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis answered with an error: {0}")]
    Command(redis::RedisError),
}

/// The seed node URLs of a `redis+cluster://a:1,b:2` (or `rediss+cluster://`)
/// URL; `None` for any other URL (one Redis).
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("+cluster://")?;
    if scheme != "redis" && scheme != "rediss" {
        return None;
    }
    // Userinfo (`user:pass@`) given once applies to every node.
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let nodes: Vec<String> =
        hosts.split(',').filter(|h| !h.trim().is_empty()).map(|h| format!("{scheme}://{auth}{}", h.trim())).collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster(url: &str) -> bool {
    cluster_nodes(url).is_some()
}

/// A cluster client for `nodes`, bounded by the given timeouts. `push` (with
/// RESP3) receives what subscriptions deliver; redis-rs subscribes again by
/// itself after a reconnection or a slot move.
pub fn cluster_client(
    nodes: Vec<String>,
    connect_timeout: Duration,
    command_timeout: Duration,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> redis::RedisResult<ClusterClient> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(connect_timeout)
        .response_timeout(command_timeout)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let Some(tx) = push {
        builder = builder.use_protocol(redis::ProtocolVersion::RESP3).push_sender(tx);
    }
    builder.build()
}

enum Target {
    Single { client: redis::Client, manager: OnceCell<ConnectionManager> },
    Cluster { client: ClusterClient, conn: OnceCell<ClusterConnection> },
}

pub struct RedisConn {
    target: Target,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl RedisConn {
    /// Fails only when `url` is not a Redis URL; nothing is connected yet.
    pub fn new(url: &str, connect_timeout: Duration, command_timeout: Duration) -> Result<Self, RedisError> {
        let target = match cluster_nodes(url) {
            Some(nodes) => Target::Cluster {
                client: cluster_client(nodes, connect_timeout, command_timeout, None).map_err(RedisError::Command)?,
                conn: OnceCell::new(),
            },
            None => Target::Single {
                client: redis::Client::open(url).map_err(RedisError::Command)?,
                manager: OnceCell::new(),
            },
        };
        Ok(RedisConn { target, connect_timeout, command_timeout })
    }

    /// Whether this is a Redis Cluster (no cross-slot scripts or `MULTI`,
    /// sharded pub/sub).
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    async fn connected<T: Clone, F: std::future::Future<Output = redis::RedisResult<T>>>(
        &self,
        cell: &OnceCell<T>,
        connect: impl FnOnce() -> F,
    ) -> Result<T, RedisError> {
        let limit = self.connect_timeout * 2;
        let conn = cell
            .get_or_try_init(|| async {
                match tokio::time::timeout(limit, connect()).await {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(RedisError::Unreachable(e.to_string())),
                    Err(_) => Err(RedisError::Timeout(limit)),
                }
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs a pipeline (one command or, on one Redis, a `MULTI` block)
    /// within the command timeout. On a cluster each command goes to its
    /// key's master.
    pub async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        let answer = match &self.target {
            Target::Single { client, manager } => {
                let mut conn = self
                    .connected(manager, || {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.connect_timeout))
                            .set_response_timeout(Some(self.command_timeout))
                            .set_number_of_retries(2)
                            .set_max_delay(Duration::from_millis(500));
                        client.get_connection_manager_with_config(config)
                    })
                    .await?;
                tokio::time::timeout(self.command_timeout, pipe.query_async::<T>(&mut conn)).await
            }
            Target::Cluster { client, conn } => {
                let mut conn = self.connected(conn, || client.get_async_connection()).await?;
                // The cluster connection may wait for a failover to finish
                // (its retries); the bound allows for that.
                tokio::time::timeout(self.command_timeout * 2, pipe.query_async::<T>(&mut conn)).await
            }
        };
        match answer {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(RedisError::Timeout(self.command_timeout)),
        }
    }
}

fn classify(e: redis::RedisError) -> RedisError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        RedisError::Unreachable(e.to_string())
    } else {
        RedisError::Command(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        assert_eq!(
            cluster_nodes("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/"),
            Some(vec!["redis://10.0.0.1:7000".to_owned(), "redis://10.0.0.2:7001".to_owned()])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p@a:1,b:2"),
            Some(vec!["rediss://u:p@a:1".to_owned(), "rediss://u:p@b:2".to_owned()])
        );
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), None);
        assert_eq!(cluster_nodes("redis+cluster://"), None);
        assert_eq!(cluster_nodes("http+cluster://a:1"), None);
    }
}
