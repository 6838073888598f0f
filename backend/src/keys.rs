//! API keys: who is asking, and what that key may do.
//!
//! Off by default (`auth.enabled`); then every request is anonymous and
//! nothing here runs. On, a request to `/api/*` or `/v1/*` carries
//! `Authorization: Bearer <key>`, and a browser's WebSocket offers the
//! subprotocol `bearer.<key>` next to `chat` (browsers cannot set headers on
//! a WebSocket, and a subprotocol, unlike a query string, stays out of
//! access logs). Keys are never stored: the file (`auth.keys_file`) and
//! Redis (`chat:apikey:<sha256>`) hold the SHA-256 of each, with its id and
//! limits; a lookup is cached for `auth.cache` (so a revocation in Redis
//! holds within it).
//!
//! What a key owns and spends lives in Redis, shared by every backend:
//! a session belongs to the first key that used it (`chat:session:{<session>}:owner`),
//! and another key gets `404` for it and for its requests; requests per
//! minute and running streams are counted at admission; tokens per minute
//! and the usage totals are added by the AI node when a request ends.

use chat_wire::redis_conn::{RedisConn, RedisError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A known, unrevoked key: its id (never the key itself) and its limits
/// (0 is unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub requests_per_minute: u64,
    pub concurrent_streams: u64,
    pub tokens_per_minute: u64,
}

/// Why a request has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No key presented.
    Missing,
    /// A key no one issued, or one revoked.
    Invalid,
    /// The key store (Redis) did not answer.
    Unavailable,
}

impl AuthError {
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "an API key is needed: Authorization: Bearer <key>",
            AuthError::Invalid => "the API key is not valid",
            AuthError::Unavailable => "the key store is unreachable; try again",
        }
    }
}

/// The SHA-256 of a key, in hex: what files and Redis hold.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random key: `sk-` and 64 hex digits from the OS's random source
/// (two v4 UUIDs, 244 random bits).
pub fn generate() -> String {
    format!("sk-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The key a request presents: the bearer token, or the `bearer.<key>`
/// WebSocket subprotocol.
pub fn presented(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned()).filter(|t| !t.is_empty());
    }
    let protocols = headers.get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    protocols.split(',').find_map(|p| p.trim().strip_prefix("bearer.")).map(str::to_owned).filter(|t| !t.is_empty())
}

/// `[[key]]` in the keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: String,
    sha256: String,
    #[serde(default)]
    requests_per_minute: u64,
    #[serde(default)]
    concurrent_streams: u64,
    #[serde(default)]
    tokens_per_minute: u64,
    #[serde(default)]
    revoked: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<FileKey>,
}

/// Reads a keys file: `[[key]]` tables with `id`, `sha256` and limits.
pub fn read_file(path: &Path) -> Result<HashMap<String, Option<Key>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let file: KeysFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for k in file.key {
        chat_wire::validate_id("key id", &k.id)
            .map_err(|e| format!("{}: key {:?}: {}", path.display(), k.id, e.reason))?;
        let sha = k.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{}: key {:?}: sha256 must be 64 hex digits", path.display(), k.id));
        }
        let key = Key {
            id: k.id,
            requests_per_minute: k.requests_per_minute,
            concurrent_streams: k.concurrent_streams,
            tokens_per_minute: k.tokens_per_minute,
        };
        keys.insert(sha, (!k.revoked).then_some(key));
    }
    Ok(keys)
}

/// Looks keys up: the file first, then Redis, with a short cache.
pub struct Keys {
    file: HashMap<String, Option<Key>>,
    redis: RedisConn,
    cache: Mutex<HashMap<String, (Instant, Option<Key>)>>,
    cache_for: Duration,
}

/// Most cached lookups; past it the cache starts over (a flood of made-up keys).
const CACHE_MAX: usize = 10_000;

impl Keys {
    pub fn new(file: HashMap<String, Option<Key>>, redis: RedisConn, cache_for: Duration) -> Keys {
        Keys { file, redis, cache: Mutex::new(HashMap::new()), cache_for }
    }

