//! Shared state: typed values with a version, saved together with the
//! events they produced in one atomic operation (state + outbox), and an
//! inbox that makes handlers idempotent. Redis when `REDIS_URL` is set, an
//! in-memory twin with the same semantics otherwise.
//!
//! Key space: `catga:{<service>}:<kind>:<key>`, the service name being the
//! Redis hash tag, with one shard (the default); with several
//! (`CATGA_STORE_SHARDS`), each shard has its own tag, so that one
//! service spreads over every master of a Redis Cluster while each atomic
//! operation (a Lua script over state keys, an inbox entry and the outbox
//! stream) stays in one slot: see [`shards`].

mod batch;
mod memory;
mod redis;
pub(crate) mod shards;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

pub(crate) use self::memory::MemoryStore;
pub(crate) use self::redis::{RedisConnect, RedisStore};
pub use self::shards::placing_part;

/// A kind of state kept in the store: a serde type with a name for its
/// keys.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)]
/// # enum Status { Created, Paid }
/// #[derive(Serialize, Deserialize)]
/// struct Order { customer: String, status: Status }
///
/// impl catga::State for Order {
///     const KIND: &'static str = "order";
/// }
/// ```
pub trait State: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind's name in store keys (`catga:{service}:state:<KIND>:<key>`).
    const KIND: &'static str;
}

/// A state value with its key and the version it was loaded at. Saving it
/// succeeds only if nobody saved that key since (optimistic concurrency);
/// a value made with [`Versioned::new`] is saved only if the key does not
/// exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    key: String,
    version: u64,
    value: T,
}

impl<T> Versioned<T> {
    /// A value that is not stored yet (version 0): saving it creates the
    /// key, and fails with a conflict if the key exists.
    pub fn new(key: impl Into<String>, value: T) -> Versioned<T> {
        Versioned {
            key: key.into(),
            version: 0,
            value,
        }
    }

    pub(crate) fn loaded(key: String, version: u64, value: T) -> Versioned<T> {
        Versioned { key, version, value }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The version it was loaded at (0: not stored yet). Each save adds one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The value.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Versioned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Versioned<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

/// An event waiting in the outbox: saved atomically with the state that
/// produced it, published by the relay, never lost once the save returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct OutboxEntry {
    /// Its message id (`Nats-Msg-Id`): JetStream drops a second publish of
    /// the same id, so a relay that crashed between publishing and marking
    /// the entry sent does not deliver it twice.
    pub id: String,
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    /// A delayed message's due time (unix ms): it waits in the store's
    /// delayed set until then, and the relay moves it to the outbox.
    #[serde(default)]
    pub due_ms: Option<u64>,
}

/// What a ping of the store found: `None` where it answered, or why not.
pub(crate) struct Pinged {
    /// The service's own keys (leases, fences, members, dead letters, the
    /// shard-count mark), in one slot; the shard count's check included.
    pub control: Option<String>,
    /// Each shard, in shard order.
    pub shards: Vec<Option<String>>,
}

/// One shard's outbox, as [`Runtime::outbox_shards`](crate::Runtime::outbox_shards)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxShard {
    /// The shard's number, from 0.
    pub shard: u32,
    /// Events saved in this shard and not yet published.
    pub waiting: u64,
    /// How long the oldest of them has waited, by the clock of the
    /// shard's master (zero when none waits): how far this shard's relay
    /// lags behind its commits.
    pub oldest: Duration,
}

/// One state write of a commit: the key, the version it must still be
/// at, and the new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateWrite {
    pub kind: String,
    pub key: String,
    pub expected: u64,
    pub data: Bytes,
}

/// The inbox part of a commit: the message's answer, kept for `window`,
/// written only if `claim` (see [`Claim::mark`]) is still what the inbox
/// holds for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboxWrite {
    pub scope: String,
    pub id: String,
    pub claim: String,
    pub answer: Answer,
    pub window: Duration,
}

/// A claim on a message id: what the inbox holds while an attempt handles
/// the message. It names the payload's digest, the attempt, and the
/// replica (its liveness name): the claim lapses as soon as that replica's
/// liveness key does (see [`Store::alive`]), so that a retry of a message
/// whose replica died runs within about a second, with no renewal per
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub digest: String,
    pub attempt: String,
    pub member: String,
}

impl Claim {
    /// The claim as the inbox keeps it: `P:<digest>:<attempt>:<member>`.
    pub(crate) fn mark(&self) -> String {
        format!("P:{}:{}:{}", self.digest, self.attempt, self.member)
    }

    /// The digest of the payload a kept claim (`Inbox::Busy`) is for
    /// (empty if unreadable).
    pub(crate) fn digest_of(mark: &str) -> &str {
        Claim::parse(mark.as_bytes()).map_or("", |(digest, _)| digest)
    }

    /// The attempt and the member of a kept claim.
    pub(crate) fn holder(mark: &str) -> Option<(&str, &str)> {
        let rest = mark.strip_prefix("P:")?;
        let (_digest, rest) = rest.split_once(':')?;
        rest.split_once(':')
    }

    /// The digest and the member of a kept claim.
    pub(crate) fn parse(mark: &[u8]) -> Option<(&str, &str)> {
        let text = std::str::from_utf8(mark).ok()?;
        let rest = text.strip_prefix("P:")?;
        let (digest, rest) = rest.split_once(':')?;
        let (_attempt, member) = rest.split_once(':')?;
        Some((digest, member))
    }
}

/// A claim another replica found keeping a message busy (see
/// [`Store::doubt`]): what its holder needs to tell whether anything in
/// it still holds the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Doubt {
    pub scope: String,
    pub id: String,
    /// The claim as the inbox keeps it ([`Claim::mark`]).
    pub mark: String,
}

/// Doubts taken per shard and look, at most: a look every third of the
/// inbox lease clears far more than the busy messages a failover can
/// leave.
pub(crate) const DOUBTS: usize = 256;

impl Doubt {
    /// `scope`, `id` and `mark`, each after its length (a scope is any
    /// subject, an id any visible ASCII: no separator is safe).
    fn encode(&self) -> String {
        format!(
            "{}:{}{}:{}{}",
            self.scope.len(),
            self.scope,
            self.id.len(),
            self.id,
            self.mark
        )
    }

