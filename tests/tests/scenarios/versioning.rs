//! Message versions: a type that changed its shape reads what replicas of
//! the release before still send (`version = 2, upcast_from = V1`), for
//! commands, durable events and keyed sagas' keys; what the older shape
//! cannot read is refused with a 400 naming both types; a version newer
//! than the handler knows is refused as before.

use std::collections::BTreeMap;
use std::sync::Mutex;

use catga::{ErrorKind, Result, Runtime, Saga, command, event, saga};
use catga_tests::{Backend, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Release 1 of a command: what old replicas still send.
#[command(subject = "tests.ver.order", reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct OrderV1 {
    /// What.
    pub item: String,
}

/// Release 2: a quantity, 1 for orders of release 1.
#[command(subject = "tests.ver.order", reply = String, version = 2, upcast_from = OrderV1)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Order {
    /// What.
    pub item: String,
    /// How many.
    pub qty: u32,
}

impl From<OrderV1> for Order {
    fn from(v1: OrderV1) -> Order {
        Order {
            item: v1.item,
            qty: 1,
        }
    }
}

/// Release 3 of the same command, which release 2 does not know.
#[command(subject = "tests.ver.order", reply = String, version = 3)]
#[derive(Serialize, Deserialize, Debug)]
pub struct OrderV3 {
    /// What.
    pub item: String,
    /// How many.
    pub qty: u32,
    /// Gift-wrapped.
    pub wrap: bool,
}

#[command]
async fn order(o: Order) -> Result<String> {
    Ok(format!("{} x{}", o.item, o.qty))
}

/// Release 1 of an event.
#[event(subject = "tests.ver.paid")]
#[derive(Serialize, Deserialize, Debug)]
pub struct PaidV1 {
    /// Which run.
    pub run: String,
    /// Whose.
    pub account: String,
    /// How much, in whole euros.
    pub euros: u64,
}

/// Release 2: cents.
#[event(subject = "tests.ver.paid", version = 2, upcast_from = PaidV1)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Paid {
    /// Which run.
    pub run: String,
    /// Whose.
    pub account: String,
    /// How much.
    pub cents: u64,
}

impl From<PaidV1> for Paid {
    fn from(v1: PaidV1) -> Paid {
        Paid {
            run: v1.run,
            account: v1.account,
            cents: v1.euros * 100,
        }
    }
}

/// (run, account) -> the cents paid, in order.
static PAID: Mutex<BTreeMap<(String, String), Vec<u64>>> = Mutex::new(BTreeMap::new());
/// (run, account) -> the cents booked by the keyed saga, in order.
static BOOKED: Mutex<BTreeMap<(String, String), Vec<u64>>> = Mutex::new(BTreeMap::new());

#[event(durable = "ver-paid")]
async fn on_paid(p: Paid) -> Result<()> {
    PAID.lock()
        .expect("paid")
        .entry((p.run, p.account))
        .or_default()
        .push(p.cents);
    Ok(())
}

#[saga(key = account, partitions = 4)]
async fn book(_saga: &Saga, p: Paid) -> Result<()> {
    BOOKED
        .lock()
        .expect("booked")
        .entry((p.run, p.account))
        .or_default()
        .push(p.cents);
    Ok(())
}

/// Release 3 of the event, which release 2 does not know.
#[event(subject = "tests.ver.paid", version = 3)]
#[derive(Serialize, Deserialize, Debug)]
pub struct PaidV3 {
    /// Which run.
    pub run: String,
    /// Whose.
    pub account: String,
    /// How much.
    pub cents: u64,
    /// In which currency.
    pub currency: String,
}

/// A saga step.
#[command(subject = "tests.ver.hold", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Hold {
    /// Which run.
    pub run: String,
}

/// Release 1 of [`Unhold`].
#[derive(Deserialize, Debug)]
pub struct UnholdV1 {
    /// Which run.
    pub run: String,
    /// How much, in whole euros.
    pub euros: u64,
}

/// Undoes [`Hold`]: release 2, in cents.
#[command(subject = "tests.ver.unhold", idempotent, version = 2, upcast_from = UnholdV1)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Unhold {
    /// Which run.
    pub run: String,
    /// How much.
    pub cents: u64,
}

impl From<UnholdV1> for Unhold {
    fn from(v1: UnholdV1) -> Unhold {
        Unhold {
            run: v1.run,
            cents: v1.euros * 100,
        }
    }
}

/// A step that fails for good.
#[command(subject = "tests.ver.refuse", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Refuse {
    /// Which run.
    pub run: String,
}

/// Starts [`holding`].
#[event(subject = "tests.ver.booked")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Booked {
    /// Which run.
    pub run: String,
}

/// run -> the cents released.
static UNHELD: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[command]
async fn hold(_h: Hold) -> Result<()> {
    Ok(())
}

