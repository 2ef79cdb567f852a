//! Sections 6 and 7: replicas as separate OS processes (this binary, run
//! with the `replica` argument), driven over NATS by a client in the bench
//! process.
//!
//! - Scaling: 1, 3 and 5 replicas whose handler awaits 2 ms (standing for
//!   a remote call) with a fixed concurrency per replica; throughput
//!   against one replica.
//! - Failover: 3 replicas under a steady load of idempotent commands from
//!   a retrying client; one replica is stopped by SIGKILL (then, in a
//!   second run, by SIGTERM) while requests are in flight. Reports the
//!   requests that failed for good, the ones that needed a retry, how long
//!   the load took to return to its level, when discovery stopped listing
//!   the replica, and whether every acknowledged command took effect
//!   exactly once (counters in Redis).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Result, Runtime, command};
use serde::{Deserialize, Serialize};

/// What the scaling replicas serve: waits 2 ms, replies its number.
#[command(subject = "bench.io", reply = u64)]
#[derive(Serialize, Deserialize, Clone)]
pub struct IoWork {
    /// Echoed back.
    pub n: u64,
}

#[command(queue_group = "bench-io")]
async fn io_work(w: IoWork) -> Result<u64> {
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(w.n)
}

/// What the failover replicas serve: adds one to a shard of a counter in
/// Redis, once per message id however often it is delivered.
#[command(subject = "bench.deposit", reply = u64, idempotent)]
#[derive(Serialize, Deserialize, Clone)]
pub struct Deposit {
    /// Picks the counter shard.
    pub n: u64,
}

/// Shards of the deposit counter: fewer version conflicts between
/// concurrent deposits than one key.
const SHARDS: u64 = 32;

#[command(queue_group = "bench-deposit", retry = 20)]
async fn deposit(ctx: &catga::Context, d: Deposit) -> Result<u64> {
    tokio::time::sleep(Duration::from_millis(2)).await;
    let key = format!("shard-{}", d.n % SHARDS);
    let mut c = ctx
        .try_load::<crate::reliable::Counter>(&key)
        .await?
        .unwrap_or_else(|| catga::Versioned::new(key.clone(), crate::reliable::Counter::default()));
    c.0 += 1;
    let n = c.0;
    ctx.save(c).await?;
    Ok(n)
}

/// Sums the deposit counter's shards.
#[command(subject = "bench.deposits", reply = u64)]
#[derive(Serialize, Deserialize, Clone)]
pub struct Deposits {}

#[command(queue_group = "bench-deposit")]
async fn deposits(ctx: &catga::Context, _d: Deposits) -> Result<u64> {
    let mut total = 0;
    for shard in 0..SHARDS {
        if let Some(c) = ctx
            .try_load::<crate::reliable::Counter>(&format!("shard-{shard}"))
            .await?
        {
            total += c.0;
        }
    }
    Ok(total)
}

/// Sent every few milliseconds during the takeover benchmark.
#[catga::event(subject = "bench.tick")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Tick {
    /// Its number.
    pub seq: u64,
}

/// What the leader answers a tick with.
#[catga::event(subject = "bench.ticked")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Ticked {
    /// The replica that leads.
    pub by: String,
}

#[catga::event(leader)]
async fn on_tick(ctx: &catga::Context, _t: Tick) -> Result<()> {
    ctx.publish(Ticked {
        by: ctx.instance_id().to_owned(),
    })
    .await
}

/// The service name the replicas run under (discovery lists it).
const SERVICE: &str = "bench-replicas";

/// catga's default `CATGA_INBOX_LEASE_MS`.
const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// catga's default `CATGA_LEADER_LEASE_MS`.
const LEADER_LEASE: Duration = Duration::from_secs(10);

