//! Sending commands and publishing events: [`Client`] for processes that host
//! no handlers, [`Context`] inside a handler (same API, plus propagation of
//! correlation and causation ids).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Command, Event, Message, MessageKind, MessageMeta, headers, new_message_id};
use crate::transport::memory::MemoryBus;
use crate::transport::nats::NatsTransport;
use crate::transport::{Headers, Reply, Subject, Transport};

/// Default time a [`Client::send`] waits for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends commands and publishes events. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    transport: Transport,
    service: String,
    instance_id: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.inner.transport.name())
            .field("service", &self.inner.service)
            .field("instance_id", &self.inner.instance_id)
            .finish()
    }
}

impl Client {
    /// A client over NATS at `url` (e.g. `nats://127.0.0.1:4222`). Connects in
    /// the background and keeps reconnecting; operations fail with a
    /// retryable error while the broker is unreachable.
    pub async fn connect(url: &str) -> Result<Client> {
        let transport = NatsTransport::connect(url, "catga-client", crate::config::DEFAULT_CAPACITY).await?;
        Ok(Client::from_transport(
            Transport::Nats(transport),
            "client".to_owned(),
            new_message_id(),
            DEFAULT_REQUEST_TIMEOUT,
        ))
    }

    /// A client on an in-memory bus (the embedded mode), e.g. the bus a
    /// runtime was built with.
    pub fn memory(bus: &MemoryBus) -> Client {
        Client::from_transport(
            Transport::Memory(bus.clone()),
            "client".to_owned(),
            new_message_id(),
            DEFAULT_REQUEST_TIMEOUT,
        )
    }

    pub(crate) fn from_transport(
        transport: Transport,
        service: String,
        instance_id: String,
        request_timeout: Duration,
    ) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                transport,
                service,
                instance_id,
                request_timeout,
            }),
        }
    }

    /// The same client with another default reply time-out.
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client::from_transport(
            self.inner.transport.clone(),
            self.inner.service.clone(),
            self.inner.instance_id.clone(),
            timeout,
        )
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// The service name this client speaks for.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The id of this replica (or client).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Whether the broker connection is up (always true in memory).
    pub fn is_connected(&self) -> bool {
        self.inner.transport.is_connected()
    }

    /// Sends a command to the one replica of its queue group that takes it
    /// and waits for its reply.
    ///
    /// Fails fast with [`ErrorKind::NoHandler`] when nobody subscribes to the
    /// subject, with [`ErrorKind::Timeout`] when no reply arrives in time, and
    /// with the handler's own error kind and message when it fails.
    ///
    /// The command carries no message id: its one receiver makes one up.
    /// Use [`send_with_id`](Self::send_with_id) to choose it, e.g. to retry
    /// a command under the same id.
    pub async fn send<C: Command>(&self, cmd: C) -> Result<C::Reply> {
        self.send_within(cmd, self.inner.request_timeout, Cause::Root)
            .await
    }

    /// [`send`](Self::send) with an explicit reply time-out.
    pub async fn send_with_timeout<C: Command>(&self, cmd: C, timeout: Duration) -> Result<C::Reply> {
        self.send_within(cmd, timeout, Cause::Root).await
    }

    /// [`send`](Self::send) under a message id chosen by the caller (sent as
    /// `Nats-Msg-Id`; the handler sees it as [`Context::message_id`]).
    pub async fn send_with_id<C: Command>(&self, cmd: C, message_id: &str) -> Result<C::Reply> {
        self.send_within(cmd, self.inner.request_timeout, Cause::Id(message_id))
            .await
    }

    /// Publishes an event to every subscriber (once per queue group).
    pub async fn publish<E: Event>(&self, event: E) -> Result<()> {
        self.publish_from(event, Cause::Root).await
    }

    /// Sends a raw payload to a command subject and returns the raw reply
    /// body (for gateways that forward JSON); an error reply becomes
    /// [`Error`] with its kind and message.
    pub async fn send_raw(&self, subject: &str, payload: Bytes) -> Result<Bytes> {
        let reply = self
            .inner
            .transport
            .request(
                &Subject::from(subject),
                Headers::new(),
                payload,
                self.inner.request_timeout,
            )
            .await?;
        if let Some(err) = reply_error(&reply) {
            return Err(err);
        }
        Ok(reply.payload)
    }

    /// Publishes a raw payload on an event subject (for bridges that
    /// forward JSON), with a fresh `Nats-Msg-Id` like every event.
    pub async fn publish_raw(&self, subject: &str, payload: Bytes) -> Result<()> {
        let mut h = Headers::new();
        h.insert(headers::MESSAGE_ID, new_message_id());
        self.inner
            .transport
            .publish(&Subject::from(subject), h, payload)
            .await
    }

    pub(crate) async fn send_within<C: Command>(
        &self,
        cmd: C,
        timeout: Duration,
        cause: Cause<'_>,
    ) -> Result<C::Reply> {
        let payload = codec::encode(&cmd)?;
        let headers = outgoing_headers::<C>(cause);
        let reply = self
            .inner
            .transport
            .request(&Subject::from_static(C::SUBJECT), headers, payload, timeout)
            .await?;
        decode_reply::<C::Reply>(C::SUBJECT, reply)
    }

    pub(crate) async fn publish_from<E: Event>(&self, event: E, cause: Cause<'_>) -> Result<()> {
        let payload = codec::encode(&event)?;
        let headers = outgoing_headers::<E>(cause);
        self.inner
            .transport
            .publish(&Subject::from_static(E::SUBJECT), headers, payload)
            .await
    }
}

