//! The `[redis]` section, the same in every service that talks to Redis.

use super::{Checker, Env, Spanned};
use crate::{default_sections, defaults};
use serde::Deserialize;
use std::time::Duration;

/// `[redis]` as written. `REDIS_URL` overrides `url`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `redis://`, `rediss://` or `unix://`; a Redis Cluster as
    /// `redis+cluster://host:port,host:port` (some of its nodes).
    #[serde(default = "default_url")]
    pub url: Spanned<String>,
    /// Deadline of one connection attempt.
    #[serde(default = "default_timeout")]
    pub connect_timeout: Spanned<String>,
    /// Old spelling of `connect_timeout`, in milliseconds.
    #[serde(default)]
    pub connect_timeout_ms: Option<Spanned<u64>>,
    /// Deadline of one command.
    #[serde(default = "default_timeout")]
    pub command_timeout: Spanned<String>,
    /// Old spelling of `command_timeout`, in milliseconds.
    #[serde(default)]
    pub command_timeout_ms: Option<Spanned<u64>>,
}

defaults! {
    default_url -> String = "redis://127.0.0.1:6379".into();
    default_timeout -> String = "2s".into();
}

default_sections!(RedisFile);

/// The checked `[redis]`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Where Redis is.
    pub url: String,
    /// Deadline of one connection attempt.
    pub connect_timeout: Duration,
    /// Deadline of one command.
    pub command_timeout: Duration,
}

impl RedisFile {
    /// Lays `REDIS_URL` over `url`.
    pub fn override_from(&mut self, c: &mut Checker<'_>, env: Env<'_>) {
        c.env_override(env, "REDIS_URL", "redis.url", &mut self.url);
    }

    /// Checks the section.
    pub fn check(&self, c: &mut Checker<'_>) -> RedisSettings {
        c.url_with_scheme(
            "redis.url",
            &self.url,
            &["redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://"],
        );
        RedisSettings {
            url: self.url.get_ref().clone(),
            connect_timeout: c.positive_ms("redis.connect_timeout", &self.connect_timeout, &self.connect_timeout_ms),
            command_timeout: c.positive_ms("redis.command_timeout", &self.command_timeout, &self.command_timeout_ms),
        }
    }
}