/// `catga-bench replica`: serves `BENCH_HANDLER` (`io` or `deposit`) until
/// SIGTERM, with `BENCH_REPLICA_CONCURRENCY` messages at a time.
pub async fn replica() {
    catga::init_telemetry(SERVICE);
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let which = env("BENCH_HANDLER");
    let concurrency = env("BENCH_REPLICA_CONCURRENCY").parse().unwrap_or(4);
    let lease = Duration::from_millis(env("BENCH_LEASE_MS").parse().unwrap_or(5000));
    let leader_lease = Duration::from_millis(env("BENCH_LEADER_LEASE_MS").parse().unwrap_or(10_000));
    let mut builder = Runtime::builder()
        .nats_url(env("NATS_URL"))
        .service(SERVICE)
        .instance_id(env("CATGA_INSTANCE_ID"))
        .concurrency(concurrency)
        .drain_timeout(Duration::from_secs(5))
        .inbox(Duration::from_secs(3600), lease)
        .leader_lease(leader_lease)
        .handlers(move |s| match which.as_str() {
            "io" => s.name() == "catga_bench::cluster::io_work",
            "tick" => s.name() == "catga_bench::cluster::on_tick",
            "keyed" => s.name().ends_with("::keyed_job") || s.name().ends_with("::saga_step"),
            _ => s.name().starts_with("catga_bench::cluster::deposit"),
        });
    if let Ok(redis) = std::env::var("REDIS_URL") {
        builder = builder.redis_url(redis);
    }
    let rt = builder.start().await.expect("replica start");
    rt.ready().await.expect("replica ready");
    println!("ready");
    if let Err(e) = rt.run_until_signal().await {
        eprintln!("replica: {e}");
        std::process::exit(1);
    }
}

/// A replica process; SIGKILLed when dropped, so a panicking bench leaves
/// nothing behind.
pub(crate) struct Replica(Child);

impl Replica {
    /// A replica with the default leases.
    pub(crate) fn spawn_with(
        id: &str,
        handler: &str,
        nats: &str,
        redis: Option<&str>,
        concurrency: usize,
    ) -> Replica {
        Replica::spawn_env(id, handler, nats, redis, concurrency, &[])
    }

