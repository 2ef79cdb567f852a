//! A core NATS subscription and the answers to its requests: the drain
//! with a counted unsubscribe (async-nats' `Subscriber::drain` forgets the
//! subscription before the server confirms the unsubscribe and drops what
//! the server sent meanwhile).

use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::{NatsTransport, publish_error};
use crate::error::{ErrorKind, Result};
use crate::transport::{Delivery, ReplyTo};
use crate::wire::deadline;

/// Where a NATS request's answer goes.
pub(crate) struct NatsReply {
    pub(super) transport: NatsTransport,
    pub(super) to: Subject,
}

/// How long a reply may wait for room in the client's queue.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

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
pub(super) struct Rate {
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
pub(super) enum DrainState {
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
pub(super) const MIN_SLACK: u64 = 64;
/// How long the hand-over waits for its count before it unsubscribes
/// plainly.
pub(super) const HANDOVER_WAIT: Duration = Duration::from_secs(1);

/// A NATS subscription.
pub(crate) struct NatsSubscription {
    pub(super) sub: async_nats::Subscriber,
    pub(super) subject: String,
    pub(super) transport: NatsTransport,
    /// Messages taken from the subscription so far.
    pub(super) read: u64,
    pub(super) rate: Rate,
    pub(super) drain: DrainState,
    /// A message read ahead while deciding whether the subject was idle.
    pub(super) ahead: Option<Box<async_nats::Message>>,
}

impl NatsSubscription {
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            let msg = match (self.ahead.take(), self.drain) {
                (Some(m), _) => Some(*m),
                // Boxed: its futures (a round trip, an unsubscribe) would
                // make every message's `next` as large, and the serve loop
                // moves one per message (7.5 KB before, in the fan-out
                // bench's profile the largest memcpy).
                (None, DrainState::HandingOver { until, read }) => {
                    match Box::pin(self.next_handing_over(until, read)).await {
                        Some(msg) => msg,
                        None => continue,
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
            return Some(self.delivery(msg));
        }
    }

    /// A message already waiting, taken without building [`next`]'s
    /// future (the serve loop takes a batch this way: in the fan-out
    /// bench's profile, building and moving that future per message was
    /// about 2 % of the workers' samples, of the 6 % the serve loop spent
    /// copying): `Some(None)` when none waits, and
    /// `None` outside plain serving (a hand-over, a message kept ahead),
    /// where [`next`](Self::next) decides.
    pub(crate) fn ready_now(&mut self, cx: &mut std::task::Context<'_>) -> Option<Option<Delivery>> {
        use futures_util::Stream;
        if self.ahead.is_some() || !matches!(self.drain, DrainState::Serving) {
            return None;
        }
        Some(match std::pin::Pin::new(&mut self.sub).poll_next(cx) {
            std::task::Poll::Ready(Some(msg)) => Some(self.delivery(msg)),
            // An end is left for `next` to see again (the subscriber keeps
            // answering `None`).
            std::task::Poll::Ready(None) | std::task::Poll::Pending => None,
        })
    }

    /// What the serve loop gets of `msg`, counted as read.
    fn delivery(&mut self, msg: async_nats::Message) -> Delivery {
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
        Delivery::new(msg.subject, msg.headers, msg.payload, deadline, reply).tracked(self.transport.tap())
    }

    /// The next message while handing over (see [`drain`](Self::drain)):
    /// `Some` with what the subscription gave, or `None` once the wait
    /// ended without one (look again: the state moved on).
    async fn next_handing_over(
        &mut self,
        until: tokio::time::Instant,
        read: u64,
    ) -> Option<Option<async_nats::Message>> {
        tokio::select! {
            msg = self.sub.next() => Some(msg),
            () = tokio::time::sleep_until(until) => {
                // Nothing arrived for the whole wait. Whatever the server
                // routed here before now arrives ahead of a round trip:
                // look once more before calling the subject idle.
                if self.read == read {
                    let _ = self.transport.round_trip(HANDOVER_WAIT).await;
                    if let Some(Some(m)) = self.sub.next().now_or_never() {
                        self.ahead = Some(Box::new(m));
                        self.drain = DrainState::HandingOver {
                            until: tokio::time::Instant::now() + HANDOVER_WAIT,
                            read: u64::MAX,
                        };
                        return None;
                    }
                }
                self.unsubscribe_plainly().await;
                None
            }
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
