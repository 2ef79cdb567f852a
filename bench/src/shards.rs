//! Section: store shards (`CATGA_STORE_SHARDS`) on a 3-master Redis
//! Cluster: how evenly a sharded service's Redis commands spread over the
//! masters, and the throughput of keyed state and idempotent commands on
//! one master against three. Section `relay`: how fast the outbox's
//! events reach the broker with one shard (one relay, pipelined) and with
//! three (a relay per shard, each stream's events in atomic batches).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use catga::{Client, Result, command, event};
use serde::{Deserialize, Serialize};

use crate::measure::*;
use crate::reliable::Counter;

/// Adds one to an account's counter, once per message id, in the
/// account's shard.
#[command(subject = "bench.shards.deposit", reply = u64, idempotent, key = account)]
#[derive(Serialize, Deserialize, Clone)]
pub struct ShardDeposit {
    /// The account, and the key that places the command's writes.
    pub account: String,
}

/// Adds one to an account's counter (no inbox), in the account's shard.
#[command(subject = "bench.shards.bump", reply = u64, key = account)]
#[derive(Serialize, Deserialize, Clone)]
pub struct ShardBump {
    /// The account.
    pub account: String,
}

async fn add_one(ctx: &catga::Context, account: String) -> Result<u64> {
    let mut c = ctx
        .try_load::<Counter>(&account)
        .await?
        .unwrap_or_else(|| catga::Versioned::new(account, Counter::default()));
    c.0 += 1;
    let n = c.0;
    ctx.save(c).await?;
    Ok(n)
}

#[command(queue_group = "bench-shards", retry = 10)]
async fn shard_deposit(ctx: &catga::Context, d: ShardDeposit) -> Result<u64> {
    add_one(ctx, d.account).await
}

#[command(queue_group = "bench-shards", retry = 10)]
async fn shard_bump(ctx: &catga::Context, b: ShardBump) -> Result<u64> {
    add_one(ctx, b.account).await
}

