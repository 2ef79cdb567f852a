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
    /// Whether it was paid (it stays paid once cancelled). Orders of an
    /// earlier release have no such field: paid is read from the status.
    #[serde(default)]
    pub paid: bool,
}

impl Order {
    /// Whether the order was paid.
    pub fn was_paid(&self) -> bool {
        self.paid || matches!(self.status, Status::Paid | Status::Shipped)
    }
}

impl State for Order {
    const KIND: &'static str = "order";
}

/// Revenue: one of the ledgers the `billing` durable consumer keeps, or
/// their sum ([`GetRevenue`]).
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

/// How many ledgers revenue is counted in: each payment in its order's
/// ([`ledger_of`]), and [`GetRevenue`] sums them. One ledger that every
/// payment updates would be a key every replica races on, and with store
/// shards (`CATGA_STORE_SHARDS`) it would sit in one shard, whose master
/// would take every payment's write.
pub const LEDGERS: u64 = 16;

/// The one ledger an earlier release counted every payment in. Still
/// summed, so that an upgraded service keeps the revenue it counted.
pub const OLD_LEDGER: &str = "all";

/// The key of the ledger that counts the payment of order `id`.
pub fn ledger_of(id: &OrderId) -> String {
    split_key("ledger", LEDGERS, id)
}

/// Every ledger's key: the earlier release's, then `ledger-0` and on.
pub fn ledgers() -> impl Iterator<Item = String> {
    split_keys(OLD_LEDGER, "ledger", LEDGERS)
}

/// Of `parts` keys `<prefix>-0` and on that share what one key held, the
/// one order `id` is kept in (its id's [`stable_hash`]).
pub fn split_key(prefix: &str, parts: u64, id: &OrderId) -> String {
    format!("{prefix}-{}", stable_hash(&id.0) % parts)
}

/// The one key `old` of an earlier release, then the `parts` keys
/// `<prefix>-0` and on that hold what it held.
pub fn split_keys(old: &str, prefix: &'static str, parts: u64) -> impl Iterator<Item = String> {
    std::iter::once(old.to_owned()).chain((0..parts).map(move |n| format!("{prefix}-{n}")))
}

/// FNV-1a of `text`: the same in every process and release.
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The id of the order that a `CreateOrder` sent under `message_id`
/// creates: `ord-{<message id>}`, in the same store shard.
///
/// The braces place the order in the store shard of the message id
/// ([`catga::placing_part`]): a create without a key commits in the shard
/// of its message id, where its inbox entry is, so that the order, the
/// answer and the event commit together. The order's other commands name
/// it as their key, so they commit there too. A message id that has a
/// `{…}` of its own is placed by it, and the order then is
/// `ord:<message id>`. A message id whose braces place it by all of it
/// (`a}b`, `{}`) cannot go inside a `{…}`: the order is the message id
/// itself then. No two message ids make one order id: the three forms
/// differ in their start or in having a `{…}`. (An order of an earlier
/// release, `ord-<message id>`, may have the id a new create makes, when
/// its message id was the new one's in braces: that create's commit finds
/// the order and is answered stale.)
pub fn order_id(message_id: &str) -> OrderId {
    let by = catga::placing_part(message_id);
    [format!("ord-{{{message_id}}}"), format!("ord:{message_id}")]
        .into_iter()
        .find(|id| catga::placing_part(id) == by)
        .map_or_else(|| OrderId(message_id.to_owned()), OrderId)
}

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

/// Reads the revenue: the sum of every ledger.
#[command(subject = "orders.revenue", reply = Revenue)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct GetRevenue;

