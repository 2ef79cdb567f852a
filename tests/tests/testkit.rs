//! The test kit (`catga::testing`): what a user's test sees. A command
//! whose save publishes an event through the outbox, a saga that event
//! starts, a durable handler that succeeds on its third delivery, one
//! whose messages are dead-lettered: after `settled()`, every effect is
//! there to assert on, without polling. And `settled()` fails, saying
//! what is left, when a saga sleeps past its time-out. Delayed messages
//! due soon are waited for, later ones released on demand; a job runs on
//! demand. Virtual time: moving the kit's clock wakes a saga's 30-minute
//! timer, times a saga out, brings a retry held back by its back-off, a
//! delayed message due tomorrow and an hourly job's occurrence, in
//! milliseconds.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use catga::testing::{SentAs, TestKit};
use catga::{Context, Error, Result, Runtime, Saga, SagaStatus, State, Versioned, command, event, job, saga};
use catga_tests::{NatsServer, RedisServer};
use serde::{Deserialize, Serialize};

/// Places an order.
#[command(subject = "tests.kit.place")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Place {
    /// Which order.
    pub order: String,
    /// Its amount.
    pub cents: u64,
}

/// An order was placed (saved with the order, relayed by the outbox).
#[event(subject = "tests.kit.placed")]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Placed {
    /// Which order.
    pub order: String,
    /// Its amount.
    pub cents: u64,
}

/// Reserves stock for an order.
#[command(subject = "tests.kit.reserve", idempotent)]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Reserve {
    /// Which order.
    pub order: String,
}

/// Releases what [`Reserve`] reserved.
#[command(subject = "tests.kit.release", idempotent)]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Release {
    /// Which order.
    pub order: String,
}

/// Charges an order; refuses amounts over 1,000.
#[command(subject = "tests.kit.charge", idempotent)]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Charge {
    /// Which order.
    pub order: String,
    /// Its amount.
    pub cents: u64,
}

/// An order, as saved.
#[derive(Serialize, Deserialize, Debug)]
pub struct Order {
    /// Its amount.
    pub cents: u64,
}

impl State for Order {
    const KIND: &'static str = "kit-order";
}

#[command]
async fn place(ctx: &Context, p: Place) -> Result<()> {
    ctx.save(Versioned::new(p.order.clone(), Order { cents: p.cents }))
        .with_event(Placed {
            order: p.order,
            cents: p.cents,
        })
        .await?;
    Ok(())
}

#[command]
async fn reserve(_r: Reserve) -> Result<()> {
    // Slow enough that an assertion made before the saga finished
    // would see it unfinished.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

#[command]
async fn release(_r: Release) -> Result<()> {
    Ok(())
}

#[command]
async fn charge(c: Charge) -> Result<()> {
    if c.cents > 1000 {
        return Err(Error::invalid("over the limit"));
    }
    Ok(())
}

#[saga]
async fn fulfil(saga: &Saga, e: Placed) -> Result<()> {
    saga.step(
        "reserve",
        Reserve {
            order: e.order.clone(),
        },
    )
    .compensate(Release {
        order: e.order.clone(),
    })
    .await?;
    saga.step(
        "charge",
        Charge {
            order: e.order.clone(),
            cents: e.cents,
        },
    )
    .await?;
    Ok(())
}

/// Handled on its third delivery.
#[event(subject = "tests.kit.poke")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Poke;

/// Deliveries of [`Poke`], per service (the embedded and the
/// real-server kits run side by side in this binary).
static POKES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn count(of: &Mutex<BTreeMap<String, u64>>, service: &str, n: u64) -> u64 {
    let mut all = of.lock().expect("counts");
    let c = all.entry(service.to_owned()).or_default();
    *c += n;
    *c
}

#[event(durable = "kit-pokes")]
async fn poked(ctx: &Context, _p: Poke) -> Result<()> {
    if count(&POKES, ctx.service(), 1) <= 2 {
        return Err(Error::unavailable("not yet"));
    }
    Ok(())
}

/// Refused for good: dead-lettered.
#[event(subject = "tests.kit.poison")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Poison {
    /// Which one.
    pub n: u64,
}

#[event(durable = "kit-poison")]
async fn poisoned(_p: Poison) -> Result<()> {
    Err(Error::invalid("cannot take this"))
}

