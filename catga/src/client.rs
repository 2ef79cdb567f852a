//! Sending commands and publishing events: [`Client`] for processes that host
//! no handlers, [`Context`] inside a handler (same API, plus propagation of
//! correlation and causation ids and of the caller's deadline).

use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{Command, Event};
use crate::store::Work;
use crate::transport::memory::MemoryBus;
use crate::transport::nats::{NatsConnect, NatsTransport};
use crate::transport::{Reply, Transport};
use crate::wire::codec::Decode;
use crate::wire::deadline::Deadline;
use crate::wire::{self, Cause, MessageMeta};

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
    /// Where delayed messages wait: the service's store.
    store: Arc<StoreAccess>,
}

/// How a client reaches the store its delayed messages wait in.
pub(crate) enum StoreAccess {
    /// A runtime's store, or an embedded bus's.
    Ready(crate::store::Store),
    /// The replicas' Redis, as a configuration names it: opened at the
    /// first delayed message, with the shard count it is marked with.
    FromConfig(
        Box<crate::config::Config>,
        tokio::sync::OnceCell<crate::store::Store>,
    ),
    /// None (a client from a NATS URL alone).
    Missing,
}

impl StoreAccess {
    async fn store(&self) -> Result<&crate::store::Store> {
        match self {
            StoreAccess::Ready(store) => Ok(store),
            StoreAccess::FromConfig(config, cell) => {
                cell.get_or_try_init(|| async {
                    crate::store::open_from(config, true)
                        .await?
                        .ok_or_else(|| Error::new(ErrorKind::Config, "REDIS_URL is not set"))
                })
                .await
            }
            StoreAccess::Missing => Err(Error::new(
                ErrorKind::Config,
                "a delayed message waits in the service's store: connect with `Client::connect_with` and a \
                 configuration that has the replicas' REDIS_URL and CATGA_SERVICE",
            )),
        }
    }
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
    /// A client over NATS at `url` (e.g. `nats://127.0.0.1:4222`; several
    /// servers comma separated; `user:password@` or `token@` in the URL is
    /// used to log in).
    ///
    /// Waits up to the default request time-out for the first connection:
    /// a broker that refuses the credentials or the TLS handshake is an
    /// error ([`ErrorKind::Unauthorized`], [`ErrorKind::Config`]); a broker
    /// that is not reachable yet is not: the client keeps connecting in the
    /// background, and while the broker is unreachable each operation waits
    /// up to its time-out for it and then fails with a retryable error,
    /// having sent nothing.
    pub async fn connect(url: &str) -> Result<Client> {
        let config = crate::config::Config {
            nats_url: Some(url.to_owned()),
            ..crate::config::Config::default()
        };
        Client::connect_with(&config).await
    }

