//! The Redis store: a connection manager that reconnects by itself, Lua
//! scripts for the atomic operations, a stream for the outbox.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RedisFuture, Script, Value};

use super::{
    Answer, Claim, Commit, Committed, Fence, Finished, Inbox, LEADER_LEASE, OutboxEntry, prefix, unavailable,
};
use crate::error::{Error, ErrorKind, Result};
use crate::store::batch::{Batcher, Call, SendBatch};
use crate::store::shards;

/// How to reach Redis: `REDIS_URL` (`redis://` or `rediss://`, with
/// `user:password@` or `:password@` for AUTH) and TLS files.
#[derive(Debug, Clone)]
pub(crate) struct RedisConnect {
    /// One URL, or in cluster mode several seed nodes, comma separated.
    pub url: String,
    /// One server, Redis Cluster or Sentinel (`CATGA_REDIS_MODE`).
    pub mode: crate::config::RedisMode,
    /// The master's name in Sentinel mode.
    pub sentinel_master: String,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
}

impl RedisConnect {
    /// The store `config` names, if it names one (`REDIS_URL`).
    pub(crate) fn from_config(config: &crate::config::Config) -> Option<RedisConnect> {
        Some(RedisConnect {
            url: config.redis_url.clone()?,
            mode: config.redis_mode,
            sentinel_master: config.redis_sentinel_master.clone(),
            tls_ca: config.redis_tls.ca.clone(),
            tls_cert: config.redis_tls.cert.clone(),
            tls_key: config.redis_tls.key.clone(),
        })
    }
}

/// How long one store operation may take before it fails (retryably).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct RedisStore {
    /// Everything but the outbox's blocking reads.
    conn: Conn,
    /// The outbox's blocking reads: a blocked read holds its connection,
    /// and the main connection is shared by every handler.
    relay: Conn,
    /// Control keys: leases and their fences, members, dead-letter
    /// records, the shard count's mark (see [`shards`]).
    prefix: String,
    /// Each shard's data prefix; one shard's is `prefix`.
    shards: Vec<String>,
    /// Each shard's outbox stream.
    outboxes: Vec<String>,
    /// Lease fences raised in every shard, by lease: the token raised.
    raised: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Set once the store's shard count was found to be this runtime's.
    layout: tokio::sync::OnceCell<()>,
    /// Commits one at a time (those without an inbox part).
    commit: Script,
    /// Commits with an inbox part, gathered per shard (see [`batch`]).
    ///
    /// [`batch`]: super::batch
    commits: Batcher<CommitCall>,
    /// Inbox claims, gathered per shard.
    claims: Batcher<ClaimCall>,
    /// Deletes a key if the caller still holds it (inbox claims; leases
    /// are given up through `lease_sync`).
    delete_if_held: Script,
    finish_if_held: Script,
    saga_write: Script,
    lease_sync: Script,
    members: Script,
    raise: Script,
    mark_layout: Script,
    delayed_release: Script,
    delayed_cancel: Script,
    outbox_waiting: Script,
}

/// A connection to Redis, whichever the topology; cheap to clone, and
/// every clone shares the same connections.
#[derive(Clone)]
enum Conn {
    /// One server: a connection manager that reconnects by itself.
    Server(ConnectionManager),
    /// Redis Cluster: commands go to the node that owns their key's slot
    /// (every key of a service carries the service as hash tag, so one
    /// atomic operation stays on one node), following MOVED and ASK when
    /// slots move. Connected on first use, so a cluster that is down at
    /// start-up does not stop the runtime.
    Cluster(Arc<LazyCluster>),
    /// A master found through Redis Sentinel, found again after a
    /// failover (see [`Followed`]).
    Sentinel(Arc<Followed>),
}

/// The connection to the master that Sentinel names. Sentinel does not
/// move clients: a connection to the old master either fails (it is
/// down) or, once it is back as a replica, answers writes with READONLY.
/// Either error drops the connection, and the next operation asks the
/// sentinels for the master again.
struct Followed {
    sentinel: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    master: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    config: redis::AsyncConnectionConfig,
}

impl Followed {
    async fn get(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another operation may have found it while this one waited.
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *self
            .master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    fn current(&self) -> Option<redis::aio::MultiplexedConnection> {
        self.master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drops the connection after an error that says the master moved.
    fn check<T>(&self, r: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &r
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.code() == Some("READONLY"))
        {
            *self
                .master
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        r
    }
}

struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    /// The shared cluster connection, connecting first if no attempt has
    /// succeeded yet (a failed attempt is tried again on the next use).
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(c) => c.req_packed_command(cmd),
            Conn::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
            Conn::Sentinel(f) => Box::pin(async move {
                let mut c = f.get().await?;
                f.check(c.req_packed_command(cmd).await)
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(lazy) => Box::pin(async move {
                lazy.get()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
            Conn::Sentinel(f) => Box::pin(async move {
                let mut c = f.get().await?;
                f.check(c.req_packed_commands(pipeline, offset, count).await)
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(c) => c.get_db(),
            Conn::Cluster(_) | Conn::Sentinel(_) => 0,
        }
    }
}

/// Why a call found no answer: none came within `limit`.
pub(crate) fn not_within(limit: Duration) -> String {
    format!("the state store does not answer within {} s", limit.as_secs_f64())
}

/// A Redis failure: unavailable (retryable) while Redis is away, refuses
/// the credentials or fails the TLS handshake; anything else internal.
///
/// Refused credentials and TLS failures are the replica's configuration,
/// not the sender's fault: a handler that needs the store fails with a
/// retryable "unavailable" (a 503 whose text stays in the log), and the
/// text (which names the cause and never the secret) is what readiness
/// reports.
fn map_err(e: RedisError) -> Error {
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        return Error::new(
            ErrorKind::Unavailable,
            format!(
                "Redis refused the credentials ({}): check the user and password in REDIS_URL",
                e.code().unwrap_or("authentication failed")
            ),
        );
    }
    // redis-rs reports a failed TLS handshake as an I/O error; rustls'
    // text names the certificate or the alert.
    let text = e.to_string();
    if [
        "certificate",
        "Certificate",
        "alert",
        "handshake",
        "UnknownIssuer",
    ]
    .iter()
    .any(|w| text.contains(w))
    {
        return Error::new(
            ErrorKind::Unavailable,
            format!(
                "the TLS handshake with Redis failed ({text}): check REDIS_TLS_CA, REDIS_TLS_CERT and REDIS_TLS_KEY"
            ),
        );
    }
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "LOADING" | "READONLY")
        )
        // During a Sentinel failover: no server is master yet.
        || matches!(
            e.kind(),
            redis::ErrorKind::MasterNameNotFoundBySentinel | redis::ErrorKind::NoValidReplicasFoundBySentinel
        )
    {
        return unavailable(e);
    }
    Error::new(ErrorKind::Internal, format!("Redis: {e}"))
}

/// A Sentinel client that presents `certs` (`REDIS_TLS_*`) to the
/// sentinels and to the master they name, both reached over TLS when
/// `REDIS_URL` is `rediss://`. redis-rs takes certificates only through
/// its builder, which sets one user and password for every sentinel and
/// one for the master: those of the first URL, as without certificates.
fn sentinel_with_certs(
    sentinels: &[&str],
    first: &redis::ConnectionInfo,
    tls: bool,
    how: &RedisConnect,
    certs: &redis::TlsCertificates,
) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    let addrs = sentinels
        .iter()
        .map(|u| redis::IntoConnectionInfo::into_connection_info(*u).map(|i| i.addr().clone()))
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let settings = first.redis_settings();
    let mut b = redis::sentinel::SentinelClientBuilder::new(
        addrs,
        how.sentinel_master.as_str(),
        redis::sentinel::SentinelServerType::Master,
    )?
    .set_client_to_redis_db(settings.db());
    if tls {
        b = b
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_certificates(certs.clone())
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certs.clone());
    }
    if let Some(user) = settings.username() {
        b = b
            .set_client_to_sentinel_username(user)
            .set_client_to_redis_username(user);
    }
    if let Some(password) = settings.password() {
        b = b
            .set_client_to_sentinel_password(password)
            .set_client_to_redis_password(password);
    }
    b.build()
}