#[command]
async fn unhold(u: Unhold) -> Result<()> {
    UNHELD
        .lock()
        .expect("unheld")
        .entry(u.run)
        .or_default()
        .push(u.cents);
    Ok(())
}

#[command]
async fn refuse(_r: Refuse) -> Result<()> {
    Err(catga::Error::invalid("no"))
}

#[saga]
async fn holding(saga: &Saga, b: Booked) -> Result<()> {
    saga.step("hold", Hold { run: b.run.clone() })
        .compensate(Unhold {
            run: b.run.clone(),
            cents: 250,
        })
        .await?;
    saga.step("refuse", Refuse { run: b.run }).await?;
    Ok(())
}

catga_tests::on_both!(
    older_commands_are_upcast_and_newer_ones_refused,
    older_events_are_upcast_for_handlers_and_keyed_sagas,
    a_compensation_goes_out_under_its_own_version
);

async fn replica(b: &Backend) -> Runtime {
    b.started(b.builder(module_path!(), "r1")).await
}

async fn older_commands_are_upcast_and_newer_ones_refused(b: &Backend) {
    let rt = replica(b).await;
    let client = b.client().await;
    assert_eq!(
        client
            .send(OrderV1 { item: "apple".into() })
            .await
            .expect("v1 upcast"),
        "apple x1"
    );
    assert_eq!(
        client
            .send(Order {
                item: "pear".into(),
                qty: 3
            })
            .await
            .expect("v2"),
        "pear x3"
    );
    // No version header (release 1), but not readable as release 1's
    // shape: refused, naming both types.
    let bad = client
        .send_raw("tests.ver.order", bytes::Bytes::from_static(br#"{"sku":"x"}"#))
        .await
        .expect_err("unreadable as OrderV1");
    assert_eq!(bad.kind(), ErrorKind::Decode, "{bad}");
    assert!(
        bad.message()
            .contains("Order (an older version, read as OrderV1)"),
        "names both types: {bad}"
    );
    let newer = client
        .send(OrderV3 {
            item: "fig".into(),
            qty: 1,
            wrap: true,
        })
        .await
        .expect_err("release 2 does not know version 3");
    assert_eq!(newer.kind(), ErrorKind::Invalid, "{newer}");
    assert!(newer.message().contains("version"), "{newer}");
    rt.shutdown().await.expect("clean shutdown");
}

async fn older_events_are_upcast_for_handlers_and_keyed_sagas(b: &Backend) {
    let rt = replica(b).await;
    let client = b.client().await;
    let run = run_id();
    // Old and new replicas publish side by side: each account's payments
    // in order, whichever release sent them.
    for i in 0..6u64 {
        for account in ["a", "b"] {
            if i % 2 == 0 {
                client
                    .publish_durable(PaidV1 {
                        run: run.clone(),
                        account: account.into(),
                        euros: i,
                    })
                    .await
                    .expect("v1 published");
            } else {
                client
                    .publish_durable(Paid {
                        run: run.clone(),
                        account: account.into(),
                        cents: i * 100,
                    })
                    .await
                    .expect("v2 published");
            }
        }
    }
    let want: Vec<u64> = (0..6).map(|i| i * 100).collect();
    catga_tests::until("every payment handled and booked", WAIT * 2, || {
        let paid = PAID.lock().expect("paid");
        let booked = BOOKED.lock().expect("booked");
        ["a", "b"].iter().all(|a| {
            let key = (run.clone(), (*a).to_owned());
            paid.get(&key).is_some_and(|p| p.len() == 6) && booked.get(&key).is_some_and(|p| p.len() == 6)
        })
    })
    .await;
    for account in ["a", "b"] {
        let key = (run.clone(), account.to_owned());
        let mut paid = PAID.lock().expect("paid")[&key].clone();
        paid.sort_unstable();
        assert_eq!(paid, want, "{account}: every payment once, in cents");
        assert_eq!(
            BOOKED.lock().expect("booked")[&key],
            want,
            "{account}: the keyed saga read each key, in order"
        );
    }
    assert!(rt.dead_letters().list(0, 100).await.expect("letters").is_empty());
    // A release newer than this one: refused by the durable handler and
    // by the keyed saga's router (before it reads the key), each a dead
    // letter that names the version.
    client
        .publish_durable(PaidV3 {
            run: run.clone(),
            account: "a".into(),
            cents: 1,
            currency: "EUR".into(),
        })
        .await
        .expect("v3 published");
    let started = std::time::Instant::now();
    let letters = loop {
        let letters = rt.dead_letters().list(0, 100).await.expect("letters");
        if letters.len() >= 2 {
            break letters;
        }
        assert!(
            started.elapsed() < WAIT,
            "not both refusals dead-lettered: {letters:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), 2, "{letters:?}");
    for l in &letters {
        assert_eq!(l.error_kind, ErrorKind::Invalid, "{l:?}");
        assert!(l.error.contains("unknown version \"3\""), "{}", l.error);
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// A compensation of a versioned type goes out under the version it was
/// encoded at, so the handler reads it as it is, not as release 1's shape.
async fn a_compensation_goes_out_under_its_own_version(b: &Backend) {
    let rt = replica(b).await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(Booked { run: run.clone() })
        .await
        .expect("published");
    catga_tests::until("the hold released", WAIT, || {
        UNHELD
            .lock()
            .expect("unheld")
            .get(&run)
            .is_some_and(|u| !u.is_empty())
    })
    .await;
    assert_eq!(
        UNHELD.lock().expect("unheld")[&run],
        [250],
        "read as version 2, in cents"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// Release 1 of [`Charge`].
#[derive(Deserialize, Debug)]
pub struct ChargeV1 {
    /// Which run.
    pub run: String,
    /// How much, in whole euros.
    pub euros: u64,
}

/// A saga step at version 2.
#[command(subject = "tests.ver.charge", idempotent, version = 2, upcast_from = ChargeV1)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Charge {
    /// Which run.
    pub run: String,
    /// How much.
    pub cents: u64,
}

impl From<ChargeV1> for Charge {
    fn from(v1: ChargeV1) -> Charge {
        Charge {
            run: v1.run,
            cents: v1.euros * 100,
        }
    }
}

/// Starts [`charging`].
#[event(subject = "tests.ver.ordered")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Ordered {
    /// Which run.
    pub run: String,
}

/// Runs whose charge may go through; until then it fails retryably.
static CHARGE_OPEN: Mutex<std::collections::BTreeSet<String>> = Mutex::new(std::collections::BTreeSet::new());
/// run -> the cents charged.
static CHARGED: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[command]
async fn charge(c: Charge) -> Result<()> {
    if !CHARGE_OPEN.lock().expect("open").contains(&c.run) {
        return Err(catga::Error::unavailable("not yet"));
    }
    CHARGED
        .lock()
        .expect("charged")
        .entry(c.run)
        .or_default()
        .push(c.cents);
    Ok(())
}

#[saga]
async fn charging(saga: &Saga, o: Ordered) -> Result<()> {
    saga.step(
        "charge",
        Charge {
            run: o.run,
            cents: 250,
        },
    )
    .await?;
    Ok(())
}

/// A saga journaled by a release before versions were journaled (its
/// step's `pv:` field missing) resumes as that release sent the step: at
/// the command's version now, read as it is, not as release 1's shape.
/// The step has no handler at first, so the saga stops after journaling
/// it and resumes from the journal in the store once one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_without_versions_resumes_as_the_release_before_sent_it() {
    let b = Backend::nats();
    let Backend::Nats(_, redis) = &b else {
        unreachable!("nats backend")
    };
    let mut con = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let sagas = b
        .started(
            b.builder(module_path!(), "sagas")
                .handlers(|s| s.name().ends_with("::charging"))
                .request_timeout(std::time::Duration::from_millis(300))
                .retry_base(std::time::Duration::from_millis(20)),
        )
        .await;
    let run = run_id();
    CHARGE_OPEN.lock().expect("open").insert(run.clone());
    let trigger = format!("order-{run}");
    b.client()
        .await
        .publish_durable_with_id(Ordered { run: run.clone() }, &trigger)
        .await
        .expect("published");
    // The step was journaled (payload and version); nothing answers it.
    let journal = format!("catga:{{catga-tests}}:saga:charging:{trigger}");
    let started = std::time::Instant::now();
    loop {
        let version: Option<String> = redis::cmd("HGET")
            .arg(&journal)
            .arg("pv:charge")
            .query_async(&mut con)
            .await
            .expect("HGET");
        if version.is_some() {
            assert_eq!(version.as_deref(), Some("2"), "journaled at version 2");
            break;
        }
        assert!(started.elapsed() < WAIT, "the step's version was never journaled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // As the release before would have left it: no version.
    let removed: u64 = redis::cmd("HDEL")
        .arg(&journal)
        .arg("pv:charge")
        .query_async(&mut con)
        .await
        .expect("HDEL");
    assert_eq!(removed, 1);
    let charges = b
        .started(
            b.builder(module_path!(), "charges")
                .handlers(|s| s.name().ends_with("::charge")),
        )
        .await;
    catga_tests::until("the resumed step charged", WAIT, || {
        CHARGED.lock().expect("charged").contains_key(&run)
    })
    .await;
    assert_eq!(
        CHARGED.lock().expect("charged")[&run],
        [250],
        "read as version 2, in cents"
    );
    catga_tests::backend::shutdown_all(vec![charges, sagas]).await;
}
