//! Seeded fault simulation: several replicas of a service in one process,
//! on one embedded bus and its store, under faults drawn from a seed.
//!
//! ```rust,standalone_crate
//! use catga::testing::{explore, Faults, Simulation};
//! use catga::{command, Context, Result, State, Versioned};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Default)]
//! struct Account { balance: u64 }
//! impl State for Account { const KIND: &'static str = "account"; }
//!
//! #[command(reply = u64, idempotent)]
//! #[derive(Serialize, Deserialize, Clone)]
//! pub struct Deposit { pub account: String, pub amount: u64 }
//!
//! #[command(queue_group = "accounts")]
//! async fn deposit(ctx: &Context, d: Deposit) -> Result<u64> {
//!     let mut account = ctx
//!         .try_load::<Account>(&d.account)
//!         .await?
//!         .unwrap_or_else(|| Versioned::new(d.account.clone(), Account::default()));
//!     account.balance += d.amount;
//!     let balance = account.balance;
//!     ctx.save(account).await?;
//!     Ok(balance)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! // Seeds 0 and 1 here; `CATGA_SIM_SEEDS=1000` runs a thousand, and a
//! // failing seed is named with the way to run it alone.
//! explore(0..2, |seed| async move {
//!     let mut sim = Simulation::start(seed, 3, Faults::default(), |b| b).await?;
//!     for n in 0..20 {
//!         let d = Deposit { account: "a".into(), amount: 1 };
//!         sim.send(d, &format!("deposit-{n}")).await?;
//!     }
//!     sim.settled().await?;
//!     // Every deposit counted once, whatever was lost or killed.
//!     let d = Deposit { account: "a".into(), amount: 0 };
//!     assert_eq!(sim.send(d, "check").await?, 20);
//!     sim.shutdown().await
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! The faults are those a real deployment has, and only those:
//! - a request lost on its way (no handler sees it) or its reply lost
//!   (the handler ran): either way the sender times out;
//! - a subscriber's copy of a core event lost (core NATS is at most once);
//! - a durable delivery lost on its way (it comes again after its ack
//!   wait, behind later messages) or its ack lost (it comes again although
//!   it was handled);
//! - a replica killed (its tasks stop where they are, its leases and
//!   claims left to run out) or stopped gracefully (SIGTERM: it drains),
//!   then started again;
//! - a replica stalled past its leases (SIGSTOP, a long pause): what it
//!   sends and receives on the bus and asks of the store waits, its
//!   leases, claims and ack waits run out and other replicas take its
//!   work over; then it goes on where it was, with what it held before;
//! - with [`Faults::failovers`] (off by default), the store failing over
//!   to a replica that lags behind, losing its last writes.
//!
//! What a seed replays. Each loss is decided from the seed and the message
//! it falls on (its id, and the consumer or subscriber it goes to), not
//! from the order in which tasks ran: a seed run again loses the same
//! requests, replies, copies, deliveries and acks of the messages whose
//! ids are the same in every run. Those are the ids a test chose
//! (`send_with_id`, [`Simulation::send`]) and the ids catga derives from
//! them: an idempotent handler's events, a saga's steps. A message with a
//! fresh id (published by a handler that is not idempotent) meets its
//! own chances in each run. [`FaultReport::fingerprint`] tells whether
//! two runs lost the same messages. The restarts, stalls and failovers
//! come after a number of messages drawn from the seed, at about the
//! same point of a run. The interleaving of the tasks (tokio's and the
//! OS's scheduling) is not replayed: a failure that needs one exact
//! interleaving may take a few runs of its seed to show again.
//!
//! Where one process differs from many. A killed replica's requests in
//! hand are answered "unavailable" and its durable deliveries given back
//! at once, as when a crash closes the connection, not left to time out.
//! A stalled replica's timers go on: a handler's deadline can end during
//! the stall, and what it then sends back (a negative ack, a dead letter,
//! a reply) goes out at once; its acks wait until it wakes.
//!
//! The replicas run with short leases and ack waits (see
//! [`Simulation::start`]) so that a run recovers from its faults in
//! seconds. Not simulated: delays and reordering other than a lost
//! delivery coming again, a lost acknowledgement of a durable publish (a
//! publish sent twice), messages duplicated on core subjects (NATS does
//! not), a partition between replicas that still reach the store.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Command, Event};
use crate::runtime::{Runtime, RuntimeBuilder};
use crate::stall::Gate;
use crate::transport::chaos::{Chaos, Fault, mix};
use crate::transport::memory::MemoryBus;
use crate::{Client, DeadLetter, SagaInfo};

