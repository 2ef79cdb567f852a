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
//! 13. Store shards: one Redis master against three.
//! 14. Outbox relay: one shard (one relay, pipelined) against three (a
//!     relay per shard, one event at a time per stream).
//! 14. Time: how late delayed messages and job occurrences fire with 1,
//!     1,000 and 100,000 delayed messages pending, and their cost.
//! 15. Regions: a command answered in the caller's region vs across a
//!     gateway with an injected delay, and the failover to the other
//!     region when the caller's region loses its replica.
//!
//! `BENCH_SECONDS` sets the measuring time per cell (default 3);
//! `BENCH_LEVELS=64,256` picks the concurrency levels (default 1,16,64,256);
//! `BENCH_ONLY=reqreply,embedded,parallel,reliable,inbox,fanout,scaling,failover,overhead,takeover,keyed,rebalance,journal,shards,relay,time,regions`
//! picks sections;
//! `BENCH_BURST` sets the fan-out burst (default 1,000,000);
//! `BENCH_KEYED_STREAMS=1,3`, `BENCH_KEYED_CONCURRENCY=2,4` and
//! `BENCH_KEYED_REPLICAS=1,3,5` pick the keyed section's layouts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

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

/// Payload characters: with the JSON wrapping, about 140 bytes on the wire.
const PAYLOAD: usize = 128;

use measure::{cores, cpu_model, nats_version, selected};
use reqreply::Echo;

mod cluster;
mod fanout;
mod measure;
mod overhead;
mod regions;
mod reliable;
mod reqreply;
mod sagas;
mod shards;
mod time;

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
        return overhead::overhead(duration, data).await;
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
        reqreply::request_reply(duration, data, raw_payload).await;
    }
    if selected("embedded") {
        reqreply::embedded(duration, data).await;
    }
    if selected("parallel") {
        reqreply::parallel(duration).await;
    }
    if selected("reliable") {
        reliable::reliable(duration, data).await;
    }
    if selected("inbox") {
        reliable::inbox(duration, data).await;
    }
    if selected("fanout") {
        fanout::fanout().await;
    }
    if selected("scaling") {
        cluster::scaling(duration).await;
    }
    if selected("failover") {
        cluster::failover().await;
    }
    if selected("overhead") {
        overhead::overhead_exported().await;
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
    if selected("shards") {
        shards::shards(duration).await;
    }
    if selected("relay") {
        shards::relay().await;
    }
    if selected("time") {
        time::time().await;
    }
    if selected("regions") {
        regions::regions(duration, data).await;
    }
}
