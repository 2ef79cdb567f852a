//! Durable events on the embedded bus, with JetStream's semantics: a
//! stream per subject that keeps messages (dropping a repeated message id
//! within the duplicate window), durable consumers shared by every
//! subscriber of the same name, explicit acks, redelivery after a negative
//! ack or when the ack wait passes, and a dead-letter store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{DeadLetter, Delivery, DurableOptions, ReplyTo, Start};
use crate::config::StreamSettings;
use crate::error::{Error, ErrorKind, Result};
use crate::wire::headers;

/// Every stream of one bus, and its dead letters.
#[derive(Default)]
pub(crate) struct Streams {
    inner: Mutex<Inner>,
    /// The bus's tap (see [`super::tap`]).
    tap: Arc<super::tap::Tap>,
    /// The bus's faults, when a simulation runs on it (see
    /// [`super::chaos`]).
    chaos: std::sync::OnceLock<Arc<super::chaos::Chaos>>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, Stream>,
    dead: BTreeMap<u64, DeadLetter>,
    dead_seq: u64,
}

struct Stream {
    settings: StreamSettings,
    last_seq: u64,
    messages: BTreeMap<u64, Stored>,
    recent_ids: HashMap<String, Instant>,
    consumers: HashMap<String, Consumer>,
}

struct Stored {
    headers: Option<HeaderMap>,
    payload: Bytes,
    at: Instant,
}

struct Consumer {
    options: DurableOptions,
    /// The next sequence not delivered yet.
    next: u64,
    /// Delivered, not acknowledged: deliveries so far, and when it may be
    /// delivered again (the ack deadline, or a nak's delay).
    pending: BTreeMap<u64, (u64, Instant)>,
    /// Those of `pending` held back by a negative ack's delay (a retry's
    /// back-off, a saga's timer), not in a handler's hands: what a test
    /// kit's move of the clock brings forward.
    held_back: BTreeSet<u64>,
    /// How far a test kit moved the clock while each message of `pending`
    /// not held back was in a handler's hands: taken off the delay of its
    /// negative ack, which the handler reckoned before the move.
    moved_in_hand: BTreeMap<u64, Duration>,
    wake: Arc<Notify>,
    /// Whether it ever delivered a message.
    delivered: bool,
}

impl Consumer {
    /// Every message up to this sequence is acknowledged.
    fn ack_floor(&self) -> u64 {
        let first_open = self.pending.keys().next().copied().unwrap_or(self.next);
        first_open.saturating_sub(1)
    }

    /// A consumer that delivers from sequence `next` on.
    fn new(options: &DurableOptions, next: u64) -> Consumer {
        Consumer {
            options: options.clone(),
            next,
            pending: BTreeMap::new(),
            held_back: BTreeSet::new(),
            moved_in_hand: BTreeMap::new(),
            wake: Arc::new(Notify::new()),
            delivered: false,
        }
    }
}

/// No stream stores `subject`.
fn no_stream(subject: &str) -> Error {
    Error::new(
        ErrorKind::NoHandler,
        format!("no stream stores subject {subject}"),
    )
}

/// Why a durable consumer has nothing to deliver now.
enum Wait {
    /// Something comes due then (a redelivery).
    Until(Instant),
    /// Nothing until a publish wakes it.
    Woken,
    /// The consumer the subscription bound is gone (deleted).
    Gone,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Each critical section updates the maps in place without panicking
    // in between, so a poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stream {
    fn prune(&mut self, now: Instant) {
        let max_age = self.settings.max_age;
        while let Some((&seq, m)) = self.messages.iter().next() {
            if now.duration_since(m.at) < max_age {
                break;
            }
            self.messages.remove(&seq);
        }
        let window = self.settings.duplicate_window;
        self.recent_ids.retain(|_, at| now.duration_since(*at) < window);
    }
}

impl Streams {
    /// The bus's tap.
    pub(crate) fn tap(&self) -> &Arc<super::tap::Tap> {
        &self.tap
    }

    /// The bus's faults, if a simulation installed them.
    pub(crate) fn chaos(&self) -> Option<&Arc<super::chaos::Chaos>> {
        self.chaos.get()
    }

    /// Installs the bus's faults; `false` if some were installed before.
    pub(crate) fn install_chaos(&self, chaos: Arc<super::chaos::Chaos>) -> bool {
        self.chaos.set(chaos).is_ok()
    }

