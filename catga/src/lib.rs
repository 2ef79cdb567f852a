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

    /// The reply type of a command.
    pub type ReplyOf<C> = <C as Command>::Reply;

    /// What a handler registration needs to know of its message type.
    pub struct MessageInfo {
        /// Subject.
        pub subject: &'static str,
        /// Type name.
        pub name: &'static str,
        /// Version.
        pub version: u32,
    }

    /// The registration facts of a command type.
    pub const fn command_info<C: Command>() -> MessageInfo {
        MessageInfo {
            subject: C::SUBJECT,
            name: C::NAME,
            version: C::VERSION,
        }
    }

    /// The registration facts of an event type.
    pub const fn event_info<E: Event>() -> MessageInfo {
        MessageInfo {
            subject: E::SUBJECT,
            name: E::NAME,
            version: E::VERSION,
        }
    }

    /// Decodes a command handler's payload.
    pub fn decode_command<C: Command>(payload: &[u8]) -> Result<C> {
        crate::codec::decode(payload, C::NAME)
    }

    /// Decodes an event handler's payload.
    pub fn decode_event<E: Event>(payload: &[u8]) -> Result<E> {
        crate::codec::decode(payload, E::NAME)
    }

    /// Encodes a handler's reply.
    pub fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes> {
        crate::codec::encode(value)
    }
}
