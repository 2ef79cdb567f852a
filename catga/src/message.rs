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
/// enum, never by hand. The serde bounds sit on [`Command`] and [`Event`], so
/// a type missing a derive is reported once per missing trait.
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
pub trait Command: Message + Serialize + DeserializeOwned {
    /// What the handler answers with.
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// Used by generated handler code (one expression names the bound, so a
    /// misuse is reported once). Not API.
    #[doc(hidden)]
    const __DESCRIBED: crate::__private::Described<Self::Reply> =
        crate::__private::Described::new(Self::SUBJECT, Self::NAME, Self::VERSION);
}

/// An event: delivered to every subscriber, or once per queue group.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a catga event",
    label = "not an event type",
    note = "annotate the type with `#[catga::event]` (use `#[catga::command]` for commands)"
)]
pub trait Event: Message + Serialize + DeserializeOwned {
    /// Used by generated handler code (see [`Command`]). Not API.
    #[doc(hidden)]
    const __DESCRIBED: crate::__private::Described<()> =
        crate::__private::Described::new(Self::SUBJECT, Self::NAME, Self::VERSION);
}

/// Header names catga reads and writes: typed names, built at compile time,
/// so inserting or looking one up allocates nothing; use them with
/// [`Headers`](crate::transport::Headers) `get` and `insert`.
pub mod headers {
    use async_nats::HeaderName;

    /// Unique id of this message; also the JetStream de-duplication id.
    pub const MESSAGE_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
    /// Id shared by every message caused, directly or not, by one root message.
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("Catga-Correlation-Id");
    /// Id of the message whose handler sent this one.
    pub const CAUSATION_ID: HeaderName = HeaderName::from_static("Catga-Causation-Id");
    /// Schema version of the payload; absent means version 1.
    pub const VERSION: HeaderName = HeaderName::from_static("Catga-Version");
    /// NATS micro convention: error description of an error reply.
    pub const SERVICE_ERROR: HeaderName = HeaderName::from_static("Nats-Service-Error");
    /// NATS micro convention: status code of an error reply.
    pub const SERVICE_ERROR_CODE: HeaderName = HeaderName::from_static("Nats-Service-Error-Code");
    /// catga's error kind of an error reply (see [`ErrorKind`](crate::ErrorKind)).
    pub const ERROR_KIND: HeaderName = HeaderName::from_static("Catga-Error-Kind");
}

/// Identity of a message as seen by its handler, read from its headers on
/// demand (nothing is copied per message unless asked for).
#[derive(Debug, Clone)]
pub struct MessageMeta {
    subject: async_nats::Subject,
    headers: Option<async_nats::HeaderMap>,
    generated_id: std::sync::OnceLock<String>,
}

impl MessageMeta {
    /// The identity of a message that arrived on `subject` with `headers`.
    pub fn new(subject: async_nats::Subject, headers: Option<async_nats::HeaderMap>) -> MessageMeta {
        MessageMeta {
            subject,
            headers,
            generated_id: std::sync::OnceLock::new(),
        }
    }

    fn header(&self, name: async_nats::HeaderName) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// Unique id of the message; one is made up (once) for a message sent
    /// without one, e.g. by a plain NATS client.
    pub fn message_id(&self) -> &str {
        match self.header(headers::MESSAGE_ID) {
            Some(id) => id,
            None => self.generated_id.get_or_init(new_message_id),
        }
    }

    /// Correlation id: the sender's, or the message id for a root message.
    pub fn correlation_id(&self) -> &str {
        match self.header(headers::CORRELATION_ID) {
            Some(id) => id,
            None => self.message_id(),
        }
    }

    /// Id of the message that caused this one, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.header(headers::CAUSATION_ID)
    }

    /// The subject it arrived on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The message's headers, as received.
    pub fn headers(&self) -> Option<&async_nats::HeaderMap> {
        self.headers.as_ref()
    }
}

/// A fresh, unique message id (a NUID: 22 base-62 characters).
pub fn new_message_id() -> String {
    nuid::next().to_string()
}