    fn decode(raw: &str) -> Option<Doubt> {
        fn field(raw: &str) -> Option<(&str, &str)> {
            let (len, rest) = raw.split_once(':')?;
            let len: usize = len.parse().ok()?;
            Some((rest.get(..len)?, rest.get(len..)?))
        }
        let (scope, rest) = field(raw)?;
        let (id, mark) = field(rest)?;
        Claim::holder(mark)?;
        Some(Doubt {
            scope: scope.to_owned(),
            id: id.to_owned(),
            mark: mark.to_owned(),
        })
    }
}

/// The digest of a message's payload that its answer and claims are bound
/// to: SHA-256, in hex (a fast hash would let whoever may send a command
/// craft another payload with the same digest). A different payload under
/// a used id is refused as a conflict, as payment APIs do with idempotency
/// keys: a retry must send what the first attempt sent.
pub(crate) fn digest(payload: &[u8]) -> String {
    crate::wire::hex(ring::digest::digest(&ring::digest::SHA256, payload).as_ref())
}

/// Length of a [`digest`] in hex.
const DIGEST_HEX: usize = 64;

/// A handler's answer as the inbox keeps it, with the digest of the
/// payload it answered (none in answers kept before digests were).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub digest: Option<String>,
    pub reply: StoredReply,
}

impl Answer {
    /// `H<digest>` then the reply; the reply alone without a digest.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(d) = &self.digest {
            out.push(b'H');
            out.extend_from_slice(d.as_bytes());
        }
        out.extend(self.reply.encode());
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<Answer> {
        match raw {
            [b'H', rest @ ..] if rest.len() >= DIGEST_HEX => {
                let digest = std::str::from_utf8(&rest[..DIGEST_HEX]).ok()?.to_owned();
                Some(Answer {
                    digest: Some(digest),
                    reply: StoredReply::decode(&rest[DIGEST_HEX..])?,
                })
            }
            _ => Some(Answer {
                digest: None,
                reply: StoredReply::decode(raw)?,
            }),
        }
    }

    /// Whether this answer may be given to a message with `digest`.
    pub(crate) fn fits(&self, digest: &str) -> bool {
        self.digest.as_deref().is_none_or(|d| d == digest)
    }
}

/// Everything a handler changed, written in one atomic operation: state
/// (each key at the version it was loaded at), events to the outbox, and
/// the handler's answer to the inbox. All or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Commit {
    pub states: Vec<StateWrite>,
    pub events: Vec<OutboxEntry>,
    pub inbox: Option<InboxWrite>,
    /// The fencing token of the lease the writer holds: the commit is
    /// refused unless it is still the latest one granted.
    pub fence: Option<Fence>,
    /// The shard the writer's unit of work lives in (its inbox entry's),
    /// if it has one; else the shard of its first state (or event).
    pub home: Option<Home>,
}

/// The store shard a unit of work commits in, and what chose it (for the
/// error that refuses a save of a key in another shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Home {
    pub shard: u32,
    /// "its key acct-7", "its message id 01J…".
    pub by: Arc<str>,
}

/// A lease's fencing token, as a write carries it: the write is refused
/// once a newer grant of the same lease exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    /// The lease: `leader`, or a keyed saga's partition
    /// (`part:<saga>:<n>`).
    pub lease: Arc<str>,
    /// The token of the grant the writer started under.
    pub token: u64,
}

/// The leader lease's name.
pub(crate) const LEADER_LEASE: &str = "leader";

/// What a commit found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Written: the new version of each state, in order.
    Yes(Vec<u64>),
    /// Nothing written: the state at `index` was saved by someone else
    /// since it was loaded; its version now (0: it does not exist).
    Conflict { index: usize, current: u64 },
    /// Nothing written: the message's claim passed to another replica (its
    /// lease ran out while this one worked).
    LostClaim,
    /// Nothing written: the writer's leader lease was granted to another
    /// replica since (its fencing token is not the latest).
    Fenced,
}

/// A handler's answer as the inbox keeps it, to give a retry the same
/// answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoredReply {
    Ok(Bytes),
    Err { kind: ErrorKind, message: String },
}

impl StoredReply {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            StoredReply::Ok(b) => {
                let mut v = b"D+".to_vec();
                v.extend_from_slice(b);
                v
            }
            StoredReply::Err { kind, message } => format!("D-{}:{message}", kind.as_str()).into_bytes(),
        }
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<StoredReply> {
        match raw {
            [b'D', b'+', rest @ ..] => Some(StoredReply::Ok(Bytes::copy_from_slice(rest))),
            [b'D', b'-', rest @ ..] => {
                let text = String::from_utf8_lossy(rest);
                let (kind, message) = text.split_once(':')?;
                Some(StoredReply::Err {
                    kind: ErrorKind::from_wire(Some(kind), None),
                    message: message.to_owned(),
                })
            }
            _ => None,
        }
    }
}

/// What the inbox knows of a message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbox {
    /// First time (or the replica that claimed it is gone): this attempt
    /// now owns it until it finishes.
    Fresh,
    /// Handled before: the answer then.
    Done(Answer),
    /// Being handled right now by a live replica: its claim as the inbox
    /// keeps it (see [`Claim::mark`]; empty if unreadable).
    Busy(String),
}

impl Inbox {
    /// What the inbox holds, read from its raw value.
    pub(crate) fn from_raw(raw: &[u8]) -> Inbox {
        if Claim::parse(raw).is_some() {
            return Inbox::Busy(String::from_utf8_lossy(raw).into_owned());
        }
        match Answer::decode(raw) {
            Some(answer) => Inbox::Done(answer),
            // Unreadable: treated as in progress until it expires rather
            // than run again.
            None => Inbox::Busy(String::new()),
        }
    }
}

/// What finishing a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The answer is kept.
    Kept,
    /// The claim was no longer this attempt's: nothing written; the
    /// answer the inbox holds, if it holds one.
    NotHeld(Option<Answer>),
}

/// The store a runtime uses. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Store(Arc<Inner>);

struct Inner {
    kind: Kind,
    /// The stall switch of the replica using this handle (the fault
    /// simulator's): every call waits while it is on.
    gate: Option<Arc<crate::stall::Gate>>,
    /// How many shards the service's keys are split into (see
    /// [`shards`]). The in-memory store keeps one map whatever the count,
    /// but refuses what a sharded Redis would refuse, so that a service
    /// behaves the same on both.
    shards: u32,
}

// Behind an `Arc` already: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Redis(RedisStore),
    Memory(Arc<MemoryStore>),
}

impl From<RedisStore> for Store {
    fn from(s: RedisStore) -> Store {
        let shards = s.shard_count();
        Store(Arc::new(Inner {
            kind: Kind::Redis(s),
            gate: None,
            shards,
        }))
    }
}

