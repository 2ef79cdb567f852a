//! Time in sagas: a saga past its `timeout` is compensated (the step that
//! timed out too, since it may have run), a durable timer waits and the
//! saga resumes after it, and a retryable failure on the trigger's last
//! delivery compensates instead of dead-lettering a half-done saga.

use std::time::{Duration, Instant};

use catga::{Error, Result, Runtime, Saga, SagaStatus, command, event, saga};
use catga_tests::{Backend, Tally, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

static EFFECTS: Tally = Tally::new();

fn effect(run: &str, op: &str) {
    EFFECTS.add(&format!("{run}:{op}"));
}

fn effects(run: &str, ops: &[&str]) -> Vec<u64> {
    ops.iter().map(|op| EFFECTS.get(&format!("{run}:{op}"))).collect()
}

/// A step that answers at once.
#[command(subject = "tests.sagatime.hold", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Hold {
    pub run: String,
}

/// Undoes [`Hold`].
#[command(subject = "tests.sagatime.unhold", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Unhold {
    pub run: String,
}

/// A step that answers after `ms`, or fails retryably (`stale`).
#[command(subject = "tests.sagatime.slow", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Slow {
    pub run: String,
    pub ms: u64,
    pub stale: bool,
}

/// Undoes [`Slow`].
#[command(subject = "tests.sagatime.unslow", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Unslow {
    pub run: String,
}

#[command]
async fn hold(h: Hold) -> Result<()> {
    effect(&h.run, "hold");
    Ok(())
}

#[command]
async fn unhold(h: Unhold) -> Result<()> {
    effect(&h.run, "unhold");
    Ok(())
}

#[command]
async fn slow(s: Slow) -> Result<()> {
    if s.stale {
        effect(&s.run, "stale");
        return Err(Error::stale("the account changed meanwhile"));
    }
    tokio::time::sleep(Duration::from_millis(s.ms)).await;
    effect(&s.run, "slow");
    Ok(())
}

#[command]
async fn unslow(s: Unslow) -> Result<()> {
    effect(&s.run, "unslow");
    Ok(())
}

/// Triggers [`bounded`].
#[event(subject = "tests.sagatime.bounded")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Bounded {
    pub run: String,
    pub slow_ms: u64,
}

/// Must finish within a second.
#[saga(timeout = "1s")]
async fn bounded(saga: &Saga, e: Bounded) -> Result<()> {
    saga.step("hold", Hold { run: e.run.clone() })
        .compensate(Unhold { run: e.run.clone() })
        .await?;
    saga.step(
        "slow",
        Slow {
            run: e.run.clone(),
            ms: e.slow_ms,
            stale: false,
        },
    )
    .compensate(Unslow { run: e.run.clone() })
    .await?;
    effect(&e.run, "finished");
    Ok(())
}

/// Triggers [`cooled`].
#[event(subject = "tests.sagatime.cooled")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Cooled {
    pub run: String,
}

/// Holds, waits 1.5 s durably, then holds the slow step.
#[saga]
async fn cooled(saga: &Saga, e: Cooled) -> Result<()> {
    effect(&e.run, "runs");
    saga.step("hold", Hold { run: e.run.clone() }).await?;
    saga.sleep("cool-off", Duration::from_millis(1500)).await?;
    saga.step(
        "slow",
        Slow {
            run: e.run.clone(),
            ms: 0,
            stale: false,
        },
    )
    .await?;
    Ok(())
}

/// Triggers [`persistent`].
#[event(subject = "tests.sagatime.persistent")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Persistent {
    pub run: String,
}

/// Its second step always fails retryably; two deliveries only.
#[saga(max_deliver = 2)]
async fn persistent(saga: &Saga, e: Persistent) -> Result<()> {
    saga.step("hold", Hold { run: e.run.clone() })
        .compensate(Unhold { run: e.run.clone() })
        .await?;
    saga.step(
        "slow",
        Slow {
            run: e.run.clone(),
            ms: 0,
            stale: true,
        },
    )
    .compensate(Unslow { run: e.run.clone() })
    .await?;
    Ok(())
}

