//! The embedded in-memory bus: one process, NATS semantics.
//!
//! Routes live in one map behind a read-write lock; sending takes the read
//! lock, picks the receivers (every plain subscriber, one member of each
//! queue group in turn) and hands each a [`Delivery`] without allocating a
//! list of targets. Buffers are unbounded here: the runtime bounds what it
//! takes from a subscription and counts what it drops, the same way for
//! both transports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::tap::SentAs;
use super::{DEFAULT_MAX_PAYLOAD, Delivery, Reply, ReplyTo, SubscribeTo};
use crate::error::{Error, ErrorKind, Result};
use crate::stall::Gate;
use crate::wire::deadline::Deadline;

/// An in-process message bus. Clone it to connect several runtimes and
/// clients in one process (each clone is the same bus).
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<BusInner>,
    /// The stall switch of the replica this handle belongs to (the fault
    /// simulator's), if any.
    gate: Option<Arc<Gate>>,
}

impl Default for MemoryBus {
    fn default() -> MemoryBus {
        MemoryBus::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("max_payload", &self.inner.max_payload)
            .finish()
    }
}

struct BusInner {
    routes: RwLock<HashMap<String, Route>>,
    next_id: AtomicU64,
    max_payload: usize,
    streams: Arc<super::memory_streams::Streams>,
    /// The state store of the embedded mode: runtimes on one bus share it,
    /// as replicas share Redis.
    store: Arc<crate::store::MemoryStore>,
    /// The clock of the times kept for later on this bus (see
    /// [`crate::clock`]).
    clock: Arc<crate::clock::Clock>,
}

#[derive(Default)]
struct Route {
    plain: Vec<Member>,
    groups: Vec<Group>,
}

struct Group {
    name: String,
    members: Vec<Member>,
    turn: AtomicUsize,
}

struct Member {
    id: u64,
    tx: mpsc::UnboundedSender<Delivery>,
}

impl Route {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    /// How many copies one message makes: one per plain subscriber, one
    /// per queue group.
    fn fan_out(&self) -> usize {
        self.plain.len() + self.groups.len()
    }

    /// Hands one copy to each receiver; `make` builds each copy. Returns
    /// how many were handed over.
    fn deliver(&self, mut make: impl FnMut() -> Delivery) -> usize {
        self.deliver_some(keep_all, &mut make)
    }

    /// [`deliver`](Self::deliver), skipping the copies `keep` says no to
    /// (the simulator's lost copies; a skipped copy counts as handed over,
    /// as a copy the network lost does for NATS).
    fn deliver_some(&self, mut keep: impl FnMut() -> bool, make: &mut impl FnMut() -> Delivery) -> usize {
        let mut n = 0;
        for m in &self.plain {
            if !keep() {
                n += 1;
                continue;
            }
            if m.tx.send(make()).is_ok() {
                n += 1;
            }
        }
        for g in &self.groups {
            let len = g.members.len();
            let start = g.turn.fetch_add(1, Ordering::Relaxed);
            if !keep() {
                n += 1;
                continue;
            }
            let mut msg = make();
            // A member whose subscription is gone gives the message back;
            // try the next one.
            for i in 0..len {
                match g.members[(start + i) % len].tx.send(msg) {
                    Ok(()) => {
                        n += 1;
                        break;
                    }
                    Err(mpsc::error::SendError(back)) => msg = back,
                }
            }
        }
        n
    }
}

/// Keeps every copy: [`Route::deliver`] without faults.
fn keep_all() -> bool {
    true
}

/// The reply slot of an in-memory request: the first answer wins, as with
/// NATS. A request with one receiver (the common case: one queue group)
/// needs no shared slot.
pub(crate) struct ReplySlot {
    tx: SlotTx,
    max_payload: usize,
    /// The simulator's faults, when this request's reply is to be lost.
    lost: Option<Arc<super::chaos::Chaos>>,
}

enum SlotTx {
    One(oneshot::Sender<Reply>),
    Shared(Arc<Mutex<Option<oneshot::Sender<Reply>>>>),
}

impl ReplySlot {
    /// Answers; a reply over the payload limit is replaced by a "too large"
    /// error reply, as over NATS.
    pub(crate) fn send(self, headers: Option<HeaderMap>, payload: Bytes) -> Result<()> {
        let size = wire_size(headers.as_ref(), payload.len());
        if size > self.max_payload {
            let err = too_large("the reply", size, self.max_payload);
            let (h, b) = crate::wire::errors::encode(&err, None);
            self.deliver(Reply {
                headers: Some(h),
                payload: b,
            });
            return Err(err);
        }
        self.deliver(Reply { headers, payload });
        Ok(())
    }

