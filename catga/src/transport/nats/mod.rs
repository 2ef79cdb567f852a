//! Core NATS transport (async-nats), with three work-arounds for async-nats
//! 0.51 behaviour, each explained where it is made:
//! - requests go through catga's own inbox and pending-request map, because
//!   async-nats keeps an entry per request until a reply arrives, so every
//!   unanswered request leaks one;
//! - sends and publishes wait for the connection instead of queueing while
//!   it is down, because async-nats queues commands during a reconnect and
//!   blocks once its queue is full, and sends the queued requests after
//!   the reconnect, when their senders have long given up;
//! - a subscription is drained with a counted unsubscribe, because
//!   `Subscriber::drain` forgets the subscription before the server
//!   confirms the unsubscribe and drops what the server sent meanwhile.
//!
//! Files: `credentials` (URLs), `events` (the connection's events and
//! refusals), `inbox` (requests and their replies), `subscription` (the
//! drain, and answering a request).

mod credentials;
mod events;
mod inbox;
mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::client::PublishErrorKind;
use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{Reply, SubscribeTo};
use crate::error::{Error, ErrorKind, Result};
use crate::wire::deadline::{self, Deadline};
use credentials::{UrlAuth, server_addrs};
pub(crate) use events::Refusal;
use events::{EventSink, reconnect_delay};
use inbox::{Inbox, dispatch_replies};
use subscription::{DrainState, Rate};
pub(crate) use subscription::{NatsReply, NatsSubscription};

/// How to reach NATS.
#[derive(Debug, Clone)]
pub(crate) struct NatsConnect {
    /// One URL or several, comma separated.
    pub url: String,
    /// The connection name the server shows (`service/instance`).
    pub name: String,
    /// Credentials and TLS beyond the URL.
    pub security: crate::config::NatsSecurity,
    /// The JetStream domain to use (`CATGA_JS_DOMAIN`).
    pub js_domain: Option<String>,
    /// The region this replica runs in (`CATGA_REGION`): its durable
    /// consumers prefer the pulls of their stream's own cluster.
    pub region: Option<String>,
}

/// Messages async-nats buffers per subscription before it drops. catga
/// reads every subscription at once into its own bounded queue (and counts
/// what it drops there, exactly), so this buffer only has to absorb the
/// moments a serve task waits for a CPU.
const CLIENT_BUFFER: usize = 1 << 16;

/// A connection to a NATS server or cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    /// The async-nats client in use; replaced if its connection task dies
    /// (see [`NatsTransport::revive`]).
    client: RwLock<Arc<async_nats::Client>>,
    how: NatsConnect,
    events: EventSink,
    /// Held while a replacement client is made, so that it is made once.
    reviving: tokio::sync::Mutex<()>,
    inbox: Arc<Inbox>,
    /// Whether the inbox subscription is in place.
    inbox_live: Arc<AtomicBool>,
    dispatcher: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// The JetStream context of the client in use (it runs a task of its
    /// own, so it is made once per client).
    jetstream: Mutex<Option<(usize, async_nats::jetstream::Context)>>,
    /// Whether a stream stores a subject, and when that was looked up (see
    /// `NatsTransport::has_stream`).
    streams: Recalled,
    /// The stream that stored a subject's messages, as its acknowledgements
    /// named it: publishes to one stream chain on each other.
    stream_of: Mutex<HashMap<String, String>>,
    /// The settings dead-letter streams were made with, to make one again.
    dlq_settings: Mutex<Option<crate::config::StreamSettings>>,
    /// Whether JetStream takes atomic batches (API level 2, nats-server
    /// 2.12 and later), once asked.
    batches: Mutex<Option<bool>>,
    /// Whether the streams this connection makes should take atomic
    /// batches (the service has store shards, whose relays send them).
    wants_batches: AtomicBool,
    /// Whether a stream takes atomic batches (its `allow_atomic`), and
    /// when that was looked up.
    batch_settings: Recalled,
    slow_consumer_events: Arc<AtomicU64>,
    server_errors: broadcast::Sender<String>,
    /// What a test kit on real servers sees of this connection (off
    /// unless it turned it on; see [`crate::transport::tap`]).
    tap: Arc<crate::transport::tap::Tap>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The dispatcher holds the inbox subscription, which keeps the
        // connection open; end it with the last handle on the transport.
        if let Some(d) = self.dispatcher.get_mut().take() {
            d.abort();
        }
    }
}

/// What was looked up about streams or subjects, and when.
type Recalled = Mutex<HashMap<String, (bool, Instant)>>;

