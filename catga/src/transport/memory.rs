//! The embedded in-memory bus: one process, NATS semantics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Headers, Incoming, Reply, ReplyTo, Subject};
use crate::error::{Error, ErrorKind, Result};

/// Default number of messages a subscription buffers before it drops (and
/// counts) further ones, like a NATS slow consumer.
pub const DEFAULT_CAPACITY: usize = 8192;

/// An in-process message bus. Clone it to connect several runtimes and
/// clients in one process (each clone is the same bus).
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<BusInner>,
}

#[derive(Default)]
struct BusInner {
    state: Mutex<BusState>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct BusState {
    subjects: HashMap<String, Vec<Entry>>,
    round_robin: u64,
}

struct Entry {
    id: u64,
    queue_group: Option<String>,
    capacity: usize,
    tx: mpsc::Sender<Incoming>,
}

/// The reply slot of an in-memory request: the first answer wins, as with NATS.
#[derive(Clone)]
pub(crate) struct ReplySlot(Arc<Mutex<Option<oneshot::Sender<Reply>>>>);

impl ReplySlot {
    pub(crate) fn send(&self, reply: Reply) {
        let sender = lock(&self.0).take();
        if let Some(tx) = sender {
            // The requester may have given up (time-out); nothing to do then.
            let _ = tx.send(reply);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the bus state half-updated
    // (every critical section is a single insert/remove/lookup), so the
    // poisoned value is still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> MemoryBus {
        MemoryBus::default()
    }

    /// Messages dropped because a subscription was over capacity.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn subscribe(&self, subject: &str, queue_group: Option<&str>) -> MemorySubscription {
        self.subscribe_with_capacity(subject, queue_group, DEFAULT_CAPACITY)
    }

    pub(crate) fn subscribe_with_capacity(
        &self,
        subject: &str,
        queue_group: Option<&str>,
        capacity: usize,
    ) -> MemorySubscription {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.state)
            .subjects
            .entry(subject.to_owned())
            .or_default()
            .push(Entry {
                id,
                queue_group: queue_group.map(str::to_owned),
                capacity,
                tx,
            });
        MemorySubscription {
            rx,
            bus: self.clone(),
            subject: subject.to_owned(),
            id,
            removed: false,
        }
    }

    fn remove(&self, subject: &str, id: u64) {
        let mut state = lock(&self.inner.state);
        if let Some(entries) = state.subjects.get_mut(subject) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                state.subjects.remove(subject);
            }
        }
    }

    /// Picks the receivers of one message: every plain subscriber and one
    /// member of each queue group (round-robin).
    fn targets(&self, subject: &str) -> Vec<(mpsc::Sender<Incoming>, usize)> {
        let mut state = lock(&self.inner.state);
        state.round_robin = state.round_robin.wrapping_add(1);
        let turn = state.round_robin;
        let Some(entries) = state.subjects.get_mut(subject) else {
            return Vec::new();
        };
        entries.retain(|e| !e.tx.is_closed());
        let mut out = Vec::new();
        let mut groups: Vec<(&str, Vec<&Entry>)> = Vec::new();
        for e in entries.iter() {
            match &e.queue_group {
                None => out.push((e.tx.clone(), e.capacity)),
                Some(g) => match groups.iter_mut().find(|(name, _)| *name == g.as_str()) {
                    Some((_, members)) => members.push(e),
                    None => groups.push((g.as_str(), vec![e])),
                },
            }
        }
        for (_, members) in groups {
            // Prefer a member with room, starting at this message's turn.
            let n = members.len();
            let start = (turn % n as u64) as usize;
            let pick = (0..n)
                .map(|i| members[(start + i) % n])
                .find(|e| e.tx.capacity() > 0)
                .unwrap_or(members[start]);
            out.push((pick.tx.clone(), pick.capacity));
        }
        out
    }

    fn deliver(&self, tx: &mpsc::Sender<Incoming>, capacity: usize, msg: Incoming) -> bool {
        match tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(m)) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    subject = %m.subject,
                    capacity,
                    "slow consumer: subscription is full, message dropped"
                );
                false
            }
            // Closed between lookup and send: the subscriber is gone.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub(crate) fn publish(&self, subject: &Subject, headers: Headers, payload: Bytes) -> Result<()> {
        for (tx, capacity) in self.targets(subject) {
            let msg = Incoming {
                subject: subject.clone(),
                headers: (!headers.is_empty()).then(|| headers.clone()),
                payload: payload.clone(),
                reply: None,
            };
            self.deliver(&tx, capacity, msg);
        }
        Ok(())
    }

    pub(crate) async fn request(
        &self,
        subject: &Subject,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply> {
        let targets = self.targets(subject);
        if targets.is_empty() {
            return Err(no_handler(subject));
        }
        let (tx, rx) = oneshot::channel();
        let slot = ReplySlot(Arc::new(Mutex::new(Some(tx))));
        let mut delivered = false;
        for (target, capacity) in targets {
            let msg = Incoming {
                subject: subject.clone(),
                headers: (!headers.is_empty()).then(|| headers.clone()),
                payload: payload.clone(),
                reply: Some(ReplyTo::Memory(slot.clone())),
            };
            delivered |= self.deliver(&target, capacity, msg);
        }
        drop(slot);
        if !delivered {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("every handler of subject {subject} is over capacity"),
            ));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // Every receiver dropped the request without answering: it was
            // drained during shutdown.
            Ok(Err(_)) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the handler of subject {subject} went away before answering"),
            )),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no reply on subject {subject} within {timeout:?}"),
            )),
        }
    }
}

