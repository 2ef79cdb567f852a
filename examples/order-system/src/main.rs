//! The order service: commands to create, pay, ship and cancel orders and
//! queries to read one and the revenue ledger; orders kept in the state
//! store with their events in its outbox; a durable, idempotent billing
//! consumer; a fulfilment saga per paid order, run by the leader
//! (`ORDER_COURIER_REFUSALS` percent of orders find no courier and are
//! compensated); an invoicing saga per paid order, keyed by customer (a
//! customer's invoices numbered in payment order, customers spread over
//! the replicas); a queue-grouped notifier. A demo driver pushes orders through
//! their lifecycle so that the example shows something out of the box.
//!
//! ```text
//! cargo run -p order-system                              # embedded, one process
//! NATS_URL=nats://127.0.0.1:4222 REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run -p order-system                          # several copies share the work
//! cargo run -p order-system -- dlq list                  # dead letters (also: show N,
//!                                                        # replay N, purge N, purge-all)
//! cargo run -p order-system -- load 1000 16              # a load client: 1000 orders, 16 at once
//! cargo run -p order-system -- sagas 20                  # the newest 20 fulfilment sagas (REDIS_URL)
//! order-system probe 127.0.0.1:8080 /ready               # exit 0 if the endpoint answers 200
//! ```
//!
//! `probe` lets a container health check ask the replica's HTTP endpoint
//! without curl in the image.
//!
//! `ORDER_DEMO=0` turns the driver off; `ORDER_DEMO_ORDERS=N` stops it after
//! N orders; `ORDER_DEMO_INTERVAL_MS` paces it (default 1000).

use catga::{Config, Error, Result};
use order_system::demo;

// The handlers live in this package's library crate. `use` above names it,
// which is what keeps its handlers at link time; a binary that used nothing
// from it would name it with `catga::link!(order_system);`.

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dlq") => return dead_letters(&args[1..]).await,
        Some("sagas") => return sagas(&args[1..]).await,
        Some("load") => return order_system::load::run(&args[1..]).await,
        Some("probe") => std::process::exit(probe(&args[1..])),
        _ => {}
    }
    let runtime = catga::start().await?;
    let settings = demo::Settings::from_env();
    if settings.enabled {
        let client = runtime.client();
        tokio::spawn(async move {
            if let Err(e) = demo::drive(client, settings).await {
                tracing::error!(error = %e, "demo driver stopped");
            }
        });
    }
    runtime.run_until_signal().await
}

/// `dlq list [FROM]`, `dlq show N`, `dlq replay N [--force]`, `dlq purge
/// N`, `dlq purge-all`: the dead letters of the service `CATGA_SERVICE`
/// names, on the broker in `NATS_URL`. With `REDIS_URL` (as the replicas
/// have it) each letter is checked against the record its replica kept,
/// and only authentic ones are replayed without `--force`.
async fn dead_letters(args: &[String]) -> Result<()> {
    let seq = |i: usize| -> Result<u64> {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::invalid("expected a dead letter's number"))
    };
    let dlq = catga::DeadLetters::connect(&Config::from_env()?).await?;
    dead_letter_command(args, &dlq, seq).await
}

async fn dead_letter_command(
    args: &[String],
    dlq: &catga::DeadLetters,
    seq: impl Fn(usize) -> Result<u64>,
) -> Result<()> {
    let mark = |l: &catga::DeadLetter| match l.authentic {
        Some(true) => "",
        Some(false) => " NOT WRITTEN BY CATGA (or changed)",
        None => " (not checked: REDIS_URL unset)",
    };
    match args.first().map(String::as_str) {
        Some("list") => {
            let from = seq(1).unwrap_or(0);
            for l in dlq.list(from, 100).await? {
                println!(
                    "#{} {} handler={} deliveries={} {:?}: {}{}",
                    l.seq,
                    l.subject,
                    l.handler,
                    l.deliveries,
                    l.error_kind,
                    l.error,
                    mark(&l)
                );
            }
        }
        Some("show") => {
            let l = dlq.get(seq(1)?).await?;
            println!(
                "#{} on {} (service {}, handler {})",
                l.seq, l.subject, l.service, l.handler
            );
            println!(
                "failed {} times, last {:?}: {}",
                l.deliveries, l.error_kind, l.error
            );
            println!("message id: {}", l.message_id.as_deref().unwrap_or("-"));
            if let Some(size) = l.truncated {
                println!("cut to fit: {} of {size} bytes kept", l.payload.len());
            }
            println!(
                "authentic:{}",
                if mark(&l).is_empty() { " yes" } else { mark(&l) }
            );
            for (k, v) in &l.headers {
                println!("{k}: {v}");
            }
            println!("{}", String::from_utf8_lossy(&l.payload));
        }
        Some("replay") => {
            let n = seq(1)?;
            if args.get(2).is_some_and(|a| a == "--force") {
                dlq.replay_forced(n).await?;
            } else {
                dlq.replay(n).await?;
            }
            println!("replayed #{n}");
        }
        Some("purge") => {
            let n = seq(1)?;
            dlq.purge(n).await?;
            println!("purged #{n}");
        }
        Some("purge-all") => println!("purged {}", dlq.purge_all().await?),
        _ => {
            return Err(Error::invalid(
                "usage: dlq list [FROM] | show N | replay N [--force] | purge N | purge-all",
            ));
        }
    }
    Ok(())
}

/// `sagas [N]`: the newest N (default 20) sagas of the service, from the
/// store in `REDIS_URL` (`CATGA_SERVICE` names the service), with their
/// steps.
async fn sagas(args: &[String]) -> Result<()> {
    let n = match args.first() {
        None => 20,
        Some(s) => s
            .parse()
            .map_err(|_| Error::invalid(format!("usage: sagas [N], not `{s}`")))?,
    };
    let config = Config::from_env()?;
    if config.redis_url.is_none() {
        return Err(Error::invalid(
            "sagas are read from the store: set REDIS_URL (and CATGA_SERVICE) as the replicas have it",
        ));
    }
    let runtime = catga::Runtime::builder()
        .config(config)
        .client_only()
        .start()
        .await?;
    for saga in runtime.sagas(n).await? {
        let steps: Vec<String> = saga
            .steps
            .iter()
            .map(|s| {
                let done = if s.done { "done" } else { "not done" };
                match &s.compensation {
                    Some(c) => format!("{} ({done}, compensation {c})", s.name),
                    None => format!("{} ({done})", s.name),
                }
            })
            .collect();
        println!(
            "{} {} {}{}",
            saga.id,
            saga.status.as_str(),
            steps.join(", "),
            saga.error.map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
    runtime.shutdown().await
}

/// `probe HOST:PORT PATH`: 0 if `GET PATH` answers 200, 1 otherwise.
fn probe(args: &[String]) -> i32 {
    use std::io::{Read, Write};
    let (Some(addr), Some(path)) = (args.first(), args.get(1)) else {
        eprintln!("usage: probe HOST:PORT PATH");
        return 2;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(addr.as_str()) else {
        eprintln!("probe: cannot connect to {addr}");
        return 1;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(3)));
    if write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return 1;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let ok = answer.starts_with("HTTP/1.1 200");
    if !ok {
        eprintln!("probe: {}", answer.lines().next().unwrap_or("no answer"));
    }
    i32::from(!ok)
}
