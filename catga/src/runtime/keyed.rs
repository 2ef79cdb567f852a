//! Keyed sagas (`#[saga(key = field)]`): instances partitioned by key over
//! the live replicas.
//!
//! - One router per partition stream (`CATGA_JS_SAGA_STREAMS`, 1 by
//!   default) routes, each share on one replica at a time (the holder of
//!   the share's router lease, placed by the ring like a partition): it
//!   pulls every trigger with a durable consumer of its own, reads each
//!   key, acknowledges the triggers of other shares' partitions, and
//!   stores each of its own on its partition's subject
//!   (`catga.saga.<service>.<saga>.<n>`, in stream `n %
//!   CATGA_JS_SAGA_STREAMS`) under the trigger's message id, so a routing
//!   repeated after a crash is dropped by the stream's duplicate window.
//!   A key's triggers all go through the one share of its partition's
//!   stream. It sends one trigger after another on one connection without
//!   waiting for each acknowledgement, except that a copy waits until the
//!   copy of its key in flight was stored (the router goes on with other
//!   keys meanwhile), and acks each trigger once its copy is stored: a
//!   key's triggers reach their partition in the order they were
//!   published, whoever else writes the stream. A new router whose
//!   consumer still has unacknowledged deliveries (the old router died)
//!   waits an ack wait first, so that those come back before newer ones.
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Shared;
use super::served::{Served, Serving};
use crate::error::{Error, ErrorKind, Result};
use crate::registry::HandlerSpec;
use crate::store::Fence;
use crate::transport::{DurableOptions, Settle, Settler, Stored};

/// The longest ack wait of a keyed saga's consumers. Each has one message
/// in flight, so a delivery lost in a hand-over (the broker sent it to a
/// pull request the old owner left behind) holds the whole partition
/// until the ack wait passes: with the default 30 s, the keyed scenario
/// stalled for 20 s after a replica left; with 5 s, the keyed benchmark
/// still saw 5-8 s stalls after the partitions moved at start-up. Messages
/// being handled are kept alive with progress acks every third of it.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(2);

/// How long a pull request of a keyed saga's consumer waits on the broker.
/// With the usual 30 s, a partition (one message in flight) stalled for
/// the whole 30 s in 1 of 3 runs of the keyed benchmark: the client held a
/// pull request the server no longer had (it reported missed idle
/// heartbeats every 10 s) until the request expired and it asked again.
/// A short expiry bounds such a stall; an idle partition asks again every
/// 3 s, which costs next to nothing.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(3);

/// One partition of a keyed saga, as a replica serves it.
pub(crate) struct Partition {
    pub index: u32,
    /// The key its stream is named after (see
    /// [`partition_streams`](crate::transport::partition_streams)).
    pub stream_key: String,
    lease: Arc<str>,
    /// The lease's token while this replica holds the lease (0 once it is
    /// lost or released) and until when it surely does, shared with the
    /// sagas running under it, which check it before they send.
    token: Arc<super::lease::Held>,
    /// Whether the partition takes new messages: false from the moment it
    /// is given up, while what it runs drains under the lease.
    open: std::sync::atomic::AtomicBool,
    /// Sagas of this saga type running on this replica, over partitions.
    pub gate: Arc<Semaphore>,
}

impl Partition {
    /// The token held now, as the sagas running under it see it.
    pub(crate) fn held(&self) -> Arc<super::lease::Held> {
        Arc::clone(&self.token)
    }

    /// The lease's name and the token held, for holding it through a
    /// drain.
    pub(crate) fn lease(&self) -> super::lease::HeldLease {
        (self.lease.to_string(), Arc::clone(&self.token))
    }

    /// The fence of a message taken now; fenced if the partition was given
    /// up or its lease is gone.
    pub(crate) fn fence(&self) -> Result<Fence> {
        let token = self.token.token_now();
        if token == 0 || !self.open.load(Ordering::Acquire) {
            return Err(crate::state::fenced());
        }
        Ok(Fence {
            lease: Arc::clone(&self.lease),
            token,
        })
    }

    /// Takes no new message; what runs goes on under the lease.
    fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// The lease is lost: what runs can no longer send or write either.
    fn lose(&self) {
        self.close();
        self.token.token.store(0, Ordering::Release);
    }
}

/// The subjects of a keyed saga's partitions: `<base>.<n>`.
pub(crate) fn partition_base(service: &str, spec: &HandlerSpec) -> String {
    format!(
        "catga.saga.{}.{}",
        crate::transport::subject_token(service),
        crate::transport::subject_token(saga_name(spec))
    )
}

/// A keyed saga's name in the store and the broker: its durable
/// consumer's name.
pub(crate) fn saga_name(spec: &HandlerSpec) -> &'static str {
    spec.durable().unwrap_or_else(|| spec.name())
}

/// The ack wait of a keyed saga's consumers (see [`ACK_WAIT`]).
pub(crate) fn ack_wait(config: &crate::config::Config) -> Duration {
    config.ack_wait.min(ACK_WAIT)
}

fn lease_name(spec: &HandlerSpec, p: u32) -> String {
    let saga = saga_name(spec);
    match router_share(p) {
        Some(0) => format!("part:{saga}:router"),
        Some(share) => format!("part:{saga}:router-{share}"),
        None => format!("part:{saga}:{p}"),
    }
}

/// The slot of the routers' first share: share `k` is `ROUTER - k`. Not
/// partition numbers (those are far below).
const ROUTER: u32 = u32::MAX;

/// The slot of router share `share`.
fn router_slot(share: u32) -> u32 {
    ROUTER - share
}

/// The router share of slot `p`, if it is a router's.
fn router_share(p: u32) -> Option<u32> {
    (p > u32::MAX / 2).then(|| ROUTER - p)
}

/// How many routers share a keyed saga's triggers: one per partition
/// stream (`CATGA_JS_SAGA_STREAMS`, at most one per partition), each
/// routing the triggers of its stream's partitions, so that a key's
/// triggers all go through one router and no one replica routes every
/// trigger.
pub(crate) fn router_shares(spec: &HandlerSpec, config: &crate::config::Config) -> u32 {
    crate::transport::partition_stream_count(spec.partitions().unwrap_or(1), config.streams.saga_streams)
}

/// The durable consumer router share `share` pulls the triggers with:
/// share 0 keeps the saga's own name (the one router of a saga on one
/// stream, and of earlier releases).
pub(crate) fn router_durable(spec: &HandlerSpec, share: u32) -> String {
    if share == 0 {
        saga_name(spec).to_owned()
    } else {
        format!("{}-r{share}", saga_name(spec))
    }
}

/// In-flight routings of one router: the triggers sent to their
/// partitions and not yet acknowledged there.
const ROUTER_WINDOW: usize = 256;

/// One partition slot on this replica.
enum Slot {
    Serving {
        partition: Arc<Partition>,
        run: Running,
    },
    /// Given up: draining under the lease, which is released after.
    Draining {
        partition: Arc<Partition>,
        drain: JoinHandle<()>,
    },
}

/// What serves a slot.
enum Running {
    /// A partition's serve loop.
    Loops(Serving),
    /// The router.
    Router {
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
        /// Why it cannot route right now, if it cannot.
        trouble: Trouble,
    },
}

/// Why a router cannot route right now (`None` while it routes or sets
/// up), shared between it and the ownership loop's report.
type Trouble = Arc<std::sync::Mutex<Option<String>>>;

/// A router's set-up step failed with `e`: logged (`log`), and told to
/// readiness as `why` with the error.
fn held_back(trouble: &Trouble, spec: &HandlerSpec, share: u32, e: &Error, log: &str, why: &str) {
    tracing::warn!(saga = spec.name(), share, error = %e, "{log}");
    set_trouble(trouble, Some(format!("{why}: {e}")));
}

fn set_trouble(trouble: &Trouble, why: Option<String>) {
    *trouble.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = why;
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
            if router_share(*p).is_none() && matches!(slot, Slot::Serving { .. }) {
                out.entry(saga).or_default().push(*p);
            }
        }
        out
    }

    /// The router shares run here, per saga.
    pub(crate) fn routing(&self) -> BTreeMap<&'static str, Vec<u32>> {
        let mut out: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
        for ((saga, p), slot) in &self.slots {
            if let (
                Some(share),
                Slot::Serving {
                    run: Running::Router { .. },
                    ..
                },
            ) = (router_share(*p), slot)
            {
                out.entry(saga).or_default().push(share);
            }
        }
        out.values_mut().for_each(|shares| shares.sort_unstable());
        out
    }

    /// Everything still running, for the shutdown to drain, and the leases
    /// to hold while it does.
    pub(crate) fn take_all(&mut self) -> (Vec<Serving>, Vec<JoinHandle<()>>, Vec<super::lease::HeldLease>) {
        let mut serving = Vec::new();
        let mut draining = Vec::new();
        let mut leases = Vec::new();
        for (_, slot) in std::mem::take(&mut self.slots) {
            match slot {
                Slot::Serving { partition, run } => {
                    partition.close();
                    leases.push(partition.lease());
                    match run {
                        Running::Loops(s) => serving.push(s),
                        Running::Router { stop, task, .. } => {
                            let _ = stop.send(true);
                            draining.push(task);
                        }
                    }
                }
                Slot::Draining { partition, drain } => {
                    leases.push(partition.lease());
                    draining.push(drain);
                }
            }
        }
        (serving, draining, leases)
    }
}

