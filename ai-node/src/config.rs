//! The AI node's configuration: the TOML file's shape, the environment
//! overrides, and the checked `Config` the rest of the crate uses, on the
//! machinery all three services share (`service_kit::config`).
//!
//! Precedence, applied in `load` and nowhere else: built-in defaults < file <
//! environment. Unknown keys are errors naming the file and the key; every bad
//! value is reported at once with its line, or the variable that set it.
//! Durations are written `"5s"`; the old `_ms` / `_secs` integer keys are
//! still read.

use serde::Deserialize;
use service_kit::config::{Checker, ConfigError, Env, Legacy, RedisFile, Source, Spanned};
use service_kit::{default_sections, defaults};
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

/// The old integer spelling of a duration key (`_ms` or `_secs`).
type Old = Option<Spanned<u64>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default = "default_listen_addr")]
    pub listen_addr: Spanned<String>,
    #[serde(default = "default_node_id")]
    pub node_id: Spanned<String>,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Spanned<String>,
    #[serde(default)]
    pub shutdown_grace_ms: Old,
    /// The secret backends must send (`X-Node-Secret`) to start or take over
    /// work; empty accepts any caller. Also `NODE_SECRET`.
    #[serde(default = "default_empty")]
    pub secret: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: Spanned<usize>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: Spanned<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFile {
    #[serde(default = "default_stream_max_len")]
    pub max_len: Spanned<usize>,
    #[serde(default = "default_stream_ttl")]
    pub ttl: Spanned<String>,
    #[serde(default)]
    pub ttl_secs: Old,
    #[serde(default = "default_stream_lease")]
    pub lease: Spanned<String>,
    #[serde(default)]
    pub lease_ms: Old,
    /// A request no reader has followed for this long is cancelled; "0" never.
    #[serde(default = "default_abandon_after")]
    pub abandon_after: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFile {
    #[serde(default = "default_history_max_turns")]
    pub max_turns: Spanned<usize>,
    #[serde(default = "default_history_ttl")]
    pub ttl: Spanned<String>,
    #[serde(default)]
    pub ttl_secs: Old,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    #[serde(default = "default_engine_kind")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub synthetic: SyntheticFile,
    #[serde(default)]
    pub openai: OpenAiFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticFile {
    #[serde(default = "default_first_token")]
    pub first_token: Spanned<String>,
    #[serde(default)]
    pub first_token_ms: Old,
    #[serde(default = "default_tokens_per_second")]
    pub tokens_per_second: Spanned<f64>,
    #[serde(default = "default_answer_tokens")]
    pub answer_tokens: Spanned<usize>,
    #[serde(default = "default_ratio")]
    pub refuse_ratio: Spanned<f64>,
    #[serde(default = "default_ratio")]
    pub die_ratio: Spanned<f64>,
    #[serde(default)]
    pub tag: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiFile {
    #[serde(default = "default_openai_base_url")]
    pub base_url: Spanned<String>,
    #[serde(default = "default_openai_model")]
    pub model: Spanned<String>,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default = "default_openai_connect_timeout")]
    pub connect_timeout: Spanned<String>,
    #[serde(default)]
    pub connect_timeout_ms: Old,
    #[serde(default = "default_openai_idle_timeout")]
    pub idle_timeout: Spanned<String>,
    #[serde(default)]
    pub idle_timeout_ms: Old,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub system_prompt: Option<String>,
}

defaults! {
    default_listen_addr -> String = "0.0.0.0:8000".into();
    default_empty -> String = String::new();
    default_node_id -> String = "ai-1".into();
    default_shutdown_grace -> String = "10s".into();
    default_max_concurrent_streams -> usize = 256;
    default_max_body_bytes -> usize = 256 * 1024;
    default_stream_max_len -> usize = chat_wire::ledger::DEFAULT_MAX_LEN;
    default_stream_ttl -> String = format!("{}s", chat_wire::ledger::DEFAULT_TTL.as_secs());
    default_stream_lease -> String = "5s".into();
    default_abandon_after -> String = "60s".into();
    default_history_max_turns -> usize = 20;
    default_history_ttl -> String = "24h".into();
    default_engine_kind -> String = "synthetic".into();
    default_first_token -> String = "50ms".into();
    default_tokens_per_second -> f64 = 50.0;
    default_answer_tokens -> usize = 40;
    default_ratio -> f64 = 0.0;
    default_openai_base_url -> String = "http://127.0.0.1:11434/v1".into();
    default_openai_model -> String = "llama3.2".into();
    default_openai_connect_timeout -> String = "5s".into();
    default_openai_idle_timeout -> String = "60s".into();
}

default_sections!(ServerFile, LimitsFile, StreamFile, HistoryFile, EngineFile, SyntheticFile, OpenAiFile);

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// Names this node in acceptances, events and health answers.
    pub node_id: String,
    /// What `X-Node-Secret` must be on `/chat`, when set.
    pub secret: Option<String>,
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
    /// A request whose readers all left this long ago is cancelled (zero: never).
    pub stream_abandon_after: Duration,
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
pub const ENV_OVERRIDES: &[&str] = &[
    "LISTEN_ADDR",
    "REDIS_URL",
    "NODE_ID",
    "NODE_SECRET",
    "ENGINE",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
    "OPENAI_API_KEY",
];

/// Reads `path` (or the defaults when `None`), applies the environment and checks the result.
/// The error lists every problem, one a line.
pub fn load(path: Option<&Path>, env: Env<'_>) -> Result<Config, ConfigError> {
    let source = Source::read(path)?;
    let mut f: FileConfig = source.parse()?;
    let mut c = Checker::new(&source);
    c.env_override(env, "LISTEN_ADDR", "server.listen_addr", &mut f.server.listen_addr);
    f.redis.override_from(&mut c, env);
    c.env_override(env, "NODE_ID", "server.node_id", &mut f.server.node_id);
    c.env_override(env, "NODE_SECRET", "server.secret", &mut f.server.secret);
    c.env_override(env, "ENGINE", "engine.kind", &mut f.engine.kind);
    c.env_override(env, "OPENAI_BASE_URL", "engine.openai.base_url", &mut f.engine.openai.base_url);
    c.env_override(env, "OPENAI_MODEL", "engine.openai.model", &mut f.engine.openai.model);
    if let Some(key) = env("OPENAI_API_KEY").filter(|v| !v.is_empty()) {
        f.engine.openai.api_key = Some(key);
    }
    check(f, c)
}

/// Any duration, zero included.
const ANY: std::ops::RangeInclusive<Duration> = Duration::ZERO..=Duration::MAX;

fn check(f: FileConfig, mut c: Checker<'_>) -> Result<Config, ConfigError> {
    let listen_addr = c.socket_addr("server.listen_addr", &f.server.listen_addr);
    c.valid("server.node_id", &f.server.node_id, |id| {
        chat_wire::validate_id("server.node_id", id).map_err(|e| e.reason)
    });
    let redis = f.redis.check(&mut c);
    let (ms, secs) = (Legacy::Millis, Legacy::Secs);
    let shutdown_grace =
        c.duration_in("server.shutdown_grace", &f.server.shutdown_grace, ms.of(&f.server.shutdown_grace_ms), ANY);
    let stream = &f.stream;
    // Streams must stay resumable for 5 minutes.
    let stream_ttl =
        c.duration_in("stream.ttl", &stream.ttl, secs.of(&stream.ttl_secs), Duration::from_secs(300)..=Duration::MAX);
    let stream_lease = c.duration_in(
        "stream.lease",
        &stream.lease,
        ms.of(&stream.lease_ms),
        Duration::from_millis(100)..=Duration::from_secs(60),
    );
    let abandon = c.duration("stream.abandon_after", &stream.abandon_after);
    if !abandon.is_zero() && abandon < Duration::from_secs(15) {
        c.problem(
            "stream.abandon_after",
            &stream.abandon_after,
            "must be 0 (never) or at least 15s (readers touch every 5s)",
        );
    }
    let history_ttl = c.duration_in("history.ttl", &f.history.ttl, secs.of(&f.history.ttl_secs), ANY);

    let s = &f.engine.synthetic;
    let refuse_ratio = c.within("engine.synthetic.refuse_ratio", &s.refuse_ratio, 0.0, 1.0);
    let die_ratio = c.within("engine.synthetic.die_ratio", &s.die_ratio, 0.0, 1.0);
    c.valid("engine.synthetic.tokens_per_second", &s.tokens_per_second, |&t| {
        match t == 0.0 || (0.001..=1e6).contains(&t) {
            true => Ok(()),
            false => Err(format!("{t} must be 0 (unlimited) or between 0.001 and 1000000")),
        }
    });
    let answer_tokens = c.at_least("engine.synthetic.answer_tokens", &s.answer_tokens, 1);
    let first_token = c.duration_in("engine.synthetic.first_token", &s.first_token, ms.of(&s.first_token_ms), ANY);
    let o = &f.engine.openai;
    c.url_with_scheme("engine.openai.base_url", &o.base_url, &["http://", "https://"]);
    let connect_timeout = c.positive_ms("engine.openai.connect_timeout", &o.connect_timeout, &o.connect_timeout_ms);
    let idle_timeout = c.positive_ms("engine.openai.idle_timeout", &o.idle_timeout, &o.idle_timeout_ms);
    let engine = match f.engine.kind.get_ref().as_str() {
        "openai" => EngineConfig::OpenAi(OpenAiConfig {
            base_url: o.base_url.get_ref().trim_end_matches('/').to_owned(),
            model: o.model.get_ref().clone(),
            api_key: o.api_key.clone(),
            connect_timeout,
            idle_timeout,
            max_tokens: o.max_tokens,
            system_prompt: o.system_prompt.clone(),
        }),
        other => {
            if other != "synthetic" {
                c.problem("engine.kind", &f.engine.kind, format!("{other:?} is not one of \"synthetic\", \"openai\""));
            }
            EngineConfig::Synthetic(SyntheticConfig {
                first_token,
                tokens_per_second: *s.tokens_per_second.get_ref(),
                answer_tokens,
                refuse_ratio,
                die_ratio,
                tag: s.tag.clone(),
            })
        }
    };
    let config = Config {
        listen_addr,
        node_id: f.server.node_id.get_ref().clone(),
        secret: Some(f.server.secret.get_ref().trim().to_owned()).filter(|s| !s.is_empty()),
        shutdown_grace,
        redis_url: redis.url,
        redis_connect_timeout: redis.connect_timeout,
        redis_command_timeout: redis.command_timeout,
        max_concurrent_streams: c.at_least("limits.max_concurrent_streams", &f.limits.max_concurrent_streams, 1),
        max_body_bytes: c.at_least("limits.max_body_bytes", &f.limits.max_body_bytes, 1024),
        stream_max_len: c.at_least("stream.max_len", &stream.max_len, 16),
        stream_ttl,
        stream_lease,
        stream_abandon_after: abandon,
        history_max_turns: *f.history.max_turns.get_ref(),
        history_ttl,
        engine,
    };
    c.finish(config)
}

impl Config {
    /// The defaults, for tests and embedding.
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/ai-node.toml");
        let config = load(Some(&path), &no_env).unwrap();
        assert!(matches!(config.engine, EngineConfig::Synthetic(_)));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server]\nlisten_adr = \"0.0.0.0:1\"\n").unwrap();
        let err = errors(&path);
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
        let err = errors(&path);
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
        let err = errors(&path);
        assert!(err.contains("engine.synthetic.tokens_per_second"), "{err}");
    }

    #[test]
    fn old_seconds_keys_read_as_the_one_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "[stream]\nttl_secs = 900\nlease = \"1500ms\"\n[history]\nttl = \"2h\"\n").unwrap();
        let c = load(Some(&path), &no_env).unwrap();
        assert_eq!(c.stream_ttl, Duration::from_secs(900));
        assert_eq!(c.stream_lease, Duration::from_millis(1500));
        assert_eq!(c.history_ttl, Duration::from_secs(7200));
        std::fs::write(&path, "[stream]\nlease = \"90s\"\n").unwrap();
        assert!(
            errors(&path).contains("s.toml:2: stream.lease: 90s is not between 100ms and 60s"),
            "{}",
            errors(&path)
        );
    }
}
