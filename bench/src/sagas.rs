//! Sections 10 to 12: sagas.
//!
//! - Keyed saga throughput: 1, 3 and 5 replica processes running a saga
//!   keyed over 1,000 keys whose one step awaits 2 ms (a remote call), 4
//!   sagas at a time per replica; sagas per second against one replica.
//!   Also the routing ceiling: the same with a saga that takes no step.
//! - Rebalance: the share of partitions (and of keys) that move when one
//!   of N replicas leaves or one joins, from the ring itself.
//! - Journal overhead per step: a saga of 3 steps against a durable,
//!   idempotent handler sending the same 3 idempotent commands without a
//!   journal; Redis commands and bytes per run, and throughput.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Result, Runtime, Saga, command, event, saga};
use serde::{Deserialize, Serialize};

/// How long the keyed saga's step awaits: `BENCH_KEYED_STEP_MS` (default
/// 2). The replica processes inherit the variable. A longer step (20 ms)
/// makes the run wait on the remote call rather than on this host's two
/// cores, which shows whether the routing and the partitions scale.
fn step_ms() -> u64 {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MS.get_or_init(|| {
        std::env::var("BENCH_KEYED_STEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2)
    })
}

/// The step of the keyed saga: awaits [`step_ms`].
#[command(subject = "bench.saga.step", idempotent)]
#[derive(Serialize, Deserialize, Clone)]
pub struct SagaStep {
    /// Which saga.
    pub n: u64,
}

/// Its own in-flight limit, well above the sagas': the step stands for a
/// remote service with capacity to spare. With the replica's default (C),
/// N replicas' 2N steps landed at random on N handlers of 2 slots each
/// (a queue group does not look at who is free), so a step often waited
/// for a slot on its replica while another stood idle: one replica never
/// waits (its 2 sagas have its 2 slots), and the sagas of 5 replicas
/// took 30-34 ms each instead of 24 with a 20 ms step (3 replicas reached
/// 0.75 x N, 5 replicas 0.68 x N).
#[command(queue_group = "bench-saga-step", concurrency = 256)]
async fn saga_step(_s: SagaStep) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(step_ms())).await;
    Ok(())
}

/// Starts a keyed saga.
#[event(subject = "bench.saga.job")]
#[derive(Serialize, Deserialize, Clone)]
pub struct SagaJob {
    /// The key.
    pub key: String,
    /// Its number.
    pub n: u64,
    /// Take the step (or only be routed and journaled).
    pub step: bool,
}

/// Published when a saga finished: the bench counts them.
#[event(subject = "bench.saga.done")]
#[derive(Serialize, Deserialize, Clone)]
pub struct SagaDone {
    /// Its number.
    pub n: u64,
}

/// Sagas at a time per replica: the replica's `concurrency` setting.
#[saga(key = key, partitions = 64)]
async fn keyed_job(saga: &Saga, j: SagaJob) -> Result<()> {
    if j.step {
        saga.step("step", SagaStep { n: j.n }).await?;
    }
    saga.context().publish(SagaDone { n: j.n }).await
}

/// Section 10: keyed saga throughput over 1, 3 and 5 replica processes.
pub async fn keyed() {
    println!("## Keyed sagas: replicas as separate processes");
    println!();
    let ms = step_ms();
    let jobs = keyed_jobs();
    println!(
        "A `#[saga(key = key, partitions = 64)]` over 1,000 keys, C sagas at a time per replica; its one step is an idempotent command awaiting {ms} ms. {jobs} triggers published by 16 publishers (after 200 to warm up); sagas per second from the first publish to the last saga done. \"no step\": the saga only journals its end, which shows what routing and the partitions cost. S: partition streams (`CATGA_JS_SAGA_STREAMS`), each with a router share of its own. CPU: the host's busy share during the {ms} ms runs (2 cores for the replicas, nats-server, redis-server and this client)."
    );
    println!();
    println!(
        "| S | C | replicas | sagas/s ({ms} ms step) | vs 1 replica | ideal | host CPU busy | sagas/s (no step) | vs 1 replica |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let list = |var: &str, default: Vec<usize>| -> Vec<usize> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or(default)
    };
    for streams in list("BENCH_KEYED_STREAMS", vec![1, 3]) {
        for per_replica in list("BENCH_KEYED_CONCURRENCY", vec![2, 4]) {
            keyed_at(streams, per_replica).await;
        }
    }
    println!();
}