    /// [`spawn_with`](Self::spawn_with), with more environment for the
    /// replica (its `CATGA_*` settings).
    pub(crate) fn spawn_env(
        id: &str,
        handler: &str,
        nats: &str,
        redis: Option<&str>,
        concurrency: usize,
        env: &[(&str, String)],
    ) -> Replica {
        Replica::spawn(
            id,
            handler,
            nats,
            redis,
            concurrency,
            DEFAULT_LEASE,
            LEADER_LEASE,
            env,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        id: &str,
        handler: &str,
        nats: &str,
        redis: Option<&str>,
        concurrency: usize,
        lease: Duration,
        leader_lease: Duration,
        env: &[(&str, String)],
    ) -> Replica {
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = Process::new(exe);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.arg("replica")
            .env("NATS_URL", nats)
            .env("CATGA_INSTANCE_ID", id)
            .env("BENCH_HANDLER", handler)
            .env("BENCH_REPLICA_CONCURRENCY", concurrency.to_string())
            .env("BENCH_LEASE_MS", lease.as_millis().to_string())
            .env("BENCH_LEADER_LEASE_MS", leader_lease.as_millis().to_string())
            .env(
                "RUST_LOG",
                std::env::var("BENCH_REPLICA_LOG").unwrap_or_else(|_| "error".to_owned()),
            )
            .env_remove("CATGA_HTTP_ADDR")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        match redis {
            Some(url) => cmd.env("REDIS_URL", url),
            None => cmd.env_remove("REDIS_URL"),
        };
        let mut child = cmd.spawn().expect("spawn replica");
        let out = child.stdout.take().expect("stdout");
        let mut out = BufReader::new(out);
        loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).expect("replica output");
            assert!(n > 0, "replica {id} did not start");
            if line.trim() == "ready" {
                break;
            }
            eprint!("{id}: {line}");
        }
        // Its log (`BENCH_REPLICA_LOG`) goes on to this process's stderr,
        // so that a full pipe never blocks the replica.
        let name = id.to_owned();
        std::thread::spawn(move || {
            for line in out.lines().map_while(std::result::Result::ok) {
                eprintln!("{name}: {line}");
            }
        });
        Replica(child)
    }

    fn signal(&self, signal: &str) {
        let status = Process::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to end, at most `limit`.
    fn wait(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("replica did not stop within {limit:?}");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Section 6: throughput of 1, 3 and 5 replica processes.
pub async fn scaling(duration: Duration) {
    let server = catga_tests::NatsServer::start();
    let url = server.url();
    // Four at a time each: far below what a core can run, so the figure
    // shows how the queue group spreads load, not how the 2 cores of this
    // host are shared (5 replicas x 4 / 2 ms is 10,000 req/s at most).
    let per_replica = 4;
    let client = Client::connect(&url).await.expect("client");
    println!("## Scaling: replicas as separate processes, handler awaiting 2 ms");
    println!();
    println!(
        "{per_replica} messages at a time per replica; the client keeps twice the replicas' total in flight."
    );
    println!();
    println!("| replicas | req/s | vs 1 replica | ideal | p50 µs | p99 µs | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut one = None;
    for n in [1usize, 3, 5] {
        let replicas: Vec<Replica> = (0..n)
            .map(|i| {
                Replica::spawn(
                    &format!("io{i}"),
                    "io",
                    &url,
                    None,
                    per_replica,
                    DEFAULT_LEASE,
                    LEADER_LEASE,
                    &[],
                )
            })
            .collect();
        let client = client.clone();
        let counter = Arc::new(AtomicU64::new(0));
        let stats = crate::measure::measure(2 * n * per_replica, duration, move || {
            let client = client.clone();
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move { client.send(IoWork { n }).await.is_ok() }
        })
        .await;
        let rate = stats.throughput();
        let base = *one.get_or_insert(rate);
        println!(
            "| {n} | {rate:.0} | {:.2}x | {n}x | {:.0} | {:.0} | {} |",
            rate / base,
            stats.p50_us,
            stats.p99_us,
            stats.errors
        );
        drop(replicas);
    }
    println!();
}

/// Section 9: the leader of 2 replica processes SIGKILLed: how long until
/// the standby handles the leader-only events, for two lease lengths.
pub async fn takeover() {
    use futures_util::StreamExt;
    println!("## Leader takeover: the leader of 2 replica processes SIGKILLed");
    println!();
    println!(
        "A publisher sends a tick every 5 ms to an `#[event(leader)]` handler that answers with the replica it runs on. The leader is SIGKILLed (its lease is not given up); \"gap\" is the time from the kill to the first answer from the standby. Target: under two leases."
    );
    println!();
    println!("| leader lease ms | renewal every ms | gap ms | gap / lease | ticks lost |");
    println!("|---:|---:|---:|---:|---:|");
    for lease_ms in [1000u64, 3000] {
        let nats = catga_tests::NatsServer::start();
        let redis = catga_tests::RedisServer::start();
        let (url, redis_url) = (nats.url(), redis.url());
        let spawn = |id: &str| {
            Replica::spawn(
                id,
                "tick",
                &url,
                Some(&redis_url),
                4,
                DEFAULT_LEASE,
                Duration::from_millis(lease_ms),
                &[],
            )
        };
        let replicas = [spawn("t1"), spawn("t2")];
        let raw = async_nats::connect(&url).await.expect("raw client");
        let mut answers = raw.subscribe("bench.ticked").await.expect("subscribe");
        raw.flush().await.expect("flush");
        let client = Client::connect(&url).await.expect("client");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (stop, sent, client) = (Arc::clone(&stop), Arc::clone(&sent), client.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let seq = sent.fetch_add(1, Ordering::Relaxed);
                    let _ = client.publish(Tick { seq }).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let by = |m: &async_nats::Message| {
            serde_json::from_slice::<Ticked>(&m.payload)
                .map(|t| t.by)
                .unwrap_or_default()
        };
        // The first leader, once it answers steadily.
        let first = loop {
            let m = answers.next().await.expect("answers");
            let who = by(&m);
            if !who.is_empty() {
                break who;
            }
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (killed, standby) = if first == "t1" { (0, "t2") } else { (1, "t1") };
        replicas[killed].signal("KILL");
        let killed_at = Instant::now();
        let mut gap = None;
        while killed_at.elapsed() < Duration::from_millis(4 * lease_ms) {
            match tokio::time::timeout(Duration::from_millis(100), answers.next()).await {
                Ok(Some(m)) if by(&m) == standby => {
                    gap.get_or_insert(killed_at.elapsed());
                }
                _ => {}
            }
            if gap.is_some_and(|g| killed_at.elapsed() > g + Duration::from_millis(500)) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = ticker.await;
        match gap {
            Some(g) => {
                // Ticks sent while nobody led are lost: plain events are
                // at-most-once (a durable trigger would be redelivered).
                let lost = (g.as_millis() as f64 / 5.0).round();
                println!(
                    "| {lease_ms} | {} | {} | {:.2} | about {lost:.0} (plain events; durable ones wait) |",
                    lease_ms / 3,
                    g.as_millis(),
                    g.as_millis() as f64 / lease_ms as f64
                );
            }
            None => println!("| {lease_ms} | {} | never | - | - |", lease_ms / 3),
        }
        drop(replicas);
    }
    println!();
}

/// Section 7: one of 3 replicas stopped under load, by SIGKILL then by
/// SIGTERM.
pub async fn failover() {
    println!("## Failover: one of 3 replica processes stopped under load");
    println!();
    println!(
        "A retrying client keeps 8 idempotent commands in flight (each awaits 2 ms and commits a counter in Redis); 3 replicas serve 8 at a time each, so 2 can carry the load. The client waits 1 s for an answer and retries under the same message id."
    );
    println!();
    println!(
        "| signal | inbox lease ms | requests | failed | retried | longest wait ms | req/s before | req/s 5-9 s after | back to 90 % after ms | discovery lists 2 after ms | effects in Redis | lost or doubled |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (signal, lease) in [
        ("KILL", DEFAULT_LEASE),
        ("KILL", Duration::from_millis(1500)),
        ("TERM", DEFAULT_LEASE),
    ] {
        failover_run(signal, lease).await;
    }
    println!();
}

async fn failover_run(signal: &str, lease: Duration) {
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    let (url, redis_url) = (nats.url(), redis.url());
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| {
            Replica::spawn(
                &format!("fo{i}"),
                "deposit",
                &url,
                Some(&redis_url),
                8,
                lease,
                LEADER_LEASE,
                &[],
            )
        })
        .collect();
    let client = Client::connect(&url)
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(1));
    let raw = async_nats::connect(&url).await.expect("raw client");

    // The load: 8 tasks, each sending deposits one after the other, each
    // retried under its message id until it is answered (at most 10 s).
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    // The longest a request waited for its answer, retries included (ms).
    let longest = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // Answers per 100 ms since `started`.
    let bins: Arc<Vec<AtomicU64>> = Arc::new((0..200).map(|_| AtomicU64::new(0)).collect());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let longest = Arc::clone(&longest);
            let (client, stop, next, acked, failed, retried, bins) = (
                client.clone(),
                Arc::clone(&stop),
                Arc::clone(&next),
                Arc::clone(&acked),
                Arc::clone(&failed),
                Arc::clone(&retried),
                Arc::clone(&bins),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let id = format!("deposit-{n}");
                    let began = Instant::now();
                    let give_up = began + Duration::from_secs(10);
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        match client.send_with_id(Deposit { n }, &id).await {
                            Ok(_) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                                let bin = (started.elapsed().as_millis() / 100) as usize;
                                if let Some(b) = bins.get(bin) {
                                    b.fetch_add(1, Ordering::Relaxed);
                                }
                                break;
                            }
                            Err(e) if e.is_retryable() && Instant::now() < give_up => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("deposit {n} failed: {e}");
                                break;
                            }
                        }
                    }
                    if tries > 1 {
                        retried.fetch_add(1, Ordering::Relaxed);
                    }
                    longest.fetch_max(began.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // 3 s of steady load, the signal, then 9 s more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = started.elapsed();
    replicas[0].signal(signal);
    let listed = discovery_drop(&raw, 3).await;
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(started.elapsed() - killed_at)).await;
    let stopped = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    replicas[0].wait(Duration::from_secs(10));

    let bin_of = |d: Duration| (d.as_millis() / 100) as usize;
    let rate = |from: usize, to: usize| -> f64 {
        let sum: u64 = bins[from..to].iter().map(|b| b.load(Ordering::Relaxed)).sum();
        sum as f64 * 10.0 / (to - from).max(1) as f64
    };
    let kill_bin = bin_of(killed_at);
    // The last full bin before the load stopped.
    let end_bin = bin_of(stopped).min(bins.len());
    let before = rate(5, kill_bin);
    let after = rate(kill_bin + 50, end_bin);
    // From when every later 1 s window reaches 90 % of the level (100 ms
    // bins are too noisy on this host to judge).
    let back = (kill_bin..end_bin.saturating_sub(10))
        .find(|&b| (b..end_bin - 10).all(|x| rate(x, x + 10) >= 0.9 * before))
        .map_or("never".to_owned(), |b| format!("{}", (b - kill_bin) * 100));

    if std::env::var_os("BENCH_DIAG").is_some() {
        let line: Vec<String> = bins[..end_bin]
            .iter()
            .map(|b| b.load(Ordering::Relaxed).to_string())
            .collect();
        eprintln!(
            "answers per 100 ms (signal in bin {kill_bin}): {}",
            line.join(" ")
        );
    }
    let effects = client.send(Deposits {}).await.expect("sum of deposits");
    let acked = acked.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let issued = next.load(Ordering::Relaxed);
    // Every deposit was retried until answered or failed for good; an
    // answered one must have taken effect exactly once. One that failed
    // for good may or may not have: it is reported, not excused.
    let verdict = if effects == acked && failed == 0 {
        "none".to_owned()
    } else {
        format!(
            "{} (acked {acked}, failed {failed})",
            effects as i64 - acked as i64
        )
    };
    println!(
        "| SIG{signal} | {} | {issued} | {failed} | {} | {} | {before:.0} | {after:.0} | {back} | {listed} | {effects} | {verdict} |",
        lease.as_millis(),
        retried.load(Ordering::Relaxed),
        longest.load(Ordering::Relaxed),
    );
    for r in &mut replicas[1..] {
        r.signal("TERM");
        r.wait(Duration::from_secs(10));
    }
}

/// Milliseconds from now until `$SRV.PING.<service>` is answered by fewer
/// than `before` replicas (polled every 50 ms, each poll waiting 100 ms
/// for answers).
async fn discovery_drop(raw: &async_nats::Client, before: usize) -> String {
    use futures_util::StreamExt;
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(10) {
        let inbox = raw.new_inbox();
        let Ok(mut sub) = raw.subscribe(inbox.clone()).await else {
            break;
        };
        let _ = raw
            .publish_with_reply(format!("$SRV.PING.{SERVICE}"), inbox, bytes::Bytes::new())
            .await;
        let mut answers = 0;
        let until = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(Some(_)) = tokio::time::timeout_at(until, sub.next()).await {
            answers += 1;
        }
        if answers < before {
            return format!("{}", since.elapsed().as_millis());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "never".to_owned()
}