/// The keyed sagas a runtime serves: the loop that owns their partitions,
/// what it owns, and the sagas (started and stopped by name like any
/// handler).
pub(crate) struct Keyed {
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    owned: Arc<Mutex<Owned>>,
    sagas: Arc<Sagas>,
}

/// Which keyed sagas this replica runs: those it should, and those its
/// loop runs (also while it leaves one: its partitions drain, then it
/// leaves the saga's ring and gives the leases up).
pub(crate) struct Sagas {
    wanted: std::sync::Mutex<Vec<&'static HandlerSpec>>,
    /// Rounds of the loop begun so far.
    begun: std::sync::atomic::AtomicU64,
    /// The last round finished, and the sagas the loop ran after it.
    running: watch::Sender<(u64, Vec<&'static HandlerSpec>)>,
}

impl Sagas {
    fn wanted(&self) -> Vec<&'static HandlerSpec> {
        self.wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Keyed {
    /// Starts the ownership loop of `specs` (none when there are none:
    /// then it starts with the first keyed saga started by name).
    pub(crate) fn start(shared: &Arc<Shared>, specs: Vec<&'static HandlerSpec>) -> Keyed {
        let keyed = Keyed {
            task: std::sync::Mutex::new(None),
            owned: Arc::new(Mutex::new(Owned::default())),
            sagas: Arc::new(Sagas {
                wanted: std::sync::Mutex::new(specs),
                begun: std::sync::atomic::AtomicU64::new(0),
                running: watch::Sender::new((0, Vec::new())),
            }),
        };
        if !keyed.sagas.wanted().is_empty() {
            keyed.spawn(shared);
        }
        keyed
    }

    fn spawn(&self, shared: &Arc<Shared>) {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if task.is_none() {
            *task = Some(shared.tasks.spawn(run(
                Arc::clone(shared),
                Arc::clone(&self.owned),
                Arc::clone(&self.sagas),
            )));
        }
    }

    /// Waits until the ownership loop finished its first round (at once
    /// when it does not run).
    pub(crate) async fn first_round(&self) {
        if self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
        {
            return;
        }
        let mut running = self.sagas.running.subscribe();
        let _ = running.wait_for(|(round, _)| *round >= 1).await;
    }

    /// The keyed sagas this replica should run.
    pub(crate) fn wanted(&self) -> Vec<&'static HandlerSpec> {
        self.sagas.wanted()
    }

    /// Joins keyed saga `spec`'s ring: the loop takes the partitions the
    /// ring gives this replica at its next heartbeat. Returns at once.
    pub(crate) fn join(&self, shared: &Arc<Shared>, spec: &'static HandlerSpec) {
        {
            let mut wanted = self
                .sagas
                .wanted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !wanted.iter().any(|s| s.name() == spec.name()) {
                wanted.push(spec);
            }
        }
        self.spawn(shared);
    }

    /// Leaves keyed saga `name`: its partitions drain (bounded by the
    /// drain time-out), then this replica leaves its ring and gives its
    /// leases up, so that the others take them over. Returns when that is
    /// done, or an error past `within`.
    pub(crate) async fn part(&self, name: &str, within: Duration) -> Result<()> {
        self.sagas
            .wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|s| s.name() != name);
        let looping = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some();
        if !looping {
            return Ok(());
        }
        // A round begun after this one read the sagas without it: once such
        // a round ends without running it, it has been left.
        let after = self.sagas.begun.load(Ordering::Acquire);
        let mut running = self.sagas.running.subscribe();
        let left = tokio::time::timeout(
            within,
            running.wait_for(|(round, r)| *round > after && r.iter().all(|s| s.name() != name)),
        )
        .await;
        match left {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::new(ErrorKind::Unavailable, "the runtime is stopping")),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "keyed saga `{name}` did not finish leaving within {within:?} (its partitions still drain, \
                     or the store does not answer); the replica goes on leaving it unless it is started again"
                ),
            )),
        }
    }

    /// The partitions served here, per saga.
    pub(crate) async fn served(&self) -> BTreeMap<&'static str, Vec<u32>> {
        self.owned.lock().await.served()
    }

    /// The router shares this replica runs, per saga.
    pub(crate) async fn routing(&self) -> BTreeMap<&'static str, Vec<u32>> {
        self.owned.lock().await.routing()
    }

    /// Stops the ownership loop and takes what still runs, for the
    /// shutdown to drain (see [`Owned::take_all`]).
    pub(crate) async fn stop(&mut self) -> (Vec<Serving>, Vec<JoinHandle<()>>, Vec<super::lease::HeldLease>) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.owned.lock().await.take_all()
    }

    /// Leaves the rings and gives the leases up (after the drain).
    pub(crate) async fn leave(&self, shared: &Shared) {
        let mut specs = self.sagas.wanted();
        for s in self.sagas.running.borrow().1.iter() {
            if !specs.iter().any(|w| w.name() == s.name()) {
                specs.push(s);
            }
        }
        if !specs.is_empty() {
            leave(shared, &specs).await;
        }
    }
}

/// A saga's `concurrency` gate, shared by its partitions on this replica.
fn gate(shared: &Shared, spec: &HandlerSpec) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        spec.concurrency().unwrap_or(shared.config.concurrency).max(1),
    ))
}

/// Who should own each partition of a saga with `partitions` partitions,
/// then each of its `routers` router shares, given its live `members`
/// (from the consistent-hash ring, loads bounded at the mean). The pure
/// step of the ownership loop; the loop then brings the leases in line
/// with it.
pub(crate) fn owners(members: &[String], saga: &str, partitions: u32, routers: u32) -> Vec<String> {
    let ring = crate::ring::Ring::new(members);
    let owners = ring.assign(partitions).into_iter();
    if routers <= 1 {
        return owners
            .chain(ring.owner_of(&format!("router/{saga}")))
            .map(str::to_owned)
            .collect();
    }
    // Several shares spread like partitions (loads bounded at the mean):
    // each on its own point, 3 shares over 3 replicas landed on 2 of them
    // in most member lists.
    let names: Vec<String> = (0..routers).map(|k| format!("router/{saga}/{k}")).collect();
    owners.chain(ring.spread(&names)).map(str::to_owned).collect()
}

/// This replica's name in the ring: its instance id and a nonce of this
/// start (a restarted replica is a new member).
pub(crate) fn member_name(shared: &Shared) -> &str {
    shared.leadership.owner()
}

/// Heartbeats, rebalances, and starts or stops serving partitions; runs
/// until aborted.
pub(crate) async fn run(shared: Arc<Shared>, owned: Arc<Mutex<Owned>>, sagas: Arc<Sagas>) {
    let mut keeper = Keeper::new(shared);
    loop {
        let tick = Instant::now();
        let round = sagas.begun.fetch_add(1, Ordering::AcqRel) + 1;
        keeper.follow(&sagas.wanted());
        keeper.heartbeat().await;
        let mut owned_now = owned.lock().await;
        keeper.reconcile(&mut owned_now, tick).await;
        keeper.report(&owned_now);
        keeper.forget_left(&owned_now);
        drop(owned_now);
        sagas.running.send_replace((round, keeper.specs.clone()));
        tokio::time::sleep_until(tick + keeper.shared.config.member_heartbeat).await;
    }
}

