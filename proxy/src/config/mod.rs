//! Configuration, on the machinery all three services share
//! (`service_kit::config`):
//!
//! - [`file`]: the TOML file's structs, the stable outer face, with defaults;
//! - [`overrides`]: the environment and command-line values laid over it;
//! - `check`: every value typed and checked into the [`Config`] below, which
//!   the rest of the proxy runs on.
//!
//! Precedence is defaults < file < environment < command line, applied in
//! one place, [`load`]. Unknown keys are rejected (`deny_unknown_fields`) and
//! every semantic problem is reported at once, each with the file, the key,
//! the line where TOML gives it (or the variable or flag that set it), and
//! the reason.

mod check;
pub mod file;
pub mod overrides;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use service_kit::config::Source;
pub use service_kit::config::{parse_duration, ConfigError, Problem};

pub use file::FileConfig;
pub use overrides::Overrides;

use crate::sticky::{Cidr, StickyKey};

pub use file::DEFAULT_GROUP;

/// The configuration the proxy runs on: every value typed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pingora server settings.
    pub server: ServerSettings,
    /// Where to listen.
    pub listen: Listeners,
    /// Per-client limits and timeouts.
    pub client: ClientSettings,
    /// What a client is pinned by.
    pub sticky: StickyKey,
    /// Idle lifetime of an upgraded connection.
    pub websocket_idle_timeout: Duration,
    /// Worker processes whose relay thread carries every worker's tunnels
    /// (at most `server.processes`; 0: each worker relays its own).
    pub websocket_relays: usize,
    /// Upstream groups, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, longest prefix first.
    pub routes: Vec<Route>,
}

/// Settings handed to Pingora's `ServerConf`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker processes: 1 serves in this process; more start a supervisor
    /// (see [`crate::workers`]).
    pub processes: usize,
    /// Worker threads (per process).
    pub threads: usize,
    /// One shared work-stealing runtime, or one runtime per thread.
    pub work_stealing: bool,
    /// Plain HTTP/1.1 on the lean path (see [`crate::h1`]).
    pub fast_path: bool,
    /// Bound on retries after a failed connect.
    pub max_retries: usize,
    /// Time listeners keep serving after SIGTERM.
    pub grace_period: Duration,
    /// Bound on the drain after the grace period.
    pub shutdown_timeout: Duration,
    /// Idle upstream connections pooled.
    pub upstream_keepalive_pool: usize,
    /// Pid file path.
    pub pid_file: String,
    /// Listener hand-over socket for the graceful upgrade.
    pub upgrade_sock: String,
}

/// Listening addresses.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// Public plain-HTTP address.
    pub public: SocketAddr,
    /// Status address.
    pub status: SocketAddr,
    /// Optional public TLS listener.
    pub tls: Option<TlsListener>,
}

/// A TLS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

/// What a downstream client may do.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Peers whose connections start with a PROXY protocol header (v1 or
    /// v2) naming the client; a connection from one without it is closed.
    pub proxy_protocol_from: Vec<Cidr>,
    /// Deadline for a whole request header.
    pub header_timeout: Duration,
    /// Longest pause while reading a body.
    pub body_timeout: Duration,
    /// Idle time between requests on one connection.
    pub keepalive_timeout: Duration,
    /// Largest body accepted.
    pub max_body_bytes: u64,
    /// Largest request head accepted (431 past it).
    pub max_header_bytes: usize,
    /// Open connections allowed.
    pub max_connections: usize,
    /// Requests per second per client IP; 0 is unlimited.
    pub requests_per_second: u32,
    /// Read buffer per client connection (bytes; 0: unbuffered).
    pub read_buffer: usize,
    /// Write buffer per client connection (bytes; 0: unbuffered).
    pub write_buffer: usize,
}

/// One upstream group.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Group name, used by routes and in metrics.
    pub name: String,
    /// `host:port` of each backend, as written (resolved at discovery).
    pub servers: Vec<String>,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Response read timeout.
    pub read_timeout: Duration,
    /// Failures within `fail_timeout` that take a backend out; 0 disables.
    pub max_fails: u32,
    /// Failure window and time out.
    pub fail_timeout: Duration,
    /// Re-resolution period of server names.
    pub resolve_interval: Duration,
    /// Active health check.
    pub health: HealthConfig,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Path requested.
    pub path: String,
    /// Period.
    pub interval: Duration,
    /// Deadline of one check.
    pub timeout: Duration,
    /// Passes to come in.
    pub rise: u32,
    /// Failures to go out.
    pub fall: u32,
}

/// A path-prefix route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Prefix matched against the request path.
    pub prefix: String,
    /// Group name.
    pub upstream: String,
}

impl Config {
    /// The group a path routes to, by longest matching prefix.
    pub fn route(&self, path: &str) -> Option<&str> {
        self.routes.iter().find(|r| path.starts_with(&r.prefix)).map(|r| r.upstream.as_str())
    }
}

/// Reads, parses, overrides and checks a configuration file.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    check::check(&Source::read(Some(path))?, overrides)
}

/// Parses and checks configuration text; `file` names it in errors.
pub fn parse(file: &str, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    check::check(&Source::new(file, text), overrides)
}
