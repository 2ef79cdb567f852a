//! Section: store shards (`CATGA_STORE_SHARDS`) on a 3-master Redis
//! Cluster: how evenly a sharded service's Redis commands spread over the
//! masters, and the throughput of keyed state and idempotent commands on
//! one master against three.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use catga::{Client, Result, command};
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