/// The URLs of a comma-separated `REDIS_URL` (cluster nodes, sentinels).
fn urls(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

fn read_file(name: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("{name}: cannot read {}: {e}", path.display()),
        )
    })
}

/// Writes a commit (see `Commit`): checks every state's version and the
/// inbox claim, then writes states, the inbox answer and the outbox
/// entries, or nothing.
///
/// KEYS: the state keys, the outbox stream, the delayed entries' sorted
/// set and hash, the inbox key (if any), the leader fence key (if
/// fenced).
/// ARGV: state count, "1" if there is an inbox part, the fencing token (or
/// ""), (expected version, data) per state, then (claim marker, answer, window ms) if there is an
/// inbox part, then (id, subject, headers, payload, due ms or "") per
/// event: an event with a due time waits in the delayed set until the
/// relay moves it to the outbox (see `DELAYED_RELEASE`).
/// The commit function the two scripts below share.
const COMMIT_FN: &str = r"
local function commit(K, A)
  local n = tonumber(A[1])
  local has_inbox = A[2] == '1'
  if A[3] ~= '' and (redis.call('GET', K[#K]) or '0') ~= A[3] then
    return {3}
  end
  for i = 1, n do
    local cur = redis.call('HGET', K[i], 'v')
    local expected = tonumber(A[2 + 2 * i])
    if (cur == false and expected ~= 0) or (cur ~= false and tonumber(cur) ~= expected) then
      return {0, i, tonumber(cur or '0')}
    end
  end
  local at = 4 + 2 * n
  if has_inbox and redis.call('GET', K[n + 4]) ~= A[at] then
    return {2}
  end
  -- The events first and the inbox answer last: a write that fails (an
  -- outbox or delayed key of another type) leaves no answer kept for
  -- writes that are not there; the states were checked above.
  local ev = at
  if has_inbox then
    ev = at + 3
  end
  for j = ev, #A, 5 do
    if A[j + 4] == '' then
      redis.call('XADD', K[n + 1], '*', 'id', A[j], 'subject', A[j + 1], 'headers', A[j + 2], 'payload', A[j + 3])
    else
      local id = A[j]
      redis.call('ZADD', K[n + 2], A[j + 4], id)
      redis.call('HSET', K[n + 3], id .. ':s', A[j + 1], id .. ':h', A[j + 2], id .. ':p', A[j + 3])
    end
  end
  local out = {1}
  for i = 1, n do
    local version = tonumber(A[2 + 2 * i]) + 1
    redis.call('HSET', K[i], 'v', version, 'd', A[3 + 2 * i])
    out[i + 1] = version
  end
  if has_inbox then
    redis.call('SET', K[n + 4], A[at + 1], 'PX', A[at + 2])
  end
  return out
end
";

/// One commit: KEYS and ARGV as `commit` takes them.
const COMMIT_ONE: &str = "return commit(KEYS, ARGV)";

/// Several commits, each on its own (one's conflict or error leaves the
/// others be): ARGV[1] is how many; then per commit its key count, its
/// argument count and its arguments; its keys follow the previous
/// commit's in KEYS. Returns each commit's result, in order; {4} for a
/// commit that found a key of another type (what it wrote before stays,
/// as with one commit's script). Any other error fails the whole call.
const COMMIT_MANY: &str = r"
local out, ko, ao = {}, 0, 1
for c = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[ao + 1]), tonumber(ARGV[ao + 2])
  ao = ao + 2
  local K, A = {}, {}
  for i = 1, nk do
    K[i] = KEYS[ko + i]
  end
  for i = 1, na do
    A[i] = ARGV[ao + i]
  end
  local ok, r = pcall(commit, K, A)
  if ok then
    out[c] = r
  else
    -- A key of another type fails this commit alone; anything else
    -- (READONLY after a failover, OOM, MISCONF) fails the call as it
    -- would fail one commit's script. Redis 7 raises a table, 6 a string.
    local e = type(r) == 'table' and r.err or tostring(r)
    if string.find(e, 'WRONGTYPE', 1, true) then
      out[c] = {4}
    else
      return redis.error_reply(e)
    end
  end
  ko, ao = ko + nk, ao + na
end
return out
";

/// Moves the delayed entries due by now (Redis' clock, the same for
/// every relay; unix ms), at most `ARGV[1]`, from the delayed set and
/// hash (KEYS[1], KEYS[2]) to the end of the outbox (KEYS[3]), in due
/// order; returns how many moved, the due time of the next one (or -1)
/// and now. One script: an entry is moved once, whichever relay runs it.
const DELAYED_RELEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', KEYS[2], id .. ':s', id .. ':h', id .. ':p')
  if f[1] then
    redis.call('XADD', KEYS[3], '*', 'id', id, 'subject', f[1], 'headers', f[2], 'payload', f[3])
  end
  redis.call('HDEL', KEYS[2], id .. ':s', id .. ':h', id .. ':p')
  redis.call('ZREM', KEYS[1], id)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#ids, tonumber(next[2] or '-1'), now}
";

/// How many entries wait in an outbox (KEYS[1]), the time its oldest was
/// appended (the unix ms of its stream id, or -1 when none waits), and
/// now, both by the master's clock: the age needs no clock of the
/// replica's.
const OUTBOX_WAITING: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local at = -1
if first then at = tonumber(string.match(first[1], '^(%d+)')) end
return {redis.call('XLEN', KEYS[1]), at, now}
";

/// Cancels the delayed entry `ARGV[1]` (KEYS: its set and hash): 1 if it
/// was still waiting, 0 if it was not there (never, or moved already).
const DELAYED_CANCEL: &str = r"
local id = ARGV[1]
if redis.call('ZREM', KEYS[1], id) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], id .. ':s', id .. ':h', id .. ':p')
return 1
";

/// Claims inbox keys (KEYS, one per claim) or returns what they hold:
/// per key, five arguments in ARGV: the claim, how long it is kept (ms),
/// the liveness keys' prefix, the claiming replica and how long it is
/// said alive (ms). Returns per key '' if claimed, else what it holds.
/// Each claim first says its replica alive (once per replica and call).
/// A claim whose replica's liveness key (the prefix followed by the
/// replica's name, in the same hash slot) is gone has lapsed and is taken
/// over. That key is not in KEYS: its name is read from the claim; it
/// shares the inbox key's hash tag, so it is on the same node of a
/// cluster. Claims of one call run in order: a second claim of a key in
/// the same call finds the first. A key holding the same claim (a call
/// sent again after its reply was lost) is claimed.
const INBOX_BEGIN: &str = r"
local said = {}
local out = {}
for i = 1, #KEYS do
  local a = 5 * (i - 1)
  local prefix = ARGV[a + 3]
  local alive = prefix .. ARGV[a + 4]
  if not said[alive] then
    redis.call('SET', alive, 1, 'PX', ARGV[a + 5])
    said[alive] = true
  end
  local v = redis.call('GET', KEYS[i])
  if v == ARGV[a + 1] then
    v = false
  elseif v and string.sub(v, 1, 2) == 'P:' then
    local member = string.match(v, '^P:[^:]*:[^:]*:(.*)$')
    if member == nil or redis.call('EXISTS', prefix .. member) == 0 then
      v = false
    end
  end
  if v then
    out[i] = v
  else
    redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2])
    out[i] = ''
  end