/// Commands a Redis node ran so far (`INFO commandstats`), all kinds.
fn commands_run(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?.split_once(':')?.1;
            rest.strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The three layouts measured, in order.
const LAYOUTS: [&str; 3] = [
    "1 Redis server",
    "3-master cluster, 1 shard",
    "3-master cluster, 3 shards",
];

pub(crate) async fn shards(duration: Duration) {
    let nats = catga_tests::NatsServer::start();
    // Persistent like the cluster's masters (append-only, fsync on every
    // write): the layouts differ in their topology only.
    let single = catga_tests::RedisServer::start_persistent();
    let cluster = catga_tests::RedisCluster::start();
    let client = Client::connect(&nats.url()).await.expect("client");
    let accounts = Arc::new(AtomicU64::new(0));
    let concurrency = 64;
    println!();
    println!("## Store shards: keyed commands on one Redis master and on three");
    println!();
    println!(
        "Keyed commands over 10,000 accounts at concurrency {concurrency}, one replica; every Redis \
         append-only with fsync on each write. Median of {} rounds, layouts in turn; ratios against \
         one Redis server in the same round.",
        rounds()
    );
    println!();
    // Per layout, per round: (idempotent, plain) req/s; for the sharded
    // layout, each master's share of the commands.
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); LAYOUTS.len()];
    let mut shares: Vec<Vec<f64>> = Vec::new();
    let mut errors = 0;
    for round in 0..rounds() {
        for k in 0..LAYOUTS.len() {
            let which = (round + k) % LAYOUTS.len();
            let b = serving(&["shards::shard_deposit", "shards::shard_bump"])
                .nats_url(nats.url())
                .service(format!("bench-shards-{round}-{which}"))
                .instance_id("bench");
            let b = match which {
                0 => b.redis_url(single.url()),
                1 => b.redis_cluster(&cluster.urls()),
                _ => b.redis_cluster(&cluster.urls()).store_shards(3),
            };
            let rt = up(b).await;
            let before: Vec<u64> = cluster.nodes.iter().map(|n| commands_run(n.port())).collect();
            let key = {
                let accounts = Arc::clone(&accounts);
                move || format!("acct-{}", accounts.fetch_add(7919, Ordering::Relaxed) % 10_000)
            };
            let once = {
                let (c, key) = (client.clone(), key.clone());
                measure(concurrency, duration, move || {
                    let (c, account) = (c.clone(), key());
                    async move {
                        c.send_with_id(ShardDeposit { account }, &catga::new_message_id())
                            .await
                            .is_ok()
                    }
                })
                .await
            };
            let plain = {
                let c = client.clone();
                measure(concurrency, duration, move || {
                    let (c, account) = (c.clone(), key());
                    async move { c.send(ShardBump { account }).await.is_ok() }
                })
                .await
            };
            if which == 2 {
                let ran: Vec<f64> = cluster
                    .nodes
                    .iter()
                    .zip(&before)
                    .map(|(n, b)| (commands_run(n.port()) - b) as f64)
                    .collect();
                shares.push(ran);
            }
            errors += once.errors + plain.errors;
            rates[which].push((once.throughput(), plain.throughput()));
            rt.shutdown().await.expect("shutdown");
        }
    }
    let ratio_text = |layout: usize, pick: fn(&(f64, f64)) -> f64| {
        ratio_cell(
            rates[layout]
                .iter()
                .zip(&rates[0])
                .map(|(l, base)| pick(l) / pick(base))
                .collect(),
        )
    };
    println!("| layout | idempotent req/s | vs 1 server | plain state req/s | vs 1 server |");
    println!("|---|---:|---:|---:|---:|");
    for (i, name) in LAYOUTS.iter().enumerate() {
        let once = median(rates[i].iter().map(|r| r.0).collect());
        let plain = median(rates[i].iter().map(|r| r.1).collect());
        println!(
            "| {name} | {once:.0} | {} | {plain:.0} | {} |",
            ratio_text(i, |r| r.0),
            ratio_text(i, |r| r.1)
        );
    }
    println!();
    println!("Each master's share of the Redis commands in the 3-shard layout, per round (busiest / mean):");
    println!();
    let mut by_round = BTreeMap::new();
    for (round, ran) in shares.iter().enumerate() {
        let total: f64 = ran.iter().sum();
        let mean = total / ran.len() as f64;
        let busiest = ran.iter().copied().fold(0.0, f64::max);
        let parts = ran
            .iter()
            .map(|r| format!("{:.0} %", 100.0 * r / total))
            .collect::<Vec<_>>()
            .join(" / ");
        by_round.insert(round, busiest / mean);
        println!(
            "- round {}: {parts} of {total:.0} commands ({:.2}x)",
            round + 1,
            busiest / mean
        );
    }
    println!();
    println!(
        "Busiest master / mean, median of rounds: {:.2}x; errors: {errors}",
        median(by_round.into_values().collect())
    );
}

/// Adds one to an account's counter and saves a [`RelayDeposited`] with
/// it, through the outbox of the account's shard.
#[command(subject = "bench.relay.deposit", reply = u64, key = account)]
#[derive(Serialize, Deserialize, Clone)]
pub struct RelayDeposit {
    /// The account.
    pub account: String,
}

/// What [`RelayDeposit`] saved, relayed by the outbox.
#[event(subject = "bench.relay.deposited")]
#[derive(Serialize, Deserialize, Clone)]
pub struct RelayDeposited {
    /// The account.
    pub account: String,
    /// Its counter.
    pub n: u64,
}

/// [`RelayDeposit`] whose event's stream the benchmark makes itself,
/// without `allow_atomic`: relayed one event at a time.
#[command(subject = "bench.relay.deposit_stepwise", reply = u64, key = account)]
#[derive(Serialize, Deserialize, Clone)]
pub struct StepwiseDeposit {
    /// The account.
    pub account: String,
}

/// What [`StepwiseDeposit`] saved.
#[event(subject = "bench.relay.deposited_stepwise")]
#[derive(Serialize, Deserialize, Clone)]
pub struct StepwiseDeposited {
    /// The account.
    pub account: String,
    /// Its counter.
    pub n: u64,
}

/// Adds one to `account`'s counter; saves it with the event `made` gives.
async fn count<E: catga::Event>(
    ctx: &catga::Context,
    account: String,
    made: impl FnOnce(String, u64) -> E,
) -> Result<u64> {
    let mut c = ctx
        .try_load::<Counter>(&account)
        .await?
        .unwrap_or_else(|| catga::Versioned::new(account.clone(), Counter::default()));
    c.0 += 1;
    let n = c.0;
    ctx.save(c).with_event(made(account, n)).await?;
    Ok(n)
}