/// What `known` says of `key`, if it was looked up within `memory`.
fn recalled(known: &Recalled, key: &str, memory: Duration) -> Option<bool> {
    known
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .filter(|(_, at)| at.elapsed() < memory)
        .map(|(value, _)| *value)
}

/// Remembers `value` for `key` in `known`, as of now.
fn remember(known: &Recalled, key: &str, value: bool) {
    known
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned(), (value, Instant::now()));
}

fn transport_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Transport, format!("{what}: {e}")).with_source(e)
}

pub(super) fn publish_error(subject: &str, e: async_nats::PublishError) -> Error {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            Error::new(ErrorKind::TooLarge, format!("message on {subject} refused: {e}")).with_source(e)
        }
        PublishErrorKind::InvalidSubject => {
            Error::new(ErrorKind::Invalid, format!("message on {subject} refused: {e}")).with_source(e)
        }
        PublishErrorKind::Send => transport_error(format!("publish on {subject} failed"), e),
    }
}

fn not_connected(subject: &str, waited: Duration) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!("not connected to NATS (waited {waited:?}); nothing was sent on {subject}"),
    )
}

/// Makes an async-nats client: connects in the background, retries
/// forever, and queues subscriptions until the first connection succeeds.
async fn open(how: &NatsConnect, events: &EventSink) -> Result<async_nats::Client> {
    let (addrs, url_auth) = server_addrs(&how.url)?;
    let sec = &how.security;
    sec.check()?;
    let events = events.clone();
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &sec.creds_file {
        options = options.credentials_file(path).await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("NATS_CREDS: cannot use {}: {e}", path.display()),
            )
        })?;
    }
    if let Some(seed) = &sec.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    match url_auth {
        Some(UrlAuth::UserPassword(user, pass)) => options = options.user_and_password(user, pass),
        Some(UrlAuth::Token(token)) => options = options.token(token),
        None => {}
    }
    if let Some(ca) = &sec.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&sec.tls_cert, &sec.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if sec.tls_first {
        options = options.tls_first();
    }
    options
        .name(&how.name)
        .retry_on_initial_connect()
        .subscription_capacity(CLIENT_BUFFER)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.on(event).await }
        })
        .connect(addrs)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot connect to {}: {e}", crate::config::redact_url(&how.url)),
            )
        })
}

