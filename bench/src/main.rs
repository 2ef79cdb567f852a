//! `cargo run --release -p catga-bench` — see BENCHMARKS.md.
//!
//! 1. Command request/reply through catga vs raw async-nats request/reply,
//!    same nats-server (spawned here on a free loopback port), same payload,
//!    same number of concurrent requesters (1, 16, 64, 256): throughput,
//!    p50/p99 latency and the catga/raw ratio, measured in one run with the
//!    two interleaved, because the machine is shared and noisy.
//! 2. The embedded transport: round trips per second and heap allocations
//!    per round trip (counted by a wrapping global allocator).
//!
//! 3. A CPU-bound handler on one task vs two (`parallel = 2`).
//! 4. Reliable delivery: durable events published and handled through
//!    catga vs a raw JetStream publisher and pull consumer; a command that
//!    loads and saves state through catga vs a raw responder doing Redis
//!    GET and SET; an idempotent command vs a plain one.
//!
//! 5. Event fan-out: a burst of small events to 3 replicas, catga vs raw
//!    async-nats subscribers that decode the same JSON.
//!
//! 6. Scaling: 1, 3 and 5 replicas as separate processes, handler awaiting
//!    2 ms.
//! 7. Failover: one of 3 replica processes stopped by SIGKILL and by
//!    SIGTERM under load.
//! 8. Observability overhead: request/reply with metrics and tracing spans
//!    on vs off.
//! 9. Leader takeover: the leader of 2 replica processes SIGKILLed.
//! 10. Keyed sagas over 1, 3 and 5 replica processes, a step awaiting 2 ms.
//! 11. Rebalance: partitions and keys that move when a replica leaves or
//!     joins.
//! 12. Saga journal overhead per step.
//!
//! `BENCH_SECONDS` sets the measuring time per cell (default 3);
//! `BENCH_LEVELS=64,256` picks the concurrency levels (default 1,16,64,256);
//! `BENCH_ONLY=reqreply,embedded,parallel,reliable,fanout,scaling,failover,overhead,takeover,keyed,rebalance,journal`
//! picks sections;
//! `BENCH_BURST` sets the fan-out burst (default 1,000,000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Client, MemoryBus, Result, Runtime, command, event};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// Counts every allocation, then defers to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the counter has no effect on the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged, see above.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged, see above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged, see above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The benchmark command: echoes its data.
#[command(subject = "bench.echo", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct Echo {
    /// Payload. Borrowed on the sending side, so that building a request
    /// costs no more than the raw baseline's shared `Bytes`.
    pub data: Cow<'static, str>,
}

/// [`Echo`] sent by a catga client to the raw typed responder
/// (`BENCH_DIAG=1` only: splits the cost between client and runtime).
#[command(subject = "typed.echo", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct TypedEcho {
    /// Payload.
    pub data: Cow<'static, str>,
}

/// The reply of [`Echo`].
#[derive(Serialize, Deserialize)]
pub struct Blob {
    /// Payload.
    pub data: Cow<'static, str>,
}

#[command(queue_group = "bench")]
async fn echo(e: Echo) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

/// CPU-bound work: `rounds` of a hash, served by one task.
#[command(subject = "bench.crunch1", reply = u64)]
#[derive(Serialize, Deserialize, Clone)]
pub struct CrunchOne {
    /// How much work.
    pub rounds: u64,
}

/// The same work, served by two tasks (`parallel = 2`).
#[command(subject = "bench.crunch2", reply = u64)]
#[derive(Serialize, Deserialize, Clone)]
pub struct CrunchTwo {
    /// How much work.
    pub rounds: u64,
}

/// Burns CPU without awaiting: what a handler that parses, validates or
/// computes does.
fn crunch(rounds: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..rounds {
        x = (x ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31);
    }
    std::hint::black_box(x)
}

#[command(queue_group = "bench", concurrency = 64)]
async fn crunch_one(c: CrunchOne) -> Result<u64> {
    Ok(crunch(c.rounds))
}

#[command(queue_group = "bench", concurrency = 64, parallel = 2)]
async fn crunch_two(c: CrunchTwo) -> Result<u64> {
    Ok(crunch(c.rounds))
}

/// A small event for the fan-out section.
#[event(subject = "bench.fan")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Fan {
    /// Its number.
    pub seq: u64,
    /// Something to decode.
    pub sku: Cow<'static, str>,
}

/// Events each of the 3 fan-out replicas handled.
static FANNED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