    /// [`connect`](Self::connect) with every NATS setting of `config`
    /// (URL, credentials, TLS, request time-out): a gateway connects the
    /// same way as a service.
    pub async fn connect_with(config: &crate::config::Config) -> Result<Client> {
        let url = config
            .nats_url
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Config, "NATS_URL is not set"))?;
        let transport = NatsTransport::connect(&NatsConnect {
            url,
            name: "catga-client".to_owned(),
            security: config.nats_security.clone(),
            js_domain: config.streams.domain.clone(),
            region: config.region.clone(),
        })
        .await?;
        transport.first_connection(config.request_timeout).await?;
        let store = if crate::store::RedisConnect::from_config(config).is_some() {
            StoreAccess::FromConfig(Box::new(config.clone()), tokio::sync::OnceCell::new())
        } else {
            StoreAccess::Missing
        };
        Ok(Client::from_transport(
            transport.into(),
            config.service.clone(),
            wire::new_message_id(),
            config.request_timeout,
            store,
        ))
    }

    /// A client on an in-memory bus (the embedded mode), e.g. the bus a
    /// runtime was built with.
    pub fn memory(bus: &MemoryBus) -> Client {
        let store = crate::store::Store::memory(Arc::clone(bus.store()), 1);
        Client::from_transport(
            bus.clone().into(),
            "client".to_owned(),
            wire::new_message_id(),
            crate::config::DEFAULT_REQUEST_TIMEOUT,
            StoreAccess::Ready(store),
        )
    }

    pub(crate) fn from_transport(
        transport: Transport,
        service: String,
        instance_id: String,
        request_timeout: Duration,
        store: StoreAccess,
    ) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                transport,
                service,
                instance_id,
                request_timeout,
                store: Arc::new(store),
            }),
        }
    }

    /// The same client with another default reply time-out.
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                transport: self.inner.transport.clone(),
                service: self.inner.service.clone(),
                instance_id: self.inner.instance_id.clone(),
                request_timeout: timeout,
                store: Arc::clone(&self.inner.store),
            }),
        }
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// The default reply time-out of [`send`](Self::send).
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The service name this client speaks for.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The id of this replica (or client).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Requests sent by this client's connection that wait for their reply
    /// right now (an unanswered request leaves when its sender gives up).
    pub fn requests_in_flight(&self) -> usize {
        self.inner.transport.pending_requests()
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
    /// with the handler's own error kind when it fails. A command whose
    /// time-out passed before a replica took it is not run.
    ///
    /// A plain command carries no message id: its one receiver makes one
    /// up. An idempotent one (`#[command(idempotent)]`) carries a fresh
    /// one, and a failure that says it did not run (no handler, replica
    /// unavailable, broker away) is sent again under that id until the
    /// time-out. Use [`send_with_id`](Self::send_with_id) to choose the id,
    /// e.g. to retry later, or from another process, under the same id.
    pub async fn send<C: Command>(&self, cmd: C) -> Result<C::Reply> {
        let deadline = Deadline::after(self.inner.request_timeout);
        if C::IDEMPOTENT {
            return self.send_idempotent(cmd, &wire::new_message_id(), deadline).await;
        }
        let headers = wire::message_headers(false, C::VERSION, Cause::Root);
        self.send_until(cmd, deadline, headers).await
    }

    /// [`send`](Self::send) with an explicit reply time-out.
    pub async fn send_with_timeout<C: Command>(&self, cmd: C, timeout: Duration) -> Result<C::Reply> {
        let deadline = Deadline::after(timeout);
        if C::IDEMPOTENT {
            return self.send_idempotent(cmd, &wire::new_message_id(), deadline).await;
        }
        let headers = wire::message_headers(false, C::VERSION, Cause::Root);
        self.send_until(cmd, deadline, headers).await
    }

    /// [`send`](Self::send) under a message id chosen by the caller (sent as
    /// `Nats-Msg-Id`; the handler sees it as [`Context::message_id`]): 1 to
    /// 256 visible ASCII characters, else an [`ErrorKind::Invalid`] error.
    /// For an idempotent command, sending again under the same id (after a
    /// time-out, or from another process) gets the first answer.
    pub async fn send_with_id<C: Command>(&self, cmd: C, message_id: &str) -> Result<C::Reply> {
        wire::check_id(message_id)?;
        let deadline = Deadline::after(self.inner.request_timeout);
        if C::IDEMPOTENT {
            return self.send_idempotent(cmd, message_id, deadline).await;
        }
        let headers = wire::message_headers(false, C::VERSION, Cause::Id(message_id));
        self.send_until(cmd, deadline, headers).await
    }

    /// An idempotent command carries a message id, so it can be sent again
    /// safely: a failure that says the command never ran or may be asked
    /// again (no handler, unavailable, broker away) is retried under the
    /// same id with back-off until the deadline. A time-out is not: no time
    /// is left.
    async fn send_idempotent<C: Command>(&self, cmd: C, id: &str, deadline: Deadline) -> Result<C::Reply> {
        let headers = wire::message_headers(false, C::VERSION, Cause::Id(id));
        self.send_idempotent_with(cmd, id, deadline, headers).await
    }

    pub(crate) async fn send_idempotent_with<C: Command>(
        &self,
        cmd: C,
        id: &str,
        deadline: Deadline,
        headers: HeaderMap,
    ) -> Result<C::Reply> {
        let _ = id;
        let payload = cmd.encode()?;
        let body = self
            .request_retrying(&Subject::from_static(C::SUBJECT), headers, payload, deadline)
            .await?;
        decode_body::<C::Reply>(C::SUBJECT, &body)
    }

    /// A request under message id `id` (to an idempotent command) with
    /// `headers` (see [`Context::headers_with_id`]), sent again while it
    /// says it did not run, until `timeout` (the request time-out without
    /// one); the reply's body, or its error.
    pub(crate) async fn request_with_id(
        &self,
        subject: &str,
        payload: Bytes,
        headers: HeaderMap,
        timeout: Option<Duration>,
    ) -> Result<Bytes> {
        let subject = Subject::from(subject);
        let deadline = Deadline::after(timeout.unwrap_or(self.inner.request_timeout));
        self.request_retrying(&subject, headers, payload, deadline).await
    }

    /// Sends a request again after a failure that says it did not run (no
    /// handler, unavailable, broker away), with back-off, until `deadline`;
    /// the reply's body, or the error it carries.
    pub(crate) async fn request_retrying(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        deadline: Deadline,
    ) -> Result<Bytes> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .inner
                .transport
                .request(subject, headers.clone(), payload.clone(), deadline)
                .await
                .and_then(|reply| reply_body(subject, reply));
            match result {
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::NoHandler | ErrorKind::Unavailable | ErrorKind::Transport
                    ) =>
                {
                    let pause = crate::resilience::backoff(Duration::from_millis(50), attempt);
                    match deadline.remaining() {
                        Some(left) if left > pause => tokio::time::sleep(pause).await,
                        _ => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    /// Publishes an event to every subscriber (once per queue group).
    /// Returns within the request time-out; an error means it was not sent.
    pub async fn publish<E: Event>(&self, event: E) -> Result<()> {
        let headers = wire::message_headers(true, E::VERSION, Cause::Root);
        self.publish_with(event, headers, false).await
    }

    /// [`publish`](Self::publish) under a message id chosen by the caller:
    /// publishing again under the same id is dropped by JetStream within
    /// its duplicate window, and runs an idempotent handler once.
    pub async fn publish_with_id<E: Event>(&self, event: E, message_id: &str) -> Result<()> {
        wire::check_id(message_id)?;
        let headers = wire::message_headers(true, E::VERSION, Cause::Id(message_id));
        self.publish_with(event, headers, false).await
    }

    /// Publishes an event to the JetStream stream that keeps its subject
    /// (the stream a durable handler of it creates) and waits until it is
    /// stored: once this returns, durable handlers will get it. No stream
    /// for the subject is an [`ErrorKind::NoHandler`] error.
    pub async fn publish_durable<E: Event>(&self, event: E) -> Result<()> {
        let headers = wire::message_headers(true, E::VERSION, Cause::Root);
        self.publish_with(event, headers, true).await
    }

    /// [`publish_durable`](Self::publish_durable) under a message id chosen
    /// by the caller: a publish retried after an error (its acknowledgement
    /// may have been lost while the event was stored) is dropped as a
    /// repeat by the stream within its duplicate window, instead of being
    /// stored twice under two ids.
    pub async fn publish_durable_with_id<E: Event>(&self, event: E, message_id: &str) -> Result<()> {
        wire::check_id(message_id)?;
        let headers = wire::message_headers(true, E::VERSION, Cause::Id(message_id));
        self.publish_with(event, headers, true).await
    }

    /// Publishes `event` once `delay` has passed; see
    /// [`publish_at`](Self::publish_at).
    pub async fn publish_after<E: Event>(&self, delay: Duration, event: E) -> Result<String> {
        self.publish_at(after_now(self.transport().clock(), delay)?, event)
            .await
    }

    /// Publishes `event` at `at`, not before (in a handler,
    /// [`Context::publish_at`] commits it with the handler's work). It
    /// waits in the service's store until a replica's outbox relay stores
    /// it in its subject's stream, once; returns its message id, for
    /// [`cancel_delayed`](Self::cancel_delayed).
    ///
    /// The store is the one of the service this client names: a runtime's
    /// client ([`Runtime::client`](crate::Runtime::client)) has the
    /// runtime's; an embedded bus's client ([`Client::memory`]) has the
    /// bus's (a runtime on that bus with a Redis URL keeps its delayed
    /// messages in Redis: use its own client); a client from
    /// [`connect_with`](Self::connect_with) opens the replicas' Redis
    /// (`REDIS_URL`, `CATGA_SERVICE`) at its first delayed message, once a
    /// replica of the service marked it (a [`ErrorKind::Config`] error
    /// before, which also catches a misspelt service name); one from a
    /// NATS URL alone has none (a [`ErrorKind::Config`] error). A replica
    /// of that service must run for it to be published.
    pub async fn publish_at<E: Event>(&self, at: std::time::SystemTime, event: E) -> Result<String> {
        let store = self.inner.store.store().await?;
        let headers = wire::message_headers(true, E::VERSION, Cause::Root);
        let mut entry = outbox_entry(self.transport(), headers, &event)?;
        entry.due_ms = Some(wire::unix_ms(at));
        let id = entry.id.clone();
        let commit = crate::store::Commit {
            events: vec![entry],
            ..Default::default()
        };
        store.commit(&commit).await?;
        Ok(id)
    }

    /// Cancels a delayed message that has not come due: `true` if it was
    /// still waiting (it will not be published), `false` if no delayed
    /// message has that id any more (published already, or cancelled).
    pub async fn cancel_delayed(&self, id: &str) -> Result<bool> {
        self.inner.store.store().await?.delayed_cancel(id).await
    }

    /// Sends a raw payload to a command subject and returns the raw reply
    /// body (for gateways that forward JSON); an error reply becomes
    /// [`Error`] with its kind and message. The subject follows the rules of
    /// the macros: no wildcards, nothing under `$` or `_INBOX`.
    pub async fn send_raw(&self, subject: &str, payload: Bytes) -> Result<Bytes> {
        wire::check_subject(subject)?;
        let subject = Subject::from(subject);
        let reply = self
            .inner
            .transport
            .request(
                &subject,
                HeaderMap::new(),
                payload,
                Deadline::after(self.inner.request_timeout),
            )
            .await?;
        reply_body(&subject, reply)
    }

    /// Publishes a raw payload on an event subject (for bridges that
    /// forward JSON), with a fresh `Nats-Msg-Id` like every event. The
    /// subject follows the rules of [`send_raw`](Self::send_raw).
    pub async fn publish_raw(&self, subject: &str, payload: Bytes) -> Result<()> {
        wire::check_subject(subject)?;
        let h = wire::message_headers(true, 1, Cause::Root);
        self.inner
            .transport
            .publish(&Subject::from(subject), h, payload, self.inner.request_timeout)
            .await
    }

    pub(crate) async fn send_until<C: Command>(
        &self,
        cmd: C,
        deadline: Deadline,
        headers: HeaderMap,
    ) -> Result<C::Reply> {
        let payload = cmd.encode()?;
        let reply = self
            .inner
            .transport
            .request(&Subject::from_static(C::SUBJECT), headers, payload, deadline)
            .await?;
        decode_reply::<C::Reply>(C::SUBJECT, reply)
    }

    pub(crate) async fn publish_with<E: Event>(
        &self,
        event: E,
        headers: HeaderMap,
        durable: bool,
    ) -> Result<()> {
        let payload = event.encode()?;
        if durable {
            return self
                .inner
                .transport
                .publish_durable(E::SUBJECT, headers, payload, self.inner.request_timeout)
                .await;
        }
        self.inner
            .transport
            .publish(
                &Subject::from_static(E::SUBJECT),
                headers,
                payload,
                self.inner.request_timeout,
            )
            .await
    }
}

/// Turns a reply into the command's reply type, or into the handler's error.
fn decode_reply<R: Decode>(subject: &str, reply: Reply) -> Result<R> {
    decode_body(subject, &reply_body(subject, reply)?)
}

/// A reply's body, or the handler's error it carries.
fn reply_body(subject: &str, reply: Reply) -> Result<Bytes> {
    match wire::errors::decode(reply.headers.as_ref(), &reply.payload, subject) {
        Some(err) => Err(err),
        None => Ok(reply.payload),
    }
}

/// A reply body as the command's reply type.
fn decode_body<R: Decode>(subject: &str, body: &[u8]) -> Result<R> {
    R::decode(body, std::any::type_name::<R>()).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("undecodable reply on subject {subject}: {}", e.message()),
        )
    })
}