end
return out
";

/// Keeps the answer `ARGV[2]` in an inbox key (KEYS[1]) for `ARGV[3]` ms
/// if the claim `ARGV[1]` still holds it: 1 if written, else what the key
/// holds ('' if nothing).
const FINISH_IF_HELD: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return v or ''
";

/// Deletes a key (an inbox claim) if `ARGV[1]` still
/// holds it.
const DELETE_IF_HELD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Writes fields of a saga's journal (KEYS[1]) unless `ARGV[1]` is a
/// fencing token that is not the latest (KEYS[2]), or `ARGV[2]` is a run
/// claim no longer held (KEYS[4]: the run's inbox key; another run took
/// it over), and lists saga `ARGV[4]` in KEYS[3] at time `ARGV[3]` the
/// first time; then (field, value) pairs. 1 if written, 2 if fenced, 0
/// if the run's claim is lost.
const SAGA_WRITE: &str = r"
if ARGV[1] ~= '' and (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
  return 2
end
if ARGV[2] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[2] then
  return 0
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[4])
return 1
";

/// Brings leases in line (see `Store::lease_sync`). KEYS: per lease, its
/// key and its fence key. ARGV: the owner, the lease in ms, then per lease
/// '1' (wanted) or '0'. Returns the token per lease, 0 where not held.
///
/// A grant's token is the greater of the last token plus one and the
/// server's clock in milliseconds: tokens only grow, also after a failover
/// to a replica that never saw the last grant, or an eviction of the fence
/// key (an `INCR` alone would issue a token again, and a stale holder's
/// writes would pass). The clocks of the Redis hosts must agree within a
/// lease for this to hold across a failover. Formatted with `%d`: Lua
/// prints numbers this large in exponent form otherwise.
const LEASE_SYNC: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local k, f = KEYS[2 * i - 1], KEYS[2 * i]
  local held = redis.call('GET', k) == ARGV[1]
  out[i] = 0
  if ARGV[2 + i] == '1' then
    if held then
      redis.call('PEXPIRE', k, ARGV[2])
      out[i] = tonumber(redis.call('GET', f) or '0')
      -- The fence vanished under a held lease (evicted): a new grant.
      if out[i] == 0 then
        out[i] = now
        redis.call('SET', f, string.format('%d', now))
      end
    elseif redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then
      local token = math.max(tonumber(redis.call('GET', f) or '0') + 1, now)
      redis.call('SET', f, string.format('%d', token))
      out[i] = token
    end
  elseif held then
    redis.call('DEL', k)
  end
end
return out
";

/// Membership (KEYS[1], a sorted set by last heartbeat, on the server's
/// clock so that replicas' clocks do not matter): adds `ARGV[1]` now (or
/// removes it when `ARGV[3]` is '0'), forgets members silent for `ARGV[2]`
/// ms, and returns those left.
const MEMBERS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Raises copies of lease fences (KEYS) to tokens (ARGV, in order) where
/// they are lower: a shard's copy of a fence only grows.
const RAISE: &str = r"
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < tonumber(ARGV[i]) then
    redis.call('SET', KEYS[i], ARGV[i])
  end
end
return 1
";

/// The store's shard count (KEYS[1], `<prefix>:shards`), marked with
/// `ARGV[1]` the first time. A sharded store whose mark was lost
/// (evicted, deleted) still holds the fences of its shards' relay leases
/// (`<prefix>:relay:<i>:fence`, in the same slot; every shard's relay
/// lease is granted soon after a start): it is marked with the count its
/// highest one gives (up to 256, `MAX_STORE_SHARDS`). Looked at first,
/// since such a store may also hold the
/// marks of one shard below (a `leader` lease's fence, or what a move from
/// one shard left). A store written by a release without the mark holds
/// the layout of one shard: its outbox stream, saga index, or the fence
/// of its relay or leader lease (KEYS[2..5], in the service's own slot;
/// every runtime with a store took the relay lease) says it was used, and
/// it is marked as one shard. No lease is taken before the mark (see
/// `lease_sync`), so a new store's fences never pass for an old store's.
const MARK_LAYOUT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
local relay = string.sub(KEYS[1], 1, -8) .. ':relay:'
local found = 0
for i = 0, 255 do
  if redis.call('EXISTS', relay .. i .. ':fence') == 1 then
    found = i + 1
  end
end
if found > 0 then
  v = tostring(found)
elseif redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4], KEYS[5]) > 0 then
  v = '1'
else
  v = ARGV[1]
end
redis.call('SET', KEYS[1], v)
return v
";

fn entry_fields(fields: &[(String, Value)]) -> Option<OutboxEntry> {
    let get = |name: &str| -> Option<Vec<u8>> {
        fields.iter().find(|(k, _)| k == name).and_then(|(_, v)| match v {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        })
    };
    let headers: Vec<(String, String)> = serde_json::from_slice(&get("headers")?).ok()?;
    Some(OutboxEntry {
        id: String::from_utf8(get("id")?).ok()?,
        subject: String::from_utf8(get("subject")?).ok()?,
        headers,
        payload: get("payload")?,
        due_ms: None,
    })
}

/// Parses `[[id, [field, value, ...]], ...]`, the entry list of XREAD;
/// an entry that cannot be read comes as `None`.
fn entries(list: &Value) -> Vec<(String, Option<OutboxEntry>)> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(pair) = item else { continue };
        let [Value::BulkString(id), Value::Array(kv)] = pair.as_slice() else {
            continue;
        };
        let fields: Vec<(String, Value)> = kv
            .chunks(2)
            .filter_map(|c| match c {
                [Value::BulkString(k), v] => Some((String::from_utf8_lossy(k).into_owned(), v.clone())),
                _ => None,
            })
            .collect();
        out.push((String::from_utf8_lossy(id).into_owned(), entry_fields(&fields)));
    }
    out
}

/// An inbox claim waiting to go (see [`INBOX_BEGIN`]).
struct ClaimCall {
    key: String,
    /// The claim, how long it is kept, the liveness keys' prefix, the
    /// replica, how long it is said alive.
    args: [Vec<u8>; 5],
    answer: tokio::sync::oneshot::Sender<Result<Option<Vec<u8>>>>,
}

impl Call for ClaimCall {
    fn size(&self) -> usize {
        self.key.len() + self.args.iter().map(Vec::len).sum::<usize>()
    }

    fn abandoned(&self) -> bool {
        self.answer.is_closed()
    }
}

/// Where a commit's keys and arguments go (see `RedisStore::commit_parts`).
trait CommitParts {
    fn key(&mut self, key: String);
    fn arg(&mut self, arg: &[u8]);
}

/// Owned, for a batch of commits.
impl CommitParts for (Vec<String>, Vec<Vec<u8>>) {
    fn key(&mut self, key: String) {
        self.0.push(key);
    }
    fn arg(&mut self, arg: &[u8]) {
        self.1.push(arg.to_vec());
    }
}

/// Straight into a script's invocation, for one commit.
impl CommitParts for redis::ScriptInvocation<'_> {
    fn key(&mut self, key: String) {
        redis::ScriptInvocation::key(self, key);
    }
    fn arg(&mut self, arg: &[u8]) {
        redis::ScriptInvocation::arg(self, arg);
    }
}

/// A commit with an inbox part waiting to go (see [`COMMIT_MANY`]).
struct CommitCall {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    answer: tokio::sync::oneshot::Sender<Result<Vec<u64>>>,
}

