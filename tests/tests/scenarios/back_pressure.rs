//! Back-pressure: the in-flight limit, the bounded queue, and exact
//! counting of what a full subscription drops.

use std::time::Duration;

use catga::{Context, ErrorKind, Result, command, event};
use catga_tests::{Backend, Gauge, Recorder, run_id};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

/// Sleeps `ms`, then answers with `seq`.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Limited {
    pub run: String,
    pub seq: u64,
    pub ms: u64,
}

/// Published faster than it is handled.
#[event]
#[derive(Serialize, Deserialize, Debug)]
pub struct Flood {
    pub run: String,
    pub seq: u64,
}

static IN_FLIGHT: Gauge = Gauge::new();
static HANDLED: Recorder = Recorder::new();

#[command(concurrency = 2)]
async fn limited(ctx: &Context, s: Limited) -> Result<u64> {
    IN_FLIGHT.enter(&s.run);
    tokio::time::sleep(Duration::from_millis(s.ms)).await;
    IN_FLIGHT.leave(&s.run);
    HANDLED.record(&s.run, "limited", ctx, s.seq);
    Ok(s.seq)
}

#[event(concurrency = 1)]
async fn on_flood(ctx: &Context, f: Flood) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    HANDLED.record(&f.run, "flood", ctx, f.seq);
    Ok(())
}

/// Published faster than it is handled, with a payload of `pad` bytes.
#[event]
#[derive(Serialize, Deserialize, Debug)]
pub struct Heavy {
    pub run: String,
    pub seq: u64,
    pub pad: String,
}

/// The runs whose [`Heavy`] handler may go on: until the test has
/// published everything, the handler holds the one message in flight, so
/// that what the queue takes does not depend on how fast the publisher
/// is (in a loaded CI run, 20 ms per message let 23 of 60 through).
static OPENED: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

#[event(concurrency = 1)]
async fn on_heavy(ctx: &Context, h: Heavy) -> Result<()> {
    let started = std::time::Instant::now();
    while !OPENED.lock().expect("opened").contains(&h.run) && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    HANDLED.record(&h.run, "heavy", ctx, h.seq);
    Ok(())
}

catga_tests::on_both!(
    concurrency_limit,
    slow_consumer_drops_are_counted_exactly,
    a_subscription_queue_is_bounded_in_bytes_too,
    a_full_subscription_refuses_requests_at_once
);

/// `concurrency = 2` bounds the handlers in flight; the rest wait their turn.
async fn concurrency_limit(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let replies = join_all((0..6).map(|seq| {
        client.send(Limited {
            run: run.clone(),
            seq,
            ms: 150,
        })
    }))
    .await;
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    assert_eq!(
        IN_FLIGHT.max(&run),
        2,
        "never more than the limit, and the limit is used"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A subscription whose queue is full drops further messages, and every
/// drop is counted: handled + dropped = published, exactly, on both
/// transports.
async fn slow_consumer_drops_are_counted_exactly(b: &Backend) {
    let rt = b
        .started(b.builder(module_path!(), "r1").subscription_capacity(4))
        .await;
    let client = b.client().await;
    let run = run_id();
    let n = 100u64;
    for seq in 0..n {
        client
            .publish(Flood {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let handled = HANDLED
        .settle(&run, Duration::from_millis(300), Duration::from_secs(20))
        .await as u64;
    let dropped = rt.dropped_messages();
    assert!(dropped > 0, "a queue of 4 cannot take {n} at once");
    assert_eq!(
        handled + dropped,
        n,
        "handled {handled} + dropped {dropped} must be {n}"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A queue that could take 10,000 messages holds at most its bytes
/// (`CATGA_SUBSCRIPTION_BYTES`): 100 KB messages beyond 1 MB are dropped,
/// and counted like any other drop.
async fn a_subscription_queue_is_bounded_in_bytes_too(b: &Backend) {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .subscription_capacity(10_000)
                .subscription_bytes(1024 * 1024),
        )
        .await;
    let client = b.client().await;
    let run = run_id();
    let n = 60u64;
    for seq in 0..n {
        client
            .publish(Heavy {
                run: run.clone(),
                seq,
                pad: "x".repeat(100 * 1024),
            })
            .await
            .expect("publish");
    }
    OPENED.lock().expect("opened").insert(run.clone());
    let handled = HANDLED
        .settle(&run, Duration::from_millis(300), Duration::from_secs(20))
        .await as u64;
    let dropped = rt.dropped_messages();
    assert!(
        handled <= 20,
        "a 1 MB queue of 100 KB messages took {handled} of {n} (about 10 fit, plus the one in flight)"
    );
    assert_eq!(
        handled + dropped,
        n,
        "handled {handled} + dropped {dropped} must be {n}"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// Requests to a full subscription are answered "unavailable" at once, on
/// both transports, instead of timing out.
async fn a_full_subscription_refuses_requests_at_once(b: &Backend) {
    let rt = b
        .started(b.builder(module_path!(), "r1").subscription_capacity(1))
        .await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(10));
    let run = run_id();
    let started = std::time::Instant::now();
    let replies = join_all((0..12).map(|seq| {
        client.send(Limited {
            run: run.clone(),
            seq,
            ms: 300,
        })
    }))
    .await;
    let refused = replies
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Unavailable && e.is_retryable()))
        .count();
    let ok = replies.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok + refused, 12, "served or refused, nothing else: {replies:?}");
    assert!(
        refused >= 8,
        "2 in flight + 1 queued per turn: most refused, got {refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "nobody waited out the 10 s time-out"
    );
    rt.shutdown().await.expect("clean shutdown");
}