impl From<MemoryStore> for Store {
    fn from(s: MemoryStore) -> Store {
        Store::memory(Arc::new(s), 1)
    }
}

impl From<Arc<MemoryStore>> for Store {
    fn from(s: Arc<MemoryStore>) -> Store {
        Store::memory(s, 1)
    }
}

/// A save refused because its key is in another shard than the unit of
/// work's.
fn other_shard(home: &Home, kind: &str, key: &str, shard: u32, shards: u32) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!(
            "{kind} {key} is in store shard {shard}, and this handler commits in shard {} ({}): with \
             CATGA_STORE_SHARDS={shards} a handler saves only keys of its own shard. Give the message a \
             key in the shard of what it saves (#[command(key = field)]), group related keys with a \
             {{tag}} in their names, or change the other key by sending a command or publishing an \
             event (a saga for work over several keys)",
            home.shard, home.by
        ),
    )
}

/// The store of a service's replicas as `config` names it (`REDIS_URL`,
/// `CATGA_SERVICE`), opened by a process that is not one of them (the
/// CLI, a bare client): with the shard count the store is marked with,
/// whatever `config` says, so that what it writes lands where the
/// replicas look. `None` without `REDIS_URL`. With `to_write`, a store
/// no replica has marked is refused: writing would mark it with this
/// process's count (which the replicas may not share), and an unmarked
/// store is also what a misspelt service name finds.
pub(crate) async fn open_from(config: &crate::config::Config, to_write: bool) -> Result<Option<Store>> {
    let Some(redis) = RedisConnect::from_config(config) else {
        return Ok(None);
    };
    let store = RedisStore::connect(&redis, &config.service, config.store_shards)?;
    // Bounded: the mark sits with the service's own keys, and a master
    // that is away must not hang an operator's command.
    let limit = Duration::from_secs(5);
    let marked = tokio::time::timeout(limit, store.marked_count())
        .await
        .map_err(|_| {
            Error::unavailable(format!(
                "{}: the service's own keys (the shard count, leases, dead letters) are out of reach",
                self::redis::not_within(limit)
            ))
        })??;
    Ok(Some(match marked {
        Some(n) if n != config.store_shards => RedisStore::connect(&redis, &config.service, n)?.into(),
        Some(_) => store.into(),
        None if to_write => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "no replica of service `{}` has written to this store yet: start one first, or check \
                     CATGA_SERVICE",
                    config.service
                ),
            ));
        }
        None => store.into(),
    }))
}

impl Store {
    /// The in-memory store `s`, refusing what `shards` shards would.
    pub(crate) fn memory(s: Arc<MemoryStore>, shards: u32) -> Store {
        Store::memory_gated(s, shards, None)
    }

    /// [`memory`](Self::memory), for a replica whose calls `gate` can
    /// stall.
    pub(crate) fn memory_gated(
        s: Arc<MemoryStore>,
        shards: u32,
        gate: Option<Arc<crate::stall::Gate>>,
    ) -> Store {
        Store(Arc::new(Inner {
            kind: Kind::Memory(s),
            gate,
            shards: shards.max(1),
        }))
    }

    /// Waits while this handle's replica is stalled.
    async fn pass(&self) {
        if let Some(gate) = &self.0.gate {
            gate.pass().await;
        }
    }

