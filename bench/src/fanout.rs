//! Section 5: event fan-out to 3 replicas against raw subscribers.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Result, Runtime, event};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::ALLOCATIONS;
use crate::measure::*;

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
pub(crate) static FANNED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

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

/// A burst of events to 3 replicas: how many each received, how many were
/// dropped, and how fast each absorbed them; catga `#[event]` replicas
/// against raw async-nats subscribers that decode the same JSON, on the
/// same server, in one run.
pub(crate) async fn fanout() {
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

pub(crate) fn fan_payload(seq: u64) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Fan {
            seq,
            sku: "tea-leaves".into(),
        })
        .expect("json"),
    )
}

/// Publishes the burst; returns how long it took.
pub(crate) async fn publish_burst(publisher: &async_nats::Client, subject: &'static str, burst: u64) -> f64 {
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
pub(crate) async fn settle(count: impl Fn() -> u64, target: u64, since: Instant) -> (u64, f64) {
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

pub(crate) async fn fan_raw(
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

pub(crate) async fn fan_catga(
    server: &catga_tests::NatsServer,
    publisher: &async_nats::Client,
    burst: u64,
) -> (u64, u64, f64, f64) {
    for c in &FANNED {
        c.store(0, Ordering::Relaxed);
    }
    let mut replicas = Vec::new();
    for id in ["fan1", "fan2", "fan3"] {
        replicas.push(
            up(serving(&["fanout::on_fan"])
                .nats_url(server.url())
                .instance_id(id))
            .await,
        );
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