/// The state of the keyed-saga loop between heartbeats.
struct Keeper {
    shared: Arc<Shared>,
    specs: Vec<&'static HandlerSpec>,
    /// One gate per saga: its `concurrency`, shared by its partitions.
    gates: Vec<Arc<Semaphore>>,
    me: String,
    /// Whether each saga's streams are set up (its partitions are served
    /// only then), and why not.
    streams_ready: Vec<bool>,
    streams_error: Vec<Option<Error>>,
    /// Until when this replica surely holds the leases it was granted.
    held_until: Instant,
    /// The replicas running each keyed saga (a replica runs the selection
    /// of handlers it was started with, so each saga has its own ring).
    members_seen: Vec<Vec<String>>,
    /// Each saga's owners (of its partitions, then of its router), made
    /// from the ring when its members change. Until this replica heard of
    /// itself, it owns nothing.
    owners: Vec<Vec<String>>,
    served_before: BTreeMap<&'static str, Vec<u32>>,
    /// Why the last round could not do its part, for readiness: a
    /// heartbeat or the leases' renewal failed.
    heartbeat_error: Option<String>,
    leases_error: Option<String>,
    /// Why a slot the ring gives this replica is not served, by slot.
    not_served: BTreeMap<(&'static str, u32), String>,
    /// The sagas this replica is leaving (stopped by name): it serves
    /// none of their partitions, and forgets them once those drained.
    leaving: std::collections::BTreeSet<&'static str>,
}

/// One lease of the round: which saga, its gate, which partition, and
/// whether the ring gives it to this replica.
type Wanted = (&'static HandlerSpec, Arc<Semaphore>, u32, bool);

impl Keeper {
    /// A keeper of no saga yet: [`follow`](Self::follow) takes them up.
    fn new(shared: Arc<Shared>) -> Keeper {
        Keeper {
            me: member_name(&shared).to_owned(),
            gates: Vec::new(),
            streams_ready: Vec::new(),
            streams_error: Vec::new(),
            held_until: Instant::now(),
            members_seen: Vec::new(),
            owners: Vec::new(),
            served_before: BTreeMap::new(),
            heartbeat_error: None,
            leases_error: None,
            not_served: BTreeMap::new(),
            leaving: std::collections::BTreeSet::new(),
            specs: Vec::new(),
            shared,
        }
    }

    /// Takes up the sagas started by name and starts leaving those
    /// stopped.
    fn follow(&mut self, wanted: &[&'static HandlerSpec]) {
        for spec in wanted {
            self.leaving.remove(spec.name());
            if !self.specs.iter().any(|s| s.name() == spec.name()) {
                self.gates.push(gate(&self.shared, spec));
                self.members_seen.push(Vec::new());
                self.owners.push(Vec::new());
                self.streams_ready.push(false);
                self.streams_error.push(None);
                self.specs.push(spec);
            }
        }
        for ((spec, owners), seen) in self
            .specs
            .iter()
            .zip(self.owners.iter_mut())
            .zip(self.members_seen.iter_mut())
        {
            if !wanted.iter().any(|w| w.name() == spec.name()) && self.leaving.insert(spec.name()) {
                tracing::info!(
                    saga = spec.name(),
                    "leaving the saga: its partitions drain, then its ring is left"
                );
                // Nothing is this replica's any more: the next round gives
                // every partition up. Should it join again, the ring is
                // made anew from the members it then sees.
                owners.clear();
                seen.clear();
            }
        }
    }

    /// Forgets the sagas left whose partitions have all drained, once a
    /// round gave their leases up and left their ring without an error
    /// (else the next round does both again).
    fn forget_left(&mut self, owned_now: &Owned) {
        if self.heartbeat_error.is_some() || self.leases_error.is_some() {
            return;
        }
        let done: Vec<&'static str> = self
            .leaving
            .iter()
            .copied()
            .filter(|name| !owned_now.slots.keys().any(|(saga, _)| saga == name))
            .collect();
        for name in done {
            if let Some(i) = self.specs.iter().position(|s| s.name() == name) {
                self.specs.remove(i);
                self.gates.remove(i);
                self.members_seen.remove(i);
                self.owners.remove(i);
                self.streams_ready.remove(i);
                self.streams_error.remove(i);
            }
            self.leaving.remove(name);
            self.not_served.retain(|(saga, _), _| *saga != name);
            self.shared.health.forget_keyed(name);
            self.served_before.remove(name);
            metrics::gauge!("catga_saga_partitions", "saga" => name).set(0.0);
            metrics::gauge!("catga_members", "saga" => name).set(0.0);
            tracing::info!(saga = name, "left the saga");
        }
    }

    /// Says this replica is alive in each saga's member set, and places
    /// the partitions again where the members changed.
    async fn heartbeat(&mut self) {
        let ttl = self.shared.config.member_timeout;
        for (i, spec) in self.specs.iter().enumerate() {
            if !self.streams_ready[i] {
                self.streams_error[i] = ensure_streams(&self.shared, &[*spec]).await.err();
                self.streams_ready[i] = self.streams_error[i].is_none();
            }
        }
        self.heartbeat_error = None;
        for (((spec, seen), owners), streams_error) in self
            .specs
            .iter()
            .zip(self.members_seen.iter_mut())
            .zip(self.owners.iter_mut())
            .zip(&self.streams_error)
        {
            // A replica whose streams are refused for its configuration
            // (another `CATGA_JS_SAGA_STREAMS` than the streams were made
            // with) stays out of the ring: in it, it would be given
            // partitions it can never serve, and they would stall for every
            // replica. A broker that does not answer is passing: it stays.
            let refused = streams_error
                .as_ref()
                .is_some_and(|e| e.kind() == ErrorKind::Config);
            let alive = !self.leaving.contains(spec.name()) && !refused;
            match self
                .shared
                .store
                .members(saga_name(spec), &self.me, alive, ttl)
                .await
            {
                // Out of the ring: the others take its partitions over.
                Ok(_) if !alive => {}
                Ok(members) => {
                    if members != *seen {
                        tracing::info!(
                            saga = spec.name(),
                            members = members.len(),
                            ?members,
                            "saga ring members changed"
                        );
                        metrics::gauge!("catga_members", "saga" => spec.name()).set(members.len() as f64);
                        *owners = self::owners(
                            &members,
                            spec.name(),
                            spec.partitions().unwrap_or(1),
                            router_shares(spec, &self.shared.config),
                        );
                        *seen = members;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot heartbeat into the store");
                    self.heartbeat_error = Some(e.to_string());
                }
            }
        }
    }

    /// Gives up what the ring gave to others, renews or takes the leases of
    /// what it gives to this replica, and starts or stops partitions by
    /// what the store granted.
    async fn reconcile(&mut self, owned_now: &mut Owned, tick: Instant) {
        let shared = &self.shared;
        let ttl = shared.config.member_timeout;
        // Drains that finished free their partitions.
        owned_now
            .slots
            .retain(|_, slot| !matches!(slot, Slot::Draining { drain, .. } if drain.is_finished()));
        let (leases, wanted) = self.plan(owned_now);
        let synced = shared.store.lease_sync(&leases, &self.me, ttl).await;
        self.leases_error = synced.as_ref().err().map(ToString::to_string);
        match synced {
            Ok(tokens) => {
                self.held_until = tick + ttl;
                for (wanted, token) in wanted.into_iter().zip(tokens) {
                    self.apply(owned_now, wanted, token, tick).await;
                }
            }
            Err(e) if Instant::now() + shared.config.member_heartbeat >= self.held_until => {
                tracing::error!(error = %e, "the saga partition leases could not be renewed before they ran out: stopping every partition");
                for slot in owned_now.slots.values() {
                    let (Slot::Serving { partition, .. } | Slot::Draining { partition, .. }) = slot;
                    partition.lose();
                }
                let keys: Vec<(&'static str, u32)> = owned_now
                    .slots
                    .iter()
                    .filter(|(_, s)| matches!(s, Slot::Serving { .. }))
                    .map(|(k, _)| *k)
                    .collect();
                for (saga, p) in keys {
                    give_up(shared, owned_now, saga, p, "its lease could not be renewed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the saga partition leases could not be renewed; trying again")
            }
        }
    }

    /// Which leases to keep this round (the ring's and those still
    /// draining), giving up at once what the ring moved elsewhere.
    fn plan(&self, owned_now: &mut Owned) -> (Vec<(String, bool)>, Vec<Wanted>) {
        let mut leases = Vec::new();
        let mut wanted = Vec::new();
        for (((spec, gate), owners), ready) in self
            .specs
            .iter()
            .zip(&self.gates)
            .zip(&self.owners)
            .zip(&self.streams_ready)
        {
            let partitions = spec.partitions().unwrap_or(1);
            let routers = (0..router_shares(spec, &self.shared.config)).map(router_slot);
            for p in (0..partitions).chain(routers) {
                let at = router_share(p).map_or(p, |share| partitions + share) as usize;
                let mine = *ready && owners.get(at).is_some_and(|o| *o == self.me);
                let slot = owned_now.slots.get(&(spec.name(), p));
                if !mine && matches!(slot, Some(Slot::Serving { .. })) {
                    give_up(
                        &self.shared,
                        owned_now,
                        spec.name(),
                        p,
                        "it belongs to another replica now",
                    );
                }
                let keep = mine || owned_now.slots.contains_key(&(spec.name(), p));
                leases.push((lease_name(spec, p), keep));
                wanted.push((*spec, Arc::clone(gate), p, mine));
            }
        }
        (leases, wanted)
    }

    /// Acts on one lease's answer: `token` > 0 is held (with that token).
    async fn apply(&mut self, owned_now: &mut Owned, wanted: Wanted, token: u64, tick: Instant) {
        let shared = &self.shared;
        let ttl = shared.config.member_timeout;
        let (spec, gate, p, mine) = wanted;
        let key = (spec.name(), p);
        if mine && token == 0 {
            self.not_served
                .insert(key, "its lease is held by another replica".to_owned());
        } else {
            self.not_served.remove(&key);
        }
        match (owned_now.slots.get(&key), token) {
            (Some(Slot::Serving { partition, run }), t) if t > 0 => {
                partition.token.grant(t, tick + ttl);
                // A router ends by itself when it finds its hold on the
                // lease lapsed (a renewal came late: this loop waited on a
                // partition's start while nodes died); held again, the
                // lease needs a router again. Left ended, no trigger was
                // routed for good (seen in
                // `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`:
                // 256 triggers unacknowledged, no pull waiting).
                if mine
                    && let Running::Router { task, .. } = run
                    && task.is_finished()
                {
                    let partition = Arc::clone(partition);
                    tracing::warn!(
                        saga = spec.name(),
                        token = t,
                        "the router had stopped while its lease lapsed; routing again"
                    );
                    match self.start(spec, &partition, t).await {
                        Ok(run) => {
                            owned_now.slots.insert(key, Slot::Serving { partition, run });
                        }
                        Err(e) => {
                            self.not_served.insert(key, format!("it could not start: {e}"));
                        }
                    }
                }
            }
            (Some(Slot::Draining { partition, .. }), t) if t > 0 => {
                partition.token.grant(t, tick + ttl);
            }
            (Some(Slot::Draining { partition, .. }), _) => partition.lose(),
            (Some(Slot::Serving { partition, .. }), _) => {
                partition.lose();
                give_up(
                    shared,
                    owned_now,
                    spec.name(),
                    p,
                    "its lease passed to another replica",
                );
            }
            (None, t) if t > 0 && mine => {
                let partition = Arc::new(Partition {
                    index: p,
                    stream_key: crate::transport::partition_stream_of(
                        &partition_base(&shared.config.service, spec),
                        p,
                        spec.partitions().unwrap_or(1),
                        shared.config.streams.saga_streams,
                    ),
                    lease: lease_name(spec, p).into(),
                    token: {
                        let held = Arc::new(super::lease::Held::default());
                        held.grant(t, tick + ttl);
                        held
                    },
                    open: std::sync::atomic::AtomicBool::new(true),
                    gate,
                });
                match self.start(spec, &partition, t).await {
                    Ok(run) => {
                        tracing::debug!(
                            saga = spec.name(),
                            partition = p,
                            token = t,
                            "serving a saga partition"
                        );
                        owned_now.slots.insert(key, Slot::Serving { partition, run });
                    }
                    Err(e) => {
                        tracing::error!(saga = spec.name(), partition = p, error = %e, "a saga partition could not start");
                        self.not_served.insert(key, format!("it could not start: {e}"));
                    }
                }
            }
            _ => {}
        }
    }

    /// Starts serving a partition just granted: its router, or its loops.
    async fn start(
        &self,
        spec: &'static HandlerSpec,
        partition: &Arc<Partition>,
        token: u64,
    ) -> Result<Running> {
        if let Some(share) = router_share(partition.index) {
            let (stop, stop_rx) = watch::channel(false);
            let trouble = Trouble::default();
            let task = self.shared.tasks.spawn(route(
                Arc::clone(&self.shared),
                spec,
                (Arc::clone(partition), share),
                stop_rx,
                Arc::clone(&trouble),
            ));
            tracing::info!(saga = spec.name(), token, share, "routing this saga's triggers");
            Ok(Running::Router { stop, task, trouble })
        } else {
            super::handlers::spawn_partition(spec, &self.shared, Arc::clone(partition))
                .await
                .map(Running::Loops)
        }
    }

    /// Logs and counts the partitions served here when they changed, and
    /// tells readiness what the ring gives this replica that it does not
    /// serve.
    fn report(&mut self, owned_now: &Owned) {
        // A hand-over takes up to the member time-out (the old owner died
        // without a word) plus the drain deadline (it is finishing a saga
        // under its lease): a shortfall counts once it outlasts that.
        let grace = self.shared.config.member_timeout + self.shared.config.drain_timeout;
        for (i, spec) in self.specs.iter().enumerate() {
            let trouble = self.trouble(owned_now, i);
            self.shared.health.set_keyed(spec.name(), trouble, grace);
        }
        self.show(owned_now);
        let served = owned_now.served();
        if served != self.served_before {
            for (saga, held) in &served {
                metrics::gauge!("catga_saga_partitions", "saga" => *saga).set(held.len() as f64);
                tracing::info!(saga, partitions = ?held, "saga partitions served here");
            }
            for saga in self.served_before.keys().filter(|s| !served.contains_key(*s)) {
                metrics::gauge!("catga_saga_partitions", "saga" => *saga).set(0.0);
                tracing::info!(saga, "no saga partitions served here");
            }
            self.served_before = served;
        }
    }
}

impl Keeper {
    /// Updates what discovery shows of the keyed sagas.
    fn show(&self, owned_now: &Owned) {
        let view: Vec<super::shared::KeyedView> = self
            .specs
            .iter()
            .filter(|spec| !self.leaving.contains(spec.name()))
            .map(|spec| {
                let mut view = super::shared::KeyedView {
                    spec,
                    partitions: Vec::new(),
                    routing: Vec::new(),
                };
                for ((_, p), slot) in owned_now.slots.range((spec.name(), 0)..=(spec.name(), ROUTER)) {
                    match slot {
                        Slot::Serving {
                            run: Running::Loops(serving),
                            ..
                        } => view.partitions.push((*p, Arc::clone(&serving.served))),
                        Slot::Serving {
                            run: Running::Router { .. },
                            ..
                        } => view.routing.extend(router_share(*p)),
                        Slot::Draining { .. } => {}
                    }
                }
                view
            })
            .collect();
        *self
            .shared
            .keyed_view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
    }

    /// What keeps the `i`th saga from being served here as the ring
    /// says it should be, if anything.
    fn trouble(&self, owned_now: &Owned, i: usize) -> Option<String> {
        let spec = self.specs[i];
        if self.leaving.contains(spec.name()) {
            return None;
        }
        let partitions = spec.partitions().unwrap_or(1);
        let mut why = Vec::new();
        if let Some(e) = &self.streams_error[i] {
            why.push(format!("its streams cannot be set up: {e}"));
        }
        if let Some(e) = &self.heartbeat_error {
            why.push(format!("cannot heartbeat into the store: {e}"));
        }
        if let Some(e) = &self.leases_error {
            why.push(format!("its leases cannot be renewed: {e}"));
        }
        let owners = &self.owners[i];
        let mine = |at: usize| owners.get(at).is_some_and(|o| *o == self.me);
        let slot = |p: u32| owned_now.slots.get(&(spec.name(), p));
        let reason = |p: u32| {
            self.not_served
                .get(&(spec.name(), p))
                .map_or("not started yet", String::as_str)
        };
        let missing: Vec<u32> = (0..partitions)
            .filter(|p| mine(*p as usize) && !matches!(slot(*p), Some(Slot::Serving { .. })))
            .collect();
        if !missing.is_empty() {
            let reasons: std::collections::BTreeSet<&str> = missing.iter().map(|p| reason(*p)).collect();
            why.push(format!(
                "partitions {missing:?} are this replica's but not served ({})",
                reasons.into_iter().collect::<Vec<_>>().join("; ")
            ));
        }
        let shares = router_shares(spec, &self.shared.config);
        // Named only where there are several (one router reads as before).
        let named = |share: u32| {
            if shares > 1 {
                format!(" (share {share})")
            } else {
                String::new()
            }
        };
        for share in (0..shares).filter(|k| mine((partitions + k) as usize)) {
            match slot(router_slot(share)) {
                Some(Slot::Serving {
                    run: Running::Router { trouble, .. },
                    ..
                }) => {
                    if let Some(e) = trouble
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .as_ref()
                    {
                        why.push(format!("cannot route its triggers{}: {e}", named(share)));
                    }
                }
                _ => why.push(format!(
                    "its router{} is this replica's but does not run ({})",
                    named(share),
                    reason(router_slot(share))
                )),
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Stops serving a partition: no new message is taken (it is closed at
/// once), the one in flight finishes under the lease (renewed meanwhile)
/// or is cancelled at the drain deadline, then the lease is released at
/// the next tick.
fn give_up(shared: &Arc<Shared>, owned: &mut Owned, saga: &'static str, p: u32, why: &str) {
    let Some(Slot::Serving { partition, run }) = owned.slots.remove(&(saga, p)) else {
        return;
    };
    partition.close();
    let deadline = Instant::now() + shared.config.drain_timeout;
    let drain = match run {
        Running::Loops(serving) => {
            tracing::info!(saga, partition = p, reason = why, "giving a saga partition up");
            // Its loops leave readiness's count themselves (see
            // `ElectiveSlot`).
            shared.tasks.spawn(async move {
                super::shutdown::stop_serving(vec![serving], deadline).await;
            })
        }
        Running::Router { stop, mut task, .. } => {
            tracing::info!(saga, reason = why, "giving the routing of a saga's triggers up");
            let _ = stop.send(true);
            shared.tasks.spawn(async move {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                }
            })
        }
    };
    owned.slots.insert((saga, p), Slot::Draining { partition, drain });
}

/// Creates the triggers' and the partitions' streams; an error (tried
/// again at the next tick) while the broker does not answer.
async fn ensure_streams(shared: &Shared, specs: &[&'static HandlerSpec]) -> Result<()> {
    let transport = shared.client.transport();
    for spec in specs {
        let base = partition_base(&shared.config.service, spec);
        let partitions = spec.partitions().unwrap_or(1);
        // The triggers' stream too: publishers need it before a router
        // made it.
        let made = match transport
            .ensure_dead_letters(&shared.config.service, &shared.config.streams)
            .await
        {
            Ok(()) => {
                transport
                    .ensure_stream(spec.subject(), &shared.config.streams)
                    .await
            }
            Err(e) => Err(e),
        };
        let made = match made {
            Ok(()) => {
                transport
                    .ensure_partition_streams(&base, partitions, &shared.config.streams)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            tracing::warn!(saga = spec.name(), error = %e, "cannot set up the saga's partition stream yet");
            return Err(e);
        }
    }
    Ok(())
}

/// Leaves the ring and gives every lease up (at shutdown, after the
/// partitions drained), so that the others take over at once.
pub(crate) async fn leave(shared: &Shared, specs: &[&'static HandlerSpec]) {
    let me = member_name(shared);
    let leases: Vec<(String, bool)> = specs
        .iter()
        .flat_map(|spec| {
            (0..spec.partitions().unwrap_or(1))
                .chain((0..router_shares(spec, &shared.config)).map(router_slot))
                .map(move |p| (lease_name(spec, p), false))
        })
        .collect();
    for spec in specs {
        if let Err(e) = shared
            .store
            .members(saga_name(spec), me, false, shared.config.member_timeout)
            .await
        {
            tracing::warn!(error = %e, "could not leave the saga ring; the others notice when the heartbeats stop");
        }
    }
    if let Err(e) = shared
        .store
        .lease_sync(&leases, me, shared.config.member_timeout)
        .await
    {
        tracing::warn!(error = %e, "could not release the saga partitions; their leases run out by themselves");
    }
}

/// Routes a keyed saga's triggers of one router share to their
/// partitions while `stop` is false (see the module documentation); the
/// holder of the share's router lease runs it.
///
/// Each share pulls every trigger with a durable consumer of its own,
/// routes those of its partition stream's partitions and acknowledges
/// the rest. Share 0 keeps the saga's consumer (a saga on one stream has
/// no other share; an earlier release routed every trigger with it) and
/// creates the other shares' consumers, if missing, at its own
/// acknowledgement floor before it routes: every trigger it acknowledged
/// was routed (by it, or by one router of an earlier release), and none
/// after it is skipped by both; share 0's consumer records the layout
/// (how many shares), and the other consumers are made again at its
/// floor when it changed (see [`other_consumers`]). Another share whose
/// consumer is missing creates it at share 0's floor the same way, once
/// share 0's consumer records this layout (see [`own_consumer`]):
/// created at the stream's start, it would route every trigger the
/// stream still keeps again.
async fn route(
    shared: Arc<Shared>,
    spec: &'static HandlerSpec,
    (lease, share): (Arc<Partition>, u32),
    mut stop: watch::Receiver<bool>,
    trouble: Trouble,
) {
    let transport = shared.client.transport();
    let served = Served::new(spec, &shared.config);
    let subject = spec.subject();
    let durable = router_durable(spec, share);
    let durable = durable.as_str();
    let shares = router_shares(spec, &shared.config);
    let ack_wait = ack_wait(&shared.config);
    let options = DurableOptions {
        ack_wait,
        max_ack_pending: ROUTER_WINDOW,
        batch: 64,
        stream: None,
        pull_expires: PULL_EXPIRES,
        in_order: true,
        start: if share == 0 {
            crate::transport::Start::First
        } else {
            crate::transport::Start::Existing
        },
        // Recorded only where there are other shares: one router sends
        // the consumer as before.
        routers: (share == 0 && shares > 1).then_some(shares),
    };
    let base = partition_base(&shared.config.service, spec);
    let partitions = spec.partitions().unwrap_or(1);
    let mut failures: u32 = 0;
    while !*stop.borrow() && lease.fence().is_ok() {
        if failures > 0 {
            let pause = Duration::from_millis(100 << failures.min(5));
            if tokio::time::timeout(pause, stop.wait_for(|s| *s)).await.is_ok() {
                return;
            }
        }
        failures += 1;
        // Each step of setting up is bounded: a router that waits on the
        // broker for good routes nothing (seen once in
        // `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`:
        // no pull request for two minutes after a restart while nodes
        // died, the step it waited on unknown); timed out, it starts again
        // and says which step.
        let set_up = bounded(
            "setting up the trigger stream",
            transport.ensure_stream(subject, &shared.config.streams),
        );
        if let Err(e) = set_up.await {
            held_back(
                &trouble,
                spec,
                share,
                &e,
                "cannot set up the saga's trigger stream yet",
                "its trigger stream cannot be set up",
            );
            continue;
        }
        if share > 0 {
            let made = bounded(
                "setting the trigger consumer up",
                own_consumer(transport, spec, share, shares),
            );
            match made.await {
                Ok(true) => {}
                // Share 0's router (on another replica) sets the layout
                // up: not this replica's trouble, and nothing waits
                // unrouted meanwhile that is not kept in this share's
                // consumer (or routed by an earlier release's router).
                Ok(false) => {
                    set_trouble(&trouble, None);
                    continue;
                }
                Err(e) => {
                    held_back(
                        &trouble,
                        spec,
                        share,
                        &e,
                        "cannot set the router share's trigger consumer up yet",
                        "its trigger consumer cannot be set up",
                    );
                    continue;
                }
            }
        }
        let settled = bounded(
            "waiting for the triggers delivered before",
            settle_triggers(transport, spec, durable, ack_wait, &mut stop),
        );
        let floor = match settled.await {
            Ok(Some(floor)) => floor,
            Ok(None) => return,
            Err(e) => {
                held_back(
                    &trouble,
                    spec,
                    share,
                    &e,
                    "cannot read the trigger consumer yet",
                    "its trigger consumer cannot be read",
                );
                continue;
            }
        };
        if share == 0 && shares > 1 {
            let others = other_consumers(transport, spec, (shares, &lease), &options);
            if let Err(e) = bounded("setting the other router shares' consumers up", others).await {
                held_back(
                    &trouble,
                    spec,
                    share,
                    &e,
                    "cannot set the other router shares' consumers up yet",
                    "the other router shares' consumers cannot be set up",
                );
                continue;
            }
        }
        let bound = bounded(
            "binding the trigger consumer",
            transport.durable_subscribe(subject, durable, &options),
        );
        let mut sub = match bound.await {
            Ok(sub) => sub,
            Err(e) => {
                held_back(
                    &trouble,
                    spec,
                    share,
                    &e,
                    "cannot bind the trigger consumer yet",
                    "its trigger consumer cannot be bound",
                );
                continue;
            }
        };
        set_trouble(&trouble, None);
        let outcome = route_from(
            &shared,
            &served,
            &mut sub,
            &mut stop,
            &lease,
            (durable, share),
            &base,
            partitions,
            floor,
        )
        .await;
        if tokio::time::timeout(SET_UP, sub.drain()).await.is_err() {
            tracing::warn!(
                saga = spec.name(),
                "giving the trigger consumer's pulled messages back took too long"
            );
        }
        match outcome {
            Ok(()) => break,
            Err(e) => {
                held_back(
                    &trouble,
                    spec,
                    share,
                    &e,
                    "routing stopped; starting again",
                    "routing stopped",
                );
            }
        }
        failures = failures.max(1);
    }
    if !*stop.borrow() {
        tracing::info!(
            saga = spec.name(),
            share,
            "routing stopped: this replica's hold on the router lease lapsed (a renewal is late); it routes again once the lease is renewed"
        );
    }
}

/// Sets up router share 0's side of the other shares, before it skips
/// their triggers. One look-up of share 0's consumer decides:
/// - found recording another layout than `shares`, or none (one router,
///   or an earlier release, routed every trigger up to its floor with
///   it): each other share's consumer is made again right after that
///   floor (one left from an earlier layout stood still meanwhile and
///   would route those triggers again);
/// - not found (a new saga): the missing others are made at the stream's
///   start, as share 0's will be; if one of them delivered already, the
///   look-up is taken as wrong and set-up is tried again;
/// - recording this layout: every other consumer must exist (see
///   [`own_consumer`]).
///
/// Share 0's bind then records `shares`. A consumer is deleted only
/// right after the lease is checked and the record is found to differ
/// still: a holder that stalled past its lease while another took over
/// and recorded the layout leaves the consumers alone once it wakes (a
/// stall between that check and the delete is not caught: the broker
/// takes no fence).
async fn other_consumers(
    transport: &crate::transport::Transport,
    spec: &'static HandlerSpec,
    (shares, lease): (u32, &Partition),
    options: &DurableOptions,
) -> Result<()> {
    let subject = spec.subject();
    let zero = router_durable(spec, 0);
    let other = DurableOptions {
        start: crate::transport::Start::Existing,
        routers: None,
        ..options.clone()
    };
    let durables: Vec<String> = (1..shares).map(|k| router_durable(spec, k)).collect();
    // One look-up decides, and gives the floor.
    match transport.durable_found(subject, &zero).await? {
        // This layout: every other consumer was made before it was
        // recorded. One gone since was deleted while this share skipped
        // its triggers; made again here, it would skip those it had not
        // routed.
        Some(found) if found.routers == Some(shares) => {
            for durable in &durables {
                if transport.durable_found(subject, durable).await?.is_none() {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the trigger consumer {durable} of a router share is gone (deleted?); the \
                             triggers it had not routed are not routed; to make it again at this share's \
                             floor, clear the description of consumer {zero} (see the operations guide)"
                        ),
                    ));
                }
            }
            Ok(())
        }
        // Another layout or none: share 0's consumer routed every trigger
        // up to its floor; the others are made (again) right after it.
        Some(found) => {
            for durable in &durables {
                lease.fence()?;
                // Looked at again right before the delete: another holder
                // may have recorded the layout meanwhile (this one stalled
                // past its lease), and a look-up that finds nothing
                // decides nothing.
                match transport.durable_found(subject, &zero).await? {
                    Some(now) if now.routers == Some(shares) => return Ok(()),
                    Some(_) => {}
                    None => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("the trigger consumer {zero} was not found this time; trying again"),
                        ));
                    }
                }
                transport.delete_durable(subject, durable).await?;
                lease.fence()?;
                transport
                    .create_durable_at(subject, durable, &other, found.ack_floor + 1)
                    .await?;
                tracing::info!(
                    saga = spec.name(),
                    consumer = %durable,
                    from = found.ack_floor + 1,
                    layout_before = ?found.routers,
                    "made a router share's trigger consumer again at share 0's floor"
                );
            }
            Ok(())
        }
        // A new saga: share 0's consumer will start at the stream's
        // beginning, and so do the others. One found that delivered
        // already means a look-up that found nothing: decided next time.
        // One that never delivered was made by a set-up cut short (a
        // share binds only once the layout is recorded): kept.
        None => {
            for durable in &durables {
                if transport
                    .durable_found(subject, durable)
                    .await?
                    .is_some_and(|found| found.delivered)
                {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the trigger consumer {zero} was not found while {durable} has delivered; trying \
                             again (if {zero} was deleted, delete the router shares' consumers too)"
                        ),
                    ));
                }
            }
            for durable in &durables {
                lease.fence()?;
                transport.create_durable_at(subject, durable, &other, 1).await?;
            }
            Ok(())
        }
    }
}

/// Whether router share `share` may bind its trigger consumer: once share
/// 0's consumer records this layout (`shares`), which share 0's router
/// writes after it made every other share's consumer at its floor (see
/// [`other_consumers`]). `false` while it is missing or records another
/// layout (one router, or an earlier release, may still route every
/// trigger meanwhile: see the operations guide on upgrading). With the
/// layout recorded, a missing consumer was deleted after share 0 skipped
/// triggers it had not routed: an error, and not made again here (at
/// share 0's floor it would skip them for good; at the stream's start it
/// would route every trigger again, behind newer ones).
async fn own_consumer(
    transport: &crate::transport::Transport,
    spec: &'static HandlerSpec,
    share: u32,
    shares: u32,
) -> Result<bool> {
    let subject = spec.subject();
    let recorded = transport
        .durable_found(subject, &router_durable(spec, 0))
        .await?
        .and_then(|zero| zero.routers);
    if recorded != Some(shares) {
        tracing::debug!(
            saga = spec.name(),
            share,
            ?recorded,
            "waiting for share 0's router to set this layout up"
        );
        return Ok(false);
    }
    let durable = router_durable(spec, share);
    if transport.durable_found(subject, &durable).await?.is_none() {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "its trigger consumer {durable} is gone while share 0 routes beside it (deleted?); the triggers \
                 it had not routed are not routed; to make it again at share 0's floor, clear the description \
                 of consumer {} (see the operations guide)",
                router_durable(spec, 0)
            ),
        ));
    }
    Ok(true)
}

/// Waits until every trigger delivered before can only come back to the
/// next pull, ahead of anything newer (the broker redelivers before it
/// delivers new ones): the consumer's acknowledgement floor then, or
/// `None` when told to stop meanwhile.
///
/// A router that died, or this router's last subscription, may have left
/// deliveries unacknowledged, and pull requests on the broker that keep
/// taking triggers into an inbox nobody reads until they expire
/// ([`PULL_EXPIRES`]). Such triggers come back only after the ack wait:
/// pulled at once, a new subscription got newer triggers first, and the
/// late one was routed after them (seen in
/// `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`:
/// an account's saga ran its 180th deposit after its 200th). So the wait
/// lasts until no pull request is left, then an ack wait more if any
/// delivery is out.
async fn settle_triggers(
    transport: &crate::transport::Transport,
    spec: &'static HandlerSpec,
    durable: &str,
    ack_wait: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<u64>> {
    let subject = spec.subject();
    let requests_gone_by = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
    loop {
        let out = transport.durable_outstanding(subject, durable).await?;
        if out.waiting > 0 && tokio::time::Instant::now() < requests_gone_by {
            if tokio::time::timeout(Duration::from_millis(200), stop.wait_for(|s| *s))
                .await
                .is_ok()
            {
                return Ok(None);
            }
            continue;
        }
        if out.ack_pending > 0 {
            tracing::info!(
                saga = spec.name(),
                pending = out.ack_pending,
                "waiting for the triggers delivered before to come back"
            );
            let wait = ack_wait + Duration::from_millis(500);
            if tokio::time::timeout(wait, stop.wait_for(|s| *s)).await.is_ok() {
                return Ok(None);
            }
            return Ok(Some(
                transport.durable_outstanding(subject, durable).await?.ack_floor,
            ));
        }
        return Ok(Some(out.ack_floor));
    }
}

/// One router run's state: the routings in flight, the copies that wait
/// for their key's, and the first failure.
struct Router<'a> {
    shared: &'a Shared,
    served: &'a Served,
    /// The trigger consumer this router pulls with.
    durable: &'a str,
    /// Its share: it routes the triggers of partition stream `share`.
    share: u32,
    base: &'a str,
    partitions: u32,
    streams: u32,
    timeout: Duration,
    /// Each routing in flight: its acknowledgement, the trigger's settler,
    /// and the trigger (for a dead letter if its copy is refused).
    inflight: VecDeque<Routing>,
    /// Per key (a hash of it), the copies that wait for the one of their
    /// key in flight, in the order of their triggers.
    parked: HashMap<u64, VecDeque<Pending>>,
    /// The run ends (told to stop, its lease lost, or a failure): no
    /// waiting copy is sent any more.
    stopping: bool,
    failed: Option<Error>,
}

/// A trigger's copy, ready to send to its partition's stream.
struct Pending {
    subject: String,
    headers: async_nats::HeaderMap,
    settler: Settler,
    trigger: Box<(crate::wire::MessageMeta, Bytes)>,
}

impl Router<'_> {
    /// Settles a routing whose copy's fate is known, and sends the next
    /// copy of its key, if one waits and nothing failed.
    async fn settled(
        &mut self,
        settler: Settler,
        trigger: &(crate::wire::MessageMeta, Bytes),
        stored: Result<()>,
        key_of: u64,
    ) {
        routed(
            self.shared,
            self.served,
            settler,
            trigger,
            stored,
            &mut self.failed,
        )
        .await;
        if self.failed.is_some() || self.stopping {
            return;
        }
        // The next copy of its key goes in flight; one dead-lettered
        // (refused for good) lets the one after it go.
        while let Some(copy) = self.parked.get_mut(&key_of).and_then(VecDeque::pop_front) {
            if self.send(copy, key_of).await || self.failed.is_some() {
                break;
            }
        }
        if self.parked.get(&key_of).is_some_and(VecDeque::is_empty) {
            self.parked.remove(&key_of);
        }
    }

    /// How many copies wait for their key's.
    fn parked_count(&self) -> usize {
        self.parked.values().map(VecDeque::len).sum()
    }

    /// The settlers of every trigger this run holds: in flight and
    /// waiting for their key's (for progress acks).
    fn settlers(&self) -> Vec<&Settler> {
        self.inflight
            .iter()
            .map(|(_, settler, ..)| settler)
            .chain(self.parked.values().flatten().map(|c| &c.settler))
            .collect()
    }

    /// Gives back every copy that waits for its key's (the run ends).
    async fn give_back_parked(&mut self) {
        for (_, copies) in std::mem::take(&mut self.parked) {
            for copy in copies {
                let _ = copy
                    .settler
                    .settle(Settle::Retry {
                        delay: Duration::ZERO,
                    })
                    .await;
            }
        }
    }

    /// Sends a copy (its key has none in flight), or dead-letters its
    /// trigger if it can never be stored; after another failure it waits
    /// with the copies parked, to be given back once what is in flight
    /// was settled. Whether it went in flight.
    async fn send(&mut self, mut copy: Pending, key_of: u64) -> bool {
        let (shared, served) = (self.shared, self.served);
        let transport = shared.client.transport();
        // Moved out: a copy that is not sent now is only given back.
        let headers = std::mem::take(&mut copy.headers);
        let sent = transport
            .publish_durable_start(&copy.subject, headers, copy.trigger.1.clone(), self.timeout)
            .await;
        match sent {
            Ok(stored) => {
                self.inflight
                    .push_back((stored, copy.settler, copy.trigger, key_of));
                return true;
            }
            // It can never be routed (its copy is over the broker's
            // limit): a dead letter, not a retry forever.
            Err(e) if !e.is_retryable() => {
                tracing::error!(saga = served.spec.name(), error = %e, "a trigger cannot be routed: dead-lettered");
                let (meta, payload) = &*copy.trigger;
                let letter = super::pipeline::dead_letter(served, shared, meta, payload, &e);
                let _ = copy.settler.settle(recorded(shared, letter).await).await;
            }
            Err(e) => {
                // What was sent before it is settled first: given back
                // ahead of them, it would come back first and be routed
                // ahead of them (seen in
                // `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`:
                // a trigger ran before the 43 sent ahead of it when a
                // node died). It waits with the parked copies, given
                // back when the run ends.
                self.parked.entry(key_of).or_default().push_front(copy);
                self.failed.get_or_insert(e);
            }
        }
        false
    }

    /// Routes one trigger: sends its copy to its partition's stream (or
    /// dead-letters it, or gives it back after a failure).
    async fn take(&mut self, d: crate::transport::Delivery) {
        let (shared, served) = (self.shared, self.served);
        let spec = served.spec;
        let (incoming, settler) = d.split();
        // A trigger published without an id (by a plain client) is named
        // after its place in the stream, when it was stored and its
        // payload: the same in every share and each time it is routed
        // again, and another after the stream is made anew. So its
        // copy's repeats are dropped, its saga runs once, and its dead
        // letters are kept once. (A made-up id differed at each routing.)
        let mut trigger_headers = incoming.headers;
        let named = trigger_headers
            .as_ref()
            .is_some_and(|h| h.get(crate::wire::headers::MESSAGE_ID).is_some());
        if !named && let Some((seq, at)) = settler.stored_at() {
            let id = format!(
                "t{seq}-{at:x}-{:016x}",
                xxhash_rust::xxh3::xxh3_64(&incoming.payload)
            );
            trigger_headers
                .get_or_insert_with(async_nats::HeaderMap::new)
                .insert(crate::wire::headers::MESSAGE_ID, id.as_str());
        }
        let meta = super::pipeline::read(incoming.subject, trigger_headers, None, incoming.delivered);
        let id = meta.message_id().to_owned();
        // A version newer than the saga knows is refused here, as the
        // pipeline would refuse it, before its key is read.
        let key = crate::wire::check_version(meta.headers(), spec.message_type(), spec.version())
            .and_then(|()| spec.key_of(meta.version(), &incoming.payload))
            .and_then(|key| {
                key.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Internal,
                        format!("keyed saga {} has no key", spec.name()),
                    )
                })
            });
        let key = match key {
            Ok(key) => key,
            // Dead-lettered by each share that cannot read it (its
            // partition, so its share, is not known): the dead-letter
            // stream keeps one (its message id is the trigger's id and
            // the handler's, within the stream's duplicate window). A share
            // of a newer release that can read it (a version the others
            // do not know yet, mid-roll-out) routes it as well, where
            // one router of the older release would only have
            // dead-lettered it.
            Err(error) => {
                tracing::error!(saga = spec.name(), error = %error, "a trigger without a readable key: dead-lettered");
                let letter = super::pipeline::dead_letter(served, shared, &meta, &incoming.payload, &error);
                let _ = settler.settle(recorded(shared, letter).await).await;
                return;
            }
        };
        let p = crate::ring::partition_of(&key, self.partitions);
        let at = (p % self.streams) as usize;
        // Another share's: acknowledged here, routed there (its consumer
        // has it too).
        if at != self.share as usize {
            let _ = settler.settle(Settle::Reply(Bytes::new())).await;
            return;
        }
        // The trigger's own headers, without the broker's (a
        // forged `Nats-Expected-Stream` would make every copy be
        // refused); the copy keeps the trigger's id: the saga's
        // id, and what the partition's stream drops a repeated
        // routing by.
        let mut headers = async_nats::HeaderMap::new();
        if let Some(h) = meta.headers() {
            for (k, vs) in h.iter() {
                if !crate::wire::is_broker_header(k.as_ref()) {
                    for v in vs {
                        headers.append(k.clone(), v.clone());
                    }
                }
            }
        }
        headers.insert(crate::wire::headers::MESSAGE_ID, id.as_str());
        // A key's copies are stored in the order of its triggers: a
        // copy is sent only once the copy of its key in flight was
        // stored, and waits (parked) meanwhile while the router goes
        // on with other keys. A copy lost while a node dies fails
        // before the next one of its key is sent; it and what follows
        // are given back and routed again in order. Copies of other
        // keys go on side by side (the order between keys does not
        // matter to a saga). Without it, a router's pipelined copies stored 42 of
        // 1,800 triggers of a key after later ones, on a 3-node
        // cluster with nodes killed under load.
        //
        // No copy expects a place in its stream. One that expected
        // the last message id (`Nats-Expected-Last-Msg-Id`) stopped a
        // replicated stream on every replica when the expectation
        // failed (nats-server checks it only as each replica applies
        // the message, and takes a mismatch there for a critical
        // write error); one that expected a sequence was let through
        // after a copy before it was refused when another writer's
        // message (a dead letter replayed into the partition) took
        // the refused one's place. Waiting per key holds whoever else
        // writes the stream, and a copy sent late by a router that
        // lost its share (stalled past its lease) is one of a trigger
        // this router routes again: the stream drops the repeat.
        let key_of = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        let copy = Pending {
            subject: format!("{}.{p}", self.base),
            headers,
            settler,
            trigger: Box::new((meta, incoming.payload)),
        };
        if self.failed.is_some() {
            let _ = copy
                .settler
                .settle(Settle::Retry {
                    delay: Duration::ZERO,
                })
                .await;
            return;
        }
        // The copy waits while one of its key is in flight (or waits).
        if self.parked.contains_key(&key_of) || self.inflight.iter().any(|(.., k)| *k == key_of) {
            self.parked.entry(key_of).or_default().push_back(copy);
            return;
        }
        self.send(copy, key_of).await;
    }
}

