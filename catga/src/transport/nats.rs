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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::client::PublishErrorKind;
use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use super::{Delivery, Reply, ReplyTo, SubscribeTo};
use crate::error::{Error, ErrorKind, Result};
use crate::wire::deadline::{self, Deadline};

/// How to reach NATS.
#[derive(Debug, Clone)]
pub(crate) struct NatsConnect {
    /// One URL or several, comma separated.
    pub url: String,
    /// The connection name the server shows (`service/instance`).
    pub name: String,
    /// Credentials and TLS beyond the URL.
    pub security: crate::config::NatsSecurity,
}

/// Credentials written in a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let pair = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| hex(bytes[i + 1]).zip(hex(bytes[i + 2])))
            .flatten();
        match pair {
            Some((hi, lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the credentials off one URL: the URL without them, and them.
fn split_credentials(url: &str) -> (String, Option<UrlAuth>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let auth = match userinfo.split_once(':') {
        Some((user, pass)) => UrlAuth::UserPassword(percent_decode(user), percent_decode(pass)),
        None => UrlAuth::Token(percent_decode(userinfo)),
    };
    (format!("{scheme}{}", &rest[at + 1..]), Some(auth))
}

/// Reconnect back-off: 100 ms doubling up to 2 s, so that a restarted
/// broker is found again within about two seconds, and a broker that
/// refuses us is asked (and logged about) at most every two seconds.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.saturating_sub(1).min(5) as u32;
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(2))
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
    streams: Mutex<HashMap<String, (bool, Instant)>>,
    /// The stream that stored a subject's messages, as its acknowledgements
    /// named it: publishes to one stream chain on each other.
    stream_of: Mutex<HashMap<String, String>>,
    /// The settings dead-letter streams were made with, to make one again.
    dlq_settings: Mutex<Option<crate::config::StreamSettings>>,
    slow_consumer_events: Arc<AtomicU64>,
    server_errors: broadcast::Sender<String>,
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

/// The requests waiting for a reply, by sequence number. Replies arrive on
/// one wildcard subscription (`<inbox>.>`); an entry leaves the map on its
/// reply or when its sender stops waiting.
struct Inbox {
    /// `_INBOX.<nuid>.` (with the client's inbox prefix).
    prefix: String,
    pending: Mutex<HashMap<u64, oneshot::Sender<async_nats::Message>>>,
    next: AtomicU64,
}

impl Inbox {
    fn register(self: &Arc<Self>) -> (u64, Pending) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, tx);
        (
            seq,
            Pending {
                inbox: Arc::clone(self),
                seq,
                rx,
            },
        )
    }

    fn complete(&self, msg: async_nats::Message) {
        let seq = msg.subject[self.prefix.len().min(msg.subject.len())..]
            .split('.')
            .next()
            .and_then(|s| s.parse::<u64>().ok());
        let Some(seq) = seq else { return };
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq);
        if let Some(tx) = tx {
            let _ = tx.send(msg);
        }
    }

    /// How many requests wait for a reply (for the leak test).
    fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// One waiting request; leaving the map on drop is what keeps unanswered
/// requests from piling up.
struct Pending {
    inbox: Arc<Inbox>,
    seq: u64,
    rx: oneshot::Receiver<async_nats::Message>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.inbox
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.seq);
    }
}

fn transport_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Transport, format!("{what}: {e}")).with_source(e)
}

