//! The backend's configuration: the TOML file's shape, the environment
//! overrides, and the checked `Config`, on the machinery all three services
//! share (`service_kit::config`).
//!
//! Precedence, applied in `load` and nowhere else: built-in defaults < file <
//! environment. Unknown keys are errors naming the file and the key; every bad
//! value is reported at once with its line, or the variable that set it.
//! Durations are written `"3s"`; the old `_ms` integer keys are still read.

use ipnet::IpNet;
use serde::Deserialize;
use service_kit::config::{unspanned, Checker, ConfigError, Env, RedisFile, Source, Spanned};
use service_kit::{default_sections, defaults};
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
    #[serde(default)]
    pub openai: OpenAiFile,
    #[serde(default)]
    pub auth: AuthFile,
}

/// `[auth]`: API keys (see `keys.rs`). Off by default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// Require a key on `/api/*`, `/v1/*` and `/ws/chat`.
    #[serde(default = "d_false")]
    pub enabled: Spanned<bool>,
    /// A TOML file of `[[key]]` tables (id, sha256, limits); keys may also
    /// live in Redis (`chat:apikey:<sha256>`).
    #[serde(default)]
    pub keys_file: Option<Spanned<String>>,
    /// How long a key looked up in Redis is trusted (revocations take this long).
    #[serde(default = "d_5s")]
    pub cache: Spanned<String>,
}

/// `[openai]`: the OpenAI-compatible face (`/v1/...`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiFile {
    /// Model names `/v1/models` lists and `model` must be one of.
    #[serde(default = "d_models")]
    pub models: Spanned<Vec<Spanned<String>>>,
    /// Longest wait for a whole answer (`stream: false`).
    #[serde(default = "d_10m")]
    pub completion_timeout: Spanned<String>,
}

/// A duration key and its old `_ms` spelling.
type Old = Option<Spanned<u64>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default = "d_listen")]
    pub listen_addr: Spanned<String>,
    #[serde(default = "d_backend_id")]
    pub backend_id: Spanned<String>,
    #[serde(default = "d_metrics_listen")]
    pub metrics_listen_addr: Spanned<String>,
    #[serde(default = "d_grace")]
    pub shutdown_grace: Spanned<String>,
    #[serde(default)]
    pub shutdown_grace_ms: Old,
    #[serde(default = "d_trusted")]
    pub trusted_proxies: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiFile {
    #[serde(default = "d_ai_urls")]
    pub urls: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "d_health_path")]
    pub health_path: Spanned<String>,
    #[serde(default = "d_2s")]
    pub health_interval: Spanned<String>,
    #[serde(default)]
    pub health_interval_ms: Old,
    #[serde(default = "d_1s")]
    pub health_timeout: Spanned<String>,
    #[serde(default)]
    pub health_timeout_ms: Old,
    #[serde(default = "d_1")]
    pub healthy_after: Spanned<usize>,
    #[serde(default = "d_1")]
    pub unhealthy_after: Spanned<usize>,
    #[serde(default = "d_10s")]
    pub discovery_interval: Spanned<String>,
    #[serde(default)]
    pub discovery_interval_ms: Old,
    #[serde(default = "d_3s")]
    pub request_timeout: Spanned<String>,
    #[serde(default)]
    pub request_timeout_ms: Old,
    #[serde(default = "d_3")]
    pub max_attempts: Spanned<usize>,
    #[serde(default = "d_8s")]
    pub dispatch_deadline: Spanned<String>,
    #[serde(default)]
    pub dispatch_deadline_ms: Old,
    /// Shared secret the AI nodes require (`X-Node-Secret`); also `AI_NODE_SECRET`.
    #[serde(default = "d_empty")]
    pub node_secret: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFile {
    #[serde(default = "d_3s")]
    pub stall_timeout: Spanned<String>,
    #[serde(default)]
    pub stall_timeout_ms: Old,
    /// Sockets are closed (1012) once the event store has been unreachable
    /// from here this long; `"0s"`: never.
    #[serde(default = "d_10s")]
    pub close_when_store_lost: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "d_body")]
    pub max_body_bytes: Spanned<usize>,
    #[serde(default = "d_frame")]
    pub max_frame_bytes: Spanned<usize>,
    #[serde(default = "d_session_rate")]
    pub session_rate_per_sec: Spanned<f64>,
    #[serde(default = "d_session_burst")]
    pub session_burst: Spanned<u32>,
    #[serde(default = "d_ip_rate")]
    pub ip_rate_per_sec: Spanned<f64>,
    #[serde(default = "d_ip_burst")]
    pub ip_burst: Spanned<u32>,
    #[serde(default = "d_queue")]
    pub ws_send_queue: Spanned<usize>,
    #[serde(default = "d_5s")]
    pub ws_send_timeout: Spanned<String>,
    #[serde(default)]
    pub ws_send_timeout_ms: Old,
    #[serde(default = "d_20s")]
    pub ws_ping_interval: Spanned<String>,
    #[serde(default)]
    pub ws_ping_interval_ms: Old,
    #[serde(default = "d_60s")]
    pub ws_client_timeout: Spanned<String>,
    #[serde(default)]
    pub ws_client_timeout_ms: Old,
    #[serde(default = "d_max_sockets")]
    pub max_sockets: Spanned<usize>,
}

