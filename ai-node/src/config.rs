//! The AI node's configuration: the TOML file's shape, the environment
//! overrides, and the checked `Config` the rest of the crate uses.
//!
//! Precedence, applied in `load` and nowhere else: built-in defaults < file <
//! environment. Unknown keys are errors naming the file and the key; every bad
//! value is reported at once.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The file as written. Every field has a named default so an empty file is valid.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub redis: RedisFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub stream: StreamFile,
    #[serde(default)]
    pub history: HistoryFile,
    #[serde(default)]
    pub engine: EngineFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default = "default_listen_addr")]
    pub listen_addr: String,
    #[serde(default = "default_node_id")]
    pub node_id: String,
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    #[serde(default = "default_redis_url")]
    pub url: String,
    #[serde(default = "default_redis_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_redis_timeout_ms")]
    pub command_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: usize,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFile {
    #[serde(default = "default_stream_max_len")]
    pub max_len: usize,
    #[serde(default = "default_stream_ttl_secs")]
    pub ttl_secs: u64,
    #[serde(default = "default_stream_lease_ms")]
    pub lease_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFile {
    #[serde(default = "default_history_max_turns")]
    pub max_turns: usize,
    #[serde(default = "default_history_ttl_secs")]
    pub ttl_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    #[serde(default = "default_engine_kind")]
    pub kind: String,
    #[serde(default)]
    pub synthetic: SyntheticFile,
    #[serde(default)]
    pub openai: OpenAiFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticFile {
    #[serde(default = "default_first_token_ms")]
    pub first_token_ms: u64,
    #[serde(default = "default_tokens_per_second")]
    pub tokens_per_second: f64,
    #[serde(default = "default_answer_tokens")]
    pub answer_tokens: usize,
    #[serde(default)]
    pub refuse_ratio: f64,
    #[serde(default)]
    pub die_ratio: f64,
    #[serde(default)]
    pub tag: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiFile {
    #[serde(default = "default_openai_base_url")]
    pub base_url: String,
    #[serde(default = "default_openai_model")]
    pub model: String,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default = "default_openai_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_openai_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub system_prompt: Option<String>,
}

fn default_listen_addr() -> String {
    "0.0.0.0:8000".into()
}
fn default_node_id() -> String {
    "ai-1".into()
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
fn default_redis_timeout_ms() -> u64 {
    2_000
}
fn default_max_concurrent_streams() -> usize {
    256
}
fn default_max_body_bytes() -> usize {
    256 * 1024
}
fn default_stream_max_len() -> usize {
    chat_wire::ledger::DEFAULT_MAX_LEN
}
fn default_stream_lease_ms() -> u64 {
    5_000
}
fn default_stream_ttl_secs() -> u64 {
    chat_wire::ledger::DEFAULT_TTL.as_secs()
}
fn default_history_max_turns() -> usize {
    20
}
fn default_history_ttl_secs() -> u64 {
    86_400
}
fn default_engine_kind() -> String {
    "synthetic".into()
}
fn default_first_token_ms() -> u64 {
    50
}
fn default_tokens_per_second() -> f64 {
    50.0
}
fn default_answer_tokens() -> usize {
    40
}
fn default_openai_base_url() -> String {
    "http://127.0.0.1:11434/v1".into()
}
fn default_openai_model() -> String {
    "llama3.2".into()
}
fn default_openai_connect_timeout_ms() -> u64 {
    5_000
}
fn default_openai_idle_timeout_ms() -> u64 {
    60_000
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
default_from_serde!(ServerFile, RedisFile, LimitsFile, StreamFile, HistoryFile, EngineFile, SyntheticFile, OpenAiFile);

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// Names this node in acceptances, events and health answers.
    pub node_id: String,
    /// How long in-flight streams may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    pub redis_url: String,
    pub redis_connect_timeout: Duration,
    pub redis_command_timeout: Duration,
    /// Streams generated at once; past it `/chat` answers 503.
    pub max_concurrent_streams: usize,
    pub max_body_bytes: usize,
    /// Cap (approximate, `MAXLEN ~`) of each request's event stream.
    pub stream_max_len: usize,
    /// How long a request's stream and claim live after their last event.
    pub stream_ttl: Duration,
    /// The producer's lease on a request it generates, renewed every third of
    /// it; a backend takes a request over only once it lapsed.
    pub stream_lease: Duration,
    pub history_max_turns: usize,
    pub history_ttl: Duration,
    pub engine: EngineConfig,
}

#[derive(Debug, Clone)]
pub enum EngineConfig {
    Synthetic(SyntheticConfig),
    OpenAi(OpenAiConfig),
}

#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub first_token: Duration,
    /// 0 means as fast as possible.
    pub tokens_per_second: f64,
    pub answer_tokens: usize,
    /// Share of requests refused up front (the node answers 503).
    pub refuse_ratio: f64,
    /// Share of streams that die mid-way with an `error` event.
    pub die_ratio: f64,
    /// Appended to every piece (tests give each node its own, so two
    /// producers of one answer show in its text).
    pub tag: String,
}

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    /// Longest wait for the next streamed piece before the stream is failed.
    pub idle_timeout: Duration,
    pub max_tokens: Option<u32>,
    pub system_prompt: Option<String>,
}

/// Environment variables that override the file.
pub const ENV_OVERRIDES: &[&str] =
    &["LISTEN_ADDR", "REDIS_URL", "NODE_ID", "ENGINE", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY"];

/// Reads `path` (or the defaults when `None`), applies the environment and checks the result.
/// The error lists every problem, one a line.
pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    let mut file = match path {
        Some(p) => chat_wire::http::read_toml::<FileConfig>(p)?,
        None => FileConfig::default(),
    };
    apply_env(&mut file, env);
    check(file, path.map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into()))
}

fn apply_env(file: &mut FileConfig, env: &dyn Fn(&str) -> Option<String>) {
    let set = |slot: &mut String, var: &str| {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            *slot = v;
        }
    };
    set(&mut file.server.listen_addr, "LISTEN_ADDR");
    set(&mut file.redis.url, "REDIS_URL");
    set(&mut file.server.node_id, "NODE_ID");
    set(&mut file.engine.kind, "ENGINE");
    set(&mut file.engine.openai.base_url, "OPENAI_BASE_URL");
    set(&mut file.engine.openai.model, "OPENAI_MODEL");
    if let Some(key) = env("OPENAI_API_KEY").filter(|v| !v.is_empty()) {
        file.engine.openai.api_key = Some(key);
    }
}

