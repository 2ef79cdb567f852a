//! # catga
//!
//! Distributed CQRS services over NATS. Annotate message types and async
//! handler functions with [`command`] and [`event`]; the macros generate the
//! subjects, the serialization and a handler registry at compile time, and
//! [`run`] serves them.
//!
//! ```no_run
//! use catga::{command, Context, Result};
//! use serde::{Deserialize, Serialize};
//!
//! #[command(reply = u64)]
//! #[derive(Serialize, Deserialize)]
//! pub struct Add { pub a: u64, pub b: u64 }
//!
//! #[command(queue_group = "calculator")]
//! async fn add(cmd: Add) -> Result<u64> { Ok(cmd.a + cmd.b) }
//!
//! #[tokio::main]
//! async fn main() -> catga::Result<()> { catga::run().await }
//! ```
//!
//! The [`guide`] tells what catga promises and how to run it:
//! [guarantees](guide::guarantees), [sagas](guide::sagas),
//! [recurring jobs](guide::jobs), [configuration](guide::configuration) and
//! [operations](guide::operations). Its examples are compiled as doc tests.
//!
//! ## Subjects
//!
//! A command type's subject defaults to `cmd.` plus its name in snake case
//! (`CreateOrder` → `cmd.create_order`), an event type's to `evt.` plus its
//! name (`OrderCreated` → `evt.order_created`). The module path is not part
//! of it, so moving a type does not change its wire name; set
//! `subject = "..."` to choose one (checked at compile time: NATS tokens,
//! no wildcards). Two services on one NATS account that each define a type
//! with the same name share its default subject: give such types an
//! explicit subject.
#![forbid(unsafe_code)]

/// The guide, one page per concern (also readable on GitHub under
/// `catga/docs/`).
pub mod guide {
    // The pages link to each other by file name, for GitHub; the first
    // definition of a link label wins in Markdown, so these (checked by
    // rustdoc) take their place here.
    #[doc = "[sagas page]: crate::guide::sagas"]
    #[doc = "[ops shards]: crate::guide::operations"]
    #[doc = "[jobs page]: crate::guide::jobs"]
    #[doc = ""]
    #[doc = include_str!("../docs/guarantees.md")]
    pub mod guarantees {}
    #[doc = "[guarantees page]: crate::guide::guarantees#what-you-can-rely-on"]
    #[doc = ""]
    #[doc = include_str!("../docs/sagas.md")]
    pub mod sagas {}
    #[doc = include_str!("../docs/jobs.md")]
    pub mod jobs {}
    #[doc = include_str!("../docs/configuration.md")]
    pub mod configuration {}
    #[doc = "[sagas page]: crate::guide::sagas"]
    #[doc = ""]
    #[doc = include_str!("../docs/operations.md")]
    pub mod operations {}
}

// The README's examples are compiled as doc tests too (it is outside the
// crate, so only when rustdoc collects tests).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct Readme;

pub mod cli;
mod client;
mod clock;
mod config;
mod dead_letters;
mod error;
mod message;
mod ops;
mod registry;
mod resilience;
/// The consistent-hash ring of keyed sagas. Not API: public for the
/// benchmarks that compare its placement.
#[doc(hidden)]
pub mod ring;
mod runtime;
mod saga;
pub mod schema;
mod stall;
mod state;
mod store;
pub mod testing;
mod transport;
mod wire;

pub use catga_macros::{command, event, job, saga};
pub use client::{Client, Context};
pub use config::{Config, NatsSecurity, RedisMode, RedisTls, Secret, StreamPlacement, StreamSettings};
// The table of variables and the URL redaction serve catga's own tests of
// the README and the deploy files: not API.
/// The header types of [`MessageMeta::headers`] and [`headers`] (from
/// async-nats, so that users need not depend on it to name them).
#[doc(no_inline)]
pub use async_nats::{HeaderMap, HeaderName, HeaderValue};
#[doc(hidden)]
pub use config::{SETTINGS, Setting, redact_url};
pub use dead_letters::{DeadLetter, DeadLetters};
pub use error::{Error, ErrorKind, Result};
pub use message::{Command, Event, Message, MessageKind};
#[cfg(feature = "otlp")]
pub use ops::otel::layer as otlp_layer;
pub use registry::{
    CommandHandler, EventHandler, HandlerKind, HandlerSpec, JobHandler, JobOptions, JobSchedule, MessageSpec,
    handlers, messages,
};
pub use runtime::{DelayedInfo, JobInfo, Readiness, Runtime, RuntimeBuilder, init_telemetry, run, start};
pub use saga::{Saga, SagaInfo, SagaOutcome, SagaStatus, SagaStepInfo, Step};
pub use state::Save;
pub use store::{OutboxShard, State, Versioned, placing_part};
pub use transport::memory::MemoryBus;
pub use transport::{DEFAULT_MAX_PAYLOAD, stream_name};
pub use wire::deadline::Deadline;
pub use wire::trace::TraceParent;
pub use wire::{MAX_ID_LEN, MessageMeta, headers, new_message_id};

/// Used by the code that `#[command]` and `#[event]` generate. Not API: it
/// changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::client::Context;
    pub use crate::error::Result;
    pub use crate::message::{Command, Event, Message, MessageKind};
    pub use crate::registry::{
        CommandHandler, EventHandler, HANDLERS, HandlerOptions, HandlerResult, HandlerSpec, JobHandler,
        JobOptions, JobResult, JobSchedule, MESSAGES, MessageSpec,
    };
    pub use crate::schema::probe::{Described, SchemaProbe, Undescribed};
    pub use crate::wire::codec::{Decode, Encode};
    pub use linkme;
    pub use schemars::{Schema, SchemaGenerator};

    /// Names a type in a position that requires `T: Send`: generated code
    /// calls it with a handler's future, spanned on the handler's name, so
    /// that a future that is not `Send` is reported there.
    pub fn assert_send<T: Send>(t: T) -> T {
        t
    }

    /// A keyed saga's key (`#[saga(key = field)]`): the field as text.
    pub fn saga_key<K: std::fmt::Display + ?Sized>(key: &K) -> String {
        key.to_string()
    }

    /// A message's key (`#[command(key = field)]`): the field as text,
    /// which places the handler's writes in a store shard.
    pub fn message_key_text<K: std::fmt::Display + ?Sized>(key: &K) -> String {
        key.to_string()
    }

    /// The body of a `#[saga]` handler: runs the saga function through
    /// [`Context::saga`]; a compensated saga is an outcome (logged), not a
    /// failure of the handler.
    pub async fn run_saga<F, Fut>(ctx: &Context, saga: F) -> Result<()>
    where
        F: FnOnce(crate::Saga) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + Send,
    {
        match ctx.saga(saga).await? {
            crate::SagaOutcome::Compensated { cause } => {
                tracing::info!(saga = %ctx.message_id(), handler = ctx.handler(), %cause, "the saga was compensated");
            }
            crate::SagaOutcome::Completed(()) | crate::SagaOutcome::Ended(_) => {}
        }
        Ok(())
    }
}
