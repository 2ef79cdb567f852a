//! The order service: commands to create, pay, ship and cancel orders and a
//! query to read one; events that every replica projects into its read
//! model; a queue-grouped notifier. A demo driver pushes orders through
//! their lifecycle so that the example shows something out of the box.
//!
//! ```text
//! cargo run -p order-system                              # embedded, one process
//! NATS_URL=nats://127.0.0.1:4222 cargo run -p order-system  # several copies share the work
//! ```
//!
//! `ORDER_DEMO=0` turns the driver off; `ORDER_DEMO_ORDERS=N` stops it after
//! N orders; `ORDER_DEMO_INTERVAL_MS` paces it (default 1000).

use order_system::demo;

// The handlers live in this package's library crate. `use` above names it,
// which is what keeps its handlers at link time; a binary that used nothing
// from it would name it with `catga::link!(order_system);`.

#[tokio::main]
async fn main() -> catga::Result<()> {
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