/// Triggers per run: `BENCH_KEYED_JOBS` (default 6,000).
fn keyed_jobs() -> u64 {
    std::env::var("BENCH_KEYED_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000)
}

/// Host CPU time so far: (busy, total) jiffies from `/proc/stat`.
fn host_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

async fn keyed_at(streams: usize, per_replica: usize) {
    use futures_util::StreamExt;
    let mut base: Option<(f64, f64)> = None;
    let counts: Vec<usize> = std::env::var("BENCH_KEYED_REPLICAS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 3, 5]);
    for n in counts {
        let nats = catga_tests::NatsServer::start();
        let redis = catga_tests::RedisServer::start();
        let (url, redis_url) = (nats.url(), redis.url());
        let replicas: Vec<crate::cluster::Replica> = (0..n)
            .map(|i| {
                crate::cluster::Replica::spawn_env(
                    &format!("k{i}"),
                    "keyed",
                    &url,
                    Some(&redis_url),
                    per_replica,
                    &[("CATGA_JS_SAGA_STREAMS", streams.to_string())],
                )
            })
            .collect();
        // The partitions spread once every replica heard of the others,
        // and the hand-overs of the start settle (pull requests the old
        // owners left expire within 3 s, their deliveries come back
        // within the 2 s ack wait): this section measures the steady
        // state, the tests measure hand-overs.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let raw = async_nats::connect(&url).await.expect("raw client");
        let mut done = raw.subscribe("bench.saga.done").await.expect("subscribe");
        raw.flush().await.expect("flush");
        let count = Arc::new(AtomicU64::new(0));
        let counter = {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                while done.next().await.is_some() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let client = Client::connect(&url).await.expect("client");
        // Warm-up: streams, consumers and connections settle.
        run_keyed(&client, &count, true, 200).await;
        let mut rates = [0.0; 2];
        let mut busy = 0.0;
        for (i, step) in [true, false].into_iter().enumerate() {
            let (b0, t0) = host_cpu();
            rates[i] = run_keyed(&client, &count, step, keyed_jobs()).await;
            let (b1, t1) = host_cpu();
            if step {
                busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
            }
        }
        counter.abort();
        let (s, r) = *base.get_or_insert((rates[0], rates[1]));
        println!(
            "| {streams} | {per_replica} | {n} | {:.0} | {:.2}x | {n}x | {:.0} % | {:.0} | {:.2}x |",
            rates[0],
            rates[0] / s,
            100.0 * busy,
            rates[1],
            rates[1] / r
        );
        drop(replicas);
    }
}

async fn run_keyed(client: &Client, count: &AtomicU64, step: bool, jobs: u64) -> f64 {
    let start_count = count.load(Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let publishers: Vec<_> = (0..16)
        .map(|_| {
            let (client, next) = (client.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= jobs {
                        return;
                    }
                    let job = SagaJob {
                        key: format!("key-{}", n % 1000),
                        n,
                        step,
                    };
                    while client.publish_durable(job.clone()).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut timeline = Vec::new();
    let mut next_mark = Instant::now();
    while count.load(Ordering::Relaxed) - start_count < jobs && Instant::now() < give_up {
        if Instant::now() >= next_mark {
            timeline.push(count.load(Ordering::Relaxed) - start_count);
            next_mark += Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if std::env::var_os("BENCH_DIAG").is_some() {
        eprintln!("sagas done every 500 ms (step: {step}): {timeline:?}");
    }
    (count.load(Ordering::Relaxed) - start_count) as f64 / started.elapsed().as_secs_f64()
}

/// Section 11: what moves when a replica leaves or joins.
pub fn rebalance() {
    for factor in [1.0, 1.25, f64::INFINITY] {
        rebalance_with(factor);
    }
}

fn rebalance_with(factor: f64) {
    use catga::ring::{Ring, partition_of};
    let bound = if factor.is_finite() {
        format!(
            "bounded at {factor} x the mean{}",
            if factor == 1.0 { " (catga's choice)" } else { "" }
        )
    } else {
        "unbounded (plain consistent hashing)".to_owned()
    };
    println!("## Rebalance: partitions and keys that move, loads {bound}");
    println!();
    println!(
        "64 partitions, 10,000 keys, replicas named as catga names them; averaged over each replica leaving, and over 20 joiners. Ideal: 1/N of them move when one of N leaves, 1/(N+1) when one joins."
    );
    println!();
    println!(
        "| replicas N | leave: partitions moved | keys moved | ideal 1/N | join: partitions moved | keys moved | ideal 1/(N+1) | most partitions on one |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    const P: u32 = 64;
    let keys: Vec<u32> = (0..10_000)
        .map(|k| partition_of(&format!("key-{k}"), P))
        .collect();
    let members = |n: usize, salt: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("replica-{}/{}", i + salt, catga::new_message_id()))
            .collect()
    };
    let moved = |a: &[&str], b: &[&str]| -> (f64, f64) {
        let parts = a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / f64::from(P);
        let ks =
            keys.iter().filter(|p| a[**p as usize] != b[**p as usize]).count() as f64 / keys.len() as f64;
        (parts, ks)
    };
    for n in 2..=8usize {
        let all = members(n, 0);
        let ring = Ring::new(&all);
        let before = ring.assign_bounded(P, factor);
        let most = all
            .iter()
            .map(|m| before.iter().filter(|o| **o == m.as_str()).count())
            .max()
            .unwrap_or(0);
        let (mut lp, mut lk) = (0.0, 0.0);
        for leaver in 0..n {
            let rest: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != leaver)
                .map(|(_, m)| m.clone())
                .collect();
            let after_ring = Ring::new(&rest);
            let after = after_ring.assign_bounded(P, factor);
            let (p, k) = moved(&before, &after);
            lp += p;
            lk += k;
        }
        let (mut jp, mut jk) = (0.0, 0.0);
        for salt in 0..20 {
            let mut more = all.clone();
            more.extend(members(1, 100 + salt));
            let after_ring = Ring::new(&more);
            let after = after_ring.assign_bounded(P, factor);
            let (p, k) = moved(&before, &after);
            jp += p;
            jk += k;
        }
        println!(
            "| {n} | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {most} (mean {:.1}) |",
            100.0 * lp / n as f64,
            100.0 * lk / n as f64,
            100.0 / n as f64,
            100.0 * jp / 20.0,
            100.0 * jk / 20.0,
            100.0 / (n + 1) as f64,
            f64::from(P) / n as f64
        );
    }
    println!();
}

/// A step of the journal comparison (idempotent, does nothing).
#[command(subject = "bench.journal.step", idempotent)]
#[derive(Serialize, Deserialize, Clone)]
pub struct JournalStep {
    /// Which run.
    pub n: u64,
}

#[command]
async fn journal_step(_s: JournalStep) -> Result<()> {
    Ok(())
}

/// Starts a journaled saga of 3 steps.
#[event(subject = "bench.journal.saga")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Journaled {
    /// Its number.
    pub n: u64,
}

/// Starts the same 3 commands without a journal.
#[event(subject = "bench.journal.plain")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Unjournaled {
    /// Its number.
    pub n: u64,
}

static JOURNAL_DONE: AtomicU64 = AtomicU64::new(0);

#[saga(concurrency = 16)]
async fn journaled(saga: &Saga, j: Journaled) -> Result<()> {
    for name in ["one", "two", "three"] {
        saga.step(name, JournalStep { n: j.n }).await?;
    }
    JOURNAL_DONE.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[event(durable = "unjournaled", idempotent, concurrency = 16)]
async fn unjournaled(ctx: &catga::Context, j: Unjournaled) -> Result<()> {
    for _ in 0..3 {
        ctx.send(JournalStep { n: j.n }).await?;
    }
    JOURNAL_DONE.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Redis commands run and bytes received so far (`INFO`).
async fn redis_counters(redis: &mut redis::aio::MultiplexedConnection) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(redis)
        .await
        .expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u64>().ok()))
            .unwrap_or(0)
    };
    (
        field("total_commands_processed:"),
        field("total_net_input_bytes:"),
    )
}

/// Section 12: journal overhead per step.
pub async fn journal() {
    println!("## Saga journal overhead");
    println!();
    println!(
        "One replica, NATS and Redis; 1,000 runs of 3 idempotent commands that do nothing, 16 at a time: as a `#[saga]` (each step journaled) and as a durable, idempotent event handler sending the same commands (no journal). Redis commands and bytes sent to Redis per run, from `INFO stats` (the replica's background work included: heartbeats, the outbox relay)."
    );
    println!();
    println!("| variant | runs/s | Redis commands per run | bytes to Redis per run |");
    println!("|---|---:|---:|---:|");
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    let rt = Runtime::builder()
        .nats_url(nats.url())
        .redis_url(redis.url())
        .service("bench-journal")
        .instance_id("j1")
        .handlers(|s| {
            s.name().starts_with("catga_bench::sagas::journal") || s.name().ends_with("::unjournaled")
        })
        .start()
        .await
        .expect("start");
    rt.ready().await.expect("ready");
    let mut conn = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let client = Client::connect(&nats.url()).await.expect("client");
    const RUNS: u64 = 1000;
    let mut rows = Vec::new();
    for journaled in [true, false] {
        let (c0, b0) = redis_counters(&mut conn).await;
        let start = JOURNAL_DONE.load(Ordering::Relaxed);
        let started = Instant::now();
        for n in 0..RUNS {
            let sent = if journaled {
                client.publish_durable(Journaled { n }).await
            } else {
                client.publish_durable(Unjournaled { n }).await
            };
            sent.expect("publish");
        }
        let give_up = Instant::now() + Duration::from_secs(120);
        while JOURNAL_DONE.load(Ordering::Relaxed) - start < RUNS && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = RUNS as f64 / started.elapsed().as_secs_f64();
        let (c1, b1) = redis_counters(&mut conn).await;
        rows.push((
            journaled,
            rate,
            (c1 - c0) as f64 / RUNS as f64,
            (b1 - b0) as f64 / RUNS as f64,
        ));
    }
    for (journaled, rate, cmds, bytes) in &rows {
        println!(
            "| {} | {rate:.0} | {cmds:.1} | {bytes:.0} |",
            if *journaled {
                "saga (journaled)"
            } else {
                "handler (no journal)"
            }
        );
    }
    if let [(_, rs, cs, bs), (_, rp, cp, bp)] = rows[..] {
        println!();
        println!(
            "Per step (3 per run): {:.1} Redis commands and {:.0} bytes more with the journal; throughput {:.2}x of the handler without one.",
            (cs - cp) / 3.0,
            (bs - bp) / 3.0,
            rs / rp
        );
    }
    println!();
    rt.shutdown().await.expect("shutdown");
}