defaults! {
    d_listen -> String = "0.0.0.0:8080".into();
    d_backend_id -> String = "backend-1".into();
    d_metrics_listen -> String = "127.0.0.1:9100".into();
    d_grace -> String = "5s".into();
    d_health_path -> String = "/health".into();
    d_1s -> String = "1s".into();
    d_2s -> String = "2s".into();
    d_3s -> String = "3s".into();
    d_5s -> String = "5s".into();
    d_8s -> String = "8s".into();
    d_10s -> String = "10s".into();
    d_20s -> String = "20s".into();
    d_60s -> String = "60s".into();
    d_1 -> usize = 1;
    d_3 -> usize = 3;
    d_body -> usize = 256 * 1024;
    d_frame -> usize = 64 * 1024;
    d_session_rate -> f64 = 5.0;
    d_session_burst -> u32 = 20;
    d_ip_rate -> f64 = 50.0;
    d_ip_burst -> u32 = 100;
    d_queue -> usize = 256;
    d_max_sockets -> usize = 20_000;
    d_10m -> String = "10m".into();
    d_false -> bool = false;
    d_empty -> String = String::new();
    d_models -> Vec<Spanned<String>> = vec![unspanned("chat".into())];
    d_ai_urls -> Vec<Spanned<String>> = vec![unspanned("http://127.0.0.1:8000".into())];
}

fn d_trusted() -> Vec<Spanned<String>> {
    ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"].map(|c| unspanned(c.into())).to_vec()
}

default_sections!(ServerFile, AiFile, StreamFile, LimitsFile, OpenAiFile, AuthFile);

/// API keys as configured.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The keys of the file, by SHA-256 (`None`: revoked).
    pub file_keys: std::collections::HashMap<String, Option<crate::keys::Key>>,
    pub cache: Duration,
}

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
    /// API keys, when `auth.enabled`: the keys file read, and the lookup cache time.
    pub auth: Option<AuthConfig>,
    /// Sent as `X-Node-Secret` to the AI nodes (`AI_NODE_SECRET`), when set.
    pub node_secret: Option<String>,
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
    /// Sockets are closed with 1012 once the event store has been
    /// unreachable this long (`None`: never), so their clients reconnect
    /// through the proxy to a backend that reaches it, and resume.
    pub close_when_store_lost: Option<Duration>,
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
    /// Model names of the OpenAI-compatible face.
    pub openai_models: Vec<String>,
    /// Longest wait for a whole `/v1` answer.
    pub completion_timeout: Duration,
}

pub const ENV_OVERRIDES: &[&str] = &[
    "LISTEN_ADDR",
    "METRICS_LISTEN_ADDR",
    "REDIS_URL",
    "AI_SERVICE_URLS",
    "BACKEND_ID",
    "AI_NODE_SECRET",
    "AUTH_ENABLED",
];

