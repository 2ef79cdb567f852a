//! A replica for the process test of the outbox relays of a sharded store
//! (`tests/relay_faults.rs`): `relay.deposit`, keyed by account and
//! idempotent, takes each account's deposits in sequence and publishes
//! `Deposited` with the deposit's number through the outbox of the
//! account's shard.

use catga::{Context, Error, Result, State, Versioned, command};
use catga_tests::messages::relay::{Deposit, Deposited};
use serde::{Deserialize, Serialize};

/// The last deposit taken on an account.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Count {
    /// Its number.
    pub last: u64,
}

impl State for Count {
    const KIND: &'static str = "relay-count";
}

#[command]
async fn deposit(ctx: &Context, d: Deposit) -> Result<u64> {
    let mut count = ctx
        .try_load::<Count>(&d.account)
        .await?
        .unwrap_or_else(|| Versioned::new(d.account.clone(), Count::default()));
    if d.seq != count.last + 1 {
        return Err(Error::invalid(format!(
            "deposit {} on {} after {}",
            d.seq, d.account, count.last
        )));
    }
    count.last = d.seq;
    let saved = ctx
        .save(count)
        .with_event(Deposited {
            account: d.account,
            seq: d.seq,
        })
        .await?;
    Ok(saved.last)
}

#[tokio::main]
async fn main() -> Result<()> {
    catga::start().await?.run_until_signal().await
}
