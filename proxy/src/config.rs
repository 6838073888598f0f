//! Configuration: the TOML file's structs (the stable outer face), the
//! environment and command-line overrides, and the checked [`Config`] the
//! rest of the proxy runs on.
//!
//! Precedence is defaults < file < environment < command line, applied in
//! one place, [`load`]. Unknown keys are rejected (`deny_unknown_fields`) and
//! every semantic problem is reported at once, each with the file, the key,
//! the line where TOML gives it, and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::sticky::{Cidr, StickyKey};

/// Name of the upstream group that `PROXY_BACKENDS` replaces, and that the
/// default routes point at.
pub const DEFAULT_GROUP: &str = "backends";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file named on the command line.
        file: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the
    /// wrong type (toml's message carries the line and column).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// toml's message, with line, column and the offending key.
        message: String,
    },
    /// The file parsed but some values are unusable; every one is listed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One unusable value: where it came from, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, or the environment variable / flag that set the value.
    pub origin: String,
    /// 1-based line of the value in the file, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `upstreams.backends.servers`.
    pub key: String,
    /// Lowercase reason carrying the bad value.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.origin, line, self.key, self.reason),
            None => write!(f, "{}: {}: {}", self.origin, self.key, self.reason),
        }
    }
}

// ---------------------------------------------------------------------------
// File structs: what users write.

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Process settings handed to Pingora's server.
    #[serde(default)]
    pub server: FileServer,
    /// Listening addresses.
    #[serde(default)]
    pub listen: FileListen,
    /// What a downstream client may do.
    #[serde(default)]
    pub client: FileClient,
    /// How a client is pinned to a backend.
    #[serde(default)]
    pub sticky: FileSticky,
    /// Upgraded (WebSocket) connections.
    #[serde(default)]
    pub websocket: FileWebsocket,
    /// Upstream groups by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, FileUpstream>,
    /// Path-prefix routes; longest prefix wins.
    #[serde(default = "default_routes")]
    pub routes: Vec<FileRoute>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    /// Worker threads of the proxy service.
    #[serde(default = "default_threads")]
    pub threads: Spanned<usize>,
    /// One work-stealing runtime for all threads (true), or one runtime per
    /// thread, each serving its own connections like an nginx worker (false).
    #[serde(default = "default_work_stealing")]
    pub work_stealing: bool,
    /// Serve plain-HTTP requests on the proxy's own lean HTTP/1.1 path
    /// (true), or every request on Pingora's proxy framework (false).
    #[serde(default = "default_fast_path")]
    pub fast_path: bool,
    /// Extra attempts on the next backend of the ring after a failed connect.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// After SIGTERM, how long listeners keep serving before the drain starts.
    #[serde(default = "default_grace_period")]
    pub grace_period: Spanned<String>,
    /// Upper bound on the drain of in-flight requests after the grace period.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Spanned<String>,
    /// Idle upstream connections kept for reuse.
    #[serde(default = "default_keepalive_pool")]
    pub upstream_keepalive_pool: usize,
    /// Pid file (for `kill -QUIT $(cat ...)` in the graceful upgrade).
    #[serde(default = "default_pid_file")]
    pub pid_file: String,
    /// Unix socket over which the old process hands its listeners to the new.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
}

/// `[listen]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    /// Public plain-HTTP listener.
    #[serde(default = "default_public")]
    pub public: Spanned<String>,
    /// Status listener (`/nginx-status`, `/metrics`, `/upstreams`).
    #[serde(default = "default_status")]
    pub status: Spanned<String>,
    /// Optional public TLS listener.
    pub tls: Option<FileTls>,
}

/// `[listen.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// Address of the TLS listener.
    pub addr: Spanned<String>,
    /// PEM certificate chain.
    pub cert: Spanned<String>,
    /// PEM private key.
    pub key: Spanned<String>,
}

