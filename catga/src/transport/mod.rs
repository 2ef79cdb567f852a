//! Transports: core NATS, or the embedded in-memory bus with the same
//! semantics (one queue-group member per message, fan-out otherwise,
//! request/reply with fast "no responders", the same payload limit).
//!
//! The runtime sees three things: a [`Transport`] to send and subscribe, a
//! [`Subscription`] that yields [`Delivery`]s, and [`Delivery::settle`],
//! with which a message answers itself. It never asks which transport it
//! runs on.

pub(crate) mod chaos;
pub(crate) mod jetstream;
pub(crate) mod memory;
pub(crate) mod memory_streams;
pub(crate) mod nats;
pub(crate) mod tap;

use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::wire::deadline::Deadline;

/// The payload limit of the embedded bus and the default of nats-server.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// A message sent to a stream, resolving once the stream stored it: true
/// if the stream had it already (a repeated message id).
pub(crate) type Stored = std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send>>;

/// Room kept in the payload limit for the headers catga adds on the way
/// to a stream: a message id of up to
/// [`MAX_ID_LEN`](crate::wire::MAX_ID_LEN) characters, and room for as
/// much again (what catga's releases before this one added: an expected
/// last message id).
pub(crate) const ROUTING_HEADROOM: usize = 2 * (crate::wire::MAX_ID_LEN + 32);

/// The largest header block JetStream stores with a message.
pub(crate) const MAX_HEADERS: usize = 65_535;

/// One message to store in its subject's stream, in a sequence that must
/// keep its order (see [`Transport::store_in_order`]).
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub subject: String,
    /// Its message id: what the stream drops a repeated publish by.
    pub id: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// How [`Transport::store_in_order`] keeps each stream's messages in
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order<'a> {
    /// One of possibly several writers of a stream (the relays of other
    /// store shards, a durable publish of the same event): each stream's
    /// messages as atomic batches where the stream
    /// takes them, else a message at a time; the streams in `stepwise`
    /// (some of whose messages may be stored already, as after a failure)
    /// a message at a time.
    Batched {
        /// Streams (chains) sent a message at a time.
        stepwise: &'a std::collections::HashSet<String>,
    },
    /// A message at a time, each once the one before it was stored: for messages some of which may be stored
    /// already (a relay's first round after it took a shard over, or
    /// after a failure), which would make JetStream refuse a batch of
    /// them whole, after plain subscribers got each.
    Stepwise,
}

/// How a durable consumer is bound.
#[derive(Debug, Clone)]
pub(crate) struct DurableOptions {
    /// How long the broker waits for an ack before it redelivers.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, over all subscribers.
    pub max_ack_pending: usize,
    /// Messages pulled at a time.
    pub batch: usize,
    /// The key the stream to bind in is named after (see
    /// [`stream_name`]), when it stores more than the consumer's subject
    /// (a keyed saga's partitions share streams on NATS).
    pub stream: Option<String>,
    /// How long one pull request waits on the broker (NATS).
    pub pull_expires: Duration,
    /// The subscriber relies on stream order over a window of deliveries
    /// (a keyed saga's router): a pull request lost on the broker ends the
    /// subscription instead of being replaced at once, so that the caller
    /// lets what the lost request took come back before it pulls again
    /// (see `keyed::route`).
    pub in_order: bool,
    /// Where the consumer starts if this binding creates it.
    pub start: Start,
    /// The router layout recorded on the consumer (in its description on
    /// NATS): how many router shares a keyed saga's share 0 routes beside
    /// (see `keyed::router_shares`); read back with
    /// [`Transport::durable_found`].
    pub routers: Option<u32>,
}

/// A durable consumer as the broker has it (see
/// [`Transport::durable_found`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurableFound {
    /// Every message up to this stream sequence is acknowledged.
    pub ack_floor: u64,
    /// The router layout recorded on it ([`DurableOptions::routers`]),
    /// if any.
    pub routers: Option<u32>,
    /// Whether it ever delivered a message.
    pub delivered: bool,
}

/// Where a durable consumer created by a binding starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At the stream's first message (a new JetStream durable's default).
    First,
    /// At the stream's last message (a job's: re-created, it must not run
    /// every occurrence the stream keeps).
    Last,
    /// Nowhere: only a consumer that exists is bound, none is created (a
    /// keyed saga's router share, whose consumer share 0 creates at its
    /// own acknowledgement floor with [`Transport::create_durable_at`]).
    Existing,
}

/// What became of a conditional publish
/// ([`Transport::publish_after_seq`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Stored now.
    Stored,
    /// A message with its id was stored before (within the duplicate
    /// window): dropped.
    Repeated,
    /// Another message came after the expected one: not stored.
    Behind,
}

/// What a durable consumer has out: deliveries not acknowledged yet, and
/// pull requests waiting on the broker (which may still take messages,
/// also for a subscriber that is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outstanding {
    pub ack_pending: u64,
    /// Messages not delivered yet.
    pub pending: u64,
    pub waiting: u64,
    /// The stream sequence up to which every message is acknowledged.
    pub ack_floor: u64,
}

/// The JetStream stream that keeps `subject`: `CATGA_` plus the subject
/// with its dots as underscores, plus a short hash of the exact subject
/// (so that `a.b_c` and `a_b.c` get different streams). An operator who
/// makes a stream before catga does gives it this name.
pub fn stream_name(subject: &str) -> String {
    let readable = subject_token(subject);
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in subject.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("CATGA_{readable}_{h:08x}")
}