    /// Fails with a configuration error when the store holds the
    /// service's data in another number of shards than this runtime's
    /// (checked once it answers).
    pub(crate) async fn check_layout(&self) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.check_layout().await,
            Kind::Memory(_) => Ok(()),
        }
    }

    /// How many shards the service's keys are split into.
    pub(crate) fn shard_count(&self) -> u32 {
        self.0.shards
    }

    /// The shard of a key (a state key, a command's key, a message id).
    pub(crate) fn shard_of(&self, key: &str) -> u32 {
        shards::shard_of(key, self.0.shards)
    }

    /// How many outbox streams the relay drains: one per shard in Redis,
    /// one queue in memory.
    pub(crate) fn outbox_shards(&self) -> u32 {
        match &self.0.kind {
            Kind::Redis(_) => self.0.shards,
            Kind::Memory(_) => 1,
        }
    }

    /// The home a unit of work gets from `key`, its `what` ("key", "saga
    /// key", "message id"), for the error that refuses a save elsewhere.
    pub(crate) fn home_of(&self, what: &str, key: &str) -> Home {
        Home {
            shard: self.shard_of(key),
            by: format!("the shard of its {what} {key}").into(),
        }
    }

    /// Fails when `key` of `kind` is in another shard than `home`.
    pub(crate) fn check_shard(&self, home: &Home, kind: &str, key: &str) -> Result<()> {
        let shard = self.shard_of(key);
        if shard == home.shard {
            Ok(())
        } else {
            Err(other_shard(home, kind, key, shard, self.0.shards))
        }
    }

    /// The shard `commit` is written in: its home's, or its first state's
    /// (or event's); a state in another shard refuses the commit.
    fn commit_shard(&self, commit: &Commit) -> Result<u32> {
        if self.0.shards <= 1 {
            return Ok(0);
        }
        let home = match (&commit.home, commit.states.first(), commit.events.first()) {
            (Some(home), _, _) => home.clone(),
            (None, Some(first), _) => Home {
                shard: self.shard_of(&first.key),
                by: format!(
                    "the shard of the first key it saves, {} {}",
                    first.kind, first.key
                )
                .into(),
            },
            (None, None, Some(event)) => Home {
                shard: self.shard_of(&event.id),
                by: "".into(),
            },
            (None, None, None) => return Ok(0),
        };
        for w in &commit.states {
            self.check_shard(&home, &w.kind, &w.key)?;
        }
        Ok(home.shard)
    }

    /// Which kind, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match &self.0.kind {
            Kind::Redis(_) => "redis",
            Kind::Memory(_) => "memory",
        }
    }

    /// Whether the store answers within `limit`: its control keys (the
    /// leases, fences, members, dead letters and the shard-count mark,
    /// checked against this runtime's count once they answer), and each
    /// shard, in shard order (one for one server or the memory store);
    /// `None` when it does, or why not.
    pub(crate) async fn ping_shards(&self, limit: Duration) -> Pinged {
        let all = |why: Option<String>| Pinged {
            control: why.clone(),
            shards: vec![why; self.outbox_shards().max(1) as usize],
        };
        if tokio::time::timeout(limit, self.pass()).await.is_err() {
            return all(Some(self::redis::not_within(limit)));
        }
        let s = match &self.0.kind {
            Kind::Redis(s) => s,
            Kind::Memory(_) => return all(None),
        };
        let (mut control, shards) = s.ping_shards(limit).await;
        if control.is_none() {
            control = match tokio::time::timeout(limit, s.check_layout()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.message().to_owned()),
                Err(_) => Some(self::redis::not_within(limit)),
            };
        }
        Pinged { control, shards }
    }

    /// Each shard's outbox, in shard order: how many entries wait and
    /// how long the oldest has waited, or why the shard did not answer
    /// within `limit`.
    pub(crate) async fn outbox_waiting(&self, limit: Duration) -> Vec<Result<OutboxShard>> {
        let shard = |shard: u32, asked: Result<(u64, Duration)>| {
            asked
                .map(|(waiting, oldest)| OutboxShard {
                    shard,
                    waiting,
                    oldest,
                })
                .map_err(|e| Error::new(e.kind(), format!("shard {shard}: {}", e.message())))
        };
        match &self.0.kind {
            Kind::Redis(s) => {
                futures_util::future::join_all((0..s.shard_count()).map(|n| async move {
                    let asked = async {
                        self.pass().await;
                        s.outbox_waiting(n).await
                    };
                    let asked = tokio::time::timeout(limit, asked).await.unwrap_or_else(|_| {
                        Err(Error::unavailable(format!(
                            "no answer within {} ms",
                            limit.as_millis()
                        )))
                    });
                    shard(n, asked)
                }))
                .await
            }
            Kind::Memory(s) => {
                let asked = async {
                    self.pass().await;
                    s.outbox_waiting().await
                };
                let asked = tokio::time::timeout(limit, asked)
                    .await
                    .unwrap_or_else(|_| Err(Error::unavailable(self::redis::not_within(limit))));
                vec![shard(0, asked)]
            }
        }
    }

    /// Why the store may lose what catga keeps in it under memory pressure
    /// (its eviction policy), if it may; `None` when it may not, or when
    /// it does not say.
    pub(crate) async fn eviction_risk(&self) -> Result<Option<String>> {
        self.pass().await;
        let Kind::Redis(s) = &self.0.kind else {
            return Ok(None);
        };
        Ok(match s.eviction_policy().await?.as_deref() {
            None | Some("noeviction") => None,
            Some(p) if p.starts_with("allkeys") => Some(format!(
                "Redis evicts any key under memory pressure (maxmemory-policy {p}): fencing tokens, \
                 leases, saga journals and idempotency answers may vanish, and with them fencing and \
                 exactly-once; set maxmemory-policy noeviction"
            )),
            Some(p) => Some(format!(
                "Redis evicts keys with a time to live under memory pressure (maxmemory-policy {p}): \
                 idempotency answers may vanish before their window ends, and a retry then runs \
                 again; set maxmemory-policy noeviction"
            )),
        })
    }

    /// The value of a state key and its version.
    pub(crate) async fn load(&self, kind: &str, key: &str) -> Result<Option<(u64, Bytes)>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.load(self.shard_of(key), kind, key).await,
            Kind::Memory(s) => s.load(kind, key).await,
        }
    }

    /// Writes a commit atomically (see [`Commit`]).
    pub(crate) async fn commit(&self, commit: &Commit) -> Result<Committed> {
        self.pass().await;
        if commit.states.is_empty() && commit.events.is_empty() && commit.inbox.is_none() {
            return Ok(Committed::Yes(Vec::new()));
        }
        let shard = self.commit_shard(commit)?;
        match &self.0.kind {
            Kind::Redis(s) => s.commit(shard, commit).await,
            Kind::Memory(s) => s.commit(commit).await,
        }
    }

    /// The oldest outbox entries, in commit order, at most `count`,
    /// waiting up to `block` for one when there are none. An entry that
    /// cannot be read comes as `None` (it can only be removed).
    pub(crate) async fn outbox_read(
        &self,
        shard: u32,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.outbox_read(shard, count, block).await,
            Kind::Memory(s) => s.outbox_read(count, block).await,
        }
    }

    /// The outbox entries after entry `after`, in commit order, at most
    /// `count` (no waiting).
    pub(crate) async fn outbox_read_after(
        &self,
        shard: u32,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.outbox_read_after(shard, after, count).await,
            Kind::Memory(s) => s.outbox_read_after(after, count).await,
        }
    }

    /// Removes published (or dead-lettered) outbox entries.
    pub(crate) async fn outbox_remove(&self, shard: u32, ids: &[String]) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.outbox_remove(shard, ids).await,
            Kind::Memory(s) => s.outbox_remove(ids).await,
        }
    }

    /// Entries waiting to be published (not yet marked sent).
    pub(crate) async fn outbox_backlog(&self) -> Result<u64> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.outbox_backlog().await,
            Kind::Memory(s) => s.outbox_backlog().await,
        }
    }

    /// Moves a shard's delayed entries due by now (at most `limit`) to
    /// its outbox, in due order; how many moved, and how long until the
    /// next one is due. Redis decides "now" by its clock, the same for
    /// every relay.
    pub(crate) async fn delayed_release(
        &self,
        shard: u32,
        limit: usize,
    ) -> Result<(usize, Option<Duration>)> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.delayed_release(shard, limit).await,
            Kind::Memory(s) => {
                let now = s.clock().now_ms();
                let (moved, next) = s.delayed_release(now, limit);
                Ok((moved, next.map(|n| Duration::from_millis(n.saturating_sub(now)))))
            }
        }
    }

    /// Moves every delayed entry, due or not, to its outbox: the test
    /// kit's "play them now". How many moved. The embedded store only: on
    /// Redis a shortcut past the due time is not something a deployment
    /// should have.
    pub(crate) fn delayed_release_all(&self) -> Result<usize> {
        match &self.0.kind {
            Kind::Memory(s) => Ok(s.delayed_release(u64::MAX, usize::MAX).0),
            Kind::Redis(_) => Err(Error::new(
                ErrorKind::Invalid,
                "delayed messages are released ahead of time on the embedded store only",
            )),
        }
    }

    /// Delayed messages waiting, in every shard.
    pub(crate) async fn delayed_count(&self) -> Result<u64> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => {
                let mut n = 0;
                for shard in 0..s.shard_count() {
                    n += s.delayed_count(shard).await?;
                }
                Ok(n)
            }
            Kind::Memory(s) => Ok(s.delayed_list(usize::MAX).len() as u64),
        }
    }

    /// Cancels the delayed message `id` if it still waits (in whichever
    /// shard it was committed): whether it did.
    pub(crate) async fn delayed_cancel(&self, id: &str) -> Result<bool> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => {
                for shard in 0..s.shard_count() {
                    if s.delayed_cancel(shard, id).await? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Kind::Memory(s) => Ok(s.delayed_cancel(id)),
        }
    }

    /// The delayed messages waiting, soonest first, at most `limit`: id,
    /// subject, due time (unix ms).
    pub(crate) async fn delayed_list(&self, limit: usize) -> Result<Vec<(String, String, u64)>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => {
                let mut all = Vec::new();
                for shard in 0..s.shard_count() {
                    all.extend(s.delayed_list(shard, limit).await?);
                }
                all.sort_by_key(|(_, _, due)| *due);
                all.truncate(limit);
                Ok(all)
            }
            Kind::Memory(s) => Ok(s.delayed_list(limit)),
        }
    }

    /// Claims `id` in `scope` with `claim` (kept for `ttl`, or until its
    /// replica's liveness lapses), or tells what is known of it. The
    /// claiming replica is said alive for `alive_for` in the same step, so
    /// that its claim never names a replica not yet known to be alive.
    pub(crate) async fn inbox_begin(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        claim: &Claim,
        ttl: Duration,
        alive_for: Duration,
    ) -> Result<Inbox> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.inbox_begin(shard, scope, id, claim, ttl, alive_for).await,
            Kind::Memory(s) => s.inbox_begin(scope, id, claim, ttl, alive_for).await,
        }
    }

    /// Keeps `answer` for `id` for `window` if `claim` is still what the
    /// inbox holds for it (an attempt that lost its claim never overwrites
    /// another's answer).
    pub(crate) async fn inbox_finish(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        claim: &Claim,
        answer: &Answer,
        window: Duration,
    ) -> Result<Finished> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => {
                s.inbox_finish(shard, scope, id, &claim.mark(), answer, window)
                    .await
            }
            Kind::Memory(s) => s.inbox_finish(scope, id, &claim.mark(), answer, window).await,
        }
    }

    /// What the inbox holds for `id`, without claiming it: `None` if
    /// nothing.
    pub(crate) async fn inbox_peek(&self, shard: u32, scope: &str, id: &str) -> Result<Option<Vec<u8>>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.inbox_peek(shard, scope, id).await,
            Kind::Memory(s) => s.inbox_peek(scope, id).await,
        }
    }

    /// Says that `member` is alive for `ttl` more (its claims hold), or,
    /// with `alive` false, that it leaves (its claims lapse at once).
    pub(crate) async fn alive(&self, member: &str, ttl: Duration, alive: bool) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.alive(member, ttl, alive).await,
            Kind::Memory(s) => s.alive(member, ttl, alive).await,
        }
    }

    /// Tells `member` that its claim `mark` on `id` (in `scope`, `shard`)
    /// keeps a message busy here: kept for `keep`, until the member's next
    /// look (see [`Store::take_doubts`]). A store failover can bring back
    /// a claim its live replica had already finished; only that replica
    /// knows whether anything in it still holds the claim.
    pub(crate) async fn doubt(&self, shard: u32, member: &str, doubt: &Doubt, keep: Duration) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.doubt(shard, member, &doubt.encode(), keep).await,
            Kind::Memory(s) => s.doubt(member, doubt.encode()),
        }
    }

    /// While claim `mark` on `id` keeps a message busy here: tells its
    /// holder, unless it is `me`, at most once per `every` (`last` is when
    /// this wait last told it), in the background so that a slow shard
    /// does not hold the wait up. Best-effort: a doubt not written is
    /// written at the next wait.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn doubt_claim(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        mark: &str,
        me: &str,
        every: Duration,
        last: &mut Option<tokio::time::Instant>,
    ) {
        let Some((_, holder)) = Claim::holder(mark) else {
            return;
        };
        if holder == me || last.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        let doubt = Doubt {
            scope: scope.to_owned(),
            id: id.to_owned(),
            mark: mark.to_owned(),
        };
        let (store, holder) = (self.clone(), holder.to_owned());
        tokio::spawn(async move {
            // Kept a few of the holder's looks: a holder that is gone has
            // no use for it (its claims lapse with its liveness).
            if let Err(e) = Box::pin(store.doubt(shard, &holder, &doubt, 3 * every)).await {
                tracing::debug!(error = %e, message_id = %doubt.id, "the holder of a busy claim is not told yet");
            }
        });
    }

    /// Takes the doubts other replicas wrote about `member`'s claims (at
    /// most [`DOUBTS`] per shard per look), with their shard; a shard
    /// that does not answer keeps its doubts for the next look.
    pub(crate) async fn take_doubts(&self, member: &str) -> Vec<(u32, Doubt)> {
        self.pass().await;
        let taken = match &self.0.kind {
            Kind::Redis(s) => s.take_doubts(member).await,
            Kind::Memory(s) => s.take_doubts(member).into_iter().map(|d| (0, d)).collect(),
        };
        taken
            .into_iter()
            .filter_map(|(shard, raw)| Doubt::decode(&raw).map(|d| (shard, d)))
            .collect()
    }

    /// Records that this replica wrote dead letter `id` with `digest`, for
    /// `keep` (as long as the letter is kept).
    pub(crate) async fn record_letter(&self, id: &str, digest: &str, keep: Duration) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.record_letter(id, digest, keep).await,
            Kind::Memory(s) => s.record_letter(id, digest, keep).await,
        }
    }

    /// Forgets the record of dead letter `id` (it was replayed: a copy of
    /// it published again is not authentic).
    pub(crate) async fn forget_letter(&self, id: &str) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.forget_letter(id).await,
            Kind::Memory(s) => s.forget_letter(id).await,
        }
    }

    /// The recorded digests of dead letters `ids`, in order (`None`: no
    /// record).
    pub(crate) async fn letter_digests(&self, ids: &[String]) -> Result<Vec<Option<String>>> {
        self.pass().await;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match &self.0.kind {
            Kind::Redis(s) => s.letter_digests(ids).await,
            Kind::Memory(s) => s.letter_digests(ids).await,
        }
    }

    /// A saga's journal: its fields, by name.
    pub(crate) async fn saga_load(&self, id: &str) -> Result<std::collections::BTreeMap<String, Bytes>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.saga_load(self.shard_of(id), id).await,
            Kind::Memory(s) => s.saga_load(id).await,
        }
    }

    /// The ids of the sagas with a journal, newest first, at most `limit`.
    pub(crate) async fn saga_list(&self, limit: usize) -> Result<Vec<String>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.saga_list(limit).await,
            Kind::Memory(s) => s.saga_list(limit).await,
        }
    }

    /// Writes fields of a saga's journal (and lists the saga, the first
    /// time); false (nothing written) if `fence` is not the latest token
    /// of its lease, or if `run` (the scope and mark of the saga run's
    /// claim) no longer holds the run.
    pub(crate) async fn saga_write(
        &self,
        id: &str,
        fields: &[(&str, &[u8])],
        fence: Option<&Fence>,
        run: Option<(&str, &str)>,
    ) -> Result<bool> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.saga_write(self.shard_of(id), id, fields, fence, run).await,
            Kind::Memory(s) => s.saga_write(id, fields, fence, run).await,
        }
    }

    /// Takes the service's leader lease for `lease` (or extends it, if
    /// `owner` holds it): its fencing token, or `None` if another holds it.
    pub(crate) async fn leader_acquire(&self, owner: &str, lease: Duration) -> Result<Option<u64>> {
        self.pass().await;
        let tokens = self
            .lease_sync(&[(LEADER_LEASE.to_owned(), true)], owner, lease)
            .await?;
        Ok(tokens.first().copied().filter(|t| *t > 0))
    }

    /// Gives the leader lease up if `owner` holds it.
    pub(crate) async fn leader_release(&self, owner: &str) -> Result<()> {
        self.pass().await;
        self.lease_sync(&[(LEADER_LEASE.to_owned(), false)], owner, Duration::ZERO)
            .await
            .map(|_| ())
    }

    /// Brings many leases in line in one round trip: each wanted one is
    /// taken (a new fencing token) or extended by `ttl` (its current
    /// token); each unwanted one that `owner` holds is given up. The token
    /// per lease, 0 where `owner` does not hold it.
    pub(crate) async fn lease_sync(
        &self,
        leases: &[(String, bool)],
        owner: &str,
        ttl: Duration,
    ) -> Result<Vec<u64>> {
        self.pass().await;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        match &self.0.kind {
            Kind::Redis(s) => s.lease_sync(leases, owner, ttl).await,
            Kind::Memory(s) => s.lease_sync(leases, owner, ttl).await,
        }
    }

    /// Records that `member` of `group` is alive (or, with `alive` false,
    /// that it leaves), forgets members silent for `timeout`, and returns
    /// the group's members alive, sorted.
    pub(crate) async fn members(
        &self,
        group: &str,
        member: &str,
        alive: bool,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.members(group, member, alive, timeout).await,
            Kind::Memory(s) => s.members(group, member, alive, timeout).await,
        }
    }

    /// Gives up the claim `mark` on `id` (as the inbox keeps it) if it
    /// still holds it.
    pub(crate) async fn inbox_abandon_mark(
        &self,
        shard: u32,
        scope: &str,
        id: &str,
        mark: &str,
    ) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.inbox_abandon(shard, scope, id, mark).await,
            Kind::Memory(s) => s.inbox_abandon(scope, id, mark).await,
        }
    }

    /// Gives `id` up (a retryable failure) if `claim` still holds it: the
    /// next attempt runs it.
    pub(crate) async fn inbox_abandon(&self, shard: u32, scope: &str, id: &str, claim: &Claim) -> Result<()> {
        self.pass().await;
        match &self.0.kind {
            Kind::Redis(s) => s.inbox_abandon(shard, scope, id, &claim.mark()).await,
            Kind::Memory(s) => s.inbox_abandon(scope, id, &claim.mark()).await,
        }
    }
}