/// Where a new message comes from.
#[derive(Clone, Copy)]
pub(crate) enum Cause<'a> {
    /// Sent by a client, not caused by another message.
    Root,
    /// Sent by a client under a message id it chose.
    Id(&'a str),
    /// Sent from the handler of this message.
    Parent(&'a MessageMeta),
}

/// The headers of a new message. A header is sent only when it says
/// something the receiver cannot infer, because every header costs
/// allocations on both sides (one `Nats-Msg-Id` header cost 11% of
/// request/reply throughput in the benchmark, see BENCHMARKS.md):
/// - `Nats-Msg-Id` on every event (its receivers must agree on its id), on
///   every message sent from a handler, and on a command whose sender chose
///   an id; a root command without one gets its id from its single receiver;
/// - correlation and causation ids only for a message sent from a handler
///   (a root message's correlation id is its own id);
/// - `Catga-Version` only above version 1;
/// - no type header: a subject carries exactly one message type, fixed at
///   compile time.
fn outgoing_headers<M: Message>(cause: Cause<'_>) -> Headers {
    let mut h = Headers::new();
    match cause {
        Cause::Parent(p) => {
            h.insert(headers::CORRELATION_ID, p.correlation_id());
            h.insert(headers::CAUSATION_ID, p.message_id());
            h.insert(headers::MESSAGE_ID, new_message_id());
        }
        Cause::Id(id) => h.insert(headers::MESSAGE_ID, id),
        Cause::Root if M::KIND == MessageKind::Event => h.insert(headers::MESSAGE_ID, new_message_id()),
        Cause::Root => {}
    }
    if M::VERSION != 1 {
        h.insert(headers::VERSION, M::VERSION.to_string());
    }
    h
}

/// The error carried by an error reply, if it is one.
fn reply_error(reply: &Reply) -> Option<Error> {
    let h = reply.headers.as_ref()?;
    let code = h.get(headers::SERVICE_ERROR_CODE)?;
    let code = code.as_str().trim().parse::<u16>().ok();
    let kind = ErrorKind::from_wire(h.get(headers::ERROR_KIND).map(|v| v.as_str()), code);
    let message = match h.get(headers::SERVICE_ERROR) {
        Some(m) => m.as_str().to_owned(),
        None => String::from_utf8_lossy(&reply.payload).into_owned(),
    };
    Some(Error::new(kind, message))
}

/// Turns a reply into the command's reply type, or into the handler's error.
pub(crate) fn decode_reply<R: serde::de::DeserializeOwned>(subject: &str, reply: Reply) -> Result<R> {
    if let Some(err) = reply_error(&reply) {
        return Err(err);
    }
    codec::decode(&reply.payload, std::any::type_name::<R>()).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("undecodable reply on subject {subject}: {}", e.message()),
        )
    })
}

