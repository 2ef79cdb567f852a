//! catga's own request inbox: one wildcard subscription for every reply
//! and a map of the requests waiting, by sequence number. async-nats keeps
//! an entry per request until a reply arrives, so every unanswered request
//! leaked one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::{Inner, NatsTransport};
use crate::transport::SubscribeTo;

/// The requests waiting for a reply, by sequence number. Replies arrive on
/// one wildcard subscription (`<inbox>.>`); an entry leaves the map on its
/// reply or when its sender stops waiting.
pub(super) struct Inbox {
    /// `_INBOX.<nuid>.` (with the client's inbox prefix).
    pub(super) prefix: String,
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<async_nats::Message>>>,
    pub(super) next: AtomicU64,
}

impl Inbox {
    pub(super) fn register(self: &Arc<Self>) -> (u64, Pending) {
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

    pub(super) fn complete(&self, msg: async_nats::Message) {
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
    pub(super) fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// One waiting request; leaving the map on drop is what keeps unanswered
/// requests from piling up.
pub(super) struct Pending {
    pub(super) inbox: Arc<Inbox>,
    pub(super) seq: u64,
    pub(super) rx: oneshot::Receiver<async_nats::Message>,
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

/// Reads the inbox subscription and hands each reply to its request; if
/// the subscription ends while the client lives, subscribes it again.
pub(super) async fn dispatch_replies(
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