/// Starts [`dozing`].
#[event(subject = "tests.kit.doze")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Doze;

#[saga]
async fn dozing(saga: &Saga, _d: Doze) -> Result<()> {
    saga.sleep("a minute", Duration::from_secs(60)).await?;
    Ok(())
}

/// A plain (core) event: its handler takes a while.
#[event(subject = "tests.kit.noted")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Noted {
    /// Which one.
    pub n: u64,
}

static NOTES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

#[event]
async fn note(ctx: &Context, n: Noted) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    count(&NOTES, ctx.service(), n.n);
    Ok(())
}

/// Starts a keyed saga per account.
#[event(subject = "tests.kit.posted")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Posted {
    /// Whose.
    pub account: String,
    /// Which.
    pub seq: u64,
}

/// Per service, per account: the postings in the order handled.
type Ledger = BTreeMap<String, BTreeMap<String, Vec<u64>>>;
static LEDGER: Mutex<Ledger> = Mutex::new(BTreeMap::new());

#[saga(key = account, partitions = 4)]
async fn ledger(saga: &Saga, e: Posted) -> Result<()> {
    LEDGER
        .lock()
        .expect("ledger")
        .entry(saga.context().service().to_owned())
        .or_default()
        .entry(e.account)
        .or_default()
        .push(e.seq);
    Ok(())
}

/// Publishes [`Reminded`] after `after_ms`.
#[command(subject = "tests.kit.remind")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Remind {
    /// The delay.
    pub after_ms: u64,
    /// Which reminder.
    pub n: u64,
}

/// A delayed event.
#[event(subject = "tests.kit.reminded")]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Reminded {
    /// Which reminder.
    pub n: u64,
}

static REMINDED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[command]
async fn remind(ctx: &Context, r: Remind) -> Result<()> {
    ctx.publish_after(Duration::from_millis(r.after_ms), Reminded { n: r.n })
        .await?;
    Ok(())
}

#[event(durable = "kit-reminded")]
async fn reminded(r: Reminded) -> Result<()> {
    REMINDED.lock().expect("reminded").push(r.n);
    Ok(())
}

/// Each occurrence of [`hourly_tally`] run, by its time, and how often.
static TALLIES: Mutex<BTreeMap<SystemTime, u32>> = Mutex::new(BTreeMap::new());

#[job(every = "1h", idempotent)]
async fn hourly_tally(ctx: &Context) -> Result<()> {
    let at = ctx
        .scheduled_at()
        .ok_or_else(|| Error::invalid("an occurrence without its time"))?;
    *TALLIES.lock().expect("tallies").entry(at).or_default() += 1;
    Ok(())
}

fn kit_handlers(except: &'static [&'static str]) -> catga::RuntimeBuilder {
    kit_named("kit", except)
}

fn kit_named(service: &str, except: &'static [&'static str]) -> catga::RuntimeBuilder {
    Runtime::builder()
        .service(service)
        .retry_base(Duration::from_millis(20))
        .handlers(move |s| {
            s.name().starts_with("testkit::")
                && !s.name().starts_with("testkit::virtual_")
                && !except.iter().any(|e| s.name().ends_with(e))
        })
}

/// A command, its outbox event and the saga it starts, each step
/// recorded with its cause; one saga completes, one is compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_event_and_saga_settle_and_are_recorded() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
    a_command_its_event_and_saga(kit).await;
}

/// The same on a NATS server and a Redis server: the wire, the streams
/// and the store of production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_event_and_saga_settle_and_are_recorded_on_servers() {
    let (kit, _servers) = on_servers("kit-flow", &["::dozing"]).await;
    a_command_its_event_and_saga(kit).await;
}

/// A kit on a NATS server and a Redis server of its own, which live as
/// long as the second value.
async fn on_servers(service: &str, except: &'static [&'static str]) -> (TestKit, (NatsServer, RedisServer)) {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let kit = TestKit::on_servers(
        kit_named(service, except)
            .nats_url(nats.url())
            .redis_url(redis.url())
            .durable_defaults(Duration::from_secs(2), 5),
    )
    .await
    .expect("kit on servers");
    assert!(kit.on_real_servers());
    (kit, (nats, redis))
}