/// Routes from one subscription until told to stop (`Ok`) or a routing
/// fails (`Err`: every trigger not yet stored is given back).
///
/// Triggers are routed in the order of their stream: a trigger whose
/// stream sequence is past the next one expected (`floor`, the consumer's
/// acknowledgement floor, plus one) is held, progress-acknowledged, until
/// the ones before it came: a pull request lost on the broker (a node
/// died) may have taken them into an inbox nobody reads, and they come
/// back only after the ack wait, behind newer ones (seen in
/// `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`:
/// an account's saga ran its 310th deposit before its 294th). A sequence
/// that does not come (deleted, or another subject's in a shared stream)
/// is looked up once the wait has lasted past the ack wait and a pull's
/// expiry, and skipped.
#[allow(clippy::too_many_arguments)]
async fn route_from(
    shared: &Shared,
    served: &Served,
    sub: &mut crate::transport::Subscription,
    stop: &mut watch::Receiver<bool>,
    lease: &Partition,
    (durable, share): (&str, u32),
    base: &str,
    partitions: u32,
    floor: u64,
) -> Result<()> {
    let spec = served.spec;
    let transport = shared.client.transport();
    let mut r = Router {
        shared,
        served,
        durable,
        share,
        base,
        partitions,
        streams: crate::transport::partition_stream_count(partitions, shared.config.streams.saga_streams),
        timeout: shared.config.request_timeout,
        inflight: VecDeque::new(),
        parked: HashMap::new(),
        stopping: false,
        failed: None,
    };
    let mut next = floor + 1;
    let mut held: BTreeMap<u64, crate::transport::Delivery> = BTreeMap::new();
    let mut gap_since: Option<Instant> = None;
    let mut floor_asked = Instant::now();
    let gap_wait = ack_wait(&shared.config) + PULL_EXPIRES + Duration::from_secs(1);
    // Triggers in flight wait for their copies' stores, which take up to
    // the request time-out while a node dies: longer than the triggers'
    // short ack wait. Unacknowledged that long, the broker delivered them
    // again while the first delivery was still in flight, and a later
    // trigger could be routed ahead of earlier ones given back (seen in
    // `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`).
    // Progress acks keep them (and the held ones) this router's while it
    // works on them.
    let mut keep = tokio::time::interval(ack_wait(&shared.config) / 3);
    keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Once stopping, for good: a lease that comes back (a slow
        // renewal that then succeeded) does not start sending the parked
        // copies of keys that settled meanwhile; the run ends, and the
        // next one takes what it gave back.
        r.stopping |= *stop.borrow() || lease.fence().is_err() || r.failed.is_some();
        let stopping = r.stopping;
        if stopping && r.inflight.is_empty() {
            // What waits for an earlier trigger, or for its key's copy,
            // goes back, to come again after it.
            r.give_back_parked().await;
            for (_, d) in std::mem::take(&mut held) {
                let _ = d
                    .settler
                    .settle(Settle::Retry {
                        delay: Duration::ZERO,
                    })
                    .await;
            }
            return r.failed.map_or(Ok(()), Err);
        }
        tokio::select! {
            biased;
            stored = front(&mut r.inflight), if !r.inflight.is_empty() => {
                let Some((_, settler, trigger, key_of)) = r.inflight.pop_front() else { continue };
                r.settled(settler, &trigger, stored.map(|_| ()), key_of).await;
                // Triggers acknowledged before this run, above a gap, are
                // never delivered again: once the gap is acknowledged the
                // floor jumps past them, and the held ones go on. Asked at
                // most every 200 ms, when the routings in flight are done.
                if !stopping && r.inflight.is_empty() && floor_asked.elapsed() >= Duration::from_millis(200) {
                    floor_asked = Instant::now();
                    catch_up(&mut r, &mut held, &mut next, &mut gap_since).await;
                }
            }
            _ = keep.tick(), if !r.inflight.is_empty() || r.parked_count() > 0 || !held.is_empty() => {
                // Collected first (the original code's shape): the
                // iterator over the in-flight futures is not `Send`.
                let mut settlers = r.settlers();
                settlers.extend(held.values().map(|d| &d.settler));
                for settler in settlers {
                    if let Err(e) = settler.progress().await {
                        tracing::debug!(error = %e, "progress ack of a trigger not sent");
                    }
                }
                if stopping {
                    continue;
                }
                if r.inflight.is_empty() && floor_asked.elapsed() >= Duration::from_millis(200) {
                    floor_asked = Instant::now();
                    catch_up(&mut r, &mut held, &mut next, &mut gap_since).await;
                }
                if gap_since.is_none_or(|t| t.elapsed() < gap_wait) {
                    continue;
                }
                // The next trigger has not come for long, and is not
                // acknowledged: if the stream holds it no more (deleted,
                // aged out), the first one it holds after it is next.
                let first_held = held.keys().next().copied().unwrap_or(next);
                let found = tokio::time::timeout(ASK, transport.next_on(spec.subject(), next)).await;
                match found {
                    Ok(Ok(found)) => next = found.unwrap_or(first_held).min(first_held).max(next),
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot look the next trigger up yet"),
                    Err(_) => tracing::debug!("the next trigger's look-up timed out"),
                }
                release(&mut r, &mut held, &mut next).await;
                gap_since = (!held.is_empty()).then(Instant::now);
            }
            _ = stop.changed(), if !stopping => {}
            // Held triggers do not stop the pulls: the one they wait for
            // comes back only to a pull request (the broker's ack pending
            // limit bounds how many are held).
            d = sub.next(), if !stopping && r.inflight.len() + r.parked_count() < ROUTER_WINDOW => {
                let Some(d) = d else {
                    r.failed = Some(Error::new(ErrorKind::Transport, "the trigger consumer's subscription ended"));
                    continue;
                };
                match d.settler.stream_seq() {
                    Some(seq) if seq > next => {
                        // Delivered again while held (a progress ack came
                        // late): one delivery stands for it; a nak of the
                        // other would give it back again, and again.
                        if let Some(earlier) = held.insert(seq, d) {
                            earlier.settler.forget();
                        }
                        gap_since.get_or_insert_with(Instant::now);
                    }
                    Some(seq) if seq == next => {
                        r.take(d).await;
                        next += 1;
                        release(&mut r, &mut held, &mut next).await;
                        gap_since = (!held.is_empty()).then(Instant::now);
                    }
                    // Routed before (a repeat), or no sequence (the
                    // embedded streams deliver in order).
                    _ => r.take(d).await,
                }
            }
        }
    }
}

