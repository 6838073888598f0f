//! The ledger in Redis: the Lua scripts and the reads, one per operation of
//! [`Ledger`]. Every key is built by `crate::keys`; nothing outside this file
//! sends Redis commands for the ledger. The same code runs on one Redis and
//! on a Redis Cluster: each script touches the keys of one request (one hash
//! slot, see `keys`); on a cluster, publishing an event on its session's
//! shard channel and charging an API key happen after the script, in their
//! own slots.

use super::{Cancel, Emitted, Fence, Ledger, Page, Renewal, RequestRecord, NO_PRODUCER};
use crate::redis_conn::{RedisConn, RedisError};
use crate::{keys, Event};
use async_trait::async_trait;
use std::collections::HashMap;
use std::time::Duration;

const CLAIM: &str = r"
local holder = redis.call('HGET', KEYS[1], 'node')
if holder then return holder end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', 1, 'session', ARGV[2], 'message', ARGV[3], 'user', ARGV[4], 'last', 0, 'owner', ARGV[7], 'followed', redis.call('TIME')[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[6])
return false
";

const FENCE: &str = r"
local c = redis.call('HMGET', KEYS[1], 'epoch', 'ended', 'cancelled')
if not c[1] then return {0, 0} end
local epoch = tonumber(c[1])
if c[2] then return {3, epoch} end
if epoch ~= tonumber(ARGV[1]) then return {0, epoch} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {2, epoch} end
redis.call('HSET', KEYS[1], 'epoch', epoch + 1, 'node', 'takeover')
if c[3] then return {4, epoch + 1} end
return {1, epoch + 1}
";

const CANCEL: &str = r"
local c = redis.call('HMGET', KEYS[1], 'epoch', 'ended')
if not c[1] then return 0 end
if c[2] then return 1 end
redis.call('HSET', KEYS[1], 'cancelled', 1)
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 3
";

/// Marks one request as followed now (one script per request, so on a
/// cluster each goes to its own slot).
const TOUCH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'followed', redis.call('TIME')[1]) end
return 1
";

const ADOPT: &str = r"
local c = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'ended', 'cancelled')
if not c[1] or c[3] or c[4] or tonumber(c[1]) ~= tonumber(ARGV[1]) then return 0 end
if c[2] ~= 'takeover' and c[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'node', ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

const RENEW: &str = r"
local c = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'ended', 'cancelled', 'followed')
if not c[1] or c[3] or tonumber(c[1]) ~= tonumber(ARGV[1]) or c[2] ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
if c[4] then return 2 end
local abandon = tonumber(ARGV[5])
if abandon > 0 and c[5] and tonumber(redis.call('TIME')[1]) - tonumber(c[5]) > abandon then
  redis.call('HSET', KEYS[1], 'cancelled', 'abandoned')
  return 2
end
return 1
";

/// Charges an API key for one ended request: `KEYS[1]` its usage hash,
/// `ARGV[1]` its name prefix (`keys::key_prefix`, every name in the key's
/// slot), prompt and completion tokens, the request id. A Lua function body,
/// called by `EMIT` on one Redis and on its own (`CHARGE`) on a cluster,
/// where the key's slot is not the request's.
const CHARGE_BODY: &str = r"
local function charge(usage, base, p, q, request_id)
  redis.call('HINCRBY', usage, 'requests', 1)
  redis.call('HINCRBY', usage, 'prompt_tokens', p)
  redis.call('HINCRBY', usage, 'completion_tokens', q)
  local tpm = base .. ':tpm:' .. math.floor(tonumber(redis.call('TIME')[1]) / 60)
  redis.call('INCRBY', tpm, p + q)
  redis.call('EXPIRE', tpm, 120)
  redis.call('ZREM', base .. ':running', request_id)
end
";

