//! Messages, handlers and the read model of the order service.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use catga::{Context, Error, Result, command, event};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// An order's id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId(pub String);

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of an order.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Line {
    /// Product code.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_cents: u64,
}

/// Where an order is in its lifecycle.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
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

/// Places an order.
#[command(reply = OrderId)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CreateOrder {
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<Line>,
}

/// Pays an order in full.
#[command]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PayOrder {
    /// Which order.
    pub id: OrderId,
    /// Must equal the order's total.
    pub amount_cents: u64,
}

/// Ships a paid order; replies with the tracking number.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ShipOrder {
    /// Which order.
    pub id: OrderId,
}

/// Cancels an order that has not shipped.
#[command]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CancelOrder {
    /// Which order.
    pub id: OrderId,
    /// Why.
    pub reason: String,
}

/// Reads an order.
#[command(subject = "orders.get", reply = OrderView)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GetOrder {
    /// Which order.
    pub id: OrderId,
}

/// An order as the read model sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
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
}

/// An order was placed.
#[event(subject = "orders.created")]
#[derive(Serialize, Deserialize, Debug, Clone)]
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
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OrderPaid {
    /// Id.
    pub id: OrderId,
    /// Amount in cents.
    pub amount_cents: u64,
}

/// An order left the warehouse.
#[event(subject = "orders.shipped")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OrderShipped {
    /// Id.
    pub id: OrderId,
    /// Tracking number.
    pub tracking: String,
}

/// An order was cancelled.
#[event(subject = "orders.cancelled")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OrderCancelled {
    /// Id.
    pub id: OrderId,
    /// Why.
    pub reason: String,
}

/// The read model: every replica builds it from the broadcast events, so any
/// replica answers queries and checks commands against it.
///
/// Events on different subjects are not ordered with each other (each
/// subscription is served on its own), so `OrderPaid` may arrive before
/// `OrderCreated`: every event is merged in, and the status only moves
/// forward.
#[derive(Default)]
struct ReadModel {
    orders: Mutex<HashMap<OrderId, Entry>>,
    changed: Notify,
}

#[derive(Default)]
struct Entry {
    /// Customer and total, once `OrderCreated` arrived.
    created: Option<(String, u64)>,
    status: Option<Status>,
    tracking: Option<String>,
}

fn rank(s: Status) -> u8 {
    match s {
        Status::Created => 0,
        Status::Paid => 1,
        Status::Shipped | Status::Cancelled => 2,
    }
}

impl Entry {
    fn view(&self, id: &OrderId) -> Option<OrderView> {
        let (customer, total_cents) = self.created.clone()?;
        Some(OrderView {
            id: id.clone(),
            customer,
            total_cents,
            status: self.status.unwrap_or(Status::Created),
            tracking: self.tracking.clone(),
        })
    }
}

static READ_MODEL: LazyLock<ReadModel> = LazyLock::new(ReadModel::default);

/// How long a command waits for the read model to see an order created on
/// another replica an instant earlier.
const CATCH_UP: Duration = Duration::from_secs(2);

impl ReadModel {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, Entry>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges one event into the order's entry.
    fn apply(&self, id: &OrderId, f: impl FnOnce(&mut Entry)) {
        f(self.lock().entry(id.clone()).or_default());
        self.changed.notify_waiters();
    }

    /// Moves the status forward (never back).
    fn advance(&self, id: &OrderId, status: Status, tracking: Option<String>) {
        self.apply(id, |e| {
            if e.status.is_none_or(|s| rank(status) > rank(s)) {
                e.status = Some(status);
            }
            if tracking.is_some() {
                e.tracking = tracking;
            }
        });
    }

    fn view(&self, id: &OrderId) -> Option<OrderView> {
        self.lock().get(id).and_then(|e| e.view(id))
    }

    /// The order once it satisfies `ready`, waiting up to [`CATCH_UP`].
    async fn wait_for(&self, id: &OrderId, ready: impl Fn(&OrderView) -> bool) -> Option<OrderView> {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            // Registered before the check, so a change between the check
            // and the wait still wakes us.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(view) = self.view(id).filter(|v| ready(v)) {
                return Some(view);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.view(id);
            }
        }
    }
}

