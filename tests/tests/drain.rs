//! The shutdown's one deadline and what it reports, against real
//! nats-server and redis-server processes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catga::{Result, Runtime, Saga, event, saga};
use catga_tests::{NatsServer, RedisServer};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// Starts a keyed saga.
#[event(subject = "tests.drain.opened")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Opened {
    /// The key.
    pub account: String,
}

#[saga(key = account, partitions = 4)]
async fn open(saga: &Saga, e: Opened) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

/// Something to serve on an idle subject.
#[event(subject = "tests.drain.idle")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Idle;

#[event]
async fn on_idle(_: Idle) -> Result<()> {
    Ok(())
}

/// Redis is gone and keyed sagas run: the shutdown still ends within its
/// one deadline (1 s here). Before, the lease release and the ring leave
/// waited for Redis after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_redis_gone_keeps_its_deadline() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let rt = Runtime::builder()
        .service("drain")
        .instance_id("d1")
        .nats_url(nats.url())
        .redis_url(redis.url())
        .membership(Duration::from_millis(100), Duration::from_millis(600))
        .drain_timeout(Duration::from_secs(1))
        .handlers(|s| s.name() == "drain::open")
        .start()
        .await
        .expect("starts");
    let started = Instant::now();
    while rt.partitions().await.values().map(Vec::len).sum::<usize>() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no partitions served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.kill();
    let began = Instant::now();
    let _ = rt.shutdown().await;
    let took = began.elapsed();
    assert!(
        took < Duration::from_millis(1800),
        "the shutdown took {took:?} with a deadline of 1 s"
    );
}

/// A log line collector, installed once as this binary's global
/// subscriber. A per-thread (`set_default`) subscriber lost lines under
/// plain `cargo test`, where the tests of this file share a process: a
/// call site first reached from the other test's threads, which had no
/// subscriber, was cached as disabled. Lines of one test are told apart
/// by the span it runs in.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An idle replica that shuts down reports a clean shutdown: its idle
/// subjects had nothing on their way. Before, it logged `clean=false
/// handover_confirmed=false` because an idle subject could not reach the
/// count that confirms a hand-over, which told operators something was
/// lost when nothing was.
#[tokio::test]
async fn an_idle_replica_reports_a_clean_shutdown() {
    static LINES: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();
    let lines = LINES
        .get_or_init(|| {
            let lines = Lines::default();
            let writer = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
            lines
        })
        .clone();
    idle_replica()
        .instrument(tracing::info_span!("idle_replica"))
        .await;
    let text = String::from_utf8_lossy(&lines.0.lock().expect("lines")).into_owned();
    let done = text
        .lines()
        .find(|l| l.contains("idle_replica") && l.contains("shutdown complete"))
        .unwrap_or_else(|| panic!("no shutdown line in:\n{text}"));
    assert!(done.contains("clean=true"), "{done}");
}

async fn idle_replica() {
    let nats = NatsServer::start();
    let rt = Runtime::builder()
        .service("drain-idle")
        .instance_id("i1")
        .nats_url(nats.url())
        .handlers(|s| s.name() == "drain::on_idle")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    rt.shutdown().await.expect("clean shutdown");
}