/// What a handler sees: the incoming message's identity, a client whose
/// sends and publishes carry its correlation id, name it as their cause,
/// and fit in what is left of its sender's deadline, and the state store
/// (see [`Context::load`] and [`Context::save`]).
#[derive(Clone)]
pub struct Context {
    client: Client,
    meta: Arc<MessageMeta>,
    work: Arc<Work>,
    /// The handler running (`crate::module::fn_name`).
    handler: &'static str,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("meta", &self.meta)
            .field("client", &self.client)
            .field("store", &self.work.store.name())
            .field("idempotent", &self.work.staged.is_some())
            .finish()
    }
}

/// The id of the `n`th message a handler sends while handling `parent`:
/// the same on every run of the handler, so that a run repeated after a
/// crash sends what its receivers (if idempotent) recognise.
pub(crate) fn child_id(parent: &str, n: u64) -> String {
    if parent.len() + 24 <= wire::MAX_ID_LEN {
        return format!("{parent}.{n}");
    }
    // Too long to extend: a stable hash of the parent stands in for it.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}.{n}")
}

impl Context {
    pub(crate) fn new(
        client: Client,
        meta: Arc<MessageMeta>,
        work: Arc<Work>,
        handler: &'static str,
    ) -> Context {
        Context {
            client,
            meta,
            work,
            handler,
        }
    }

