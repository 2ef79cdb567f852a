//! The messages of `region_replica` (`tests/regions.rs`): each replica
//! answers `Where` with its instance id, and handles `Noted` in a queue
//! group by publishing `NotedBy` with its id, so that the test counts who
//! handled what.

use catga::{command, event};
use serde::{Deserialize, Serialize};

/// Asks which replica answers.
#[command(subject = "region.where", reply = String)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Where {
    /// The request's number (so that payloads differ).
    pub n: u64,
}

/// Handled once per queue group.
#[event(subject = "region.noted")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Noted {
    /// Which one.
    pub n: u64,
}

/// Who handled a [`Noted`].
#[event(subject = "region.noted_by")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NotedBy {
    /// Which one.
    pub n: u64,
    /// The replica's instance id.
    pub by: String,
}