#[event]
async fn on_fan(ctx: &catga::Context, _f: Fan) -> Result<()> {
    let i = match ctx.instance_id() {
        "fan1" => 0,
        "fan2" => 1,
        _ => 2,
    };
    FANNED[i].fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A durable event for the reliable-delivery section.
#[event(subject = "bench.tick")]
#[derive(Serialize, Deserialize, Clone)]
pub struct Tick {
    /// Payload.
    pub data: Cow<'static, str>,
}

/// The same, handled by an idempotent durable handler.
#[event(subject = "bench.tick_once")]
#[derive(Serialize, Deserialize, Clone)]
pub struct TickOnce {
    /// Payload.
    pub data: Cow<'static, str>,
}

static TICKS: AtomicU64 = AtomicU64::new(0);

#[event(durable = "bench-ticks")]
async fn on_tick(_t: Tick) -> Result<()> {
    TICKS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[event(durable = "bench-ticks-once", idempotent)]
async fn on_tick_once(_t: TickOnce) -> Result<()> {
    TICKS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A counter in the state store.
#[derive(Serialize, Deserialize, Default)]
pub struct Counter(u64);

impl catga::State for Counter {
    const KIND: &'static str = "bench-counter";
}

/// Adds one to counter `key` in the state store; replies the new value.
#[command(subject = "bench.bump", reply = u64)]
#[derive(Serialize, Deserialize, Clone)]
pub struct Bump {
    /// Which counter.
    pub key: String,
}

#[command(queue_group = "bench", retry = 10)]
async fn bump(ctx: &catga::Context, b: Bump) -> Result<u64> {
    let mut c = ctx
        .try_load::<Counter>(&b.key)
        .await?
        .unwrap_or_else(|| catga::Versioned::new(b.key.clone(), Counter::default()));
    c.0 += 1;
    let n = c.0;
    ctx.save(c).await?;
    Ok(n)
}

/// [`Echo`], idempotent: its answer is kept in the inbox.
#[command(subject = "bench.echo_once", reply = Blob, idempotent)]
#[derive(Serialize, Deserialize, Clone)]
pub struct EchoOnce {
    /// Payload.
    pub data: Cow<'static, str>,
}

#[command(queue_group = "bench")]
async fn echo_once(e: EchoOnce) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

/// Payload characters: with the JSON wrapping, about 140 bytes on the wire.
const PAYLOAD: usize = 128;

struct Stats {
    ops: u64,
    /// CPU time of this process (client and responder, all threads) per
    /// operation, in microseconds: far steadier on a shared machine than
    /// throughput, which other tenants' load moves.
    cpu_us_per_op: f64,
    /// Heap allocations per operation, over the whole process (client and
    /// responder), warm-up included.
    allocs_per_op: f64,
    errors: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Stats {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

/// Runs `op` from `concurrency` tasks for `duration`, after a short warm-up.
async fn measure<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
    let cpu_before = process_cpu_seconds();
    let warm_until = Instant::now() + Duration::from_millis(500);
    let until = warm_until + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 14);
                let mut errors = 0u64;
                let mut total = 0u64;
                loop {
                    let start = Instant::now();
                    if start >= until {
                        break;
                    }
                    let ok = op().await;
                    total += 1;
                    if start >= warm_until {
                        if ok {
                            lat.push(start.elapsed().as_nanos() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (lat, errors, total)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut total = 0;
    for t in tasks {
        let (lat, e, n) = t.await.expect("bench task");
        all.extend(lat);
        errors += e;
        total += n;
    }
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
    let cpu = process_cpu_seconds() - cpu_before;
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Stats {
        cpu_us_per_op: cpu * 1e6 / total.max(1) as f64,
        ops: all.len() as u64,
        allocs_per_op: allocs as f64 / total.max(1) as f64,
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Rounds per cell (`BENCH_ROUNDS`, default 3).
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1)
}

/// The median of some ratios.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// A builder serving only the named handlers of this crate.
fn serving(handlers: &'static [&'static str]) -> catga::RuntimeBuilder {
    Runtime::builder().handlers(move |s| {
        s.name()
            .strip_prefix("catga_bench::")
            .is_some_and(|name| handlers.contains(&name))
    })
}

/// Starts a runtime and waits until it serves.
async fn up(builder: catga::RuntimeBuilder) -> Runtime {
    let rt = builder.start().await.expect("runtime");
    rt.ready().await.expect("ready");
    rt
}

/// Whether `BENCH_ONLY` (comma separated) selects `section`; unset selects all.
fn selected(section: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

mod cluster;
mod sagas;

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("replica") {
        return cluster::replica().await;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let duration = Duration::from_secs(seconds);
    let data: &'static str = "x".repeat(PAYLOAD).leak();
    if std::env::args().nth(1).as_deref() == Some("overhead") {
        // Section 8, in a child started with `OTEL_*` naming the parent's
        // collector (the exporter reads them once, from the environment).
        return overhead(duration, data).await;
    }
    let raw_payload = Bytes::from(serde_json::to_vec(&Echo { data: data.into() }).expect("json"));

    println!("# catga benchmark");
    println!();
    println!("- machine: {} cores, {}", cores(), cpu_model());
    println!("- {}", nats_version());
    println!(
        "- payload: {} bytes of JSON each way; {seconds} s per cell after 0.5 s warm-up",
        raw_payload.len()
    );
    println!();
    if selected("reqreply") {
        request_reply(duration, data, raw_payload).await;
    }
    if selected("embedded") {
        embedded(duration, data).await;
    }
    if selected("parallel") {
        parallel(duration).await;
    }
    if selected("reliable") {
        reliable(duration, data).await;
    }
    if selected("fanout") {
        fanout().await;
    }
    if selected("scaling") {
        cluster::scaling(duration).await;
    }
    if selected("failover") {
        cluster::failover().await;
    }
    if selected("overhead") {
        overhead_exported().await;
    }
    if selected("takeover") {
        cluster::takeover().await;
    }
    if selected("keyed") {
        sagas::keyed().await;
    }
    if selected("rebalance") {
        sagas::rebalance();
    }
    if selected("journal") {
        sagas::journal().await;
    }
}

/// Command request/reply over NATS: catga vs raw async-nats.
async fn request_reply(duration: Duration, data: &'static str, raw_payload: Bytes) {
    let server = catga_tests::NatsServer::start();

    // catga: a runtime serving `echo`, and a separate client connection.
    let rt = up(serving(&["echo"])
        .nats_url(server.url())
        .instance_id("bench")
        .concurrency(1024))
    .await;
    let catga_client = Client::connect(&server.url()).await.expect("client");

    // raw async-nats, two responders on their own connection, each a
    // hand-written service loop in a queue group:
    // - "raw.echo" echoes the bytes: the floor, no work at all;
    // - "typed.echo" decodes the request and encodes the reply with
    //   serde_json, as a typed service written on async-nats does.
    let responder = async_nats::connect(server.url()).await.expect("raw responder");
    for (subject, typed) in [("raw.echo", false), ("typed.echo", true)] {
        let mut sub = responder
            .queue_subscribe(subject, "bench".to_owned())
            .await
            .expect("raw sub");
        let nats = responder.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(reply) = m.reply else { continue };
                let body = if typed {
                    match serde_json::from_slice::<Echo>(&m.payload) {
                        Ok(e) => Bytes::from(serde_json::to_vec(&Blob { data: e.data }).expect("json")),
                        Err(_) => continue,
                    }
                } else {
                    m.payload
                };
                let _ = nats.publish(reply, body).await;
            }
        });
    }
    responder.flush().await.expect("flush");
    let raw_client = async_nats::connect(server.url()).await.expect("raw requester");

    println!("## Command request/reply over NATS: catga vs raw async-nats");
    println!();
    println!(
        "| concurrency | raw bytes req/s | raw typed req/s | catga req/s | catga / raw typed (each round) | catga / raw bytes | raw typed CPU µs/req | catga CPU µs/req | raw typed p50 µs | catga p50 µs | raw typed p99 µs | catga p99 µs | raw typed allocs/req | catga allocs/req | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64, 256]);
    let rounds = rounds();
    for concurrency in levels {
        let mut cells: Vec<[Stats; 3]> = Vec::with_capacity(rounds);
        for round in 0..rounds {
            // Each round measures the three back to back, starting with a
            // different one, so that a change in the machine's load hits
            // each system alike; the table shows the median round.
            let mut out: [Option<Stats>; 3] = [None, None, None];
            for k in 0..3 {
                let which = (round + k) % 3;
                let stats = match which {
                    0 => {
                        let (c, p) = (raw_client.clone(), raw_payload.clone());
                        measure(concurrency, duration, move || {
                            let (c, p) = (c.clone(), p.clone());
                            async move { c.request("raw.echo", p).await.is_ok() }
                        })
                        .await
                    }
                    1 => {
                        let c = raw_client.clone();
                        measure(concurrency, duration, move || {
                            typed_request(c.clone(), "typed.echo", data)
                        })
                        .await
                    }
                    _ => {
                        let c = catga_client.clone();
                        measure(concurrency, duration, move || {
                            let c = c.clone();
                            async move { c.send(Echo { data: data.into() }).await.is_ok() }
                        })
                        .await
                    }
                };
                out[which] = Some(stats);
            }
            let [Some(b), Some(t), Some(c)] = out else {
                unreachable!("three cells")
            };
            cells.push([b, t, c]);
        }
        let ratio_typed = median(
            cells
                .iter()
                .map(|[_, t, c]| c.throughput() / t.throughput())
                .collect(),
        );
        let ratio_bytes = median(
            cells
                .iter()
                .map(|[b, _, c]| c.throughput() / b.throughput())
                .collect(),
        );
        // The round whose catga / raw typed ratio is the median one.
        let mid = cells
            .iter()
            .min_by(|x, y| {
                let dx = (x[2].throughput() / x[1].throughput() - ratio_typed).abs();
                let dy = (y[2].throughput() / y[1].throughput() - ratio_typed).abs();
                dx.total_cmp(&dy)
            })
            .expect("a round");
        let [bytes, typed, cat] = mid;
        let spread: Vec<String> = cells
            .iter()
            .map(|[_, t, c]| format!("{:.2}", c.throughput() / t.throughput()))
            .collect();
        if std::env::var_os("BENCH_DIAG").is_some() {
            let c = raw_client.clone();
            let server_side = measure(concurrency, duration, move || {
                typed_request(c.clone(), "bench.echo", data)
            })
            .await;
            let c = catga_client.clone();
            let client_side = measure(concurrency, duration, move || {
                let c = c.clone();
                async move { c.send(TypedEcho { data: data.into() }).await.is_ok() }
            })
            .await;
            eprintln!(
                "diag {concurrency}: raw client -> catga runtime {:.0} req/s ({:.1} allocs, {:.1} CPU us); catga client -> raw typed responder {:.0} req/s ({:.1} allocs, {:.1} CPU us); typed both sides {:.1} CPU us",
                server_side.throughput(),
                server_side.allocs_per_op,
                server_side.cpu_us_per_op,
                client_side.throughput(),
                client_side.allocs_per_op,
                client_side.cpu_us_per_op,
                typed.cpu_us_per_op
            );
        }
        println!(
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.2}x ({}) | {:.2}x | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            bytes.throughput(),
            typed.throughput(),
            cat.throughput(),
            ratio_typed,
            spread.join(", "),
            ratio_bytes,
            median(cells.iter().map(|[_, t, _]| t.cpu_us_per_op).collect()),
            median(cells.iter().map(|[_, _, c]| c.cpu_us_per_op).collect()),
            typed.p50_us,
            cat.p50_us,
            typed.p99_us,
            cat.p99_us,
            typed.allocs_per_op,
            cat.allocs_per_op,
            cells
                .iter()
                .map(|[b, t, c]| b.errors + t.errors + c.errors)
                .sum::<u64>(),
        );
    }
    rt.shutdown().await.expect("shutdown");
}

/// The embedded transport: round trips per second and allocations.
async fn embedded(duration: Duration, data: &'static str) {
    println!();
    println!("## Embedded transport (in-memory bus)");
    println!();
    let bus = MemoryBus::new();
    let mem_rt = up(serving(&["echo"]).memory(bus.clone()).concurrency(1024)).await;
    let mem_client = Client::memory(&bus);
    // Allocations per round trip, sequential, after a warm-up.
    for _ in 0..1000 {
        mem_client
            .send(Echo { data: data.into() })
            .await
            .expect("warm-up");
    }
    let n = 20_000u64;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        mem_client
            .send(Echo { data: data.into() })
            .await
            .expect("round trip");
    }
    let elapsed = start.elapsed();
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!("| concurrency | round trips/s | p50 µs | p99 µs | allocations per round trip |");
    println!("|---:|---:|---:|---:|---:|");
    // The bus alone, without the multi-thread scheduler waking its idle
    // worker on every hand-over: client and runtime on one current-thread
    // runtime.
    let single = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("current-thread runtime");
        rt.block_on(async move {
            let bus = MemoryBus::new();
            let served = up(serving(&["echo"]).memory(bus.clone())).await;
            let client = Client::memory(&bus);
            for _ in 0..1000 {
                client.send(Echo { data: data.into() }).await.expect("warm-up");
            }
            let n = 200_000u64;
            let start = Instant::now();
            for _ in 0..n {
                client.send(Echo { data: data.into() }).await.expect("round trip");
            }
            let per = start.elapsed() / n as u32;
            served.shutdown().await.expect("shutdown");
            per
        })
    })
    .join()
    .expect("current-thread bench");
    println!(
        "| 1, current-thread runtime | {:.0} | {:.2} | - | - |",
        1.0 / single.as_secs_f64(),
        single.as_secs_f64() * 1e6
    );
    println!(
        "| 1, main thread (cross-thread wake-ups) | {:.0} | - | - | {:.1} |",
        n as f64 / elapsed.as_secs_f64(),
        allocs as f64 / n as f64
    );
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    for concurrency in levels {
        let c = mem_client.clone();
        let d = data;
        let s = measure(concurrency, duration, move || {
            let c = c.clone();
            async move { c.send(Echo { data: d.into() }).await.is_ok() }
        })
        .await;
        println!(
            "| {concurrency} | {:.0} | {:.1} | {:.1} | - |",
            s.throughput(),
            s.p50_us,
            s.p99_us
        );
    }
    mem_rt.shutdown().await.expect("shutdown");
}

/// A CPU-bound handler on one task (`parallel = 1`) vs two
/// (`parallel = 2`), same work, same requesters, in one run; on the
/// embedded bus (no broker sharing the two cores) and over NATS.
async fn parallel(duration: Duration) {
    // About 50 µs of CPU per request on this machine.
    const ROUNDS: u64 = 40_000;
    println!();
    println!("## Parallel handlers: a CPU-bound handler on 1 vs 2 tasks");
    println!();
    println!("| transport | requesters | parallel = 1 req/s | parallel = 2 req/s | 2 / 1 |");
    println!("|---|---:|---:|---:|---:|");
    let server = catga_tests::NatsServer::start();
    for transport in ["memory", "nats"] {
        let bus = MemoryBus::new();
        let builder = serving(&["crunch_one", "crunch_two"]).instance_id("bench");
        let rt = up(if transport == "memory" {
            builder.memory(bus.clone())
        } else {
            builder.nats_url(server.url())
        })
        .await;
        let client = if transport == "memory" {
            Client::memory(&bus)
        } else {
            Client::connect(&server.url()).await.expect("client")
        };
        let c = client.clone();
        let one = measure(64, duration, move || {
            let c = c.clone();
            async move { c.send(CrunchOne { rounds: ROUNDS }).await.is_ok() }
        })
        .await;
        let c = client.clone();
        let two = measure(64, duration, move || {
            let c = c.clone();
            async move { c.send(CrunchTwo { rounds: ROUNDS }).await.is_ok() }
        })
        .await;
        println!(
            "| {transport} | 64 | {:.0} | {:.0} | {:.2}x |",
            one.throughput(),
            two.throughput(),
            two.throughput() / one.throughput()
        );
        rt.shutdown().await.expect("shutdown");
    }
}

/// Reliable delivery: durable events end to end, state commands, the
/// inbox; each against the raw baseline in the same run.
async fn reliable(duration: Duration, data: &'static str) {
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    let rt = up(serving(&["on_tick", "on_tick_once", "bump", "echo", "echo_once"])
        .nats_url(nats.url())
        .redis_url(redis.url())
        .instance_id("bench"))
    .await;
    let client = Client::connect(&nats.url()).await.expect("client");
    let raw = async_nats::connect(nats.url()).await.expect("raw client");
    let js = async_nats::jetstream::new(raw.clone());
    raw_durable_consumer(&js).await;
    raw_state_responder(&nats.url(), &redis.url()).await;

    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let publishers = 64;
    println!();
    println!("## Durable events: published (acknowledged) and handled, end to end");
    println!();
    println!(
        "{events} events from {publishers} publishers, each awaiting the stream's acknowledgement; the clock stops when the consumer has handled the last one. Median of {} rounds; ratios per round in parentheses.",
        rounds()
    );
    println!();
    println!("| consumer | events/s | vs raw JetStream |");
    println!("|---|---:|---:|");
    let mut per: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    // Round 0 warms up (stream files, consumers, connections) and is not
    // counted: the first measured round of a cold run came out 0.68x
    // against 0.9x after it.
    for round in 0..=rounds() {
        for k in 0..3 {
            let which = (round + k) % 3;
            let events = if round == 0 { events / 10 } else { events };
            let rate = match which {
                0 => {
                    let js = js.clone();
                    durable_run(events, publishers, move || {
                        let js = js.clone();
                        async move {
                            let body = serde_json::to_vec(&Tick { data: data.into() }).expect("json");
                            match js.publish("raw.tick", body.into()).await {
                                Ok(ack) => ack.await.is_ok(),
                                Err(_) => false,
                            }
                        }
                    })
                    .await
                }
                1 => {
                    let c = client.clone();
                    durable_run(events, publishers, move || {
                        let c = c.clone();
                        async move { c.publish_durable(Tick { data: data.into() }).await.is_ok() }
                    })
                    .await
                }
                _ => {
                    let c = client.clone();
                    durable_run(events, publishers, move || {
                        let c = c.clone();
                        async move { c.publish_durable(TickOnce { data: data.into() }).await.is_ok() }
                    })
                    .await
                }
            };
            if round > 0 {
                per[which].push(rate);
            }
        }
    }
    let ratios = |i: usize| -> (f64, String) {
        let rs: Vec<f64> = per[i].iter().zip(&per[0]).map(|(c, r)| c / r).collect();
        let text = rs
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        (median(rs), text)
    };
    println!(
        "| raw async-nats JetStream pull consumer, ack per message | {:.0} | 1.00x |",
        median(per[0].clone())
    );
    let (r, t) = ratios(1);
    println!(
        "| catga `#[event(durable)]` | {:.0} | {r:.2}x ({t}) |",
        median(per[1].clone())
    );
    let (r, t) = ratios(2);
    println!(
        "| catga `#[event(durable, idempotent)]` (Redis inbox) | {:.0} | {r:.2}x ({t}) |",
        median(per[2].clone())
    );

    println!();
    println!("## Commands with state (Redis), request/reply over NATS");
    println!();
    println!(
        "| concurrency | raw GET+SET req/s | catga load+save req/s | catga / raw | raw p50/p99 µs | catga p50/p99 µs | plain echo req/s | idempotent echo req/s | idempotent / plain | plain p50/p99 µs | idempotent p50/p99 µs | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let keys = Arc::new(AtomicU64::new(0));
    for concurrency in [16usize, 64] {
        let mut cells: Vec<[Stats; 4]> = Vec::new();
        for round in 0..rounds() {
            let mut out: [Option<Stats>; 4] = [None, None, None, None];
            for k in 0..4 {
                let which = (round + k) % 4;
                let key = {
                    let keys = Arc::clone(&keys);
                    move || format!("k{}", keys.fetch_add(1, Ordering::Relaxed) % 100_000)
                };
                let stats = match which {
                    0 => {
                        let c = raw.clone();
                        measure(concurrency, duration, move || {
                            let (c, key) = (c.clone(), key());
                            async move { c.request("raw.bump", key.into()).await.is_ok() }
                        })
                        .await
                    }
                    1 => {
                        let c = client.clone();
                        measure(concurrency, duration, move || {
                            let (c, key) = (c.clone(), key());
                            async move { c.send(Bump { key }).await.is_ok() }
                        })
                        .await
                    }
                    2 => {
                        let c = client.clone();
                        measure(concurrency, duration, move || {
                            let c = c.clone();
                            async move { c.send(Echo { data: data.into() }).await.is_ok() }
                        })
                        .await
                    }
                    _ => {
                        let c = client.clone();
                        measure(concurrency, duration, move || {
                            let c = c.clone();
                            async move {
                                c.send_with_id(EchoOnce { data: data.into() }, &catga::new_message_id())
                                    .await
                                    .is_ok()
                            }
                        })
                        .await
                    }
                };
                out[which] = Some(stats);
            }
            let [Some(a), Some(b), Some(c), Some(d)] = out else {
                unreachable!("four cells")
            };
            cells.push([a, b, c, d]);
        }
        let med = |i: usize| median(cells.iter().map(|c| c[i].throughput()).collect());
        let ratio = |i: usize, j: usize| {
            let rs: Vec<f64> = cells
                .iter()
                .map(|c| c[i].throughput() / c[j].throughput())
                .collect();
            let text = rs
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("{:.2}x ({text})", median(rs))
        };
        let lat = |i: usize| {
            format!(
                "{:.0}/{:.0}",
                median(cells.iter().map(|c| c[i].p50_us).collect()),
                median(cells.iter().map(|c| c[i].p99_us).collect())
            )
        };
        println!(
            "| {concurrency} | {:.0} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            med(0),
            med(1),
            ratio(1, 0),
            lat(0),
            lat(1),
            med(2),
            med(3),
            ratio(3, 2),
            lat(2),
            lat(3),
            cells.iter().flat_map(|c| c.iter().map(|s| s.errors)).sum::<u64>()
        );
    }
    rt.shutdown().await.expect("shutdown");
}

/// A burst of events to 3 replicas: how many each received, how many were
/// dropped, and how fast each absorbed them; catga `#[event]` replicas
/// against raw async-nats subscribers that decode the same JSON, on the
/// same server, in one run.
async fn fanout() {
    let burst: u64 = std::env::var("BENCH_BURST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let server = catga_tests::NatsServer::start();
    let publisher = async_nats::connect(server.url()).await.expect("publisher");
    println!();
    println!("## Event fan-out: a burst of {burst} events to 3 replicas");
    println!();
    println!(
        "| subscribers | received per replica (min) | dropped (sum) | absorb events/s per replica | publish s | CPU µs per event received (all sides) | allocations per event received (all sides) | vs raw typed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds() {
        for k in 0..2 {
            let which = (round + k) % 2;
            // BENCH_FAN=catga or raw: one side only (to profile it).
            let only = std::env::var("BENCH_FAN").ok();
            if only.as_deref().is_some_and(|o| o != ["raw", "catga"][which]) {
                continue;
            }
            let allocs = ALLOCATIONS.load(Ordering::Relaxed);
            let cpu = process_cpu_seconds();
            let (received, dropped, rate, publish_s) = if which == 0 {
                fan_raw(&server, &publisher, burst).await
            } else {
                fan_catga(&server, &publisher, burst).await
            };
            let allocs = (ALLOCATIONS.load(Ordering::Relaxed) - allocs) as f64 / (3 * received.max(1)) as f64;
            let cpu_us = (process_cpu_seconds() - cpu) * 1e6 / (3 * received.max(1)) as f64;
            rates[which].push(rate);
            println!(
                "| {} (round {}) | {received} ({:.1}%) | {dropped} | {rate:.0} | {publish_s:.2} | {cpu_us:.2} | {allocs:.1} | {} |",
                if which == 0 {
                    "raw async-nats, typed"
                } else {
                    "catga `#[event]`"
                },
                round + 1,
                received as f64 * 100.0 / burst as f64,
                if which == 1 {
                    format!("{:.2}x", rate / rates[0].last().copied().unwrap_or(rate))
                } else {
                    "1.00x".to_owned()
                }
            );
        }
    }
}

fn fan_payload(seq: u64) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Fan {
            seq,
            sku: "tea-leaves".into(),
        })
        .expect("json"),
    )
}

