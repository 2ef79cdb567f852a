//! What the test kit sees of an embedded bus, or of a runtime's NATS
//! connection: every message sent and published, and how many deliveries
//! are handed out and not yet settled (and, on NATS, which durable
//! consumers were bound). Off unless the test kit (`catga::testing`)
//! turns it on: then one atomic add per delivery and one record per
//! message; off, one atomic load each. While on, each delivery handed
//! out is also named until it settles, so that a test that does not
//! settle says which message is stuck.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::error::Result;
use crate::message::Message;
use crate::wire::codec::Decode;
use crate::wire::headers;

/// How a recorded message was put on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentAs {
    /// A command sent (a request, waiting for its reply). Not `Send`: a
    /// public variant of that name makes rustc spell the `Send` trait out
    /// as `std::marker::Send` in every error of a crate that uses catga.
    Request,
    /// An event published on core subjects (at most once).
    Publish,
    /// An event stored in its stream (a durable publish, or the outbox
    /// relay's).
    PublishDurable,
}

/// One message put on the bus, as it travelled.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its subject.
    pub subject: String,
    /// How it was put on the bus.
    pub sent_as: SentAs,
    /// Its headers (empty if it had none).
    pub headers: HeaderMap,
    /// Its payload.
    pub payload: Bytes,
}