    /// The name of the handler running: its function's path
    /// (`crate::module::fn_name`).
    pub fn handler(&self) -> &'static str {
        self.handler
    }

    pub(crate) fn work(&self) -> &Work {
        &self.work
    }

    /// The headers of a message this handler sends: its correlation id,
    /// this message as the cause, and an id of its own (derived from this
    /// message's id in an idempotent handler, see [`child_id`]).
    pub(crate) fn child_headers(&self, event: bool, version: u32) -> HeaderMap {
        let mut h = wire::message_headers(event, version, Cause::Parent(&self.meta));
        if self.work.staged.is_some() {
            let n = self.work.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            h.insert(
                wire::headers::MESSAGE_ID,
                child_id(self.meta.message_id(), n).as_str(),
            );
        }
        h
    }

    /// The headers of a delayed event this handler sends: like
    /// [`child_headers`](Self::child_headers), with an id derived from this
    /// message's and this handler's name in every handler (not only an
    /// idempotent one): a run repeated (a retry, a redelivery) schedules
    /// the same message again, which replaces the one waiting rather than
    /// adding a second, and two handlers of one message schedule two.
    pub(crate) fn delayed_headers(&self, version: u32) -> HeaderMap {
        let mut h = wire::message_headers(true, version, Cause::Parent(&self.meta));
        let n = self.work.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handler = xxhash_rust::xxh3::xxh3_64(self.handler.as_bytes()) as u32;
        let id = wire::bounded_id(format!("{}~{handler:08x}", child_id(self.meta.message_id(), n)));
        h.insert(wire::headers::MESSAGE_ID, id.as_str());
        h
    }

    /// The headers of a command this handler sends under message id `id`
    /// (a saga's step or compensation): its correlation id and this
    /// message as the cause, like any message it sends, but the given id.
    pub(crate) fn headers_with_id(&self, version: u32, id: &str) -> Result<HeaderMap> {
        wire::check_id(id)?;
        let mut h = wire::message_headers(false, version, Cause::Parent(&self.meta));
        h.insert(wire::headers::MESSAGE_ID, id);
        Ok(h)
    }

    /// The deadline for a nested send: the default time-out, but no later
    /// than the deadline of the message being handled.
    fn nested_deadline(&self, timeout: Duration) -> Deadline {
        match self.meta.deadline() {
            Some(d) => d.min_after(timeout),
            None => Deadline::after(timeout),
        }
    }

    /// Sends a command caused by the message being handled, within what is
    /// left of its sender's deadline. A failure (the command's handler's
    /// error, no handler, a time-out) is returned as is. If the handler
    /// passes it on with `?`, it fails itself (500, not retryable: it
    /// already ran), with the downstream cause in the message (see
    /// [`Error`]). An idempotent event handler's run fails with the
    /// downstream kind instead when the command is idempotent too (or none
    /// took it), so a time-out is tried again (`retry`, a durable
    /// redelivery), and with a refusal's kind, which is final.
    pub async fn send<C: Command>(&self, cmd: C) -> Result<C::Reply> {
        self.send_with_timeout(cmd, self.client.inner.request_timeout)
            .await
    }

    /// [`send`](Self::send) under a message id the handler chooses, such as
    /// one made from a business key (`format!("count-{order}")`). Every run
    /// of the handler, a redelivery, and a replay of its dead letter (which
    /// has an id of its own, and so other derived ids) send the command
    /// under the same id, which an idempotent receiver answers once within
    /// its inbox window (`CATGA_INBOX_WINDOW_MS`). The id names one
    /// payload there: the same id with another payload is refused (409).
    /// An id longer than
    /// [`MAX_ID_LEN`](crate::MAX_ID_LEN) is cut to its start and a hash of
    /// the whole, the same each time; one with characters an id may not
    /// hold is refused.
    pub async fn send_with_id<C: Command>(&self, cmd: C, message_id: &str) -> Result<C::Reply> {
        self.work.check_fence()?;
        let deadline = self.nested_deadline(self.client.inner.request_timeout);
        let id = wire::bounded_id(message_id.to_owned());
        let headers = self.headers_with_id(C::VERSION, &id)?;
        let result = if C::IDEMPOTENT {
            match cmd.encode() {
                Err(e) => Err(e),
                Ok(payload) => self.request_idempotent::<C>(headers, payload, deadline).await,
            }
        } else {
            self.client.send_until(cmd, deadline, headers).await
        };
        self.sent::<C>(result)
    }

    /// Requests an idempotent command, again while no replica takes it
    /// (within `deadline`), and decodes its reply.
    async fn request_idempotent<C: Command>(
        &self,
        headers: HeaderMap,
        payload: Bytes,
        deadline: Deadline,
    ) -> Result<C::Reply> {
        self.client
            .request_retrying(&Subject::from_static(C::SUBJECT), headers, payload, deadline)
            .await
            .and_then(|body| decode_body::<C::Reply>(C::SUBJECT, &body))
    }

    /// What a nested send of `C` came to: noted when `C` is not idempotent
    /// (the handler cannot run again without sending it again), and a
    /// failure marked as downstream.
    fn sent<C: Command>(&self, result: Result<C::Reply>) -> Result<C::Reply> {
        if !C::IDEMPOTENT {
            self.work
                .sent_unrepeatable
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        result.map_err(|e| e.downstream(C::SUBJECT, C::IDEMPOTENT))
    }

    /// [`send`](Self::send) with an explicit reply time-out (still no later
    /// than the deadline of the message being handled).
    pub async fn send_with_timeout<C: Command>(&self, cmd: C, timeout: Duration) -> Result<C::Reply> {
        self.work.check_fence()?;
        let deadline = self.nested_deadline(timeout);
        let mut headers = self.child_headers(false, C::VERSION);
        let result = if C::IDEMPOTENT {
            // Run again (after a crash, or a retryable failure), this
            // handler sends the same command under the same id, and its
            // receiver answers it once. The id also names the payload, so
            // that a run sending something else (a handler that puts a
            // clock reading in the command) sends it under another id
            // instead of being refused as a conflict by the receiver's
            // inbox, which binds each id to its payload.
            match cmd.encode() {
                Err(e) => Err(e),
                Ok(payload) => {
                    let id = match headers.get(wire::headers::MESSAGE_ID) {
                        Some(id) => wire::bounded_id(format!(
                            "{}~{}",
                            id.as_str(),
                            &crate::store::digest(&payload)[..16]
                        )),
                        None => wire::new_message_id(),
                    };
                    headers.insert(wire::headers::MESSAGE_ID, id.as_str());
                    self.request_idempotent::<C>(headers, payload, deadline).await
                }
            }
        } else {
            self.client.send_until(cmd, deadline, headers).await
        };
        self.sent::<C>(result)
    }

    /// Publishes an event caused by the message being handled. In an
    /// idempotent handler it goes through the outbox, committed with the
    /// handler's answer (or not at all); in a `leader` handler or a keyed
    /// saga it goes through the outbox too, committed under the lease's
    /// fencing token, so that a replica that lost the lease publishes
    /// nothing; on a subject with a durable handler in this process, it
    /// waits for JetStream's acknowledgement.
    pub async fn publish<E: Event>(&self, event: E) -> Result<()> {
        if let Some(staged) = &self.work.staged {
            let entry = self.outbox_entry(&event)?;
            staged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .events
                .push(entry);
            return Ok(());
        }
        if self.work.fence.is_some() {
            self.work.check_fence()?;
            return self.commit_events(vec![self.outbox_entry(&event)?]).await;
        }
        let durable = self.work.durable_subjects.contains(E::SUBJECT);
        let headers = self.child_headers(true, E::VERSION);
        self.client.publish_with(event, headers, durable).await
    }

    /// Publishes an event to the stream that keeps its subject and waits
    /// until it is stored (see [`Client::publish_durable`]). In an
    /// idempotent, `leader` or keyed-saga handler it goes through the
    /// outbox like [`publish`](Self::publish) (to its stream, created if
    /// none stores the subject): it leaves with the handler's commit, or
    /// not at all.
    pub async fn publish_durable<E: Event>(&self, event: E) -> Result<()> {
        if self.work.staged.is_some() || self.work.fence.is_some() {
            return self.publish(event).await;
        }
        let headers = self.child_headers(true, E::VERSION);
        self.client.publish_with(event, headers, true).await
    }

    /// Id of the message being handled.
    pub fn message_id(&self) -> &str {
        self.meta.message_id()
    }

    /// Id of the W3C trace the message being handled belongs to, if its
    /// sender continued or started one (see [`TraceParent`](crate::TraceParent)).
    pub fn trace_id(&self) -> Option<String> {
        self.meta.trace_id()
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

    /// In a `#[job]`: the time the occurrence being run was scheduled for
    /// (its message id is `<job>:<scheduled unix ms>`); `None` in any
    /// other handler.
    pub fn scheduled_at(&self) -> Option<std::time::SystemTime> {
        crate::wire::occurrence_of(self.subject(), self.message_id())
    }

    /// When the sender stops waiting for the reply, if it said.
    pub fn deadline(&self) -> Option<Deadline> {
        self.meta.deadline()
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

    /// Now, by the clock catga keeps the times of later work by (saga
    /// timers and time-outs, delayed messages, jobs): the system's, or,
    /// on an embedded bus a test kit moved forward (`TestKit::advance`),
    /// that bus's. Take it rather than `SystemTime::now()` for a time the
    /// handler computes from now (`saga.sleep_until(...)`), so that a test
    /// can skip ahead.
    pub fn now(&self) -> std::time::SystemTime {
        self.client.transport().clock().now()
    }

    /// [`now`](Self::now) in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        self.client.transport().clock().now_ms()
    }
}

/// An event as the outbox keeps it. One that the broker could never
/// take (over its limit, with the ids the relay adds) is refused here,
/// before anything is committed: a 413 the handler sees, instead of a
/// committed event that can never be published.
pub(crate) fn outbox_entry<E: Event>(
    transport: &crate::transport::Transport,
    headers: async_nats::HeaderMap,
    event: &E,
) -> Result<crate::store::OutboxEntry> {
    let payload = event.encode()?;
    let size = crate::transport::memory::wire_size(Some(&headers), payload.len())
        + crate::transport::ROUTING_HEADROOM;
    if size > transport.max_payload() {
        return Err(crate::transport::memory::too_large(
            E::SUBJECT,
            size,
            transport.max_payload(),
        ));
    }
    let header_block =
        crate::transport::memory::wire_size(Some(&headers), 0) + crate::transport::ROUTING_HEADROOM;
    if header_block > crate::transport::MAX_HEADERS {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "the headers of an event on {} take {header_block} bytes, over JetStream's limit of {}",
                E::SUBJECT,
                crate::transport::MAX_HEADERS
            ),
        ));
    }
    let id = headers
        .get(crate::wire::headers::MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(crate::wire::new_message_id);
    Ok(crate::store::OutboxEntry {
        id,
        subject: E::SUBJECT.to_owned(),
        headers: headers
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
            .collect(),
        payload: payload.to_vec(),
        due_ms: None,
    })
}