impl Call for CommitCall {
    fn size(&self) -> usize {
        self.keys.iter().map(String::len).sum::<usize>() + self.args.iter().map(Vec::len).sum::<usize>()
    }

    fn abandoned(&self) -> bool {
        self.answer.is_closed()
    }
}

/// Each of a batch's `n` calls' outcome: its item of the script's
/// answer, or the failure of the whole call (a Redis error is not
/// `Clone`: the same kind and text for each).
fn per_call<T>(n: usize, out: redis::RedisResult<Vec<T>>, what: &str) -> Vec<Result<T>> {
    let e = match out {
        Ok(items) if items.len() == n => return items.into_iter().map(Ok).collect(),
        Ok(items) => RedisError::from((
            redis::ErrorKind::Parse,
            "batched store call",
            format!("{} answers to {n} {what}", items.len()),
        )),
        Err(e) => e,
    };
    let e = map_err(e);
    (0..n)
        .map(|_| Err(Error::new(e.kind(), e.message().to_owned())))
        .collect()
}

fn send_claims(conn: Conn) -> SendBatch<ClaimCall> {
    let (script, give_up) = (Script::new(INBOX_BEGIN), Script::new(DELETE_IF_HELD));
    Arc::new(move |_shard, calls: Vec<ClaimCall>| {
        let (mut c, script, give_up) = (conn.clone(), script.clone(), give_up.clone());
        Box::pin(async move {
            let mut inv = script.prepare_invoke();
            for call in &calls {
                inv.key(&call.key);
                for a in &call.args {
                    inv.arg(a.as_slice());
                }
            }
            let found = per_call(
                calls.len(),
                inv.invoke_async::<Vec<Vec<u8>>>(&mut c).await,
                "claims",
            );
            // A caller that stopped waiting while its claim was on the way
            // (its guard gave up a claim not yet written) would leave it
            // held for the inbox window: given up here, once it is
            // written and every other caller answered.
            let mut left = Vec::new();
            for (call, found) in calls.into_iter().zip(found) {
                let fresh = found.as_ref().is_ok_and(Vec::is_empty);
                let found = found.map(|v| (!v.is_empty()).then_some(v));
                if call.answer.send(found).is_err() && fresh {
                    let [mark, ..] = call.args;
                    left.push((call.key, mark));
                }
            }
            let gone = futures_util::future::join_all(left.iter().map(|(key, mark)| {
                let mut c = c.clone();
                let mut inv = give_up.prepare_invoke();
                inv.key(key).arg(mark.as_slice());
                async move { inv.invoke_async::<i64>(&mut c).await }
            }))
            .await;
            if let Some(Err(e)) = gone.iter().find(|r| r.is_err()) {
                tracing::warn!(error = %e, "a claim whose caller stopped waiting could not be given up; it holds until the inbox window ends or its replica stops");
            }
        })
    })
}

fn send_commits(conn: Conn) -> SendBatch<CommitCall> {
    let script = Script::new(&format!("{COMMIT_FN}{COMMIT_MANY}"));
    Arc::new(move |_shard, calls: Vec<CommitCall>| {
        let (mut c, script) = (conn.clone(), script.clone());
        Box::pin(async move {
            let mut inv = script.prepare_invoke();
            inv.arg(calls.len());
            for call in &calls {
                for k in &call.keys {
                    inv.key(k);
                }
                inv.arg(call.keys.len()).arg(call.args.len());
                for a in &call.args {
                    inv.arg(a.as_slice());
                }
            }
            let out = per_call(
                calls.len(),
                inv.invoke_async::<Vec<Vec<u64>>>(&mut c).await,
                "commits",
            );
            for (call, out) in calls.into_iter().zip(out) {
                let _ = call.answer.send(out);
            }
        })
    })
}

/// A batched call's answer; a batch task gone without answering (its
/// runtime ended) is an unavailable store, in doubt like a lost reply.
async fn answered<T>(rx: tokio::sync::oneshot::Receiver<Result<T>>) -> Result<T> {
    rx.await.unwrap_or_else(|_| {
        Err(Error::new(
            ErrorKind::Unavailable,
            "the store call was not answered (its batch was dropped)",
        ))
    })
}