fn publish_error(subject: &str, e: async_nats::PublishError) -> Error {
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

/// Parses the comma-separated server list of `NATS_URL`, and the
/// credentials written in it.
///
/// async-nats 0.51 parses `user:password@` and `token@` in a URL but never
/// sends them (its CONNECT only uses the options' auth), so a URL that
/// works with other clients is refused. catga takes them out of the URLs
/// and sets them as options; all URLs must agree, since a connection has
/// one set of credentials.
fn server_addrs(url: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlAuth>)> {
    let mut auth: Option<UrlAuth> = None;
    let mut addrs = Vec::new();
    for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (bare, creds) = split_credentials(one);
        if let Some(c) = creds {
            match &auth {
                Some(seen) if *seen != c => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "the URLs in NATS_URL carry different credentials; a connection has one set: \
                         give them all the same, or only the first",
                    ));
                }
                _ => auth = Some(c),
            }
        }
        addrs.push(bare.parse::<async_nats::ServerAddr>().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("invalid NATS url {}: {e}", crate::config::redact_url(one)),
            )
        })?);
    }
    if addrs.is_empty() {
        return Err(Error::new(ErrorKind::Config, "NATS_URL names no server"));
    }
    Ok((addrs, auth))
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
                slow_consumer_events: slow,
                server_errors,
            }),
        })
    }

    /// Whether a stream stores `subject`, if looked up within `memory`.
    pub(super) fn stream_known(&self, subject: &str, memory: Duration) -> Option<bool> {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(subject)
            .filter(|(_, at)| at.elapsed() < memory)
            .map(|(exists, _)| *exists)
    }

    /// Remembers whether a stream stores `subject`.
    pub(super) fn remember_stream(&self, subject: &str, exists: bool) {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subject.to_owned(), (exists, Instant::now()));
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
                let js = async_nats::jetstream::new((*client).clone());
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

async fn subscribe_on(
    client: &async_nats::Client,
    to: &SubscribeTo,
) -> std::result::Result<async_nats::Subscriber, async_nats::SubscribeError> {
    match &to.queue_group {
        Some(group) => client.queue_subscribe(to.subject.clone(), group.clone()).await,
        None => client.subscribe(to.subject.clone()).await,
    }
}

/// Reads the inbox subscription and hands each reply to its request; if
/// the subscription ends while the client lives, subscribes it again.
async fn dispatch_replies(
    transport: std::sync::Weak<Inner>,
    inbox: Arc<Inbox>,
    first: async_nats::Subscriber,
    live: Arc<AtomicBool>,
) {
    let subject = format!("{}>", inbox.prefix);
    let mut sub = Some(first);
    loop {
        if let Some(mut s) = sub.take() {
            while let Some(msg) = s.next().await {
                inbox.complete(msg);
            }
            tracing::warn!("the reply inbox subscription ended; subscribing it again");
        }
        live.store(false, Ordering::Release);
        // Whatever waited for a reply on the old subscription fails now.
        inbox
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The transport is gone: nothing will be sent again.
        let Some(inner) = transport.upgrade() else { return };
        let t = NatsTransport { inner };
        let to = SubscribeTo {
            subject: subject.clone(),
            queue_group: None,
        };
        if let Ok(s) = t.subscribe(&to).await {
            live.store(true, Ordering::Release);
            sub = Some(s.sub);
        }
    }
}

/// Turns async-nats events into logs, a slow-consumer count, the last
/// reason the connection was refused, and a stream of server errors the
/// runtime checks (a refused subscription shows up only here).
#[derive(Clone)]
struct EventSink {
    slow: Arc<AtomicU64>,
    server_errors: broadcast::Sender<String>,
    refused: Arc<tokio::sync::watch::Sender<Option<Refusal>>>,
    failed_attempts: Arc<AtomicU64>,
    /// Where the servers listen, and whether TLS is asked for: to tell a
    /// failed TLS handshake from a server that is down (see
    /// [`EventSink::attempt_failed`]).
    servers: Arc<Vec<(String, u16)>>,
    tls: bool,
}

