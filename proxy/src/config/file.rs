//! The file's structs: what users write, each field with its default.
//! Values the checks look at are [`Spanned`], so a problem names its line.

use std::collections::BTreeMap;

use serde::Deserialize;
use service_kit::config::{unspanned, Spanned};

/// Name of the upstream group that `PROXY_BACKENDS` replaces, and that the
/// default routes point at.
pub const DEFAULT_GROUP: &str = "backends";

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
    /// Worker processes (nginx's `worker_processes`), each with `threads`.
    #[serde(default = "default_processes")]
    pub processes: Spanned<usize>,
    /// Worker threads of the proxy service (per worker process).
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
    /// CIDRs whose connections must start with a PROXY protocol header
    /// (v1 or v2), whose source address is then the client's.
    #[serde(default)]
    pub proxy_protocol_from: Vec<Spanned<String>>,
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
    /// Worker processes whose relay thread carries the tunnels (0: each its own).
    #[serde(default = "default_ws_relays")]
    pub relays: Spanned<usize>,
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

fn s(value: &str) -> Spanned<String> {
    unspanned(value.to_string())
}
fn default_work_stealing() -> bool {
    true
}

fn default_fast_path() -> bool {
    true
}

fn default_ws_relays() -> Spanned<usize> {
    unspanned(1)
}

fn default_processes() -> Spanned<usize> {
    unspanned(1)
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
pub(super) fn default_upstreams() -> BTreeMap<String, FileUpstream> {
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
            processes: default_processes(),
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
            proxy_protocol_from: Vec::new(),
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
        Self { idle_timeout: default_ws_idle(), relays: default_ws_relays() }
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
