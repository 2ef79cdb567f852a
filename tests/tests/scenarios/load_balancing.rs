//! Commands over several replicas: each handled exactly once, spread over
//! all of them.

use std::collections::{BTreeMap, BTreeSet};

use catga::{Context, Result, command};
use catga_tests::backend::shutdown_all;
use catga_tests::{Backend, Recorder, run_id};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Handled by exactly one replica of "lb-workers".
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Work {
    pub run: String,
    pub seq: u64,
}

/// Handled by exactly one replica, though its handler names no queue group.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Ungrouped {
    pub run: String,
    pub seq: u64,
}

static HANDLED: Recorder = Recorder::new();

#[command(queue_group = "lb-workers")]
async fn work(ctx: &Context, w: Work) -> Result<String> {
    HANDLED.record(&w.run, "work", ctx, w.seq);
    // A little work, so that replicas overlap.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    Ok(ctx.instance_id().to_owned())
}

#[command]
async fn ungrouped(ctx: &Context, w: Ungrouped) -> Result<String> {
    HANDLED.record(&w.run, "ungrouped", ctx, w.seq);
    Ok(ctx.instance_id().to_owned())
}

catga_tests::on_both!(
    queue_group_load_balancing,
    commands_without_a_group_are_answered_once
);

/// Commands spread over three replicas of one queue group, each handled
/// exactly once.
async fn queue_group_load_balancing(b: &Backend) {
    let replicas = b.replicas(module_path!(), 3).await;
    let client = b.client().await;
    let run = run_id();
    let n = 90u64;
    let replies = join_all((0..n).map(|seq| {
        client.send(Work {
            run: run.clone(),
            seq,
        })
    }))
    .await;
    let mut by_reply: BTreeMap<String, usize> = BTreeMap::new();
    for r in replies {
        *by_reply.entry(r.expect("work reply")).or_default() += 1;
    }
    let records = HANDLED.wait_for(&run, n as usize, WAIT).await;
    assert_eq!(records.len(), n as usize, "each command handled exactly once");
    let seqs: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..n).collect(), "no command lost or handled twice");
    let mut by_record: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *by_record.entry(r.instance.clone()).or_default() += 1;
    }
    assert_eq!(by_record, by_reply, "replies name the replica that handled them");
    assert_eq!(by_record.len(), 3, "every replica got a share: {by_record:?}");
    shutdown_all(replicas).await;
}

/// A command handler without `queue_group` uses its subject as the group:
/// with several replicas, each command is still answered once.
async fn commands_without_a_group_are_answered_once(b: &Backend) {
    let replicas = b.replicas(module_path!(), 3).await;
    let client = b.client().await;
    let run = run_id();
    let n = 60u64;
    let replies = join_all((0..n).map(|seq| {
        client.send(Ungrouped {
            run: run.clone(),
            seq,
        })
    }))
    .await;
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    let records = HANDLED.wait_for(&run, n as usize, WAIT).await;
    assert_eq!(
        records.len(),
        n as usize,
        "each command handled once, not once per replica"
    );
    let instances: BTreeSet<&str> = records.iter().map(|r| r.instance.as_str()).collect();
    assert!(instances.len() > 1, "still spread over replicas: {instances:?}");
    shutdown_all(replicas).await;
}
