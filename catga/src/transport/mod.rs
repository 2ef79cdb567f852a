//! Transports: core NATS, or the embedded in-memory bus with the same
//! semantics (one queue-group member per message, fan-out otherwise,
//! request/reply with fast "no responders").

pub mod memory;
pub mod nats;

use std::time::Duration;

use bytes::Bytes;

use crate::error::Result;
pub use async_nats::HeaderMap as Headers;
pub use async_nats::Subject;

/// A message as received by a subscription.
pub(crate) struct Incoming {
    pub subject: async_nats::Subject,
    pub headers: Option<Headers>,
    pub payload: Bytes,
    pub reply: Option<ReplyTo>,
}

/// Where to send the answer to a request.
pub(crate) enum ReplyTo {
    Nats(async_nats::Subject),
    Memory(memory::ReplySlot),
}

/// An answer to a request.
pub(crate) struct Reply {
    pub headers: Option<Headers>,
    pub payload: Bytes,
}

/// The broker a runtime or client talks to.
#[derive(Clone)]
pub(crate) enum Transport {
    Nats(nats::NatsTransport),
    Memory(memory::MemoryBus),
}

impl Transport {
    pub(crate) async fn request(
        &self,
        subject: &Subject,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply> {
        match self {
            Transport::Nats(t) => t.request(subject, headers, payload, timeout).await,
            Transport::Memory(t) => t.request(subject, headers, payload, timeout).await,
        }
    }

    pub(crate) async fn publish(&self, subject: &Subject, headers: Headers, payload: Bytes) -> Result<()> {
        match self {
            Transport::Nats(t) => t.publish(subject, headers, payload).await,
            Transport::Memory(t) => t.publish(subject, headers, payload),
        }
    }

    /// Answers a request; `headers` is `None` for a plain success reply.
    pub(crate) async fn respond(&self, to: ReplyTo, headers: Option<Headers>, payload: Bytes) -> Result<()> {
        match (self, to) {
            (Transport::Nats(t), ReplyTo::Nats(subject)) => t.respond(subject, headers, payload).await,
            (_, ReplyTo::Memory(slot)) => {
                slot.send(Reply { headers, payload });
                Ok(())
            }
            (Transport::Memory(_), ReplyTo::Nats(subject)) => Err(crate::Error::new(
                crate::ErrorKind::Internal,
                format!("cannot answer NATS inbox {subject} over the in-memory bus"),
            )),
        }
    }

    /// `capacity` bounds the in-memory buffer; over NATS the client-wide
    /// subscription capacity applies.
    pub(crate) async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
        capacity: usize,
    ) -> Result<Subscription> {
        match self {
            Transport::Nats(t) => t.subscribe(subject, queue_group).await.map(Subscription::Nats),
            Transport::Memory(t) => Ok(Subscription::Memory(t.subscribe_with_capacity(
                subject,
                queue_group,
                capacity,
            ))),
        }
    }

    /// Waits until everything sent so far reached the broker.
    pub(crate) async fn flush(&self) -> Result<()> {
        match self {
            Transport::Nats(t) => t.flush().await,
            Transport::Memory(_) => Ok(()),
        }
    }

    /// Whether the broker connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Transport::Nats(t) => t.is_connected(),
            Transport::Memory(_) => true,
        }
    }

    pub(crate) fn dropped_messages(&self) -> u64 {
        match self {
            Transport::Nats(t) => t.slow_consumer_events(),
            Transport::Memory(bus) => bus.dropped(),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Transport::Nats(_) => "nats",
            Transport::Memory(_) => "memory",
        }
    }
}

/// A live subscription.
pub(crate) enum Subscription {
    Nats(nats::NatsSubscription),
    Memory(memory::MemorySubscription),
}

impl Subscription {
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        match self {
            Subscription::Nats(s) => s.next().await,
            Subscription::Memory(s) => s.next().await,
        }
    }

    /// Stops new deliveries; messages already delivered are still returned by
    /// [`next`](Self::next), which then yields `None`.
    pub(crate) async fn drain(&mut self) {
        match self {
            Subscription::Nats(s) => s.drain().await,
            Subscription::Memory(s) => s.drain(),
        }
    }
}
