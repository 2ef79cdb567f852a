//! Scenarios that run the same on NATS and on the embedded bus: one module
//! per topic, each holding its handlers and its scenarios, and naming its
//! scenarios once in `catga_tests::on_both!` (which makes a `nats::` and a
//! `memory::` test of each).

mod back_pressure;
mod delayed;
mod durable;
mod errors;
mod fan_out;
mod handover;
mod idempotency;
mod jobs;
mod keyed;
mod leader;
mod lifecycle;
mod load_balancing;
mod parallel;
mod parity;
mod registry;
mod request_reply;
mod resized;
mod saga_time;
mod sagas;
mod shards;
mod shutdown;
mod state;
mod tracing;
mod versioning;
mod zoned_jobs;

use std::time::Duration;

/// How long a scenario waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);
