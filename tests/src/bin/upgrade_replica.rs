//! A service in three releases, for the rolling-upgrade test
//! (`tests/rolling_upgrade.rs`); `RELEASE` (`n`, `n1` or `n2`) picks one.
//!
//! `upgrade.pay` publishes `upgrade.paid` with its answer (idempotent,
//! through the outbox); a durable, idempotent handler of `upgrade.paid`
//! counts each order's payments; `upgrade.ledger` answers an order's
//! count.
//! - Release N knows version 1 of both messages.
//! - Release N+1 reads version 2 (amounts with a currency), upcasting
//!   version 1, and still publishes version 1: it rolls out first.
//! - Release N+2 publishes version 2.
//!
//! This is the rollout the guarantees describe: consumers first, then
//! senders.

use catga::{Context, Result, Runtime, State, Versioned, command, event};
use catga_tests::messages::upgrade::{ReadLedger, v1, v2};
use serde::{Deserialize, Serialize};

/// An order's payments counted, keyed by the order.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Counted {
    /// Payments counted.
    pub times: u32,
    /// The last one's cents.
    pub cents: u64,
}

impl State for Counted {
    const KIND: &'static str = "upgrade-counted";
}

#[command]
async fn read_ledger(ctx: &Context, r: ReadLedger) -> Result<Option<(u32, u64)>> {
    Ok(ctx
        .try_load::<Counted>(&r.order)
        .await?
        .map(|c| (c.times, c.cents)))
}

async fn count(ctx: &Context, order: String, cents: u64) -> Result<()> {
    let mut counted = ctx
        .try_load::<Counted>(&order)
        .await?
        .unwrap_or_else(|| Versioned::new(order.clone(), Counted::default()));
    counted.times += 1;
    counted.cents = cents;
    ctx.save(counted).await?;
    Ok(())
}

/// Release N: version 1 only.
mod n {
    use super::*;

    #[command]
    async fn pay(ctx: &Context, p: v1::Pay) -> Result<u64> {
        let event = v1::Paid {
            order: p.order.clone(),
            cents: p.cents,
        };
        ctx.publish(event).await?;
        Ok(p.cents)
    }

    #[event(durable = "ledger", idempotent)]
    async fn on_paid(ctx: &Context, e: v1::Paid) -> Result<()> {
        count(ctx, e.order, e.cents).await
    }
}

/// Release N+1: reads version 2, still sends version 1.
mod n1 {
    use super::*;

    #[command]
    async fn pay(ctx: &Context, p: v2::Pay) -> Result<u64> {
        let event = v1::Paid {
            order: p.order.clone(),
            cents: p.amount.cents,
        };
        ctx.publish(event).await?;
        Ok(p.amount.cents)
    }

    #[event(durable = "ledger", idempotent)]
    async fn on_paid(ctx: &Context, e: v2::Paid) -> Result<()> {
        count(ctx, e.order, e.amount.cents).await
    }
}

/// Release N+2: sends version 2.
mod n2 {
    use super::*;

    #[command]
    async fn pay(ctx: &Context, p: v2::Pay) -> Result<u64> {
        let event = v2::Paid {
            order: p.order.clone(),
            amount: p.amount.clone(),
        };
        ctx.publish(event).await?;
        Ok(p.amount.cents)
    }

    #[event(durable = "ledger", idempotent)]
    async fn on_paid(ctx: &Context, e: v2::Paid) -> Result<()> {
        count(ctx, e.order, e.amount.cents).await
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let config = catga::Config::from_env()?;
    catga::init_telemetry(&config.service);
    let release = std::env::var("RELEASE").unwrap_or_else(|_| "n".to_owned());
    let prefix = format!("upgrade_replica::{release}::");
    Runtime::builder()
        .config(config)
        .handlers(move |s| s.name().starts_with(&prefix) || s.name() == "upgrade_replica::read_ledger")
        .start()
        .await?
        .run_until_signal()
        .await
}