    /// The key behind what a request presented.
    pub async fn check(&self, presented: Option<&str>) -> Result<Key, AuthError> {
        let presented = presented.ok_or(AuthError::Missing)?;
        let sha = hash(presented);
        if let Some(known) = self.file.get(&sha) {
            return known.clone().ok_or(AuthError::Invalid);
        }
        if let Some((at, known)) = self.cache.lock().expect("keys cache").get(&sha) {
            if at.elapsed() < self.cache_for {
                return known.clone().ok_or(AuthError::Invalid);
            }
        }
        let known = self.lookup(&sha).await.map_err(|e| {
            log::warn!("key lookup failed: {e}");
            AuthError::Unavailable
        })?;
        let mut cache = self.cache.lock().expect("keys cache");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(sha, (Instant::now(), known.clone()));
        known.ok_or(AuthError::Invalid)
    }

    async fn lookup(&self, sha: &str) -> Result<Option<Key>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(chat_wire::keys::api_key(sha));
        let (fields,): (HashMap<String, String>,) = self.redis.query(&pipe).await?;
        let num = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let Some(id) = fields.get("id") else { return Ok(None) };
        if fields.get("revoked").is_some_and(|v| v == "1" || v == "true") {
            return Ok(None);
        }
        Ok(Some(Key {
            id: id.clone(),
            requests_per_minute: num("requests_per_minute"),
            concurrent_streams: num("concurrent_streams"),
            tokens_per_minute: num("tokens_per_minute"),
        }))
    }
}

/// Claims `session` for `key_id`, or tells whether it already is its own.
const OWN: &str = r"
local o = redis.call('GET', KEYS[1])
if not o then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
if o == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
";

/// Admits one request of a key against its limits; on success counts it in
/// this minute's requests and among its running ones. 0 admitted, 1 requests
/// per minute, 2 tokens per minute, 3 concurrent streams. The minute and the
/// start times are Redis's clock, as in the node's charge (`EMIT`).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(tonumber(t[1]) / 60)
local rpm, tpm, running = ARGV[1] .. ':rpm:' .. minute, ARGV[1] .. ':tpm:' .. minute, ARGV[1] .. ':running'
redis.call('ZREMRANGEBYSCORE', running, '-inf', now - tonumber(ARGV[6]))
if tonumber(ARGV[4]) > 0 and redis.call('ZCARD', running) >= tonumber(ARGV[4]) then return 3 end
if tonumber(ARGV[3]) > 0 and tonumber(redis.call('GET', tpm) or '0') >= tonumber(ARGV[3]) then return 2 end
if tonumber(ARGV[2]) > 0 and tonumber(redis.call('GET', rpm) or '0') >= tonumber(ARGV[2]) then return 1 end
redis.call('INCR', rpm)
redis.call('EXPIRE', rpm, 120)
redis.call('ZADD', running, now, ARGV[5])
redis.call('EXPIRE', running, math.floor(tonumber(ARGV[6]) / 1000))
return 0
";

/// This minute's requests and tokens of a key (Redis's clock, as `ADMIT`).
const THIS_MINUTE: &str = r"
local minute = math.floor(tonumber(redis.call('TIME')[1]) / 60)
return {tonumber(redis.call('GET', ARGV[1] .. ':rpm:' .. minute) or '0'), tonumber(redis.call('GET', ARGV[1] .. ':tpm:' .. minute) or '0')}
";

/// Which of a key's limits a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    RequestsPerMinute,
    TokensPerMinute,
    ConcurrentStreams,
}

/// How long a session stays owned after its last use (its history's life).
pub const OWNERSHIP_TTL: Duration = Duration::from_secs(86_400);

/// A running request no node ended within this is no longer counted as running.
pub const RUNNING_AT_MOST: Duration = Duration::from_secs(3_600);