async fn a_command_its_event_and_saga(kit: TestKit) {
    kit.client()
        .send(Place {
            order: "o-1".into(),
            cents: 500,
        })
        .await
        .expect("placed");
    kit.client()
        .send(Place {
            order: "o-2".into(),
            cents: 5000,
        })
        .await
        .expect("placed");
    kit.settled().await.expect("settled");

    let placed = kit.published::<Placed>().expect("decodes");
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert!(placed.contains(&Placed {
        order: "o-1".into(),
        cents: 500
    }));
    assert_eq!(kit.sent::<Reserve>().expect("decodes").len(), 2);
    assert_eq!(
        kit.sent::<Release>().expect("decodes"),
        [Release { order: "o-2".into() }],
        "the over-limit order's reservation is released"
    );
    // Both sagas are finished: no polling after `settled()`.
    let sagas = kit.sagas().await.expect("sagas");
    assert_eq!(sagas.len(), 2, "{sagas:?}");
    let mut statuses: Vec<SagaStatus> = sagas.iter().map(|s| s.status).collect();
    statuses.sort_by_key(|s| s.as_str());
    assert_eq!(statuses, [SagaStatus::Compensated, SagaStatus::Completed]);
    let one = kit.saga(&sagas[0].id).await.expect("by id");
    assert_eq!(one, sagas[0]);

    // Causes: each saga step was sent because of its event.
    let messages = kit.messages();
    let event = messages
        .iter()
        .find(|m| m.is::<Placed>() && m.decode::<Placed>().is_ok_and(|p| p.order == "o-1"))
        .expect("the event is recorded");
    assert_eq!(
        event.sent_as,
        SentAs::PublishDurable,
        "relayed from the outbox into its stream"
    );
    let step = messages
        .iter()
        .find(|m| m.is::<Reserve>() && m.decode::<Reserve>().is_ok_and(|r| r.order == "o-1"))
        .expect("the step is recorded");
    assert_eq!(step.sent_as, SentAs::Request);
    assert_eq!(
        step.causation_id(),
        event.message_id(),
        "the step names its event as cause"
    );
    assert_eq!(
        step.correlation_id(),
        event.correlation_id(),
        "one correlation for the whole flow"
    );
    assert!(kit.dead_letters().await.expect("letters").is_empty());
    kit.shutdown().await.expect("clean shutdown");
}

/// Durable redeliveries after a retry's back-off, and dead letters, are
/// waited for too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_settle() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
    retries_and_dead_letters(kit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_settle_on_servers() {
    let (kit, _servers) = on_servers("kit-retries", &["::dozing"]).await;
    // What only the embedded kit can do is refused, saying so.
    let moved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        kit.advance(Duration::from_secs(1));
    }));
    let said = moved.expect_err("no virtual time on real servers");
    let said = said
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| said.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(said.contains("TestKit::with"), "{said}");
    let err = kit.release_delayed().await.expect_err("embedded store only");
    assert!(err.message().contains("embedded"), "{err}");
    assert!(kit.bus().is_none());
    retries_and_dead_letters(kit).await;
}

/// A kit on servers without a NATS URL is refused, naming the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kit_on_servers_needs_a_nats_url() {
    let err = TestKit::on_servers(kit_named("kit-nowhere", &[]))
        .await
        .expect_err("no NATS URL");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    assert!(err.message().contains("nats_url"), "{err}");
}

async fn retries_and_dead_letters(kit: TestKit) {
    kit.client().publish_durable(Poke).await.expect("published");
    // Sent twice under one id, as a client retries: stored, handled and
    // recorded once.
    for _ in 0..2 {
        kit.client()
            .publish_durable_with_id(Poison { n: 7 }, "poison-7")
            .await
            .expect("published");
    }
    kit.settled().await.expect("settled");
    let recorded: Vec<_> = kit.messages().into_iter().map(|m| m.subject).collect();
    assert_eq!(
        recorded.iter().filter(|s| *s == "tests.kit.poison").count(),
        1,
        "{recorded:?}"
    );
    assert!(
        recorded.iter().all(|s| !s.starts_with("catga.")),
        "catga's own messages (the dead letter) are not the test's: {recorded:?}"
    );
    assert_eq!(
        count(&POKES, kit.client().service(), 0),
        3,
        "handled on the third delivery, before settled() returned"
    );
    let letters = kit.dead_letters().await.expect("letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].subject, "tests.kit.poison");
    assert!(
        letters[0].error.contains("cannot take this"),
        "{}",
        letters[0].error
    );
    kit.shutdown().await.expect("clean shutdown");
}

/// A saga sleeping a minute is not settled: `settled()` fails after its
/// time-out and says what is due, and when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_saga_is_not_settled_and_says_so() {
    let kit = TestKit::with(kit_handlers(&[])).await.expect("kit");
    let err = a_sleeping_saga(kit).await;
    assert!(err.message().contains("due in"), "says when it is due: {err}");
}

