//! Messages, state and handlers of the order service.
//!
//! Orders live in the state store (Redis with `REDIS_URL`, in memory
//! otherwise), so every replica answers the same: a command loads the
//! order, checks it, saves it with the event it produced (one atomic
//! operation), and the event goes out through the outbox. Two commands
//! that race on one order cannot both win: the second save finds a newer
//! version, and its handler runs again (`retry`) against the new state.

use catga::{Context, Error, Result, State, Versioned, command, event};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An order's id.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId(pub String);

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of an order.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Product code.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_cents: u64,
}

/// Where an order is in its lifecycle.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, waiting for payment.
    Created,
    /// Paid, waiting for shipping.
    Paid,
    /// Shipped: final.
    Shipped,
    /// Cancelled: final.
    Cancelled,
}

/// An order as the store keeps it.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Who ordered.
    pub customer: String,
    /// What.
    pub lines: Vec<Line>,
    /// Total in cents.
    pub total_cents: u64,
    /// Lifecycle state.
    pub status: Status,
    /// Set once shipped.
    pub tracking: Option<String>,
}

impl State for Order {
    const KIND: &'static str = "order";
}

/// The revenue ledger, kept by the `billing` durable consumer.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct Revenue {
    /// Payments recorded.
    pub payments: u64,
    /// Their sum in cents.
    pub cents: u64,
}

impl State for Revenue {
    const KIND: &'static str = "revenue";
}

/// The key of the one revenue ledger.
pub const LEDGER: &str = "all";

/// Places an order. Idempotent: sending it again under the same message id
/// returns the first order's id and creates nothing.
#[command(reply = OrderId, idempotent)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct CreateOrder {
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<Line>,
}

/// Pays an order in full. Keyed by the order: with store shards
/// (`CATGA_STORE_SHARDS`) its inbox entry and saves are in the order's.
#[command(idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct PayOrder {
    /// Which order.
    pub id: OrderId,
    /// Must equal the order's total.
    pub amount_cents: u64,
}

/// Ships a paid order; replies with the tracking number.
#[command(reply = String, idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ShipOrder {
    /// Which order.
    pub id: OrderId,
}

/// Cancels an order that has not shipped.
#[command(idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct CancelOrder {
    /// Which order.
    pub id: OrderId,
    /// Why.
    pub reason: String,
}

/// Reads an order.
#[command(subject = "orders.get", reply = OrderView)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct GetOrder {
    /// Which order.
    pub id: OrderId,
}

/// Reads the revenue ledger.
#[command(subject = "orders.revenue", reply = Revenue)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct GetRevenue;

/// An order as a reader sees it.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    /// Id.
    pub id: OrderId,
    /// Customer.
    pub customer: String,
    /// Total in cents.
    pub total_cents: u64,
    /// Lifecycle state.
    pub status: Status,
    /// Set once shipped.
    pub tracking: Option<String>,
    /// The order's version in the store (one per change).
    pub version: u64,
}

/// An order was placed.
#[event(subject = "orders.created")]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct OrderCreated {
    /// Id.
    pub id: OrderId,
    /// Customer.
    pub customer: String,
    /// Total in cents.
    pub total_cents: u64,
}

/// An order was paid.
#[event(subject = "orders.paid")]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct OrderPaid {
    /// Id.
    pub id: OrderId,
    /// Who paid.
    #[serde(default)]
    pub customer: String,
    /// Amount in cents.
    pub amount_cents: u64,
}

/// An order left the warehouse.
#[event(subject = "orders.shipped")]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct OrderShipped {
    /// Id.
    pub id: OrderId,
    /// Tracking number.
    pub tracking: String,
}

/// An order was cancelled.
#[event(subject = "orders.cancelled")]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct OrderCancelled {
    /// Id.
    pub id: OrderId,
    /// Why.
    pub reason: String,
}

/// The most one order may cost, in cents: a total beyond is refused as
/// invalid (and anything near `u64::MAX` would overflow).
pub const MAX_TOTAL_CENTS: u64 = 1_000_000_000_000;

/// The total of `lines`, checked: a 400 for an empty order, a zero
/// quantity, or an amount that overflows or passes [`MAX_TOTAL_CENTS`].
pub fn total(lines: &[Line]) -> Result<u64> {
    if lines.is_empty() || lines.iter().any(|l| l.quantity == 0) {
        return Err(Error::invalid("an order needs at least one line with a quantity"));
    }
    lines
        .iter()
        .try_fold(0u64, |sum, l| {
            u64::from(l.quantity)
                .checked_mul(l.unit_cents)
                .and_then(|line| sum.checked_add(line))
        })
        .filter(|t| *t <= MAX_TOTAL_CENTS)
        .ok_or_else(|| Error::invalid(format!("an order may total at most {MAX_TOTAL_CENTS} cents")))
}

fn view(id: &OrderId, order: &Versioned<Order>) -> OrderView {
    OrderView {
        id: id.clone(),
        customer: order.customer.clone(),
        total_cents: order.total_cents,
        status: order.status,
        tracking: order.tracking.clone(),
        version: order.version(),
    }
}