/// Claims an attempt may have left in the inbox without knowing it: its
/// request to take one got no answer (Redis died after writing it), or
/// giving one up failed. Such a claim names a live replica, so it would
/// hold its message for the whole inbox window: each is given up in the
/// background, retried until the store answers, while the runtime runs.
/// Found with Redis SIGKILLed under load: a claim written just before the
/// kill, whose reply was lost, answered every retry of its message "busy"
/// until the run ended.
#[derive(Clone)]
pub(crate) struct Orphans {
    queue: tokio::sync::mpsc::Sender<(u32, String, String, Claim)>,
    /// The attempts of this replica that hold or are asking for a claim
    /// (see [`Orphans::hold`]).
    running: Arc<std::sync::Mutex<Running>>,
}

/// The attempts of a replica that hold or ask for a claim, and the ids
/// they own (see [`Orphans::is_stale`]).
#[derive(Default)]
pub(crate) struct Running {
    attempts: std::collections::HashSet<String>,
    /// Per `scope\0id`: how many attempts here own it (one, but two after
    /// a failover lost a claim).
    owned: std::collections::HashMap<String, usize>,
}

fn lock_running(running: &std::sync::Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    // Each critical section is a single insert or removal.
    running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn owned_key(scope: &str, id: &str) -> String {
    format!("{scope}\0{id}")
}

/// An attempt counted as this replica's (see [`Orphans::hold`]) until
/// dropped.
pub(crate) struct Attempt {
    running: Arc<std::sync::Mutex<Running>>,
    attempt: String,
    /// The id it owns, once its claim is taken.
    owns: Option<String>,
}

impl Attempt {
    /// Its claim on `id` (in `scope`) was taken: it owns the id until
    /// dropped.
    pub(crate) fn owns(&mut self, scope: &str, id: &str) {
        let key = owned_key(scope, id);
        *lock_running(&self.running).owned.entry(key.clone()).or_insert(0) += 1;
        self.owns = Some(key);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut running = lock_running(&self.running);
        running.attempts.remove(&self.attempt);
        if let Some(key) = self.owns.take()
            && let Some(n) = running.owned.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                running.owned.remove(&key);
            }
        }
    }
}