impl RedisStore {
    /// Prepares the connections; they connect on first use and reconnect
    /// by themselves, so a Redis that is down at start-up does not stop
    /// the runtime (it reports not ready until Redis answers).
    pub(crate) fn connect(how: &RedisConnect, service: &str, shard_count: u32) -> Result<RedisStore> {
        let bad_url = |e: RedisError| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "invalid REDIS_URL {}: {:?}",
                    crate::config::redact_url(&how.url),
                    e.kind()
                ),
            )
        };
        let certificates = if how.tls_ca.is_some() || how.tls_cert.is_some() {
            let client_tls = match (&how.tls_cert, &how.tls_key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read_file("REDIS_TLS_CERT", c)?,
                    client_key: read_file("REDIS_TLS_KEY", k)?,
                }),
                (None, None) => None,
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "REDIS_TLS_CERT and REDIS_TLS_KEY go together: set both or neither",
                    ));
                }
            };
            let root_cert = how
                .tls_ca
                .as_ref()
                .map(|p| read_file("REDIS_TLS_CA", p))
                .transpose()?;
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        let (conn, relay) = if how.mode == crate::config::RedisMode::Sentinel {
            let sentinels: Vec<&str> = urls(&how.url);
            // The credentials of the first URL are the master's too (the
            // usual set-up gives sentinels and servers one password).
            let first =
                redis::IntoConnectionInfo::into_connection_info(sentinels.first().copied().unwrap_or(""))
                    .map_err(bad_url)?;
            let tls = how.url.trim_start().starts_with("rediss://");
            let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(first.redis_settings().clone());
            if tls {
                node = node.set_tls_mode(redis::TlsMode::Secure);
            }
            let followed = |response: Duration| -> Result<Conn> {
                let client = match &certificates {
                    Some(certs) => sentinel_with_certs(&sentinels, &first, tls, how, certs),
                    None => redis::sentinel::SentinelClient::build(
                        sentinels.clone(),
                        how.sentinel_master.as_str(),
                        Some(node.clone()),
                        redis::sentinel::SentinelServerType::Master,
                    ),
                }
                .map_err(bad_url)?;
                Ok(Conn::Sentinel(Arc::new(Followed {
                    sentinel: tokio::sync::Mutex::new(client),
                    master: std::sync::Mutex::new(None),
                    config: redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(response)),
                })))
            };
            (
                followed(RESPONSE_TIMEOUT)?,
                followed(RESPONSE_TIMEOUT + Duration::from_secs(5))?,
            )
        } else if how.mode == crate::config::RedisMode::Cluster {
            let nodes: Vec<&str> = urls(&how.url);
            // The same budget as one server's: fail within a few seconds
            // while the cluster is away, and let the health check retry.
            let client = |response: Duration| {
                let mut b = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(response)
                    .retries(2)
                    .min_retry_wait(50)
                    .max_retry_wait(1000);
                if let Some(certs) = &certificates {
                    b = b.certs(certs.clone());
                }
                b.build().map(|client| {
                    Conn::Cluster(Arc::new(LazyCluster {
                        client,
                        conn: tokio::sync::OnceCell::new(),
                    }))
                })
            };
            (
                client(RESPONSE_TIMEOUT).map_err(bad_url)?,
                client(RESPONSE_TIMEOUT + Duration::from_secs(5)).map_err(bad_url)?,
            )
        } else {
            let client = match certificates {
                Some(certs) => redis::Client::build_with_tls(how.url.as_str(), certs),
                None => redis::Client::open(how.url.as_str()),
            }
            .map_err(bad_url)?;
            // Two reconnection attempts per operation, not redis-rs' six:
            // with six, a command against a stopped Redis or one refusing
            // the TLS handshake took 4 s to fail (measured), longer than
            // most senders wait; the store's health check keeps trying
            // every second anyway.
            let config = |response: Duration| {
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(response))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1))
            };
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config(RESPONSE_TIMEOUT))
                .map_err(map_err)?;
            let relay = ConnectionManager::new_lazy_with_config(
                client,
                config(RESPONSE_TIMEOUT + Duration::from_secs(5)),
            )
            .map_err(map_err)?;
            (Conn::Server(conn), Conn::Server(relay))
        };
        let prefix = prefix(service);
        let shards = shards::prefixes(service, shard_count);
        Ok(RedisStore {
            commits: Batcher::new(shard_count, send_commits(conn.clone())),
            claims: Batcher::new(shard_count, send_claims(conn.clone())),
            conn,
            relay,
            outboxes: shards.iter().map(|p| format!("{p}:outbox")).collect(),
            shards,
            prefix,
            raised: Default::default(),
            layout: tokio::sync::OnceCell::new(),
            commit: Script::new(&format!("{COMMIT_FN}{COMMIT_ONE}")),
            delete_if_held: Script::new(DELETE_IF_HELD),
            finish_if_held: Script::new(FINISH_IF_HELD),
            saga_write: Script::new(SAGA_WRITE),
            lease_sync: Script::new(LEASE_SYNC),
            members: Script::new(MEMBERS),
            raise: Script::new(RAISE),
            mark_layout: Script::new(MARK_LAYOUT),
            delayed_release: Script::new(DELAYED_RELEASE),
            delayed_cancel: Script::new(DELAYED_CANCEL),
            outbox_waiting: Script::new(OUTBOX_WAITING),
        })
    }

    /// How many shards this store's keys are split into.
    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn shard(&self, shard: u32) -> &str {
        self.shards.get(shard as usize).unwrap_or(&self.prefix)
    }

    fn state_key(&self, shard: u32, kind: &str, key: &str) -> String {
        format!("{}:state:{kind}:{key}", self.shard(shard))
    }

    fn saga_key(&self, shard: u32, id: &str) -> String {
        format!("{}:saga:{id}", self.shard(shard))
    }

    fn outbox(&self, shard: u32) -> &str {
        self.outboxes.get(shard as usize).map_or("", String::as_str)
    }

    /// The delayed entries of a shard, by due time (a sorted set of ids).
    fn delayed_key(&self, shard: u32) -> String {
        format!("{}:delayed", self.shard(shard))
    }

    /// The delayed entries of a shard: `<id>:s`, `<id>:h`, `<id>:p`
    /// (subject, headers, payload).
    fn delayed_entries_key(&self, shard: u32) -> String {
        format!("{}:delayed:e", self.shard(shard))
    }

    /// Moves a shard's delayed entries due by now, by Redis' clock (at
    /// most `limit`), to its outbox; how many moved, and how long until
    /// the next is due.
    pub(crate) async fn delayed_release(
        &self,
        shard: u32,
        limit: usize,
    ) -> Result<(usize, Option<Duration>)> {
        let mut c = self.conn.clone();
        let (moved, next, now): (usize, i64, i64) = self
            .delayed_release
            .key(self.delayed_key(shard))
            .key(self.delayed_entries_key(shard))
            .key(self.outbox(shard))
            .arg(limit)
            .invoke_async(&mut c)
            .await
            .map_err(map_err)?;
        let now = u64::try_from(now).unwrap_or(0);
        let until = u64::try_from(next)
            .ok()
            .map(|next| Duration::from_millis(next.saturating_sub(now)));
        Ok((moved, until))
    }

    /// Cancels a delayed entry still waiting in `shard`.
    pub(crate) async fn delayed_cancel(&self, shard: u32, id: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: u32 = self
            .delayed_cancel
            .key(self.delayed_key(shard))
            .key(self.delayed_entries_key(shard))
            .arg(id)
            .invoke_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(n == 1)
    }

    /// A shard's waiting delayed entries, soonest first, at most `limit`:
    /// id, subject and due time.
    pub(crate) async fn delayed_list(&self, shard: u32, limit: usize) -> Result<Vec<(String, String, u64)>> {
        let mut c = self.conn.clone();
        let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.delayed_key(shard))
            .arg(0)
            .arg(i64::try_from(limit).map_or(-1, |l| l.max(1) - 1))
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut get = redis::cmd("HMGET");
        get.arg(self.delayed_entries_key(shard));
        for (id, _) in &due {
            get.arg(format!("{id}:s"));
        }
        let subjects: Vec<Option<String>> = get.query_async(&mut c).await.map_err(map_err)?;
        // One released or cancelled between the two reads is gone.
        Ok(due
            .into_iter()
            .zip(subjects)
            .filter_map(|((id, at), subject)| Some((id, subject?, at as u64)))
            .collect())
    }

    /// Delayed entries waiting in a shard.
    pub(crate) async fn delayed_count(&self, shard: u32) -> Result<u64> {
        let mut c = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(self.delayed_key(shard))
            .query_async(&mut c)
            .await
            .map_err(map_err)
    }

    /// The shard count the store is marked with, if it is marked (read
    /// only: for the CLI, which reads the store as the replicas wrote it).
    pub(crate) async fn marked_count(&self) -> Result<Option<u32>> {
        let mut c = self.conn.clone();
        let mark: Option<String> = redis::cmd("GET")
            .arg(format!("{}:shards", self.prefix))
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(mark.and_then(|m| m.parse().ok()))
    }

    /// [`check_layout`](Self::check_layout) before a write: a store of
    /// another count makes writes fail retryably (the message comes back,
    /// rather than be dead-lettered for a deployment's mistake), and
    /// readiness says why.
    async fn writable(&self) -> Result<()> {
        self.check_layout()
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, e.message().to_owned()))
    }

    /// Checks, once, that the store holds this service's data in as many
    /// shards as this runtime splits it into (and marks a new store so):
    /// a runtime with another count would look for every key in the wrong
    /// place, and commit where the others never look.
    pub(crate) async fn check_layout(&self) -> Result<()> {
        self.layout
            .get_or_try_init(|| async {
                let mut c = self.conn.clone();
                let found: String = self
                    .mark_layout
                    .key(format!("{}:shards", self.prefix))
                    .key(format!("{}:outbox", self.prefix))
                    .key(format!("{}:sagas", self.prefix))
                    .key(self.fence_key("relay")) // the outbox relay's lease
                    .key(self.fence_key(LEADER_LEASE))
                    // No more arguments: Redis drops an unauthenticated
                    // connection that sends a command of more than 10
                    // parts (its protocol guard), and this is the first
                    // call a replica with wrong credentials makes, whose
                    // refusal (NOAUTH) readiness must name. 11 parts made
                    // `secured::redis_password_in_the_url` read
                    // "Connection reset by peer" instead.
                    .arg(self.shard_count())
                    .invoke_async(&mut c)
                    .await
                    .map_err(map_err)?;
                if found == self.shard_count().to_string() {
                    Ok(())
                } else {
                    Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "the store holds this service's data in {found} shard(s) and CATGA_STORE_SHARDS is {}: \
                             every replica of a service must use the count its store was written with \
                             (changing it needs the store emptied, or the data moved; see the operations guide)",
                            self.shard_count()
                        ),
                    ))
                }
            })
            .await
            .map(|_| ())
    }

    fn letter_key(&self, id: &str) -> String {
        format!("{}:dlq:{id}", self.prefix)
    }

    pub(crate) async fn record_letter(&self, id: &str, digest: &str, keep: Duration) -> Result<()> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.letter_key(id))
            .arg(digest)
            .arg("PX")
            .arg(keep.as_millis().max(1) as u64)
            .query_async::<()>(&mut c)
            .await
            .map_err(map_err)
    }

    pub(crate) async fn forget_letter(&self, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.letter_key(id))
            .query_async::<()>(&mut c)
            .await
            .map_err(map_err)
    }

    pub(crate) async fn letter_digests(&self, ids: &[String]) -> Result<Vec<Option<String>>> {
        let mut c = self.conn.clone();
        // One key at a time on a cluster (MGET needs one slot; these share
        // the service's tag, but a pipeline works on every topology).
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("GET").arg(self.letter_key(id));
        }
        pipe.query_async(&mut c).await.map_err(map_err)
    }

    pub(crate) async fn saga_load(
        &self,
        shard: u32,
        id: &str,
    ) -> Result<std::collections::BTreeMap<String, Bytes>> {
        let mut c = self.conn.clone();
        let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.saga_key(shard, id))
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(fields.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect())
    }

    pub(crate) async fn saga_write(
        &self,
        shard: u32,
        id: &str,
        fields: &[(&str, &[u8])],
        fence: Option<&Fence>,
        run: Option<(&str, &str)>,
    ) -> Result<bool> {
        self.writable().await?;
        let mut c = self.conn.clone();
        let mut inv = self.saga_write.prepare_invoke();
        inv.key(self.saga_key(shard, id))
            .key(self.fence_copy_key(shard, fence.map_or(LEADER_LEASE, |f| &f.lease)))
            .key(format!("{}:sagas", self.shard(shard)))
            .key(match run {
                Some((scope, _)) => self.inbox_key(shard, scope, id),
                None => self.saga_key(shard, id),
            })
            .arg(fence.map(|f| f.token.to_string()).unwrap_or_default())
            .arg(run.map(|(_, mark)| mark).unwrap_or_default())
            .arg(crate::wire::now_ms())
            .arg(id);
        for (field, value) in fields {
            inv.arg(*field).arg(*value);
        }
        let written: i64 = inv.invoke_async(&mut c).await.map_err(map_err)?;
        if written == 2
            && let Some(f) = fence
        {
            self.forget_raised(f);
        }
        Ok(written == 1)
    }

    /// The newest sagas of every shard, newest first, at most `limit`.
    pub(crate) async fn saga_list(&self, limit: usize) -> Result<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lists = futures_util::future::try_join_all(self.shards.iter().map(|shard| {
            let mut c = self.conn.clone();
            async move {
                redis::cmd("ZREVRANGE")
                    .arg(format!("{shard}:sagas"))
                    .arg(0)
                    .arg(limit - 1)
                    .arg("WITHSCORES")
                    .query_async::<Vec<(String, f64)>>(&mut c)
                    .await
                    .map_err(map_err)
            }
        }))
        .await?;
        let mut all: Vec<(String, f64)> = lists.into_iter().flatten().collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        Ok(all.into_iter().take(limit).map(|(id, _)| id).collect())
    }

    fn lease_key(&self, lease: &str) -> String {
        format!("{}:{lease}", self.prefix)
    }

    fn fence_key(&self, lease: &str) -> String {
        format!("{}:{lease}:fence", self.prefix)
    }

    /// A shard's copy of a lease's fence, which the writes of that shard
    /// check; with one shard, the fence itself.
    fn fence_copy_key(&self, shard: u32, lease: &str) -> String {
        format!("{}:{lease}:fence", self.shard(shard))
    }

    /// After a write refused by a shard's copy of `fence`: the copy may have
    /// been lost (a master restarted without its data, an eviction), so it
    /// is copied again at the next renewal if this replica still holds the
    /// lease (a lease it lost renews with token 0 and is forgotten anyway).
    fn forget_raised(&self, fence: &Fence) {
        if self.shards.len() <= 1 {
            return;
        }
        let mut raised = self
            .raised
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if raised.get(&*fence.lease) == Some(&fence.token) {
            raised.remove(&*fence.lease);
        }
    }

    /// Raises the copies of newly granted fences in every shard (only of
    /// the leases whose holders write under them, see
    /// [`checked_in_shards`]; with one
    /// shard there is nothing to copy). A grant whose copies could not all
    /// be raised is tried again at the next sync; meanwhile the shards
    /// that missed it refuse the new holder's writes (their copy is not
    /// its token), so that at no time does a shard take the writes of two
    /// holders. Across shards it is weaker than one fence: until a shard's
    /// copy is raised, a stale holder (one that stalled past its lease)
    /// may still write there while the new holder writes in the others.
    async fn raise_fences(&self, leases: &[(String, bool)], tokens: &[u64]) {
        if self.shards.len() <= 1 {
            return;
        }
        let fresh: Vec<(&str, u64)> = {
            let mut raised = self
                .raised
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut fresh = Vec::new();
            for ((name, _), token) in leases.iter().zip(tokens) {
                if !checked_in_shards(name) {
                    continue;
                }
                if *token == 0 {
                    raised.remove(name);
                } else if raised.get(name) != Some(token) {
                    fresh.push((name.as_str(), *token));
                }
            }
            fresh
        };
        if fresh.is_empty() {
            return;
        }
        let shard_count = self.shard_count();
        let raised = futures_util::future::join_all((0..shard_count).map(|shard| {
            let mut c = self.conn.clone();
            let mut inv = self.raise.prepare_invoke();
            for (name, token) in &fresh {
                inv.key(self.fence_copy_key(shard, name)).arg(*token);
            }
            // Bounded: a master that does not answer must not hold up the
            // renewal of every lease (their ends are counted from before
            // the sync); its shard refuses the new holder until a later
            // renewal copies the fence.
            async move {
                tokio::time::timeout(Duration::from_millis(500), inv.invoke_async::<i64>(&mut c))
                    .await
                    .unwrap_or_else(|_| Err(RedisError::from((redis::ErrorKind::Io, "timed out"))))
            }
        }))
        .await;
        if let Some(Err(e)) = raised.iter().find(|r| r.is_err()) {
            tracing::warn!(error = %e, "a lease's fence could not be copied to every store shard yet; writes in the shards that missed it wait for the next renewal");
            return;
        }
        let mut done = self
            .raised
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, token) in fresh {
            done.insert(name.to_owned(), token);
        }
    }

    pub(crate) async fn lease_sync(
        &self,
        leases: &[(String, bool)],
        owner: &str,
        ttl: Duration,
    ) -> Result<Vec<u64>> {
        // The mark first: a lease's fence would make a new store look like
        // one of an earlier release to the mark's check.
        self.writable().await?;
        let mut inv = self.lease_sync.prepare_invoke();
        for (name, _) in leases {
            inv.key(self.lease_key(name)).key(self.fence_key(name));
        }
        inv.arg(owner).arg(ttl.as_millis().max(1) as u64);
        for (_, want) in leases {
            inv.arg(if *want { "1" } else { "0" });
        }
        let mut c = self.conn.clone();
        let tokens: Vec<u64> = inv.invoke_async(&mut c).await.map_err(map_err)?;
        self.raise_fences(leases, &tokens).await;
        Ok(tokens)
    }

    pub(crate) async fn members(
        &self,
        group: &str,
        member: &str,
        alive: bool,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut out: Vec<String> = self
            .members
            .key(format!("{}:members:{group}", self.prefix))
            .arg(member)
            .arg(timeout.as_millis().max(1) as u64)
            .arg(if alive { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(map_err)?;
        out.sort_unstable();
        Ok(out)
    }

    /// What Redis does when it runs out of memory (`maxmemory-policy`), if
    /// it lets this client ask (managed services often refuse `CONFIG`).
    pub(crate) async fn eviction_policy(&self) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut c)
            .await;
        match answer {
            Ok(pair) => Ok(pair.get(1).cloned()),
            // Refused (an ACL, a managed service's renamed command).
            Err(e) if matches!(e.code(), Some("ERR" | "NOPERM")) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    fn inbox_key(&self, shard: u32, scope: &str, id: &str) -> String {
        format!("{}:inbox:{scope}:{id}", self.shard(shard))
    }

    pub(crate) async fn load(&self, shard: u32, kind: &str, key: &str) -> Result<Option<(u64, Bytes)>> {
        let mut c = self.conn.clone();
        let (v, d): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.state_key(shard, kind, key))
            .arg("v")
            .arg("d")
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(v.zip(d).map(|(v, d)| (v, Bytes::from(d))))
    }

    /// Gives a commit's keys and arguments, as [`COMMIT_FN`] takes them, to
    /// `parts`: owned for a batch, or straight into the script's
    /// invocation (one copy of each state and payload fewer).
    fn commit_parts(&self, shard: u32, commit: &Commit, parts: &mut impl CommitParts) -> Result<()> {
        for w in &commit.states {
            parts.key(self.state_key(shard, &w.kind, &w.key));
        }
        parts.key(self.outbox(shard).to_owned());
        parts.key(self.delayed_key(shard));
        parts.key(self.delayed_entries_key(shard));
        if let Some(i) = &commit.inbox {
            parts.key(self.inbox_key(shard, &i.scope, &i.id));
        }
        if let Some(f) = &commit.fence {
            parts.key(self.fence_copy_key(shard, &f.lease));
        }
        parts.arg(commit.states.len().to_string().as_bytes());
        parts.arg(if commit.inbox.is_some() { b"1" } else { b"0" });
        parts.arg(
            commit
                .fence
                .as_ref()
                .map(|f| f.token.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        for w in &commit.states {
            parts.arg(w.expected.to_string().as_bytes());
            parts.arg(&w.data);
        }
        if let Some(i) = &commit.inbox {
            parts.arg(i.claim.as_bytes());
            parts.arg(&i.answer.encode());
            parts.arg((i.window.as_millis().max(1) as u64).to_string().as_bytes());
        }
        for e in &commit.events {
            let headers = serde_json::to_vec(&e.headers)
                .map_err(|err| Error::new(ErrorKind::Internal, format!("outbox headers: {err}")))?;
            parts.arg(e.id.as_bytes());
            parts.arg(e.subject.as_bytes());
            parts.arg(&headers);
            parts.arg(&e.payload);
            parts.arg(e.due_ms.map(|d| d.to_string()).unwrap_or_default().as_bytes());
        }
        Ok(())
    }

    pub(crate) async fn commit(&self, shard: u32, commit: &Commit) -> Result<Committed> {
        self.writable().await?;
        let out = if commit.inbox.is_some() {
            // An idempotent handler's commit goes with the others of its
            // shard: if the batch fails, each resolves its outcome from its
            // inbox key, as after any lost reply.
            let mut parts = (Vec::new(), Vec::new());
            self.commit_parts(shard, commit, &mut parts)?;
            let (keys, args) = parts;
            let (answer, rx) = tokio::sync::oneshot::channel();
            self.commits.submit(shard, CommitCall { keys, args, answer })?;
            let out = answered(rx).await?;
            if out == [4] {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "the commit failed in Redis (one of its keys holds a value of another type?)",
                ));
            }
            out
        } else {
            let mut inv = self.commit.prepare_invoke();
            self.commit_parts(shard, commit, &mut inv)?;
            let mut c = self.conn.clone();
            inv.invoke_async::<Vec<u64>>(&mut c).await.map_err(map_err)?
        };
        Ok(match out.as_slice() {
            [1, versions @ ..] => Committed::Yes(versions.to_vec()),
            [3] => {
                if let Some(f) = &commit.fence {
                    self.forget_raised(f);
                }
                Committed::Fenced
            }
            [0, index, current] => Committed::Conflict {
                index: (*index as usize).saturating_sub(1),
                current: *current,
            },
            _ => Committed::LostClaim,
        })
    }

    /// The oldest outbox entries, at most `count`, waiting up to `block`
    /// for one when there are none. `XREAD` from id `0-0` returns at once
    /// what the stream holds (entries are deleted once published, so the
    /// stream is the backlog), and blocks only while it is empty.
    pub(crate) async fn outbox_read(
        &self,
        shard: u32,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT").arg(count);
        // A blocking read holds its connection (even after its caller gave
        // up, until Redis answers it): only blocking reads go to the relay's
        // own connection. BLOCK 0 would wait forever: no BLOCK at all reads
        // what is there.
        let mut c = if block.is_zero() {
            self.conn.clone()
        } else {
            read.arg("BLOCK").arg(block.as_millis().max(1) as u64);
            self.relay.clone()
        };
        let read: Value = read
            .arg("STREAMS")
            .arg(self.outbox(shard))
            .arg("0-0")
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        // RESP2: [[stream, [entries...]]]; RESP3: {stream: [entries...]}.
        let list = match &read {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(pair) => pair.get(1).cloned(),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, v)| v.clone()),
            _ => None,
        };
        Ok(list.map(|l| entries(&l)).unwrap_or_default())
    }

    pub(crate) async fn outbox_read_after(
        &self,
        shard: u32,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        let mut c = self.conn.clone();
        let read: Value = redis::cmd("XRANGE")
            .arg(self.outbox(shard))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(entries(&read))
    }

    pub(crate) async fn outbox_remove(&self, shard: u32, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        redis::cmd("XDEL")
            .arg(self.outbox(shard))
            .arg(ids)
            .query_async::<()>(&mut c)
            .await
            .map_err(map_err)
    }

    /// Entries waiting in the outbox of every shard.
    pub(crate) async fn outbox_backlog(&self) -> Result<u64> {
        let lengths = futures_util::future::try_join_all(self.outboxes.iter().map(|o| {
            let mut c = self.conn.clone();
            async move { redis::cmd("XLEN").arg(o).query_async::<u64>(&mut c).await }
        }))
        .await
        .map_err(map_err)?;
        Ok(lengths.into_iter().sum())
    }

    /// How many entries wait in a shard's outbox, and how long the oldest
    /// has waited, by its master's clock.
    pub(crate) async fn outbox_waiting(&self, shard: u32) -> Result<(u64, Duration)> {
        let mut c = self.conn.clone();
        let (n, at, now): (u64, i64, i64) = self
            .outbox_waiting
            .key(self.outbox(shard))
            .invoke_async(&mut c)
            .await
            .map_err(map_err)?;
        // A stream id's time is never behind the one before it, even when
        // the master's clock went back: the age saturates at zero.
        let age = u64::try_from(now.saturating_sub(at)).unwrap_or(0);
        Ok((
            n,
            if at < 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(age)
            },
        ))
    }

    /// Whether the masters answer within `limit`: the one holding the
    /// service's own keys (leases, fences, members, dead letters, the
    /// shard-count mark), then each shard's, in shard order; `None` when
    /// it does, or why not. On one server (or behind Sentinel) one ping
    /// speaks for all of them.
    pub(crate) async fn ping_shards(&self, limit: Duration) -> (Option<String>, Vec<Option<String>>) {
        let asked = |cmd: redis::Cmd| {
            let mut c = self.conn.clone();
            async move {
                match tokio::time::timeout(limit, cmd.query_async::<redis::Value>(&mut c)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(map_err(e).message().to_owned()),
                    Err(_) => Some(not_within(limit)),
                }
            }
        };
        let exists = |key: &str| {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(key);
            asked(cmd)
        };
        match &self.conn {
            Conn::Server(_) | Conn::Sentinel(_) => {
                let why = asked(redis::cmd("PING")).await;
                (why.clone(), vec![why; self.outboxes.len().max(1)])
            }
            // A cluster's PING goes to any node; each master that matters
            // is reached by a keyed command in its slot.
            Conn::Cluster(_) => {
                let control = format!("{}:shards", self.prefix);
                tokio::join!(
                    exists(&control),
                    futures_util::future::join_all(self.outboxes.iter().map(|o| exists(o)))
                )
            }
        }
    }

    pub(crate) async fn inbox_begin(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        claim: &Claim,
        ttl: Duration,
        alive_for: Duration,
    ) -> Result<Inbox> {
        self.writable().await?;
        let ms = |d: Duration| (d.as_millis().max(1) as u64).to_string().into_bytes();
        let (answer, rx) = tokio::sync::oneshot::channel();
        self.claims.submit(
            shard,
            ClaimCall {
                key: self.inbox_key(shard, scope, id),
                args: [
                    claim.mark().into_bytes(),
                    ms(ttl),
                    self.alive_prefix(shard).into_bytes(),
                    claim.member.clone().into_bytes(),
                    ms(alive_for),
                ],
                answer,
            },
        )?;
        Ok(match answered(rx).await? {
            None => Inbox::Fresh,
            Some(v) => Inbox::from_raw(&v),
        })
    }

    pub(crate) async fn inbox_finish(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        claim: &str,
        answer: &Answer,
        window: Duration,
    ) -> Result<Finished> {
        let mut c = self.conn.clone();
        let out: Value = self
            .finish_if_held
            .key(self.inbox_key(shard, scope, id))
            .arg(claim)
            .arg(answer.encode())
            .arg(window.as_millis().max(1) as u64)
            .invoke_async(&mut c)
            .await
            .map_err(map_err)?;
        Ok(match out {
            Value::Int(1) => Finished::Kept,
            Value::BulkString(v) => Finished::NotHeld(Answer::decode(&v).filter(|_| !v.starts_with(b"P:"))),
            _ => Finished::NotHeld(None),
        })
    }

    pub(crate) async fn inbox_peek(&self, shard: u32, scope: &str, id: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.conn.clone();
        redis::cmd("GET")
            .arg(self.inbox_key(shard, scope, id))
            .query_async(&mut c)
            .await
            .map_err(map_err)
    }

    /// Liveness keys: `<shard prefix>:alive:<member>`, one per shard (the
    /// inbox claims of a shard read its own).
    fn alive_prefix(&self, shard: u32) -> String {
        format!("{}:alive:", self.shard(shard))
    }

    /// Says `member` alive (or gone) in every shard; each shard is told
    /// even when another fails (its master away), so that claims in the
    /// shards that answer hold.
    pub(crate) async fn alive(&self, member: &str, ttl: Duration, alive: bool) -> Result<()> {
        let told = futures_util::future::join_all((0..self.shard_count()).map(|shard| {
            let mut c = self.conn.clone();
            let key = format!("{}{member}", self.alive_prefix(shard));
            let cmd = if alive {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(1).arg("PX").arg(ttl.as_millis().max(1) as u64);
                cmd
            } else {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            };
            async move { cmd.query_async::<()>(&mut c).await }
        }))
        .await;
        told.into_iter()
            .collect::<redis::RedisResult<Vec<()>>>()
            .map(|_| ())
            .map_err(map_err)
    }

    fn doubt_key(&self, shard: u32, member: &str) -> String {
        format!("{}:doubt:{member}", self.shard(shard))
    }

    /// Adds `doubt` to `member`'s doubts in `shard` (beside the claims it
    /// is about), kept for `keep`.
    pub(crate) async fn doubt(&self, shard: u32, member: &str, doubt: &str, keep: Duration) -> Result<()> {
        let key = self.doubt_key(shard, member);
        let mut pipe = redis::pipe();
        // Atomic: a set left without its expiry would outlive its member.
        pipe.atomic()
            .cmd("SADD")
            .arg(&key)
            .arg(doubt)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(keep.as_millis().max(1) as u64)
            .ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(map_err)
    }

    /// Takes up to [`DOUBTS`](super::DOUBTS) of `member`'s doubts from
    /// each shard; a shard that fails keeps its doubts for the next look.
    pub(crate) async fn take_doubts(&self, member: &str) -> Vec<(u32, String)> {
        let taken = futures_util::future::join_all((0..self.shard_count()).map(|shard| {
            let mut c = self.conn.clone();
            let mut cmd = redis::cmd("SPOP");
            cmd.arg(self.doubt_key(shard, member)).arg(super::DOUBTS);
            async move { (shard, cmd.query_async::<Vec<Vec<u8>>>(&mut c).await) }
        }))
        .await;
        let mut all = Vec::new();
        for (shard, got) in taken {
            match got {
                // Each read alone: one that is not text (not catga's)
                // does not cost the others.
                Ok(doubts) => all.extend(
                    doubts
                        .into_iter()
                        .filter_map(|d| String::from_utf8(d).ok())
                        .map(|d| (shard, d)),
                ),
                Err(e) => tracing::warn!(shard, error = %e, "doubts about this replica's claims not read"),
            }
        }
        all
    }

    pub(crate) async fn inbox_abandon(&self, shard: u32, scope: &str, id: &str, claim: &str) -> Result<()> {
        let mut c = self.conn.clone();
        self.delete_if_held
            .key(self.inbox_key(shard, scope, id))
            .arg(claim)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(map_err)
            .map(|_| ())
    }
}

