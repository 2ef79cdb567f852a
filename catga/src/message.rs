//! Message traits, implemented by `#[command]` and `#[event]` on a struct
//! or enum.

use crate::wire::codec::{Decode, Encode};

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
pub trait Message: Send + Sync + 'static {
    /// The NATS subject the message travels on.
    const SUBJECT: &'static str;
    /// The Rust type name, used in logs and error messages (the subject
    /// already identifies the type on the wire).
    const NAME: &'static str;
    /// The schema version, carried in the `Catga-Version` header above 1.
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
pub trait Command: Message + Encode + Decode {
    /// What the handler answers with.
    type Reply: Encode + Decode + Send + 'static;
    /// `#[command(idempotent)]`: every send carries a message id, and the
    /// handler runs once per id (a retry gets the first answer).
    const IDEMPOTENT: bool = false;
}

/// An event: delivered to every subscriber, or once per queue group.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a catga event",
    label = "not an event type",
    note = "annotate the type with `#[catga::event]` (use `#[catga::command]` for commands)"
)]
pub trait Event: Message + Encode + Decode {}