/// The streams of a keyed saga's partitions `<base>.0` to
/// `<base>.<partitions - 1>` spread over `streams` streams (at most one
/// per partition): per stream, the key its name is made from (see
/// [`stream_name`]) and the subjects it stores. Partition `p` is in
/// stream `p % streams`. One stream stores `<base>.*` under the key
/// `<base>.*`, as before streams could be several, so that a service that
/// keeps the default finds its stream as it left it.
pub(crate) fn partition_streams(base: &str, partitions: u32, streams: u32) -> Vec<(String, Vec<String>)> {
    let n = partition_stream_count(partitions, streams);
    if n == 1 {
        let all = format!("{base}.*");
        return vec![(all.clone(), vec![all])];
    }
    (0..n)
        .map(|g| {
            let subjects = (g..partitions)
                .step_by(n as usize)
                .map(|p| format!("{base}.{p}"))
                .collect();
            (partition_stream_key(base, g, n), subjects)
        })
        .collect()
}

/// How many streams a keyed saga's `partitions` spread over when the
/// setting asks for `streams`: at most one per partition, at least one.
pub(crate) fn partition_stream_count(partitions: u32, streams: u32) -> u32 {
    streams.clamp(1, partitions.max(1))
}

/// The key of the stream that stores partition `p` of a keyed saga (see
/// [`partition_streams`]).
pub(crate) fn partition_stream_of(base: &str, p: u32, partitions: u32, streams: u32) -> String {
    let n = partition_stream_count(partitions, streams);
    if n == 1 {
        format!("{base}.*")
    } else {
        partition_stream_key(base, p % n, n)
    }
}

fn partition_stream_key(base: &str, group: u32, of: u32) -> String {
    format!("{base}.*.{group}of{of}")
}

pub(crate) use crate::wire::subject_token;

/// A message a handler gave up on, kept for an operator to look at,
/// replay or purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its place in the dead-letter store.
    pub seq: u64,
    /// The subject it came on.
    pub subject: String,
    /// The service whose handler gave up.
    pub service: String,
    /// The handler that gave up.
    pub handler: String,
    /// The error kind of its last attempt.
    pub error_kind: ErrorKind,
    /// The error text of its last attempt (the full text: dead letters are
    /// for operators).
    pub error: String,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// Its message id, if it had one.
    pub message_id: Option<String>,
    /// Its other headers, as received.
    pub headers: Vec<(String, String)>,
    /// Its payload, as received, or its start if it was cut to fit (see
    /// [`truncated`](Self::truncated)).
    pub payload: Bytes,
    /// The letter's own id (`Catga-Dlq-Id`), under which the replica that
    /// wrote it recorded its digest in the store.
    pub letter_id: Option<String>,
    /// Whether the store holds the record of this letter as catga wrote it
    /// (`None`: not checked, the letters were read without the store). A
    /// letter anyone else published on the dead-letter subjects, or one
    /// changed since, is `Some(false)`, and is not replayed unless forced.
    pub authentic: Option<bool>,
    /// Set when the letter did not fit in the broker's limit: the size of
    /// the original payload, of which `payload` is the start (its headers
    /// and the error text may be cut too). The original stays in its
    /// stream while the stream keeps it.
    pub truncated: Option<u64>,
}

impl DeadLetter {
    /// The subjects of `service`'s dead letters (one stream per service).
    pub(crate) fn subjects_of(service: &str) -> String {
        format!("catga.dead.{}.>", subject_token(service))
    }

    /// A digest of everything a replay would send or an operator would act
    /// on: subject, service, handler, error, message id, headers, payload.
    /// Over a canonical form, the same for the letter as written and as
    /// read back from its stream: texts as header values (control
    /// characters as spaces, trimmed), headers sorted (a header map's
    /// order is not kept), one value per name.
    pub(crate) fn digest(&self) -> String {
        let norm = |t: &str| crate::wire::header_value(t).trim().to_owned();
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            norm(&self.subject),
            norm(&self.service),
            norm(&self.handler),
            self.error_kind.as_str().to_owned(),
            norm(&self.error),
            norm(self.message_id.as_deref().unwrap_or("")),
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        // One value per name, the last: a header read back from a stream
        // keeps only that one.
        let mut last = std::collections::BTreeMap::new();
        for (k, v) in &self.headers {
            last.insert(norm(k), norm(v));
        }
        let headers: Vec<(String, String)> = last.into_iter().collect();
        for (k, v) in &headers {
            h.update(k.as_bytes());
            h.update(b":");
            h.update(v.as_bytes());
            h.update(&[0]);
        }
        h.update(&self.payload);
        crate::wire::hex(h.finish().as_ref())
    }

    /// The subject and headers it is stored under: the original headers
    /// plus `Catga-Dlq-*` ones; its `Nats-Msg-Id` is the original id plus
    /// the handler, so that dead-lettering it again (a crash between
    /// storing it and settling the original) keeps one copy.
    pub(crate) fn to_stored(&self) -> (String, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in &self.headers {
            h.append(k.as_str(), v.as_str());
        }
        let header = |s: &str| crate::wire::header_value(s);
        h.insert(crate::wire::headers::DLQ_SUBJECT, header(&self.subject));
        h.insert(crate::wire::headers::DLQ_SERVICE, header(&self.service));
        h.insert(crate::wire::headers::DLQ_HANDLER, header(&self.handler));
        h.insert(crate::wire::headers::DLQ_ERROR_KIND, self.error_kind.as_str());
        h.insert(crate::wire::headers::DLQ_ERROR, header(&self.error));
        h.insert(crate::wire::headers::DLQ_DELIVERIES, self.deliveries.to_string());
        if let Some(size) = self.truncated {
            h.insert(crate::wire::headers::DLQ_TRUNCATED, size.to_string());
        }
        if let Some(id) = &self.letter_id {
            h.insert(crate::wire::headers::DLQ_ID, header(id));
        }
        if let Some(id) = &self.message_id {
            h.insert(crate::wire::headers::DLQ_MESSAGE_ID, header(id));
            h.insert(
                crate::wire::headers::MESSAGE_ID,
                header(&crate::wire::bounded_id(format!("dlq.{id}.{}", self.handler))),
            );
        }
        (
            format!("catga.dead.{}.{}", subject_token(&self.service), self.subject),
            h,
        )
    }

