//! Graceful shutdown: in-flight work finishes and is answered; one deadline
//! bounds everything, and what it cuts off stops for good.

use std::time::{Duration, Instant};

use catga::{Context, ErrorKind, Result, command};
use catga_tests::{Backend, Recorder, Tally, run_id};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Sleeps `ms`, then answers with `seq`.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Slow {
    pub run: String,
    pub seq: u64,
    pub ms: u64,
}

/// Works in small steps for `ms`, counting each step in [`STEPS`].
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Grind {
    pub run: String,
    pub ms: u64,
}

/// Like [`Grind`], on another handler.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct GrindMore {
    pub run: String,
    pub ms: u64,
}

static STARTED: Recorder = Recorder::new();
static FINISHED: Recorder = Recorder::new();
static STEPS: Tally = Tally::new();

#[command(concurrency = 2)]
async fn slow(ctx: &Context, s: Slow) -> Result<u64> {
    STARTED.record(&s.run, "start", ctx, s.seq);
    tokio::time::sleep(Duration::from_millis(s.ms)).await;
    FINISHED.record(&s.run, "finish", ctx, s.seq);
    Ok(s.seq)
}

async fn grind_for(run: &str, ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        STEPS.add(run);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ms
}

#[command(concurrency = 1)]
async fn grind(g: Grind) -> Result<u64> {
    Ok(grind_for(&g.run, g.ms).await)
}

#[command(concurrency = 1)]
async fn grind_more(g: GrindMore) -> Result<u64> {
    Ok(grind_for(&g.run, g.ms).await)
}

catga_tests::on_both!(
    graceful_shutdown,
    drain_deadline_is_enforced,
    one_deadline_for_many_busy_handlers
);

/// Shutdown stops taking work, finishes the handlers in flight and sends
/// their replies; afterwards the subject has no handler.
async fn graceful_shutdown(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let pending: Vec<_> = (0..2)
        .map(|seq| {
            let client = client.clone();
            let run = run.clone();
            tokio::spawn(async move { client.send(Slow { run, seq, ms: 800 }).await })
        })
        .collect();
    let started = STARTED.wait_for(&run, 2, WAIT).await;
    assert_eq!(started.len(), 2, "both in flight before shutdown");
    assert!(FINISHED.of(&run).is_empty(), "none finished yet");
    rt.shutdown().await.expect("clean shutdown");
    assert_eq!(FINISHED.of(&run).len(), 2, "shutdown waited for both");
    for (seq, p) in pending.into_iter().enumerate() {
        let reply = p.await.expect("task").expect("in-flight command answered");
        assert_eq!(reply, seq as u64);
    }
    let err = client
        .send(Slow {
            run: run.clone(),
            seq: 99,
            ms: 0,
        })
        .await
        .expect_err("no handler after shutdown");
    assert_eq!(err.kind(), ErrorKind::NoHandler, "{err}");
}

/// A handler that outlives the drain deadline does not hold shutdown up:
/// shutdown returns an error in bounded time and the sender gets a fast,
/// retryable error, not a hang.
async fn drain_deadline_is_enforced(b: &Backend) {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .drain_timeout(Duration::from_millis(300)),
        )
        .await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(8));
    let run = run_id();
    let pending = {
        let run = run.clone();
        tokio::spawn(async move {
            client
                .send(Slow {
                    run,
                    seq: 0,
                    ms: 10_000,
                })
                .await
        })
    };
    assert_eq!(STARTED.wait_for(&run, 1, WAIT).await.len(), 1, "in flight");
    let started = Instant::now();
    let err = rt
        .shutdown()
        .await
        .expect_err("the deadline passed with a handler running");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the drain deadline"
    );
    let reply = tokio::time::timeout(Duration::from_secs(3), pending)
        .await
        .expect("the sender is answered at once, not after its 8 s time-out")
        .expect("task")
        .expect_err("the cancelled handler sends no reply");
    assert_eq!(reply.kind(), ErrorKind::Unavailable, "{reply}");
    assert!(reply.is_retryable());
    assert!(FINISHED.of(&run).is_empty(), "the handler was cancelled");
}

/// Several busy handlers with many requests queued: one deadline for all of
/// them (not one each), every queued sender answered at once, and nothing
/// runs after shutdown returns.
async fn one_deadline_for_many_busy_handlers(b: &Backend) {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .drain_timeout(Duration::from_millis(500)),
        )
        .await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(20));
    let run = run_id();
    let mut pending = Vec::new();
    for _ in 0..20 {
        let (c, run1) = (client.clone(), run.clone());
        pending.push(tokio::spawn(
            async move { c.send(Grind { run: run1, ms: 300 }).await },
        ));
        let (c, run2) = (client.clone(), run.clone());
        pending.push(tokio::spawn(async move {
            c.send(GrindMore { run: run2, ms: 300 }).await
        }));
    }
    // Both handlers busy, the rest queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(STEPS.get(&run) > 0, "the handlers work");
    let started = Instant::now();
    let result = rt.shutdown().await;
    let took = started.elapsed();
    assert!(result.is_err(), "40 x 300 ms of work cannot finish in 500 ms");
    assert!(
        took < Duration::from_millis(1500),
        "one 500 ms deadline for all, took {took:?}"
    );
    let at_return = STEPS.get(&run);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(STEPS.get(&run), at_return, "nothing runs after shutdown returned");
    let answered = tokio::time::timeout(Duration::from_secs(5), join_all(pending))
        .await
        .expect("every sender answered at once, none waits out its 20 s time-out");
    let mut ok = 0;
    for r in answered {
        match r.expect("task") {
            Ok(_) => ok += 1,
            Err(e) => assert!(
                e.kind() == ErrorKind::Unavailable || e.kind() == ErrorKind::NoHandler,
                "queued or cut off: a retryable error, got {e}"
            ),
        }
    }
    assert!(ok < 40, "most were cut off");
}
