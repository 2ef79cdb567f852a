//! Keyed sagas (`#[saga(key = field)]`): instances partitioned by key over
//! the live replicas.
//!
//! - The saga's trigger consumer (durable, shared by every replica) only
//!   routes: it reads the key, and stores the trigger on the partition's
//!   subject (`catga.saga.<service>.<saga>.<n>`, one JetStream stream per
//!   saga) under the trigger's message id, so a routing repeated after a
//!   crash is dropped by the stream's duplicate window.
//! - Every replica heartbeats into the store; the live members make a
//!   consistent-hash ring (see [`crate::ring`]) that gives each partition
//!   one owner.
//! - An owner serves a partition only while it holds the partition's lease
//!   (with a fencing token from `INCR`, like the leader lease): the ring
//!   says who should, the lease makes sure no two do. Every journal and
//!   state write of the partition's sagas carries the token; a replica that
//!   lost the lease (stalled, partitioned) cannot move a saga on.
//! - A partition is one durable consumer with one message in flight, so a
//!   key's sagas run one after another, in the order their triggers were
//!   routed, across hand-overs too: an owner that gives a partition up
//!   drains it before it releases the lease, and a crashed owner's message
//!   in flight comes back (after the ack wait) before any later one.
//! - `concurrency = N` bounds the sagas one replica runs at once, over all
//!   its partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Served, Serving, Shared};
use crate::error::{Error, ErrorKind, Result};
use crate::registry::HandlerSpec;
use crate::store::Fence;
use crate::wire::MessageMeta;

/// The longest ack wait of a keyed saga's consumers. Each has one message
/// in flight, so a delivery lost in a hand-over (the broker sent it to an
/// owner that had just stopped pulling) holds the whole partition until
/// the ack wait passes: with the default 30 s, the keyed scenario stalled
/// for 20 s after a replica left. Messages being handled are kept alive
/// with progress acks every third of it.
pub(crate) const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One partition of a keyed saga, as a replica serves it.
pub(crate) struct Partition {
    pub index: u32,
    /// The partitions' stream subject (`<base>.*`).
    pub stream_subject: String,
    lease: Arc<str>,
    /// The lease's token; 0 once it is lost or given up.
    token: AtomicU64,
    /// Sagas of this saga type running on this replica, over partitions.
    pub gate: Arc<Semaphore>,
}

impl Partition {
    /// The fence of a message taken now; fenced if the lease is gone.
    pub(crate) fn fence(&self) -> Result<Fence> {
        match self.token.load(Ordering::Acquire) {
            0 => Err(crate::state::fenced()),
            token => Ok(Fence {
                lease: Arc::clone(&self.lease),
                token,
            }),
        }
    }
}

/// The subjects of a keyed saga's partitions: `<base>.<n>`.
pub(crate) fn partition_base(service: &str, spec: &HandlerSpec) -> String {
    let saga = spec.durable().unwrap_or_else(|| spec.name());
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("catga.saga.{}.{}", clean(service), clean(saga))
}

fn lease_name(spec: &HandlerSpec, p: u32) -> String {
    format!("part:{}:{p}", spec.durable().unwrap_or_else(|| spec.name()))
}

/// The trigger consumer's work: stores the trigger on its key's partition.
pub(crate) async fn route(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: Bytes,
) -> Result<Bytes> {
    let spec = served.spec;
    let partitions = spec.partitions().unwrap_or(1);
    let key = spec.key_of(&payload)?.ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("keyed saga {} has no key function", spec.name()),
        )
    })?;
    let p = crate::ring::partition_of(&key, partitions);
    let subject = format!("{}.{p}", partition_base(&shared.config.service, spec));
    let mut headers = meta.headers().cloned().unwrap_or_default();
    // The partition's copy keeps the trigger's id: the saga's id, and what
    // the stream drops a repeated routing by.
    headers.insert(crate::wire::headers::MESSAGE_ID, meta.message_id());
    let transport = shared.client.transport();
    match transport
        .publish_durable(&subject, headers, payload, shared.config.request_timeout)
        .await
    {
        Ok(()) => Ok(Bytes::new()),
        // The partitions' stream is made by the ownership loop at start:
        // not there yet is a matter of time.
        Err(e) if e.kind() == ErrorKind::NoHandler => Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "the partitions of saga {} are not set up yet: {}",
                spec.name(),
                e.message()
            ),
        )),
        Err(e) => Err(e),
    }
}

/// One partition slot on this replica.
enum Slot {
    Serving {
        partition: Arc<Partition>,
        serving: Serving,
    },
    /// Given up: draining before the lease is released.
    Draining(JoinHandle<()>),
}