#[command(queue_group = "order-workers")]
async fn create_order(ctx: &Context, cmd: CreateOrder) -> Result<OrderId> {
    if cmd.customer.trim().is_empty() {
        return Err(Error::invalid("customer is required"));
    }
    let total_cents = total(&cmd.lines)?;
    // The id comes from the message id: a second create under the same id
    // is answered from the inbox before it gets here; a new id is a new
    // order, and the save refuses to overwrite one that exists.
    let id = OrderId(format!("ord-{}", ctx.message_id()));
    let order = Versioned::new(
        id.0.clone(),
        Order {
            customer: cmd.customer.clone(),
            lines: cmd.lines,
            total_cents,
            status: Status::Created,
            tracking: None,
        },
    );
    ctx.save(order)
        .with_event(OrderCreated {
            id: id.clone(),
            customer: cmd.customer,
            total_cents,
        })
        .await?;
    // Committed with the order: the reminder comes whatever happens to
    // this replica (see `expiry`).
    ctx.publish_after(
        crate::expiry::remind_after(),
        crate::expiry::PaymentReminder {
            id: id.clone(),
            placed_ms: crate::expiry::unix_ms(std::time::SystemTime::now()),
        },
    )
    .await?;
    tracing::info!(order = %id, total_cents, replica = ctx.instance_id(), "order created");
    Ok(id)
}

#[command(queue_group = "order-workers", retry = 5)]
async fn pay_order(ctx: &Context, cmd: PayOrder) -> Result<()> {
    let mut order = ctx.load::<Order>(&cmd.id.0).await?;
    if order.status != Status::Created {
        return Err(Error::conflict(format!(
            "order {} is {:?}, not awaiting payment",
            cmd.id, order.status
        )));
    }
    if cmd.amount_cents != order.total_cents {
        return Err(Error::invalid(format!(
            "order {} totals {} cents, payment was {}",
            cmd.id, order.total_cents, cmd.amount_cents
        )));
    }
    order.status = Status::Paid;
    let customer = order.customer.clone();
    ctx.save(order)
        .with_event(OrderPaid {
            id: cmd.id.clone(),
            customer,
            amount_cents: cmd.amount_cents,
        })
        .await?;
    tracing::info!(order = %cmd.id, replica = ctx.instance_id(), "order paid");
    Ok(())
}

#[command(queue_group = "order-workers", retry = 5)]
async fn ship_order(ctx: &Context, cmd: ShipOrder) -> Result<String> {
    let mut order = ctx.load::<Order>(&cmd.id.0).await?;
    if order.status != Status::Paid {
        return Err(Error::conflict(format!(
            "order {} is {:?}, not paid",
            cmd.id, order.status
        )));
    }
    let tracking = format!("TRK-{}", ctx.message_id());
    order.status = Status::Shipped;
    order.tracking = Some(tracking.clone());
    ctx.save(order)
        .with_event(OrderShipped {
            id: cmd.id.clone(),
            tracking: tracking.clone(),
        })
        .await?;
    tracing::info!(order = %cmd.id, %tracking, replica = ctx.instance_id(), "order shipped");
    Ok(tracking)
}

#[command(queue_group = "order-workers", retry = 5)]
async fn cancel_order(ctx: &Context, cmd: CancelOrder) -> Result<()> {
    let mut order = ctx.load::<Order>(&cmd.id.0).await?;
    if !matches!(order.status, Status::Created | Status::Paid) {
        return Err(Error::conflict(format!(
            "order {} is {:?}, too late to cancel",
            cmd.id, order.status
        )));
    }
    order.status = Status::Cancelled;
    ctx.save(order)
        .with_event(OrderCancelled {
            id: cmd.id.clone(),
            reason: cmd.reason.clone(),
        })
        .await?;
    tracing::info!(order = %cmd.id, reason = %cmd.reason, replica = ctx.instance_id(), "order cancelled");
    Ok(())
}

#[command(queue_group = "order-queries", concurrency = 512)]
async fn get_order(ctx: &Context, query: GetOrder) -> Result<OrderView> {
    let order = ctx.load::<Order>(&query.id.0).await?;
    Ok(view(&query.id, &order))
}

#[command(queue_group = "order-queries")]
async fn get_revenue(ctx: &Context, _: GetRevenue) -> Result<Revenue> {
    Ok(ctx
        .try_load::<Revenue>(LEDGER)
        .await?
        .map(Versioned::into_inner)
        .unwrap_or_default())
}

/// The billing ledger: a durable consumer (no payment is missed while its
/// replicas restart) and idempotent (a redelivered payment is counted
/// once). Every payment updates the one ledger key, so saves that race
/// are stale: `retry` runs the loser again on the new version, and a low
/// `concurrency` keeps the race small (with the default 256 at once per
/// replica, 3 replicas dead-lettered 30% of 1,200 payments, each after
/// losing every race of its deliveries).
#[event(durable = "billing", idempotent, retry = 10, concurrency = 2)]
async fn record_payment(ctx: &Context, e: OrderPaid) -> Result<()> {
    let mut ledger = ctx
        .try_load::<Revenue>(LEDGER)
        .await?
        .unwrap_or_else(|| Versioned::new(LEDGER, Revenue::default()));
    ledger.payments += 1;
    ledger.cents += e.amount_cents;
    ctx.save(ledger).await?;
    Ok(())
}

/// One replica of the "notifications" group tells the customer.
#[event(queue_group = "notifications")]
async fn notify_customer(ctx: &Context, e: OrderShipped) -> Result<()> {
    tracing::info!(
        order = %e.id,
        tracking = %e.tracking,
        replica = ctx.instance_id(),
        correlation_id = ctx.correlation_id(),
        "customer notified of shipment"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(quantity: u32, unit_cents: u64) -> Line {
        Line {
            sku: "x".into(),
            quantity,
            unit_cents,
        }
    }

    #[test]
    fn totals_are_checked_not_overflowed() {
        assert_eq!(total(&[line(2, 450), line(1, 2900)]).expect("total"), 3800);
        assert!(total(&[]).is_err());
        assert!(total(&[line(0, 1)]).is_err());
        let err = total(&[line(u32::MAX, u64::MAX)]).expect_err("overflow");
        assert_eq!(err.kind(), catga::ErrorKind::Invalid);
        assert!(total(&[line(1, MAX_TOTAL_CENTS), line(1, 1)]).is_err());
    }
}
