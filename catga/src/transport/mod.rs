//! Transports: core NATS, or the embedded in-memory bus with the same
//! semantics (one queue-group member per message, fan-out otherwise,
//! request/reply with fast "no responders", the same payload limit).
//!
//! The runtime sees three things: a [`Transport`] to send and subscribe, a
//! [`Subscription`] that yields [`Delivery`]s, and [`Delivery::settle`],
//! with which a message answers itself. It never asks which transport it
//! runs on.

pub(crate) mod memory;
pub(crate) mod nats;

use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::wire::deadline::Deadline;

/// The payload limit of the embedded bus and the default of nats-server.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// An answer to a request.
pub(crate) struct Reply {
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// What to subscribe to.
#[derive(Debug, Clone)]
pub(crate) struct SubscribeTo {
    pub subject: String,
    pub queue_group: Option<String>,
}

/// The broker a runtime or client talks to. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Transport(Kind);

#[derive(Clone)]
enum Kind {
    Nats(nats::NatsTransport),
    Memory(memory::MemoryBus),
}

impl From<nats::NatsTransport> for Transport {
    fn from(t: nats::NatsTransport) -> Transport {
        Transport(Kind::Nats(t))
    }
}

impl From<memory::MemoryBus> for Transport {
    fn from(bus: memory::MemoryBus) -> Transport {
        Transport(Kind::Memory(bus))
    }
}

impl Transport {
    /// Sends a request and waits until `deadline` for its reply. Fails fast
    /// with [`ErrorKind::NoHandler`] when nobody subscribes.
    pub(crate) async fn request(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        deadline: Deadline,
    ) -> Result<Reply> {
        let timeout = deadline.remaining().ok_or_else(|| expired(subject))?;
        match &self.0 {
            Kind::Nats(t) => t.request(subject, headers, payload, deadline, timeout).await,
            Kind::Memory(t) => t.request(subject, headers, payload, deadline, timeout).await,
        }
    }

    /// Publishes a message. Returns within `timeout`; an error means the
    /// message was not sent.
    pub(crate) async fn publish(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.publish(subject, headers, payload, timeout).await,
            Kind::Memory(t) => t.publish(subject, headers, payload),
        }
    }

    pub(crate) async fn subscribe(&self, to: &SubscribeTo) -> Result<Subscription> {
        match &self.0 {
            Kind::Nats(t) => t.subscribe(to).await.map(|s| Subscription(Sub::Nats(s))),
            Kind::Memory(t) => t.subscribe(to).map(|s| Subscription(Sub::Memory(s))),
        }
    }

    /// Waits until the broker processed everything sent before: a message
    /// to ourselves makes the round trip (the server handles one
    /// connection's protocol lines in order).
    pub(crate) async fn round_trip(&self, timeout: Duration) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.round_trip(timeout).await,
            Kind::Memory(_) => Ok(()),
        }
    }

    /// Waits (bounded) until everything sent so far is written to the broker.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.flush(timeout).await,
            Kind::Memory(_) => Ok(()),
        }
    }

    /// Whether the broker connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        match &self.0 {
            Kind::Nats(t) => t.is_connected(),
            Kind::Memory(_) => true,
        }
    }

    /// Why the broker refuses this connection, if it does (credentials,
    /// TLS).
    pub(crate) fn refusal(&self) -> Option<String> {
        match &self.0 {
            Kind::Nats(t) => t.refusal().map(|r| r.message),
            Kind::Memory(_) => None,
        }
    }

    /// Requests waiting for a reply (NATS: catga's pending-request map; in
    /// memory nothing is kept outside the waiting task).
    pub(crate) fn pending_requests(&self) -> usize {
        match &self.0 {
            Kind::Nats(t) => t.pending_requests(),
            Kind::Memory(_) => 0,
        }
    }

    /// Errors the broker reported about this connection (permission
    /// violations, mostly), as they come.
    pub(crate) fn server_errors(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        match &self.0 {
            Kind::Nats(t) => Some(t.server_errors()),
            Kind::Memory(_) => None,
        }
    }

    /// Messages the broker client dropped for a full subscription buffer
    /// before catga saw them (async-nats' own buffer; catga's drops are
    /// counted by the runtime).
    pub(crate) fn client_dropped(&self) -> u64 {
        match &self.0 {
            Kind::Nats(t) => t.slow_consumer_events(),
            Kind::Memory(_) => 0,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match &self.0 {
            Kind::Nats(_) => "nats",
            Kind::Memory(_) => "memory",
        }
    }
}

fn expired(subject: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no time left to send a request on {subject}"),
    )
}

/// A live subscription.
pub(crate) struct Subscription(Sub);

enum Sub {
    Nats(nats::NatsSubscription),
    Memory(memory::MemorySubscription),
}