/// Publishes the burst; returns how long it took.
async fn publish_burst(publisher: &async_nats::Client, subject: &'static str, burst: u64) -> f64 {
    let started = Instant::now();
    for seq in 0..burst {
        publisher
            .publish(subject, fan_payload(seq))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    started.elapsed().as_secs_f64()
}

/// Waits until `count` stops moving for 500 ms (or reaches `target`);
/// returns the count and when it last moved.
async fn settle(count: impl Fn() -> u64, target: u64, since: Instant) -> (u64, f64) {
    let mut last = (count(), since.elapsed().as_secs_f64());
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count();
        if now != last.0 {
            last = (now, since.elapsed().as_secs_f64());
        }
        if now >= target || since.elapsed().as_secs_f64() - last.1 > 0.5 {
            return last;
        }
    }
}

async fn fan_raw(
    server: &catga_tests::NatsServer,
    publisher: &async_nats::Client,
    burst: u64,
) -> (u64, u64, f64, f64) {
    let counts: Arc<[AtomicU64; 3]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = async_nats::connect(server.url()).await.expect("subscriber");
        let mut sub = c.subscribe("raw.fan").await.expect("sub");
        c.flush().await.expect("flush");
        let counts = Arc::clone(&counts);
        tasks.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if serde_json::from_slice::<Fan>(&m.payload).is_ok() {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        clients.push(c);
    }
    let started = Instant::now();
    let publish_s = publish_burst(publisher, "raw.fan", burst).await;
    let min = || {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let (received, last) = settle(min, burst, started).await;
    let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    for t in tasks {
        t.abort();
    }
    (received, 3 * burst - total, received as f64 / last, publish_s)
}

async fn fan_catga(
    server: &catga_tests::NatsServer,
    publisher: &async_nats::Client,
    burst: u64,
) -> (u64, u64, f64, f64) {
    for c in &FANNED {
        c.store(0, Ordering::Relaxed);
    }
    let mut replicas = Vec::new();
    for id in ["fan1", "fan2", "fan3"] {
        replicas.push(up(serving(&["on_fan"]).nats_url(server.url()).instance_id(id)).await);
    }
    let started = Instant::now();
    let publish_s = publish_burst(publisher, "bench.fan", burst).await;
    let min = || {
        FANNED
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let (received, last) = settle(min, burst, started).await;
    let dropped: u64 = replicas.iter().map(Runtime::dropped_messages).sum();
    for rt in replicas {
        rt.shutdown().await.expect("shutdown");
    }
    (received, dropped, received as f64 / last, publish_s)
}

/// Publishes `events` from `publishers` tasks with `publish`, and returns
/// events per second from the first publish until the consumer counted
/// the last one.
async fn durable_run<F, Fut>(events: u64, publishers: u64, publish: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let publish = Arc::new(publish);
    let start_count = TICKS.load(Ordering::Relaxed);
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let publish = Arc::clone(&publish);
            tokio::spawn(async move {
                for _ in 0..events / publishers {
                    while !publish().await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher");
    }
    let target = start_count + events / publishers * publishers;
    let give_up = Instant::now() + Duration::from_secs(60);
    while TICKS.load(Ordering::Relaxed) < target && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let handled = TICKS.load(Ordering::Relaxed) - start_count;
    handled as f64 / start.elapsed().as_secs_f64()
}

/// The raw baseline's stream and durable pull consumer: decode, count, ack
/// each message, one at a time, as a consumer written on async-nats does.
async fn raw_durable_consumer(js: &async_nats::jetstream::Context) {
    use async_nats::jetstream::{consumer, stream};
    let stream = js
        .create_stream(stream::Config {
            name: "RAW_TICKS".to_owned(),
            subjects: vec!["raw.tick".to_owned()],
            ..Default::default()
        })
        .await
        .expect("raw stream");
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await
        .expect("raw consumer");
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .expect("raw pull");
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if serde_json::from_slice::<Tick>(&m.payload).is_ok() {
                TICKS.fetch_add(1, Ordering::Relaxed);
            }
            let _ = m.ack().await;
        }
    });
}

/// The raw baseline of a state command: a queue-group responder that, per
/// request (a task each), reads a counter with GET, writes it back plus
/// one with SET, and replies the value. No version check: what a service
/// without optimistic concurrency does.
async fn raw_state_responder(nats_url: &str, redis_url: &str) {
    let nats = async_nats::connect(nats_url).await.expect("raw responder");
    let redis = redis::Client::open(redis_url).expect("redis url");
    let conn = redis::aio::ConnectionManager::new(redis).await.expect("redis");
    let mut sub = nats
        .queue_subscribe("raw.bump", "bench".to_owned())
        .await
        .expect("raw sub");
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let (nats, mut conn) = (responder.clone(), conn.clone());
            tokio::spawn(async move {
                let key = format!("raw:{}", String::from_utf8_lossy(&m.payload));
                let n: Option<u64> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .ok()
                    .flatten();
                let n = n.unwrap_or(0) + 1;
                if redis::cmd("SET")
                    .arg(&key)
                    .arg(n)
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
                {
                    let _ = nats.publish(reply, n.to_string().into()).await;
                }
            });
        }
    });
    nats.flush().await.expect("flush");
}