/// Stores one event if its producer still owns the request and its `seq`
/// follows. Returns `{code, owner}`: 1 stored, 4 it was the last stored
/// event already (the producer's retry after a lost reply), 0 or 2 fenced,
/// 3 cancelled; `owner` is the API key to charge when a terminal event was
/// stored. With `ARGV[12] == '1'` (one Redis) it also publishes the event and
/// charges the key, all in one step; on a cluster the caller does both, in
/// the session's and the key's slots.
static EMIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    CHARGE_BODY.to_owned()
        + r"
local inline = ARGV[12] == '1'
local c = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'ended', 'last', 'cancelled', 'owner')
if not c[1] or tonumber(c[1]) ~= tonumber(ARGV[1]) or c[2] ~= ARGV[7] then return {0, ''} end
local last = tonumber(c[4] or '0')
if tonumber(ARGV[2]) == last then return {4, ''} end
if c[3] then return {0, ''} end
if tonumber(ARGV[2]) ~= last + 1 then return {2, ''} end
if c[5] and ARGV[8] ~= '1' then return {3, ''} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[2] .. '-0', 'seq', ARGV[2], 'event', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('HSET', KEYS[1], 'last', ARGV[2])
local owner = ''
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[1], 'ended', ARGV[2])
  redis.call('DEL', KEYS[3])
  -- The key that started the request is charged its tokens, and the
  -- request stops counting among its running ones (names: keys::key_prefix).
  if c[6] and c[6] ~= '' then
    owner = c[6]
    if inline then
      local base = 'chat:key:{' .. owner .. '}'
      charge(base .. ':usage', base, tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11])
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
if inline then redis.call('PUBLISH', ARGV[4], ARGV[3]) end
return {1, owner}
"
});

/// `CHARGE_BODY` on its own, for a cluster.
static CHARGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    CHARGE_BODY.to_owned() + "charge(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])\nreturn 1\n"
});

/// Appends turns to a session's history, keeps the last `ARGV[1]`, sets its
/// life to `ARGV[2]` seconds (one key, so one slot: no `MULTI` needed).
const REMEMBER: &str = r"
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The ledger in Redis: each operation one Lua script (or one read), so the
/// check and the writes are atomic.
pub struct RedisLedger {
    conn: RedisConn,
    /// Approximate cap of a request's stream.
    max_len: usize,
    /// Lifetime of a stream and a claim after their last write.
    ttl: Duration,
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl RedisLedger {
    /// A ledger on the Redis at `url`; calls are bounded by the given timeouts.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        max_len: usize,
        ttl: Duration,
    ) -> Result<RedisLedger, RedisError> {
        Ok(RedisLedger { conn: RedisConn::new(url, connect_timeout, command_timeout)?, max_len, ttl })
    }

    async fn script<T: redis::FromRedisValue>(
        conn: &RedisConn,
        source: &str,
        keys: &[String],
        args: Vec<String>,
    ) -> Result<T, RedisError> {
        let mut pipe = redis::pipe();
        eval(&mut pipe, source, keys, args);
        let (value,): (T,) = conn.query(&pipe).await?;
        Ok(value)
    }

    /// On a cluster, what `EMIT` leaves to the caller: publish the event on
    /// the session's shard channel, and charge the key that owns an ended
    /// request. Should this process stop between `EMIT` and here, the event
    /// is stored but not pushed: readers find it by their gap filling or
    /// stall polling; the charge is then missed (a key is undercharged, never
    /// charged twice).
    async fn after_emit(&self, session_id: &str, event: &Event, owner: &str) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SPUBLISH").arg(keys::session_channel(session_id)).arg(event.to_json()).ignore();
        if !owner.is_empty() {
            let usage = event.usage.unwrap_or_default();
            eval(
                &mut pipe,
                &CHARGE,
                &[keys::key_usage(owner)],
                vec![
                    keys::key_prefix(owner),
                    usage.prompt_tokens.to_string(),
                    usage.completion_tokens.to_string(),
                    event.request_id.clone(),
                ],
            );
            pipe.ignore();
        }
        self.conn.query::<()>(&pipe).await
    }
}