impl NatsTransport {
    /// Connects in the background: returns at once, retries forever, and
    /// queues subscriptions until the first connection succeeds.
    pub(crate) async fn connect(how: &NatsConnect) -> Result<NatsTransport> {
        let slow = Arc::new(AtomicU64::new(0));
        let (server_errors, _) = broadcast::channel(64);
        let events = EventSink::new(Arc::clone(&slow), server_errors.clone(), how)?;
        let client = open(how, &events).await?;
        let prefix = format!("{}.", client.new_inbox());
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                client: RwLock::new(Arc::new(client)),
                how: how.clone(),
                events,
                reviving: tokio::sync::Mutex::new(()),
                inbox: Arc::new(Inbox {
                    prefix,
                    pending: Mutex::new(HashMap::new()),
                    next: AtomicU64::new(0),
                }),
                inbox_live: Arc::new(AtomicBool::new(false)),
                dispatcher: tokio::sync::Mutex::new(None),
                jetstream: Mutex::new(None),
                streams: Mutex::new(HashMap::new()),
                stream_of: Mutex::new(HashMap::new()),
                dlq_settings: Mutex::new(None),
                batches: Mutex::new(None),
                wants_batches: AtomicBool::new(false),
                batch_settings: Mutex::new(HashMap::new()),
                slow_consumer_events: slow,
                server_errors,
                tap: Arc::default(),
            }),
        })
    }

    /// Whether a stream stores `subject`, if looked up within `memory`.
    pub(super) fn stream_known(&self, subject: &str, memory: Duration) -> Option<bool> {
        recalled(&self.inner.streams, subject, memory)
    }

    /// Remembers whether a stream stores `subject`.
    pub(super) fn remember_stream(&self, subject: &str, exists: bool) {
        remember(&self.inner.streams, subject, exists);
    }

    /// The stream that stores `subject`, if an acknowledgement named it.
    pub(crate) fn stream_of(&self, subject: &str) -> Option<String> {
        self.inner
            .stream_of
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(subject)
            .cloned()
    }

    /// Asks for streams that take atomic batches (see
    /// [`Transport::want_batches`](crate::transport::Transport::want_batches)).
    pub(crate) fn want_batches(&self, wanted: bool) {
        self.inner.wants_batches.store(wanted, Ordering::Relaxed);
    }

    /// Whether the streams this connection makes should take atomic
    /// batches.
    pub(super) fn wants_batches(&self) -> bool {
        self.inner.wants_batches.load(Ordering::Relaxed)
    }

    /// Whether JetStream takes atomic batches, if known.
    pub(super) fn batches_known(&self) -> Option<bool> {
        *self.inner.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers whether JetStream takes atomic batches.
    pub(super) fn learn_batches(&self, taken: bool) {
        *self.inner.batches.lock().unwrap_or_else(PoisonError::into_inner) = Some(taken);
    }

    /// Whether the stream `name` takes atomic batches, if looked up within
    /// `memory`.
    pub(super) fn batch_setting(&self, name: &str, memory: Duration) -> Option<bool> {
        recalled(&self.inner.batch_settings, name, memory)
    }

    /// Remembers whether the stream `name` takes atomic batches.
    pub(super) fn learn_batch_setting(&self, name: &str, taken: bool) {
        remember(&self.inner.batch_settings, name, taken);
    }

    /// Whether `name` is a stream an acknowledgement or a look-up named
    /// (not a subject standing in for a stream not known yet).
    pub(super) fn is_known_stream(&self, name: &str) -> bool {
        self.inner
            .stream_of
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|s| s == name)
    }

    /// The settings dead-letter streams were made with (the defaults if
    /// none was made by this process yet).
    pub(super) fn dead_letter_settings(&self) -> crate::config::StreamSettings {
        self.inner
            .dlq_settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }

    pub(super) fn set_dead_letter_settings(&self, settings: &crate::config::StreamSettings) {
        *self
            .inner
            .dlq_settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(settings.clone());
    }

    /// Forgets the stream of `subject` (a publish found none).
    pub(crate) fn forget_stored(&self, subject: &str) {
        self.inner
            .stream_of
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(subject);
    }

    /// Remembers the stream an acknowledgement named for `subject`.
    pub(super) fn learn_stream_of(&self, subject: &str, stream: &str) {
        let mut known = self
            .inner
            .stream_of
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if known.get(subject).is_none_or(|s| s != stream) {
            known.insert(subject.to_owned(), stream.to_owned());
        }
    }

    /// The server's version, once connected.
    pub(crate) fn server_version(&self) -> Option<String> {
        let info = self.client().server_info();
        (!info.version.is_empty()).then_some(info.version)
    }

    /// The name of the NATS cluster of the server this connection is on,
    /// if it is in one.
    pub(crate) fn server_cluster(&self) -> Option<String> {
        self.client().server_info().cluster
    }

    /// Whether this replica names a region (`CATGA_REGION`): the durable
    /// consumers it makes prefer the pulls of their stream's own cluster
    /// (see `durable_subscribe`).
    pub(crate) fn region_aware(&self) -> bool {
        self.inner.how.region.is_some()
    }

    /// The largest message the server takes (its `max_payload`), or NATS'
    /// default before the first connection.
    pub(crate) fn max_payload(&self) -> usize {
        match self.client().server_info().max_payload {
            0 => super::DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// The JetStream context of the client in use.
    pub(crate) fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = self.client();
        let id = Arc::as_ptr(&client) as usize;
        let mut cached = self
            .inner
            .jetstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*cached {
            Some((seen, js)) if *seen == id => js.clone(),
            _ => {
                let js = match &self.inner.how.js_domain {
                    Some(domain) => async_nats::jetstream::with_domain((*client).clone(), domain),
                    None => async_nats::jetstream::new((*client).clone()),
                };
                *cached = Some((id, js.clone()));
                js
            }
        }
    }

    /// The async-nats client in use now.
    fn client(&self) -> Arc<async_nats::Client> {
        Arc::clone(&self.inner.client.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces a client whose connection task died.
    ///
    /// async-nats 0.51 runs each connection in one task and asserts on some
    /// input from the server: a header value with a bare carriage return,
    /// which any client may publish to our subjects, panics that task
    /// (`HeaderValue::from` in its HMSG parser). Every subscription of the
    /// client then ends and nothing can be sent on it again. Rather than
    /// leave the replica deaf, or stop it (so that one hostile frame takes
    /// a replica down), a new client is made; the serve loops resubscribe
    /// on it. Called with the client seen to be dead, so that several
    /// callers noticing at once replace it once.
    pub(crate) async fn revive(&self, dead: &Arc<async_nats::Client>) -> Result<()> {
        let _one_at_a_time = self.inner.reviving.lock().await;
        if !Arc::ptr_eq(dead, &self.client()) {
            return Ok(());
        }
        tracing::error!(
            "the NATS client's connection task died (async-nats panics on some malformed frames); \
             connecting again"
        );
        let fresh = Arc::new(open(&self.inner.how, &self.inner.events).await?);
        *self.inner.client.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The error of a failed publish; a client that can no longer send at
    /// all (its connection task died) is replaced for the next attempt.
    async fn failed(
        &self,
        client: &Arc<async_nats::Client>,
        subject: &str,
        e: async_nats::PublishError,
    ) -> Error {
        if e.kind() == PublishErrorKind::Send {
            let _ = self.revive(client).await;
        }
        publish_error(subject, e)
    }

    /// Slow-consumer events reported by async-nats so far.
    pub(crate) fn slow_consumer_events(&self) -> u64 {
        self.inner.slow_consumer_events.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the first connection. Fails at once with
    /// the reason when the broker refuses us (credentials, TLS); returns
    /// `Ok(false)` if the broker is just not reachable yet.
    pub(crate) async fn first_connection(&self, timeout: Duration) -> Result<bool> {
        let mut refused = self.inner.events.refused.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_connected() {
                return Ok(true);
            }
            if let Some(r) = refused.borrow_and_update().clone() {
                return Err(Error::new(r.kind, r.message));
            }
            let wait = tokio::time::sleep(Duration::from_millis(20));
            tokio::select! {
                () = wait => {}
                _ = refused.changed() => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Why the broker refuses us right now, if it does.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
        self.inner.events.refused.borrow().clone()
    }

    pub(crate) fn server_errors(&self) -> broadcast::Receiver<String> {
        self.inner.server_errors.subscribe()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Waits up to `timeout` for the connection. While it is down async-nats
    /// would queue what we send and send it after the reconnect, long after
    /// the caller gave up; so nothing is handed to it until it is up.
    async fn wait_connected(&self, subject: &str, timeout: Duration) -> Result<()> {
        if self.is_connected() {
            return Ok(());
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(5).min(timeout)).await;
            if self.is_connected() {
                return Ok(());
            }
        }
        Err(not_connected(subject, timeout))
    }

    /// Sends an empty request to `subject` and collects every answer that
    /// arrives within `window` (a discovery request: many may answer).
    pub(crate) async fn gather(&self, subject: &str, window: Duration) -> Result<Vec<Bytes>> {
        self.wait_connected(subject, window).await?;
        let client = self.client();
        let inbox = client.new_inbox();
        let mut sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| transport_error(format!("subscribe to the answers of {subject}"), e))?;
        client
            .publish_with_reply(subject.to_owned(), inbox, Bytes::new())
            .await
            .map_err(|e| transport_error(format!("publish to {subject}"), e))?;
        let until = tokio::time::Instant::now() + window;
        let mut answers = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
            // "No responders" comes as a status message: not an answer.
            if m.status.is_none() {
                answers.push(m.payload);
            }
        }
        let _ = sub.unsubscribe().await;
        Ok(answers)
    }

    /// Subscribes the reply inbox and starts its dispatcher, unless it runs.
    /// Awaited before the first request goes out: the SUB must reach the
    /// server before a PUB whose reply (or "no responders") goes to it.
    async fn ensure_inbox(&self) -> Result<()> {
        if self.inner.inbox_live.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.inner.dispatcher.lock().await;
        if slot.as_ref().is_some_and(|d| !d.is_finished()) {
            return Ok(());
        }
        let to = SubscribeTo {
            subject: format!("{}>", self.inner.inbox.prefix),
            queue_group: None,
        };
        let sub = self.subscribe(&to).await?.sub;
        self.inner.inbox_live.store(true, Ordering::Release);
        *slot = Some(tokio::spawn(dispatch_replies(
            Arc::downgrade(&self.inner),
            Arc::clone(&self.inner.inbox),
            sub,
            Arc::clone(&self.inner.inbox_live),
        )));
        Ok(())
    }

    /// What a test kit on real servers sees of this connection.
    pub(crate) fn tap(&self) -> &Arc<crate::transport::tap::Tap> {
        &self.inner.tap
    }

    /// Requests waiting for a reply right now.
    pub(crate) fn pending_requests(&self) -> usize {
        self.inner.inbox.len()
    }

    pub(crate) async fn request(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        deadline: Deadline,
        timeout: Duration,
    ) -> Result<Reply> {
        let start = Instant::now();
        self.wait_connected(subject, timeout).await?;
        self.ensure_inbox().await?;
        let (seq, pending) = self.inner.inbox.register();
        let reply = format!("{}{seq}.{}", self.inner.inbox.prefix, deadline::token(deadline));
        let left = timeout.saturating_sub(start.elapsed());
        // Without headers the message goes as a plain PUB, cheaper to write
        // and to parse.
        let client = self.client();
        let send = async {
            if headers.is_empty() {
                client.publish_with_reply(subject.clone(), reply, payload).await
            } else {
                client
                    .publish_with_reply_and_headers(subject.clone(), reply, headers, payload)
                    .await
            }
        };
        match tokio::time::timeout(left, send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.failed(&client, subject, e).await),
            Err(_) => return Err(not_connected(subject, timeout)),
        }
        let left = timeout.saturating_sub(start.elapsed());
        let mut pending = pending;
        let msg = match tokio::time::timeout(left, &mut pending.rx).await {
            Ok(Ok(msg)) => msg,
            Ok(Err(_)) => {
                return Err(Error::new(
                    ErrorKind::Transport,
                    format!("the NATS connection closed while waiting for a reply on {subject}"),
                ));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no reply on subject {subject} within {timeout:?}"),
                ));
            }
        };
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(Error::new(
                ErrorKind::NoHandler,
                format!("no handler for subject {subject}"),
            ));
        }
        Ok(Reply {
            headers: msg.headers,
            payload: msg.payload,
        })
    }

    pub(crate) async fn publish(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        self.wait_connected(subject, timeout).await?;
        let client = self.client();
        let send = async {
            if headers.is_empty() {
                client.publish(subject.clone(), payload).await
            } else {
                client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
            }
        };
        // A publish that gives up waiting for room in the client's queue was
        // not queued (the queue's send is cancel-safe): an error means "not
        // sent".
        match tokio::time::timeout(timeout.saturating_sub(start.elapsed()), send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(&client, subject, e).await),
            Err(_) => Err(not_connected(subject, timeout)),
        }
    }

    pub(crate) async fn subscribe(&self, to: &SubscribeTo) -> Result<NatsSubscription> {
        let client = self.client();
        let sub = match subscribe_on(&client, to).await {
            Ok(sub) => sub,
            // Subscribing only fails when the client's connection task is
            // gone: replace the client and try once more.
            Err(_) => {
                self.revive(&client).await?;
                subscribe_on(&self.client(), to)
                    .await
                    .map_err(|e| transport_error(format!("subscribe to {} failed", to.subject), e))?
            }
        };
        Ok(NatsSubscription {
            sub,
            subject: to.subject.clone(),
            transport: self.clone(),
            read: 0,
            rate: Rate::default(),
            drain: DrainState::Serving,
            ahead: None,
        })
    }

    pub(crate) async fn round_trip(&self, timeout: Duration) -> Result<()> {
        let subject = Subject::from("round trip");
        self.wait_connected(&subject, timeout).await?;
        self.ensure_inbox().await?;
        let (seq, pending) = self.inner.inbox.register();
        let probe = Subject::from(format!("{}{seq}", self.inner.inbox.prefix));
        let mut pending = pending;
        let run = async {
            self.client()
                .publish(probe.clone(), Bytes::new())
                .await
                .map_err(|e| publish_error(&probe, e))?;
            (&mut pending.rx)
                .await
                .map_err(|_| Error::new(ErrorKind::Transport, "the NATS connection closed"))?;
            Ok(())
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("no round trip to the NATS server within {timeout:?}"),
            ))
        })
    }

    pub(crate) async fn flush(&self, timeout: Duration) -> Result<()> {
        match tokio::time::timeout(timeout, self.client().flush()).await {
            Ok(r) => r.map_err(|e| transport_error("flush failed".into(), e)),
            Err(_) => Err(Error::new(ErrorKind::Timeout, "flush did not finish in time")),
        }
    }
}

pub(super) async fn subscribe_on(
    client: &async_nats::Client,
    to: &SubscribeTo,
) -> std::result::Result<async_nats::Subscriber, async_nats::SubscribeError> {
    match &to.queue_group {
        Some(group) => client.queue_subscribe(to.subject.clone(), group.clone()).await,
        None => client.subscribe(to.subject.clone()).await,
    }
}