/// On servers JetStream holds the sleeping saga's trigger: named as
/// unacknowledged (the broker does not say when it is due).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_saga_is_not_settled_and_says_so_on_servers() {
    let (kit, _servers) = on_servers("kit-dozing", &[]).await;
    let err = a_sleeping_saga(kit).await;
    assert!(err.message().contains("unacknowledged"), "{err}");
}

async fn a_sleeping_saga(kit: TestKit) -> Error {
    let kit = kit.settle_within(Duration::from_secs(2));
    kit.client().publish_durable(Doze).await.expect("published");
    let err = kit
        .settled()
        .await
        .expect_err("a minute's sleep is not settled in 2 s");
    assert_eq!(err.kind(), catga::ErrorKind::Timeout, "{err}");
    assert!(
        err.message().contains("tests.kit.doze"),
        "names the consumer: {err}"
    );
    let _ = kit.shutdown().await;
    err
}

/// A core event handler still running is waited for, not only durable
/// consumers' backlogs; and a keyed saga's triggers, routed by a router
/// that binds its consumer in a task of its own, have all run, in each
/// key's order, once `settled()` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_handlers_and_keyed_sagas_settle() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
    core_handlers_and_keyed_sagas(kit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_handlers_and_keyed_sagas_settle_on_servers() {
    let (kit, _servers) = on_servers("kit-keyed", &["::dozing"]).await;
    core_handlers_and_keyed_sagas(kit).await;
}

async fn core_handlers_and_keyed_sagas(kit: TestKit) {
    let service = kit.client().service().to_owned();
    kit.client().publish(Noted { n: 5 }).await.expect("published");
    for seq in 0..5 {
        for account in ["a", "b", "c"] {
            kit.client()
                .publish_durable(Posted {
                    account: account.into(),
                    seq,
                })
                .await
                .expect("published");
        }
    }
    kit.settled().await.expect("settled");
    assert_eq!(
        count(&NOTES, &service, 0),
        5,
        "the core handler finished before settled() returned"
    );
    let ledger = LEDGER
        .lock()
        .expect("ledger")
        .get(&service)
        .cloned()
        .unwrap_or_default();
    for account in ["a", "b", "c"] {
        assert_eq!(
            ledger.get(account).cloned().unwrap_or_default(),
            [0, 1, 2, 3, 4],
            "{account}: {ledger:?}"
        );
    }
    assert_eq!(
        kit.published::<Posted>().expect("decodes").len(),
        15,
        "the routed copies are not the user's"
    );
    kit.shutdown().await.expect("clean shutdown");
}

/// A delayed message due before `settled()` gives up is waited for; one
/// due in a day is left waiting, listed, and published on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_due_soon_settle_and_later_ones_are_released_on_demand() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
    kit.client()
        .send(Remind { after_ms: 300, n: 1 })
        .await
        .expect("sent");
    kit.client()
        .send(Remind {
            after_ms: 86_400_000,
            n: 2,
        })
        .await
        .expect("sent");
    kit.settled().await.expect("settled");
    assert_eq!(
        *REMINDED.lock().expect("reminded"),
        [1],
        "the one due in 300 ms was waited for, the one due tomorrow was not"
    );
    let waiting = kit.delayed().await.expect("listed");
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].subject, "tests.kit.reminded");
    assert!(
        waiting[0].due > SystemTime::now() + Duration::from_secs(86_000),
        "{waiting:?}"
    );
    assert_eq!(kit.release_delayed().await.expect("released"), 1);
    kit.settled().await.expect("settled");
    assert_eq!(*REMINDED.lock().expect("reminded"), [1, 2]);
    assert!(kit.delayed().await.expect("listed").is_empty());
    assert_eq!(
        kit.published::<Reminded>().expect("decodes"),
        [Reminded { n: 1 }, Reminded { n: 2 }]
    );
    kit.shutdown().await.expect("clean shutdown");
}