/// The receiving end of [`Orphans`], for [`clean_orphans`].
pub(crate) type OrphanQueue = tokio::sync::mpsc::Receiver<(u32, String, String, Claim)>;

/// Claims waiting to be given up, at most; beyond (a long store outage),
/// a claim lapses with its replica's liveness, or with the inbox window.
const ORPHANS: usize = 10_000;

impl Orphans {
    pub(crate) fn new() -> (Orphans, OrphanQueue) {
        let (tx, rx) = tokio::sync::mpsc::channel(ORPHANS);
        (
            Orphans {
                queue: tx,
                running: Arc::default(),
            },
            rx,
        )
    }

    /// Counts `attempt` as this replica's until the guard drops: from
    /// before its claim is asked for until it is finished or given up.
    pub(crate) fn hold(&self, attempt: &str) -> Attempt {
        lock_running(&self.running).attempts.insert(attempt.to_owned());
        Attempt {
            running: Arc::clone(&self.running),
            attempt: attempt.to_owned(),
            owns: None,
        }
    }

    /// Whether the claim `mark` on `id` (in `scope`) the inbox holds is
    /// this replica's (`member`) but neither the attempt it names nor any
    /// other attempt here owns it: its end was written and then lost (a
    /// store failover brought an older copy back), and it would hold the
    /// message while this replica lives. An id another attempt here owns
    /// is not: the failover may have lost that attempt's claim, and it
    /// may still be running.
    pub(crate) fn is_stale(&self, mark: &str, member: &str, scope: &str, id: &str) -> bool {
        Claim::holder(mark).is_some_and(|(attempt, holder)| {
            let running = lock_running(&self.running);
            holder == member
                && !running.attempts.contains(attempt)
                && !running.owned.contains_key(&owned_key(scope, id))
        })
    }

