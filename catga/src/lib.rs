//! # catga
//!
//! Distributed CQRS services over NATS. Annotate message types and async
//! handler functions with [`command`] and [`event`]; the macros generate the
//! subjects, the serialization and a handler registry at compile time, and
//! [`run`] serves them.
//!
//! ```ignore
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
//! ## Subjects
//!
//! A command type's subject defaults to `cmd.` plus its name in snake case
//! (`CreateOrder` → `cmd.create_order`), an event type's to `evt.` plus its
//! name (`OrderCreated` → `evt.order_created`). The module path is not part
//! of it, so moving a type does not change its wire name; set
//! `subject = "..."` to choose one (checked at compile time: NATS tokens,
//! no wildcards).
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod config;
pub mod error;
pub mod message;
pub mod registry;
pub mod runtime;
pub mod transport;

pub use catga_macros::{command, event};
pub use client::{Client, Context};
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use message::{Command, Event, Message, MessageKind, MessageMeta};
pub use registry::{HandlerKind, HandlerSpec};
pub use runtime::{Runtime, RuntimeBuilder, run, start};
pub use transport::memory::MemoryBus;

/// Used by the code that `#[command]` and `#[event]` generate. Not API: it
/// changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::client::Context;
    pub use crate::error::Result;
    pub use crate::message::{Command, Event, Message, MessageKind};
    pub use crate::registry::{BoxFuture, HANDLERS, HandlerKind, HandlerSpec};
    pub use bytes::Bytes;
    pub use linkme;

    pub use crate::registry::{Invocation, MessageInfo, Outcome};
    use std::marker::PhantomData;

    /// [`MessageInfo`] plus the reply type, for the reply-type check.
    pub struct Described<R> {
        /// The facts of the message type.
        pub info: MessageInfo,
        reply: PhantomData<fn() -> R>,
    }

    impl<R> Described<R> {
        /// The facts of a message type whose handlers reply with `R`.
        pub const fn new(subject: &'static str, name: &'static str, version: u32) -> Described<R> {
            Described {
                info: MessageInfo {
                    subject,
                    name,
                    version,
                },
                reply: PhantomData,
            }
        }
    }

    /// Checks that a handler's result has the declared reply type.
    pub fn reply_of<R>(_: &Described<R>, out: Result<R>) -> Result<R> {
        out
    }

    /// Decodes a handler's payload; the error names the expected type.
    pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8], type_name: &str) -> Result<T> {
        crate::codec::decode(payload, type_name)
    }

    /// Encodes a handler's reply.
    pub fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes> {
        crate::codec::encode(value)
    }
}