/// Reads `path` (or the defaults when `None`), lays the environment over it
/// and checks the result; the error lists every problem, one a line.
pub fn load(path: Option<&Path>, env: Env<'_>) -> Result<Config, ConfigError> {
    let source = Source::read(path)?;
    let mut file: FileConfig = source.parse()?;
    let mut c = Checker::new(&source);
    c.env_override(env, "LISTEN_ADDR", "server.listen_addr", &mut file.server.listen_addr);
    // Set but empty turns the metrics listener off, so this one is read as is.
    if let Some(v) = env("METRICS_LISTEN_ADDR") {
        file.server.metrics_listen_addr = unspanned(v);
        c.set_by("server.metrics_listen_addr", "environment METRICS_LISTEN_ADDR");
    }
    file.redis.override_from(&mut c, env);
    c.env_override(env, "BACKEND_ID", "server.backend_id", &mut file.server.backend_id);
    c.env_override(env, "AI_NODE_SECRET", "ai.node_secret", &mut file.ai.node_secret);
    let mut auth = unspanned(String::new());
    if c.env_override(env, "AUTH_ENABLED", "auth.enabled", &mut auth) {
        match auth.get_ref().as_str() {
            "1" | "true" | "on" => file.auth.enabled = unspanned(true),
            "0" | "false" | "off" => file.auth.enabled = unspanned(false),
            other => c.problem("auth.enabled", &auth, format!("{other:?} is not one of true, false")),
        }
    }
    let mut urls = unspanned(String::new());
    if c.env_override(env, "AI_SERVICE_URLS", "ai.urls", &mut urls) {
        let list = urls.get_ref().split(',').map(str::trim).filter(|s| !s.is_empty());
        file.ai.urls = unspanned(list.map(|u| unspanned(u.to_owned())).collect());
    }
    check(file, c)
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

fn check(f: FileConfig, mut c: Checker<'_>) -> Result<Config, ConfigError> {
    let (server, redis, ai, stream, limits) = (&f.server, &f.redis, &f.ai, &f.stream, &f.limits);
    let listen_addr = c.socket_addr("server.listen_addr", &server.listen_addr);
    let metrics_listen_addr = match server.metrics_listen_addr.get_ref().trim() {
        "" | "off" => None,
        _ => Some(c.socket_addr("server.metrics_listen_addr", &server.metrics_listen_addr)),
    };
    c.valid("server.backend_id", &server.backend_id, |id| {
        chat_wire::validate_id("server.backend_id", id).map_err(|e| e.reason)
    });
    let mut trusted_proxies = Vec::new();
    for (i, cidr) in server.trusted_proxies.iter().enumerate() {
        let text = cidr.get_ref();
        match text.parse::<IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from)) {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => c.problem(
                &format!("server.trusted_proxies[{i}]"),
                cidr,
                format!("{text:?} is not a CIDR like 10.0.0.0/8"),
            ),
        }
    }
    let redis = redis.check(&mut c);
    let mut ai_nodes = Vec::new();
    if ai.urls.get_ref().is_empty() {
        c.problem("ai.urls", &ai.urls, "at least one AI node is needed");
    }
    for (i, url) in ai.urls.get_ref().iter().enumerate() {
        let key = format!("ai.urls[{i}]");
        match parse_node_url(url.get_ref()) {
            Ok(n) if !ai_nodes.contains(&n) => ai_nodes.push(n),
            Ok(_) => c.problem(&key, url, format!("{:?} is listed twice", url.get_ref())),
            Err(e) => c.problem(&key, url, e),
        }
    }
    let mut openai_models = Vec::new();
    if f.openai.models.get_ref().is_empty() {
        c.problem("openai.models", &f.openai.models, "at least one model name is needed");
    }
    for (i, model) in f.openai.models.get_ref().iter().enumerate() {
        c.valid(&format!("openai.models[{i}]"), model, |m| chat_wire::validate_id("model", m).map_err(|e| e.reason));
        openai_models.push(model.get_ref().clone());
    }
    c.valid("ai.health_path", &ai.health_path, |p| match p.starts_with('/') {
        true => Ok(()),
        false => Err(format!("{p:?} must start with /")),
    });
    let mut duration = |key: &str, value: &Spanned<String>, old: &Old| c.positive_ms(key, value, old);
    let shutdown_grace = duration("server.shutdown_grace", &server.shutdown_grace, &server.shutdown_grace_ms);
    let health_interval = duration("ai.health_interval", &ai.health_interval, &ai.health_interval_ms);
    let health_timeout = duration("ai.health_timeout", &ai.health_timeout, &ai.health_timeout_ms);
    let discovery_interval = duration("ai.discovery_interval", &ai.discovery_interval, &ai.discovery_interval_ms);
    let request_timeout = duration("ai.request_timeout", &ai.request_timeout, &ai.request_timeout_ms);
    let dispatch_deadline = duration("ai.dispatch_deadline", &ai.dispatch_deadline, &ai.dispatch_deadline_ms);
    let stall_timeout = duration("stream.stall_timeout", &stream.stall_timeout, &stream.stall_timeout_ms);
    let ws_send_timeout = duration("limits.ws_send_timeout", &limits.ws_send_timeout, &limits.ws_send_timeout_ms);
    let ws_ping_interval = duration("limits.ws_ping_interval", &limits.ws_ping_interval, &limits.ws_ping_interval_ms);
    let ws_client_timeout =
        duration("limits.ws_client_timeout", &limits.ws_client_timeout, &limits.ws_client_timeout_ms);
    let auth = f.auth.enabled.get_ref().then(|| {
        let file_keys = match &f.auth.keys_file {
            Some(path) => crate::keys::read_file(std::path::Path::new(path.get_ref())).unwrap_or_else(|e| {
                c.problem("auth.keys_file", path, e);
                Default::default()
            }),
            None => Default::default(),
        };
        AuthConfig { file_keys, cache: c.duration("auth.cache", &f.auth.cache) }
    });
    let node_secret = Some(ai.node_secret.get_ref().trim().to_owned()).filter(|s| !s.is_empty());
    let config = Config {
        listen_addr,
        backend_id: server.backend_id.get_ref().clone(),
        auth,
        node_secret,
        metrics_listen_addr,
        shutdown_grace,
        trusted_proxies,
        redis_url: redis.url,
        redis_connect_timeout: redis.connect_timeout,
        redis_command_timeout: redis.command_timeout,
        ai_nodes,
        health_path: ai.health_path.get_ref().clone(),
        health_interval,
        health_timeout,
        healthy_after: c.at_least("ai.healthy_after", &ai.healthy_after, 1),
        unhealthy_after: c.at_least("ai.unhealthy_after", &ai.unhealthy_after, 1),
        discovery_interval,
        request_timeout,
        max_attempts: c.at_least("ai.max_attempts", &ai.max_attempts, 1),
        dispatch_deadline,
        stall_timeout,
        close_when_store_lost: Some(c.duration("stream.close_when_store_lost", &stream.close_when_store_lost))
            .filter(|d| !d.is_zero()),
        max_body_bytes: c.at_least("limits.max_body_bytes", &limits.max_body_bytes, 1024),
        max_frame_bytes: c.at_least("limits.max_frame_bytes", &limits.max_frame_bytes, 1024),
        session_rate_per_sec: c.within("limits.session_rate_per_sec", &limits.session_rate_per_sec, 1e-6, 1e6),
        session_burst: c.at_least("limits.session_burst", &limits.session_burst, 1),
        ip_rate_per_sec: c.within("limits.ip_rate_per_sec", &limits.ip_rate_per_sec, 1e-6, 1e6),
        ip_burst: c.at_least("limits.ip_burst", &limits.ip_burst, 1),
        ws_send_queue: c.at_least("limits.ws_send_queue", &limits.ws_send_queue, 1),
        ws_send_timeout,
        ws_ping_interval,
        ws_client_timeout,
        max_sockets: c.at_least("limits.max_sockets", &limits.max_sockets, 1),
        openai_models,
        completion_timeout: c.positive_duration("openai.completion_timeout", &f.openai.completion_timeout),
    };
    c.finish(config)
}