    fn deliver(self, reply: Reply) {
        let tx = match self.tx {
            SlotTx::One(tx) => Some(tx),
            SlotTx::Shared(shared) => shared.lock().unwrap_or_else(PoisonError::into_inner).take(),
        };
        // The requester may have given up (time-out); nothing to do then.
        if let Some(tx) = tx {
            match self.lost {
                Some(chaos) => chaos.lose_reply(tx),
                None => {
                    let _ = tx.send(reply);
                }
            }
        }
    }
}

fn went_away(subject: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("the handler of subject {subject} went away before answering"),
    )
}

fn no_handler(subject: &str) -> Error {
    Error::new(ErrorKind::NoHandler, format!("no handler for subject {subject}"))
}

/// The size a message takes against the payload limit: payload plus a
/// header block like the one NATS would write.
pub(crate) fn wire_size(headers: Option<&HeaderMap>, payload: usize) -> usize {
    let headers = headers.filter(|h| !h.is_empty()).map_or(0, |h| {
        // "NATS/1.0\r\n" + "name: value\r\n" per header + "\r\n"
        12 + h
            .iter()
            .map(|(k, vs)| {
                vs.iter()
                    .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum::<usize>()
    });
    headers + payload
}

pub(crate) fn too_large(subject: &str, size: usize, max: usize) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("a message of {size} bytes on {subject} is over the broker's limit of {max} bytes"),
    )
}

impl MemoryBus {
    /// A new, empty bus with NATS' default payload limit (1 MiB).
    pub fn new() -> MemoryBus {
        MemoryBus::default()
    }

    /// A new, empty bus that refuses messages over `max_payload` bytes
    /// (payload plus headers), as a nats-server with that `max_payload`.
    pub fn with_max_payload(max_payload: usize) -> MemoryBus {
        let clock = Arc::new(crate::clock::Clock::new());
        MemoryBus {
            inner: Arc::new(BusInner {
                routes: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                max_payload,
                streams: Arc::default(),
                store: Arc::new(crate::store::MemoryStore::with_clock(Arc::clone(&clock))),
                clock,
            }),
            gate: None,
        }
    }

    /// The same bus, for a replica whose I/O `gate` can stall.
    pub(crate) fn gated(&self, gate: Arc<Gate>) -> MemoryBus {
        MemoryBus {
            inner: Arc::clone(&self.inner),
            gate: Some(gate),
        }
    }

    /// This handle's stall switch, if any.
    pub(crate) fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// Waits while this handle's replica is stalled.
    pub(crate) async fn pass(&self) {
        if let Some(gate) = &self.gate {
            gate.pass().await;
        }
    }

    /// The clock of the times kept for later on this bus.
    pub(crate) fn clock(&self) -> &crate::clock::Clock {
        &self.inner.clock
    }

    /// The payload limit.
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    /// The state store shared by the runtimes on this bus.
    pub(crate) fn store(&self) -> &Arc<crate::store::MemoryStore> {
        &self.inner.store
    }

    /// The bus's durable streams.
    pub(crate) fn streams(&self) -> &Arc<super::memory_streams::Streams> {
        &self.inner.streams
    }

    /// Stores a message in the stream of `subject` (an error if there is
    /// none) and, as a JetStream publish does, hands it to the plain
    /// subscribers of the subject too.
    pub(crate) fn publish_durable(&self, subject: &str, headers: HeaderMap, payload: Bytes) -> Result<()> {
        self.keep(subject, headers, payload, Some(SentAs::PublishDurable))
    }