pub(crate) fn no_handler(subject: &str) -> Error {
    Error::new(ErrorKind::NoHandler, format!("no handler for subject {subject}"))
}

/// A subscription on the in-memory bus.
pub(crate) struct MemorySubscription {
    rx: mpsc::Receiver<Incoming>,
    bus: MemoryBus,
    subject: String,
    id: u64,
    removed: bool,
}

impl MemorySubscription {
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    pub(crate) fn drain(&mut self) {
        if !self.removed {
            self.removed = true;
            self.bus.remove(&self.subject, self.id);
        }
        // Buffered messages are still returned; `recv` yields `None` after them.
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

    fn headers() -> Headers {
        Headers::new()
    }

    #[tokio::test]
    async fn queue_groups_get_one_copy_plain_subscribers_all() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe("s", Some("g"));
        let mut b = bus.subscribe("s", Some("g"));
        let mut c = bus.subscribe("s", None);
        for _ in 0..10 {
            bus.publish(&"s".into(), headers(), Bytes::from_static(b"x"))
                .expect("publish");
        }
        let (mut na, mut nb, mut nc) = (0, 0, 0);
        while a.rx.try_recv().is_ok() {
            na += 1;
        }
        while b.rx.try_recv().is_ok() {
            nb += 1;
        }
        while c.rx.try_recv().is_ok() {
            nc += 1;
        }
        assert_eq!(na + nb, 10);
        assert!(na > 0 && nb > 0, "round robin: {na} {nb}");
        assert_eq!(nc, 10);
        c.drain();
        assert!(c.next().await.is_none());
    }

    #[tokio::test]
    async fn request_without_subscriber_fails_fast() {
        let bus = MemoryBus::new();
        let err = bus
            .request(&"nobody".into(), headers(), Bytes::new(), Duration::from_secs(5))
            .await
            .err()
            .expect("no responders");
        assert_eq!(err.kind(), ErrorKind::NoHandler);
        assert!(err.message().contains("no handler for subject nobody"));
    }

    #[tokio::test]
    async fn request_to_a_full_subscription_fails_fast_and_counts() {
        let bus = MemoryBus::new();
        let _s = bus.subscribe_with_capacity("s", Some("g"), 1);
        bus.publish(&"s".into(), headers(), Bytes::new())
            .expect("fills the buffer");
        let err = bus
            .request(&"s".into(), headers(), Bytes::new(), Duration::from_secs(5))
            .await
            .err()
            .expect("over capacity");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.is_retryable());
        assert_eq!(bus.dropped(), 1);
    }

    #[tokio::test]
    async fn full_subscription_drops_and_counts() {
        let bus = MemoryBus::new();
        let _s = bus.subscribe_with_capacity("s", None, 1);
        bus.publish(&"s".into(), headers(), Bytes::new())
            .expect("publish");
        bus.publish(&"s".into(), headers(), Bytes::new())
            .expect("publish");
        assert_eq!(bus.dropped(), 1);
    }
}
