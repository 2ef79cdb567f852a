//! The command of `region_replica` (`tests/regions.rs`): each replica
//! answers with its instance id, so that the caller counts who answered.

use catga::command;
use serde::{Deserialize, Serialize};

/// Asks which replica answers.
#[command(subject = "region.where", reply = String)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Where {
    /// The request's number (so that payloads differ).
    pub n: u64,
}