/// What this replica owns, for [`crate::Runtime::partitions`] and the
/// shutdown.
#[derive(Default)]
pub(crate) struct Owned {
    slots: BTreeMap<(&'static str, u32), Slot>,
}

impl Owned {
    /// The partitions served, per saga.
    pub(crate) fn served(&self) -> BTreeMap<&'static str, Vec<u32>> {
        let mut out: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
        for ((saga, p), slot) in &self.slots {
            if matches!(slot, Slot::Serving { .. }) {
                out.entry(saga).or_default().push(*p);
            }
        }
        out
    }

    /// Everything still running, for the shutdown to drain.
    pub(crate) fn take_all(&mut self) -> (Vec<Serving>, Vec<JoinHandle<()>>) {
        let mut serving = Vec::new();
        let mut draining = Vec::new();
        for (_, slot) in std::mem::take(&mut self.slots) {
            match slot {
                Slot::Serving {
                    partition,
                    serving: s,
                } => {
                    partition.token.store(0, Ordering::Release);
                    serving.push(s);
                }
                Slot::Draining(h) => draining.push(h),
            }
        }
        (serving, draining)
    }

    /// Aborts every serve loop (the runtime was dropped).
    pub(crate) fn abort_all(&self) {
        for slot in self.slots.values() {
            match slot {
                Slot::Serving { serving, .. } => serving.tasks.iter().for_each(JoinHandle::abort),
                Slot::Draining(h) => h.abort(),
            }
        }
    }
}

/// This replica's name in the ring: its instance id and a nonce of this
/// start (a restarted replica is a new member).
pub(crate) fn member_name(shared: &Shared) -> &str {
    shared.leadership.owner()
}