impl Recorded {
    fn header(&self, name: async_nats::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// Its message id (`Nats-Msg-Id`), if it has one.
    pub fn message_id(&self) -> Option<&str> {
        self.header(headers::MESSAGE_ID)
    }

    /// The id of the message whose handler sent it (`Catga-Causation-Id`),
    /// if a handler did.
    pub fn causation_id(&self) -> Option<&str> {
        self.header(headers::CAUSATION_ID)
    }

    /// The id shared by everything one request set off
    /// (`Catga-Correlation-Id`).
    pub fn correlation_id(&self) -> Option<&str> {
        self.header(headers::CORRELATION_ID)
    }

    /// Whether it is a message of type `M` (by subject).
    pub fn is<M: Message>(&self) -> bool {
        self.subject == M::SUBJECT
    }

    /// The version it was sent at (`Catga-Version`, 1 when absent).
    pub fn version(&self) -> u32 {
        crate::wire::version_of(Some(&self.headers))
    }

    /// Its payload decoded as `M` (upcast from an older version as `M`
    /// says, like a handler reads it).
    pub fn decode<M: Message + Decode>(&self) -> Result<M> {
        crate::message::decode_at(self.version(), &self.payload)
    }
}

/// What was recorded, in order: a slot emptied when the message turned
/// out not sent.
#[derive(Default)]
struct Records {
    list: Vec<Option<Recorded>>,
    /// The ids of the durable publishes in `list`: a publish sent again
    /// under the same id is recorded once (the stream stores it once).
    durable_ids: std::collections::HashSet<String>,
}

/// Where [`Tap::record_sent`] put a record, to take it back with
/// [`Tap::unrecord`] if the message was not sent after all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot(usize);

/// The tap of one bus, or of one NATS connection.
#[derive(Default)]
pub(crate) struct Tap {
    on: AtomicBool,
    in_flight: AtomicUsize,
    /// The deliveries handed out and not yet settled, by a number of
    /// their own: what a settle that timed out names.
    handed: Mutex<std::collections::BTreeMap<u64, Handed>>,
    /// The number the next delivery handed out is named by.
    next_handed: AtomicU64,
    /// Bumped by every message put on the bus and every delivery handed
    /// out or settled: equal before and after a look at every backlog, it
    /// says nothing moved while the look was taken (work only flows from
    /// one counted place to the next, each counted until the next one
    /// is).
    activity: AtomicU64,
    records: Mutex<Records>,
    /// The durable consumers bound through a NATS transport while on
    /// (subject, durable name): what a kit on real servers asks the
    /// broker about (the embedded streams list their own).
    bound: Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl Tap {
    /// Starts recording and counting.
    pub(crate) fn turn_on(&self) {
        self.on.store(true, Ordering::Release);
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// A delivery is handed out: counted (and named, for
    /// [`stuck`](Self::stuck)) until the guard drops (with the delivery's
    /// settler, once it is answered or acknowledged).
    pub(crate) fn enter(
        self: &Arc<Self>,
        subject: &str,
        headers: Option<&HeaderMap>,
        delivered: u64,
    ) -> Option<InFlight> {
        self.is_on().then(|| {
            let number = self.next_handed.fetch_add(1, Ordering::AcqRel);
            let handed = Handed {
                subject: subject.to_owned(),
                message_id: headers
                    .and_then(|h| h.get(headers::MESSAGE_ID))
                    .map(|v| v.as_str().to_owned()),
                delivered,
                since: std::time::Instant::now(),
            };
            self.handed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(number, handed);
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.activity.fetch_add(1, Ordering::AcqRel);
            InFlight(Arc::clone(self), number)
        })
    }

    /// The first `at_most` deliveries handed out and not yet settled, the
    /// oldest first, in words: subject, message id, which delivery, and
    /// how long ago it was handed out.
    pub(crate) fn stuck(&self, at_most: usize) -> Vec<String> {
        let now = std::time::Instant::now();
        self.handed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .take(at_most)
            .map(|h| {
                format!(
                    "{} (id {}, delivery {}, handed out {:.1?} ago)",
                    h.subject,
                    h.message_id.as_deref().unwrap_or("none"),
                    h.delivered,
                    now.saturating_duration_since(h.since)
                )
            })
            .collect()
    }

    /// How much has moved on the bus so far (see `activity`).
    pub(crate) fn activity(&self) -> u64 {
        self.activity.load(Ordering::Acquire)
    }

    /// Something moved that is not recorded (catga's own messages).
    pub(crate) fn moved(&self) {
        if self.is_on() {
            self.activity.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Deliveries handed out and not yet settled.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Records a message put on the bus.
    pub(crate) fn record(
        &self,
        subject: &str,
        sent_as: SentAs,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) {
        if !self.is_on() {
            return;
        }
        self.push(subject, sent_as, headers, payload, false);
    }

    /// Records a message about to be sent (before it is, so that what its
    /// handlers send is recorded after it); `None` when off, or for a
    /// durable publish whose message id is recorded already (sent again).
    /// [`unrecord`](Self::unrecord) takes it back if it was not sent.
    pub(crate) fn record_sent(
        &self,
        subject: &str,
        sent_as: SentAs,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) -> Option<Slot> {
        self.push(subject, sent_as, headers, payload, true)
    }

    /// Records a message; with `once_per_id`, a durable publish whose id
    /// is recorded already is not (the embedded streams record only what
    /// they store, and drop repeats themselves).
    fn push(
        &self,
        subject: &str,
        sent_as: SentAs,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        once_per_id: bool,
    ) -> Option<Slot> {
        if !self.is_on() {
            return None;
        }
        self.activity.fetch_add(1, Ordering::AcqRel);
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if once_per_id
            && sent_as == SentAs::PublishDurable
            && let Some(id) = headers.and_then(|h| h.get(headers::MESSAGE_ID))
            && !records.durable_ids.insert(id.as_str().to_owned())
        {
            return None;
        }
        records.list.push(Some(Recorded {
            subject: subject.to_owned(),
            sent_as,
            headers: headers.cloned().unwrap_or_default(),
            payload: payload.clone(),
        }));
        Some(Slot(records.list.len() - 1))
    }

    /// Takes back what [`record_sent`](Self::record_sent) recorded: the
    /// message was not sent (or, for a durable publish, not stored, as
    /// far as the sender knows; sent again, it is recorded again).
    pub(crate) fn unrecord(&self, slot: Option<Slot>) {
        let Some(Slot(at)) = slot else {
            return;
        };
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let Records { list, durable_ids } = &mut *records;
        if let Some(taken) = list.get_mut(at).and_then(Option::take)
            && taken.sent_as == SentAs::PublishDurable
            && let Some(id) = taken.message_id()
        {
            durable_ids.remove(id);
        }
    }

    /// A durable consumer was bound (through NATS): `stream_of` is the
    /// subject its stream is named by.
    pub(crate) fn bound(&self, stream_of: &str, durable: &str) {
        if self.is_on() {
            self.bound
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((stream_of.to_owned(), durable.to_owned()));
        }
    }

    /// Every durable consumer bound through NATS while on.
    pub(crate) fn consumers(&self) -> Vec<(String, String)> {
        self.bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Everything recorded so far, in the order it was put on the bus.
    pub(crate) fn records(&self) -> Vec<Recorded> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .list
            .iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// A delivery handed out and not yet settled, and its number in the
/// tap's `handed`.
pub(crate) struct InFlight(Arc<Tap>, u64);

/// What names a delivery handed out (see [`Tap::stuck`]).
struct Handed {
    subject: String,
    message_id: Option<String>,
    delivered: u64,
    since: std::time::Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .handed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
        self.0.activity.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