/// Adds `EVAL source numkeys keys... args...` to `pipe`.
fn eval(pipe: &mut redis::Pipeline, source: &str, keys: &[String], args: Vec<String>) {
    let cmd = pipe.cmd("EVAL").arg(source).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    for a in args {
        cmd.arg(a);
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn claim(
        &self,
        request_id: &str,
        record: &RequestRecord,
        lease: Duration,
    ) -> Result<Option<String>, RedisError> {
        let conn = &self.conn;
        let ttl = self.ttl;
        let args = vec![
            record.node.clone(),
            record.session_id.clone(),
            record.message.clone(),
            record.user_id.clone().unwrap_or_default(),
            ttl.as_secs().to_string(),
            millis(lease),
            record.owner.clone().unwrap_or_default(),
        ];
        let keys = [keys::request_claim(request_id), keys::request_lease(request_id)];
        Self::script(conn, CLAIM, &keys, args).await
    }

    async fn fence(&self, request_id: &str, expected: u64) -> Result<Fence, RedisError> {
        let conn = &self.conn;
        let keys = [keys::request_claim(request_id), keys::request_lease(request_id)];
        let (outcome, epoch): (i64, u64) = Self::script(conn, FENCE, &keys, vec![expected.to_string()]).await?;
        Ok(match outcome {
            1 => Fence::Won(epoch),
            2 => Fence::ProducerAlive,
            3 => Fence::Ended,
            4 => Fence::Cancelled(epoch),
            _ => Fence::Moved(epoch),
        })
    }

    async fn adopt(&self, request_id: &str, epoch: u64, node: &str, lease: Duration) -> Result<bool, RedisError> {
        let conn = &self.conn;
        let args = vec![epoch.to_string(), node.to_owned(), millis(lease)];
        let keys = [keys::request_claim(request_id), keys::request_lease(request_id)];
        let adopted: i64 = Self::script(conn, ADOPT, &keys, args).await?;
        Ok(adopted == 1)
    }

    async fn renew(
        &self,
        request_id: &str,
        epoch: u64,
        node: &str,
        lease: Duration,
        abandon_after: Duration,
    ) -> Result<Renewal, RedisError> {
        let conn = &self.conn;
        let ttl = self.ttl;
        let args = vec![
            epoch.to_string(),
            node.to_owned(),
            millis(lease),
            ttl.as_secs().to_string(),
            abandon_after.as_secs().to_string(),
        ];
        let keys = [keys::request_claim(request_id), keys::request_lease(request_id), keys::request_stream(request_id)];
        let renewed: i64 = Self::script(conn, RENEW, &keys, args).await?;
        Ok(match renewed {
            1 => Renewal::Held,
            2 => Renewal::Cancelled,
            _ => Renewal::Lost,
        })
    }

    async fn cancel(&self, request_id: &str) -> Result<Cancel, RedisError> {
        let conn = &self.conn;
        let keys = [keys::request_claim(request_id), keys::request_lease(request_id)];
        let outcome: i64 = Self::script(conn, CANCEL, &keys, Vec::new()).await?;
        Ok(match outcome {
            0 => Cancel::Unknown,
            1 => Cancel::Ended,
            2 => Cancel::Stopping,
            _ => Cancel::Orphaned,
        })
    }

    async fn touch(&self, request_ids: &[String]) -> Result<(), RedisError> {
        if request_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in request_ids {
            eval(&mut pipe, TOUCH, &[keys::request_claim(id)], Vec::new());
            pipe.ignore();
        }
        self.conn.query::<()>(&pipe).await
    }

    async fn emit(&self, session_id: &str, event: &Event) -> Result<Emitted, RedisError> {
        let conn = &self.conn;
        let ttl = self.ttl;
        let max_len = self.max_len;
        let args = vec![
            event.epoch.map(|e| e.to_string()).unwrap_or_default(),
            event.seq.to_string(),
            event.to_json(),
            keys::session_channel(session_id),
            max_len.to_string(),
            ttl.as_secs().to_string(),
            event.node.clone().unwrap_or_else(|| NO_PRODUCER.to_owned()),
            if event.is_terminal() { "1" } else { "" }.to_owned(),
            event.usage.map_or(0, |u| u.prompt_tokens).to_string(),
            event.usage.map_or(0, |u| u.completion_tokens).to_string(),
            event.request_id.clone(),
            if conn.is_cluster() { "" } else { "1" }.to_owned(),
        ];
        let keys = [
            keys::request_claim(&event.request_id),
            keys::request_stream(&event.request_id),
            keys::request_lease(&event.request_id),
        ];
        let (code, owner): (i64, String) = Self::script(conn, &EMIT, &keys, args).await?;
        Ok(match code {
            1 | 4 => {
                if conn.is_cluster() {
                    // A retry (4) publishes again: the first attempt may have
                    // stopped before it; readers drop a repeated seq.
                    self.after_emit(session_id, event, &owner).await?;
                }
                Emitted::Published
            }
            3 => Emitted::Cancelled,
            _ => Emitted::Fenced,
        })
    }

    async fn record(&self, request_id: &str) -> Result<Option<RequestRecord>, RedisError> {
        let conn = &self.conn;
        let mut pipe = redis::pipe();
        pipe.hgetall(keys::request_claim(request_id));
        let (fields,): (HashMap<String, String>,) = conn.query(&pipe).await?;
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(RequestRecord {
            session_id: get("session"),
            message: get("message"),
            user_id: Some(get("user")).filter(|u| !u.is_empty()),
            node: get("node"),
            epoch: get("epoch").parse().unwrap_or(0),
            owner: Some(get("owner")).filter(|o| !o.is_empty()),
            cancelled: fields.contains_key("cancelled"),
        }))
    }

    async fn page(&self, request_id: &str, after_seq: u64, count: usize) -> Result<Page, RedisError> {
        let conn = &self.conn;
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(keys::request_stream(request_id))
            .arg(format!("{}-0", after_seq.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .cmd("HMGET")
            .arg(keys::request_claim(request_id))
            .arg("last")
            .arg("ended");
        type Entries = Vec<(String, HashMap<String, String>)>;
        let (entries, (last, ended)): (Entries, (Option<u64>, Option<u64>)) = conn.query(&pipe).await?;
        let events: Vec<Event> =
            entries.into_iter().filter_map(|(_, f)| f.get("event").and_then(|j| Event::from_json(j).ok())).collect();
        let known = last.is_some() || !events.is_empty();
        let last_seq = last.unwrap_or(0).max(events.last().map_or(0, |e| e.seq));
        let ended = ended.or_else(|| events.iter().find(|e| e.is_terminal()).map(|e| e.seq));
        Ok(Page { events, known, last_seq, ended })
    }

    async fn history(&self, session_id: &str) -> Result<Vec<String>, RedisError> {
        let conn = &self.conn;
        let mut pipe = redis::pipe();
        pipe.lrange(keys::session_history(session_id), 0, -1);
        let (items,): (Vec<String>,) = conn.query(&pipe).await?;
        Ok(items)
    }

    async fn remember(
        &self,
        session_id: &str,
        items: Vec<String>,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        let mut args = vec![keep.max(1).to_string(), ttl.as_secs().max(1).to_string()];
        args.extend(items);
        Self::script::<i64>(&self.conn, REMEMBER, &[keys::session_history(session_id)], args).await.map(|_| ())
    }

    async fn ping(&self) -> Result<(), RedisError> {
        let conn = &self.conn;
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        conn.query::<(String,)>(&pipe).await.map(|_| ())
    }
}