    /// What the durable consumers have not settled: per consumer with
    /// something left, its stream's subject, its name, the messages it
    /// was not given yet, and when each unacknowledged one may be given
    /// again (its ack deadline, or a negative ack's delay).
    pub(crate) fn backlog(&self) -> Vec<Backlog> {
        let inner = lock(&self.inner);
        let mut out = Vec::new();
        for (subject, stream) in &inner.streams {
            for (name, c) in &stream.consumers {
                let undelivered = stream.messages.range(c.next..).count();
                let pending = c
                    .pending
                    .iter()
                    .filter(|(seq, _)| stream.messages.contains_key(seq))
                    .map(|(_, (_, at))| *at)
                    .collect::<Vec<_>>();
                if undelivered > 0 || !pending.is_empty() {
                    out.push(Backlog {
                        subject: subject.clone(),
                        durable: name.clone(),
                        undelivered,
                        pending,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.subject, &a.durable).cmp(&(&b.subject, &b.durable)));
        out
    }

    pub(crate) fn ensure(&self, subject: &str, settings: &StreamSettings) {
        lock(&self.inner)
            .streams
            .entry(subject.to_owned())
            .or_insert_with(|| Stream {
                settings: settings.clone(),
                last_seq: 0,
                messages: BTreeMap::new(),
                recent_ids: HashMap::new(),
                consumers: HashMap::new(),
            });
    }

    /// Stores a message; a repeated message id within the duplicate window
    /// is acknowledged and dropped, as JetStream does (`Ok(false)`). A
    /// stored message is recorded by the tap as `record` says (before the
    /// consumers are woken, so that what a handler sends for it is
    /// recorded after it); `None`: catga's own, not recorded.
    pub(crate) fn publish(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
        record: Option<super::tap::SentAs>,
    ) -> Result<bool> {
        self.append(subject, headers, payload, record, None)
            .map(|a| a == super::Appended::Stored)
    }

    /// [`publish`](Self::publish), only if the stream's last message is
    /// still the one with sequence `after` (0: none), as JetStream's
    /// `Nats-Expected-Last-Subject-Sequence` (a stream here stores one
    /// subject).
    pub(crate) fn publish_after(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
        after: u64,
    ) -> Result<super::Appended> {
        self.append(subject, headers, payload, None, Some(after))
    }

    /// The stream's last message: its sequence and message id.
    pub(crate) fn last(&self, subject: &str) -> Option<(u64, String)> {
        let mut inner = lock(&self.inner);
        let stream = inner.streams.get_mut(subject)?;
        stream.prune(Instant::now());
        let (seq, m) = stream.messages.last_key_value()?;
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        Some((*seq, id))
    }

    fn append(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
        record: Option<super::tap::SentAs>,
        after: Option<u64>,
    ) -> Result<super::Appended> {
        let wakes: Vec<Arc<Notify>> = {
            let mut inner = lock(&self.inner);
            let Some(stream) = inner.streams.get_mut(subject) else {
                return Err(Error::new(
                    ErrorKind::NoHandler,
                    format!("no stream stores subject {subject}"),
                ));
            };
            let now = Instant::now();
            stream.prune(now);
            let id = headers
                .as_ref()
                .and_then(|h| h.get(headers::MESSAGE_ID))
                .map(|v| v.as_str().to_owned());
            // JetStream checks a repeated id before the expectation.
            if let Some(id) = &id
                && stream.recent_ids.contains_key(id)
            {
                return Ok(super::Appended::Repeated);
            }
            if let Some(after) = after {
                let last = stream.messages.last_key_value().map_or(0, |(s, _)| *s);
                if last != after {
                    return Ok(super::Appended::Behind);
                }
            }
            if let Some(id) = id {
                stream.recent_ids.insert(id, now);
            }
            match record {
                Some(how) => self.tap.record(subject, how, headers.as_ref(), &payload),
                None => self.tap.moved(),
            }
            stream.last_seq += 1;
            let seq = stream.last_seq;
            stream.messages.insert(
                seq,
                Stored {
                    headers,
                    payload,
                    at: now,
                },
            );
            stream.consumers.values().map(|c| Arc::clone(&c.wake)).collect()
        };
        for w in wakes {
            w.notify_waiters();
        }
        Ok(super::Appended::Stored)
    }

    /// Whether `durable` is bound on the stream of `subject`.
    pub(crate) fn has_consumer(&self, subject: &str, durable: &str) -> bool {
        lock(&self.inner)
            .streams
            .get(subject)
            .is_some_and(|s| s.consumers.contains_key(durable))
    }

    /// `durable` on `subject`, if it exists.
    pub(crate) fn found(&self, subject: &str, durable: &str) -> Option<super::DurableFound> {
        let inner = lock(&self.inner);
        let c = inner.streams.get(subject)?.consumers.get(durable)?;
        Some(super::DurableFound {
            ack_floor: c.ack_floor(),
            routers: c.options.routers,
            delivered: c.delivered,
        })
    }

    /// Deletes `durable` on `subject` if it exists; a subscription bound
    /// to it ends.
    pub(crate) fn delete(&self, subject: &str, durable: &str) {
        let removed = lock(&self.inner)
            .streams
            .get_mut(subject)
            .and_then(|s| s.consumers.remove(durable));
        if let Some(c) = removed {
            c.wake.notify_waiters();
        }
    }

    /// Creates `durable` on `subject` at sequence `seq` unless it exists;
    /// whether it was created now.
    pub(crate) fn create_at(
        &self,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
        seq: u64,
    ) -> Result<bool> {
        let mut inner = lock(&self.inner);
        let Some(stream) = inner.streams.get_mut(subject) else {
            return Err(no_stream(subject));
        };
        if stream.consumers.contains_key(durable) {
            return Ok(false);
        }
        stream
            .consumers
            .insert(durable.to_owned(), Consumer::new(options, seq.max(1)));
        Ok(true)
    }

    /// Binds `durable` on `subject`, creating it to start at the stream's
    /// beginning (as a new JetStream durable with the default policy).
    pub(crate) fn bind(
        self: &Arc<Self>,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
    ) -> Result<MemoryDurable> {
        let mut inner = lock(&self.inner);
        let Some(stream) = inner.streams.get_mut(subject) else {
            return Err(no_stream(subject));
        };
        let first = match options.start {
            Start::Last => stream.messages.keys().next_back().copied(),
            Start::First => stream.messages.keys().next().copied(),
            Start::Existing if stream.consumers.contains_key(durable) => None,
            Start::Existing => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("the durable consumer {durable} is not created yet"),
                ));
            }
        }
        .unwrap_or(stream.last_seq + 1);
        let consumer = stream
            .consumers
            .entry(durable.to_owned())
            .or_insert_with(|| Consumer::new(options, first));
        consumer.options = options.clone();
        Ok(MemoryDurable {
            streams: Arc::clone(self),
            subject: subject.to_owned(),
            durable: durable.to_owned(),
            wake: Arc::clone(&consumer.wake),
            stopped: false,
            gate: None,
        })
    }