#[command(queue_group = "bench-relay", retry = 10)]
async fn relay_deposit(ctx: &catga::Context, d: RelayDeposit) -> Result<u64> {
    count(ctx, d.account, |account, n| RelayDeposited { account, n }).await
}

#[command(queue_group = "bench-relay", retry = 10)]
async fn stepwise_deposit(ctx: &catga::Context, d: StepwiseDeposit) -> Result<u64> {
    count(ctx, d.account, |account, n| StepwiseDeposited { account, n }).await
}

/// The outbox's relay with one shard against three: a burst of `BURST`
/// keyed commands, each saving a counter and an event; the time from the
/// first send until a plain subscriber heard every event.
pub(crate) async fn relay() {
    const BURST: u64 = 10_000;
    let nats = catga_tests::NatsServer::start();
    let cluster = catga_tests::RedisCluster::start();
    let client = Client::connect(&nats.url()).await.expect("client");
    let plain = async_nats::connect(nats.url()).await.expect("plain client");
    let concurrency = 64;
    println!();
    println!("## Outbox relay: one shard against three");
    println!();
    println!(
        "Bursts of {BURST} keyed commands (concurrency {concurrency}, 1,000 accounts), each saving a \
         counter and an event through the outbox, on a 3-master Redis Cluster; events/s from the first \
         send until a plain subscriber heard every event. One replica. Median of {} rounds, layouts in \
         turn; ratios against one shard in the same round.",
        rounds()
    );
    println!();
    // The stepwise layout's stream, made as an operator would (no
    // `allow_atomic`): catga uses it as it is.
    async_nats::jetstream::new(plain.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_RELAY_STEPWISE".to_owned(),
            subjects: vec!["bench.relay.deposited_stepwise".to_owned()],
            ..Default::default()
        })
        .await
        .expect("the stepwise layout's stream");
    let layouts = [
        ("1 shard (one relay, pipelined)", 1u32, false),
        ("3 shards (atomic batches per stream)", 3, false),
        ("3 shards (one at a time per stream)", 3, true),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); layouts.len()];
    for round in 0..rounds() {
        for k in 0..layouts.len() {
            let which = (round + k) % layouts.len();
            let (_, shards, stepwise) = layouts[which];
            let rt = up(serving(&["shards::relay_deposit", "shards::stepwise_deposit"])
                .nats_url(nats.url())
                .redis_cluster(&cluster.urls())
                .store_shards(shards)
                .service(format!("bench-relay-{round}-{which}"))
                .instance_id("bench"))
            .await;
            // The relays hold their shards' leases (and had a round to find
            // the outboxes empty) before the burst: the figure is the
            // relaying's, not the time the ring takes to place the shards.
            let placed = tokio::time::Instant::now() + Duration::from_secs(30);
            while rt.relayed_shards().len() < shards as usize && tokio::time::Instant::now() < placed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let subject = if stepwise {
                "bench.relay.deposited_stepwise"
            } else {
                "bench.relay.deposited"
            };
            let mut heard = plain.subscribe(subject).await.expect("subscribe");
            plain.flush().await.expect("flush");
            let started = std::time::Instant::now();
            let next = Arc::new(AtomicU64::new(0));
            let mut senders = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (c, next) = (client.clone(), Arc::clone(&next));
                senders.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= BURST {
                            return;
                        }
                        let account = format!("acct-{}", i * 7919 % 1_000);
                        let _ = if stepwise {
                            c.send(StepwiseDeposit { account }).await
                        } else {
                            c.send(RelayDeposit { account }).await
                        };
                    }
                });
            }
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while got < BURST {
                match tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut heard)).await {
                    Ok(Some(_)) => got += 1,
                    _ => break,
                }
            }
            let took = started.elapsed();
            while senders.join_next().await.is_some() {}
            assert_eq!(got, BURST, "every event heard within two minutes");
            rates[which].push(BURST as f64 / took.as_secs_f64());
            rt.shutdown().await.expect("shutdown");
        }
    }
    println!("| layout | events/s | vs 1 shard |");
    println!("|---|---:|---:|");
    for (i, (name, _, _)) in layouts.iter().enumerate() {
        let ratios = rates[i].iter().zip(&rates[0]).map(|(r, base)| r / base).collect();
        let each = rates[i]
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {name} | {:.0} ({each}) | {} |",
            median(rates[i].clone()),
            ratio_cell(ratios)
        );
    }
}