    /// [`publish_durable`](Self::publish_durable) of catga's own message
    /// (a keyed saga's routed copy): the test kit does not record it as
    /// the user's.
    pub(crate) fn publish_durable_internal(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<()> {
        self.keep(subject, headers, payload, None)
    }

    /// Stores a message in `subject`'s stream only if the stream's last
    /// message is still the one with sequence `after` (see
    /// [`Transport::publish_after_seq`](super::Transport::publish_after_seq)).
    pub(crate) fn publish_after(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        after: u64,
    ) -> Result<super::Appended> {
        let headers = (!headers.is_empty()).then_some(headers);
        self.check_size(subject, headers.as_ref(), payload.len())?;
        self.inner.streams.publish_after(subject, headers, payload, after)
    }

    fn keep(&self, subject: &str, headers: HeaderMap, payload: Bytes, record: Option<SentAs>) -> Result<()> {
        let headers = (!headers.is_empty()).then_some(headers);
        self.check_size(subject, headers.as_ref(), payload.len())?;
        self.inner
            .streams
            .publish(subject, headers.clone(), payload.clone(), record)?;
        self.fan_out(&Subject::from(subject), headers, payload);
        Ok(())
    }

    fn fan_out(&self, subject: &Subject, headers: Option<HeaderMap>, payload: Bytes) {
        let routes = self.inner.routes.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(route) = routes.get(subject.as_str()) {
            let tap = self.tap();
            let mut make = || {
                Delivery::new(
                    subject.clone(),
                    headers.clone(),
                    payload.clone(),
                    None,
                    ReplyTo::None,
                )
                .tracked(tap)
            };
            match self.inner.streams.chaos() {
                None => route.deliver(make),
                Some(chaos) => {
                    let key = super::chaos::key_of(subject, headers.as_ref(), &payload, 0);
                    let mut copy = 0;
                    route.deliver_some(
                        || {
                            copy += 1;
                            !chaos.strikes(super::chaos::Fault::Copy, super::chaos::mix(key ^ copy))
                        },
                        &mut make,
                    )
                }
            };
        }
    }

    /// The bus's tap (see [`super::tap`]).
    pub(crate) fn tap(&self) -> &Arc<super::tap::Tap> {
        self.inner.streams.tap()
    }

    fn check_size(&self, subject: &str, headers: Option<&HeaderMap>, payload: usize) -> Result<()> {
        let size = wire_size(headers, payload);
        if size > self.inner.max_payload {
            return Err(too_large(subject, size, self.inner.max_payload));
        }
        Ok(())
    }

    pub(crate) fn subscribe(&self, to: &SubscribeTo) -> Result<MemorySubscription> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut routes = self.inner.routes.write().unwrap_or_else(PoisonError::into_inner);
        let route = routes.entry(to.subject.clone()).or_default();
        let member = Member { id, tx };
        match &to.queue_group {
            None => route.plain.push(member),
            Some(name) => match route.groups.iter_mut().find(|g| &g.name == name) {
                Some(g) => g.members.push(member),
                None => route.groups.push(Group {
                    name: name.clone(),
                    members: vec![member],
                    turn: AtomicUsize::new(0),
                }),
            },
        }
        Ok(MemorySubscription {
            rx,
            bus: self.clone(),
            subject: to.subject.clone(),
            id,
            removed: false,
            held: None,
        })
    }

    fn remove(&self, subject: &str, id: u64) {
        let mut routes = self.inner.routes.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(route) = routes.get_mut(subject) {
            route.plain.retain(|m| m.id != id);
            for g in &mut route.groups {
                g.members.retain(|m| m.id != id);
            }
            route.groups.retain(|g| !g.members.is_empty());
            if route.is_empty() {
                routes.remove(subject);
            }
        }
    }