    /// The next message for `durable`: a redelivery that is due, or a new
    /// one; else when to look again, or that the consumer `bound` is gone.
    fn take(
        &self,
        subject: &str,
        durable: &str,
        bound: &Arc<Notify>,
    ) -> std::result::Result<(u64, u64, Stored2), Wait> {
        let mut inner = lock(&self.inner);
        let Some(stream) = inner.streams.get_mut(subject) else {
            return Err(Wait::Woken);
        };
        let now = Instant::now();
        stream.prune(now);
        let Stream {
            messages, consumers, ..
        } = stream;
        let Some(c) = consumers.get_mut(durable) else {
            return Err(Wait::Gone);
        };
        // Deleted, and maybe made again: not the consumer this
        // subscription bound (whose wake-ups it waits on).
        if !Arc::ptr_eq(&c.wake, bound) {
            return Err(Wait::Gone);
        }
        // A pending message whose message was pruned is gone.
        c.pending.retain(|seq, _| messages.contains_key(seq));
        let due = c.pending.iter().find(|(_, (_, at))| *at <= now).map(|(s, _)| *s);
        let (seq, deliveries) = match due {
            Some(seq) => {
                c.held_back.remove(&seq);
                c.moved_in_hand.remove(&seq);
                let entry = c.pending.get_mut(&seq).map(|e| {
                    e.0 += 1;
                    e.1 = now + c.options.ack_wait;
                    e.0
                });
                (seq, entry.unwrap_or(1))
            }
            None => {
                let in_flight = c.pending.len();
                let next = messages.range(c.next..).next().map(|(s, _)| *s);
                match next {
                    Some(seq) if in_flight < c.options.max_ack_pending => {
                        c.next = seq + 1;
                        c.delivered = true;
                        c.pending.insert(seq, (1, now + c.options.ack_wait));
                        (seq, 1)
                    }
                    _ => {
                        return Err(c
                            .pending
                            .values()
                            .map(|(_, at)| *at)
                            .min()
                            .map_or(Wait::Woken, Wait::Until));
                    }
                }
            }
        };
        let m = &messages[&seq];
        Ok((
            seq,
            deliveries,
            Stored2 {
                headers: m.headers.clone(),
                payload: m.payload.clone(),
            },
        ))
    }

