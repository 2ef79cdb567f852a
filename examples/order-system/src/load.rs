//! `order-system load ORDERS CONCURRENCY`: a load client over NATS. Each
//! order is created and paid; both commands are idempotent, so a replica
//! that dies mid-way costs a retry under the same id, never a second
//! order or payment. Prints what it got and exits non-zero if any order
//! was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Config, Error, Result};

use crate::orders::{CreateOrder, Line, PayOrder};

/// Runs the load; `args` are the orders and the concurrency.
pub async fn run(args: &[String]) -> Result<()> {
    let number = |i: usize, default: u64| -> Result<u64> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| Error::invalid(format!("usage: load [ORDERS] [CONCURRENCY], not `{s}`"))),
        }
    };
    let (orders, concurrency) = (number(0, 1000)?, number(1, 16)?.max(1));
    let client = Client::connect_with(&Config::from_env()?)
        .await?
        .with_request_timeout(Duration::from_secs(5));
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, failed) = (client.clone(), Arc::clone(&next), Arc::clone(&failed));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= orders {
                        return latencies;
                    }
                    let began = Instant::now();
                    match one(&client, n).await {
                        Ok(()) => latencies.push(began.elapsed()),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("order {n} failed: {e}");
                        }
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(
            t.await
                .map_err(|e| Error::msg(format!("a load task died: {e}")))?,
        );
    }
    let took = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .map_or(0, |d| d.as_micros())
    };
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "orders: {} ok, {failed} failed, {:.0} orders/s, p50 {} µs, p99 {} µs",
        latencies.len(),
        latencies.len() as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    if failed > 0 {
        return Err(Error::unavailable(format!("{failed} orders failed")));
    }
    Ok(())
}

/// Creates and pays one order, each command retried under its id while it
/// fails retryably (a replica died, the broker is away) for up to 20 s.
async fn one(client: &Client, n: u64) -> Result<()> {
    let run = catga::new_message_id();
    let (create_id, pay_id) = (format!("create-{run}"), format!("pay-{run}"));
    let id = retry(|| {
        client.send_with_id(
            CreateOrder {
                customer: format!("load-{n}"),
                lines: vec![Line {
                    sku: "tea".into(),
                    quantity: 1,
                    unit_cents: 450,
                }],
            },
            &create_id,
        )
    })
    .await?;
    retry(|| {
        client.send_with_id(
            PayOrder {
                id: id.clone(),
                amount_cents: 450,
            },
            &pay_id,
        )
    })
    .await
}

async fn retry<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match op().await {
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}