#[command(queue_group = "order-workers")]
async fn create_order(ctx: &Context, cmd: CreateOrder) -> Result<OrderId> {
    if cmd.customer.trim().is_empty() {
        return Err(Error::invalid("customer is required"));
    }
    if cmd.lines.is_empty() || cmd.lines.iter().any(|l| l.quantity == 0) {
        return Err(Error::invalid("an order needs at least one line with a quantity"));
    }
    let total_cents = cmd
        .lines
        .iter()
        .map(|l| u64::from(l.quantity) * l.unit_cents)
        .sum();
    let id = OrderId(format!("ord-{}", ctx.message_id()));
    ctx.publish(OrderCreated {
        id: id.clone(),
        customer: cmd.customer,
        total_cents,
    })
    .await?;
    tracing::info!(order = %id, total_cents, replica = ctx.instance_id(), "order created");
    Ok(id)
}

#[command(queue_group = "order-workers")]
async fn pay_order(ctx: &Context, cmd: PayOrder) -> Result<()> {
    let view = READ_MODEL
        .wait_for(&cmd.id, |_| true)
        .await
        .ok_or_else(|| Error::not_found(format!("order {} does not exist", cmd.id)))?;
    if view.status != Status::Created {
        return Err(Error::conflict(format!(
            "order {} is {:?}, not awaiting payment",
            cmd.id, view.status
        )));
    }
    if cmd.amount_cents != view.total_cents {
        return Err(Error::invalid(format!(
            "order {} totals {} cents, payment was {}",
            cmd.id, view.total_cents, cmd.amount_cents
        )));
    }
    ctx.publish(OrderPaid {
        id: cmd.id.clone(),
        amount_cents: cmd.amount_cents,
    })
    .await?;
    tracing::info!(order = %cmd.id, replica = ctx.instance_id(), "order paid");
    Ok(())
}

#[command(queue_group = "order-workers")]
async fn ship_order(ctx: &Context, cmd: ShipOrder) -> Result<String> {
    let view = READ_MODEL
        .wait_for(&cmd.id, |v| v.status != Status::Created)
        .await
        .ok_or_else(|| Error::not_found(format!("order {} does not exist", cmd.id)))?;
    if view.status != Status::Paid {
        return Err(Error::conflict(format!(
            "order {} is {:?}, not paid",
            cmd.id, view.status
        )));
    }
    let tracking = format!("TRK-{}", ctx.message_id());
    ctx.publish(OrderShipped {
        id: cmd.id.clone(),
        tracking: tracking.clone(),
    })
    .await?;
    tracing::info!(order = %cmd.id, %tracking, replica = ctx.instance_id(), "order shipped");
    Ok(tracking)
}

#[command(queue_group = "order-workers")]
async fn cancel_order(ctx: &Context, cmd: CancelOrder) -> Result<()> {
    let view = READ_MODEL
        .wait_for(&cmd.id, |_| true)
        .await
        .ok_or_else(|| Error::not_found(format!("order {} does not exist", cmd.id)))?;
    match view.status {
        Status::Created | Status::Paid => {}
        other => {
            return Err(Error::conflict(format!(
                "order {} is {other:?}, too late to cancel",
                cmd.id
            )));
        }
    }
    ctx.publish(OrderCancelled {
        id: cmd.id.clone(),
        reason: cmd.reason.clone(),
    })
    .await?;
    tracing::info!(order = %cmd.id, reason = %cmd.reason, replica = ctx.instance_id(), "order cancelled");
    Ok(())
}

#[command(queue_group = "order-queries", concurrency = 512)]
async fn get_order(query: GetOrder) -> Result<OrderView> {
    READ_MODEL
        .wait_for(&query.id, |_| true)
        .await
        .ok_or_else(|| Error::not_found(format!("order {} does not exist", query.id)))
}

// Projections: plain #[event] handlers, so every replica receives every event.

#[event]
async fn project_created(e: OrderCreated) -> Result<()> {
    READ_MODEL.apply(&e.id, |entry| entry.created = Some((e.customer, e.total_cents)));
    Ok(())
}

#[event]
async fn project_paid(e: OrderPaid) -> Result<()> {
    READ_MODEL.advance(&e.id, Status::Paid, None);
    Ok(())
}

#[event]
async fn project_shipped(e: OrderShipped) -> Result<()> {
    READ_MODEL.advance(&e.id, Status::Shipped, Some(e.tracking));
    Ok(())
}

#[event]
async fn project_cancelled(e: OrderCancelled) -> Result<()> {
    READ_MODEL.advance(&e.id, Status::Cancelled, None);
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
