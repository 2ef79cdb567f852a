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
//! `BENCH_SECONDS` sets the measuring time per cell (default 3);
//! `BENCH_LEVELS=64,256` picks the concurrency levels (default 1,16,64,256).

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Client, MemoryBus, Result, Runtime, command};
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

/// Payload characters: with the JSON wrapping, about 140 bytes on the wire.
const PAYLOAD: usize = 128;

struct Stats {
    ops: u64,
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
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Stats {
        ops: all.len() as u64,
        allocs_per_op: allocs as f64 / total.max(1) as f64,
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let duration = Duration::from_secs(seconds);
    let data: &'static str = "x".repeat(PAYLOAD).leak();
    let raw_payload = Bytes::from(serde_json::to_vec(&Echo { data: data.into() }).expect("json"));

    let server = catga_tests::NatsServer::start();
    println!("# catga benchmark");
    println!();
    println!("- machine: {} cores, {}", cores(), cpu_model());
    println!("- {}", nats_version());
    println!(
        "- payload: {} bytes of JSON each way; {seconds} s per cell after 0.5 s warm-up",
        raw_payload.len()
    );
    println!();

    // catga: a runtime serving `echo`, and a separate client connection.
    let rt = Runtime::builder()
        .nats_url(server.url())
        .instance_id("bench")
        .handlers(|s| s.name().starts_with("catga_bench::"))
        .concurrency(1024)
        .start()
        .await
        .expect("runtime");
    rt.ready().await.expect("ready");
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
        "| concurrency | raw bytes req/s | raw typed req/s | catga req/s | catga / raw typed | catga / raw bytes | raw typed p50 µs | catga p50 µs | raw typed p99 µs | catga p99 µs | raw typed allocs/req | catga allocs/req | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64, 256]);
    for concurrency in levels {
        let c = raw_client.clone();
        let p = raw_payload.clone();
        let bytes = measure(concurrency, duration, move || {
            let c = c.clone();
            let p = p.clone();
            async move { c.request("raw.echo", p).await.is_ok() }
        })
        .await;
        let c = raw_client.clone();
        let typed = measure(concurrency, duration, move || {
            let c = c.clone();
            typed_request(c, "typed.echo", data)
        })
        .await;
        let c = catga_client.clone();
        let cat = measure(concurrency, duration, move || {
            let c = c.clone();
            async move { c.send(Echo { data: data.into() }).await.is_ok() }
        })
        .await;
        if std::env::var_os("BENCH_DIAG").is_some() {
            let c = raw_client.clone();
            let server_side = measure(concurrency, duration, move || {
                let c = c.clone();
                typed_request(c, "bench.echo", data)
            })
            .await;
            let c = catga_client.clone();
            let client_side = measure(concurrency, duration, move || {
                let c = c.clone();
                async move { c.send(TypedEcho { data: data.into() }).await.is_ok() }
            })
            .await;
            eprintln!(
                "diag {concurrency}: raw client -> catga runtime {:.0} req/s ({:.1} allocs); catga client -> raw typed responder {:.0} req/s ({:.1} allocs)",
                server_side.throughput(),
                server_side.allocs_per_op,
                client_side.throughput(),
                client_side.allocs_per_op
            );
        }
        println!(
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            bytes.throughput(),
            typed.throughput(),
            cat.throughput(),
            cat.throughput() / typed.throughput(),
            cat.throughput() / bytes.throughput(),
            typed.p50_us,
            cat.p50_us,
            typed.p99_us,
            cat.p99_us,
            typed.allocs_per_op,
            cat.allocs_per_op,
            bytes.errors + typed.errors + cat.errors,
        );
    }
    rt.shutdown().await.expect("shutdown");

    println!();
    println!("## Embedded transport (in-memory bus)");
    println!();
    let bus = MemoryBus::new();
    let mem_rt = Runtime::builder()
        .memory(bus.clone())
        .handlers(|s| s.name().starts_with("catga_bench::"))
        .concurrency(1024)
        .start()
        .await
        .expect("memory runtime");
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
    println!(
        "| 1, main thread (cross-thread wake-ups) | {:.0} | - | - | {:.1} |",
        n as f64 / elapsed.as_secs_f64(),
        allocs as f64 / n as f64
    );
    for concurrency in [1usize, 16, 64] {
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
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server (version unknown)".to_owned())
}
