//! Sagas (`Context::saga`) on a leader-only durable event handler: each
//! step once, compensations newest first when a step fails for good, a
//! saga resumed from its journal after a retryable failure, and a saga
//! whose code panics compensated.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use catga::{
    Context, Error, Result, Runtime, Saga, SagaInfo, SagaOutcome, SagaStatus, SagaStepInfo, command, event,
    saga,
};
use catga_tests::{Backend, Tally, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Step 1.
#[command(reply = u64, subject = "tests.saga.reserve", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Reserve {
    pub run: String,
}

/// Undoes step 1.
#[command(subject = "tests.saga.release", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Release {
    pub run: String,
}

/// Step 2: declined on demand (400, for good).
#[command(subject = "tests.saga.charge", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Charge {
    pub run: String,
    pub decline: bool,
}

/// Undoes step 2.
#[command(subject = "tests.saga.refund", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Refund {
    pub run: String,
}

/// Step 3.
#[command(subject = "tests.saga.ship", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Ship {
    pub run: String,
    pub stale_once: bool,
}

static STALE_SHIPS: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Starts a saga.
#[event(subject = "tests.saga.placed")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Placed {
    pub run: String,
    pub decline: bool,
    /// Fail retryably once, after step 1.
    pub hiccup: bool,
    /// Panic after step 1.
    pub panic: bool,
    /// The shipping replica answers "stale" (retryable) once.
    pub stale_ship: bool,
}

/// Effects, per `run:operation`; saga runs, per `run:runs`.
static EFFECTS: Tally = Tally::new();
static HICCUPS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static OUTCOMES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn effect(run: &str, op: &str) {
    EFFECTS.add(&format!("{run}:{op}"));
}

#[command]
async fn reserve(r: Reserve) -> Result<u64> {
    effect(&r.run, "reserve");
    Ok(7)
}

#[command]
async fn release(r: Release) -> Result<()> {
    effect(&r.run, "release");
    Ok(())
}

#[command]
async fn charge(c: Charge) -> Result<()> {
    effect(&c.run, "charge");
    if c.decline {
        return Err(Error::invalid("payment declined"));
    }
    Ok(())
}

#[command]
async fn refund(r: Refund) -> Result<()> {
    effect(&r.run, "refund");
    Ok(())
}

#[command]
async fn ship(s: Ship) -> Result<()> {
    let first = STALE_SHIPS
        .lock()
        .expect("stale ships")
        .get_or_insert_with(HashSet::new)
        .insert(s.run.clone());
    if s.stale_once && first {
        return Err(Error::stale("the shipment changed meanwhile"));
    }
    effect(&s.run, "ship");
    Ok(())
}

#[event(durable = "fulfil", leader)]
async fn fulfil(ctx: &Context, p: Placed) -> Result<()> {
    let run = p.run.clone();
    let outcome = ctx
        .saga(|saga| async move {
            effect(&p.run, "runs");
            let hold = saga
                .step("reserve", Reserve { run: p.run.clone() })
                .compensate(Release { run: p.run.clone() })
                .await?;
            assert_eq!(hold, 7, "the step's answer, journaled or not");
            let first = HICCUPS
                .lock()
                .expect("hiccups")
                .get_or_insert_with(HashSet::new)
                .insert(p.run.clone());
            if p.hiccup && first {
                return Err(Error::unavailable("a hiccup after the first step"));
            }
            if p.panic {
                panic!("the saga's own code failed");
            }
            saga.step(
                "charge",
                Charge {
                    run: p.run.clone(),
                    decline: p.decline,
                },
            )
            .compensate(Refund { run: p.run.clone() })
            .await?;
            saga.step(
                "ship",
                Ship {
                    run: p.run.clone(),
                    stale_once: p.stale_ship,
                },
            )
            .await?;
            Ok(())
        })
        .await?;
    let outcome = match outcome {
        SagaOutcome::Completed(()) => "completed".to_owned(),
        SagaOutcome::Compensated { cause } => format!("compensated: {}", cause.message()),
        SagaOutcome::Ended(status) => format!("ended: {status:?}"),
    };
    OUTCOMES.lock().expect("outcomes").push((run, outcome));
    Ok(())
}