/// Whether writes in the shards check a lease's fence, so that a grant is
/// copied to every shard: not the outbox relays' leases (`relay`,
/// `relay:<shard>`: an outbox entry is removed once its stream stored it,
/// whoever removes it) nor a keyed saga's router leases
/// (`part:<saga>:router`, `part:<saga>:router-<share>`: a router only
/// publishes). Copying those cost a script on every master at each grant,
/// for nothing.
fn checked_in_shards(lease: &str) -> bool {
    let relay = lease == "relay" || lease.starts_with("relay:");
    let share = lease
        .rsplit_once(":router-")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let router = lease.starts_with("part:") && (lease.ends_with(":router") || share);
    !(relay || router)
}

#[cfg(test)]
mod tests {
    use super::checked_in_shards;

    #[test]
    fn the_mark_script_looks_at_every_shard_count_and_takes_few_arguments() {
        // Its loop covers every count a runtime may have, and the prefix it
        // cuts from KEYS[1] is the mark's name.
        let last = crate::config::MAX_STORE_SHARDS - 1;
        assert!(super::MARK_LAYOUT.contains(&format!("for i = 0, {last} do")));
        assert!(super::MARK_LAYOUT.contains("string.sub(KEYS[1], 1, -8)"));
        // EVALSHA, the hash, the key count, 5 keys and 1 argument: at most
        // the 10 parts Redis takes from an unauthenticated connection.
        assert!(!super::MARK_LAYOUT.contains("ARGV[2]"));
        assert!(!super::MARK_LAYOUT.contains("KEYS[6]"));
    }

    #[test]
    fn only_leases_writes_are_made_under_have_their_fences_copied() {
        for lease in [
            "leader",
            "part:fulfil:0",
            "part:fulfil:15",
            "part:router-saga:3",
            "part:a::router:3",
            "part:router-:3",
        ] {
            assert!(checked_in_shards(lease), "{lease}");
        }
        for lease in [
            "relay",
            "relay:0",
            "relay:12",
            "part:fulfil:router",
            "part:fulfil:router-2",
        ] {
            assert!(!checked_in_shards(lease), "{lease}");
        }
    }
}