    /// Messages `durable` was given and has not acknowledged, those it
    /// was not given yet, and the sequence up to which every message is
    /// acknowledged.
    pub(crate) fn outstanding(&self, subject: &str, durable: &str) -> (u64, u64, u64) {
        let inner = lock(&self.inner);
        let Some(stream) = inner.streams.get(subject) else {
            return (0, 0, 0);
        };
        stream.consumers.get(durable).map_or((0, 0, 0), |c| {
            let undelivered = stream.messages.range(c.next..).count() as u64;
            (c.pending.len() as u64, undelivered, c.ack_floor())
        })
    }

    fn settle(&self, subject: &str, durable: &str, seq: u64, redeliver_in: Option<Duration>) {
        let wake = {
            let mut inner = lock(&self.inner);
            let Some(c) = inner
                .streams
                .get_mut(subject)
                .and_then(|s| s.consumers.get_mut(durable))
            else {
                return;
            };
            match redeliver_in {
                None => {
                    c.pending.remove(&seq);
                    c.held_back.remove(&seq);
                    c.moved_in_hand.remove(&seq);
                }
                Some(delay) => {
                    let moved = c.moved_in_hand.remove(&seq).unwrap_or_default();
                    if let Some(e) = c.pending.get_mut(&seq) {
                        e.1 = Instant::now() + delay.saturating_sub(moved);
                        c.held_back.insert(seq);
                    }
                }
            }
            Arc::clone(&c.wake)
        };
        wake.notify_waiters();
    }

    /// Brings every message held back by a negative ack's delay `by`
    /// closer (the test kit's move of the clock), and wakes the consumers
    /// to look again. Messages in a handler's hands keep their ack wait.
    pub(crate) fn advance(&self, by: Duration) {
        let wakes: Vec<Arc<Notify>> = {
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            let mut wakes = Vec::new();
            for stream in inner.streams.values_mut() {
                for c in stream.consumers.values_mut() {
                    let Consumer {
                        pending,
                        held_back,
                        moved_in_hand,
                        ..
                    } = c;
                    held_back.retain(|seq| pending.contains_key(seq));
                    moved_in_hand.retain(|seq, _| pending.contains_key(seq));
                    for (seq, e) in pending.iter_mut() {
                        if held_back.contains(seq) {
                            e.1 = now + e.1.saturating_duration_since(now).saturating_sub(by);
                        } else {
                            let m = moved_in_hand.entry(*seq).or_default();
                            *m = m.saturating_add(by);
                        }
                    }
                    wakes.push(Arc::clone(&c.wake));
                }
            }
            wakes
        };
        for w in wakes {
            w.notify_waiters();
        }
    }

    pub(crate) fn add_dead(&self, mut letter: DeadLetter) {
        let mut inner = lock(&self.inner);
        inner.dead_seq += 1;
        letter.seq = inner.dead_seq;
        let seq = letter.seq;
        inner.dead.insert(seq, letter);
    }

