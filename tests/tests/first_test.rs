//! The first test a user writes from the README, on the embedded
//! transport: start a runtime, send a command at once; its handler
//! publishes an event that a saga consumes. `start()` returns when the
//! runtime can serve, so nothing sent right after it is lost. And the
//! README's first test, as written there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use catga::testing::TestKit;
use catga::{Context, Result, Runtime, Saga, command, event, saga};
use serde::{Deserialize, Serialize};

/// Places an order.
#[command(subject = "tests.first.place")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Place {
    /// Which one.
    pub n: u64,
}

/// An order was placed.
#[event(subject = "tests.first.placed")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Placed {
    /// Which one.
    pub n: u64,
}

static FULFILLED: AtomicU64 = AtomicU64::new(0);

#[command]
async fn place(ctx: &Context, p: Place) -> Result<()> {
    ctx.publish(Placed { n: p.n }).await
}

#[saga]
async fn fulfil(saga: &Saga, _p: Placed) -> Result<()> {
    let _ = saga;
    FULFILLED.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn a_command_sent_right_after_start_reaches_the_saga() {
    let rt = Runtime::builder()
        .handlers(|s| s.name().starts_with("first_test::"))
        .start()
        .await
        .expect("starts");
    rt.client().send(Place { n: 1 }).await.expect("placed");
    catga_tests::until("the saga ran", Duration::from_secs(10), || {
        FULFILLED.load(Ordering::SeqCst) == 1
    })
    .await;
    rt.shutdown().await.expect("clean shutdown");
}

/// A job only the leader does, from a durable consumer.
#[event(subject = "tests.first.job")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Job;

static JOBS: AtomicU64 = AtomicU64::new(0);

#[event(durable = "first-jobs", leader)]
async fn job(_j: Job) -> Result<()> {
    JOBS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// A durable leader handler binds in its own loop once the lease is won:
/// `start()` waits for that too on the embedded transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_published_right_after_start_reaches_the_leader() {
    let rt = Runtime::builder()
        .handlers(|s| s.name() == "first_test::job")
        .start()
        .await
        .expect("starts");
    rt.client().publish(Job).await.expect("published");
    catga_tests::until("the leader handled it", Duration::from_secs(10), || {
        JOBS.load(Ordering::SeqCst) == 1
    })
    .await;
    rt.shutdown().await.expect("clean shutdown");
}

/// The README's first test, as written there.
#[command(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Add {
    /// One term.
    pub a: u64,
    /// The other.
    pub b: u64,
}

/// Two numbers were added.
#[event]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Added {
    /// Their sum.
    pub sum: u64,
}

#[command]
async fn add(ctx: &Context, cmd: Add) -> Result<u64> {
    ctx.publish(Added { sum: cmd.a + cmd.b }).await?;
    Ok(cmd.a + cmd.b)
}

#[tokio::test]
async fn adds() -> Result<()> {
    let kit = TestKit::start().await?; // or TestKit::with(Runtime::builder().handlers(...))
    assert_eq!(kit.client().send(Add { a: 2, b: 3 }).await?, 5);
    kit.settled().await?;
    assert_eq!(kit.published::<Added>()?, [Added { sum: 5 }]);
    kit.shutdown().await
}
