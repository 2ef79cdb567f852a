//! `#[event(leader)]`: of the replicas of a service, only the one holding
//! the leader lease serves the handler; when it stops, a standby takes
//! over within two leases.

use std::time::{Duration, Instant};

use catga::{Context, Result, Runtime, event};
use catga_tests::{Backend, Recorder, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Handled by the leader only.
#[event(subject = "tests.leader.tick")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tick {
    pub run: String,
    pub seq: u64,
}

static TICKS: Recorder = Recorder::new();

#[event(leader)]
async fn on_tick(ctx: &Context, t: Tick) -> Result<()> {
    TICKS.record(&t.run, "tick", ctx, t.seq);
    Ok(())
}

const LEASE: Duration = Duration::from_millis(500);

catga_tests::on_every_store!(
    one_leader_serves_and_a_standby_takes_over,
    a_shutdown_cut_short_still_gives_the_lease_up
);

/// Waits until exactly one of `replicas` leads and serves the leader
/// handler with its subscription confirmed; returns its index.
async fn leader_of(replicas: &[&Runtime]) -> usize {
    let started = Instant::now();
    loop {
        let leading: Vec<usize> = (0..replicas.len()).filter(|&i| replicas[i].is_leader()).collect();
        if let [one] = leading[..] {
            let rt = replicas[one];
            if rt.serving().await.iter().any(|h| h.ends_with("::on_tick")) && rt.is_ready() {
                return one;
            }
        }
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        assert!(started.elapsed() < WAIT, "no leader within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes 20 ticks of a new run; the records of their handling.
async fn ticks(client: &catga::Client) -> Vec<catga_tests::record::Record> {
    let run = run_id();
    for seq in 0..20 {
        client
            .publish(Tick {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let seen = TICKS.wait_for(&run, 20, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(TICKS.of(&run).len(), 20, "each once");
    seen
}

async fn one_leader_serves_and_a_standby_takes_over(b: &Backend) {
    let mut replicas = Vec::new();
    for i in 1..=2 {
        let builder = b.builder(module_path!(), &format!("r{i}")).leader_lease(LEASE);
        replicas.push(b.started(builder).await);
    }
    let client = b.client().await;
    let first = leader_of(&replicas.iter().collect::<Vec<_>>()).await;
    let leader_id = format!("r{}", first + 1);
    let seen = ticks(&client).await;
    assert!(
        seen.iter().all(|r| r.instance == leader_id),
        "all on the leader {leader_id}: {seen:?}"
    );
    // The leader stops (and gives the lease up): the standby holds it
    // within two leases.
    let old = replicas.remove(first);
    old.shutdown().await.expect("clean shutdown");
    let stopped = Instant::now();
    while !replicas[0].is_leader() {
        assert!(stopped.elapsed() < 2 * LEASE, "no takeover within two leases");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let next = leader_of(&replicas.iter().collect::<Vec<_>>()).await;
    let seen = ticks(&client).await;
    assert!(seen.iter().all(|r| r.instance != leader_id));
    let survivor = replicas.remove(next);
    survivor.shutdown().await.expect("clean shutdown");
}

/// The leader is told to stop and the caller gives up on the shutdown at
/// once (a time-out around it): the shutdown goes on by itself and gives
/// the lease up, and the standby leads. Cut short, it left the lease's
/// holder renewing it for as long as the process lived.
async fn a_shutdown_cut_short_still_gives_the_lease_up(b: &Backend) {
    let mut replicas = Vec::new();
    for i in 1..=2 {
        let builder = b.builder(module_path!(), &format!("c{i}")).leader_lease(LEASE);
        replicas.push(b.started(builder).await);
    }
    let client = b.client().await;
    let first = leader_of(&replicas.iter().collect::<Vec<_>>()).await;
    let old = replicas.remove(first);
    // Cut short, or (on a quiet embedded bus) done within the moment.
    let _ = tokio::time::timeout(Duration::from_millis(1), old.shutdown()).await;
    let stopped = Instant::now();
    while !replicas[0].is_leader() {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "the standby never led: the lease is still held"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leader_of(&replicas.iter().collect::<Vec<_>>()).await;
    let seen = ticks(&client).await;
    assert!(
        seen.iter()
            .all(|r| r.instance.ends_with("c1") || r.instance.ends_with("c2"))
    );
    let survivor = replicas.remove(0);
    survivor.shutdown().await.expect("clean shutdown");
}
