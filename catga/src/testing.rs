//! A test kit: a service's handlers on the embedded transport (or on
//! real servers: [`TestKit::on_servers`]), every message they send and
//! publish recorded, a wait until everything a test set off has settled,
//! and assertions on what travelled.
//!
//! ```rust,standalone_crate
//! use catga::testing::TestKit;
//! use catga::{command, event, Context, Result};
//! use serde::{Deserialize, Serialize};
//!
//! #[command(reply = u64)]
//! #[derive(Serialize, Deserialize)]
//! pub struct Add { pub a: u64, pub b: u64 }
//!
//! #[event]
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! pub struct Added { pub sum: u64 }
//!
//! #[command]
//! async fn add(ctx: &Context, cmd: Add) -> Result<u64> {
//!     ctx.publish(Added { sum: cmd.a + cmd.b }).await?;
//!     Ok(cmd.a + cmd.b)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! let kit = TestKit::start().await?;
//! assert_eq!(kit.client().send(Add { a: 2, b: 3 }).await?, 5);
//! kit.settled().await?;
//! assert_eq!(kit.published::<Added>()?, [Added { sum: 5 }]);
//! kit.shutdown().await
//! # }
//! ```
//!
//! What "settled" means: no message handed to a handler and not yet
//! answered or acknowledged, nothing waiting in a durable consumer (new,
//! unacknowledged, or due again after a retry's back-off or a saga's
//! durable timer), every durable handler served has its consumer bound,
//! and the outbox is empty, all observed with no activity on the bus in
//! between.
//!
//! A delayed message (`publish_after`) due at least a second
//! ([`DELAYED_MARGIN`]) before `settled` would give up is waited for; one
//! due later is left waiting: [`TestKit::delayed`]
//! lists them and [`TestKit::release_delayed`] publishes them all at once,
//! so that a test of "remind after a day" takes milliseconds. Recurring
//! jobs run on their schedule in the kit too (leave them out of the
//! handler selection to keep them quiet), and [`TestKit::run_job`] runs
//! one now.
//!
//! Virtual time: [`TestKit::advance`] moves the kit's clock forward, as if
//! that much time had passed. Saga timers (`saga.sleep`) and time-outs,
//! redeliveries held back by a retry's back-off, delayed messages and job
//! occurrences due within it come due at once, so a test of "compensate
//! after 30 minutes" takes milliseconds:
//!
//! ```text
//! kit.client().publish_durable(OrderPlaced { .. }).await?;
//! let _ = kit.settled().await;                 // not settled: the saga waits for payment
//! kit.advance(Duration::from_secs(30 * 60));
//! kit.settled().await?;                        // ... and has compensated
//! ```
//!
//! Leases, heartbeats, ack waits and request time-outs keep the real time
//! (a replica's liveness is not what a test skips), and so does
//! `SystemTime::now()` in a handler: read [`Context::now`](crate::Context::now)
//! for a time computed from now. A job whose period passed several times
//! in one move runs as after a pause: its `missed` policy decides (the
//! newest occurrence, by default; none with `missed = "skip"`). A saga
//! step waiting for its answer ends when a move passes the saga's
//! time-out.
//!
//! Limits:
//! - Without [`advance`](TestKit::advance), a saga sleeping for 30 minutes
//!   is not settled for 30 minutes: [`TestKit::settled`] says what is
//!   still due, and when, once its time-out passes.
//! - Work in tasks the test or a handler spawned itself is not seen.
//! - A durable consumer whose handler was stopped keeps what its stream
//!   holds for it: not settled until it is served again.
//!
//! On real servers: [`TestKit::on_servers`] runs the runtime on the NATS
//! server and Redis its builder names. It records what its runtime and
//! client send, each message as it leaves (taken back if the broker
//! refused it, or if a durable publish failed; one sent again under the
//! same message id is recorded once). It counts what its subscriptions
//! hand out, and `settled` asks JetStream about every durable consumer
//! the runtime bound (messages not delivered yet, deliveries not
//! acknowledged, a redelivery held back by its back-off among them) and
//! the store about its outbox and delayed messages; then it waits for
//! [`QUIET`] with nothing moving after a round trip to the broker, since
//! a core message on its way from the broker to a subscription is
//! counted nowhere. A look that fails (a JetStream leader election, the
//! store away for a moment) is named and taken again until the wait
//! ends. Limits:
//! - Give each kit servers of its own, or run such tests one at a time:
//!   two kits on one server share their durable consumers (and, with one
//!   service name and Redis, their outbox and keyed sagas' partitions),
//!   so one kit's messages may be handled, recorded and waited for by
//!   the other. A different service name is not enough.
//! - What other processes send is neither recorded nor counted.
//! - A retry's back-off longer than [`settle_within`](TestKit::settle_within)
//!   cannot be skipped: [`TestKit::advance`] is the embedded kit's (it
//!   panics on servers, whose timers keep their own time), and the
//!   time-out names the consumer's unacknowledged messages, not when
//!   they come due.
//! - [`TestKit::release_delayed`] is refused on Redis.
//!
//! Several replicas under faults drawn from a seed (lost requests,
//! replies and deliveries, replicas killed, stopped or stalled, the store
//! failing over): see [`Simulation`] and [`explore`].
//!
//! Every message put on the bus is recorded, whether or not anything
//! received it (a command with no handler, an event nobody subscribes
//! to); a durable publish the stream dropped as a repeat of the same
//! message id is not. Replies are not recorded, nor are catga's own
//! messages (keyed sagas' routed copies, dead letters: those are listed
//! by [`TestKit::dead_letters`]). On real servers, what this kit's
//! runtime and client sent.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{Command, Event, Message};
use crate::runtime::{Runtime, RuntimeBuilder};
use crate::transport::memory::MemoryBus;
use crate::transport::tap::Tap;
use crate::{Client, DeadLetter, DelayedInfo, SagaInfo};