fn check(f: FileConfig, source: String) -> Result<Config, String> {
    let mut errors = Vec::new();
    let mut bad = |key: &str, why: String| errors.push(format!("{source}: {key}: {why}"));

    let listen_addr = f.server.listen_addr.parse::<SocketAddr>().unwrap_or_else(|e| {
        bad("server.listen_addr", format!("{:?} is not an address like 0.0.0.0:8000 ({e})", f.server.listen_addr));
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    if let Err(e) = chat_wire::validate_id("server.node_id", &f.server.node_id) {
        bad("server.node_id", e.reason);
    }
    if !(f.redis.url.starts_with("redis://")
        || f.redis.url.starts_with("rediss://")
        || f.redis.url.starts_with("unix://"))
    {
        bad("redis.url", format!("{:?} must start with redis://, rediss:// or unix://", f.redis.url));
    }
    for (key, v) in [
        ("redis.connect_timeout_ms", f.redis.connect_timeout_ms),
        ("redis.command_timeout_ms", f.redis.command_timeout_ms),
    ] {
        if v == 0 {
            bad(key, "must be above 0".into());
        }
    }
    if f.limits.max_concurrent_streams == 0 {
        bad("limits.max_concurrent_streams", "must be above 0".into());
    }
    if f.limits.max_body_bytes < 1024 {
        bad("limits.max_body_bytes", format!("{} is below the minimum of 1024", f.limits.max_body_bytes));
    }
    if f.stream.max_len < 16 {
        bad("stream.max_len", format!("{} is below the minimum of 16", f.stream.max_len));
    }
    if !(100..=60_000).contains(&f.stream.lease_ms) {
        bad("stream.lease_ms", format!("{} is not between 100 and 60000", f.stream.lease_ms));
    }
    if f.stream.ttl_secs < 300 {
        bad(
            "stream.ttl_secs",
            format!("{} is below 300: streams must stay resumable for 5 minutes", f.stream.ttl_secs),
        );
    }
    let s = &f.engine.synthetic;
    for (key, v) in [("engine.synthetic.refuse_ratio", s.refuse_ratio), ("engine.synthetic.die_ratio", s.die_ratio)] {
        if !(0.0..=1.0).contains(&v) {
            bad(key, format!("{v} is not between 0 and 1"));
        }
    }
    if !(s.tokens_per_second == 0.0 || (0.001..=1e6).contains(&s.tokens_per_second)) {
        bad(
            "engine.synthetic.tokens_per_second",
            format!("{} must be 0 (unlimited) or between 0.001 and 1000000", s.tokens_per_second),
        );
    }
    if s.answer_tokens == 0 {
        bad("engine.synthetic.answer_tokens", "must be above 0".into());
    }
    let o = &f.engine.openai;
    if !(o.base_url.starts_with("http://") || o.base_url.starts_with("https://")) {
        bad("engine.openai.base_url", format!("{:?} must start with http:// or https://", o.base_url));
    }
    let engine = match f.engine.kind.as_str() {
        "synthetic" => EngineConfig::Synthetic(SyntheticConfig {
            first_token: Duration::from_millis(s.first_token_ms),
            tokens_per_second: s.tokens_per_second,
            answer_tokens: s.answer_tokens,
            refuse_ratio: s.refuse_ratio,
            die_ratio: s.die_ratio,
            tag: s.tag.clone(),
        }),
        "openai" => EngineConfig::OpenAi(OpenAiConfig {
            base_url: o.base_url.trim_end_matches('/').to_owned(),
            model: o.model.clone(),
            api_key: o.api_key.clone(),
            connect_timeout: Duration::from_millis(o.connect_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(o.idle_timeout_ms.max(1)),
            max_tokens: o.max_tokens,
            system_prompt: o.system_prompt.clone(),
        }),
        other => {
            bad("engine.kind", format!("{other:?} is not one of \"synthetic\", \"openai\""));
            EngineConfig::Synthetic(SyntheticConfig {
                first_token: Duration::ZERO,
                tokens_per_second: 0.0,
                answer_tokens: 1,
                refuse_ratio: 0.0,
                die_ratio: 0.0,
                tag: String::new(),
            })
        }
    };
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    Ok(Config {
        listen_addr,
        node_id: f.server.node_id,
        shutdown_grace: Duration::from_millis(f.server.shutdown_grace_ms),
        redis_url: f.redis.url,
        redis_connect_timeout: Duration::from_millis(f.redis.connect_timeout_ms),
        redis_command_timeout: Duration::from_millis(f.redis.command_timeout_ms),
        max_concurrent_streams: f.limits.max_concurrent_streams,
        max_body_bytes: f.limits.max_body_bytes,
        stream_max_len: f.stream.max_len,
        stream_ttl: Duration::from_secs(f.stream.ttl_secs),
        stream_lease: Duration::from_millis(f.stream.lease_ms),
        history_max_turns: f.history.max_turns,
        history_ttl: Duration::from_secs(f.history.ttl_secs),
        engine,
    })
}

impl Config {
    /// The defaults, for tests and embedding.
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/ai-node.toml");
        let config = load(Some(&path), &no_env).unwrap();
        assert!(matches!(config.engine, EngineConfig::Synthetic(_)));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server]\nlisten_adr = \"0.0.0.0:1\"\n").unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        assert!(err.contains("bad.toml") && err.contains("listen_adr"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten_addr = \"nowhere\"\n[engine]\nkind = \"magic\"\n[stream]\nttl_secs = 5\n",
        )
        .unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        for key in ["server.listen_addr", "engine.kind", "stream.ttl_secs"] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "LISTEN_ADDR" => Some("127.0.0.1:9999".to_owned()),
            "NODE_ID" => Some("ai-7".to_owned()),
            "REDIS_URL" => Some("redis://10.0.0.1:6380".to_owned()),
            _ => None,
        };
        let c = load(None, &env).unwrap();
        assert_eq!(c.listen_addr.port(), 9999);
        assert_eq!(c.node_id, "ai-7");
        assert_eq!(c.redis_url, "redis://10.0.0.1:6380");
    }

    #[test]
    fn a_pace_too_slow_to_represent_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[engine.synthetic]\ntokens_per_second = 1e-300\n").unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        assert!(err.contains("engine.synthetic.tokens_per_second"), "{err}");
    }
}