/// `[client]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileClient {
    /// CIDRs whose `X-Forwarded-For` / `X-Real-IP` are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Whole request header must arrive within this.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Spanned<String>,
    /// Longest pause between two reads of a request body.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Spanned<String>,
    /// Idle time allowed between two requests on one connection.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Spanned<String>,
    /// Largest request body accepted.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers) accepted.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Spanned<usize>,
    /// Open client connections allowed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<usize>,
    /// Requests per second one client IP may make; 0 turns the limit off.
    #[serde(default)]
    pub requests_per_second: u32,
    /// Read buffer of each client connection, in bytes.
    #[serde(default = "default_read_buffer")]
    pub read_buffer: Spanned<usize>,
    /// Write buffer of each client connection, in bytes.
    #[serde(default = "default_write_buffer")]
    pub write_buffer: Spanned<usize>,
}

/// `[sticky]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    /// `ip`, `ip24`, `header:<name>` or `cookie:<name>`.
    #[serde(default = "default_sticky_key")]
    pub key: Spanned<String>,
}

/// `[websocket]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWebsocket {
    /// An upgraded connection silent this long on both sides is closed.
    #[serde(default = "default_ws_idle")]
    pub idle_timeout: Spanned<String>,
}

/// `[upstreams.<name>]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// `host:port` of each backend.
    pub servers: Spanned<Vec<Spanned<String>>>,
    /// Connect timeout per attempt.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<String>,
    /// Longest wait for (a piece of) the backend's response.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Spanned<String>,
    /// Passive check: failures within `fail_timeout` that take a backend out.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// Passive check: the failure window, and how long the backend stays out.
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: Spanned<String>,
    /// How often server names are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Spanned<String>,
    /// Active health check.
    #[serde(default)]
    pub health: FileHealth,
}

/// `[upstreams.<name>.health]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    /// Path requested with GET; 200 means healthy.
    #[serde(default = "default_health_path")]
    pub path: Spanned<String>,
    /// Time between two checks of a backend.
    #[serde(default = "default_health_interval")]
    pub interval: Spanned<String>,
    /// Deadline of one check.
    #[serde(default = "default_health_timeout")]
    pub timeout: Spanned<String>,
    /// Consecutive passes that bring a backend in.
    #[serde(default = "default_rise")]
    pub rise: Spanned<u32>,
    /// Consecutive failures that take a backend out.
    #[serde(default = "default_fall")]
    pub fall: Spanned<u32>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// Path prefix, starting with `/`.
    pub prefix: Spanned<String>,
    /// Name of an `[upstreams.<name>]` group.
    pub upstream: Spanned<String>,
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}
fn s(value: &str) -> Spanned<String> {
    unspanned(value.to_string())
}
fn default_work_stealing() -> bool {
    true
}

fn default_fast_path() -> bool {
    true
}

fn default_threads() -> Spanned<usize> {
    unspanned(2)
}
fn default_max_retries() -> usize {
    2
}
fn default_grace_period() -> Spanned<String> {
    s("1s")
}
fn default_shutdown_timeout() -> Spanned<String> {
    s("5s")
}
fn default_keepalive_pool() -> usize {
    128
}
fn default_pid_file() -> String {
    "/tmp/proxy.pid".into()
}
fn default_upgrade_sock() -> String {
    "/tmp/proxy_upgrade.sock".into()
}
fn default_public() -> Spanned<String> {
    s("0.0.0.0:8080")
}
fn default_status() -> Spanned<String> {
    s("127.0.0.1:8090")
}
fn default_header_timeout() -> Spanned<String> {
    s("10s")
}
fn default_body_timeout() -> Spanned<String> {
    s("30s")
}
fn default_keepalive_timeout() -> Spanned<String> {
    s("60s")
}
/// Largest connection buffer accepted.
const MAX_BUFFER: usize = 1 << 20;

fn default_read_buffer() -> Spanned<usize> {
    unspanned(64 * 1024)
}