/// One request the way a typed service on raw async-nats sends it: encode
/// `Echo` with serde_json, request, decode `Blob`.
async fn typed_request(nats: async_nats::Client, subject: &'static str, data: &'static str) -> bool {
    let Ok(body) = serde_json::to_vec(&Echo { data: data.into() }) else {
        return false;
    };
    match nats.request(subject, Bytes::from(body)).await {
        Ok(m) => serde_json::from_slice::<Blob>(&m.payload).is_ok(),
        Err(_) => false,
    }
}

/// User plus system CPU time of this process so far, from /proc (clock
/// ticks of 10 ms: about 1% resolution over a cell of a second at full
/// load).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn nats_version() -> String {
    let bin = std::env::var("CATGA_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server (version unknown)".to_owned())
}

/// [`Echo`] on its own subject, served by the runtime whose metrics are on.
#[command(subject = "bench.echo_metered", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct EchoMetered {
    /// Payload.
    pub data: Cow<'static, str>,
}

#[command(queue_group = "bench")]
async fn echo_metered(e: EchoMetered) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

/// What the bench's tracing layers record (section 8 switches it between
/// measurements): 0 nothing, 2 every span into a fmt sink, 3 every span
/// exported over OTLP.
static TRACING: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Section 8's parent: runs an OTLP collector over TLS (it asks for a
/// client certificate, as a hardened collector does) and section 8 in a
/// child process that exports its spans to it.
async fn overhead_exported() {
    let pki = catga_tests::Pki::new(false);
    let (endpoint, bodies) =
        catga_tests::collector::collector(Some(catga_tests::collector::mutual_tls(&pki))).await;
    let path = |n: &str| pki.path(n).display().to_string();
    let out = tokio::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("overhead")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", path("ca.pem"))
        .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", path("client.pem"))
        .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", path("client-key.pem"))
        .env_remove("OTEL_SDK_DISABLED")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("section 8 runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let bodies = bodies.lock().expect("bodies");
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "(The collector, in the parent process on the same 2 cores, received {} OTLP requests, {bytes} bytes.)",
        bodies.len()
    );
    println!();
}

