//! Events: to every replica, or once per queue group.

use std::collections::BTreeSet;

use catga::{Context, Result, event};
use catga_tests::backend::shutdown_all;
use catga_tests::{Backend, Recorder, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Every replica receives it.
#[event]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tick {
    pub run: String,
    pub seq: u64,
}

/// Once per queue group.
#[event(subject = "tests.jobs")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Job {
    pub run: String,
    pub seq: u64,
}

static RECEIVED: Recorder = Recorder::new();

#[event]
async fn on_tick(ctx: &Context, t: Tick) -> Result<()> {
    RECEIVED.record(&t.run, "tick", ctx, t.seq);
    Ok(())
}

#[event(queue_group = "billing")]
async fn billing(ctx: &Context, j: Job) -> Result<()> {
    RECEIVED.record(&j.run, "billing", ctx, j.seq);
    Ok(())
}

#[event(queue_group = "shipping")]
async fn shipping(ctx: &Context, j: Job) -> Result<()> {
    RECEIVED.record(&j.run, "shipping", ctx, j.seq);
    Ok(())
}

catga_tests::on_both!(event_fan_out, queue_grouped_events);

/// Every replica receives every event of a plain `#[event]` handler, under
/// one message id.
async fn event_fan_out(b: &Backend) {
    let replicas = b.replicas(module_path!(), 3).await;
    let client = b.client().await;
    let run = run_id();
    for seq in 0..10 {
        client
            .publish(Tick {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let records: Vec<_> = RECEIVED
        .wait_for(&run, 30, WAIT)
        .await
        .into_iter()
        .filter(|r| r.tag == "tick")
        .collect();
    assert_eq!(records.len(), 30, "3 replicas x 10 events");
    let pairs: BTreeSet<(String, u64)> = records.iter().map(|r| (r.instance.clone(), r.seq)).collect();
    assert_eq!(pairs.len(), 30, "each replica got each event once");
    for seq in 0..10 {
        let ids: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.seq == seq)
            .map(|r| r.message_id.as_str())
            .collect();
        assert_eq!(ids.len(), 1, "every replica sees one id for event {seq}: {ids:?}");
    }
    shutdown_all(replicas).await;
}

/// A queue-grouped event reaches one replica per group.
async fn queue_grouped_events(b: &Backend) {
    let replicas = b.replicas(module_path!(), 3).await;
    let client = b.client().await;
    let run = run_id();
    let n = 20u64;
    for seq in 0..n {
        client
            .publish(Job {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let records = RECEIVED.wait_for(&run, 2 * n as usize, WAIT).await;
    assert_eq!(records.len(), 2 * n as usize, "once per group, two groups");
    for group in ["billing", "shipping"] {
        let seqs: Vec<u64> = records.iter().filter(|r| r.tag == group).map(|r| r.seq).collect();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(seqs.len(), n as usize, "{group}: each event once");
        assert_eq!(unique, (0..n).collect(), "{group}: every event");
    }
    let instances: BTreeSet<&str> = records.iter().map(|r| r.instance.as_str()).collect();
    assert!(instances.len() > 1, "groups spread over replicas: {instances:?}");
    shutdown_all(replicas).await;
}