/// Why the broker refused a connection: no retry will help until the
/// configuration changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl EventSink {
    fn new(
        slow: Arc<AtomicU64>,
        server_errors: broadcast::Sender<String>,
        how: &NatsConnect,
    ) -> Result<EventSink> {
        let (addrs, _) = server_addrs(&how.url)?;
        let sec = &how.security;
        Ok(EventSink {
            slow,
            server_errors,
            refused: Arc::new(tokio::sync::watch::Sender::new(None)),
            failed_attempts: Arc::new(AtomicU64::new(0)),
            tls: sec.tls_ca.is_some()
                || sec.tls_cert.is_some()
                || sec.tls_first
                || addrs.iter().any(|a| a.tls_required()),
            servers: Arc::new(addrs.iter().map(|a| (a.host().to_owned(), a.port())).collect()),
        })
    }

    /// Whether any server accepts TCP connections.
    async fn any_server_listens(&self) -> bool {
        for (host, port) in self.servers.iter() {
            let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), connect).await {
                return true;
            }
        }
        false
    }

    /// One line per failed attempt: what failed and which setting to check.
    ///
    /// async-nats 0.51 reports only the kind of a failed attempt, and a
    /// failed TLS handshake as an "IO error", like a server that is down
    /// (the detail is in its own debug log). With TLS asked for, an IO error
    /// on a server that accepts TCP connections is taken for what it almost
    /// always is: the handshake was refused (untrusted or expired
    /// certificate, missing client certificate).
    async fn attempt_failed(&self, what: &str) {
        let attempt = self.failed_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let handshake = what == "IO error" && self.tls && self.any_server_listens().await;
        let what = if handshake { "TLS error" } else { what };
        let refusal = match what {
            "authorization violation" | "failed signing nonce" => Some(Refusal {
                kind: ErrorKind::Unauthorized,
                message: "the NATS server refused the credentials: check the user and password or \
                          token in NATS_URL, NATS_CREDS, or NATS_NKEY"
                    .to_owned(),
            }),
            "TLS error" => Some(Refusal {
                kind: ErrorKind::Config,
                message: "the TLS handshake with the NATS server failed: check NATS_TLS_CA (the CA of \
                          the server's certificate), that the certificate is valid for this host and \
                          not expired, NATS_TLS_CERT and NATS_TLS_KEY (mutual TLS), and NATS_TLS_FIRST"
                    .to_owned(),
            }),
            _ => None,
        };
        match &refusal {
            Some(r) => tracing::error!(attempt, "{}", r.message),
            None => tracing::warn!(attempt, error = %what, "cannot reach the NATS server; retrying"),
        }
        if refusal.is_some() {
            self.refused.send_replace(refusal);
        }
    }

    async fn on(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::SlowConsumer(sid) => {
                self.slow.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    sid,
                    "slow consumer: async-nats dropped messages of a full subscription"
                );
            }
            async_nats::Event::Connected => {
                self.failed_attempts.store(0, Ordering::Relaxed);
                self.refused.send_replace(None);
                tracing::info!("connected to NATS");
            }
            async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS, reconnecting"),
            // Reported again, with a hint, as the failed attempt it ends.
            async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {}
            async_nats::Event::ServerError(e) => {
                let text = e.to_string();
                tracing::error!(error = %text, "NATS server error");
                let _ = self.server_errors.send(text);
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(what)) => {
                self.attempt_failed(&what).await
            }
            async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
            other => tracing::info!(event = %other, "NATS event"),
        }
    }
}

/// Where a NATS request's answer goes.
pub(crate) struct NatsReply {
    transport: NatsTransport,
    to: Subject,
}

/// How long a reply may wait for room in the client's queue.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

impl NatsReply {
    pub(crate) async fn send(self, headers: Option<HeaderMap>, body: Bytes) -> Result<()> {
        // The common case first: the client's command queue has room, so
        // the reply is queued at once, with no timer and no clock read.
        let client = self.transport.client();
        let first = match &headers {
            None => client.publish(self.to.clone(), body.clone()).now_or_never(),
            Some(h) => client
                .publish_with_headers(self.to.clone(), h.clone(), body.clone())
                .now_or_never(),
        };
        let result = match first {
            Some(r) => r.map_err(|e| publish_error(&self.to, e)),
            // The slow paths are boxed: their futures are large, and an
            // unboxed one would make every message's future as large.
            None => {
                Box::pin(
                    self.transport
                        .publish(&self.to, headers.unwrap_or_default(), body, REPLY_TIMEOUT),
                )
                .await
            }
        };
        match result {
            Err(e) if e.kind() == ErrorKind::TooLarge => {
                // The sender would wait out its time-out for a reply that is
                // never sent, then retry a command that already ran: tell it
                // at once, in a reply small enough to go through.
                let (h, b) = crate::wire::errors::encode(&e, None);
                Box::pin(self.transport.publish(&self.to, h, b, REPLY_TIMEOUT)).await?;
                Err(e)
            }
            other => other,
        }
    }

    /// Sends without waiting: for a delivery dropped unanswered, whose
    /// `Drop` cannot await (nor rely on a runtime for a timer). The reply
    /// goes out if the client's command queue takes it at once, which it
    /// does unless the broker is away; then the sender times out, as it
    /// would anyway.
    pub(crate) fn send_now(self, headers: HeaderMap, body: Bytes) {
        let _ = self
            .transport
            .client()
            .publish_with_headers(self.to, headers, body)
            .now_or_never();
    }
}