    pub(crate) fn from_stored(seq: u64, headers: HeaderMap, payload: Bytes) -> DeadLetter {
        use crate::wire::headers as H;
        let get = |n: async_nats::HeaderName| headers.get(n).map(|v| v.as_str().to_owned());
        let ours = [
            H::DLQ_SUBJECT,
            H::DLQ_SERVICE,
            H::DLQ_HANDLER,
            H::DLQ_ERROR_KIND,
            H::DLQ_ERROR,
            H::DLQ_DELIVERIES,
            H::DLQ_MESSAGE_ID,
            H::DLQ_TRUNCATED,
            H::DLQ_ID,
            H::MESSAGE_ID,
        ];
        let rest = headers
            .iter()
            .filter(|(k, _)| {
                !ours
                    .iter()
                    .any(|o| AsRef::<str>::as_ref(o) == AsRef::<str>::as_ref(*k))
            })
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
            .collect();
        DeadLetter {
            seq,
            subject: get(H::DLQ_SUBJECT).unwrap_or_default(),
            service: get(H::DLQ_SERVICE).unwrap_or_default(),
            handler: get(H::DLQ_HANDLER).unwrap_or_default(),
            error_kind: ErrorKind::from_wire(get(H::DLQ_ERROR_KIND).as_deref(), None),
            error: get(H::DLQ_ERROR).unwrap_or_default(),
            deliveries: get(H::DLQ_DELIVERIES).and_then(|d| d.parse().ok()).unwrap_or(0),
            message_id: get(H::DLQ_MESSAGE_ID),
            headers: rest,
            payload,
            truncated: get(H::DLQ_TRUNCATED).and_then(|d| d.parse().ok()),
            letter_id: get(H::DLQ_ID),
            authentic: None,
        }
    }

    /// The letter cut to fit in `max` bytes (payload plus headers, with
    /// room for the ids catga adds) and in JetStream's header limit: the
    /// error text to 1,000 characters and the message id to an id's
    /// length, the original headers dropped if they alone take more than
    /// a quarter of the limit, and the payload to what is left. A letter
    /// that fits is returned as it is; one that was cut says so
    /// ([`truncated`](Self::truncated)). An undecodable message a few bytes
    /// under the broker's limit plus the `Catga-Dlq-*` headers was over
    /// it: its letter was refused, and once its deliveries ran out it ended
    /// neither handled nor dead-lettered.
    pub(crate) fn fit(&self, max: usize) -> DeadLetter {
        let sizes = |l: &DeadLetter| {
            let (_, h) = l.to_stored();
            let headers = memory::wire_size(Some(&h), 0) + ROUTING_HEADROOM;
            (headers, headers + l.payload.len())
        };
        let (headers, total) = sizes(self);
        if total <= max && headers <= MAX_HEADERS {
            return self.clone();
        }
        let mut cut = self.clone();
        cut.truncated = Some(self.payload.len() as u64);
        if cut.error.chars().count() > 1000 {
            cut.error = cut.error.chars().take(1000).collect::<String>() + "...";
        }
        cut.message_id = cut
            .message_id
            .map(|id| crate::wire::bounded_id(crate::wire::header_value(&id)));
        cut.payload = Bytes::new();
        let (headers, _) = sizes(&cut);
        if headers > (max / 4).min(MAX_HEADERS) {
            cut.headers.clear();
        }
        let (_, empty) = sizes(&cut);
        let room = max.saturating_sub(empty);
        cut.payload = self.payload.slice(..room.min(self.payload.len()));
        cut
    }

