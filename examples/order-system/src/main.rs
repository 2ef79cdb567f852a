//! The order service: commands to create, pay, ship and cancel orders and
//! queries to read one and the revenue ledger; orders kept in the state
//! store with their events in its outbox; a durable, idempotent billing
//! consumer; a fulfilment saga per paid order, run by the leader
//! (`ORDER_COURIER_REFUSALS` percent of orders find no courier and are
//! compensated); an invoicing saga per paid order, keyed by customer (a
//! customer's invoices numbered in payment order, customers spread over
//! the replicas); a queue-grouped notifier; a payment reminder delayed
//! after each order (`ORDER_REMIND_AFTER_MS`) and a job that expires
//! unpaid orders (`ORDER_EXPIRE_AFTER_MS`, see `expiry`). A demo driver pushes orders through
//! their lifecycle so that the example shows something out of the box.
//!
//! ```text
//! cargo run -p order-system                              # embedded, one process
//! NATS_URL=nats://127.0.0.1:4222 REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run -p order-system                          # several copies share the work
//! cargo run -p order-system -- dlq list                  # dead letters (also: show N,
//!                                                        # replay N, purge N, purge-all;
//!                                                        # the `catga` CLI's commands)
//! cargo run -p order-system -- load 1000 16              # a load client: 1000 orders, 16 at once
//! cargo run -p order-system -- sagas 20                  # the newest 20 fulfilment sagas (REDIS_URL)
//! cargo run -p order-system -- jobs                      # the expiry job: next and last occurrence
//! cargo run -p order-system -- delayed 20                # the 20 soonest payment reminders (REDIS_URL)
//! cargo run -p order-system -- schema                    # its AsyncAPI 3 document (asyncapi.json)
//! order-system probe 127.0.0.1:8080 /ready               # exit 0 if the endpoint answers 200
//! ```
//!
//! `probe` lets a container health check ask the replica's HTTP endpoint
//! without curl in the image.
//!
//! `ORDER_DEMO=0` turns the driver off; `ORDER_DEMO_ORDERS=N` stops it after
//! N orders; `ORDER_DEMO_INTERVAL_MS` paces it (default 1000).

use catga::{Config, Result};
use order_system::demo;

// The handlers live in this package's library crate. `use` above names it,
// which is what keeps its handlers at link time; a binary that used nothing
// from it would name it with `catga::link!(order_system);`.

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // The operator CLI's commands (`catga dlq ...`, `catga sagas ...`),
        // for an image that ships only this binary.
        Some("dlq" | "sagas" | "services" | "outbox" | "delayed" | "jobs" | "schema") => {
            print!("{}", catga::cli::run(&args, Config::from_env()?).await?);
            return Ok(());
        }
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
