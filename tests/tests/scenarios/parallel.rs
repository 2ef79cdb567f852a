//! `parallel = N`: N subscriptions on N tasks, so one handler can use
//! several cores; a fan-out event still reaches each replica once.

use std::collections::BTreeSet;
use std::time::Duration;

use catga::{Context, Result, command, event};
use catga_tests::backend::shutdown_all;
use catga_tests::{Backend, Gauge, Recorder, run_id};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// CPU-bound work (a thread-blocking sleep stands for it), two tasks.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Crunch {
    pub run: String,
}

/// The same work on one task.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct CrunchAlone {
    pub run: String,
}

/// Fans out to every replica; each replica serves it on two tasks.
#[event]
#[derive(Serialize, Deserialize, Debug)]
pub struct Spread {
    pub run: String,
    pub seq: u64,
}

static BUSY: Gauge = Gauge::new();
static SPREAD: Recorder = Recorder::new();

fn block_for_a_while(run: &str) -> u64 {
    BUSY.enter(run);
    std::thread::sleep(Duration::from_millis(60));
    BUSY.leave(run);
    1
}

#[command(concurrency = 1, parallel = 2)]
async fn crunch(c: Crunch) -> Result<u64> {
    Ok(block_for_a_while(&c.run))
}

#[command(concurrency = 1)]
async fn crunch_alone(c: CrunchAlone) -> Result<u64> {
    Ok(block_for_a_while(&c.run))
}

#[event(parallel = 2)]
async fn on_spread(ctx: &Context, s: Spread) -> Result<()> {
    SPREAD.record(&s.run, "spread", ctx, s.seq);
    Ok(())
}

catga_tests::on_both!(
    parallel_handlers_run_at_once,
    parallel_fan_out_delivers_once_per_replica
);

async fn parallel_handlers_run_at_once(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(20));
    let two = run_id();
    let replies = join_all((0..16).map(|_| client.send(Crunch { run: two.clone() }))).await;
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    assert_eq!(
        BUSY.max(&two),
        2,
        "two subscriptions, two blocking handlers at once"
    );
    let one = run_id();
    let replies = join_all((0..6).map(|_| client.send(CrunchAlone { run: one.clone() }))).await;
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    assert_eq!(
        BUSY.max(&one),
        1,
        "one subscription with concurrency 1: one at a time"
    );
    rt.shutdown().await.expect("clean shutdown");
}

async fn parallel_fan_out_delivers_once_per_replica(b: &Backend) {
    let replicas = b.replicas(module_path!(), 2).await;
    let client = b.client().await;
    let run = run_id();
    for seq in 0..20 {
        client
            .publish(Spread {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let records = SPREAD.wait_for(&run, 40, WAIT).await;
    assert_eq!(records.len(), 40, "2 replicas x 20 events, no more");
    let pairs: BTreeSet<(String, u64)> = records.iter().map(|r| (r.instance.clone(), r.seq)).collect();
    assert_eq!(pairs.len(), 40, "each replica got each event once");
    shutdown_all(replicas).await;
}