catga_tests::on_both_and_sharded!(
    a_saga_past_its_timeout_is_compensated,
    a_durable_timer_waits_and_the_saga_resumes,
    the_last_delivery_compensates_instead_of_dead_lettering
);

async fn replica(b: &Backend) -> Runtime {
    b.started(
        b.builder(module_path!(), "r1")
            .retry_base(Duration::from_millis(20))
            .durable_defaults(Duration::from_secs(30), 5),
    )
    .await
}

async fn until(what: &str, done: impl FnMut() -> bool) {
    catga_tests::until(what, WAIT, done).await;
}

async fn status(rt: &Runtime, want: SagaStatus) -> catga::SagaInfo {
    let started = Instant::now();
    loop {
        let sagas = rt.sagas(10).await.expect("sagas");
        if let Some(s) = sagas.iter().find(|s| s.status == want) {
            return s.clone();
        }
        assert!(started.elapsed() < WAIT, "no saga {want:?}: {sagas:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_saga_past_its_timeout_is_compensated(b: &Backend) {
    let rt = replica(b).await;
    let run = run_id();
    b.client()
        .await
        .publish_durable(Bounded {
            run: run.clone(),
            slow_ms: 3000,
        })
        .await
        .expect("published");
    // The slow step outlives the saga's second: both steps are
    // compensated (the slow one may have run), nothing finished.
    until("the compensations", || {
        effects(&run, &["unhold", "unslow"]) == [1, 1]
    })
    .await;
    let saga = status(&rt, SagaStatus::Compensated).await;
    assert!(
        saga.error.as_deref().is_some_and(|e| e.contains("time")),
        "the cause says it timed out: {saga:?}"
    );
    assert_eq!(effects(&run, &["hold", "finished"]), [1, 0]);
    rt.shutdown().await.expect("clean shutdown");
}

async fn a_durable_timer_waits_and_the_saga_resumes(b: &Backend) {
    let rt = replica(b).await;
    let run = run_id();
    let started = Instant::now();
    b.client()
        .await
        .publish_durable(Cooled { run: run.clone() })
        .await
        .expect("published");
    until("the first step", || effects(&run, &["hold"]) == [1]).await;
    until("the step after the timer", || effects(&run, &["slow"]) == [1]).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the timer held the saga for 1.5 s: {:?}",
        started.elapsed()
    );
    status(&rt, SagaStatus::Completed).await;
    // The trigger went back to the broker during the wait and the saga
    // ran again from its journal: each step once.
    assert_eq!(effects(&run, &["hold", "slow", "runs"]), [1, 1, 2]);
    rt.shutdown().await.expect("clean shutdown");
}

async fn the_last_delivery_compensates_instead_of_dead_lettering(b: &Backend) {
    let rt = replica(b).await;
    let run = run_id();
    b.client()
        .await
        .publish_durable(Persistent { run: run.clone() })
        .await
        .expect("published");
    let saga = status(&rt, SagaStatus::Compensated).await;
    // Two deliveries, each trying the failing step once; then the
    // compensations of both (the failing one's outcome is unknown).
    assert_eq!(
        effects(&run, &["hold", "stale", "unhold", "unslow"]),
        [1, 2, 1, 1]
    );
    assert!(
        saga.error
            .as_deref()
            .is_some_and(|e| e.contains("changed meanwhile")),
        "{saga:?}"
    );
    let dead = rt
        .client()
        .dead_letters()
        .list(0, 100)
        .await
        .expect("dead letters");
    assert!(
        dead.iter().all(|d| !d.handler.ends_with("::persistent")),
        "not dead-lettered: {dead:?}"
    );
    rt.shutdown().await.expect("clean shutdown");
}