    /// Gives `claim` on `id` (in `shard`) up in the background (if it
    /// still holds it).
    pub(crate) fn give_up(&self, shard: u32, scope: &str, id: &str, claim: &Claim) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) =
            self.queue
                .try_send((shard, scope.to_owned(), id.to_owned(), claim.clone()))
        {
            tracing::warn!(
                "too many claims wait to be given up; this one lapses with the replica or the inbox window"
            );
        }
    }
}

/// Gives up the claims sent to [`Orphans`], one after another, each until
/// the store answers; runs until the runtime stops it.
pub(crate) async fn clean_orphans(store: Store, mut queue: OrphanQueue) {
    while let Some((shard, scope, id, claim)) = queue.recv().await {
        let mut attempt = 0;
        while let Err(e) = store.inbox_abandon(shard, &scope, &id, &claim).await {
            attempt += 1;
            tracing::debug!(error = %e, attempt, "a claim left by a failed attempt is not given up yet");
            let pause = crate::resilience::backoff(Duration::from_millis(200), attempt);
            tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
        }
    }
}

/// What a lease held by this replica is, to what runs under it: the token
/// (0: not held) and until when it is surely held ([`clock_ms`]). Sends
/// and publishes check both: a process that stalls past its lease and
/// wakes has run out of time before its lease loop can say it lost the
/// lease.
#[derive(Default)]
pub(crate) struct Held {
    pub token: std::sync::atomic::AtomicU64,
    pub until_ms: std::sync::atomic::AtomicU64,
}

impl Held {
    /// Granted or renewed with `token`, surely held until `until`.
    pub(crate) fn grant(&self, token: u64, until: tokio::time::Instant) {
        use std::sync::atomic::Ordering;
        self.until_ms.store(clock_ms(until), Ordering::Release);
        self.token.store(token, Ordering::Release);
    }

    /// The token, while surely held; 0 otherwise.
    pub(crate) fn token_now(&self) -> u64 {
        use std::sync::atomic::Ordering;
        if clock_ms(tokio::time::Instant::now()) >= self.until_ms.load(Ordering::Acquire) {
            return 0;
        }
        self.token.load(Ordering::Acquire)
    }
}

/// `at` in milliseconds since this process first asked (a monotonic
/// clock, comparable across tasks).
pub(crate) fn clock_ms(at: tokio::time::Instant) -> u64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| tokio::time::Instant::now() - Duration::from_secs(1));
    at.saturating_duration_since(start).as_millis() as u64
}

/// What a handler's context needs of the store: the store, and for an
/// idempotent handler the writes it keeps until the handler answers.
pub(crate) struct Work {
    pub store: Store,
    /// Where claims this handler may have left behind go to be given up.
    pub orphans: Orphans,
    /// `Some` in an idempotent handler: saves and publishes wait here and
    /// commit atomically with the handler's answer (see the pipeline).
    pub staged: Option<std::sync::Mutex<Staged>>,
    /// Subjects with a durable handler in this process: publishing on them
    /// waits for JetStream's acknowledgement.
    pub durable_subjects: Arc<std::collections::HashSet<&'static str>>,
    /// Messages sent so far by the handler (numbers its children's ids).
    pub sent: std::sync::atomic::AtomicU64,
    /// Whether the handler sent a command that is not idempotent: run
    /// again, it would send that again, and the command could run twice.
    pub sent_unrepeatable: std::sync::atomic::AtomicBool,
    /// In a `leader` handler or a keyed saga's partition: the fencing
    /// token of the lease it started under; its writes are refused once a
    /// newer grant of that lease exists.
    pub fence: Option<Fence>,
    /// With `fence`: the token this replica holds now and until when
    /// (lost, or not renewed in time: 0), checked before each send and
    /// publish.
    pub held: Option<Arc<Held>>,
    /// This replica's liveness name and how long its claims outlive it
    /// (see [`Claim`]), for the claims a handler takes (a saga's run).
    pub member: Arc<str>,
    /// See [`member`](Self::member).
    pub alive_for: Duration,
    /// A durable message's last delivery before it is dead-lettered: a
    /// saga compensates rather than fail retryably.
    pub last_delivery: bool,
    /// A saga's `timeout`.
    pub saga_timeout: Option<Duration>,
    /// The shard its writes commit in, when the message chose one (its
    /// inbox entry's, or its key's); `None` with one shard.
    pub home: Option<Home>,
    /// In a fenced handler with several shards: where the events it
    /// publishes without a save commit (see the pipeline's `events_home`).
    pub events_home: Option<Home>,
}

impl Work {
    /// Fails with a fencing error if this handler runs under a lease that
    /// this replica no longer holds (it stalled, or lost the store): what
    /// it would send or publish now is refused before it leaves.
    pub(crate) fn check_fence(&self) -> Result<()> {
        match (&self.fence, &self.held) {
            (Some(f), Some(held)) if held.token_now() != f.token => Err(fenced()),
            _ => Ok(()),
        }
    }
}

/// The writes of an idempotent handler, not committed yet.
#[derive(Default)]
pub(crate) struct Staged {
    pub states: Vec<StagedState>,
    pub events: Vec<OutboxEntry>,
}

/// One staged state: the version it was loaded at (what the commit
/// checks), the version it has now in the handler, and its value.
pub(crate) struct StagedState {
    pub kind: &'static str,
    pub key: String,
    pub expected: u64,
    pub version: u64,
    pub data: Bytes,
}

