//! A Redis command connection made on first use and kept afterwards.
//!
//! redis-rs's `ConnectionManager` re-connects after a drop, but it cannot be
//! built while Redis is down; this wrapper builds it lazily, so a process that
//! starts before Redis serves as soon as Redis answers. Every call is bounded
//! by the command timeout, whatever redis-rs does.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
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

pub struct RedisConn {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl RedisConn {
    /// Fails only when `url` is not a Redis URL; nothing is connected yet.
    pub fn new(url: &str, connect_timeout: Duration, command_timeout: Duration) -> Result<Self, RedisError> {
        Ok(RedisConn {
            client: redis::Client::open(url).map_err(RedisError::Command)?,
            manager: OnceCell::new(),
            connect_timeout,
            command_timeout,
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn manager(&self) -> Result<ConnectionManager, RedisError> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let limit = self.connect_timeout * 2;
                match tokio::time::timeout(limit, self.client.get_connection_manager_with_config(config)).await {
                    Ok(Ok(m)) => Ok(m),
                    Ok(Err(e)) => Err(RedisError::Unreachable(e.to_string())),
                    Err(_) => Err(RedisError::Timeout(limit)),
                }
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs a pipeline (one command or a `MULTI` block) within the command timeout.
    pub async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        let mut conn = self.manager().await?;
        match tokio::time::timeout(self.command_timeout, pipe.query_async::<T>(&mut conn)).await {
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
