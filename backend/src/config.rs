//! The backend's configuration: the TOML file's shape, the environment
//! overrides, and the checked `Config`.
//!
//! Precedence, applied in `load` and nowhere else: built-in defaults < file <
//! environment. Unknown keys are errors naming the file and the key; every bad
//! value is reported at once.

use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub redis: RedisFile,
    #[serde(default)]
    pub ai: AiFile,
    #[serde(default)]
    pub stream: StreamFile,
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default = "d_listen")]
    pub listen_addr: String,
    #[serde(default = "d_backend_id")]
    pub backend_id: String,
    #[serde(default = "d_metrics_listen")]
    pub metrics_listen_addr: String,
    #[serde(default = "d_grace")]
    pub shutdown_grace_ms: u64,
    #[serde(default = "d_trusted")]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    #[serde(default = "d_redis_url")]
    pub url: String,
    #[serde(default = "d_2000")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_2000")]
    pub command_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiFile {
    #[serde(default = "d_ai_urls")]
    pub urls: Vec<String>,
    #[serde(default = "d_health_path")]
    pub health_path: String,
    #[serde(default = "d_2000")]
    pub health_interval_ms: u64,
    #[serde(default = "d_1000")]
    pub health_timeout_ms: u64,
    #[serde(default = "d_1")]
    pub healthy_after: usize,
    #[serde(default = "d_1")]
    pub unhealthy_after: usize,
    #[serde(default = "d_10000")]
    pub discovery_interval_ms: u64,
    #[serde(default = "d_3000")]
    pub request_timeout_ms: u64,
    #[serde(default = "d_3")]
    pub max_attempts: usize,
    #[serde(default = "d_8000")]
    pub dispatch_deadline_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFile {
    #[serde(default = "d_3000")]
    pub stall_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "d_body")]
    pub max_body_bytes: usize,
    #[serde(default = "d_frame")]
    pub max_frame_bytes: usize,
    #[serde(default = "d_session_rate")]
    pub session_rate_per_sec: f64,
    #[serde(default = "d_session_burst")]
    pub session_burst: u32,
    #[serde(default = "d_ip_rate")]
    pub ip_rate_per_sec: f64,
    #[serde(default = "d_ip_burst")]
    pub ip_burst: u32,
    #[serde(default = "d_queue")]
    pub ws_send_queue: usize,
    #[serde(default = "d_5000")]
    pub ws_send_timeout_ms: u64,
    #[serde(default = "d_20000")]
    pub ws_ping_interval_ms: u64,
    #[serde(default = "d_60000")]
    pub ws_client_timeout_ms: u64,
    #[serde(default = "d_max_sockets")]
    pub max_sockets: usize,
}

fn d_listen() -> String {
    "0.0.0.0:8080".into()
}
fn d_backend_id() -> String {
    "backend-1".into()
}
fn d_metrics_listen() -> String {
    "127.0.0.1:9100".into()
}
fn d_grace() -> u64 {
    5_000
}
fn d_trusted() -> Vec<String> {
    ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"].map(String::from).to_vec()
}
fn d_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
fn d_ai_urls() -> Vec<String> {
    vec!["http://127.0.0.1:8000".into()]
}
fn d_health_path() -> String {
    "/health".into()
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_1000() -> u64 {
    1_000
}
fn d_2000() -> u64 {
    2_000
}
fn d_3000() -> u64 {
    3_000
}
fn d_5000() -> u64 {
    5_000
}
fn d_8000() -> u64 {
    8_000
}
fn d_10000() -> u64 {
    10_000
}
fn d_20000() -> u64 {
    20_000
}
fn d_60000() -> u64 {
    60_000
}
fn d_body() -> usize {
    256 * 1024
}
fn d_frame() -> usize {
    64 * 1024
}
fn d_session_rate() -> f64 {
    5.0
}
fn d_session_burst() -> u32 {
    20
}
fn d_ip_rate() -> f64 {
    50.0
}
fn d_ip_burst() -> u32 {
    100
}
fn d_queue() -> usize {
    256
}
fn d_max_sockets() -> usize {
    20_000
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(ServerFile, RedisFile, AiFile, StreamFile, LimitsFile);

/// One AI node as configured: the URL operators wrote, and what to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    /// As written (`http://ai-1:8000`), shown in answers and `/api/ai-health`.
    pub url: String,
    /// `host:port`, resolved by discovery (a compose service name may stand for several nodes).
    pub authority: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// Sent as `X-Backend-Id` on every answer.
    pub backend_id: String,
    /// Internal listener for `/metrics`; `None` when disabled.
    pub metrics_listen_addr: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed.
    pub trusted_proxies: Vec<IpNet>,
    pub redis_url: String,
    pub redis_connect_timeout: Duration,
    pub redis_command_timeout: Duration,
    pub ai_nodes: Vec<NodeUrl>,
    pub health_path: String,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub healthy_after: usize,
    pub unhealthy_after: usize,
    /// How often node host names are resolved again (new nodes join without a restart).
    pub discovery_interval: Duration,
    /// Longest wait for one node to accept a chat.
    pub request_timeout: Duration,
    /// Most nodes tried for one chat.
    pub max_attempts: usize,
    /// Longest time spent on one chat across all attempts.
    pub dispatch_deadline: Duration,
    /// A followed request with no event for this long is ended with `node_failed`.
    pub stall_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
    pub session_rate_per_sec: f64,
    pub session_burst: u32,
    pub ip_rate_per_sec: f64,
    pub ip_burst: u32,
    /// Events queued for one socket; a consumer slower than this is closed (1013).
    pub ws_send_queue: usize,
    pub ws_send_timeout: Duration,
    pub ws_ping_interval: Duration,
    /// A socket that sends nothing (not even a pong) for this long is closed.
    pub ws_client_timeout: Duration,
    pub max_sockets: usize,
}

pub const ENV_OVERRIDES: &[&str] =
    &["LISTEN_ADDR", "METRICS_LISTEN_ADDR", "REDIS_URL", "AI_SERVICE_URLS", "BACKEND_ID"];

pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    let mut file = match path {
        Some(p) => chat_wire::http::read_toml::<FileConfig>(p)?,
        None => FileConfig::default(),
    };
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(v) = var("LISTEN_ADDR") {
        file.server.listen_addr = v;
    }
    if let Some(v) = env("METRICS_LISTEN_ADDR") {
        file.server.metrics_listen_addr = v;
    }
    if let Some(v) = var("REDIS_URL") {
        file.redis.url = v;
    }
    if let Some(v) = var("BACKEND_ID") {
        file.server.backend_id = v;
    }
    if let Some(v) = var("AI_SERVICE_URLS") {
        file.ai.urls = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    }
    check(file, path.map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into()))
}