/// Starts the saga written with `#[saga]`.
#[event(subject = "tests.saga.quick")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Quick {
    pub run: String,
    pub decline: bool,
}

/// The same saga, with the attribute: a leader-only durable consumer of
/// `Quick` named `quick`.
#[saga(leader)]
async fn quick(saga: &Saga, q: Quick) -> Result<()> {
    saga.step("reserve", Reserve { run: q.run.clone() })
        .compensate(Release { run: q.run.clone() })
        .await?;
    saga.step(
        "charge",
        Charge {
            run: q.run.clone(),
            decline: q.decline,
        },
    )
    .compensate(Refund { run: q.run.clone() })
    .await?;
    effect(&q.run, "runs");
    Ok(())
}

/// Starts a saga that runs longer than its consumer's ack wait.
#[event(subject = "tests.saga.slow")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Slow {
    pub run: String,
}

static RUNNING: catga_tests::Gauge = catga_tests::Gauge::new();

#[saga(leader)]
async fn slow(saga: &Saga, s: Slow) -> Result<()> {
    RUNNING.enter(&s.run);
    effect(&s.run, "runs");
    let reserved = saga.step("reserve", Reserve { run: s.run.clone() }).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    RUNNING.leave(&s.run);
    reserved.map(|_| ())
}

/// A step that outlives its saga's patience on the first try.
#[command(reply = u64, subject = "tests.saga.stamp", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct StampStep {
    pub run: String,
    /// Differs on every run of the saga (a clock reading, say).
    pub nonce: u64,
}

/// Starts `stamped`.
#[event(subject = "tests.saga.stamped")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Stamped {
    pub run: String,
}