    pub(crate) fn dead_letters(&self, service: &str, from: u64, limit: usize) -> Vec<DeadLetter> {
        lock(&self.inner)
            .dead
            .range(from..)
            .filter(|(_, d)| d.service == service)
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub(crate) fn dead_letter(&self, service: &str, seq: u64) -> Option<DeadLetter> {
        lock(&self.inner)
            .dead
            .get(&seq)
            .filter(|d| d.service == service)
            .cloned()
    }

    pub(crate) fn delete_dead_letter(&self, service: &str, seq: u64) -> bool {
        let mut inner = lock(&self.inner);
        if inner.dead.get(&seq).is_some_and(|d| d.service == service) {
            inner.dead.remove(&seq);
            return true;
        }
        false
    }

    pub(crate) fn purge_dead_letters(&self, service: &str) -> u64 {
        let mut inner = lock(&self.inner);
        let before = inner.dead.len();
        inner.dead.retain(|_, d| d.service != service);
        (before - inner.dead.len()) as u64
    }
}

/// What one durable consumer has not settled (see [`Streams::backlog`]).
#[derive(Debug, Clone)]
pub(crate) struct Backlog {
    pub subject: String,
    pub durable: String,
    pub undelivered: usize,
    pub pending: Vec<Instant>,
}

struct Stored2 {
    headers: Option<HeaderMap>,
    payload: Bytes,
}

/// A subscriber of an in-memory durable consumer.
pub(crate) struct MemoryDurable {
    streams: Arc<Streams>,
    subject: String,
    durable: String,
    wake: Arc<Notify>,
    stopped: bool,
    /// The stall switch of the replica it belongs to (see
    /// [`crate::stall::Gate`]).
    gate: Option<Arc<crate::stall::Gate>>,
}

impl MemoryDurable {
    /// The same subscriber, stalled with its replica.
    pub(crate) fn gated(mut self, gate: Option<Arc<crate::stall::Gate>>) -> MemoryDurable {
        self.gate = gate;
        self
    }

    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(gate) = &self.gate {
                gate.pass().await;
            }
            if self.stopped {
                return None;
            }
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.streams.take(&self.subject, &self.durable, &self.wake) {
                Ok((seq, deliveries, m)) => {
                    let key = match self.streams.chaos() {
                        Some(chaos) => {
                            // Each consumer of the stream meets its own
                            // faults: salted with its name.
                            let salt = super::chaos::key_of(&self.durable, None, &[], 0);
                            let key =
                                super::chaos::key_of(&self.subject, m.headers.as_ref(), &m.payload, salt);
                            // Lost on its way: it stays pending and comes
                            // again when its ack wait passes.
                            if chaos.strikes(super::chaos::Fault::Delivery, key) {
                                continue;
                            }
                            key
                        }
                        None => 0,
                    };
                    let mut d = Delivery::new(
                        Subject::from(self.subject.as_str()),
                        m.headers,
                        m.payload,
                        None,
                        ReplyTo::MemoryDurable(MemoryAck {
                            streams: Arc::clone(&self.streams),
                            subject: self.subject.clone(),
                            durable: self.durable.clone(),
                            seq,
                            key,
                            gate: self.gate.clone(),
                        }),
                    );
                    d.delivered = deliveries;
                    return Some(d.tracked(&self.streams.tap));
                }
                Err(Wait::Until(at)) => {
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                Err(Wait::Woken) => woken.await,
                // Its consumer was deleted: the subscription ends, as a
                // JetStream one does.
                Err(Wait::Gone) => return None,
            }
        }
    }

    /// Stops taking messages; what this subscriber holds is settled by its
    /// acks, and what it never took stays for the others.
    pub(crate) fn drain(&mut self) {
        self.stopped = true;
    }
}

/// Acknowledges a message of an in-memory durable consumer.
pub(crate) struct MemoryAck {
    streams: Arc<Streams>,
    subject: String,
    durable: String,
    seq: u64,
    /// The message's key for the simulator's faults (0 without them).
    key: u64,
    /// The stall switch of the replica holding it.
    gate: Option<Arc<crate::stall::Gate>>,
}

impl MemoryAck {
    /// The message's sequence in its stream.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn ack(self) {
        // A lost ack: the message comes again when its ack wait passes.
        if let Some(chaos) = self.streams.chaos()
            && chaos.strikes(super::chaos::Fault::Ack, self.key)
        {
            return;
        }
        // A stalled replica's ack goes out when it wakes.
        if let Some(gate) = self.gate.clone().filter(|g| g.is_stalled()) {
            tokio::spawn(async move {
                gate.pass().await;
                self.streams.settle(&self.subject, &self.durable, self.seq, None);
            });
            return;
        }
        self.streams.settle(&self.subject, &self.durable, self.seq, None);
    }

    /// Still working on it: the ack wait starts again.
    pub(crate) fn progress(&self) {
        // A stalled replica says nothing: the ack wait runs out.
        if self.gate.as_ref().is_some_and(|g| g.is_stalled()) {
            return;
        }
        let mut inner = lock(&self.streams.inner);
        if let Some(c) = inner
            .streams
            .get_mut(&self.subject)
            .and_then(|s| s.consumers.get_mut(&self.durable))
        {
            let again = Instant::now() + c.options.ack_wait;
            if let Some(e) = c.pending.get_mut(&self.seq) {
                e.1 = again;
            }
        }
    }

    pub(crate) fn nak(self, delay: Duration) {
        self.streams
            .settle(&self.subject, &self.durable, self.seq, Some(delay));
    }

    pub(crate) fn dead(self, letter: DeadLetter) {
        self.streams.add_dead(letter.fit(super::DEFAULT_MAX_PAYLOAD));
        self.streams.settle(&self.subject, &self.durable, self.seq, None);
    }
}