use super::DEFAULT_SETTLE_WITHIN;

/// How often each fault strikes in a [`Simulation`]: the chance, from 0
/// to 1, that one message meets it at each place it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// A request lost before any handler saw it.
    pub lose_requests: f64,
    /// A reply lost after its handler ran.
    pub lose_replies: f64,
    /// A subscriber's copy of a core (not durable) event lost.
    pub lose_copies: f64,
    /// A durable delivery lost on its way (redelivered after the ack
    /// wait).
    pub lose_deliveries: f64,
    /// A durable consumer's ack lost (the handled message redelivered).
    pub lose_acks: f64,
    /// How many times a replica is killed or stopped, then started again,
    /// during the run.
    pub restarts: u32,
    /// How many times a replica stalls past its leases (1 to 2.5 s: its
    /// I/O on the bus and the store waits, its leases, claims and ack
    /// waits run out, others take its work over), then goes on where it
    /// was.
    pub stalls: u32,
    /// How many times the store fails over to a replica that lags behind:
    /// every write of the last 5 to 100 ms (states, inbox answers,
    /// outbox entries, leases, journals) is lost, as Redis' asynchronous
    /// replication can lose acknowledged writes. catga does not guard
    /// against that (it adds no `WAIT`): with it on, test that nothing is
    /// done twice, not that nothing is lost. 0 by default.
    pub failovers: u32,
}

impl Default for Faults {
    /// 2 % of each loss, 3 restarts and a stall: enough for a few hundred messages
    /// to meet every fault, few enough for the run to finish in seconds.
    fn default() -> Faults {
        Faults {
            lose_requests: 0.02,
            lose_replies: 0.02,
            lose_copies: 0.02,
            lose_deliveries: 0.02,
            lose_acks: 0.02,
            restarts: 3,
            stalls: 1,
            failovers: 0,
        }
    }
}

impl Faults {
    /// No faults: the same replicas, timings and assertions, with nothing
    /// lost or killed.
    pub fn none() -> Faults {
        Faults {
            lose_requests: 0.0,
            lose_replies: 0.0,
            lose_copies: 0.0,
            lose_deliveries: 0.0,
            lose_acks: 0.0,
            restarts: 0,
            stalls: 0,
            failovers: 0,
        }
    }

    fn rates(&self) -> [u32; 5] {
        let ppm = |p: f64| (p.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
        Fault::ALL.map(|f| {
            ppm(match f {
                Fault::Request => self.lose_requests,
                Fault::Reply => self.lose_replies,
                Fault::Copy => self.lose_copies,
                Fault::Delivery => self.lose_deliveries,
                Fault::Ack => self.lose_acks,
            })
        })
    }
}

/// What a [`Simulation`] did to its replicas so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// The seed.
    pub seed: u64,
    /// Requests lost before a handler saw them.
    pub lost_requests: u64,
    /// Replies lost after their handler ran.
    pub lost_replies: u64,
    /// Copies of core events lost.
    pub lost_copies: u64,
    /// Durable deliveries lost on their way.
    pub lost_deliveries: u64,
    /// Acks of durable deliveries lost.
    pub lost_acks: u64,
    /// Replicas killed (tasks stopped where they were).
    pub kills: u64,
    /// Replicas stopped gracefully (drained).
    pub stops: u64,
    /// Replicas started again.
    pub restarts: u64,
    /// Replicas stalled past their leases.
    pub stalls: u64,
    /// Store failovers that lost the last writes.
    pub failovers: u64,
    /// Which messages the losses fell on (a sum of a hash per loss, in
    /// any order): equal in two runs that lost the same messages.
    pub fingerprint: u64,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: lost {} requests, {} replies, {} core copies, {} durable deliveries, {} acks; \
             {} replicas killed, {} stopped, {} started again, {} stalled; {} store failovers",
            self.seed,
            self.lost_requests,
            self.lost_replies,
            self.lost_copies,
            self.lost_deliveries,
            self.lost_acks,
            self.kills,
            self.stops,
            self.restarts,
            self.stalls,
            self.failovers
        )
    }
}