/// A job runs now on demand, once per call, with its occurrence's time;
/// an unknown name is refused with the jobs there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_now_on_demand() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
    let first = kit.run_job("hourly_tally").await.expect("run");
    kit.settled().await.expect("settled");
    let second = kit.run_job("testkit::hourly_tally").await.expect("run by path");
    assert!(second > first, "{first:?} {second:?}");
    kit.settled().await.expect("settled");
    let tallies = TALLIES.lock().expect("tallies").clone();
    // Another test's kit could run a scheduled occurrence on the hour.
    assert_eq!(tallies.get(&first), Some(&1), "{tallies:?}");
    assert_eq!(tallies.get(&second), Some(&1), "{tallies:?}");
    let e = kit.run_job("nightly").await.expect_err("no such job");
    assert_eq!(e.kind(), catga::ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("testkit::hourly_tally"), "{e}");
    kit.shutdown().await.expect("clean shutdown");
}

// Virtual time. Each test has its own kit (its own bus and clock) and its
// own handlers, so that the tests of this file, which share a process
// under plain `cargo test`, do not see each other's effects.

/// A trip was booked: [`virtual_waits`] holds it, waits 30 minutes for
/// the payment window, then confirms.
#[event(subject = "tests.kit.virtual.booked")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VirtualBooked {
    /// Which trip.
    pub trip: u64,
}

/// A trip was booked with a deadline: [`virtual_expires`] times out after
/// 20 minutes while it waits an hour.
#[event(subject = "tests.kit.virtual.expiring")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VirtualExpiring {
    /// Which trip.
    pub trip: u64,
}

/// Holds a trip.
#[command(subject = "tests.kit.virtual.hold", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct VirtualHold {
    /// Which trip.
    pub trip: u64,
}

/// Gives a hold up.
#[command(subject = "tests.kit.virtual.unhold", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct VirtualUnhold {
    /// Which trip.
    pub trip: u64,
}

/// Confirms a trip.
#[command(subject = "tests.kit.virtual.confirm", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct VirtualConfirm {
    /// Which trip.
    pub trip: u64,
}

/// What the trip handlers did, per trip, in order.
static TRIPS: Mutex<BTreeMap<u64, Vec<&'static str>>> = Mutex::new(BTreeMap::new());

fn trip(n: u64) -> Vec<&'static str> {
    TRIPS.lock().expect("trips").get(&n).cloned().unwrap_or_default()
}

fn did(n: u64, what: &'static str) {
    TRIPS.lock().expect("trips").entry(n).or_default().push(what);
}

#[command]
async fn virtual_hold(c: VirtualHold) -> Result<()> {
    did(c.trip, "hold");
    Ok(())
}

#[command]
async fn virtual_unhold(c: VirtualUnhold) -> Result<()> {
    did(c.trip, "unhold");
    Ok(())
}

#[command]
async fn virtual_confirm(c: VirtualConfirm) -> Result<()> {
    did(c.trip, "confirm");
    Ok(())
}

#[saga]
async fn virtual_waits(saga: &Saga, e: VirtualBooked) -> Result<()> {
    saga.step("hold", VirtualHold { trip: e.trip })
        .compensate(VirtualUnhold { trip: e.trip })
        .await?;
    saga.sleep("payment window", Duration::from_secs(30 * 60)).await?;
    saga.step("confirm", VirtualConfirm { trip: e.trip }).await?;
    Ok(())
}

#[saga(timeout = "20m")]
async fn virtual_expires(saga: &Saga, e: VirtualExpiring) -> Result<()> {
    saga.step("hold", VirtualHold { trip: e.trip })
        .compensate(VirtualUnhold { trip: e.trip })
        .await?;
    saga.sleep("an hour", Duration::from_secs(3600)).await?;
    saga.step("confirm", VirtualConfirm { trip: e.trip }).await?;
    Ok(())
}

