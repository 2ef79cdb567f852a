//! Fulfilment: a saga per paid order, run by the leader. It reserves the
//! stock, then books a courier; when no courier takes the order (a 400, for
//! good: `ORDER_COURIER_REFUSALS` percent of orders, picked by their id so
//! that every retry gets the same answer), the reservation is released.
//! Each step is an idempotent command, so a saga resumed by a new leader
//! never reserves or books twice.
//!
//! The steps are keyed by the order (`key = id`): with store shards, each
//! commits in the order's shard, beside the order.
//!
//! `GetFulfilment` tells what happened to an order: how often each step
//! took effect (once, or never; never twice).

use std::time::Duration;

use catga::{Context, Error, Result, Saga, State, Versioned, command, saga};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::orders::{OrderId, OrderPaid};

/// What fulfilment did to one order: each count is how many times that
/// step took effect.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Default, Clone, PartialEq, Eq)]
pub struct Fulfilment {
    /// Stock reserved.
    pub reserved: u64,
    /// Reservation released (the courier refused).
    pub released: u64,
    /// Courier booked.
    pub booked: u64,
}

impl State for Fulfilment {
    const KIND: &'static str = "fulfilment";
}

/// Reserves the order's stock.
#[command(reply = u64, idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ReserveStock {
    /// The order.
    pub id: OrderId,
}

/// Gives the order's stock back.
#[command(idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct ReleaseStock {
    /// The order.
    pub id: OrderId,
}

/// Books a courier; refused (400) for some orders.
#[command(reply = String, idempotent, key = id)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct BookCourier {
    /// The order.
    pub id: OrderId,
}

/// What fulfilment did to an order.
#[command(subject = "orders.fulfilment", reply = Fulfilment)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct GetFulfilment {
    /// The order.
    pub id: OrderId,
}

/// Whether no courier takes order `id`: `ORDER_COURIER_REFUSALS` percent of
/// orders (default 0), chosen by a stable hash of the id.
pub fn refused(id: &OrderId) -> bool {
    let percent: u64 = std::env::var("ORDER_COURIER_REFUSALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    refused_at(id, percent)
}

/// Whether order `id` is among the `percent` percent no courier takes.
pub fn refused_at(id: &OrderId, percent: u64) -> bool {
    crate::orders::stable_hash(&id.0) % 100 < percent
}

/// Applies `change` to the order's fulfilment record.
async fn update(ctx: &Context, id: &OrderId, change: impl FnOnce(&mut Fulfilment)) -> Result<u64> {
    let mut f = ctx
        .try_load::<Fulfilment>(&id.0)
        .await?
        .unwrap_or_else(|| Versioned::new(id.0.clone(), Fulfilment::default()));
    change(&mut f);
    let saved = ctx.save(f).await?;
    Ok(saved.version())
}

// A warehouse and a courier are remote: each step takes a moment.
const REMOTE_CALL: Duration = Duration::from_millis(20);

#[command(queue_group = "fulfilment", retry = 10)]
async fn reserve_stock(ctx: &Context, cmd: ReserveStock) -> Result<u64> {
    tokio::time::sleep(REMOTE_CALL).await;
    update(ctx, &cmd.id, |f| f.reserved += 1).await
}

#[command(queue_group = "fulfilment", retry = 10)]
async fn release_stock(ctx: &Context, cmd: ReleaseStock) -> Result<()> {
    update(ctx, &cmd.id, |f| f.released += 1).await.map(|_| ())
}

#[command(queue_group = "fulfilment", retry = 10)]
async fn book_courier(ctx: &Context, cmd: BookCourier) -> Result<String> {
    tokio::time::sleep(REMOTE_CALL).await;
    if refused(&cmd.id) {
        return Err(Error::invalid(format!("no courier takes order {}", cmd.id.0)));
    }
    update(ctx, &cmd.id, |f| f.booked += 1).await?;
    Ok(format!("courier for {}", cmd.id.0))
}

#[command(queue_group = "order-queries")]
async fn get_fulfilment(ctx: &Context, q: GetFulfilment) -> Result<Fulfilment> {
    Ok(ctx
        .try_load::<Fulfilment>(&q.id.0)
        .await?
        .map(Versioned::into_inner)
        .unwrap_or_default())
}

/// The fulfilment saga: on the leader only, a few orders at a time.
#[saga(leader, concurrency = 4)]
async fn fulfil(saga: &Saga, paid: OrderPaid) -> Result<()> {
    let id = paid.id;
    saga.step("reserve", ReserveStock { id: id.clone() })
        .compensate(ReleaseStock { id: id.clone() })
        .await?;
    let courier = saga.step("courier", BookCourier { id: id.clone() }).await?;
    tracing::info!(order = %id.0, %courier, "order fulfilled");
    Ok(())
}