/// How long one step of setting a router up may take.
const SET_UP: Duration = Duration::from_secs(20);

/// `step`, failing with a time-out after [`SET_UP`].
async fn bounded<T>(what: &str, step: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    crate::resilience::within(SET_UP, what, step).await
}

/// How long the router waits for the broker's answer about its consumer
/// or stream while it holds triggers (a node may be down): its progress
/// acks wait meanwhile.
const ASK: Duration = Duration::from_millis(500);

/// Routes the held triggers that come next, in order (until a routing
/// fails).
async fn release(r: &mut Router<'_>, held: &mut BTreeMap<u64, crate::transport::Delivery>, next: &mut u64) {
    while r.failed.is_none()
        && let Some(d) = held.remove(next)
    {
        r.take(d).await;
        *next += 1;
    }
}

/// Held triggers that wait for one acknowledged before this run (by a
/// router before it): such a trigger is never delivered again, and the
/// consumer's floor jumps past it once the ones below it are
/// acknowledged.
async fn catch_up(
    r: &mut Router<'_>,
    held: &mut BTreeMap<u64, crate::transport::Delivery>,
    next: &mut u64,
    gap_since: &mut Option<Instant>,
) {
    if held.is_empty() || held.contains_key(next) {
        return;
    }
    let spec = r.served.spec;
    let transport = r.shared.client.transport();
    let asked = tokio::time::timeout(ASK, transport.durable_outstanding(spec.subject(), r.durable)).await;
    if let Ok(Ok(out)) = asked
        && out.ack_floor + 1 > *next
    {
        *next = out.ack_floor + 1;
        release(r, held, next).await;
        *gap_since = (!held.is_empty()).then(Instant::now);
    }
}

