//! What the test kit sees of an embedded bus: every message sent and
//! published on it, and how many deliveries are handed out and not yet
//! settled. Off unless the test kit (`catga::testing`) turns it on:
//! then one atomic add per delivery and one record per message.

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

/// The tap of one bus.
#[derive(Default)]
pub(crate) struct Tap {
    on: AtomicBool,
    in_flight: AtomicUsize,
    /// Bumped by every message put on the bus and every delivery handed
    /// out or settled: equal before and after a look at every backlog, it
    /// says nothing moved while the look was taken (work only flows from
    /// one counted place to the next, each counted until the next one
    /// is).
    activity: AtomicU64,
    records: Mutex<Vec<Recorded>>,
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

    /// A delivery is handed out: counted until the guard drops (with the
    /// delivery's settler, once it is answered or acknowledged).
    pub(crate) fn enter(self: &Arc<Self>) -> Option<InFlight> {
        self.is_on().then(|| {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.activity.fetch_add(1, Ordering::AcqRel);
            InFlight(Arc::clone(self))
        })
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
        self.activity.fetch_add(1, Ordering::AcqRel);
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Recorded {
                subject: subject.to_owned(),
                sent_as,
                headers: headers.cloned().unwrap_or_default(),
                payload: payload.clone(),
            });
    }

    /// A durable consumer was bound (through NATS).
    pub(crate) fn bound(&self, subject: &str, durable: &str) {
        if self.is_on() {
            self.bound
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((subject.to_owned(), durable.to_owned()));
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
            .clone()
    }
}

/// A delivery handed out and not yet settled.
pub(crate) struct InFlight(Arc<Tap>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
