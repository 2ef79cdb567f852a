//! Unpaid orders. Each new order sends itself a payment reminder, delayed
//! by `ORDER_REMIND_AFTER_MS` (default 10 minutes): a delayed message kept
//! in the store, committed with the order. The reminder finds the order
//! still unpaid, tells the customer and notes the order as overdue. A
//! recurring job runs every 5 seconds, once across the replicas, and
//! expires the overdue orders still unpaid `ORDER_EXPIRE_AFTER_MS`
//! (default 30 minutes) after they were placed: it cancels them with the
//! reason "unpaid".
//!
//! Only unpaid orders past their reminder cost anything beyond the
//! reminder's entry in the store: the paid ones are never noted.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use catga::{Context, ErrorKind, Result, State, Versioned, command, event, job};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::orders::{Order, OrderCancelled, OrderId, Status};

/// When the payment reminder of an order comes: `ORDER_REMIND_AFTER_MS`.
pub fn remind_after() -> Duration {
    millis("ORDER_REMIND_AFTER_MS", 10 * 60 * 1000)
}

/// How long an order may stay unpaid: `ORDER_EXPIRE_AFTER_MS`.
pub fn expire_after() -> Duration {
    millis("ORDER_EXPIRE_AFTER_MS", 30 * 60 * 1000)
}

fn millis(var: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Sent with each order, delayed by [`remind_after`].
#[event(subject = "orders.payment_reminder")]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct PaymentReminder {
    /// The order.
    pub id: OrderId,
    /// When it was placed (unix ms).
    pub placed_ms: u64,
}

/// The orders reminded and not paid then, with when each was placed
/// (unix ms): what the expiry job looks at.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct Overdue {
    /// Order id → placed at.
    pub since: BTreeMap<String, u64>,
}

impl State for Overdue {
    const KIND: &'static str = "overdue";
}

/// The key of the one overdue list.
pub const OVERDUE: &str = "all";

/// Cancels an order if it is still unpaid; answers whether it did.
#[command(reply = bool, idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ExpireOrder {
    /// Which order.
    pub id: OrderId,
}

/// The reminder: an unpaid order is noted as overdue (and its customer
/// reminded); a paid, shipped or cancelled one is left alone. Durable:
/// no reminder is lost while the replicas restart.
#[event(durable = "reminders", idempotent, retry = 10, concurrency = 2)]
async fn remind(ctx: &Context, r: PaymentReminder) -> Result<()> {
    let unpaid = ctx
        .try_load::<Order>(&r.id.0)
        .await?
        .is_some_and(|o| o.status == Status::Created);
    if !unpaid {
        return Ok(());
    }
    let mut overdue = ctx
        .try_load::<Overdue>(OVERDUE)
        .await?
        .unwrap_or_else(|| Versioned::new(OVERDUE, Overdue::default()));
    overdue.since.insert(r.id.0.clone(), r.placed_ms);
    ctx.save(overdue).await?;
    // After the save: a save that lost a race runs the handler again.
    tracing::info!(order = %r.id, replica = ctx.instance_id(), "payment reminder sent");
    Ok(())
}

/// Every 5 seconds, on one replica: expires the overdue orders placed
/// longer than [`expire_after`] ago. Idempotent: an occurrence run again
/// (its replica died mid-run) sends the same expiries under the same ids
/// and commits its list once.
#[job(every = "5s", idempotent)]
async fn expire_unpaid(ctx: &Context) -> Result<()> {
    let Some(mut overdue) = ctx.try_load::<Overdue>(OVERDUE).await? else {
        return Ok(());
    };
    let now = unix_ms(ctx.scheduled_at().unwrap_or_else(SystemTime::now));
    let limit = expire_after().as_millis() as u64;
    let due: Vec<String> = overdue
        .since
        .iter()
        .filter(|(_, placed)| placed.saturating_add(limit) <= now)
        .map(|(id, _)| id.clone())
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    for id in &due {
        match ctx
            .send(ExpireOrder {
                id: OrderId(id.clone()),
            })
            .await
        {
            Ok(expired) => {
                if expired {
                    tracing::info!(order = %id, "unpaid order expired");
                }
            }
            // Gone: nothing left to expire.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        overdue.since.remove(id);
    }
    ctx.save(overdue).await?;
    Ok(())
}

#[command(queue_group = "order-workers", retry = 5)]
async fn expire_order(ctx: &Context, cmd: ExpireOrder) -> Result<bool> {
    let mut order = ctx.load::<Order>(&cmd.id.0).await?;
    if order.status != Status::Created {
        return Ok(false);
    }
    order.status = Status::Cancelled;
    ctx.save(order)
        .with_event(OrderCancelled {
            id: cmd.id.clone(),
            reason: "unpaid".to_owned(),
        })
        .await?;
    tracing::info!(order = %cmd.id, replica = ctx.instance_id(), "order cancelled: unpaid");
    Ok(true)
}