/// Settles a routed trigger once its copy's fate is known: acked when the
/// copy is stored, dead-lettered when the partition's stream refused it
/// for good, given back otherwise (and the routing ends: what follows is
/// given back too, and routed again in order).
async fn routed(
    shared: &Shared,
    served: &Served,
    settler: Settler,
    trigger: &(crate::wire::MessageMeta, Bytes),
    stored: Result<()>,
    failed: &mut Option<Error>,
) {
    match stored {
        Ok(()) => {
            let _ = settler.settle(Settle::Reply(Bytes::new())).await;
        }
        // The partition's stream refused the copy for what it is: a dead
        // letter, not a routing retried forever.
        Err(e) if !e.is_retryable() => {
            tracing::error!(saga = served.spec.name(), error = %e, "a trigger's copy was refused: dead-lettered");
            let letter = super::pipeline::dead_letter(served, shared, &trigger.0, &trigger.1, &e);
            let _ = settler.settle(recorded(shared, letter).await).await;
        }
        Err(e) => {
            // Given back; what follows too (its copies, if stored, are
            // dropped as repeats when routed again).
            let _ = settler
                .settle(Settle::Retry {
                    delay: Duration::ZERO,
                })
                .await;
            if failed.is_none() {
                *failed = Some(e);
            }
        }
    }
}

