//! Delayed messages across restarts, on a real nats-server (JetStream on
//! disk) and redis-server: 30 delayed events are sent, then every replica
//! stops and nats-server is killed while they come due; when a replica
//! and the broker are back, each is published once, never before its
//! time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use catga::{Result, event};
use catga_tests::{NatsServer, RedisServer, run_id};
use serde::{Deserialize, Serialize};

/// A delayed event, due at `due_ms`.
#[event(subject = "tests.delayed_faults.due")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Due {
    /// The test run.
    pub run: String,
    /// Its number in the run.
    pub n: u64,
    /// When it is due (unix ms).
    pub due_ms: u64,
}

/// Per (run, n): when each delivery arrived (unix ms).
static ARRIVED: Mutex<BTreeMap<(String, u64), Vec<u64>>> = Mutex::new(BTreeMap::new());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Not idempotent: a message published twice would be counted twice.
#[event(durable = "due")]
async fn on_due(d: Due) -> Result<()> {
    ARRIVED
        .lock()
        .expect("lock")
        .entry((d.run, d.n))
        .or_default()
        .push(now_ms());
    Ok(())
}

fn builder(nats: &NatsServer, redis: &RedisServer, instance: &str) -> catga::RuntimeBuilder {
    catga::Runtime::builder()
        .service("delays")
        .instance_id(instance)
        .nats_url(nats.url())
        .redis_url(redis.url())
        .handlers(|s| s.name().starts_with("delayed_faults::"))
}

async fn started(b: catga::RuntimeBuilder) -> catga::Runtime {
    let rt = b.start().await.expect("runtime starts");
    catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
    rt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_survive_every_replica_and_the_broker_restarting() {
    let mut nats = NatsServer::start();
    let redis = RedisServer::start();
    let run = run_id();
    let first = started(builder(&nats, &redis, "r1")).await;
    let mut due = BTreeMap::new();
    for n in 0..30u64 {
        // Due from 1 s to 9.7 s from now: some while no replica runs,
        // some while the broker is down, some after.
        let after = Duration::from_millis(1000 + 300 * n);
        let d = Due {
            run: run.clone(),
            n,
            due_ms: now_ms() + after.as_millis() as u64,
        };
        due.insert(n, d.due_ms);
        first.publish_after(after, d).await.expect("publish_after");
    }
    first.shutdown().await.expect("clean shutdown");
    nats.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.resume();
    let second = started(builder(&nats, &redis, "r2")).await;
    let serving_since = now_ms();
    let start = std::time::Instant::now();
    let arrived = loop {
        let arrived: BTreeMap<u64, Vec<u64>> = ARRIVED
            .lock()
            .expect("lock")
            .iter()
            .filter(|((r, _), _)| *r == run)
            .map(|((_, n), at)| (*n, at.clone()))
            .collect();
        if arrived.len() == due.len() || start.elapsed() > Duration::from_secs(30) {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A second delivery would show by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        arrived.len(),
        due.len(),
        "every delayed message arrived: {arrived:?}"
    );
    for (n, at) in &arrived {
        assert_eq!(at.len(), 1, "message {n} arrived {} times", at.len());
        assert!(at[0] >= due[n], "message {n} arrived {} ms early", due[n] - at[0]);
    }
    // The ones due after the second replica was serving came within the
    // relay's look (250 ms) plus a loaded host's slack.
    let mut on_time = 0;
    for (n, at) in &arrived {
        if due[n] > serving_since + 1000 {
            assert!(
                at[0] - due[n] <= 3000,
                "message {n} arrived {} ms late",
                at[0] - due[n]
            );
            on_time += 1;
        }
    }
    assert!(
        on_time > 0,
        "some came due while the second replica served: {arrived:?}"
    );
    second.shutdown().await.expect("clean shutdown");
}