/// Larger than Pingora's 1460: a response header and a body of up to
/// about 16 KB with a known length go out in one write, not two.
fn default_write_buffer() -> Spanned<usize> {
    unspanned(16 * 1024)
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
fn default_max_header_bytes() -> Spanned<usize> {
    unspanned(32 * 1024)
}
/// The lean path reads heads of up to 16 KiB itself: a smaller limit would
/// have to be checked there too.
const MIN_HEADER_BYTES: usize = 16 * 1024;
fn default_max_connections() -> Spanned<usize> {
    unspanned(10_000)
}
fn default_sticky_key() -> Spanned<String> {
    s("ip")
}
fn default_ws_idle() -> Spanned<String> {
    s("1h")
}
fn default_connect_timeout() -> Spanned<String> {
    s("2s")
}
fn default_read_timeout() -> Spanned<String> {
    s("60s")
}
fn default_max_fails() -> u32 {
    3
}
fn default_fail_timeout() -> Spanned<String> {
    s("10s")
}
fn default_resolve_interval() -> Spanned<String> {
    s("30s")
}
fn default_health_path() -> Spanned<String> {
    s("/health")
}
fn default_health_interval() -> Spanned<String> {
    s("2s")
}
fn default_health_timeout() -> Spanned<String> {
    s("1s")
}
fn default_rise() -> Spanned<u32> {
    unspanned(1)
}
fn default_fall() -> Spanned<u32> {
    unspanned(2)
}
fn default_upstreams() -> BTreeMap<String, FileUpstream> {
    let group = FileUpstream {
        servers: unspanned(vec![s("127.0.0.1:3000")]),
        connect_timeout: default_connect_timeout(),
        read_timeout: default_read_timeout(),
        max_fails: default_max_fails(),
        fail_timeout: default_fail_timeout(),
        resolve_interval: default_resolve_interval(),
        health: FileHealth::default(),
    };
    BTreeMap::from([(DEFAULT_GROUP.to_string(), group)])
}
fn default_routes() -> Vec<FileRoute> {
    ["/api/", "/ws/", "/"]
        .into_iter()
        .map(|prefix| FileRoute { prefix: s(prefix), upstream: s(DEFAULT_GROUP) })
        .collect()
}

impl Default for FileServer {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            work_stealing: default_work_stealing(),
            fast_path: default_fast_path(),
            max_retries: default_max_retries(),
            grace_period: default_grace_period(),
            shutdown_timeout: default_shutdown_timeout(),
            upstream_keepalive_pool: default_keepalive_pool(),
            pid_file: default_pid_file(),
            upgrade_sock: default_upgrade_sock(),
        }
    }
}
impl Default for FileListen {
    fn default() -> Self {
        Self { public: default_public(), status: default_status(), tls: None }
    }
}
impl Default for FileClient {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            max_body_bytes: default_max_body_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            requests_per_second: 0,
            read_buffer: default_read_buffer(),
            write_buffer: default_write_buffer(),
        }
    }
}
impl Default for FileSticky {
    fn default() -> Self {
        Self { key: default_sticky_key() }
    }
}
impl Default for FileWebsocket {
    fn default() -> Self {
        Self { idle_timeout: default_ws_idle() }
    }
}
impl Default for FileHealth {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

// ---------------------------------------------------------------------------
// Overrides: environment and command line.

/// Values that replace the file's; each remembers who set it, for errors.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces `listen.public`.
    pub listen: Option<(String, String)>,
    /// Replaces `listen.status`.
    pub status_listen: Option<(String, String)>,
    /// Replaces `upstreams.backends.servers` (comma-separated `host:port`).
    pub backends: Option<(String, String)>,
}

impl Overrides {
    /// Reads `PROXY_LISTEN`, `PROXY_STATUS_LISTEN` and `PROXY_BACKENDS`.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (v, format!("environment {name}")))
        };
        Self { listen: var("PROXY_LISTEN"), status_listen: var("PROXY_STATUS_LISTEN"), backends: var("PROXY_BACKENDS") }
    }

    /// Layers `other` on top of `self` (other wins where set).
    pub fn then(self, other: Overrides) -> Overrides {
        Overrides {
            listen: other.listen.or(self.listen),
            status_listen: other.status_listen.or(self.status_listen),
            backends: other.backends.or(self.backends),
        }
    }
}

// ---------------------------------------------------------------------------
// Checked configuration.

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
    /// Upstream groups, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, longest prefix first.
    pub routes: Vec<Route>,
}

/// Settings handed to Pingora's `ServerConf`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads.
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
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    parse(&file, &text, overrides)
}

