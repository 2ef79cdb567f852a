//! The test kit (`catga::testing`): what a user's test sees. A command
//! whose save publishes an event through the outbox, a saga that event
//! starts, a durable handler that succeeds on its third delivery, one
//! whose messages are dead-lettered: after `settled()`, every effect is
//! there to assert on, without polling. And `settled()` fails, saying
//! what is left, when a saga sleeps past its time-out. Delayed messages
//! due soon are waited for, later ones released on demand; a job runs on
//! demand.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use catga::testing::{SentAs, TestKit};
use catga::{Context, Error, Result, Runtime, Saga, SagaStatus, State, Versioned, command, event, job, saga};
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

static POKES: AtomicU64 = AtomicU64::new(0);

#[event(durable = "kit-pokes")]
async fn poked(_p: Poke) -> Result<()> {
    if POKES.fetch_add(1, Ordering::SeqCst) < 2 {
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

static NOTES: AtomicU64 = AtomicU64::new(0);

#[event]
async fn note(n: Noted) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    NOTES.fetch_add(n.n, Ordering::SeqCst);
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

static LEDGER: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[saga(key = account, partitions = 4)]
async fn ledger(_saga: &Saga, e: Posted) -> Result<()> {
    LEDGER
        .lock()
        .expect("ledger")
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
    Runtime::builder()
        .service("kit")
        .retry_base(Duration::from_millis(20))
        .handlers(move |s| s.name().starts_with("testkit::") && !except.iter().any(|e| s.name().ends_with(e)))
}

/// A command, its outbox event and the saga it starts, each step
/// recorded with its cause; one saga completes, one is compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_event_and_saga_settle_and_are_recorded() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
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
    kit.client().publish_durable(Poke).await.expect("published");
    kit.client()
        .publish_durable(Poison { n: 7 })
        .await
        .expect("published");
    kit.settled().await.expect("settled");
    assert_eq!(
        POKES.load(Ordering::SeqCst),
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
    let kit = TestKit::with(kit_handlers(&[]))
        .await
        .expect("kit")
        .settle_within(Duration::from_secs(2));
    kit.client().publish_durable(Doze).await.expect("published");
    let err = kit
        .settled()
        .await
        .expect_err("a minute's sleep is not settled in 500 ms");
    assert_eq!(err.kind(), catga::ErrorKind::Timeout, "{err}");
    assert!(
        err.message().contains("tests.kit.doze") && err.message().contains("due in"),
        "names the consumer and when it is due: {err}"
    );
    let _ = kit.shutdown().await;
}

/// A core event handler still running is waited for, not only durable
/// consumers' backlogs; and a keyed saga's triggers, routed by a router
/// that binds its consumer in a task of its own, have all run, in each
/// key's order, once `settled()` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_handlers_and_keyed_sagas_settle() {
    let kit = TestKit::with(kit_handlers(&["::dozing"])).await.expect("kit");
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
        NOTES.load(Ordering::SeqCst),
        5,
        "the core handler finished before settled() returned"
    );
    let ledger = LEDGER.lock().expect("ledger").clone();
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