type Configure = dyn Fn(RuntimeBuilder) -> RuntimeBuilder + Send + Sync;

/// The replicas of a simulation and how to start one.
struct Cluster {
    bus: MemoryBus,
    configure: Box<Configure>,
    replicas: Mutex<Vec<Option<Runtime>>>,
    /// Each slot's stall switch (its replica's, a new one per start).
    gates: std::sync::Mutex<Vec<Arc<Gate>>>,
    /// Replicas started so far, for their instance ids.
    started: AtomicU64,
    kills: AtomicU64,
    stops: AtomicU64,
    restarts: AtomicU64,
    stalls: AtomicU64,
    failovers: AtomicU64,
}

impl Cluster {
    async fn start_replica(&self, slot: usize) -> Result<Runtime> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let builder = (self.configure)(timings(Runtime::builder()).instance_id(format!("sim-{slot}-{n}")));
        let gate = Arc::new(Gate::new());
        {
            let mut gates = self
                .gates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if gates.len() <= slot {
                gates.resize_with(slot + 1, || Arc::new(Gate::new()));
            }
            gates[slot] = Arc::clone(&gate);
        }
        let runtime = builder.embedded(self.bus.gated(gate)).start().await?;
        runtime.ready().await?;
        Ok(runtime)
    }

    /// Stalls or wakes the replica of `slot`.
    fn stall(&self, slot: usize, stalled: bool) {
        let gates = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(gate) = gates.get(slot) {
            gate.set(stalled);
        }
    }

    /// Shuts the gate of the replica of `slot` for good (it was killed)
    /// and leaves the slot a new one.
    fn kill_gate(&self, slot: usize) {
        let mut gates = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(gate) = gates.get_mut(slot) {
            gate.set(true);
            *gate = Arc::new(Gate::new());
        }
    }

    /// Wakes every replica.
    fn wake_all(&self) {
        let gates = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gate in gates.iter() {
            gate.set(false);
        }
    }
}

/// The timings of a simulation's replicas, before the caller's own: a
/// killed replica's leases, claims and unacknowledged deliveries run out
/// in about a second, so that a run recovers from its faults quickly.
fn timings(builder: RuntimeBuilder) -> RuntimeBuilder {
    let defaults = Config::default();
    builder
        .request_timeout(Duration::from_millis(500))
        .drain_timeout(Duration::from_secs(2))
        .leader_lease(Duration::from_millis(600))
        .membership(Duration::from_millis(100), Duration::from_millis(600))
        .inbox(defaults.inbox_window, Duration::from_millis(400))
        .durable_defaults(Duration::from_secs(1), defaults.max_deliver)
        .outbox_lease(Duration::from_millis(600))
        .retry_base(Duration::from_millis(20))
}