fn virtual_kit(names: &'static [&'static str], retry_base: Duration) -> catga::RuntimeBuilder {
    Runtime::builder()
        .service("kit")
        .retry_base(retry_base)
        .handlers(move |s| names.iter().any(|n| s.name() == format!("testkit::{n}")))
}

const TRIP_HANDLERS: &[&str] = &[
    "virtual_hold",
    "virtual_unhold",
    "virtual_confirm",
    "virtual_waits",
    "virtual_expires",
];

/// A saga's 30-minute timer rings when the clock is moved 30 minutes, and
/// not before; a saga with a 20-minute time-out sleeping an hour is
/// compensated when the clock passes its time-out. In well under the real
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_time_wakes_a_sagas_timer_and_times_another_out() {
    let started = std::time::Instant::now();
    let kit = TestKit::with(virtual_kit(TRIP_HANDLERS, Duration::from_millis(20)))
        .await
        .expect("kit")
        .settle_within(Duration::from_secs(2));
    // Two hours on already: what the sagas journal and compare is the
    // kit's time, not the system's (a time-out reckoned from the system's
    // clock would have passed at once).
    kit.advance(Duration::from_secs(2 * 3600));
    let before = kit.now();
    kit.client()
        .publish_durable(VirtualBooked { trip: 1 })
        .await
        .expect("published");
    kit.client()
        .publish_durable(VirtualExpiring { trip: 2 })
        .await
        .expect("published");
    let waiting = kit.settled().await.expect_err("both sagas sleep");
    assert!(waiting.message().contains("due in"), "{waiting}");
    assert_eq!(trip(1), ["hold"]);
    assert_eq!(trip(2), ["hold"]);

    // 25 minutes: the payment window is still open; the time-out passed.
    kit.advance(Duration::from_secs(25 * 60));
    assert!(kit.now() >= before + Duration::from_secs(25 * 60));
    let waiting = kit.settled().await.expect_err("trip 1 still sleeps");
    assert!(
        waiting.message().contains("tests.kit.virtual.booked"),
        "{waiting}"
    );
    assert_eq!(trip(1), ["hold"], "not woken early");
    assert_eq!(trip(2), ["hold", "unhold"], "timed out, compensated");

    // 5 more: the window closes, trip 1 is confirmed.
    kit.advance(Duration::from_secs(5 * 60));
    kit.settled().await.expect("settled");
    assert_eq!(trip(1), ["hold", "confirm"]);
    assert_eq!(trip(2), ["hold", "unhold"], "nothing more");
    let sagas = kit.sagas().await.expect("sagas");
    let status = |name: &str| {
        sagas
            .iter()
            .find(|s| s.id.contains(name))
            .map(|s| s.status)
            .unwrap_or_else(|| panic!("no saga {name}: {sagas:?}"))
    };
    assert_eq!(status("virtual_waits"), SagaStatus::Completed);
    assert_eq!(status("virtual_expires"), SagaStatus::Compensated);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "90 minutes of saga time took {:?}",
        started.elapsed()
    );
    kit.shutdown().await.expect("clean shutdown");
}

/// Publishes [`VirtualReminded`] a day later.
#[command(subject = "tests.kit.virtual.remind")]
#[derive(Serialize, Deserialize, Debug)]
pub struct VirtualRemind {
    /// Which reminder.
    pub n: u64,
}

/// A reminder, a day after.
#[event(subject = "tests.kit.virtual.reminded")]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VirtualReminded {
    /// Which reminder.
    pub n: u64,
}

static VIRTUAL_REMINDED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[command]
async fn virtual_remind(ctx: &Context, r: VirtualRemind) -> Result<()> {
    ctx.publish_after(Duration::from_secs(86_400), VirtualReminded { n: r.n })
        .await?;
    Ok(())
}

#[event(durable = "kit-virtual-reminded")]
async fn virtual_reminded(r: VirtualReminded) -> Result<()> {
    VIRTUAL_REMINDED.lock().expect("reminded").push(r.n);
    Ok(())
}

/// A flaky durable event: its first delivery fails, and the kit's retry
/// back-off (from 20 s) holds it back.
#[event(subject = "tests.kit.virtual.flaky")]
#[derive(Serialize, Deserialize, Debug)]
pub struct VirtualFlaky;