/// Heartbeats, rebalances, and starts or stops serving partitions; runs
/// until aborted.
pub(crate) async fn run(shared: Arc<Shared>, owned: Arc<Mutex<Owned>>, specs: Vec<&'static HandlerSpec>) {
    let every = shared.config.member_heartbeat;
    let ttl = shared.config.member_timeout;
    let me = member_name(&shared).to_owned();
    let gates: Vec<Arc<Semaphore>> = specs
        .iter()
        .map(|s| {
            Arc::new(Semaphore::new(
                s.concurrency().unwrap_or(shared.config.concurrency).max(1),
            ))
        })
        .collect();
    let mut streams_ready = false;
    // Until when this replica surely holds the leases it was granted.
    let mut held_until = Instant::now();
    let mut members_seen: Vec<String> = Vec::new();
    let mut served_before = BTreeMap::new();
    loop {
        let tick = Instant::now();
        if !streams_ready {
            streams_ready = ensure_streams(&shared, &specs).await;
        }
        match shared.store.members(&me, true, ttl).await {
            Ok(members) => {
                if members != members_seen {
                    tracing::info!(members = members.len(), ?members, "saga ring members changed");
                    metrics::gauge!("catga_members").set(members.len() as f64);
                    members_seen = members;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot heartbeat into the store"),
        }
        // Until this replica heard of itself, it serves nothing.
        let ring = crate::ring::Ring::new(&members_seen);
        let mut owned_now = owned.lock().await;
        // Drains that finished free their partitions.
        owned_now
            .slots
            .retain(|_, slot| !matches!(slot, Slot::Draining(h) if h.is_finished()));
        let mut leases = Vec::new();
        let mut index = Vec::new();
        for (spec, gate) in specs.iter().zip(&gates) {
            let partitions = spec.partitions().unwrap_or(1);
            let owners = ring.assign(partitions);
            for p in 0..partitions {
                let mine = streams_ready && owners.get(p as usize).is_some_and(|o| *o == me);
                let slot = owned_now.slots.get(&(spec.name(), p));
                if !mine && matches!(slot, Some(Slot::Serving { .. })) {
                    give_up(
                        &shared,
                        &mut owned_now,
                        spec.name(),
                        p,
                        "it belongs to another replica now",
                    );
                }
                let keep = mine || owned_now.slots.contains_key(&(spec.name(), p));
                leases.push((lease_name(spec, p), keep));
                index.push((*spec, Arc::clone(gate), p, mine));
            }
        }
        match shared.store.lease_sync(&leases, &me, ttl).await {
            Ok(tokens) => {
                held_until = tick + ttl;
                for ((spec, gate, p, mine), token) in index.into_iter().zip(tokens) {
                    let key = (spec.name(), p);
                    match (owned_now.slots.get(&key), token) {
                        (Some(Slot::Serving { partition, .. }), t) if t > 0 => {
                            partition.token.store(t, Ordering::Release);
                        }
                        (Some(Slot::Serving { .. }), _) => {
                            give_up(
                                &shared,
                                &mut owned_now,
                                spec.name(),
                                p,
                                "its lease passed to another replica",
                            );
                        }
                        (None, t) if t > 0 && mine => {
                            let partition = Arc::new(Partition {
                                index: p,
                                stream_subject: format!("{}.*", partition_base(&shared.config.service, spec)),
                                lease: lease_name(spec, p).into(),
                                token: AtomicU64::new(t),
                                gate,
                            });
                            match super::spawn_partition(spec, &shared, Arc::clone(&partition)).await {
                                Ok(serving) => {
                                    tracing::debug!(
                                        saga = spec.name(),
                                        partition = p,
                                        token = t,
                                        "serving a saga partition"
                                    );
                                    owned_now.slots.insert(key, Slot::Serving { partition, serving });
                                }
                                Err(e) => {
                                    tracing::error!(saga = spec.name(), partition = p, error = %e, "a saga partition could not start")
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(e) if Instant::now() + every >= held_until => {
                tracing::error!(error = %e, "the saga partition leases could not be renewed before they ran out: stopping every partition");
                let keys: Vec<(&'static str, u32)> = owned_now
                    .slots
                    .iter()
                    .filter(|(_, s)| matches!(s, Slot::Serving { .. }))
                    .map(|(k, _)| *k)
                    .collect();
                for (saga, p) in keys {
                    give_up(&shared, &mut owned_now, saga, p, "its lease could not be renewed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the saga partition leases could not be renewed; trying again")
            }
        }
        let served = owned_now.served();
        if served != served_before {
            for (saga, held) in &served {
                metrics::gauge!("catga_saga_partitions", "saga" => *saga).set(held.len() as f64);
                tracing::info!(saga, partitions = ?held, "saga partitions served here");
            }
            for saga in served_before.keys().filter(|s| !served.contains_key(*s)) {
                metrics::gauge!("catga_saga_partitions", "saga" => *saga).set(0.0);
                tracing::info!(saga, "no saga partitions served here");
            }
            served_before = served;
        }
        drop(owned_now);
        tokio::time::sleep_until(tick + every).await;
    }
}

/// Stops serving a partition: no new message is taken (its lease token
/// is dropped locally at once), the one in flight finishes or is cancelled
/// at the drain deadline, then the lease is released at the next tick.
fn give_up(shared: &Arc<Shared>, owned: &mut Owned, saga: &'static str, p: u32, why: &str) {
    let Some(Slot::Serving { partition, serving }) = owned.slots.remove(&(saga, p)) else {
        return;
    };
    partition.token.store(0, Ordering::Release);
    tracing::info!(saga, partition = p, reason = why, "giving a saga partition up");
    let deadline = Instant::now() + shared.config.drain_timeout;
    let wanted = serving.served.parallel;
    let health = shared.health.clone();
    let drain = tokio::spawn(async move {
        super::shutdown::stop_serving(vec![serving], deadline).await;
        health.unwant(wanted);
    });
    owned.slots.insert((saga, p), Slot::Draining(drain));
}

/// Creates the partitions' streams; false (tried again at the next tick)
/// while the broker does not answer.
async fn ensure_streams(shared: &Shared, specs: &[&'static HandlerSpec]) -> bool {
    let transport = shared.client.transport();
    for spec in specs {
        let base = partition_base(&shared.config.service, spec);
        let partitions = spec.partitions().unwrap_or(1);
        if let Err(e) = transport
            .ensure_partition_streams(&base, partitions, &shared.config.streams)
            .await
        {
            tracing::warn!(saga = spec.name(), error = %e, "cannot set up the saga's partition stream yet");
            return false;
        }
    }
    true
}

/// Leaves the ring and gives every lease up (at shutdown, after the
/// partitions drained), so that the others take over at once.
pub(crate) async fn leave(shared: &Shared, specs: &[&'static HandlerSpec]) {
    let me = member_name(shared);
    let leases: Vec<(String, bool)> = specs
        .iter()
        .flat_map(|spec| (0..spec.partitions().unwrap_or(1)).map(move |p| (lease_name(spec, p), false)))
        .collect();
    if let Err(e) = shared
        .store
        .members(me, false, shared.config.member_timeout)
        .await
    {
        tracing::warn!(error = %e, "could not leave the saga ring; the others notice when the heartbeats stop");
    }
    if let Err(e) = shared
        .store
        .lease_sync(&leases, me, shared.config.member_timeout)
        .await
    {
        tracing::warn!(error = %e, "could not release the saga partitions; their leases run out by themselves");
    }
}