/// Several replicas of a service on one embedded bus, under faults drawn
/// from a seed (see the [module](self)).
pub struct Simulation {
    seed: u64,
    cluster: Arc<Cluster>,
    chaos: Arc<Chaos>,
    client: Client,
    monkey: Option<JoinHandle<()>>,
    /// Tells the restarts to stop (see `heal`).
    healed: watch::Sender<bool>,
    settle_within: Duration,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Simulation {
    /// Starts `replicas` replicas of the service `configure` describes
    /// (given a builder with the simulation's short timings: 500 ms
    /// request time-out, 1 s ack wait, leases of 400-600 ms; it may change
    /// them and choose the handlers) on a new embedded bus, and lets the
    /// faults loose. Messages start being lost at once; the first restart
    /// comes after some dozens of messages.
    pub async fn start(
        seed: u64,
        replicas: usize,
        faults: Faults,
        configure: impl Fn(RuntimeBuilder) -> RuntimeBuilder + Send + Sync + 'static,
    ) -> Result<Simulation> {
        if replicas == 0 {
            return Err(Error::new(ErrorKind::Invalid, "a simulation needs a replica"));
        }
        let bus = MemoryBus::new();
        bus.tap().turn_on();
        let chaos = Arc::new(Chaos::new(seed, faults.rates()));
        bus.streams().install_chaos(Arc::clone(&chaos));
        let cluster = Arc::new(Cluster {
            bus: bus.clone(),
            configure: Box::new(configure),
            replicas: Mutex::new(Vec::new()),
            gates: std::sync::Mutex::new(Vec::new()),
            started: AtomicU64::new(0),
            kills: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        });
        for slot in 0..replicas {
            let runtime = cluster.start_replica(slot).await?;
            cluster.replicas.lock().await.push(Some(runtime));
        }
        let client = Client::memory(&bus).with_request_timeout(Duration::from_millis(500));
        let plan = Plan {
            restarts: faults.restarts,
            stalls: faults.stalls,
            failovers: faults.failovers,
        };
        let healed = watch::Sender::new(false);
        let monkey = (plan.left() > 0).then(|| {
            tokio::spawn(restart_replicas(
                Arc::clone(&cluster),
                seed,
                plan,
                healed.subscribe(),
            ))
        });
        Ok(Simulation {
            seed,
            cluster,
            chaos,
            client,
            monkey,
            healed,
            settle_within: DEFAULT_SETTLE_WITHIN,
        })
    }

    /// How long [`settled`](Self::settled) waits once the faults stop
    /// ([`DEFAULT_SETTLE_WITHIN`] unless set).
    pub fn settle_within(mut self, within: Duration) -> Simulation {
        self.settle_within = within;
        self
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A client on the simulation's bus: its requests meet the faults
    /// too. It is never killed.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The simulation's bus.
    pub fn bus(&self) -> &MemoryBus {
        &self.cluster.bus
    }

    /// Sends `cmd` with the message id `id` until it is answered, as a
    /// careful client does: the same id again after a time-out or any
    /// other error worth retrying, for up to a minute.
    pub async fn send<C: Command + Clone>(&self, cmd: C, id: &str) -> Result<C::Reply> {
        until_taken(|| self.client.send_with_id(cmd.clone(), id)).await
    }

    /// Publishes `event` durably with the message id `id` until the
    /// stream took it (see [`send`](Self::send)).
    pub async fn publish_durable<E: Event + Clone>(&self, event: E, id: &str) -> Result<()> {
        until_taken(|| self.client.publish_durable_with_id(event.clone(), id)).await
    }

    /// Stalls the replica of `slot` for `duration` (as SIGSTOP, then
    /// SIGCONT would), on top of the faults drawn from the seed: returns
    /// once it goes on.
    pub async fn stall(&self, slot: usize, duration: Duration) {
        tracing::info!(slot, ?duration, "simulation: stalling a replica (SIGSTOP)");
        self.cluster.stalls.fetch_add(1, Ordering::Relaxed);
        self.cluster.stall(slot, true);
        tokio::time::sleep(duration).await;
        self.cluster.stall(slot, false);
        tracing::info!(slot, "simulation: the stalled replica goes on (SIGCONT)");
    }

    /// The replicas by slot (`None` while one is down), to look at them
    /// (`is_leader`, `partitions`, ...). Restarts wait while the guard is
    /// held: hold it briefly.
    pub async fn replicas(&self) -> tokio::sync::MutexGuard<'_, Vec<Option<Runtime>>> {
        self.cluster.replicas.lock().await
    }

    /// Ends the faults: no more losses, restarts, stalls or failovers
    /// (those still due are not done; a replica stopping goes on
    /// stopping), a stalled replica goes on, and every replica down is
    /// started again.
    pub async fn heal(&mut self) -> Result<()> {
        self.stop_faults().await;
        self.chaos.set_on(false);
        self.cluster.wake_all();
        let mut replicas = self.cluster.replicas.lock().await;
        for slot in 0..replicas.len() {
            if replicas[slot].is_none() {
                replicas[slot] = Some(self.cluster.start_replica(slot).await?);
                self.cluster.restarts.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Heals (see [`heal`](Self::heal)), then waits until everything the
    /// run set off has settled, as [`TestKit::settled`](super::TestKit::settled)
    /// does, across every replica.
    pub async fn settled(&mut self) -> Result<()> {
        self.heal().await?;
        let replicas = self.cluster.replicas.lock().await;
        let live: Vec<&Runtime> = replicas.iter().flatten().collect();
        super::settle(&self.cluster.bus, &live, self.settle_within).await
    }

    /// What the faults did so far.
    pub fn report(&self) -> FaultReport {
        let [
            lost_requests,
            lost_replies,
            lost_copies,
            lost_deliveries,
            lost_acks,
        ] = self.chaos.struck();
        FaultReport {
            seed: self.seed,
            lost_requests,
            lost_replies,
            lost_copies,
            lost_deliveries,
            lost_acks,
            kills: self.cluster.kills.load(Ordering::Relaxed),
            stops: self.cluster.stops.load(Ordering::Relaxed),
            restarts: self.cluster.restarts.load(Ordering::Relaxed),
            stalls: self.cluster.stalls.load(Ordering::Relaxed),
            failovers: self.cluster.failovers.load(Ordering::Relaxed),
            fingerprint: self.chaos.fingerprint(),
        }
    }

    /// The events of type `E` published so far, in order (see
    /// [`TestKit::published`](super::TestKit::published)).
    pub fn published<E: Event>(&self) -> Result<Vec<E>> {
        super::published(self.cluster.bus.tap())
    }

    /// The service's dead letters, oldest first (up to 1,000).
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.any_replica(|r| r.dead_letters()).await?.list(0, 1000).await
    }

    /// The service's sagas, newest first (up to 1,000), with their steps.
    pub async fn sagas(&self) -> Result<Vec<SagaInfo>> {
        let replicas = self.cluster.replicas.lock().await;
        match replicas.iter().flatten().next() {
            Some(r) => r.sagas(1000).await,
            None => Err(Error::new(ErrorKind::Unavailable, "no replica is running")),
        }
    }

    async fn any_replica<T>(&self, f: impl FnOnce(&Runtime) -> T) -> Result<T> {
        let replicas = self.cluster.replicas.lock().await;
        replicas
            .iter()
            .flatten()
            .next()
            .map(f)
            .ok_or_else(|| Error::new(ErrorKind::Unavailable, "no replica is running"))
    }

    /// Stops the faults and shuts every replica down gracefully.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop_faults().await;
        self.chaos.set_on(false);
        self.cluster.wake_all();
        let replicas: Vec<Runtime> = self.cluster.replicas.lock().await.drain(..).flatten().collect();
        let mut outcome = Ok(());
        for r in replicas {
            if let Err(e) = r.shutdown().await {
                outcome = Err(e);
            }
        }
        outcome
    }
}

impl Simulation {
    /// Stops the restarts, stalls and failovers at their next wait (a stop
    /// or start under way is finished) and waits for that.
    async fn stop_faults(&mut self) {
        self.healed.send_replace(true);
        if let Some(monkey) = self.monkey.take() {
            let _ = monkey.await;
        }
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        if let Some(monkey) = &self.monkey {
            monkey.abort();
        }
    }
}

/// The faults of a run that are not losses, still to come.
struct Plan {
    restarts: u32,
    stalls: u32,
    failovers: u32,
}

impl Plan {
    fn left(&self) -> u32 {
        self.restarts + self.stalls + self.failovers
    }
}

/// Runs `op` again after an error worth retrying, for up to a minute.
async fn until_taken<T, Fut: Future<Output = Result<T>>>(mut op: impl FnMut() -> Fut) -> Result<T> {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match op().await {
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Waits for `f`, unless the run heals first (`None` then).
async fn unless_healed<F: Future>(healed: &mut watch::Receiver<bool>, f: F) -> Option<F::Output> {
    tokio::select! {
        out = f => Some(out),
        _ = healed.wait_for(|h| *h) => None,
    }
}

/// After a number of messages drawn from the seed, kills or stops a
/// replica and starts it again after some more, stalls one for 1 to
/// 2.5 s, or fails the store over to what it held 5 to 100 ms ago, as
/// many times as `plan` says, in an order drawn from the seed. Stops at
/// the first wait once the run heals; a stop or a start under way is
/// finished first (cut short, a start left handlers serving unowned).
async fn restart_replicas(
    cluster: Arc<Cluster>,
    seed: u64,
    mut plan: Plan,
    mut healed: watch::Receiver<bool>,
) {
    let mut state = mix(seed ^ 0x7265_7374_6172_7473);
    let mut draw = move |below: u64| {
        state = mix(state);
        state % below
    };
    let slots = cluster.replicas.lock().await.len() as u64;
    // The first fault comes early, so that a short run meets one too.
    let mut gap = 10 + draw(50);
    while plan.left() > 0 {
        tracing::debug!(
            after = gap,
            "simulation: the next fault comes after this many messages"
        );
        if unless_healed(&mut healed, messages(&cluster.bus, gap))
            .await
            .is_none()
        {
            return;
        }
        gap = 20 + draw(120);
        let slot = draw(slots) as usize;
        let pick = draw(u64::from(plan.left()));
        if pick < u64::from(plan.failovers) {
            plan.failovers -= 1;
            let store = cluster.bus.store();
            let lagging = store.snapshot();
            // What a lagging replica misses: the writes of the last 5 to
            // 100 ms.
            let lag_ms = 5 + draw(95);
            let lag = tokio::time::sleep(Duration::from_millis(lag_ms));
            if unless_healed(&mut healed, lag).await.is_none() {
                return;
            }
            tracing::info!(lag_ms, "simulation: the store fails over, losing its last writes");
            cluster.failovers.fetch_add(1, Ordering::Relaxed);
            store.restore(lagging).await;
            continue;
        }
        if pick < u64::from(plan.failovers + plan.stalls) {
            plan.stalls -= 1;
            let for_ms = 1000 + draw(1500);
            tracing::info!(slot, for_ms, "simulation: stalling a replica (SIGSTOP)");
            cluster.stalls.fetch_add(1, Ordering::Relaxed);
            cluster.stall(slot, true);
            let stalled = unless_healed(&mut healed, tokio::time::sleep(Duration::from_millis(for_ms))).await;
            cluster.stall(slot, false);
            tracing::info!(slot, "simulation: the stalled replica goes on (SIGCONT)");
            if stalled.is_none() {
                return;
            }
            continue;
        }
        plan.restarts -= 1;
        let graceful = draw(2) == 0;
        let Some(victim) = cluster.replicas.lock().await.get_mut(slot).and_then(Option::take) else {
            continue;
        };
        if graceful {
            tracing::info!(slot, "simulation: stopping a replica (SIGTERM)");
            cluster.stops.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = victim.shutdown().await {
                tracing::info!(slot, error = %e, "simulation: the stopped replica did not drain in time");
            }
        } else {
            tracing::info!(slot, "simulation: killing a replica (SIGKILL)");
            cluster.kills.fetch_add(1, Ordering::Relaxed);
            // Its gate stays shut: what it left waiting (an ack spawned
            // while it was stalled) never goes out.
            cluster.kill_gate(slot);
            drop(victim);
        }
        if unless_healed(&mut healed, messages(&cluster.bus, 10 + draw(80)))
            .await
            .is_none()
        {
            // `heal` starts it.
            return;
        }
        // A failed start (the store or bus refusing for a moment) is tried
        // again; `heal` starts whatever is still down.
        loop {
            match cluster.start_replica(slot).await {
                Ok(runtime) => {
                    if let Some(s) = cluster.replicas.lock().await.get_mut(slot) {
                        *s = Some(runtime);
                    }
                    cluster.restarts.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::info!(slot, error = %e, "simulation: a replica did not start; trying again");
                    if unless_healed(&mut healed, tokio::time::sleep(Duration::from_millis(50)))
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits until `n` more things moved on the bus, or 2 s with nothing
/// moving (the run may be over: the restart comes then).
async fn messages(bus: &MemoryBus, n: u64) {
    let tap = bus.tap();
    let until = tap.activity() + n;
    let mut quiet_since = tokio::time::Instant::now();
    let mut last = tap.activity();
    while tap.activity() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = tap.activity();
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(2) {
            return;
        }
    }
}

/// How long one seed may run before [`explore`] gives up on it (and
/// names it).
pub const SEED_WITHIN: Duration = Duration::from_secs(300);

/// Runs `run` once per seed of `seeds` (a range, or regression seeds
/// first: `[73].into_iter().chain(0..4)`), each in a task of its own, and
/// stops at the first that fails (returns an error, panics, or runs past
/// [`SEED_WITHIN`]) with an error naming the seed and how to run it
/// alone. Returns how many seeds ran.
///
/// `CATGA_SIM_SEED=n` runs seed `n` alone; `CATGA_SIM_SEEDS=n` runs seeds
/// `0..n` after `seeds` (a nightly run of thousands).
pub async fn explore<F, Fut>(seeds: impl IntoIterator<Item = u64>, run: F) -> Result<u64>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let number =
        |name: &str| -> Result<Option<u64>> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::new(ErrorKind::Config, format!("{name} must be a number, not `{v}`"))
                }),
                Err(_) => Ok(None),
            }
        };
    let seeds: Vec<u64> = match (number("CATGA_SIM_SEED")?, number("CATGA_SIM_SEEDS")?) {
        (Some(one), _) => vec![one],
        (None, more) => {
            let mut all: Vec<u64> = seeds.into_iter().collect();
            for seed in 0..more.unwrap_or(0) {
                if !all.contains(&seed) {
                    all.push(seed);
                }
            }
            all
        }
    };
    explore_exactly(seeds, run).await
}

/// [`explore`] without reading `CATGA_SIM_SEED` and `CATGA_SIM_SEEDS`:
/// exactly `seeds`.
pub async fn explore_exactly<F, Fut>(seeds: impl IntoIterator<Item = u64>, mut run: F) -> Result<u64>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let mut ran = 0;
    for seed in seeds {
        tracing::info!(seed, "simulation: seed");
        let task = tokio::spawn(run(seed));
        let abort = task.abort_handle();
        let failed = match tokio::time::timeout(SEED_WITHIN, task).await {
            Err(_) => {
                abort.abort();
                Some((ErrorKind::Timeout, format!("it ran past {SEED_WITHIN:?}")))
            }
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some((e.kind(), e.message().to_owned())),
            Ok(Err(e)) if e.is_panic() => {
                let panic = e.into_panic();
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic".to_owned());
                Some((ErrorKind::Internal, text))
            }
            Ok(Err(e)) => Some((ErrorKind::Internal, e.to_string())),
        };
        if let Some((kind, text)) = failed {
            return Err(Error::new(
                kind,
                format!("seed {seed} failed: {text} (run it alone with CATGA_SIM_SEED={seed})"),
            ));
        }
        ran += 1;
    }
    Ok(ran)
}
