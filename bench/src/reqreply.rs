//! Sections 1 to 3: request/reply against raw async-nats, the embedded
//! transport, and a CPU-bound handler on one task vs two.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Client, MemoryBus, Result, command};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::ALLOCATIONS;
use crate::measure::*;

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
pub(crate) fn crunch(rounds: u64) -> u64 {
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

/// Command request/reply over NATS: catga vs raw async-nats.
pub(crate) async fn request_reply(duration: Duration, data: &'static str, raw_payload: Bytes) {
    let server = catga_tests::NatsServer::start();

    // catga: a runtime serving `echo`, and a separate client connection.
    let rt = up(serving(&["reqreply::echo"])
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
    let mut sub = responder
        .queue_subscribe("raw.echo", "bench".to_owned())
        .await
        .expect("raw sub");
    let nats = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let _ = nats.publish(reply, m.payload).await;
        }
    });
    serve_typed_echo(&responder, "typed.echo").await;
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
pub(crate) async fn embedded(duration: Duration, data: &'static str) {
    println!();
    println!("## Embedded transport (in-memory bus)");
    println!();
    let bus = MemoryBus::new();
    let mem_rt = up(serving(&["reqreply::echo"]).memory(bus.clone()).concurrency(1024)).await;
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
    // Named, so that a profile can pick this thread out
    // (`perf report --comm embedded-single`).
    let single = std::thread::Builder::new()
        .name("embedded-single".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("current-thread runtime");
            rt.block_on(async move {
                let bus = MemoryBus::new();
                let served = up(serving(&["reqreply::echo"]).memory(bus.clone())).await;
                let client = Client::memory(&bus);
                for _ in 0..1000 {
                    client.send(Echo { data: data.into() }).await.expect("warm-up");
                }
                // `BENCH_EMBEDDED_TRIPS` lengthens the run for a profile.
                let n: u64 = std::env::var("BENCH_EMBEDDED_TRIPS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(200_000);
                let start = Instant::now();
                for _ in 0..n {
                    client.send(Echo { data: data.into() }).await.expect("round trip");
                }
                let per = start.elapsed() / n as u32;
                served.shutdown().await.expect("shutdown");
                per
            })
        })
        .expect("current-thread thread")
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
pub(crate) async fn parallel(duration: Duration) {
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
        let builder = serving(&["reqreply::crunch_one", "reqreply::crunch_two"]).instance_id("bench");
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

/// Answers `subject` on `nats` (queue group `bench`) the way a typed
/// service on raw async-nats does: decode `Echo`, encode `Blob`, reply.
pub(crate) async fn serve_typed_echo(nats: &async_nats::Client, subject: &'static str) {
    let mut sub = nats
        .queue_subscribe(subject, "bench".to_owned())
        .await
        .expect("raw sub");
    let replies = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let Ok(e) = serde_json::from_slice::<Echo>(&m.payload) else {
                continue;
            };
            let body = Bytes::from(serde_json::to_vec(&Blob { data: e.data }).expect("json"));
            let _ = replies.publish(reply, body).await;
        }
    });
}

/// One request the way a typed service on raw async-nats sends it: encode
/// `Echo` with serde_json, request, decode `Blob`.
pub(crate) async fn typed_request(
    nats: async_nats::Client,
    subject: &'static str,
    data: &'static str,
) -> bool {
    let Ok(body) = serde_json::to_vec(&Echo { data: data.into() }) else {
        return false;
    };
    match nats.request(subject, Bytes::from(body)).await {
        Ok(m) => serde_json::from_slice::<Blob>(&m.payload).is_ok(),
        Err(_) => false,
    }
}