/// `http://host:port[/]` → `host:port`.
fn parse_node_url(url: &str) -> Result<NodeUrl, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?} must start with http://"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("{url:?} must be http://host:port with no path"));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| format!("{url:?} needs a port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{url:?} needs a host and a numeric port"));
    }
    Ok(NodeUrl { url: url.trim_end_matches('/').to_owned(), authority: authority.to_owned() })
}

fn check(f: FileConfig, source: String) -> Result<Config, String> {
    let mut errors = Vec::new();
    let mut bad = |key: &str, why: String| errors.push(format!("{source}: {key}: {why}"));
    let addr = |key: &str, v: &str, bad: &mut dyn FnMut(&str, String)| -> SocketAddr {
        v.parse().unwrap_or_else(|e| {
            bad(key, format!("{v:?} is not an address like 0.0.0.0:8080 ({e})"));
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    };
    let listen_addr = addr("server.listen_addr", &f.server.listen_addr, &mut bad);
    let metrics_listen_addr = match f.server.metrics_listen_addr.trim() {
        "" | "off" => None,
        v => Some(addr("server.metrics_listen_addr", v, &mut bad)),
    };
    if let Err(e) = chat_wire::validate_id("server.backend_id", &f.server.backend_id) {
        bad("server.backend_id", e.reason);
    }
    let mut trusted_proxies = Vec::new();
    for cidr in &f.server.trusted_proxies {
        match cidr.parse::<IpNet>().or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from)) {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => bad("server.trusted_proxies", format!("{cidr:?} is not a CIDR like 10.0.0.0/8")),
        }
    }
    if !(f.redis.url.starts_with("redis://")
        || f.redis.url.starts_with("rediss://")
        || f.redis.url.starts_with("unix://"))
    {
        bad("redis.url", format!("{:?} must start with redis://, rediss:// or unix://", f.redis.url));
    }
    let mut ai_nodes = Vec::new();
    if f.ai.urls.is_empty() {
        bad("ai.urls", "at least one AI node is needed".into());
    }
    for url in &f.ai.urls {
        match parse_node_url(url) {
            Ok(n) if !ai_nodes.contains(&n) => ai_nodes.push(n),
            Ok(_) => bad("ai.urls", format!("{url:?} is listed twice")),
            Err(e) => bad("ai.urls", e),
        }
    }
    if !f.ai.health_path.starts_with('/') {
        bad("ai.health_path", format!("{:?} must start with /", f.ai.health_path));
    }
    for (key, v) in [
        ("ai.health_interval_ms", f.ai.health_interval_ms),
        ("ai.health_timeout_ms", f.ai.health_timeout_ms),
        ("ai.request_timeout_ms", f.ai.request_timeout_ms),
        ("ai.dispatch_deadline_ms", f.ai.dispatch_deadline_ms),
        ("ai.discovery_interval_ms", f.ai.discovery_interval_ms),
        ("stream.stall_timeout_ms", f.stream.stall_timeout_ms),
        ("limits.ws_send_timeout_ms", f.limits.ws_send_timeout_ms),
        ("limits.ws_ping_interval_ms", f.limits.ws_ping_interval_ms),
        ("limits.ws_client_timeout_ms", f.limits.ws_client_timeout_ms),
    ] {
        if v == 0 {
            bad(key, "must be above 0".into());
        }
    }
    for (key, v) in [
        ("ai.healthy_after", f.ai.healthy_after),
        ("ai.unhealthy_after", f.ai.unhealthy_after),
        ("ai.max_attempts", f.ai.max_attempts),
        ("limits.ws_send_queue", f.limits.ws_send_queue),
        ("limits.max_sockets", f.limits.max_sockets),
    ] {
        if v == 0 {
            bad(key, "must be above 0".into());
        }
    }
    for (key, v) in [
        ("limits.session_rate_per_sec", f.limits.session_rate_per_sec),
        ("limits.ip_rate_per_sec", f.limits.ip_rate_per_sec),
    ] {
        if !(1e-6..=1e6).contains(&v) {
            bad(key, format!("{v} must be between 0.000001 and 1000000 per second"));
        }
    }
    for (key, v) in [("limits.session_burst", f.limits.session_burst), ("limits.ip_burst", f.limits.ip_burst)] {
        if v == 0 {
            bad(key, "must be above 0".into());
        }
    }
    if f.limits.max_body_bytes < 1024 {
        bad("limits.max_body_bytes", format!("{} is below the minimum of 1024", f.limits.max_body_bytes));
    }
    if f.limits.max_frame_bytes < 1024 {
        bad("limits.max_frame_bytes", format!("{} is below the minimum of 1024", f.limits.max_frame_bytes));
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let ms = Duration::from_millis;
    Ok(Config {
        listen_addr,
        backend_id: f.server.backend_id,
        metrics_listen_addr,
        shutdown_grace: ms(f.server.shutdown_grace_ms),
        trusted_proxies,
        redis_url: f.redis.url,
        redis_connect_timeout: ms(f.redis.connect_timeout_ms),
        redis_command_timeout: ms(f.redis.command_timeout_ms),
        ai_nodes,
        health_path: f.ai.health_path,
        health_interval: ms(f.ai.health_interval_ms),
        health_timeout: ms(f.ai.health_timeout_ms),
        healthy_after: f.ai.healthy_after,
        unhealthy_after: f.ai.unhealthy_after,
        discovery_interval: ms(f.ai.discovery_interval_ms),
        request_timeout: ms(f.ai.request_timeout_ms),
        max_attempts: f.ai.max_attempts,
        dispatch_deadline: ms(f.ai.dispatch_deadline_ms),
        stall_timeout: ms(f.stream.stall_timeout_ms),
        max_body_bytes: f.limits.max_body_bytes,
        max_frame_bytes: f.limits.max_frame_bytes,
        session_rate_per_sec: f.limits.session_rate_per_sec,
        session_burst: f.limits.session_burst,
        ip_rate_per_sec: f.limits.ip_rate_per_sec,
        ip_burst: f.limits.ip_burst,
        ws_send_queue: f.limits.ws_send_queue,
        ws_send_timeout: ms(f.limits.ws_send_timeout_ms),
        ws_ping_interval: ms(f.limits.ws_ping_interval_ms),
        ws_client_timeout: ms(f.limits.ws_client_timeout_ms),
        max_sockets: f.limits.max_sockets,
    })
}

impl Config {
    pub fn defaults() -> Config {
        check(FileConfig::default(), "<defaults>".into()).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn shipped_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/backend.toml");
        load(Some(&path), &no_env).unwrap();
    }

    #[test]
    fn ai_service_urls_override_the_file_as_the_old_system_did() {
        let env = |k: &str| {
            (k == "AI_SERVICE_URLS").then(|| "http://ai-1:8000, http://ai-2:8000,http://ai-3:8000/".to_owned())
        };
        let c = load(None, &env).unwrap();
        let urls: Vec<_> = c.ai_nodes.iter().map(|n| n.url.as_str()).collect();
        assert_eq!(urls, ["http://ai-1:8000", "http://ai-2:8000", "http://ai-3:8000"]);
        assert_eq!(c.ai_nodes[2].authority, "ai-3:8000");
    }

    #[test]
    fn bad_values_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "[ai]\nurls = [\"ftp://x\", \"http://a\"]\n[limits]\nmax_frame_bytes = 3\n").unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        assert!(err.contains("ftp://x") && err.contains("http://a") && err.contains("limits.max_frame_bytes"), "{err}");
        std::fs::write(&path, "[stream]\nstall_timeout = 3\n").unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        assert!(err.contains("b.toml") && err.contains("stall_timeout"), "{err}");
    }

    #[test]
    fn extreme_rates_are_rejected_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[limits]\nsession_rate_per_sec = 1e-300\nip_rate_per_sec = 1e300\n").unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        assert!(err.contains("limits.session_rate_per_sec") && err.contains("limits.ip_rate_per_sec"), "{err}");
    }
}