/// Messages per second, over windows of about a second.
#[derive(Default)]
struct Rate {
    window_start: Option<Instant>,
    in_window: u64,
    per_second: f64,
}

impl Rate {
    /// Counts `n` more messages (called every 64, so that the clock is
    /// read once per 64 messages, not per message).
    fn tick(&mut self, n: u64) {
        let now = Instant::now();
        let start = *self.window_start.get_or_insert(now);
        self.in_window += n;
        let elapsed = now.duration_since(start);
        if elapsed >= Duration::from_secs(1) {
            self.per_second = self.in_window as f64 / elapsed.as_secs_f64();
            self.window_start = Some(now);
            self.in_window = 0;
        }
    }

    fn current(&self) -> f64 {
        let partial = self.window_start.map_or(0.0, |s| {
            let secs = s.elapsed().as_secs_f64();
            if secs > 0.05 {
                self.in_window as f64 / secs
            } else {
                0.0
            }
        });
        self.per_second.max(partial)
    }
}

#[derive(Clone, Copy)]
enum DrainState {
    Serving,
    /// A counted unsubscribe is on its way; if the count is not reached by
    /// the deadline (little traffic), unsubscribe plainly.
    HandingOver {
        until: tokio::time::Instant,
        /// Messages read when the hand-over began.
        read: u64,
    },
    /// Closed by count: the server confirmed nothing more comes.
    Confirmed,
    /// Closed plainly after a hand-over wait in which nothing arrived: an
    /// idle subject, with nothing on its way.
    Idle,
    /// Closed plainly: something routed here in the last round trip may be
    /// lost.
    Unconfirmed,
}

/// Fewest extra messages a counted unsubscribe allows.
const MIN_SLACK: u64 = 64;
/// How long the hand-over waits for its count before it unsubscribes
/// plainly.
const HANDOVER_WAIT: Duration = Duration::from_secs(1);

/// A NATS subscription.
pub(crate) struct NatsSubscription {
    sub: async_nats::Subscriber,
    subject: String,
    transport: NatsTransport,
    /// Messages taken from the subscription so far.
    read: u64,
    rate: Rate,
    drain: DrainState,
    /// A message read ahead while deciding whether the subject was idle.
    ahead: Option<Box<async_nats::Message>>,
}