    pub(crate) fn publish(&self, subject: &Subject, headers: HeaderMap, payload: Bytes) -> Result<()> {
        let headers = (!headers.is_empty()).then_some(headers);
        self.check_size(subject, headers.as_ref(), payload.len())?;
        // Recorded first: a stream that keeps it wakes its consumers, and
        // what they send is recorded after it.
        self.tap()
            .record(subject, SentAs::Publish, headers.as_ref(), &payload);
        // As with JetStream, a stream keeps what is published on its
        // subject, however it was published.
        match self
            .inner
            .streams
            .publish(subject, headers.clone(), payload.clone(), None)
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NoHandler => {}
            Err(e) => return Err(e),
        }
        self.fan_out(subject, headers, payload);
        Ok(())
    }

    pub(crate) async fn request(
        &self,
        subject: &Subject,
        headers: HeaderMap,
        payload: Bytes,
        deadline: Deadline,
        timeout: Duration,
    ) -> Result<Reply> {
        self.pass().await;
        let headers = (!headers.is_empty()).then_some(headers);
        self.check_size(subject, headers.as_ref(), payload.len())?;
        let (tx, rx) = oneshot::channel();
        let max_payload = self.inner.max_payload;
        let tap = self.tap();
        tap.record(subject, SentAs::Request, headers.as_ref(), &payload);
        let mut lost = None;
        if let Some(chaos) = self.inner.streams.chaos() {
            let key = super::chaos::key_of(subject, headers.as_ref(), &payload, 0);
            if chaos.strikes(super::chaos::Fault::Request, key) {
                // No handler sees it: the sender hears nothing until its
                // deadline (what is left of it after a stall).
                tokio::time::sleep(deadline.remaining().unwrap_or_default().min(timeout)).await;
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no reply on subject {subject} within {timeout:?}"),
                ));
            }
            if chaos.strikes(super::chaos::Fault::Reply, key) {
                lost = Some(Arc::clone(chaos));
            }
        }
        {
            let routes = self.inner.routes.read().unwrap_or_else(PoisonError::into_inner);
            let route = routes.get(subject.as_str()).ok_or_else(|| no_handler(subject))?;
            let delivered = if route.fan_out() == 1 {
                let mut one = Some(tx);
                let mut headers = headers;
                route.deliver(|| {
                    let slot = match one.take() {
                        Some(tx) => SlotTx::One(tx),
                        // One receiver: `make` runs once (again only when
                        // the chosen member is gone, with the message given
                        // back), so this arm is not reached.
                        None => SlotTx::Shared(Arc::new(Mutex::new(None))),
                    };
                    Delivery::new(
                        subject.clone(),
                        headers.take(),
                        payload.clone(),
                        Some(deadline),
                        ReplyTo::Memory(ReplySlot {
                            tx: slot,
                            max_payload,
                            lost: lost.take(),
                        }),
                    )
                    .tracked(tap)
                })
            } else {
                let shared = Arc::new(Mutex::new(Some(tx)));
                route.deliver(|| {
                    Delivery::new(
                        subject.clone(),
                        headers.clone(),
                        payload.clone(),
                        Some(deadline),
                        ReplyTo::Memory(ReplySlot {
                            tx: SlotTx::Shared(Arc::clone(&shared)),
                            max_payload,
                            lost: lost.clone(),
                        }),
                    )
                    .tracked(tap)
                })
            };
            if delivered == 0 {
                return Err(no_handler(subject));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // Every receiver dropped the request without answering.
            Ok(Err(_)) => Err(went_away(subject)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no reply on subject {subject} within {timeout:?}"),
            )),
        }
    }
}

/// A subscription on the in-memory bus.
pub(crate) struct MemorySubscription {
    rx: mpsc::UnboundedReceiver<Delivery>,
    bus: MemoryBus,
    subject: String,
    id: u64,
    removed: bool,
    /// A delivery taken while the replica was stalled, kept until it
    /// wakes.
    held: Option<Delivery>,
}