/// Section 8: the same request/reply with observability off, with
/// Prometheus metrics on, with metrics plus tracing spans recorded, and
/// with metrics plus spans exported over OTLP/HTTPS.
async fn overhead(duration: Duration, data: &'static str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, util::SubscriberInitExt};

    // A subscriber that records every INFO span (the `handle` span of
    // each message with its fields) into a sink when `TRACING` is 2 (the
    // cost of recording, without an exporter's I/O), and exports them
    // over OTLP when it is 3. A dynamic filter is asked per span (a plain
    // `filter_fn` is cached per call site), so switching takes effect at
    // once.
    let recorded = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            TRACING.load(Ordering::Relaxed) == 2 && *m.level() <= tracing::Level::INFO
        }));
    let exported = catga::otlp_layer("catga-bench").map(|l| {
        l.with_filter(tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            TRACING.load(Ordering::Relaxed) == 3 && *m.level() <= tracing::Level::INFO
        }))
    });
    let exporting = exported.is_some();
    let _ = tracing_subscriber::registry()
        .with(recorded)
        .with(exported)
        .try_init();

    let server = catga_tests::NatsServer::start();
    // Metrics are one recorder per process, installed by the first runtime
    // with an HTTP endpoint; a runtime started before that, and warmed up
    // before it, keeps no-op handles: that is the "off" one.
    let off = up(serving(&["echo"])
        .nats_url(server.url())
        .instance_id("bench-off")
        .concurrency(1024))
    .await;
    let client = Client::connect(&server.url()).await.expect("client");
    client.send(Echo { data: data.into() }).await.expect("warm-up");
    let on = up(serving(&["echo_metered"])
        .nats_url(server.url())
        .instance_id("bench-on")
        .concurrency(1024)
        .http_addr("127.0.0.1:0"))
    .await;
    let metrics_addr = on.http_addr();

    println!("## Observability overhead: request/reply with metrics and tracing on vs off");
    println!();
    println!(
        "Off: no metrics recorder for this runtime, spans filtered out. Metrics: the Prometheus recorder of `CATGA_HTTP_ADDR` (per-handler counters, histogram, in-flight gauge). Metrics + spans: also every message's `handle` span recorded by a tracing-subscriber fmt layer into a sink (no exporter). Metrics + export: every `handle` span exported over OTLP/HTTP with TLS and a client certificate (the `otlp` feature's batch exporter) to a collector in another process."
    );
    println!();
    println!(
        "| concurrency | off req/s | metrics req/s | metrics + spans req/s | metrics + export req/s | metrics / off (each round) | metrics + spans / off (each round) | metrics + export / off (each round) | off CPU µs/req | metrics CPU µs/req | metrics + spans CPU µs/req | metrics + export CPU µs/req |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !exporting {
        println!("(no OTLP collector named: the export column measures nothing exported)");
    }
    let rounds = rounds();
    for concurrency in [16usize, 64] {
        let mut cells: Vec<[Stats; 4]> = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut out: [Option<Stats>; 4] = [None, None, None, None];
            for k in 0..4 {
                let which = (round + k) % 4;
                TRACING.store(
                    match which {
                        2 => 2,
                        3 => 3,
                        _ => 0,
                    },
                    Ordering::Relaxed,
                );
                let c = client.clone();
                let stats = if which == 0 {
                    measure(concurrency, duration, move || {
                        let c = c.clone();
                        async move { c.send(Echo { data: data.into() }).await.is_ok() }
                    })
                    .await
                } else {
                    measure(concurrency, duration, move || {
                        let c = c.clone();
                        async move { c.send(EchoMetered { data: data.into() }).await.is_ok() }
                    })
                    .await
                };
                out[which] = Some(stats);
            }
            TRACING.store(0, Ordering::Relaxed);
            let [Some(o), Some(m), Some(t), Some(x)] = out else {
                unreachable!("four cells")
            };
            cells.push([o, m, t, x]);
        }
        let ratios = |i: usize| -> (f64, String) {
            let all: Vec<f64> = cells
                .iter()
                .map(|c| c[i].throughput() / c[0].throughput())
                .collect();
            let spread = all
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            (median(all), spread)
        };
        let (m, m_spread) = ratios(1);
        let (t, t_spread) = ratios(2);
        let (x, x_spread) = ratios(3);
        let rate = |i: usize| median(cells.iter().map(|c| c[i].throughput()).collect());
        let cpu = |i: usize| median(cells.iter().map(|c| c[i].cpu_us_per_op).collect());
        println!(
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.0} | {m:.2}x ({m_spread}) | {t:.2}x ({t_spread}) | {x:.2}x ({x_spread}) | {:.1} | {:.1} | {:.1} | {:.1} |",
            rate(0),
            rate(1),
            rate(2),
            rate(3),
            cpu(0),
            cpu(1),
            cpu(2),
            cpu(3),
        );
    }
    println!();
    // The metered runtime did count: read back what /metrics says.
    if let Some(addr) = metrics_addr {
        let (_, body) = tokio::task::spawn_blocking(move || catga_tests::http::get(addr, "/metrics"))
            .await
            .expect("scrape");
        let received = body
            .lines()
            .find(|l| l.starts_with("catga_messages_received_total{handler=\"catga_bench::echo_metered\""))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("none");
        println!("(/metrics of the metered runtime: {received} messages received.)");
        println!();
    }
    on.shutdown().await.expect("shutdown");
    off.shutdown().await.expect("shutdown");
}
