//! `relay_replica`: deposits in sequence per account, each publishing
//! [`Deposited`] through its account's shard's outbox.

use catga::{command, event};
use serde::{Deserialize, Serialize};

/// Deposit number `seq` on `account` (1, 2, ... in order).
#[command(reply = u64, subject = "relay.deposit", idempotent, key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposit {
    /// Whose.
    pub account: String,
    /// Which.
    pub seq: u64,
}

/// Published with each deposit, in the same commit.
#[event(subject = "relay.deposited")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposited {
    /// Whose.
    pub account: String,
    /// Which.
    pub seq: u64,
}