static FLAKY: AtomicU64 = AtomicU64::new(0);

#[event(durable = "kit-virtual-flaky")]
async fn virtual_flaky(_f: VirtualFlaky) -> Result<()> {
    if FLAKY.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(Error::unavailable("later"));
    }
    Ok(())
}

/// Runs every hour, counting its occurrences by their time.
static VIRTUAL_HOURS: Mutex<BTreeMap<SystemTime, u32>> = Mutex::new(BTreeMap::new());

#[job(every = "1h")]
async fn virtual_hourly(ctx: &Context) -> Result<()> {
    let at = ctx
        .scheduled_at()
        .ok_or_else(|| Error::invalid("an occurrence without its time"))?;
    *VIRTUAL_HOURS.lock().expect("hours").entry(at).or_default() += 1;
    Ok(())
}

/// A delayed message due tomorrow and a retry held back by its back-off
/// come when the clock is moved past them, not before; the delay is
/// reckoned from the kit's clock (moved five days first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_time_brings_delayed_messages_and_retries() {
    let kit = TestKit::with(virtual_kit(
        &["virtual_remind", "virtual_reminded", "virtual_flaky"],
        Duration::from_secs(20),
    ))
    .await
    .expect("kit")
    .settle_within(Duration::from_secs(2));
    kit.advance(Duration::from_secs(5 * 86_400));
    kit.client().send(VirtualRemind { n: 7 }).await.expect("sent");
    kit.client()
        .publish_durable(VirtualFlaky)
        .await
        .expect("published");
    let left = kit.settled().await.expect_err("the retry waits 20 s or more");
    assert!(left.message().contains("kit-virtual-flaky"), "{left}");
    assert_eq!(FLAKY.load(Ordering::SeqCst), 1);
    assert!(VIRTUAL_REMINDED.lock().expect("reminded").is_empty());
    let waiting = kit.delayed().await.expect("listed");
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0].due > kit.now() + Duration::from_secs(23 * 3600),
        "due a day after the kit's now: {waiting:?}"
    );

    kit.advance(Duration::from_secs(120));
    kit.settled()
        .await
        .expect("the retry came, the reminder is not due");
    assert_eq!(FLAKY.load(Ordering::SeqCst), 2);
    assert!(VIRTUAL_REMINDED.lock().expect("reminded").is_empty());

    kit.advance(Duration::from_secs(86_400));
    kit.settled().await.expect("settled");
    assert_eq!(*VIRTUAL_REMINDED.lock().expect("reminded"), [7]);
    assert!(kit.delayed().await.expect("listed").is_empty());
    kit.shutdown().await.expect("clean shutdown");
}

/// An hourly job runs its occurrence when the clock is moved past the
/// hour; moved three hours at once, it runs the newest missed occurrence
/// once, as after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_time_runs_a_jobs_occurrences() {
    let kit = TestKit::with(virtual_kit(&["virtual_hourly"], Duration::from_millis(20)))
        .await
        .expect("kit");
    let hour = Duration::from_secs(3600);
    let hours = || VIRTUAL_HOURS.lock().expect("hours").clone();
    let wait_for = |n: usize| {
        let kit = &kit;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while hours().len() < n && std::time::Instant::now() < deadline {
                kit.settled().await.expect("settled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            kit.settled().await.expect("settled");
        }
    };
    // Just past the next hour.
    let since_epoch = kit
        .now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let to_next = hour - Duration::from_secs(since_epoch.as_secs() % 3600);
    kit.advance(to_next + Duration::from_secs(2));
    wait_for(1).await;
    let first = hours();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first.values().all(|n| *n == 1), "{first:?}");

    kit.advance(3 * hour);
    wait_for(2).await;
    let after = hours();
    assert_eq!(after.len(), 2, "{after:?}");
    let (last, n) = after
        .iter()
        .next_back()
        .map(|(t, n)| (*t, *n))
        .expect("an occurrence");
    assert_eq!(n, 1);
    let first_at = *first.keys().next().expect("first");
    assert_eq!(last.duration_since(first_at).ok(), Some(3 * hour), "{after:?}");
    kit.shutdown().await.expect("clean shutdown");
}