/// Parses and checks configuration text; `file` names it in errors.
pub fn parse(file: &str, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let raw: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_string(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    Checker::new(file, text, overrides).check(raw)
}

/// Collects problems while converting file structs into [`Config`].
struct Checker<'a> {
    /// File name for errors.
    file: &'a str,
    /// File text, to turn spans into lines.
    text: &'a str,
    /// Overrides to apply.
    overrides: &'a Overrides,
    /// Every problem found so far.
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn new(file: &'a str, text: &'a str, overrides: &'a Overrides) -> Self {
        Self { file, text, overrides, problems: Vec::new() }
    }

    fn line_of<T>(&self, value: &Spanned<T>) -> Option<usize> {
        let span = value.span();
        if span == (0..0) {
            return None;
        }
        Some(self.text[..span.start.min(self.text.len())].matches('\n').count() + 1)
    }

    fn problem<T>(&mut self, key: &str, at: &Spanned<T>, reason: String) {
        let line = self.line_of(at);
        self.problems.push(Problem { origin: self.file.to_string(), line, key: key.to_string(), reason });
    }

    fn duration(&mut self, key: &str, value: &Spanned<String>) -> Duration {
        match parse_duration(value.get_ref()) {
            Ok(d) => d,
            Err(reason) => {
                self.problem(key, value, reason);
                Duration::ZERO
            }
        }
    }

    fn positive_duration(&mut self, key: &str, value: &Spanned<String>) -> Duration {
        let d = self.duration(key, value);
        if d.is_zero() && parse_duration(value.get_ref()).is_ok() {
            self.problem(key, value, "must be greater than zero".into());
        }
        d
    }

    fn socket_addr(&mut self, key: &str, value: &Spanned<String>, origin: Option<&str>) -> SocketAddr {
        match value.get_ref().trim().parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                let reason = format!("{:?} is not an ip:port address", value.get_ref());
                match origin {
                    Some(origin) => self.problems.push(Problem {
                        origin: origin.to_string(),
                        line: None,
                        key: key.to_string(),
                        reason,
                    }),
                    None => self.problem(key, value, reason),
                }
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    }

    fn check(mut self, mut raw: FileConfig) -> Result<Config, ConfigError> {
        let overrides = self.overrides;
        // Overrides replace file values before checking, so they are checked alike.
        let listen_origin = overrides.listen.as_ref().map(|(v, origin)| {
            raw.listen.public = unspanned(v.clone());
            origin.as_str()
        });
        let status_origin = overrides.status_listen.as_ref().map(|(v, origin)| {
            raw.listen.status = unspanned(v.clone());
            origin.as_str()
        });
        let mut backends_origin = None;
        if let Some((v, origin)) = &overrides.backends {
            let servers: Vec<_> =
                v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|x| unspanned(x.to_string())).collect();
            match raw.upstreams.get_mut(DEFAULT_GROUP) {
                Some(group) => group.servers = unspanned(servers),
                None => {
                    let mut group = default_upstreams().remove(DEFAULT_GROUP).expect("default group");
                    group.servers = unspanned(servers);
                    raw.upstreams.insert(DEFAULT_GROUP.to_string(), group);
                }
            }
            backends_origin = Some(origin.as_str());
        }

        let server = ServerSettings {
            threads: {
                if *raw.server.threads.get_ref() == 0 {
                    self.problem("server.threads", &raw.server.threads, "must be at least 1".into());
                }
                *raw.server.threads.get_ref()
            },
            work_stealing: raw.server.work_stealing,
            fast_path: raw.server.fast_path,
            max_retries: raw.server.max_retries,
            grace_period: self.duration("server.grace_period", &raw.server.grace_period),
            shutdown_timeout: self.duration("server.shutdown_timeout", &raw.server.shutdown_timeout),
            upstream_keepalive_pool: raw.server.upstream_keepalive_pool,
            pid_file: raw.server.pid_file,
            upgrade_sock: raw.server.upgrade_sock,
        };

        let tls = raw.listen.tls.as_ref().map(|tls| TlsListener {
            addr: self.socket_addr("listen.tls.addr", &tls.addr, None),
            cert: self.existing_file("listen.tls.cert", &tls.cert),
            key: self.existing_file("listen.tls.key", &tls.key),
        });
        let listen = Listeners {
            public: self.socket_addr("listen.public", &raw.listen.public, listen_origin),
            status: self.socket_addr("listen.status", &raw.listen.status, status_origin),
            tls,
        };

        let mut trusted_proxies = Vec::new();
        for (i, cidr) in raw.client.trusted_proxies.iter().enumerate() {
            match cidr.get_ref().parse::<Cidr>() {
                Ok(c) => trusted_proxies.push(c),
                Err(reason) => self.problem(&format!("client.trusted_proxies[{i}]"), cidr, reason),
            }
        }
        let header_bytes = &raw.client.max_header_bytes;
        if !(MIN_HEADER_BYTES..=1 << 20).contains(header_bytes.get_ref()) {
            let why = format!("must be between {MIN_HEADER_BYTES} and {} bytes", 1 << 20);
            self.problem("client.max_header_bytes", header_bytes, why);
        }
        if *raw.client.max_connections.get_ref() == 0 {
            self.problem("client.max_connections", &raw.client.max_connections, "must be at least 1".into());
        }
        for (key, value) in
            [("client.read_buffer", &raw.client.read_buffer), ("client.write_buffer", &raw.client.write_buffer)]
        {
            if *value.get_ref() > MAX_BUFFER {
                self.problem(key, value, format!("must be at most {MAX_BUFFER} bytes"));
            }
        }
        let client = ClientSettings {
            trusted_proxies,
            header_timeout: self.positive_duration("client.header_timeout", &raw.client.header_timeout),
            body_timeout: self.positive_duration("client.body_timeout", &raw.client.body_timeout),
            keepalive_timeout: self.duration("client.keepalive_timeout", &raw.client.keepalive_timeout),
            max_body_bytes: raw.client.max_body_bytes,
            max_header_bytes: *raw.client.max_header_bytes.get_ref(),
            max_connections: *raw.client.max_connections.get_ref(),
            requests_per_second: raw.client.requests_per_second,
            read_buffer: *raw.client.read_buffer.get_ref(),
            write_buffer: *raw.client.write_buffer.get_ref(),
        };

        let sticky = match raw.sticky.key.get_ref().parse::<StickyKey>() {
            Ok(k) => k,
            Err(reason) => {
                self.problem("sticky.key", &raw.sticky.key, reason);
                StickyKey::Ip
            }
        };
        let websocket_idle_timeout = self.positive_duration("websocket.idle_timeout", &raw.websocket.idle_timeout);

        let mut upstreams = Vec::new();
        for (name, group) in &raw.upstreams {
            upstreams.push(self.upstream(name, group, backends_origin.filter(|_| name == DEFAULT_GROUP)));
        }
        if raw.upstreams.is_empty() {
            self.problems.push(Problem {
                origin: self.file.to_string(),
                line: None,
                key: "upstreams".into(),
                reason: "no upstream servers: the file defines no [upstreams] group (is it empty or cut off?) \
                         and neither PROXY_BACKENDS nor --backends names any"
                    .into(),
            });
        }

        let mut routes = Vec::new();
        for (i, route) in raw.routes.iter().enumerate() {
            let prefix = route.prefix.get_ref();
            if !prefix.starts_with('/') {
                self.problem(&format!("routes[{i}].prefix"), &route.prefix, format!("{prefix:?} must start with '/'"));
            }
            if !raw.upstreams.contains_key(route.upstream.get_ref()) {
                self.problem(
                    &format!("routes[{i}].upstream"),
                    &route.upstream,
                    format!("{:?} is not a group under [upstreams]", route.upstream.get_ref()),
                );
            }
            routes.push(Route { prefix: prefix.clone(), upstream: route.upstream.get_ref().clone() });
        }
        // Longest prefix first, so the first match is the most specific.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        if !self.problems.is_empty() {
            return Err(ConfigError::Invalid(self.problems));
        }
        Ok(Config { server, listen, client, sticky, websocket_idle_timeout, upstreams, routes })
    }

    fn existing_file(&mut self, key: &str, value: &Spanned<String>) -> PathBuf {
        let path = PathBuf::from(value.get_ref());
        if !path.is_file() {
            self.problem(key, value, format!("{:?} is not a readable file", value.get_ref()));
        }
        path
    }

    fn upstream(&mut self, name: &str, raw: &FileUpstream, servers_origin: Option<&str>) -> UpstreamConfig {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        let mut servers = Vec::new();
        if raw.servers.get_ref().is_empty() {
            let reason = "is empty: a group needs at least one server".to_string();
            match servers_origin {
                Some(origin) => {
                    self.problems.push(Problem { origin: origin.to_string(), line: None, key: key("servers"), reason })
                }
                None => self.problem(&key("servers"), &raw.servers, reason),
            }
        }
        for (i, server) in raw.servers.get_ref().iter().enumerate() {
            match check_server(server.get_ref()) {
                Ok(()) => servers.push(server.get_ref().trim().to_string()),
                Err(reason) => match servers_origin {
                    Some(origin) => self.problems.push(Problem {
                        origin: origin.to_string(),
                        line: None,
                        key: format!("{}[{i}]", key("servers")),
                        reason,
                    }),
                    None => self.problem(&format!("{}[{i}]", key("servers")), server, reason),
                },
            }
        }
        let health = &raw.health;
        if !health.path.get_ref().starts_with('/') {
            self.problem(&key("health.path"), &health.path, format!("{:?} must start with '/'", health.path.get_ref()));
        }
        for (k, v) in [("health.rise", &health.rise), ("health.fall", &health.fall)] {
            if *v.get_ref() == 0 {
                self.problem(&key(k), v, "must be at least 1".into());
            }
        }
        UpstreamConfig {
            name: name.to_string(),
            servers,
            connect_timeout: self.positive_duration(&key("connect_timeout"), &raw.connect_timeout),
            read_timeout: self.positive_duration(&key("read_timeout"), &raw.read_timeout),
            max_fails: raw.max_fails,
            fail_timeout: self.positive_duration(&key("fail_timeout"), &raw.fail_timeout),
            resolve_interval: self.positive_duration(&key("resolve_interval"), &raw.resolve_interval),
            health: HealthConfig {
                path: health.path.get_ref().clone(),
                interval: self.positive_duration(&key("health.interval"), &health.interval),
                timeout: self.positive_duration(&key("health.timeout"), &health.timeout),
                rise: *health.rise.get_ref(),
                fall: *health.fall.get_ref(),
            },
        }
    }
}