/// Counts one payment in a revenue ledger. `record_payment` sends it for
/// each payment, keyed by the ledger: with store shards its inbox entry
/// and the ledger's save are in the ledger's shard.
#[command(idempotent, key = ledger)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct CountPayment {
    /// The ledger's key ([`ledger_of`]).
    pub ledger: String,
    /// The order paid.
    pub id: OrderId,
    /// Amount in cents.
    pub amount_cents: u64,
}

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
    // order, and the save refuses to overwrite one that exists. It sits
    // in the message id's store shard (see `order_id`).
    let id = order_id(ctx.message_id());
    let order = Versioned::new(
        id.0.clone(),
        Order {
            customer: cmd.customer.clone(),
            lines: cmd.lines,
            total_cents,
            status: Status::Created,
            tracking: None,
            paid: false,
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
    order.paid = true;
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
    let mut sum = Revenue::default();
    for ledger in ledgers() {
        if let Some(counted) = ctx.try_load::<Revenue>(&ledger).await? {
            sum.payments += counted.payments;
            sum.cents += counted.cents;
        }
    }
    Ok(sum)
}

/// Billing: a durable consumer (no payment is missed while its replicas
/// restart) that counts each payment in its order's ledger. The
/// `CountPayment` it sends has an id made from the order (an order is paid
/// once): a payment delivered again, or its dead letter replayed (under an
/// id of its own), sends the same command, which its inbox answers
/// without counting again. Idempotent, so that a count that failed for now
/// (a time-out, no replica) is tried again rather than dead-lettered.
#[event(durable = "billing", idempotent, retry = 10, concurrency = 4)]
async fn record_payment(ctx: &Context, e: OrderPaid) -> Result<()> {
    let id = format!("count-{}", e.id);
    let count = CountPayment {
        ledger: ledger_of(&e.id),
        id: e.id,
        amount_cents: e.amount_cents,
    };
    ctx.send_with_id(count, &id).await
}

/// That a ledger counted the payment of an order: kept beside the ledger
/// (`counted-{<ledger>}-<order>`, in its shard) and saved with it.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// The amount counted, in cents.
    pub cents: u64,
}

impl State for Counted {
    const KIND: &'static str = "counted";
}

/// Counts a payment in its ledger, once: a count sent again after its
/// inbox entry is gone (a dead letter of billing replayed past
/// `CATGA_INBOX_WINDOW_MS`) finds the order counted. Payments of one
/// ledger race on its version: `retry` runs the loser again on the new
/// one. With one ledger and the default 256 at once per replica, 3
/// replicas dead-lettered 30% of 1,200 payments (each lost every race of
/// its deliveries); 16 ledgers and billing's 4 at a time keep the race
/// small.
#[command(queue_group = "billing", retry = 10)]
async fn count_payment(ctx: &Context, cmd: CountPayment) -> Result<()> {
    // Anyone who may publish on the bus may send this: it counts only the
    // payment of a paid order, of its total, in its ledger.
    if cmd.ledger != ledger_of(&cmd.id) {
        return Err(Error::invalid(format!(
            "order {} is counted in {}, not {:?}",
            cmd.id,
            ledger_of(&cmd.id),
            cmd.ledger
        )));
    }
    let order = ctx.load::<Order>(&cmd.id.0).await?;
    if !order.was_paid() || order.total_cents != cmd.amount_cents {
        return Err(Error::invalid(format!(
            "order {} was not paid {} cents",
            cmd.id, cmd.amount_cents
        )));
    }
    let mark = format!("counted-{{{}}}-{}", cmd.ledger, cmd.id);
    if ctx.try_load::<Counted>(&mark).await?.is_some() {
        return Ok(());
    }
    ctx.save(Versioned::new(
        mark,
        Counted {
            cents: cmd.amount_cents,
        },
    ))
    .await?;
    let mut ledger = ctx
        .try_load::<Revenue>(&cmd.ledger)
        .await?
        .unwrap_or_else(|| Versioned::new(cmd.ledger.clone(), Revenue::default()));
    ledger.payments += 1;
    ledger.cents = ledger.cents.saturating_add(cmd.amount_cents);
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

    #[test]
    fn an_order_sits_in_the_shard_of_its_create() {
        for (message_id, order) in [
            ("abc", "ord-{abc}"),
            ("a{acct-7}b", "ord:a{acct-7}b"),
            ("{abc}", "ord:{abc}"),
            ("a{b", "ord-{a{b}"),
            // A message id at its length limit (256).
            (&*"x".repeat(256), &*format!("ord-{{{}}}", "x".repeat(256))),
        ] {
            let id = order_id(message_id);
            assert_eq!(id.0, order);
            assert_eq!(catga::placing_part(&id.0), catga::placing_part(message_id));
        }
        // Ids whose braces place them by all of them: the order is the id.
        for message_id in ["a}b", "{}", "{}x{y}"] {
            let id = order_id(message_id);
            assert_eq!(id.0, message_id);
            assert_eq!(catga::placing_part(&id.0), catga::placing_part(message_id));
        }
    }

    #[test]
    fn payments_spread_over_the_ledgers() {
        let mut used = std::collections::BTreeSet::new();
        for n in 0..400 {
            let ledger = ledger_of(&OrderId(format!("ord-{{{n}}}")));
            assert!(ledgers().any(|l| l == ledger), "{ledger}");
            used.insert(ledger);
        }
        assert_eq!(used.len() as u64, LEDGERS);
        assert_eq!(ledgers().count() as u64, LEDGERS + 1);
    }
}
