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
//! reminder's entry in the store: the paid ones are never noted. The
//! overdue orders are noted in 16 lists, each order in the one its id
//! hashes to ([`overdue_list_of`]): no list is a key every reminder
//! writes, and with store shards each list commits in its own shard.

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

/// One list of the orders reminded and not paid then, with when each was
/// placed (unix ms): what the expiry job looks at.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct Overdue {
    /// Order id → placed at.
    pub since: BTreeMap<String, u64>,
}

impl State for Overdue {
    const KIND: &'static str = "overdue";
}

/// How many overdue lists there are.
pub const OVERDUE_LISTS: u64 = 16;

/// The one list an earlier release noted every overdue order in: still
/// looked at, so that an upgraded service expires what it noted.
pub const OLD_OVERDUE: &str = "all";

/// The key of the list that notes order `id` overdue.
pub fn overdue_list_of(id: &OrderId) -> String {
    crate::orders::split_key("overdue", OVERDUE_LISTS, id)
}

/// Every overdue list's key: the earlier release's, then `overdue-0` and
/// on.
pub fn overdue_lists() -> impl Iterator<Item = String> {
    crate::orders::split_keys(OLD_OVERDUE, "overdue", OVERDUE_LISTS)
}

/// Expires up to [`EXPIRE_BATCH`] orders of one overdue list that are due
/// at `now_ms`, and answers how many due ones it left: the expiry job
/// sends it for each list that has some, again while some are left.
/// Keyed by the list: with store shards it commits in the list's shard.
#[command(key = list, reply = u64)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ExpireOverdue {
    /// The list's key ([`overdue_list_of`]).
    pub list: String,
    /// The occurrence's time (unix ms): orders placed longer than
    /// [`expire_after`] before it are due.
    pub now_ms: u64,
}

/// How many orders one `ExpireOverdue` expires: few enough to be done
/// within the job's time-out for a send (5 s by default), so that a list
/// that grew long while the service was down is saved a batch at a time
/// instead of never.
pub const EXPIRE_BATCH: usize = 50;

/// Cancels an order if it is still unpaid; answers whether it did.
#[command(reply = bool, idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ExpireOrder {
    /// Which order.
    pub id: OrderId,
}

/// The reminder: an unpaid order is noted as overdue (and its customer
/// reminded); a paid, shipped or cancelled one is left alone. Durable:
/// no reminder is lost while the replicas restart. Not idempotent: it
/// commits in the shard of what it saves, its order's list, and a
/// reminder delivered again notes the same entry again (an order already
/// expired meanwhile is noted again, and the next expiry finds it
/// cancelled and drops it).
#[event(durable = "reminders", retry = 10, concurrency = 2)]
async fn remind(ctx: &Context, r: PaymentReminder) -> Result<()> {
    let unpaid = ctx
        .try_load::<Order>(&r.id.0)
        .await?
        .is_some_and(|o| o.status == Status::Created);
    if !unpaid {
        return Ok(());
    }
    let list = overdue_list_of(&r.id);
    let mut overdue = ctx
        .try_load::<Overdue>(&list)
        .await?
        .unwrap_or_else(|| Versioned::new(list, Overdue::default()));
    overdue.since.insert(r.id.0.clone(), r.placed_ms);
    ctx.save(overdue).await?;
    // After the save: a save that lost a race runs the handler again.
    tracing::info!(order = %r.id, replica = ctx.instance_id(), "payment reminder sent");
    Ok(())
}

/// Whether an order placed at `placed_ms` is due to expire at `now_ms`.
fn is_due(placed_ms: u64, now_ms: u64) -> bool {
    placed_ms.saturating_add(expire_after().as_millis() as u64) <= now_ms
}

/// Every 5 seconds, on one replica: expires the overdue orders placed
/// longer than [`expire_after`] ago, a list at a time. It reads every
/// list and sends `ExpireOverdue` for those with orders due, again while
/// some are left. A list that fails does not hold the others back: the
/// occurrence fails after trying them all. An occurrence run again (its
/// replica died mid-run) finds the lists it expired emptied, and an order
/// expired twice is cancelled once.
#[job(every = "5s")]
async fn expire_unpaid(ctx: &Context) -> Result<()> {
    let now_ms = unix_ms(ctx.scheduled_at().unwrap_or_else(SystemTime::now));
    let mut failed = None;
    for list in overdue_lists() {
        let expired = async {
            let Some(overdue) = ctx.try_load::<Overdue>(&list).await? else {
                return Ok(());
            };
            let due = overdue
                .since
                .values()
                .filter(|&&placed| is_due(placed, now_ms))
                .count();
            // Each batch leaves fewer due; the bound stops a list that
            // keeps some due (its orders fail to expire) from holding the
            // occurrence.
            let mut left = due;
            for _ in 0..due.div_ceil(EXPIRE_BATCH) {
                if left == 0 {
                    break;
                }
                let expire = ExpireOverdue {
                    list: list.clone(),
                    now_ms,
                };
                left = usize::try_from(ctx.send(expire).await?).unwrap_or(usize::MAX);
            }
            Ok::<_, catga::Error>(())
        };
        if let Err(e) = expired.await {
            tracing::warn!(list = %list, error = %e, "overdue orders not expired; the next occurrence tries again");
            failed.get_or_insert(e);
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Expires a batch of a list's due orders, then saves the list without
/// them. Each expiry goes under an id made from its order, so that one
/// sent again (a save that lost a race with a reminder runs again with
/// `retry`; an occurrence run again) is answered by the first one's inbox
/// entry.
#[command(queue_group = "order-workers", retry = 5)]
async fn expire_overdue(ctx: &Context, cmd: ExpireOverdue) -> Result<u64> {
    let Some(mut overdue) = ctx.try_load::<Overdue>(&cmd.list).await? else {
        return Ok(0);
    };
    let due: Vec<String> = overdue
        .since
        .iter()
        .filter(|&(_, &placed)| is_due(placed, cmd.now_ms))
        .map(|(id, _)| id.clone())
        .collect();
    if due.is_empty() {
        return Ok(0);
    }
    let batch = &due[..due.len().min(EXPIRE_BATCH)];
    for id in batch {
        let expire = ExpireOrder {
            id: OrderId(id.clone()),
        };
        match ctx.send_with_id(expire, &format!("expire-{id}")).await {
            Ok(expired) => {
                if expired {
                    tracing::info!(order = %id, "unpaid order expired");
                }
            }
            // Gone: nothing left to expire.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // Failed for now (its master is away): it stays in the list
            // for the next try, and the others go on.
            Err(e) if e.is_retryable() => {
                tracing::warn!(order = %id, error = %e, "overdue order not expired yet; it stays in its list");
                continue;
            }
            // For good: it leaves the list, so that it does not hold the
            // list's next orders back; an operator sees it here.
            Err(e) => {
                tracing::error!(order = %id, error = %e, "overdue order cannot be expired; dropped from its list");
            }
        }
        overdue.since.remove(id);
    }
    let left = overdue
        .since
        .values()
        .filter(|&&placed| is_due(placed, cmd.now_ms))
        .count();
    ctx.save(overdue).await?;
    Ok(left as u64)
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
