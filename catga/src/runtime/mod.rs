//! Start-up, serving and graceful shutdown: [`run`], [`Runtime`] and
//! [`RuntimeBuilder`]. This module declares and re-exports; each concern
//! has its own file:
//!
//! - `entry`: [`run`], [`start`], [`init_telemetry`];
//! - `builder`: settings, the handler selection and start-up;
//! - `replica`: [`Runtime`], the running replica and its shutdown;
//! - `shared`: what every serve loop of one runtime shares;
//! - `served` and `handlers`: one handler as served, starting and
//!   stopping its serve loops;
//! - `serve`: one loop per subscription (take, bound, queue, resubscribe,
//!   drain);
//! - `pipeline`: the steps of one message;
//! - `ready`: readiness and fatal errors; `watch`: the background watchers
//!   (liveness, store, broker);
//! - `outbox`: the relay; `lease`: the relay's lease and leases held
//!   through a drain; `letters`: dead letters as the runtime writes them;
//! - `jobs`: recurring jobs' schedules;
//! - `leader`: the leader lease; `keyed`: keyed sagas' membership,
//!   partitions and routing;
//! - `discovery`: NATS micro discovery; `endpoint`: the HTTP endpoint;
//! - `shutdown`: signals and the one-deadline drain.

mod builder;
mod discovery;
mod endpoint;
mod entry;
mod handlers;
mod jobs;
mod keyed;
mod leader;
mod lease;
mod letters;
mod outbox;
mod pipeline;
mod ready;
mod replica;
mod serve;
mod served;
mod shared;
mod shutdown;
mod watch;

pub use builder::RuntimeBuilder;
pub use entry::{init_telemetry, run, start};
pub use jobs::{DelayedInfo, JobInfo};
pub(crate) use jobs::{find as find_job, info as job_info, run_now as run_job_now};
pub use ready::Readiness;
pub use replica::Runtime;
pub(crate) use shared::Shared;