static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[command]
async fn stamp_step(s: StampStep) -> Result<u64> {
    let first = EFFECTS.get(&format!("{}:stamp", s.run)) == 0;
    effect(&s.run, "stamp");
    if first {
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    Ok(s.nonce)
}

#[saga(leader)]
async fn stamped(saga: &Saga, e: Stamped) -> Result<()> {
    effect(&e.run, "runs");
    let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    saga.step(
        "stamp",
        StampStep {
            run: e.run.clone(),
            nonce,
        },
    )
    .timeout(Duration::from_millis(300))
    .compensate(Release { run: e.run.clone() })
    .await?;
    Ok(())
}

catga_tests::on_every_store!(
    a_resumed_step_sends_what_it_sent_first,
    one_run_of_a_saga_at_a_time_however_long_it_runs,
    the_saga_attribute_runs_a_saga,
    a_saga_takes_each_step_once,
    a_step_that_fails_for_good_compensates_the_steps_before,
    a_saga_resumes_from_its_journal,
    a_step_that_fails_retryably_is_resumed,
    a_panicking_saga_is_compensated,
    a_trigger_under_a_long_id_runs_every_step
);

async fn the_saga_attribute_runs_a_saga(b: &Backend) {
    let rt = leader(b).await;
    let client = b.client().await;
    let (done, declined) = (run_id(), run_id());
    for (run, decline) in [(&done, false), (&declined, true)] {
        client
            .publish_durable(Quick {
                run: run.clone(),
                decline,
            })
            .await
            .expect("published");
    }
    let started = Instant::now();
    // Completed: reserve and charge once. Declined: reserve, the charge
    // that failed, the release; the saga function ended there.
    while effects(&done)[..2] != [1, 1] || effects(&declined)[3] != 1 {
        assert!(
            started.elapsed() < WAIT,
            "sagas not done: {:?} {:?}",
            effects(&done),
            effects(&declined)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(effects(&done), [1, 1, 0, 0, 0, 1]);
    assert_eq!(effects(&declined), [1, 1, 0, 1, 0, 0]);
    rt.shutdown().await.expect("clean shutdown");
}

/// A trigger under a 250-character id (valid: up to 256): the saga's id
/// and its steps' ids derived from it would be longer than an id may be;
/// they are shortened with a hash, and every step runs. Before, both
/// sagas of the example ended compensated without running a step.
async fn a_trigger_under_a_long_id_runs_every_step(b: &Backend) {
    let rt = leader(b).await;
    let client = b.client().await;
    let run = run_id();
    let id = format!("{run}-{}", "x".repeat(250 - run.len() - 1));
    assert_eq!(id.len(), 250);
    client
        .publish_with_id(
            Quick {
                run: run.clone(),
                decline: false,
            },
            &id,
        )
        .await
        .expect("published");
    let started = Instant::now();
    while effects(&run)[..2] != [1, 1] || effects(&run)[5] != 1 {
        assert!(started.elapsed() < WAIT, "saga not done: {:?}", effects(&run));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        effects(&run),
        [1, 1, 0, 0, 0, 1],
        "each step once, nothing compensated"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A leader saga running three times its consumer's ack wait: progress
/// acks keep its trigger, so it is not delivered again while it runs, and
/// a run claim would hold a second delivery back anyway. Before, only
/// keyed sagas' partitions sent progress acks: the trigger came back to
/// the same leader under the same token and two runs interleaved.
async fn one_run_of_a_saga_at_a_time_however_long_it_runs(b: &Backend) {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .leader_lease(Duration::from_millis(300))
                .durable_defaults(Duration::from_millis(600), 5),
        )
        .await;
    let started = Instant::now();
    while !(rt.is_leader() && rt.serving().await.iter().any(|h| h.ends_with("::slow")) && rt.is_ready()) {
        assert!(started.elapsed() < WAIT, "the slow saga is not served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(Slow { run: run.clone() })
        .await
        .expect("published");
    let started = Instant::now();
    while RUNNING.now(&run) == 0 && effects(&run)[5] == 0 {
        assert!(started.elapsed() < WAIT, "the saga never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(RUNNING.max(&run), 1, "never two runs at once");
    assert_eq!(effects(&run)[5], 1, "one run");
    assert_eq!(effects(&run)[0], 1, "its step once");
    rt.shutdown().await.expect("clean shutdown");
}

/// A step whose command carries something different on every run of the
/// saga times out the first time (its command did run, and answered);
/// the saga resumes and sends the step again: exactly the payload it
/// first sent (journaled), so the step's inbox gives the first answer,
/// not a conflict, and the saga completes without compensating.
async fn a_resumed_step_sends_what_it_sent_first(b: &Backend) {
    let rt = leader(b).await;
    let started = Instant::now();
    while !rt.serving().await.iter().any(|h| h.ends_with("::stamped")) {
        assert!(started.elapsed() < WAIT, "the stamped saga is not served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(Stamped { run: run.clone() })
        .await
        .expect("published");
    let started = Instant::now();
    while effects(&run)[5] < 2 || EFFECTS.get(&format!("{run}:stamp")) < 1 {
        assert!(started.elapsed() < WAIT, "not resumed: {:?}", effects(&run));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    loop {
        let sagas = rt.sagas(100).await.expect("sagas");
        let mine = sagas.iter().find(|s| s.id.starts_with("stamped:"));
        if mine.is_some_and(|s| s.status == SagaStatus::Completed) || started.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(EFFECTS.get(&format!("{run}:stamp")), 1, "the step ran once");
    assert_eq!(effects(&run)[3], 0, "nothing compensated");
    rt.shutdown().await.expect("clean shutdown");
}

/// One replica, leading, with the saga's consumer pulling.
async fn leader(b: &Backend) -> Runtime {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .leader_lease(Duration::from_millis(300))
                .retry_base(Duration::from_millis(20)),
        )
        .await;
    let started = Instant::now();
    while !(rt.is_leader()
        && rt
            .serving()
            .await
            .iter()
            .filter(|h| h.ends_with("::fulfil") || h.ends_with("::quick"))
            .count()
            == 2
        && rt.is_ready())
    {
        assert!(started.elapsed() < WAIT, "not leading");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt
}

/// Runs one saga to its end: its outcome and what `Runtime::sagas` says.
async fn outcome(b: &Backend, placed: Placed) -> (String, Vec<SagaInfo>) {
    let rt = leader(b).await;
    let run = placed.run.clone();
    b.client().await.publish_durable(placed).await.expect("published");
    let started = Instant::now();
    let outcome = loop {
        if let Some((_, o)) = OUTCOMES.lock().expect("outcomes").iter().find(|(r, _)| *r == run) {
            break o.clone();
        }
        assert!(started.elapsed() < WAIT, "the saga did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let sagas = rt.sagas(10).await.expect("sagas");
    rt.shutdown().await.expect("clean shutdown");
    (outcome, sagas)
}

fn step(name: &str, done: bool, compensation: Option<&str>) -> SagaStepInfo {
    SagaStepInfo {
        name: name.to_owned(),
        done,
        compensation: compensation.map(str::to_owned),
    }
}

fn effects(run: &str) -> [u64; 6] {
    ["reserve", "charge", "ship", "release", "refund", "runs"].map(|op| EFFECTS.get(&format!("{run}:{op}")))
}

fn placed(run: &str) -> Placed {
    Placed {
        run: run.to_owned(),
        decline: false,
        hiccup: false,
        panic: false,
        stale_ship: false,
    }
}

async fn a_saga_takes_each_step_once(b: &Backend) {
    let run = run_id();
    let (o, sagas) = outcome(b, placed(&run)).await;
    assert_eq!(o, "completed");
    // reserve, charge, ship once; no compensation; one run.
    assert_eq!(effects(&run), [1, 1, 1, 0, 0, 1]);
    let [saga] = &sagas[..] else {
        panic!("one saga: {sagas:?}")
    };
    assert_eq!(saga.status, SagaStatus::Completed);
    assert_eq!(
        saga.steps,
        [
            step("reserve", true, Some("pending")),
            step("charge", true, Some("pending")),
            step("ship", true, None)
        ]
    );
}

async fn a_step_that_fails_for_good_compensates_the_steps_before(b: &Backend) {
    let run = run_id();
    let (o, sagas) = outcome(
        b,
        Placed {
            decline: true,
            ..placed(&run)
        },
    )
    .await;
    assert!(
        o.starts_with("compensated") && o.contains("payment declined"),
        "{o}"
    );
    // The declined charge took no effect, so only the reservation is
    // released; nothing is shipped or refunded.
    assert_eq!(effects(&run), [1, 1, 0, 1, 0, 1]);
    let [saga] = &sagas[..] else {
        panic!("one saga: {sagas:?}")
    };
    assert_eq!(saga.status, SagaStatus::Compensated);
    assert_eq!(
        saga.steps,
        [
            step("reserve", true, Some("sent")),
            step("charge", false, Some("not run"))
        ]
    );
    assert!(
        saga.error
            .as_deref()
            .is_some_and(|e| e.contains("payment declined")),
        "{saga:?}"
    );
}

async fn a_saga_resumes_from_its_journal(b: &Backend) {
    let run = run_id();
    let (o, _) = outcome(
        b,
        Placed {
            hiccup: true,
            ..placed(&run)
        },
    )
    .await;
    assert_eq!(o, "completed");
    // Two runs of the saga function; each step took effect once.
    assert_eq!(effects(&run), [1, 1, 1, 0, 0, 2]);
}

/// A step's command answers with a retryable error (stale): the saga's
/// handler fails retryably, its trigger comes back, and the saga resumes
/// and completes (not dead-lettered, not compensated).
async fn a_step_that_fails_retryably_is_resumed(b: &Backend) {
    let run = run_id();
    let (o, _) = outcome(
        b,
        Placed {
            stale_ship: true,
            ..placed(&run)
        },
    )
    .await;
    assert_eq!(o, "completed");
    assert_eq!(effects(&run), [1, 1, 1, 0, 0, 2]);
}

async fn a_panicking_saga_is_compensated(b: &Backend) {
    let run = run_id();
    let (o, _) = outcome(
        b,
        Placed {
            panic: true,
            ..placed(&run)
        },
    )
    .await;
    assert!(o.starts_with("compensated") && o.contains("panicked"), "{o}");
    assert_eq!(effects(&run), [1, 0, 0, 1, 0, 1]);
}
