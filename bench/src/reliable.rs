//! Section 4: durable events, state and idempotent commands against raw
//! JetStream and Redis.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Result, command, event};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::measure::*;
use crate::reqreply::{Blob, Echo};

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

pub(crate) static TICKS: AtomicU64 = AtomicU64::new(0);

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
pub struct Counter(pub u64);

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

/// Reliable delivery: durable events end to end, state commands, the
/// inbox; each against the raw baseline in the same run.
pub(crate) async fn reliable(duration: Duration, data: &'static str) {
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    let rt = up(serving(&[
        "reliable::on_tick",
        "reliable::on_tick_once",
        "reliable::bump",
        "reqreply::echo",
        "reliable::echo_once",
    ])
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
        let text = per_round(&rs);
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
            ratio_cell(
                cells
                    .iter()
                    .map(|c| c[i].throughput() / c[j].throughput())
                    .collect(),
            )
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

/// Publishes `events` from `publishers` tasks with `publish`, and returns
/// events per second from the first publish until the consumer counted
/// the last one.
pub(crate) async fn durable_run<F, Fut>(events: u64, publishers: u64, publish: F) -> f64
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
pub(crate) async fn raw_durable_consumer(js: &async_nats::jetstream::Context) {
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
pub(crate) async fn raw_state_responder(nats_url: &str, redis_url: &str) {
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