impl MemorySubscription {
    /// The next delivery. Safe to cancel, as the serve loop's `select!`
    /// does whenever another of its branches wins: a delivery taken while
    /// the replica is stalled is kept here, not dropped with the wait (a
    /// request then answered "unavailable", an event lost: a stalled
    /// process runs nothing, so the simulator must not lose it either).
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        if self.held.is_none() {
            self.bus.pass().await;
            self.held = self.rx.recv().await;
        }
        // Stalled while it waited: taken when the replica wakes.
        self.bus.pass().await;
        self.held.take()
    }

    /// A delivery already waiting, without building [`next`]'s future
    /// (see `NatsSubscription::ready_now`): `Some(None)` when none waits,
    /// and `None` on a gated bus (the fault simulator's), where
    /// [`next`](Self::next) decides.
    pub(crate) fn ready_now(&mut self, cx: &mut std::task::Context<'_>) -> Option<Option<Delivery>> {
        if self.held.is_some() || self.bus.gate.is_some() {
            return None;
        }
        Some(match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(d) => d,
            std::task::Poll::Pending => None,
        })
    }

    /// Leaves the routes at once (the bus is in this process, so nothing is
    /// in flight); what is buffered is still returned.
    pub(crate) fn drain(&mut self) {
        if !self.removed {
            self.removed = true;
            self.bus.remove(&self.subject, self.id);
        }
        self.rx.close();
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        if !self.removed {
            self.bus.remove(&self.subject, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(subject: &str, group: Option<&str>) -> SubscribeTo {
        SubscribeTo {
            subject: subject.into(),
            queue_group: group.map(Into::into),
        }
    }

    fn count(s: &mut MemorySubscription) -> usize {
        let mut n = 0;
        while s.rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// The serve loop drops a wait for the next message whenever another
    /// branch of its `select!` wins (a handler finishing): a delivery
    /// taken while the replica is stalled must still come when it wakes.
    #[tokio::test]
    async fn a_delivery_taken_during_a_stall_survives_a_dropped_wait() {
        let bus = MemoryBus::new();
        let gate = Arc::new(crate::stall::Gate::new());
        let replica = bus.gated(Arc::clone(&gate));
        let mut sub = replica.subscribe(&to("s", None)).expect("sub");
        {
            use std::future::Future;
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let mut next = Box::pin(sub.next());
            assert!(next.as_mut().poll(&mut cx).is_pending(), "nothing yet");
            bus.publish(&"s".into(), HeaderMap::new(), Bytes::from_static(b"x"))
                .expect("publish");
            gate.set(true);
            assert!(
                next.as_mut().poll(&mut cx).is_pending(),
                "taken, and held while stalled"
            );
        }
        gate.set(false);
        let d = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .expect("the delivery taken during the stall comes when the replica wakes")
            .expect("a delivery");
        assert_eq!(&d.payload[..], b"x");
    }

    #[tokio::test]
    async fn queue_groups_get_one_copy_plain_subscribers_all() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe(&to("s", Some("g"))).expect("sub");
        let mut b = bus.subscribe(&to("s", Some("g"))).expect("sub");
        let mut c = bus.subscribe(&to("s", None)).expect("sub");
        for _ in 0..10 {
            bus.publish(&"s".into(), HeaderMap::new(), Bytes::from_static(b"x"))
                .expect("publish");
        }
        let (na, nb, nc) = (count(&mut a), count(&mut b), count(&mut c));
        assert_eq!(na + nb, 10);
        assert_eq!((na, nb), (5, 5), "round robin");
        assert_eq!(nc, 10);
        c.drain();
        assert!(c.next().await.is_none());
    }

    #[tokio::test]
    async fn request_without_subscriber_fails_fast() {
        let bus = MemoryBus::new();
        let err = bus
            .request(
                &"nobody".into(),
                HeaderMap::new(),
                Bytes::new(),
                Deadline::after(Duration::from_secs(5)),
                Duration::from_secs(5),
            )
            .await
            .err()
            .expect("no responders");
        assert_eq!(err.kind(), ErrorKind::NoHandler);
        assert!(err.message().contains("no handler for subject nobody"));
    }

    #[tokio::test]
    async fn oversized_messages_are_refused() {
        let bus = MemoryBus::with_max_payload(10);
        let _s = bus.subscribe(&to("s", None)).expect("sub");
        let err = bus
            .publish(&"s".into(), HeaderMap::new(), Bytes::from(vec![0u8; 11]))
            .expect_err("too large");
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(!err.is_retryable());
    }

    /// What is waiting is taken at once, in order, as `next` takes it;
    /// then "none now"; after a drain, what was buffered and then the
    /// end, which `next` sees too.
    #[tokio::test]
    async fn ready_deliveries_are_taken_without_waiting() {
        let bus = MemoryBus::new();
        let mut s = bus.subscribe(&to("s", None)).expect("sub");
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(matches!(s.ready_now(&mut cx), Some(None)), "nothing waits yet");
        for i in 0..3u8 {
            bus.publish(&"s".into(), HeaderMap::new(), Bytes::from(vec![i]))
                .expect("publish");
        }
        for i in 0..2u8 {
            let d = s.ready_now(&mut cx).flatten().expect("waiting");
            assert_eq!(d.split().0.payload, Bytes::from(vec![i]));
        }
        assert!(matches!(s.ready_now(&mut cx), Some(Some(_))), "the third");
        assert!(matches!(s.ready_now(&mut cx), Some(None)));
        bus.publish(&"s".into(), HeaderMap::new(), Bytes::from_static(b"last"))
            .expect("publish");
        s.drain();
        assert!(
            s.ready_now(&mut cx).flatten().is_some(),
            "buffered before the drain"
        );
        assert!(matches!(s.ready_now(&mut cx), Some(None)), "then the end");
        assert!(s.next().await.is_none(), "which next sees too");
        // On a gated bus (the simulator's), `next` decides.
        let gated = bus.gated(Arc::new(crate::stall::Gate::new()));
        let mut g = gated.subscribe(&to("g", None)).expect("sub");
        assert!(g.ready_now(&mut cx).is_none());
    }

    #[tokio::test]
    async fn a_dropped_request_answers_unavailable() {
        let bus = MemoryBus::new();
        let mut s = bus.subscribe(&to("s", Some("g"))).expect("sub");
        let subject: Subject = "s".into();
        let req = bus.request(
            &subject,
            HeaderMap::new(),
            Bytes::new(),
            Deadline::after(Duration::from_secs(5)),
            Duration::from_secs(5),
        );
        let drop_it = async {
            let d = s.next().await.expect("delivered");
            drop(d);
        };
        let (reply, ()) = tokio::join!(req, drop_it);
        let reply = reply.expect("an error reply, not a time-out");
        let err = crate::wire::errors::decode(reply.headers.as_ref(), &reply.payload, "s").expect("error");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
}