    /// The headers to send it again with: the original ones but the
    /// broker's (`Nats-*`), and a new message id (the original one would
    /// be dropped as a duplicate by JetStream, and never succeeded
    /// anyway). A forged `Nats-Expected-Last-Msg-Id` on a letter replayed
    /// into a replicated stream would stop the stream on every replica
    /// (see `Transport::store_in_order`); other expectations would have
    /// it refused for good.
    pub(crate) fn replay_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in &self.headers {
            if !crate::wire::is_broker_header(k) {
                h.append(k.as_str(), v.as_str());
            }
        }
        // Bounded: an id at its length limit plus the suffix would be
        // refused on arrival.
        let id = match &self.message_id {
            Some(id) => crate::wire::bounded_id(format!("{id}.replay{}", self.seq)),
            None => crate::wire::new_message_id(),
        };
        h.insert(crate::wire::headers::MESSAGE_ID, crate::wire::header_value(&id));
        h
    }
}

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
            Kind::Nats(t) => {
                let slot = t
                    .tap()
                    .record_sent(subject, tap::SentAs::Request, Some(&headers), &payload);
                let reply = t.request(subject, headers, payload, deadline, timeout).await;
                // Refused before it left (over the broker's limit, or no
                // connection): not sent, so not recorded. A time-out or
                // no handler is a request that went out.
                if let Err(e) = &reply
                    && matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::Transport)
                {
                    t.tap().unrecord(slot);
                }
                reply
            }
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
            Kind::Nats(t) => {
                let slot = t
                    .tap()
                    .record_sent(subject, tap::SentAs::Publish, Some(&headers), &payload);
                let sent = t.publish(subject, headers, payload, timeout).await;
                if sent.is_err() {
                    t.tap().unrecord(slot);
                }
                sent
            }
            Kind::Memory(t) => {
                t.pass().await;
                t.publish(subject, headers, payload)
            }
        }
    }

    /// Every answer to an empty request on `subject` within `window` (NATS
    /// micro discovery); none on the embedded bus.
    pub(crate) async fn gather(&self, subject: &str, window: Duration) -> Result<Vec<Bytes>> {
        match &self.0 {
            Kind::Nats(t) => t.gather(subject, window).await,
            Kind::Memory(_) => Ok(Vec::new()),
        }
    }

    /// What the test kit sees of this transport (see [`tap`]).
    pub(crate) fn tap(&self) -> &std::sync::Arc<tap::Tap> {
        match &self.0 {
            Kind::Nats(t) => t.tap(),
            Kind::Memory(bus) => bus.tap(),
        }
    }

    /// Whether this is a NATS transport (not the embedded bus).
    pub(crate) fn is_nats(&self) -> bool {
        matches!(self.0, Kind::Nats(_))
    }

    /// The clock of the times kept for later (see [`crate::clock`]): the
    /// system's, or an embedded bus's, which a test kit may move.
    pub(crate) fn clock(&self) -> &crate::clock::Clock {
        match &self.0 {
            Kind::Nats(_) => crate::clock::Clock::system(),
            Kind::Memory(bus) => bus.clock(),
        }
    }

    pub(crate) async fn subscribe(&self, to: &SubscribeTo) -> Result<Subscription> {
        match &self.0 {
            Kind::Nats(t) => t.subscribe(to).await.map(|s| Subscription(Sub::Nats(s))),
            Kind::Memory(t) => t.subscribe(to).map(|s| Subscription(Sub::Memory(s))),
        }
    }

    /// Creates the stream that keeps `subject` (and the dead-letter stream),
    /// or brings its settings in line.
    pub(crate) async fn ensure_stream(
        &self,
        subject: &str,
        settings: &crate::config::StreamSettings,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.ensure_stream(subject, settings).await,
            Kind::Memory(bus) => {
                bus.streams().ensure(subject, settings);
                Ok(())
            }
        }
    }

    /// Creates the stream of a recurring job's subject (no age limit, a
    /// bounded count on NATS), or brings its settings in line.
    pub(crate) async fn ensure_job_stream(
        &self,
        subject: &str,
        settings: &crate::config::StreamSettings,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.ensure_job_stream(subject, settings).await,
            Kind::Memory(bus) => {
                let kept = crate::config::StreamSettings {
                    max_age: Duration::MAX,
                    ..settings.clone()
                };
                bus.streams().ensure(subject, &kept);
                Ok(())
            }
        }
    }

    /// Creates the streams of a keyed saga's partitions `<base>.0` to
    /// `<base>.<partitions - 1>`: `settings.saga_streams` streams on NATS
    /// (see [`partition_streams`]), one per partition on the embedded bus
    /// (its streams store one subject each).
    pub(crate) async fn ensure_partition_streams(
        &self,
        base: &str,
        partitions: u32,
        settings: &crate::config::StreamSettings,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.ensure_partition_stream(base, partitions, settings).await,
            Kind::Memory(bus) => {
                for p in 0..partitions {
                    bus.streams().ensure(&format!("{base}.{p}"), settings);
                }
                Ok(())
            }
        }
    }

    /// Binds a durable consumer and pulls from it.
    pub(crate) async fn durable_subscribe(
        &self,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
    ) -> Result<Subscription> {
        match &self.0 {
            Kind::Nats(t) => t
                .durable_subscribe(subject, durable, options)
                .await
                .map(|s| Subscription(Sub::Js(Box::new(s)))),
            Kind::Memory(bus) => bus
                .streams()
                .bind(subject, durable, options)
                .map(|s| Subscription(Sub::MemoryDurable(s.gated(bus.gate().cloned())))),
        }
    }

    /// Publishes to the stream of `subject` and waits until it is stored.
    pub(crate) async fn publish_durable(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.publish_durable(subject, headers, payload, timeout).await,
            Kind::Memory(bus) => {
                bus.pass().await;
                bus.publish_durable(subject, headers, payload)
            }
        }
    }

    /// Sends to the stream of `subject` without waiting: what is sent one
    /// after another is stored in that order; the returned future resolves
    /// once the stream acknowledged the message.
    pub(crate) async fn publish_durable_start(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Stored> {
        match &self.0 {
            Kind::Nats(t) => t.publish_durable_start(subject, headers, payload, timeout).await,
            Kind::Memory(bus) => {
                bus.pass().await;
                // The embedded bus keeps order by construction: whether it
                // was a repeat does not matter there.
                let stored = bus
                    .publish_durable_internal(subject, headers, payload)
                    .map(|()| false);
                Ok(Box::pin(async move { stored }))
            }
        }
    }

    /// Makes sure a stream stores `subject`, creating the subject's stream
    /// (with `settings`) when none does. Only the answer "a stream stores
    /// it" is remembered, for good: a lookup that finds nothing (a node
    /// restarting, a stream electing its leader) leads to a creation,
    /// which fails while the stream exists, and never to a publish that
    /// skips the stream.
    pub(crate) async fn ensure_stored(
        &self,
        subject: &str,
        settings: &crate::config::StreamSettings,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.ensure_stored(subject, settings).await,
            Kind::Memory(bus) => {
                bus.streams().ensure(subject, settings);
                Ok(())
            }
        }
    }

    /// The chain `subject`'s messages belong to in
    /// [`store_in_order`](Self::store_in_order): the stream that stores it,
    /// once known, or the subject itself.
    pub(crate) fn chain_of(&self, subject: &str) -> String {
        match &self.0 {
            Kind::Nats(t) => t.stream_of(subject).unwrap_or_else(|| subject.to_owned()),
            Kind::Memory(_) => subject.to_owned(),
        }
    }

    /// Forgets that a stream stores `subject` (a publish found none: it
    /// was deleted), so that [`ensure_stored`](Self::ensure_stored) looks
    /// again.
    pub(crate) fn forget_stored(&self, subject: &str) {
        if let Kind::Nats(t) = &self.0 {
            t.forget_stored(subject);
        }
    }

    /// Stores `messages` in their streams, in order, and tells for each
    /// whether it was stored (a repeated id counts as stored: the stream
    /// had it).
    ///
    /// A stream may have other writers (the relays of other store shards,
    /// a durable publish of the same event), so no message may expect
    /// another's place in it: [`Order::Batched`] sends each stream's
    /// messages as atomic batches, each stored whole or not at all, where
    /// the stream takes them; [`Order::Stepwise`] (and a stream that takes
    /// no batches) sends each message only once the one before it was
    /// stored: one round trip per message and stream. Either way no other
    /// writer's message can cut a chain short, and a message not stored
    /// leaves the rest of its chain (its stream) unsent.
    ///
    /// The relay of a single shard sent its messages pipelined, each
    /// expecting the one before it (`Nats-Expected-Last-Msg-Id`), until a
    /// broken chain was found to stop a replicated stream for good:
    /// nats-server (2.15.1 here) checks that expectation only as each
    /// replica applies the message, not before its leader proposes it,
    /// and takes a mismatch there for a critical write error that stops
    /// the stream on every replica until they restart (a CI run of
    /// `cluster::events_saved_with_state_reach_their_stream_in_order_while_nodes_die`
    /// left 8,031 events in the outbox, "no stream stores subject" for
    /// 60 s). An expected sequence, which the leader checks, cannot
    /// replace it: another writer's message in the place of one the chain
    /// was refused lets the next one through, out of order (seen in
    /// `cluster::another_writer_cutting_into_a_chain_leaves_the_replicated_streams_working`).
    ///
    /// `go_on` is asked before each message is sent (the relay still holds
    /// its lease): once it says no, the rest is not sent.
    pub(crate) async fn store_in_order(
        &self,
        messages: &[Outgoing],
        timeout: Duration,
        go_on: &(dyn Fn() -> bool + Sync),
        order: Order<'_>,
    ) -> Vec<Result<()>> {
        match &self.0 {
            Kind::Nats(t) => t.store_in_order(messages, timeout, go_on, order).await,
            Kind::Memory(bus) => messages
                .iter()
                .map(|m| {
                    if !go_on() {
                        return Err(not_sent());
                    }
                    let mut headers = m.headers.clone();
                    headers.insert(crate::wire::headers::MESSAGE_ID, m.id.as_str());
                    bus.publish_durable(&m.subject, headers, m.payload.clone())
                })
                .collect(),
        }
    }

    /// Asks that the streams this transport makes take atomic batches
    /// (`allow_atomic`, where JetStream has them): the outbox relays send
    /// each stream's events that way (see [`Order::Batched`]). Nothing on
    /// the embedded bus.
    pub(crate) fn want_batches(&self, wanted: bool) {
        if let Kind::Nats(t) = &self.0 {
            t.want_batches(wanted);
        }
    }

    /// The version the broker reported, once connected (none in memory).
    pub(crate) fn server_version(&self) -> Option<String> {
        match &self.0 {
            Kind::Nats(t) => t.server_version(),
            Kind::Memory(_) => None,
        }
    }

    /// The largest message (payload plus headers) the broker takes.
    pub(crate) fn max_payload(&self) -> usize {
        match &self.0 {
            Kind::Nats(t) => t.max_payload(),
            Kind::Memory(bus) => bus.max_payload(),
        }
    }

    /// The sequence of the first message on `subject` at or after `seq`
    /// in the stream that keeps it (`None`: none); the embedded streams are
    /// not asked (their deliveries carry no sequence).
    pub(crate) async fn next_on(&self, subject: &str, seq: u64) -> Result<Option<u64>> {
        match &self.0 {
            Kind::Nats(t) => t.next_on(subject, seq).await,
            Kind::Memory(_) => Ok(None),
        }
    }

    /// The last message on `subject` in the stream that keeps it: its
    /// sequence and message id (`None`: none).
    pub(crate) async fn last_on(&self, subject: &str) -> Result<Option<(u64, String)>> {
        match &self.0 {
            Kind::Nats(t) => t.last_on(subject).await,
            Kind::Memory(bus) => Ok(bus.streams().last(subject)),
        }
    }

    /// Stores a message on `subject` only if the last message on that
    /// subject is still the one with sequence `after` (0: none), and not
    /// when its id was stored before: of several replicas publishing the
    /// same next message, one stores it.
    pub(crate) async fn publish_after_seq(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        after: u64,
        timeout: Duration,
    ) -> Result<Appended> {
        match &self.0 {
            Kind::Nats(t) => {
                t.publish_after_seq(subject, headers, payload, after, timeout)
                    .await
            }
            Kind::Memory(bus) => {
                bus.pass().await;
                bus.publish_after(subject, headers, payload, after)
            }
        }
    }

    /// Creates the durable consumer `durable` on `subject` starting at
    /// stream sequence `seq`, unless it exists (then it is left as it is);
    /// whether it was created now.
    pub(crate) async fn create_durable_at(
        &self,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
        seq: u64,
    ) -> Result<bool> {
        match &self.0 {
            Kind::Nats(t) => t.create_durable_at(subject, durable, options, seq).await,
            Kind::Memory(bus) => bus.streams().create_at(subject, durable, options, seq),
        }
    }

    /// The durable consumer `durable` of `subject`, if it exists.
    pub(crate) async fn durable_found(&self, subject: &str, durable: &str) -> Result<Option<DurableFound>> {
        match &self.0 {
            Kind::Nats(t) => t.durable_found(subject, durable).await,
            Kind::Memory(bus) => Ok(bus.streams().found(subject, durable)),
        }
    }

    /// Deletes the durable consumer `durable` of `subject` if it exists.
    pub(crate) async fn delete_durable(&self, subject: &str, durable: &str) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.delete_durable(subject, durable).await,
            Kind::Memory(bus) => {
                bus.streams().delete(subject, durable);
                Ok(())
            }
        }
    }

    /// What the durable consumer `durable` of `subject` has out: messages
    /// given and not acknowledged, and pull requests waiting.
    pub(crate) async fn durable_outstanding(&self, subject: &str, durable: &str) -> Result<Outstanding> {
        match &self.0 {
            Kind::Nats(t) => t.durable_outstanding(subject, durable).await,
            Kind::Memory(bus) => {
                let (ack_pending, pending, ack_floor) = bus.streams().outstanding(subject, durable);
                Ok(Outstanding {
                    ack_pending,
                    pending,
                    waiting: 0,
                    ack_floor,
                })
            }
        }
    }

    /// Creates `service`'s dead-letter stream, or brings its settings in
    /// line (kept 30 days, or as long as events if that is longer).
    pub(crate) async fn ensure_dead_letters(
        &self,
        service: &str,
        settings: &crate::config::StreamSettings,
    ) -> Result<()> {
        match &self.0 {
            Kind::Nats(t) => t.ensure_dead_letters(service, settings).await,
            Kind::Memory(_) => Ok(()),
        }
    }

    /// `service`'s dead letters from `from`, oldest first, at most `limit`.
    pub(crate) async fn dead_letters(
        &self,
        service: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        match &self.0 {
            Kind::Nats(t) => t.dead_letters(service, from, limit).await,
            Kind::Memory(bus) => Ok(bus.streams().dead_letters(service, from, limit)),
        }
    }

    /// One of `service`'s dead letters.
    pub(crate) async fn dead_letter(&self, service: &str, seq: u64) -> Result<Option<DeadLetter>> {
        match &self.0 {
            Kind::Nats(t) => t.dead_letter(service, seq).await,
            Kind::Memory(bus) => Ok(bus.streams().dead_letter(service, seq)),
        }
    }

    /// Deletes one of `service`'s dead letters.
    pub(crate) async fn delete_dead_letter(&self, service: &str, seq: u64) -> Result<bool> {
        match &self.0 {
            Kind::Nats(t) => t.delete_dead_letter(service, seq).await,
            Kind::Memory(bus) => Ok(bus.streams().delete_dead_letter(service, seq)),
        }
    }

    /// Deletes every dead letter of `service` (one purge of its stream);
    /// how many.
    pub(crate) async fn purge_dead_letters(&self, service: &str) -> Result<u64> {
        match &self.0 {
            Kind::Nats(t) => t.purge_dead_letters(service).await,
            Kind::Memory(bus) => Ok(bus.streams().purge_dead_letters(service)),
        }
    }

    /// Stores a dead letter (cut to fit the broker's limit, see
    /// [`DeadLetter::fit`]); stored once this returns.
    pub(crate) async fn store_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let letter = letter.fit(self.max_payload());
        match &self.0 {
            Kind::Nats(t) => t.store_dead_letter(&letter).await,
            Kind::Memory(bus) => {
                bus.streams().add_dead(letter);
                Ok(())
            }
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

/// What [`Transport::store_in_order`] answers for a message it did not
/// send because its caller said to stop.
pub(crate) fn not_sent() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "not sent: the relay no longer holds its lease",
    )
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
    Js(Box<jetstream::JsSubscription>),
    MemoryDurable(memory_streams::MemoryDurable),
}