/// Checks `host:port` syntax; names are resolved later, at discovery.
fn check_server(server: &str) -> Result<(), String> {
    let server = server.trim();
    if server.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err(format!("{server:?} is not a host:port address"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{server:?} has a bad port {port:?}")),
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !host.starts_with(['-', '.']);
    // A host of digits and dots that did not parse as an address is a bad IP.
    let looks_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !valid_host || looks_numeric {
        return Err(format!("{server:?} has a bad host {host:?}"));
    }
    Ok(())
}

/// Parses `250ms`, `10s`, `5m`, `1h` (and `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 10s, 5m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(|| format!("{text:?} is too long"))?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(|| format!("{text:?} is too long"))?),
        _ => return Err(format!("{text:?} is not a duration like 500ms, 10s, 5m or 1h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match parse("t.toml", text, &Overrides::default()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// The least a file must say: where to send requests.
    const SERVERS: &str = "[upstreams.backends]\nservers = [\"127.0.0.1:3000\"]\n";

    #[test]
    fn an_empty_or_cut_off_file_is_an_error() {
        for text in ["", "\n# nothing\n", "[server]\nthreads = 2\n", "[upstreams.backends]\nservers = [\"127.0.0.1:30"]
        {
            assert!(parse("t.toml", text, &Overrides::default()).is_err(), "{text:?}");
        }
        assert_eq!(problems("")[0].key, "upstreams");
        // The servers may come from the environment or a flag instead.
        let overrides =
            Overrides { backends: Some(("127.0.0.1:3000".into(), "flag --backends".into())), ..Default::default() };
        assert!(parse("t.toml", "", &overrides).is_ok());
    }

    #[test]
    fn a_file_naming_only_its_servers_gets_defaults() {
        let c = parse("t.toml", SERVERS, &Overrides::default()).unwrap();
        assert_eq!(c.listen.public, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.listen.status, "127.0.0.1:8090".parse().unwrap());
        assert_eq!(c.route("/api/chat"), Some("backends"));
        assert_eq!(c.route("/ws/chat"), Some("backends"));
        assert_eq!(c.route("/"), Some("backends"));
        assert_eq!(c.sticky, StickyKey::Ip);
    }

    #[test]
    fn unknown_key_is_rejected_with_line() {
        let err = parse("t.toml", "[listen]\npublik = \"1.2.3.4:5\"\n", &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("t.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("publik"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported_with_key_and_line() {
        let p = problems(
            "[listen]\npublic = \"nope\"\n[upstreams.backends]\nservers = []\n[websocket]\nidle_timeout = \"3 days\"\n",
        );
        let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(keys.contains(&("listen.public", Some(2))), "{keys:?}");
        assert!(keys.contains(&("upstreams.backends.servers", Some(4))), "{keys:?}");
        assert!(keys.contains(&("websocket.idle_timeout", Some(6))), "{keys:?}");
    }

    #[test]
    fn runtime_and_buffer_settings_are_read_and_bounded() {
        let c = parse("t.toml", SERVERS, &Overrides::default()).unwrap();
        assert!(c.server.work_stealing && c.server.fast_path);
        assert_eq!((c.client.read_buffer, c.client.write_buffer), (65536, 16384));

        let text = format!(
            "[server]\nwork_stealing = false\nfast_path = false\n[client]\nread_buffer = 0\nwrite_buffer = 1024\n{SERVERS}"
        );
        let c = parse("t.toml", &text, &Overrides::default()).unwrap();
        assert!(!c.server.work_stealing && !c.server.fast_path);
        assert_eq!((c.client.read_buffer, c.client.write_buffer), (0, 1024));

        let p = problems(&format!("[client]\nread_buffer = 1048577\nwrite_buffer = 99999999999\n{SERVERS}"));
        let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(keys, [("client.read_buffer", Some(2)), ("client.write_buffer", Some(3))], "{p:?}");
    }

    #[test]
    fn bad_server_address_is_rejected() {
        let p = problems("[upstreams.backends]\nservers = [\"a:1\", \"300.1.1.1:80\", \"b\"]\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].key, "upstreams.backends.servers[1]");
        assert_eq!(p[1].key, "upstreams.backends.servers[2]");
    }

    #[test]
    fn route_to_unknown_group_is_rejected() {
        let p = problems(&format!("{SERVERS}[[routes]]\nprefix = \"/x/\"\nupstream = \"nobody\"\n"));
        assert_eq!(p[0].key, "routes[0].upstream");
        assert_eq!(p[0].line, Some(5));
    }

    #[test]
    fn overrides_win_over_the_file_and_name_their_origin() {
        let o = Overrides {
            listen: Some(("127.0.0.1:9999".into(), "environment PROXY_LISTEN".into())),
            backends: Some(("10.0.0.1:1, 10.0.0.2:2".into(), "environment PROXY_BACKENDS".into())),
            ..Default::default()
        };
        let c = parse("t.toml", "[listen]\npublic = \"0.0.0.0:1\"\n", &o).unwrap();
        assert_eq!(c.listen.public.port(), 9999);
        assert_eq!(c.upstreams[0].servers, vec!["10.0.0.1:1", "10.0.0.2:2"]);
        let bad = Overrides {
            status_listen: Some(("x".into(), "environment PROXY_STATUS_LISTEN".into())),
            ..Default::default()
        };
        match parse("t.toml", "", &bad) {
            Err(ConfigError::Invalid(p)) => assert_eq!(p[0].origin, "environment PROXY_STATUS_LISTEN"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let c = parse(
            "t.toml",
            "[upstreams.a]\nservers=[\"h:1\"]\n[upstreams.b]\nservers=[\"h:2\"]\n[[routes]]\nprefix=\"/\"\nupstream=\"a\"\n[[routes]]\nprefix=\"/api/\"\nupstream=\"b\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.route("/api/x"), Some("b"));
        assert_eq!(c.route("/other"), Some("a"));
    }

    #[test]
    fn unrouted_path_has_no_group() {
        let c = parse(
            "t.toml",
            &format!("{SERVERS}[[routes]]\nprefix=\"/api/\"\nupstream=\"backends\"\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.route("/elsewhere"), None);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2 minutes").is_err());
    }

    #[test]
    fn shipped_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/proxy.toml");
        load(&path, &Overrides::default()).unwrap();
    }

    #[test]
    fn a_duration_too_long_is_an_error_not_an_overflow() {
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("5124095576030432h").is_err());
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }
}
