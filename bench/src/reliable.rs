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
    raw_cas_responder(&nats.url(), &redis.url()).await;

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
        "| concurrency | raw GET+SET req/s | raw Lua CAS req/s | catga load+save req/s | catga / raw GET+SET | catga / raw Lua CAS | raw CAS p50/p99 µs | catga p50/p99 µs | plain echo req/s | idempotent echo req/s | idempotent / plain | plain p50/p99 µs | idempotent p50/p99 µs | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let keys = Arc::new(AtomicU64::new(0));
    for concurrency in [16usize, 64] {
        let mut cells: Vec<[Stats; 5]> = Vec::new();
        for round in 0..rounds() {
            let mut out: [Option<Stats>; 5] = [None, None, None, None, None];
            for k in 0..5 {
                let which = (round + k) % 5;
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
                    3 => {
                        let c = raw.clone();
                        measure(concurrency, duration, move || {
                            let (c, key) = (c.clone(), key());
                            async move {
                                // The raw CAS responder replies an empty
                                // body when its retries ran out.
                                c.request("raw.cas", key.into())
                                    .await
                                    .is_ok_and(|m| !m.payload.is_empty())
                            }
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
            let [Some(a), Some(b), Some(c), Some(d), Some(e)] = out else {
                unreachable!("five cells")
            };
            // In the table's order: raw GET+SET, raw CAS, catga load+save,
            // plain echo, idempotent echo.
            cells.push([a, d, b, c, e]);
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
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            med(0),
            med(1),
            med(2),
            ratio(2, 0),
            ratio(2, 1),
            lat(1),
            lat(2),
            med(3),
            med(4),
            ratio(4, 3),
            lat(3),
            lat(4),
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

/// Checks a counter's version (KEYS[1], field `v`) against `ARGV[1]` and
/// writes version + 1 and data `ARGV[2]`: 1, or 0 if the version moved.
const RAW_CAS: &str = r"
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', tonumber(ARGV[1]) + 1, 'd', ARGV[2])
return 1
";

/// The fair raw baseline of a state command: a queue-group responder
/// that, per request (a task each), reads a counter and its version with
/// `HMGET` and writes it back plus one with a hand-written Lua
/// compare-and-set on the version, trying again (up to 10 times, like
/// the catga handler's `retry = 10`) when another request moved it; it
/// replies the value, or an empty body if its tries ran out. What a
/// careful service written directly on redis does.
pub(crate) async fn raw_cas_responder(nats_url: &str, redis_url: &str) {
    let nats = async_nats::connect(nats_url).await.expect("raw responder");
    let redis = redis::Client::open(redis_url).expect("redis url");
    let conn = redis::aio::ConnectionManager::new(redis).await.expect("redis");
    let script = Arc::new(redis::Script::new(RAW_CAS));
    let mut sub = nats
        .queue_subscribe("raw.cas", "bench".to_owned())
        .await
        .expect("raw sub");
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let (nats, mut conn, script) = (responder.clone(), conn.clone(), Arc::clone(&script));
            tokio::spawn(async move {
                let key = format!("rawcas:{}", String::from_utf8_lossy(&m.payload));
                let mut answer = String::new();
                for _ in 0..10 {
                    let Ok((v, d)) = redis::cmd("HMGET")
                        .arg(&key)
                        .arg("v")
                        .arg("d")
                        .query_async::<(Option<u64>, Option<u64>)>(&mut conn)
                        .await
                    else {
                        break;
                    };
                    let n = d.unwrap_or(0) + 1;
                    match script
                        .key(&key)
                        .arg(v.unwrap_or(0))
                        .arg(n)
                        .invoke_async::<i64>(&mut conn)
                        .await
                    {
                        Ok(1) => {
                            answer = n.to_string();
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
                let _ = nats.publish(reply, answer.into()).await;
            });
        }
    });
    nats.flush().await.expect("flush");
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

/// Redis' CPU seconds (user + system) and commands processed so far, from
/// `INFO`: what the server spent, which the process' own CPU leaves out.
async fn redis_counters(conn: &mut redis::aio::MultiplexedConnection) -> (f64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let field = |name: &str| -> Option<&str> {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
    };
    let cpu = ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .filter_map(|n| field(n).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    let commands = field("total_commands_processed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, commands)
}

/// Claims an id (KEYS[1]) with `ARGV[1]` for `ARGV[2]` ms: '' if
/// claimed, else what it holds.
const RAW_CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
";

/// Keeps the answer `ARGV[2]` for `ARGV[3]` ms if the claim `ARGV[1]`
/// still holds KEYS[1]: 1, else 0.
const RAW_FINISH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The raw baselines of the inbox section, on their own connections: a
/// typed echo responder ("inbox.typed"), and the same with a hand-written
/// inbox ("inbox.once"): per request (a task each) it claims the
/// request's id (header `Msg-Id`) with one Lua script, decodes and
/// encodes, keeps the answer with a second script if its claim still
/// holds, and replies (an answer kept before is replied as is). The same
/// two round trips catga's inbox makes, written directly on redis-rs.
async fn raw_inbox_responders(nats_url: &str, redis_url: &str) {
    let nats = async_nats::connect(nats_url).await.expect("raw responder");
    let redis = redis::Client::open(redis_url).expect("redis url");
    let conn = redis::aio::ConnectionManager::new(redis).await.expect("redis");
    let (claim, finish) = (
        Arc::new(redis::Script::new(RAW_CLAIM)),
        Arc::new(redis::Script::new(RAW_FINISH)),
    );
    crate::reqreply::serve_typed_echo(&nats, "inbox.typed").await;
    let mut once = nats
        .queue_subscribe("inbox.once", "bench".to_owned())
        .await
        .expect("raw sub");
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = once.next().await {
            let Some(reply) = m.reply.clone() else { continue };
            let (nats, mut conn) = (responder.clone(), conn.clone());
            let (claim, finish) = (Arc::clone(&claim), Arc::clone(&finish));
            tokio::spawn(async move {
                let Some(id) = m.headers.as_ref().and_then(|h| h.get("Msg-Id")) else {
                    return;
                };
                let key = format!("rawinbox:{id}");
                let mark = format!("P:{}", catga::new_message_id());
                let Ok(found) = claim
                    .key(&key)
                    .arg(&mark)
                    .arg(60_000)
                    .invoke_async::<Vec<u8>>(&mut conn)
                    .await
                else {
                    return;
                };
                if !found.is_empty() {
                    let _ = nats.publish(reply, found.into()).await;
                    return;
                }
                let Ok(e) = serde_json::from_slice::<Echo>(&m.payload) else {
                    return;
                };
                let body = serde_json::to_vec(&Blob { data: e.data }).expect("json");
                if let Ok(1) = finish
                    .key(&key)
                    .arg(&mark)
                    .arg(body.as_slice())
                    .arg(600_000)
                    .invoke_async::<i64>(&mut conn)
                    .await
                {
                    let _ = nats.publish(reply, body.into()).await;
                }
            });
        }
    });
    nats.flush().await.expect("flush");
}

/// The inbox alone (`BENCH_ONLY=inbox`): the same echo as a plain and as
/// an idempotent command, each request with a fresh message id, against
/// a raw typed responder and a raw one with a hand-written inbox (see
/// [`raw_inbox_responders`]), at `BENCH_LEVELS` (default 1, 16, 64); besides
/// the process' CPU per request, Redis' CPU and the commands it ran per
/// request.
pub(crate) async fn inbox(duration: Duration, data: &'static str) {
    let nats = catga_tests::NatsServer::start();
    let redis = catga_tests::RedisServer::start();
    let rt = up(serving(&["reqreply::echo", "reliable::echo_once"])
        .nats_url(nats.url())
        .redis_url(redis.url())
        .instance_id("bench"))
    .await;
    raw_inbox_responders(&nats.url(), &redis.url()).await;
    let client = Client::connect(&nats.url()).await.expect("client");
    let raw = async_nats::connect(nats.url()).await.expect("raw client");
    let payload = bytes::Bytes::from(serde_json::to_vec(&Echo { data: data.into() }).expect("json"));
    let mut info = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|s| s.split(',').filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    println!();
    println!("## The inbox: idempotent against plain commands");
    println!();
    println!(
        "| concurrency | raw typed req/s | raw inbox req/s | raw inbox / raw typed | catga plain req/s | catga idempotent req/s | idempotent / plain (each round) | idempotent / raw inbox | plain CPU µs/req | idempotent CPU µs/req | raw inbox CPU µs/req | Redis CPU µs/req idempotent / raw inbox | Redis commands per req idempotent / raw inbox | plain allocs/req | idempotent allocs/req | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    type Cell = (Stats, f64, f64);
    for concurrency in levels {
        let mut cells: Vec<[Cell; 4]> = Vec::new();
        for round in 0..rounds() {
            let mut out: [Option<Cell>; 4] = [None, None, None, None];
            for k in 0..4 {
                let which = (round + k) % 4;
                let before = redis_counters(&mut info).await;
                let stats = match which {
                    0 => {
                        let (c, p) = (raw.clone(), payload.clone());
                        measure(concurrency, duration, move || {
                            let (c, p) = (c.clone(), p.clone());
                            async move {
                                c.request("inbox.typed", p)
                                    .await
                                    .is_ok_and(|m| serde_json::from_slice::<Blob>(&m.payload).is_ok())
                            }
                        })
                        .await
                    }
                    1 => {
                        let (c, p) = (raw.clone(), payload.clone());
                        measure(concurrency, duration, move || {
                            let (c, p) = (c.clone(), p.clone());
                            async move {
                                let mut headers = async_nats::HeaderMap::new();
                                headers.insert("Msg-Id", catga::new_message_id().as_str());
                                c.request_with_headers("inbox.once", headers, p)
                                    .await
                                    .is_ok_and(|m| serde_json::from_slice::<Blob>(&m.payload).is_ok())
                            }
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
                let after = redis_counters(&mut info).await;
                // Requests made over the whole cell, warm-up included, as
                // Redis' counters count them.
                let made = (stats.ops + stats.errors).max(1) as f64 * (1.0 + 0.5 / stats.seconds);
                let redis_cpu = (after.0 - before.0) * 1e6 / made;
                // Less the two INFO calls.
                let commands = after.1.saturating_sub(before.1 + 2) as f64 / made;
                out[which] = Some((stats, redis_cpu, commands));
            }
            let [Some(a), Some(b), Some(c), Some(d)] = out else {
                unreachable!("four cells")
            };
            cells.push([a, b, c, d]);
        }
        let med = |f: &dyn Fn(&[Cell; 4]) -> f64| median(cells.iter().map(f).collect());
        let ratio = |i: usize, j: usize| {
            ratio_cell(
                cells
                    .iter()
                    .map(|c| c[i].0.throughput() / c[j].0.throughput())
                    .collect(),
            )
        };
        println!(
            "| {concurrency} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} | {:.1} | {} |",
            med(&|c| c[0].0.throughput()),
            med(&|c| c[1].0.throughput()),
            ratio(1, 0),
            med(&|c| c[2].0.throughput()),
            med(&|c| c[3].0.throughput()),
            ratio(3, 2),
            ratio(3, 1),
            med(&|c| c[2].0.cpu_us_per_op),
            med(&|c| c[3].0.cpu_us_per_op),
            med(&|c| c[1].0.cpu_us_per_op),
            med(&|c| c[3].1),
            med(&|c| c[1].1),
            med(&|c| c[3].2),
            med(&|c| c[1].2),
            med(&|c| c[2].0.allocs_per_op),
            med(&|c| c[3].0.allocs_per_op),
            cells
                .iter()
                .flat_map(|c| c.iter().map(|s| s.0.errors))
                .sum::<u64>()
        );
    }
    rt.shutdown().await.expect("shutdown");
}