pub use crate::transport::tap::{Recorded, SentAs};

pub mod simulation;
pub use simulation::{FaultReport, Faults, Simulation, explore, explore_exactly};

/// How long before [`TestKit::settled`] gives up a delayed message must
/// be due to be waited for: the relay looks every 250 ms, and its
/// handlers need their time too.
pub const DELAYED_MARGIN: Duration = Duration::from_secs(1);

/// How long [`TestKit::settled`] waits by default.
pub const DEFAULT_SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// Waits until nothing is left on `bus` (see [`TestKit::settled`]);
/// `runtimes` are the replicas serving on it (at least one).
pub(crate) async fn settle(bus: &MemoryBus, runtimes: &[&Runtime], within: Duration) -> Result<()> {
    let until = Instant::now() + within;
    let until_wall = bus.clock().now() + within;
    let tap = bus.tap();
    loop {
        let before = tap.activity();
        let left = left(bus, runtimes, tap, until_wall).await?;
        if left.is_empty() && tap.activity() == before {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(not_settled(within, &left, "the bus kept busy"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The time-out of a wait that did not settle: what was `left`, or
/// `busy` when nothing was left but something kept moving.
fn not_settled(within: Duration, left: &[String], busy: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "not settled within {within:?}: {}",
            if left.is_empty() {
                busy.to_owned()
            } else {
                left.join("; ")
            }
        ),
    )
}

/// What keeps the bus from having settled, in words: `until` is when
/// [`settle`] gives up; a delayed message due at least
/// [`DELAYED_MARGIN`] before is waited for.
async fn left(
    bus: &MemoryBus,
    runtimes: &[&Runtime],
    tap: &Arc<Tap>,
    until: std::time::SystemTime,
) -> Result<Vec<String>> {
    let Some(any) = runtimes.first() else {
        return Err(Error::new(ErrorKind::Unavailable, "no replica is running"));
    };
    // The replicas share the bus's store: any of them lists its delayed
    // messages and its outbox.
    let mut left = left_in_store(any, bus.clock().now(), until).await?;
    // A durable consumer bound in a task of its own (a keyed saga's
    // router) may not be bound yet: what its stream holds is not in
    // any backlog until it is.
    let streams = bus.streams();
    for runtime in runtimes {
        unbound(
            runtime,
            |subject, durable| streams.has_consumer(subject, durable),
            &mut left,
        )
        .await;
    }
    let now = Instant::now();
    for b in streams.backlog() {
        let mut what = Vec::new();
        if b.undelivered > 0 {
            what.push(format!("{} not delivered yet", b.undelivered));
        }
        if let Some(next) = b.pending.iter().min() {
            what.push(format!(
                "{} unacknowledged, the next due {}",
                b.pending.len(),
                if *next <= now {
                    "now".to_owned()
                } else {
                    format!("in {:?}", *next - now)
                }
            ));
        }
        left.push(format!(
            "consumer {} of {}: {}",
            b.durable,
            b.subject,
            what.join(", ")
        ));
    }
    being_handled(tap, &mut left);
    Ok(left)
}

/// How many deliveries were handed out and not settled yet, in `left`,
/// naming the oldest few: which message a settle that timed out waited
/// on.
fn being_handled(tap: &Tap, left: &mut Vec<String>) {
    let in_flight = tap.in_flight();
    if in_flight > 0 {
        left.push(format!(
            "{in_flight} messages being handled, the oldest {}",
            tap.stuck(STUCK_NAMED).join(", ")
        ));
    }
}

/// How many of the deliveries being handled a settle that timed out
/// names.
const STUCK_NAMED: usize = 5;

/// Names in `left` each durable consumer `runtime` serves that
/// `is_bound(subject, durable)` says is not bound yet.
async fn unbound(runtime: &Runtime, is_bound: impl Fn(&str, &str) -> bool, left: &mut Vec<String>) {
    for name in runtime.serving().await {
        let Some(spec) = runtime.handlers().iter().find(|s| s.name() == name) else {
            continue;
        };
        if let Some(durable) = spec.durable()
            && !is_bound(spec.subject(), durable)
        {
            left.push(format!("consumer {durable} of {} not bound yet", spec.subject()));
        }
    }
}

/// What the store of `runtime` still holds that keeps work from having
/// settled: delayed messages due before `until` (with
/// [`DELAYED_MARGIN`] to spare) and the outbox.
async fn left_in_store(
    runtime: &Runtime,
    now: std::time::SystemTime,
    until: std::time::SystemTime,
) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let waiting = runtime.delayed(usize::MAX).await?;
    // Due already, or due with room before the wait ends.
    let soon: Vec<_> = waiting
        .iter()
        .filter(|d| d.due <= now || d.due.checked_add(DELAYED_MARGIN).is_some_and(|d| d <= until))
        .collect();
    if let Some(first) = soon.first() {
        left.push(format!(
            "{} delayed messages due before the wait ends, the first on {} in {:?}",
            soon.len(),
            first.subject,
            first.due.duration_since(now).unwrap_or_default()
        ));
    }
    // In the order work flows: the outbox into streams, streams to
    // consumers, deliveries to handlers.
    let outbox = runtime.outbox_backlog().await?;
    if outbox > 0 {
        left.push(format!("{outbox} events in the outbox"));
    }
    Ok(left)
}

/// How long a kit on real servers waits, after a round trip to the
/// broker, with nothing moving, before it calls the work settled. A core
/// message a handler published is counted nowhere between the broker
/// and the subscription that takes it; the round trip puts whatever was
/// published before it into the subscriptions' queues (the broker writes
/// a connection's messages in order), and this much quiet lets the serve
/// loops take them. A loopback delivery takes well under a millisecond.
pub const QUIET: Duration = Duration::from_millis(50);

/// Looks at a quiet runtime on real servers, each after a round trip,
/// before [`settle_on_servers`] calls it settled, besides [`QUIET`].
const QUIET_LOOKS: u32 = 3;

/// [`settle`] for a runtime on real servers: what its store holds, what
/// every durable consumer it bound still has (asked of JetStream), and
/// what its subscriptions handed out, all observed empty with nothing
/// moving for [`QUIET`] after a round trip to the broker.
async fn settle_on_servers(runtime: &Runtime, within: Duration) -> Result<()> {
    let until = Instant::now() + within;
    let until_wall = std::time::SystemTime::now() + within;
    let transport = runtime.shared.client.transport();
    let tap = transport.tap();
    // The activity count, when it was first seen with nothing left, and
    // the looks since. Quiet is counted in looks too, each after a round
    // trip: on a starved host the serve loops and this loop slow down
    // alike, and time alone would run out before a loop took its message.
    let mut quiet: Option<(u64, Instant, u32)> = None;
    loop {
        let before = tap.activity();
        let mut left = left_on_servers(runtime, tap, until_wall).await;
        let remaining = until.saturating_duration_since(Instant::now());
        if let Err(e) = transport.round_trip(remaining.min(Duration::from_secs(2))).await {
            left.push(format!("no round trip to the broker: {e}"));
        }
        let after = tap.activity();
        if left.is_empty() && after == before {
            match &mut quiet {
                Some((seen, since, looks)) if *seen == after => {
                    *looks += 1;
                    if since.elapsed() >= QUIET && *looks >= QUIET_LOOKS {
                        return Ok(());
                    }
                }
                _ => quiet = Some((after, Instant::now(), 0)),
            }
        } else {
            quiet = None;
        }
        if Instant::now() >= until {
            return Err(not_settled(within, &left, "the runtime kept busy"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What keeps a runtime on real servers from having settled, in words;
/// a look that fails (a JetStream leader election, the store away for a
/// moment) is named too, and looked at again on the next turn.
async fn left_on_servers(runtime: &Runtime, tap: &Arc<Tap>, until: std::time::SystemTime) -> Vec<String> {
    let mut left = left_in_store(runtime, std::time::SystemTime::now(), until)
        .await
        .unwrap_or_else(|e| vec![format!("the store did not answer: {e}")]);
    let transport = runtime.shared.client.transport();
    let bound = tap.consumers();
    let is_bound = |subject: &str, durable: &str| bound.iter().any(|(s, d)| s == subject && d == durable);
    unbound(runtime, is_bound, &mut left).await;
    for (stream_of, durable) in &bound {
        let out = match transport.durable_outstanding(stream_of, durable).await {
            Ok(out) => out,
            Err(e) => {
                left.push(format!("consumer {durable} of the stream of {stream_of}: {e}"));
                continue;
            }
        };
        let mut what = Vec::new();
        if out.pending > 0 {
            what.push(format!("{} not delivered yet", out.pending));
        }
        if out.ack_pending > 0 {
            what.push(format!("{} unacknowledged", out.ack_pending));
        }
        if !what.is_empty() {
            left.push(format!(
                "consumer {durable} of the stream of {stream_of}: {}",
                what.join(", ")
            ));
        }
    }
    being_handled(tap, &mut left);
    left
}

/// The events of type `E` that `tap` recorded as published (see
/// [`TestKit::published`]).
pub(crate) fn published<E: Event>(tap: &Tap) -> Result<Vec<E>> {
    decoded::<E>(tap, |r| {
        matches!(r.sent_as, SentAs::Publish | SentAs::PublishDurable)
    })
}

/// The records of type `M` that `tap` holds and `keep` keeps, decoded;
/// those of a version newer than `M` (asked for an older type) are left
/// out.
fn decoded<M: Message + crate::wire::codec::Decode>(
    tap: &Tap,
    keep: impl Fn(&Recorded) -> bool,
) -> Result<Vec<M>> {
    tap.records()
        .iter()
        .filter(|r| r.is::<M>() && r.version() <= M::VERSION && keep(r))
        .map(Recorded::decode)
        .collect()
}

/// A runtime on its own embedded bus, or on real servers, with every
/// message it sends recorded (see the [module](self)).
pub struct TestKit {
    /// The kit's embedded bus; `None` on real servers.
    bus: Option<MemoryBus>,
    runtime: Runtime,
    client: Client,
    settle_within: Duration,
}

impl std::fmt::Debug for TestKit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKit")
            .field("on_servers", &self.bus.is_none())
            .field("settle_within", &self.settle_within)
            .finish_non_exhaustive()
    }
}

impl TestKit {
    /// Every handler of this binary, on a new embedded bus.
    pub async fn start() -> Result<TestKit> {
        TestKit::with(Runtime::builder()).await
    }

    /// The runtime `builder` describes (its handler selection, service
    /// name and settings), on a new embedded bus and its store: a NATS or
    /// Redis URL in the builder is not used (each kit is on its own).
    pub async fn with(builder: RuntimeBuilder) -> Result<TestKit> {
        let bus = MemoryBus::new();
        bus.tap().turn_on();
        let runtime = builder.embedded(bus.clone()).start().await?;
        runtime.ready().await?;
        let client = runtime.client();
        Ok(TestKit {
            bus: Some(bus),
            runtime,
            client,
            settle_within: DEFAULT_SETTLE_WITHIN,
        })
    }

    /// The runtime `builder` describes, on the NATS server (and the Redis
    /// store, if one is set) its settings name: the same handlers, wire
    /// and store as in production, with what this process sends
    /// recorded and its work followed until it settles (see the
    /// [module](self)). Returns once the runtime is ready.
    ///
    /// Fails with a configuration error when the builder names no NATS
    /// URL or was given an embedded bus: [`TestKit::with`] is for those.
    pub async fn on_servers(builder: RuntimeBuilder) -> Result<TestKit> {
        if !builder.on_nats() {
            return Err(Error::new(
                ErrorKind::Config,
                "TestKit::on_servers needs a NATS URL (RuntimeBuilder::nats_url) and no embedded bus; \
                 TestKit::with runs on the embedded transport",
            ));
        }
        let runtime = builder.tapped().start().await?;
        if let Err(e) = runtime.ready().await {
            let _ = runtime.shutdown().await;
            return Err(e);
        }
        let client = runtime.client();
        Ok(TestKit {
            bus: None,
            runtime,
            client,
            settle_within: DEFAULT_SETTLE_WITHIN,
        })
    }

    /// Whether the kit runs on real servers ([`TestKit::on_servers`]).
    pub fn on_real_servers(&self) -> bool {
        self.bus.is_none()
    }

    /// What the kit records.
    fn tap(&self) -> &Arc<Tap> {
        self.runtime.shared.client.transport().tap()
    }

    /// How long [`settled`](Self::settled) waits before it fails
    /// ([`DEFAULT_SETTLE_WITHIN`] unless set).
    pub fn settle_within(mut self, within: Duration) -> TestKit {
        self.settle_within = within;
        self
    }

    /// A client on the kit's bus: what it sends and publishes is recorded
    /// too.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The runtime under test.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Moves the kit's clock forward by `by`, as if that much time had
    /// passed (see the [module](self)): saga timers and time-outs,
    /// redeliveries held back by a retry's back-off, delayed messages and
    /// job occurrences due within it come due now. Follow it with
    /// [`settled`](Self::settled) to wait for what they set off.
    ///
    /// Leases, heartbeats, ack waits and request time-outs keep the real
    /// time, and so does what a handler reads from `SystemTime::now()`
    /// (`Context::now` reads the kit's clock).
    ///
    /// # Panics
    ///
    /// On real servers ([`TestKit::on_servers`]): JetStream's timers and
    /// Redis' expiries keep the real time, which a test cannot move.
    pub fn advance(&self, by: Duration) {
        let Some(bus) = &self.bus else {
            panic!(
                "TestKit::advance moves the embedded bus's clock; a kit on real servers keeps \
                 the servers' time (run this test with TestKit::with)"
            );
        };
        bus.clock().advance(by);
        bus.streams().advance(by);
    }

    /// Now, by the kit's clock: the system's time plus every
    /// [`advance`](Self::advance) so far (the system's time on real
    /// servers).
    pub fn now(&self) -> std::time::SystemTime {
        self.runtime.shared.client.transport().clock().now()
    }

    /// The kit's embedded bus (`None` on real servers): start more
    /// replicas on it with `Runtime::builder().memory(bus.clone())`
    /// (without a Redis URL they share the kit's store); what they send
    /// is recorded and counted by [`settled`](Self::settled) too.
    pub fn bus(&self) -> Option<&MemoryBus> {
        self.bus.as_ref()
    }

    /// Waits until everything the test set off has settled (see the
    /// [module](self)): every message caused by what was sent, published
    /// or saved (commands, events, outbox entries, saga steps, durable
    /// redeliveries) was handled, answered, acknowledged or
    /// dead-lettered. Fails with a time-out after
    /// [`settle_within`](Self::settle_within), naming what is left.
    pub async fn settled(&self) -> Result<()> {
        match &self.bus {
            Some(bus) => settle(bus, &[&self.runtime], self.settle_within).await,
            None => settle_on_servers(&self.runtime, self.settle_within).await,
        }
    }

    /// Every message sent and published on the bus so far, in order
    /// (catga's own copies of keyed sagas' triggers left out). On real
    /// servers: what this kit's runtime and client sent, in the order
    /// they sent it (taken back if it was not sent, or a durable publish
    /// not stored; see the [module](self)).
    pub fn messages(&self) -> Vec<Recorded> {
        self.tap().records()
    }

    /// The events of type `E` published so far (core or durable, by a
    /// handler, the outbox relay or the test), in order; older versions
    /// upcast as `E` says, newer ones left out.
    pub fn published<E: Event>(&self) -> Result<Vec<E>> {
        published(self.tap())
    }

    /// The commands of type `C` sent so far (by handlers, sagas or the
    /// test; a retried send counts each time), in order.
    pub fn sent<C: Command>(&self) -> Result<Vec<C>> {
        decoded::<C>(self.tap(), |r| r.sent_as == SentAs::Request)
    }

    /// The delayed messages waiting (sent with `publish_after` or
    /// `publish_at` and not yet due), soonest first.
    pub async fn delayed(&self) -> Result<Vec<DelayedInfo>> {
        self.runtime.delayed(usize::MAX).await
    }

    /// Publishes every delayed message waiting now, ahead of its time, as
    /// if it had come due (through the outbox, in due order); how many.
    /// Follow with [`settled`](Self::settled) to wait for their handlers.
    /// On the embedded store only: refused on Redis
    /// ([`TestKit::on_servers`]).
    pub async fn release_delayed(&self) -> Result<usize> {
        self.runtime.shared.store.delayed_release_all()
    }

    /// Runs the recurring job `name` (its function's name or path) now,
    /// once, as [`Runtime::run_job`] does; the occurrence's time. Follow
    /// with [`settled`](Self::settled) to wait for it.
    pub async fn run_job(&self, name: &str) -> Result<std::time::SystemTime> {
        self.runtime.run_job(name).await
    }

    /// The service's dead letters, oldest first (up to 1,000).
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.runtime.dead_letters().list(0, 1000).await
    }

    /// The service's sagas, newest first (up to 1,000), with their steps.
    pub async fn sagas(&self) -> Result<Vec<SagaInfo>> {
        self.runtime.sagas(1000).await
    }

    /// The saga whose id is `id` (`<saga fn>:<trigger's message id>`),
    /// or the only one started by the message whose id is `id` (as
    /// [`Recorded::message_id`] shows it).
    pub async fn saga(&self, id: &str) -> Result<SagaInfo> {
        let sagas = self.sagas().await?;
        if let Some(exact) = sagas.iter().find(|s| s.id == id) {
            return Ok(exact.clone());
        }
        // A saga's id is `<saga fn>:<trigger's id>`, shortened past the id
        // length limit: the ids this message would give each handler.
        let started_by: std::collections::BTreeSet<String> = self
            .runtime
            .handlers()
            .iter()
            .map(|h| {
                let name = h.name().rsplit("::").next().unwrap_or_default();
                crate::wire::bounded_id(format!("{name}:{id}"))
            })
            .collect();
        let mut matching = sagas.into_iter().filter(|s| started_by.contains(&s.id));
        match (matching.next(), matching.next()) {
            (Some(one), None) => Ok(one),
            (None, _) => Err(Error::new(ErrorKind::NotFound, format!("no saga `{id}`"))),
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::Invalid,
                format!("several sagas were started by message `{id}`: give the saga's id"),
            )),
        }
    }

    /// Shuts the runtime down (see [`Runtime::shutdown`]).
    pub async fn shutdown(self) -> Result<()> {
        self.runtime.shutdown().await
    }
}