/// Now plus `delay`, or an invalid-input error for a delay past what a
/// clock can tell.
pub(crate) fn after_now(
    clock: &crate::clock::Clock,
    delay: std::time::Duration,
) -> Result<std::time::SystemTime> {
    clock
        .now()
        .checked_add(delay)
        .ok_or_else(|| Error::invalid(format!("a delay of {delay:?} is past the end of time")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_ids_are_stable_and_bounded() {
        assert_eq!(child_id("m1", 0), "m1.0");
        assert_eq!(child_id("m1", 0), child_id("m1", 0));
        let long = "x".repeat(250);
        let id = child_id(&long, 3);
        assert!(id.len() <= wire::MAX_ID_LEN && id.ends_with(".3"), "{id}");
        wire::check_id(&id).expect("a valid id");
    }

    #[test]
    fn nested_sends_fit_in_the_callers_deadline() {
        let bus = MemoryBus::new();
        let client = Client::memory(&bus);
        let soon = Deadline::after(Duration::from_millis(300));
        let meta = MessageMeta::new("s".into(), None, Some(soon), 1);
        let work = || {
            Arc::new(Work {
                store: crate::store::MemoryStore::new().into(),
                orphans: crate::store::Orphans::new().0,
                staged: None,
                durable_subjects: Arc::default(),
                sent: Default::default(),
                sent_unrepeatable: Default::default(),
                fence: None,
                held: None,
                member: "test".into(),
                alive_for: Duration::from_secs(1),
                last_delivery: false,
                saga_timeout: None,
                home: None,
                events_home: None,
            })
        };
        let ctx = Context::new(client.clone(), Arc::new(meta), work(), "tests::h");
        assert_eq!(ctx.nested_deadline(Duration::from_secs(5)), soon);
        let free = Context::new(
            client,
            Arc::new(MessageMeta::new("s".into(), None, None, 1)),
            work(),
            "tests::h",
        );
        assert!(free.nested_deadline(Duration::from_secs(5)) > soon);
    }
}