impl NatsSubscription {
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            let msg = match (self.ahead.take(), self.drain) {
                (Some(m), _) => Some(*m),
                (None, DrainState::HandingOver { until, read }) => {
                    tokio::select! {
                        msg = self.sub.next() => msg,
                        () = tokio::time::sleep_until(until) => {
                            // Nothing arrived for the whole wait. Whatever
                            // the server routed here before now arrives
                            // ahead of a round trip: look once more before
                            // calling the subject idle.
                            if self.read == read {
                                let _ = self.transport.round_trip(HANDOVER_WAIT).await;
                                if let Some(Some(m)) = self.sub.next().now_or_never() {
                                    self.ahead = Some(Box::new(m));
                                    self.drain = DrainState::HandingOver {
                                        until: tokio::time::Instant::now() + HANDOVER_WAIT,
                                        read: u64::MAX,
                                    };
                                    continue;
                                }
                            }
                            self.unsubscribe_plainly().await;
                            continue;
                        }
                    }
                }
                (None, _) => self.sub.next().await,
            };
            let Some(msg) = msg else {
                if let DrainState::HandingOver { .. } = self.drain {
                    self.drain = DrainState::Confirmed;
                }
                return None;
            };
            self.read += 1;
            if self.read.is_multiple_of(64) {
                self.rate.tick(64);
            }
            let deadline = msg
                .reply
                .as_ref()
                .and_then(|r| deadline::of_request(Some(r.as_str()), msg.headers.as_ref()));
            let reply = match msg.reply {
                Some(to) => ReplyTo::Nats(NatsReply {
                    transport: self.transport.clone(),
                    to,
                }),
                None => ReplyTo::None,
            };
            return Some(Delivery::new(
                msg.subject,
                msg.headers,
                msg.payload,
                deadline,
                reply,
            ));
        }
    }

    /// Stops new deliveries without losing what the server already routed
    /// here.
    ///
    /// async-nats 0.51's `Subscriber::drain` sends UNSUB and PING and then
    /// forgets the subscription on its next poll, before the PONG: whatever
    /// the server routed here before it read the UNSUB is dropped (seen
    /// from outside: 1 to 8 lost requests in 9 of 37 SIGTERMs under load).
    /// Its counted unsubscribe (`UNSUB <sid> <max>`) is kept in step on both
    /// sides instead: the server stops after `max` messages in all, and the
    /// client keeps the subscription until it has received exactly that
    /// many. So `max` is set a little above what was read, enough for what
    /// may be on its way (at least [`MIN_SLACK`], or 20 ms of the current
    /// rate): the server stops after those, and every one of them is
    /// delivered. With too little traffic to reach the count within
    /// [`HANDOVER_WAIT`], a plain unsubscribe ends it, and the hand-over is
    /// reported unconfirmed.
    pub(crate) async fn drain(&mut self) {
        if !matches!(self.drain, DrainState::Serving) {
            return;
        }
        if !self.transport.is_connected() {
            // The server already forgot the subscription (or will when it
            // sees the connection gone), and nothing more can arrive: end
            // the stream here, after what is buffered (waiting for the
            // connection task to end it could take until the deadline).
            self.drain = DrainState::Unconfirmed;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.sub.unsubscribe()).await;
            return;
        }
        let slack = MIN_SLACK.max((self.rate.current() * 0.02).ceil() as u64);
        let max = self.read + slack;
        match tokio::time::timeout(Duration::from_secs(1), self.sub.unsubscribe_after(max)).await {
            Ok(Ok(())) => {
                self.drain = DrainState::HandingOver {
                    until: tokio::time::Instant::now() + HANDOVER_WAIT,
                    read: self.read,
                };
            }
            _ => self.unsubscribe_plainly().await,
        }
    }

    async fn unsubscribe_plainly(&mut self) {
        self.drain = match self.drain {
            // Nothing arrived for a whole hand-over wait: idle, not lost.
            DrainState::HandingOver { read, .. } if read == self.read => DrainState::Idle,
            DrainState::HandingOver { .. } => {
                tracing::info!(
                    subject = %self.subject,
                    "too little traffic to confirm the hand-over; unsubscribing without confirmation"
                );
                DrainState::Unconfirmed
            }
            _ => DrainState::Unconfirmed,
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sub.drain()).await;
    }

    pub(crate) fn handover_confirmed(&self) -> bool {
        matches!(self.drain, DrainState::Confirmed | DrainState::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_is_bounded() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(100));
        assert_eq!(reconnect_delay(2), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }

    #[test]
    fn every_comma_separated_url_is_a_server() {
        let (addrs, auth) = server_addrs("nats://127.0.0.1:1, nats://127.0.0.1:2").expect("two urls");
        assert_eq!(addrs.len(), 2);
        assert_eq!(auth, None);
        let err = server_addrs("nats://a:s3cret@127.0.0.1:x").expect_err("bad port");
        assert!(!err.message().contains("s3cret"), "{err}");
        assert!(server_addrs(" , ").is_err());
    }

    #[test]
    fn credentials_come_out_of_the_urls() {
        let (addrs, auth) =
            server_addrs("nats://svc:p%40ss@127.0.0.1:1,tls://svc:p%40ss@127.0.0.1:2").expect("urls");
        assert_eq!(auth, Some(UrlAuth::UserPassword("svc".into(), "p@ss".into())));
        assert!(
            addrs.iter().all(|a| !format!("{a:?}").contains("svc")),
            "{addrs:?}"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%é%41"), "%éA");
        let (_, auth) = server_addrs("nats://s3cr3t-token@127.0.0.1:1").expect("token");
        assert_eq!(auth, Some(UrlAuth::Token("s3cr3t-token".into())));
        let err = server_addrs("nats://a:b@127.0.0.1:1,nats://c:d@127.0.0.1:2").expect_err("two sets");
        assert!(
            !err.message().contains(":b") && !err.message().contains(":d"),
            "{err}"
        );
    }
}
