//! Section: time. How late delayed messages and job occurrences fire
//! with 1, 1,000 and 100,000 delayed messages pending in the store, and
//! what a pending delayed message costs (to schedule, and in Redis
//! memory). One replica on nats-server and redis-server.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use catga::{Context, Result, event, job};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::measure::*;

/// A delayed event; `due_ms` 0 for the fillers (never waited for).
#[event(subject = "bench.time.due")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Due {
    /// When it is due (unix ms).
    pub due_ms: u64,
}

/// How late each probe arrived (ms).
static PROBES: Mutex<Vec<u64>> = Mutex::new(Vec::new());
/// How late each job run started (ms after its occurrence's time).
static RUNS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[event(durable = "bench-time")]
async fn on_due(d: Due) -> Result<()> {
    if d.due_ms > 0 {
        PROBES
            .lock()
            .expect("lock")
            .push(now_ms().saturating_sub(d.due_ms));
    }
    Ok(())
}

#[job(every = "100ms")]
async fn bench_tick(ctx: &Context) -> Result<()> {
    if let Some(at) = ctx.scheduled_at() {
        let late = SystemTime::now()
            .duration_since(at)
            .map_or(0, |d| d.as_millis() as u64);
        RUNS.lock().expect("lock").push(late);
    }
    Ok(())
}

/// Redis' `used_memory`, in bytes.
fn redis_memory(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "memory"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(xs: &mut [u64], p: f64) -> u64 {
    if xs.is_empty() {
        return 0;
    }
    xs.sort_unstable();
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// Probes per level: due over 2 s, starting 1 s after they are sent.
const PROBE_COUNT: u64 = 200;

pub(crate) async fn time() {
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    println!();
    println!("## Time: delayed messages and recurring jobs");
    println!();
    println!(
        "One replica; N delayed messages pending (due in an hour) while {PROBE_COUNT} probes, due over 2 s, \
         fire, and a job runs every 100 ms. Late: from the due time to the durable handler (probes), from \
         the occurrence's time to the job's start (runs). Scheduling: `Runtime::publish_after` at \
         concurrency 64."
    );
    println!();
    println!(
        "| pending | schedule, µs each | Redis bytes each | probes late p50 / p99 / max, ms | job runs late p50 / p99 / max, ms |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for pending in [1u64, 1_000, 100_000] {
        let rt = up(serving(&["time::on_due", "time::bench_tick"])
            .nats_url(nats.url())
            .redis_url(redis.url())
            .service(format!("bench-time-{pending}"))
            .instance_id("bench"))
        .await;
        let memory_before = redis_memory(redis.port());
        let started = Instant::now();
        futures_util::stream::iter(0..pending)
            .for_each_concurrent(64, |_| {
                let rt = &rt;
                async move {
                    rt.publish_after(Duration::from_secs(3600), Due { due_ms: 0 })
                        .await
                        .expect("scheduled");
                }
            })
            .await;
        let per_schedule = started.elapsed().as_secs_f64() * 1e6 / pending as f64;
        let per_entry = redis_memory(redis.port()).saturating_sub(memory_before) as f64 / pending as f64;
        PROBES.lock().expect("lock").clear();
        RUNS.lock().expect("lock").clear();
        let base = now_ms() + 1000;
        for i in 0..PROBE_COUNT {
            let due_ms = base + i * 2000 / PROBE_COUNT;
            let at = UNIX_EPOCH + Duration::from_millis(due_ms);
            rt.publish_at(at, Due { due_ms }).await.expect("probe");
        }
        let waited = Instant::now();
        while (PROBES.lock().expect("lock").len() as u64) < PROBE_COUNT
            && waited.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut probes = PROBES.lock().expect("lock").clone();
        let mut runs = RUNS.lock().expect("lock").clone();
        let arrived = probes.len();
        println!(
            "| {pending} | {per_schedule:.0} | {per_entry:.0} | {} / {} / {}{} | {} / {} / {} ({} runs) |",
            percentile(&mut probes, 0.5),
            percentile(&mut probes, 0.99),
            percentile(&mut probes, 1.0),
            if arrived as u64 == PROBE_COUNT {
                String::new()
            } else {
                format!(" ({arrived} of {PROBE_COUNT} arrived)")
            },
            percentile(&mut runs, 0.5),
            percentile(&mut runs, 0.99),
            percentile(&mut runs, 1.0),
            runs.len()
        );
        rt.shutdown().await.expect("shutdown");
    }
}
