//! Message traits (implemented by `#[command]` and `#[event]`), header names
//! and the metadata every message carries.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Whether a message type is a command or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Handled by exactly one replica, answered with a reply.
    Command,
    /// Delivered to every subscriber (or once per queue group), no reply.
    Event,
}

/// A message type: implemented by `#[command]` and `#[event]` on a struct or
/// enum, never by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a catga message type",
    note = "annotate the type with `#[catga::command]` or `#[catga::event]`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The NATS subject the message travels on.
    const SUBJECT: &'static str;
    /// The Rust type name, carried in the `Catga-Type` header.
    const NAME: &'static str;
    /// The schema version, carried in the `Catga-Version` header.
    const VERSION: u32;
    /// Command or event.
    const KIND: MessageKind;
}

/// A command: handled by exactly one replica, answered with a [`Command::Reply`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a catga command",
    label = "not a command type",
    note = "annotate the type with `#[catga::command]` (use `#[catga::event]` for events)"
)]
pub trait Command: Message {
    /// What the handler answers with.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// An event: delivered to every subscriber, or once per queue group.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a catga event",
    label = "not an event type",
    note = "annotate the type with `#[catga::event]` (use `#[catga::command]` for commands)"
)]
pub trait Event: Message {}

/// Header names catga sets on every message.
pub mod headers {
    /// Unique id of this message; also the JetStream de-duplication id.
    pub const MESSAGE_ID: &str = "Nats-Msg-Id";
    /// Id shared by every message caused, directly or not, by one root message.
    pub const CORRELATION_ID: &str = "Catga-Correlation-Id";
    /// Id of the message whose handler sent this one.
    pub const CAUSATION_ID: &str = "Catga-Causation-Id";
    /// Rust type name of the payload.
    pub const TYPE: &str = "Catga-Type";
    /// Schema version of the payload.
    pub const VERSION: &str = "Catga-Version";
    /// NATS micro convention: error description of an error reply.
    pub const SERVICE_ERROR: &str = "Nats-Service-Error";
    /// NATS micro convention: status code of an error reply.
    pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
    /// catga's error kind of an error reply (see [`ErrorKind`](crate::ErrorKind)).
    pub const ERROR_KIND: &str = "Catga-Error-Kind";
}

/// Identity of a message as seen by its handler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageMeta {
    /// Unique id of the message.
    pub message_id: String,
    /// Correlation id (the root message's id when the sender set none).
    pub correlation_id: String,
    /// Id of the message that caused this one, if any.
    pub causation_id: Option<String>,
    /// The subject it arrived on.
    pub subject: String,
}

/// A fresh, unique message id (a NUID: 22 base-62 characters).
pub fn new_message_id() -> String {
    nuid::next().to_string()
}