impl Subscription {
    /// The next message; `None` once the subscription ended (drained, or
    /// closed by the broker client).
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        match &mut self.0 {
            Sub::Nats(s) => s.next().await,
            Sub::Memory(s) => s.next().await,
        }
    }

    /// Stops new deliveries. Messages the broker delivered before it took
    /// the unsubscribe are still returned by [`next`](Self::next), which
    /// then yields `None`.
    pub(crate) async fn drain(&mut self) {
        match &mut self.0 {
            Sub::Nats(s) => s.drain().await,
            Sub::Memory(s) => s.drain(),
        }
    }

    /// After a drain: whether the broker confirmed that nothing more was
    /// on its way when the subscription ended.
    pub(crate) fn handover_confirmed(&self) -> bool {
        match &self.0 {
            Sub::Nats(s) => s.handover_confirmed(),
            Sub::Memory(_) => true,
        }
    }
}

/// A message as received. Its [`Settler`] answers it: a reply, an error
/// reply, or nothing (an event, or a request whose sender gave up).
pub(crate) struct Delivery {
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub deadline: Option<Deadline>,
    pub settler: Settler,
}

/// The parts of a delivery the handler reads.
pub(crate) struct Incoming {
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub deadline: Option<Deadline>,
}

impl Delivery {
    pub(crate) fn new(
        subject: Subject,
        headers: Option<HeaderMap>,
        payload: Bytes,
        deadline: Option<Deadline>,
        reply: ReplyTo,
    ) -> Delivery {
        Delivery {
            subject,
            headers,
            payload,
            deadline,
            settler: Settler { reply },
        }
    }

    /// Whether the sender waits for an answer.
    pub(crate) fn expects_reply(&self) -> bool {
        !matches!(self.settler.reply, ReplyTo::None)
    }

    /// The message, and what answers it.
    pub(crate) fn split(self) -> (Incoming, Settler) {
        let Delivery {
            subject,
            headers,
            payload,
            deadline,
            settler,
        } = self;
        (
            Incoming {
                subject,
                headers,
                payload,
                deadline,
            },
            settler,
        )
    }
}

/// Where the answer to a delivery goes.
pub(crate) enum ReplyTo {
    None,
    Nats(nats::NatsReply),
    Memory(memory::ReplySlot),
}

/// How a delivery ends.
pub(crate) enum Settle {
    /// Success: the reply body (ignored for events).
    Reply(Bytes),
    /// Failure: an error reply; `error_id` names the log line with the full
    /// text of a 5xx error.
    Error { error: Error, error_id: Option<String> },
    /// No answer: the sender stopped waiting.
    Drop,
}

/// Answers one delivery, once.
///
/// A request whose settler is dropped unused (its handler was cancelled at
/// the shutdown deadline, or it was dropped as over capacity) answers
/// "unavailable" on the way out, so its sender gets a fast, retryable error
/// on every transport instead of waiting out its time-out.
pub(crate) struct Settler {
    reply: ReplyTo,
}

impl Settler {
    /// Answers the message. A reply larger than the broker accepts is
    /// replaced by a small "too large" error reply, so the sender learns at
    /// once that asking again cannot succeed; the error is returned for the
    /// log.
    pub(crate) async fn settle(mut self, how: Settle) -> Result<()> {
        let reply = std::mem::replace(&mut self.reply, ReplyTo::None);
        let (headers, body) = match how {
            Settle::Drop => return Ok(()),
            Settle::Reply(body) => (None, body),
            Settle::Error { error, error_id } => {
                let (h, b) = crate::wire::errors::encode(&error, error_id.as_deref());
                (Some(h), b)
            }
        };
        match reply {
            ReplyTo::None => Ok(()),
            ReplyTo::Nats(to) => to.send(headers, body).await,
            ReplyTo::Memory(slot) => slot.send(headers, body),
        }
    }
}

impl Settler {
    /// Answers with `error` without waiting (best effort over NATS: the
    /// reply goes out if the client's command queue takes it at once, which
    /// it does unless the broker is away).
    pub(crate) fn refuse_now(mut self, error: &Error) {
        let reply = std::mem::replace(&mut self.reply, ReplyTo::None);
        refuse(reply, error);
    }
}

fn refuse(reply: ReplyTo, error: &Error) {
    if matches!(reply, ReplyTo::None) {
        return;
    }
    let (h, b) = crate::wire::errors::encode(error, None);
    match reply {
        ReplyTo::None => {}
        ReplyTo::Nats(to) => to.send_now(h, b),
        ReplyTo::Memory(slot) => {
            let _ = slot.send(Some(h), b);
        }
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        let reply = std::mem::replace(&mut self.reply, ReplyTo::None);
        refuse(
            reply,
            &Error::new(
                ErrorKind::Unavailable,
                "the replica stopped before answering; retry",
            ),
        );
    }
}