impl Staged {
    /// The commit these writes make, with the handler's answer.
    pub(crate) fn into_commit(
        self,
        inbox: Option<InboxWrite>,
        fence: Option<Fence>,
        home: Option<Home>,
    ) -> Commit {
        Commit {
            states: self
                .states
                .into_iter()
                .map(|s| StateWrite {
                    kind: s.kind.to_owned(),
                    key: s.key,
                    expected: s.expected,
                    data: s.data,
                })
                .collect(),
            events: self.events,
            inbox,
            fence,
            home,
        }
    }
}

/// A write of a replica that lost the lease its work started under.
pub(crate) fn fenced() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "this replica is no longer the leader (or the owner of the saga's partition): its write was \
         refused (fenced); the new holder of the lease takes over",
    )
}

/// A store failure as callers see it: retryable while the store is away.
pub(crate) fn unavailable(what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!("the state store is unavailable: {what}"),
    )
}

/// The `catga:{service}` prefix of every key.
pub(crate) fn prefix(service: &str) -> String {
    format!("catga:{{{service}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_replies_round_trip() {
        for r in [
            StoredReply::Ok(Bytes::from_static(br#"{"id":"o-1"}"#)),
            StoredReply::Ok(Bytes::new()),
            StoredReply::Err {
                kind: ErrorKind::Invalid,
                message: "amount: too big: really".into(),
            },
        ] {
            assert_eq!(StoredReply::decode(&r.encode()), Some(r));
        }
        assert_eq!(StoredReply::decode(b"P:owner"), None);
    }

    #[test]
    fn answers_carry_the_digest_of_what_they_answered() {
        let reply = StoredReply::Ok(Bytes::from_static(b"{}"));
        let d = digest(b"{\"amount\":5}");
        let answer = Answer {
            digest: Some(d.clone()),
            reply: reply.clone(),
        };
        let back = Answer::decode(&answer.encode()).expect("decodes");
        assert_eq!(back, answer);
        assert!(back.fits(&d));
        assert!(
            !back.fits(&digest(b"{\"amount\":6}")),
            "another payload under the same id"
        );
        // An answer kept before digests were fits any payload.
        let old = Answer::decode(&reply.encode()).expect("decodes");
        assert_eq!(old.digest, None);
        assert!(old.fits(&d));
    }

    /// A doubt reads back as written whatever its scope and id hold
    /// (separators, digits, the longest id); anything else is dropped.
    #[test]
    fn doubts_read_back_as_written() {
        let mark = Claim {
            digest: "d1".into(),
            attempt: "a1".into(),
            member: "r1/x".into(),
        }
        .mark();
        for (scope, id) in [
            ("tests.idem.deposit", "m-1"),
            ("12:ab", "3:4:P:x"),
            ("", &"~".repeat(crate::wire::MAX_ID_LEN)),
        ] {
            let doubt = Doubt {
                scope: scope.into(),
                id: id.into(),
                mark: mark.clone(),
            };
            assert_eq!(Doubt::decode(&doubt.encode()), Some(doubt));
        }
        for forged in [
            "",
            "5:abc",
            "x:abc",
            "3:abc2:idP:x",
            "3:abc2:idnot-a-claim",
            "99999999999999999999:a",
        ] {
            assert_eq!(Doubt::decode(forged), None, "{forged}");
        }
    }

    #[test]
    fn claims_name_their_digest_and_replica() {
        let claim = Claim {
            digest: digest(b"x"),
            attempt: "a1".into(),
            member: "orders-1/NUID:with:colons".into(),
        };
        let mark = claim.mark();
        assert_eq!(
            Claim::parse(mark.as_bytes()),
            Some((claim.digest.as_str(), "orders-1/NUID:with:colons"))
        );
        assert_eq!(Inbox::from_raw(mark.as_bytes()), Inbox::Busy(mark.clone()));
        assert_eq!(Claim::digest_of(&mark), claim.digest);
        assert_eq!(
            Claim::holder(&mark),
            Some((claim.attempt.as_str(), "orders-1/NUID:with:colons"))
        );
    }

    #[test]
    fn keys_share_the_service_hash_tag() {
        assert_eq!(prefix("orders"), "catga:{orders}");
    }

    fn save(key: &str) -> StateWrite {
        StateWrite {
            kind: "account".into(),
            key: key.into(),
            expected: 0,
            data: Bytes::from_static(b"{}"),
        }
    }

    /// Two keys, in different shards of 3.
    fn apart() -> (String, String) {
        let a = "a-0".to_owned();
        let b = (1..)
            .map(|i| format!("a-{i}"))
            .find(|k| shards::shard_of(k, 3) != shards::shard_of(&a, 3))
            .expect("a key in another shard");
        (a, b)
    }

    #[tokio::test]
    async fn a_commit_over_two_shards_is_refused_naming_both_keys() {
        let store = Store::memory(Arc::new(MemoryStore::new()), 3);
        let (a, b) = apart();
        let home = Home {
            shard: store.shard_of(&a),
            by: format!("the shard of its key {a}").into(),
        };
        let both = Commit {
            states: vec![save(&a), save(&b)],
            home: Some(home.clone()),
            ..Commit::default()
        };
        let refused = store.commit(&both).await.expect_err("two shards");
        assert_eq!(refused.kind(), ErrorKind::Internal);
        let text = refused.message();
        assert!(
            text.contains(&format!("account {b}")) && text.contains(&a),
            "{text}"
        );
        assert!(
            text.contains("CATGA_STORE_SHARDS=3") && text.contains("key = field"),
            "{text}"
        );
        // Without a home, the first save's shard is the commit's.
        let unhomed = Commit {
            states: vec![save(&a), save(&b)],
            ..Commit::default()
        };
        assert!(store.commit(&unhomed).await.is_err());
        assert_eq!(
            store.load("account", &b).await.expect("load"),
            None,
            "nothing written"
        );
        // Keys placed by one tag commit together.
        let tagged = Commit {
            states: vec![save(&a), save(&format!("line-{{{a}}}-1"))],
            home: Some(home),
            ..Commit::default()
        };
        assert!(matches!(store.commit(&tagged).await, Ok(Committed::Yes(_))));
        // One shard takes anything.
        let one = Store::memory(Arc::new(MemoryStore::new()), 1);
        assert!(matches!(one.commit(&unhomed).await, Ok(Committed::Yes(_))));
    }
}