/// A trigger's dead letter once recorded in the store; given back for
/// later when it cannot be.
async fn recorded(shared: &Shared, mut letter: crate::transport::DeadLetter) -> Settle {
    match super::letters::keep_letter(shared, &mut letter).await {
        Ok(()) => Settle::Dead(Box::new(letter)),
        Err(e) => {
            tracing::warn!(error = %e, "the dead letter could not be recorded; the trigger comes back later");
            Settle::Retry {
                delay: Duration::from_secs(5),
            }
        }
    }
}

/// A trigger routed and not yet acknowledged by its partition's stream,
/// and a hash of its key.
type Routing = (Stored, Settler, Box<(crate::wire::MessageMeta, Bytes)>, u64);

/// Waits for the oldest routing in flight to be stored (or not); whether
/// the stream had it already.
async fn front(inflight: &mut VecDeque<Routing>) -> Result<bool> {
    match inflight.front_mut() {
        Some((stored, ..)) => stored.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}/nonce")).collect()
    }

    #[test]
    fn every_partition_and_the_router_have_one_owner_among_the_members() {
        for n in 1..=5 {
            let members = names(n);
            let owned = owners(&members, "saga", 16, 1);
            assert_eq!(owned.len(), 17, "16 partitions and the router");
            assert!(owned.iter().all(|o| members.contains(o)));
            // Loads bounded at the mean: nobody owns more than its share.
            for m in &members {
                let held = owned[..16].iter().filter(|o| *o == m).count();
                assert!(
                    held <= 16_usize.div_ceil(n),
                    "{m} holds {held} of 16 with {n} members"
                );
            }
        }
    }

    #[test]
    fn owners_are_the_same_on_every_replica() {
        let a = owners(&names(3), "saga", 8, 3);
        let mut shuffled = names(3);
        shuffled.reverse();
        shuffled.sort();
        assert_eq!(
            a,
            owners(&shuffled, "saga", 8, 3),
            "a function of the sorted members"
        );
        assert!(owners(&[], "saga", 8, 3).is_empty(), "nobody alive: nobody owns");
    }

    #[test]
    fn router_shares_spread_like_partitions() {
        for n in 1..=5_usize {
            let members = names(n);
            let owned = owners(&members, "saga", 8, 3);
            assert_eq!(owned.len(), 11, "8 partitions and 3 router shares");
            assert_eq!(
                owned[..8],
                owners(&members, "saga", 8, 1)[..8],
                "shares do not move partitions"
            );
            for m in &members {
                let routes = owned[8..].iter().filter(|o| *o == m).count();
                assert!(
                    routes <= 3_usize.div_ceil(n),
                    "{m} routes {routes} of 3 shares with {n} members"
                );
            }
        }
    }

    #[test]
    fn router_slots_are_not_partitions() {
        assert_eq!(router_share(router_slot(0)), Some(0));
        assert_eq!(router_share(router_slot(7)), Some(7));
        assert_eq!(router_share(4095), None);
        assert_eq!(router_share(0), None);
    }
}