impl Keys {
    /// Whether `session_id` is `key_id`'s (claiming it when no key has it).
    pub async fn own_session(&self, session_id: &str, key_id: &str) -> Result<bool, RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(OWN)
            .arg(1)
            .arg(chat_wire::keys::session_owner(session_id))
            .arg(key_id)
            .arg(OWNERSHIP_TTL.as_secs());
        let (owned,): (i64,) = self.redis.query(&pipe).await?;
        Ok(owned == 1)
    }

    /// Admits `request_id` of `key` against its limits.
    pub async fn admit(&self, key: &Key, request_id: &str) -> Result<Result<(), Over>, RedisError> {
        let mut pipe = redis::pipe();
        // One key declared (its running set) routes the script to the key's
        // slot on a cluster; the others share its hash tag.
        pipe.cmd("EVAL")
            .arg(ADMIT)
            .arg(1)
            .arg(chat_wire::keys::key_running(&key.id))
            .arg(chat_wire::keys::key_prefix(&key.id))
            .arg(key.requests_per_minute)
            .arg(key.tokens_per_minute)
            .arg(key.concurrent_streams)
            .arg(request_id)
            .arg(RUNNING_AT_MOST.as_millis() as u64);
        let (code,): (i64,) = self.redis.query(&pipe).await?;
        Ok(match code {
            0 => Ok(()),
            1 => Err(Over::RequestsPerMinute),
            2 => Err(Over::TokensPerMinute),
            _ => Err(Over::ConcurrentStreams),
        })
    }

    /// Takes back an admission whose request never started (no node took it).
    pub async fn unadmit(&self, key: &Key, request_id: &str) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.zrem(chat_wire::keys::key_running(&key.id), request_id).ignore();
        self.redis.query::<()>(&pipe).await
    }

    /// The key's usage: totals since it was first used, and this minute's.
    pub async fn usage(&self, key: &Key) -> Result<serde_json::Value, RedisError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(chat_wire::keys::key_usage(&key.id))
            .cmd("EVAL")
            .arg(THIS_MINUTE)
            .arg(1)
            .arg(chat_wire::keys::key_running(&key.id))
            .arg(chat_wire::keys::key_prefix(&key.id))
            .zcard(chat_wire::keys::key_running(&key.id));
        let (totals, (rpm, tpm), running): (HashMap<String, u64>, (u64, u64), u64) = self.redis.query(&pipe).await?;
        let total = |name: &str| totals.get(name).copied().unwrap_or(0);
        Ok(serde_json::json!({
            "key_id": key.id,
            "requests": total("requests"),
            "prompt_tokens": total("prompt_tokens"),
            "completion_tokens": total("completion_tokens"),
            "total_tokens": total("prompt_tokens") + total("completion_tokens"),
            "this_minute": {"requests": rpm, "tokens": tpm},
            "running": running,
            "limits": {
                "requests_per_minute": key.requests_per_minute,
                "tokens_per_minute": key.tokens_per_minute,
                "concurrent_streams": key.concurrent_streams,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    #[test]
    fn a_key_is_found_in_the_bearer_header_or_the_websocket_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert("authorization", "Bearer sk-abc".parse().unwrap());
        assert_eq!(presented(&h).as_deref(), Some("sk-abc"));
        h.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(presented(&h), None, "only bearer tokens");
        let mut h = HeaderMap::new();
        h.insert("sec-websocket-protocol", "chat, bearer.sk-xyz".parse().unwrap());
        assert_eq!(presented(&h).as_deref(), Some("sk-xyz"));
        h.insert("sec-websocket-protocol", "chat".parse().unwrap());
        assert_eq!(presented(&h), None);
    }

    #[test]
    fn keys_are_hashed_and_files_hold_only_hashes() {
        assert_eq!(hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let k = generate();
        assert!(k.starts_with("sk-") && k.len() == 67, "{k}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let text = format!(
            "[[key]]\nid = \"a\"\nsha256 = \"{}\"\nrequests_per_minute = 5\n[[key]]\nid = \"b\"\nsha256 = \"{}\"\nrevoked = true\n",
            hash("one"),
            hash("two")
        );
        std::fs::write(&path, text).unwrap();
        let keys = read_file(&path).unwrap();
        assert_eq!(keys[&hash("one")].as_ref().map(|k| (k.id.as_str(), k.requests_per_minute)), Some(("a", 5)));
        assert_eq!(keys[&hash("two")], None, "revoked");
        std::fs::write(&path, "[[key]]\nid = \"a\"\nsha256 = \"xyz\"\n").unwrap();
        assert!(read_file(&path).unwrap_err().contains("64 hex digits"));
    }
}