impl Subscription {
    /// The next message; `None` once the subscription ended (drained, or
    /// closed by the broker client).
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        match &mut self.0 {
            Sub::Nats(s) => s.next().await,
            Sub::Memory(s) => s.next().await,
            Sub::Js(s) => s.next().await,
            Sub::MemoryDurable(s) => s.next().await,
        }
    }

    /// A message already waiting, taken at once: [`next`](Self::next)
    /// without its future where the subscription allows (a plain one),
    /// else `next` polled once. `None` when none waits (or it ended: the
    /// next `next` says so). May register `cx` for the next arrival, or
    /// not (the fallback polls with a no-op waker): wait on `next`.
    pub(crate) fn ready_now(&mut self, cx: &mut std::task::Context<'_>) -> Option<Delivery> {
        use futures_util::FutureExt;
        let fast = match &mut self.0 {
            Sub::Nats(s) => s.ready_now(cx),
            Sub::Memory(s) => s.ready_now(cx),
            Sub::Js(_) | Sub::MemoryDurable(_) => None,
        };
        match fast {
            Some(taken) => taken,
            None => self.next().now_or_never().flatten(),
        }
    }

    /// Whether the broker keeps what this subscription has not taken
    /// (a durable consumer): then it is read only as fast as it is handled,
    /// and nothing is ever dropped for lack of room.
    pub(crate) fn is_durable(&self) -> bool {
        matches!(self.0, Sub::Js(_) | Sub::MemoryDurable(_))
    }

    /// Stops new deliveries. Messages the broker delivered before it took
    /// the unsubscribe are still returned by [`next`](Self::next), which
    /// then yields `None`.
    pub(crate) async fn drain(&mut self) {
        match &mut self.0 {
            Sub::Nats(s) => s.drain().await,
            Sub::Memory(s) => s.drain(),
            Sub::Js(s) => s.drain().await,
            Sub::MemoryDurable(s) => s.drain(),
        }
    }

    /// After a drain: whether the broker confirmed that nothing more was
    /// on its way when the subscription ended.
    pub(crate) fn handover_confirmed(&self) -> bool {
        match &self.0 {
            Sub::Nats(s) => s.handover_confirmed(),
            Sub::Memory(_) | Sub::Js(_) | Sub::MemoryDurable(_) => true,
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
    /// Which delivery this is (1 unless a durable consumer redelivers).
    pub delivered: u64,
    pub settler: Settler,
}

/// The parts of a delivery the handler reads.
pub(crate) struct Incoming {
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    pub deadline: Option<Deadline>,
    pub delivered: u64,
}

impl Delivery {
    /// Counted as in flight by `tap` (if it is on) until settled.
    pub(crate) fn tracked(mut self, tap: &std::sync::Arc<tap::Tap>) -> Delivery {
        self.settler.track = tap.enter(&self.subject, self.headers.as_ref(), self.delivered);
        self
    }

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
            delivered: 1,
            settler: Settler { reply, track: None },
        }
    }

    /// The delivery of an event: a core reply subject is not answered. An
    /// event comes with one when it was published as a JetStream publish
    /// (a request whose answer is the stream's acknowledgement); a plain
    /// subscriber answering it would reach the publisher first and spoil
    /// that acknowledgement (async-nats fails to parse an empty one).
    pub(crate) fn unanswered(mut self) -> Delivery {
        if matches!(self.settler.reply, ReplyTo::Nats(_) | ReplyTo::Memory(_)) {
            self.settler.reply = ReplyTo::None;
        }
        self
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
            delivered,
            settler,
        } = self;
        (
            Incoming {
                subject,
                headers,
                payload,
                deadline,
                delivered,
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
    Js(Box<jetstream::JsAck>),
    MemoryDurable(memory_streams::MemoryAck),
}

/// How a delivery ends.
pub(crate) enum Settle {
    /// Success: the reply body (ignored for events); a durable message is
    /// acknowledged.
    Reply(Bytes),
    /// Failure: an error reply; `error_id` names the log line with the full
    /// text of a 5xx error. A durable message is settled as dead.
    Error { error: Error, error_id: Option<String> },
    /// Try again later: a durable message is redelivered after `delay`.
    Retry { delay: Duration },
    /// Give up: a durable message goes to the dead letters.
    Dead(Box<DeadLetter>),
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
    /// Counted as in flight by the test kit until the settler is gone
    /// (after its answer or acknowledgement: fields drop after `drop`).
    track: Option<tap::InFlight>,
}

impl Settler {
    /// Whether the message has somewhere to answer to: a requester, or a
    /// durable consumer's acknowledgement (an event's delivery has none
    /// once the serve loop took it).
    pub(crate) fn answers(&self) -> bool {
        !matches!(self.reply, ReplyTo::None)
    }

    /// A JetStream message's sequence in its stream.
    pub(crate) fn stream_seq(&self) -> Option<u64> {
        match &self.reply {
            ReplyTo::Js(ack) => ack.stream_seq(),
            _ => None,
        }
    }

    /// Where a durable message sits: its stream sequence and, on NATS,
    /// when it was stored (Unix nanoseconds; 0 on the embedded bus, whose
    /// streams live as long as the process). What names a message
    /// published without an id (see `keyed`).
    pub(crate) fn stored_at(&self) -> Option<(u64, i128)> {
        match &self.reply {
            ReplyTo::Js(ack) => ack.stored_at(),
            ReplyTo::MemoryDurable(ack) => Some((ack.seq(), 0)),
            _ => None,
        }
    }

    /// Tells the broker a durable message is still being worked on, so
    /// that its ack wait starts again; nothing for other messages.
    pub(crate) async fn progress(&self) -> Result<()> {
        match &self.reply {
            // Boxed: every few seconds at most, and large (see
            // `pipeline::process`).
            ReplyTo::Js(ack) => Box::pin(ack.progress()).await,
            ReplyTo::MemoryDurable(ack) => {
                ack.progress();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Answers the message. A reply larger than the broker accepts is
    /// replaced by a small "too large" error reply, so the sender learns at
    /// once that asking again cannot succeed; the error is returned for the
    /// log.
    pub(crate) async fn settle(mut self, how: Settle) -> Result<()> {
        let reply = std::mem::replace(&mut self.reply, ReplyTo::None);
        match reply {
            ReplyTo::None => Ok(()),
            // Boxed: JetStream's futures (a dead letter is a publish) are
            // large, and would make every message's future as large.
            ReplyTo::Js(ack) => {
                Box::pin(async move {
                    match how {
                        Settle::Reply(_) | Settle::Drop => ack.ack().await,
                        Settle::Retry { delay } => ack.nak(delay).await,
                        Settle::Dead(letter) => ack.dead(*letter).await,
                        // The pipeline turns failures of durable messages
                        // into Retry or Dead; an error here is a dead end too.
                        Settle::Error { .. } => ack.nak(Duration::from_secs(1)).await,
                    }
                })
                .await
            }
            ReplyTo::MemoryDurable(ack) => {
                match how {
                    Settle::Reply(_) | Settle::Drop => ack.ack(),
                    Settle::Retry { delay } => ack.nak(delay),
                    Settle::Dead(letter) => ack.dead(*letter),
                    Settle::Error { .. } => ack.nak(Duration::from_secs(1)),
                }
                Ok(())
            }
            ReplyTo::Nats(to) => match answer(how) {
                Some((headers, body)) => to.send(headers, body).await,
                None => Ok(()),
            },
            ReplyTo::Memory(slot) => match answer(how) {
                Some((headers, body)) => slot.send(headers, body),
                None => Ok(()),
            },
        }
    }
}

/// What a request's sender gets for `how`, if anything.
fn answer(how: Settle) -> Option<(Option<HeaderMap>, Bytes)> {
    match how {
        Settle::Drop => None,
        Settle::Reply(body) => Some((None, body)),
        Settle::Error { error, error_id } => {
            let (h, b) = crate::wire::errors::encode(&error, error_id.as_deref());
            Some((Some(h), b))
        }
        // Core requests are not redelivered: the sender decides, so it
        // learns the handler is unavailable for now.
        Settle::Retry { .. } => {
            let e = Error::new(ErrorKind::Unavailable, "the handler cannot take this now; retry").exposed();
            let (h, b) = crate::wire::errors::encode(&e, None);
            Some((Some(h), b))
        }
        Settle::Dead(letter) => {
            let e = Error::new(letter.error_kind, letter.error.clone());
            let (h, b) = crate::wire::errors::encode(&e, None);
            Some((Some(h), b))
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
    match reply {
        ReplyTo::None => {}
        ReplyTo::Nats(to) => {
            let (h, b) = crate::wire::errors::encode(error, None);
            to.send_now(h, b);
        }
        ReplyTo::Memory(slot) => {
            let (h, b) = crate::wire::errors::encode(error, None);
            let _ = slot.send(Some(h), b);
        }
        // A durable message nobody settled goes back to the broker at
        // once, for another delivery.
        ReplyTo::Js(ack) => ack.give_back_now(),
        ReplyTo::MemoryDurable(ack) => ack.nak(Duration::ZERO),
    }
}

impl Settler {
    /// Lets this delivery go without answering: another delivery of the
    /// same message stands for it (a nak here would give that one back).
    pub(crate) fn forget(mut self) {
        self.reply = ReplyTo::None;
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        let reply = std::mem::replace(&mut self.reply, ReplyTo::None);
        // Settled (or nothing to answer): the error below is not built,
        // which cost every message one or two allocations (found in the
        // fan-out bench's allocation profile).
        if matches!(reply, ReplyTo::None) {
            return;
        }
        refuse(
            reply,
            &Error::new(
                ErrorKind::Unavailable,
                "the replica stopped before answering; retry",
            )
            .exposed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_letter_goes_without_the_brokers_headers() {
        let mut letter = letter();
        letter.seq = 7;
        letter.headers = vec![
            ("Nats-Expected-Last-Msg-Id".into(), "forged".into()),
            ("nats-expected-last-sequence".into(), "3".into()),
            ("Catga-Correlation-Id".into(), "c-1".into()),
        ];
        let h = letter.replay_headers();
        assert!(h.get("Nats-Expected-Last-Msg-Id").is_none());
        assert!(h.get("Nats-Expected-Last-Sequence").is_none());
        assert_eq!(h.get("Catga-Correlation-Id").map(|v| v.as_str()), Some("c-1"));
        assert_eq!(
            h.get(crate::wire::headers::MESSAGE_ID).map(|v| v.as_str()),
            Some("m-1.replay7")
        );
    }

    #[test]
    fn one_partition_stream_keeps_the_layout_from_before() {
        let one = partition_streams("catga.saga.s.x", 8, 1);
        assert_eq!(
            one,
            vec![("catga.saga.s.x.*".to_owned(), vec!["catga.saga.s.x.*".to_owned()])]
        );
        assert_eq!(partition_stream_of("catga.saga.s.x", 5, 8, 1), "catga.saga.s.x.*");
        assert_eq!(stream_name(&one[0].0), stream_name("catga.saga.s.x.*"));
    }

    #[test]
    fn partitions_spread_over_streams_round_robin() {
        let three = partition_streams("b", 8, 3);
        let subjects: Vec<Vec<&str>> = three
            .iter()
            .map(|(_, s)| s.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            subjects,
            [
                vec!["b.0", "b.3", "b.6"],
                vec!["b.1", "b.4", "b.7"],
                vec!["b.2", "b.5"]
            ]
        );
        for p in 0..8 {
            let (key, _) = &three[(p % 3) as usize];
            assert_eq!(&partition_stream_of("b", p, 8, 3), key);
        }
        let names: std::collections::BTreeSet<String> = three.iter().map(|(k, _)| stream_name(k)).collect();
        assert_eq!(names.len(), 3, "three distinct stream names");
        // Never more streams than partitions, never none.
        assert_eq!(partition_streams("b", 2, 5).len(), 2);
        assert_eq!(partition_stream_count(4, 0), 1);
        assert_eq!(partition_stream_count(0, 3), 1);
    }

    fn letter() -> DeadLetter {
        DeadLetter {
            seq: 0,
            subject: "orders.paid".into(),
            service: "orders".into(),
            handler: "billing::record".into(),
            error_kind: ErrorKind::Decode,
            error: "cannot decode\npayload  ".into(),
            deliveries: 1,
            message_id: Some("m-1".into()),
            headers: vec![
                ("Catga-Correlation-Id".into(), "c-1".into()),
                ("Catga-Causation-Id".into(), "p-1".into()),
                (
                    "traceparent".into(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                ),
                ("X-Tag".into(), "a".into()),
                ("X-Tag".into(), "b".into()),
            ],
            payload: Bytes::from_static(b"\xff not json"),
            truncated: None,
            letter_id: Some("l-1".into()),
            authentic: None,
        }
    }

    #[test]
    fn a_letter_read_back_has_the_digest_it_was_written_with() {
        let written = letter();
        for _ in 0..20 {
            let (_, headers) = written.to_stored();
            let read = DeadLetter::from_stored(7, headers, written.payload.clone());
            assert_eq!(read.digest(), written.digest(), "{read:?}");
            // As NATS gives it back: one value per name.
            let mut collapsed = read.clone();
            collapsed.headers.retain(|(k, v)| k != "X-Tag" || v == "b");
            assert_eq!(collapsed.digest(), written.digest());
        }
        let mut changed = letter();
        changed.payload = Bytes::from_static(b"{}");
        assert_ne!(changed.digest(), written.digest());
        let mut redirected = letter();
        redirected.subject = "cmd.cancel_order".into();
        assert_ne!(redirected.digest(), written.digest());
    }

    #[test]
    fn a_letter_over_the_limits_is_cut_to_fit_and_says_so() {
        let mut big = letter();
        big.payload = Bytes::from(vec![b'x'; 2 * DEFAULT_MAX_PAYLOAD]);
        big.message_id = Some("y".repeat(40_000));
        big.headers.push(("X-Big".into(), "z".repeat(70_000)));
        let cut = big.fit(DEFAULT_MAX_PAYLOAD);
        let (_, headers) = cut.to_stored();
        let header_size = memory::wire_size(Some(&headers), 0);
        assert!(header_size + ROUTING_HEADROOM <= MAX_HEADERS, "{header_size}");
        assert!(
            memory::wire_size(Some(&headers), cut.payload.len()) + ROUTING_HEADROOM <= DEFAULT_MAX_PAYLOAD
        );
        assert_eq!(cut.truncated, Some(big.payload.len() as u64));
        assert!(
            cut.message_id
                .as_deref()
                .is_some_and(|id| id.len() <= crate::wire::MAX_ID_LEN)
        );
        assert!(!cut.payload.is_empty());
        let fits = letter();
        assert_eq!(
            fits.fit(DEFAULT_MAX_PAYLOAD),
            fits,
            "a letter that fits is kept as it is"
        );
    }
}
