//! A driver that pushes orders through their lifecycle: create, read, pay,
//! ship (every fourth order is cancelled instead).

use std::time::Duration;

use catga::{Client, Result};

use crate::orders::{CancelOrder, CreateOrder, GetOrder, Line, PayOrder, ShipOrder};

/// The driver's settings, from `ORDER_DEMO*` variables.
pub struct Settings {
    /// `ORDER_DEMO` is not `0`/`off`/`false`.
    pub enabled: bool,
    /// `ORDER_DEMO_ORDERS`: stop after this many orders.
    pub orders: Option<u64>,
    /// `ORDER_DEMO_INTERVAL_MS`: pause between orders.
    pub interval: Duration,
}

impl Settings {
    /// Reads the variables; unparsable ones keep their default.
    pub fn from_env() -> Settings {
        let var = |n: &str| std::env::var(n).ok();
        Settings {
            enabled: !matches!(var("ORDER_DEMO").as_deref(), Some("0" | "off" | "false")),
            orders: var("ORDER_DEMO_ORDERS").and_then(|v| v.parse().ok()),
            interval: Duration::from_millis(
                var("ORDER_DEMO_INTERVAL_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
            ),
        }
    }
}

/// Runs orders through their lifecycle until told to stop.
pub async fn drive(client: Client, settings: Settings) -> Result<()> {
    let mut n: u64 = 0;
    while settings.orders.is_none_or(|max| n < max) {
        n += 1;
        if let Err(e) = one_order(&client, n).await {
            tracing::warn!(error = %e, retryable = e.is_retryable(), "demo order failed");
        }
        tokio::time::sleep(settings.interval).await;
    }
    tracing::info!(orders = n, "demo driver finished");
    Ok(())
}

async fn one_order(client: &Client, n: u64) -> Result<()> {
    let lines = vec![
        Line {
            sku: "tea-leaves".into(),
            quantity: 1 + (n % 3) as u32,
            unit_cents: 450,
        },
        Line {
            sku: "teapot".into(),
            quantity: 1,
            unit_cents: 2900,
        },
    ];
    let id = client
        .send(CreateOrder {
            customer: format!("customer-{n}"),
            lines,
        })
        .await?;
    let view = client.send(GetOrder { id: id.clone() }).await?;
    tracing::info!(order = %id, total_cents = view.total_cents, status = ?view.status, "demo: created");
    if n.is_multiple_of(4) {
        client
            .send(CancelOrder {
                id: id.clone(),
                reason: "customer changed their mind".into(),
            })
            .await?;
    } else {
        client
            .send(PayOrder {
                id: id.clone(),
                amount_cents: view.total_cents,
            })
            .await?;
        let tracking = client.send(ShipOrder { id: id.clone() }).await?;
        tracing::info!(order = %id, %tracking, "demo: shipped");
    }
    // Orders live in the store: any replica reads back what the last
    // command saved, at once.
    let view = client.send(GetOrder { id: id.clone() }).await?;
    tracing::info!(order = %id, status = ?view.status, "demo: lifecycle complete");
    Ok(())
}