impl Config {
    pub fn defaults() -> Config {
        load(None, &|_| None).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors(path: &Path) -> String {
        load(Some(path), &no_env).unwrap_err().to_string()
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
        let err = errors(&path);
        assert!(err.contains("ftp://x") && err.contains("http://a") && err.contains("limits.max_frame_bytes"), "{err}");
        std::fs::write(&path, "[stream]\nstall_timeout = 3\n").unwrap();
        let err = errors(&path);
        assert!(err.contains("b.toml") && err.contains("stall_timeout"), "{err}");
    }

    #[test]
    fn extreme_rates_are_rejected_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[limits]\nsession_rate_per_sec = 1e-300\nip_rate_per_sec = 1e300\n").unwrap();
        let err = errors(&path);
        assert!(err.contains("limits.session_rate_per_sec") && err.contains("limits.ip_rate_per_sec"), "{err}");
    }

    #[test]
    fn a_duration_reads_the_same_in_the_one_format_and_as_its_old_ms_key() {
        let dir = tempfile::tempdir().unwrap();
        let load_text = |text: &str| {
            let path = dir.path().join("d.toml");
            std::fs::write(&path, text).unwrap();
            load(Some(&path), &no_env)
        };
        let new = load_text("[stream]\nstall_timeout = \"1500ms\"\n").unwrap();
        let old = load_text("[stream]\nstall_timeout_ms = 1500\n").unwrap();
        assert_eq!((new.stall_timeout, old.stall_timeout), (Duration::from_millis(1500), Duration::from_millis(1500)));
        let both = load_text("[stream]\nstall_timeout = \"2s\"\nstall_timeout_ms = 1500\n").unwrap_err().to_string();
        assert!(both.contains("d.toml:2: stream.stall_timeout: is set twice"), "{both}");
        let env = |k: &str| (k == "REDIS_URL").then(|| "http://x".to_owned());
        let from_env = load(None, &env).unwrap_err().to_string();
        assert!(from_env.starts_with("environment REDIS_URL: redis.url: "), "{from_env}");
    }
}