/// What a handler sees: the incoming message's identity and a client whose
/// sends and publishes carry its correlation id and name it as their cause.
#[derive(Clone)]
pub struct Context {
    client: Client,
    meta: MessageMeta,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("meta", &self.meta)
            .field("client", &self.client)
            .finish()
    }
}

impl Context {
    pub(crate) fn new(client: Client, meta: MessageMeta) -> Context {
        Context { client, meta }
    }

    /// Sends a command caused by the message being handled.
    pub async fn send<C: Command>(&self, cmd: C) -> Result<C::Reply> {
        self.client
            .send_within(cmd, self.client.inner.request_timeout, Cause::Parent(&self.meta))
            .await
    }

    /// [`send`](Self::send) with an explicit reply time-out.
    pub async fn send_with_timeout<C: Command>(&self, cmd: C, timeout: Duration) -> Result<C::Reply> {
        self.client
            .send_within(cmd, timeout, Cause::Parent(&self.meta))
            .await
    }

    /// Publishes an event caused by the message being handled.
    pub async fn publish<E: Event>(&self, event: E) -> Result<()> {
        self.client.publish_from(event, Cause::Parent(&self.meta)).await
    }

    /// Id of the message being handled.
    pub fn message_id(&self) -> &str {
        self.meta.message_id()
    }

    /// Correlation id of the message being handled.
    pub fn correlation_id(&self) -> &str {
        self.meta.correlation_id()
    }

    /// Id of the message that caused the one being handled, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.meta.causation_id()
    }

    /// Subject the message arrived on.
    pub fn subject(&self) -> &str {
        self.meta.subject()
    }

    /// Everything known about the message being handled.
    pub fn meta(&self) -> &MessageMeta {
        &self.meta
    }

    /// The id of the replica running this handler.
    pub fn instance_id(&self) -> &str {
        self.client.instance_id()
    }

    /// The service this replica belongs to.
    pub fn service(&self) -> &str {
        self.client.service()
    }

    /// A client without the causal link, for work not caused by this message.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The headers of an error reply, in the NATS micro convention.
pub(crate) fn error_headers(err: &Error) -> Headers {
    let mut h = Headers::new();
    // Header values cannot hold line breaks.
    let message: String = err
        .message()
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    h.insert(headers::SERVICE_ERROR, message);
    h.insert(headers::SERVICE_ERROR_CODE, err.code().to_string());
    h.insert(headers::ERROR_KIND, err.kind().as_str());
    h
}

/// The body of an error reply: the message, so that `nats req` shows it.
pub(crate) fn error_body(err: &Error) -> Bytes {
    Bytes::from(err.message().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_round_trip_kind_and_message() {
        let err = Error::not_found("order 7 does not exist\nreally");
        let reply = Reply {
            headers: Some(error_headers(&err)),
            payload: error_body(&err),
        };
        let back = decode_reply::<u32>("s", reply).expect_err("error reply");
        assert_eq!(back.kind(), ErrorKind::NotFound);
        assert_eq!(back.message(), "order 7 does not exist really");
    }

    #[test]
    fn root_messages_correlate_to_themselves() {
        let meta = MessageMeta::new("s".into(), None);
        assert_eq!(meta.message_id(), meta.correlation_id());
        assert_eq!(meta.message_id(), meta.message_id(), "a made-up id is stable");
        assert!(meta.causation_id().is_none());
    }
}
