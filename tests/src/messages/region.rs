//! The messages of `region_replica` (`tests/regions.rs`): each replica
//! answers `Where` with its instance id, handles `Noted` in a queue group
//! by publishing `NotedBy` with its id, and `Stored` from a durable
//! consumer by publishing `StoredBy`, so that the test counts who handled
//! what.

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

/// Handled by a durable consumer, whose stream lives in region a
/// (`CATGA_JS_PLACEMENT=cluster=A`).
#[event(subject = "region.stored")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Stored {
    /// Which one.
    pub n: u64,
}

/// Who handled a [`Stored`].
#[event(subject = "region.stored_by")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StoredBy {
    /// Which one.
    pub n: u64,
    /// The replica's instance id.
    pub by: String,
}
