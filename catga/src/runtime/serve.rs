//! The serve loop of one subscription: takes every message at once, runs
//! up to `concurrency` of them through the [pipeline](super::pipeline) at a
//! time on this task, queues up to `capacity` more (and up to
//! `capacity_bytes` of them) and drops (and counts) the rest; resubscribes
//! when the subscription ends unexpectedly; drains on stop.
//!
//! The handlers of one subscription share its task: they run concurrently,
//! not in parallel (no task spawn per message: that halved throughput in
//! the benchmark). A plain handler's message is run in place as it is
//! taken, and joins the set in flight only if its handler or its answer
//! does not finish at its first poll (see `pipeline::process_in_place`).
//! `parallel = N` gives a handler N subscriptions, each on its own task,
//! which the runtime spreads over the cores.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::served::Served;
use super::{Shared, pipeline};
use crate::error::{Error, ErrorKind};
use crate::registry::HandlerKind;
use crate::transport::{Delivery, Subscription};

/// How a serve loop ended.
pub(crate) struct ServeReport {
    /// The broker confirmed that nothing more was on its way when the
    /// subscription closed (see `NatsSubscription::drain`).
    pub handover_confirmed: bool,
}

/// Unexpected ends within this window make the resubscription back off
/// further.
const FLAP_WINDOW: Duration = Duration::from_secs(60);

/// Serves `first`, a subscription of `served` (or subscribes first, for a
/// durable handler), until `stop` turns true (then drains) or a fatal
/// error.
pub(crate) async fn serve(
    served: Arc<Served>,
    shared: Arc<Shared>,
    first: Option<Subscription>,
    mut stop: watch::Receiver<bool>,
    slot: Option<super::ready::ElectiveSlot>,
) -> ServeReport {
    let served = &*served;
    let shared = &*shared;
    // A plain handler's message runs in place, on this loop's poll, and
    // only what it leaves pending joins the set in flight (see
    // `pipeline::process_in_place`); any other message runs in the set.
    // What is left pending was first polled with this task's waker: the
    // set polls it again with its own at once, as `push` marks a new
    // entry ready, so no wake-up is lost (this task's is only spurious).
    let in_place = pipeline::runs_in_place(served);
    // Pushes what is left itself: returning an `Option` of a future as
    // large as a message's was a 2.8 KB copy per message, `None` or not.
    let begin = |d: Delivery, cx: &mut std::task::Context<'_>, inflight: &mut FuturesUnordered<_>| {
        if in_place {
            if let Some(rest) = pipeline::process_in_place(served, shared, d, cx) {
                inflight.push(Either::Right(rest));
            }
        } else {
            inflight.push(Either::Left(pipeline::process(served, shared, d)));
        }
    };
    let mut again = Resubscribe::new(first.is_none());
    let mut sub = first;
    let mut inflight = FuturesUnordered::new();
    let mut intake = Intake::default();
    let mut draining = false;
    let mut handover_confirmed = true;
    // What is served under a lease has its own place in readiness (its
    // slot, taken by `spawn_served` before this loop runs); the rest
    // counts subscriptions wanted and live (see `Health`).
    if sub.is_some()
        && let Some(slot) = &slot
    {
        slot.live();
    }
    // One stop future for the whole loop: making a new `changed()` future
    // on every message would register and unregister a waiter each time.
    let stopped = async move {
        // An error means the runtime is gone: stop as well.
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        if inflight.len() < served.limit && !intake.is_empty() {
            let mut begun = 0;
            std::future::poll_fn(|cx| {
                while inflight.len() < served.limit && begun < BATCH {
                    match intake.next() {
                        Some(d) => begin(d, cx, &mut inflight),
                        None => break,
                    }
                    begun += 1;
                }
                Poll::Ready(())
            })
            .await;
            // Messages run in place leave room behind them: a full queue
            // (8,192 by default) would otherwise be run in one poll of this
            // task, holding its worker from every other task meanwhile.
            // Nothing else here waits on the queue, so come straight back.
            // The set in flight is collected first: its finished handlers
            // would hold their slots until the queue is empty.
            if begun == BATCH && !intake.is_empty() && inflight.len() < served.limit {
                while let Some(Some(())) = inflight.next().now_or_never() {}
                tokio::task::yield_now().await;
                continue;
            }
        }
        if draining && sub.is_none() && intake.is_empty() && inflight.is_empty() {
            break;
        }
        // A durable consumer keeps what is not taken: take only what can
        // run now, and nothing while the breaker is open (messages stay in
        // the stream instead of burning deliveries). A drained consumer
        // hands out nothing more, only its end: waiting for the breaker
        // then held the shutdown until the breaker closed (the fault
        // simulator's seed 73 of the bank: a drain cut off at its 2 s
        // deadline by a breaker open for 5 s).
        let durable = sub.as_ref().is_some_and(Subscription::is_durable);
        let breaker_wait = if durable && !draining {
            served.breaker.is_open()
        } else {
            None
        };
        let take = sub.is_some() && (!durable || (inflight.len() < served.limit && breaker_wait.is_none()));
        if sub.is_none() && inflight.is_empty() && shared.health.fatal().is_some() {
            break;
        }
        tokio::select! {
            biased;
            () = &mut stopped, if !draining => {
                draining = true;
                again.at = None;
                if let Some(slot) = &slot {
                    slot.leave();
                }
                if let Some(s) = sub.as_mut() {
                    s.drain().await;
                }
            }
            Some(()) = inflight.next(), if !inflight.is_empty() => {
                // Collect every other handler that finished meanwhile,
                // without going around the select for each.
                while let Some(Some(())) = inflight.next().now_or_never() {}
            }
            // Lazily: select! builds every branch's future, enabled or
            // not, and a `sleep` reads the clock and sets up a timer.
            () = sleep_for(breaker_wait), if breaker_wait.is_some() => {}
            msg = next(&mut sub), if take => match msg {
                Some(d) => {
                    let mut first = Some(d);
                    std::future::poll_fn(|cx| {
                        if let Some(d) = first.take() {
                            let on = (served, shared);
                            take_waiting(d, &mut sub, &mut intake, &mut inflight, (&begin, cx), on, durable);
                        }
                        Poll::Ready(())
                    })
                    .await;
                }
                None => {
                    if let Some(ended) = sub.take() {
                        handover_confirmed &= ended.handover_confirmed();
                    }
                    match &slot {
                        Some(slot) if !draining => slot.lost(),
                        Some(_) => {}
                        None => shared.health.unsubscribed(),
                    }
                    if !draining {
                        again.after_end(served);
                    }
                }
            },
            () = sleep_until(again.at), if again.at.is_some() && !draining => {
                again.at = None;
                sub = again.subscribe(served, shared).await;
                if sub.is_some() {
                    match &slot {
                        Some(slot) => slot.live(),
                        None => shared.health.subscribed(),
                    }
                }
            }
        }
    }
    intake.drops.flush(served);
    ServeReport { handover_confirmed }
}

/// Takes `first` (begun now if there is room, else queued or dropped),
/// then what else is already waiting on `sub`, up to a batch, without
/// going around the serve loop's select for each message (its branches
/// cost more than a message's handling in an event burst). A durable
/// consumer takes only what can run now.
fn take_waiting<F, B>(
    first: Delivery,
    sub: &mut Option<Subscription>,
    intake: &mut Intake,
    inflight: &mut FuturesUnordered<F>,
    (begin, cx): (&B, &mut std::task::Context<'_>),
    (served, shared): (&Served, &Shared),
    durable: bool,
) where
    B: Fn(Delivery, &mut std::task::Context<'_>, &mut FuturesUnordered<F>),
{
    let mut taken = Some(first);
    let mut batch = 0;
    while let Some(d) = taken.take() {
        let room = inflight.len() < served.limit;
        if let Some(d) = intake.take(d, served, shared, room) {
            begin(d, cx, inflight);
        }
        batch += 1;
        if batch == BATCH || (durable && inflight.len() >= served.limit) {
            break;
        }
        taken = sub.as_mut().and_then(|s| s.ready_now(cx));
    }
}

/// When to subscribe again, and how often it went wrong lately.
struct Resubscribe {
    /// When to try next; `None` while subscribed (or draining).
    at: Option<tokio::time::Instant>,
    /// Failed attempts in a row to bind a durable consumer.
    setup_failures: u32,
    /// Unexpected ends within [`FLAP_WINDOW`].
    ends: VecDeque<Instant>,
}

impl Resubscribe {
    /// `now`: subscribe at once (a durable handler starts without a
    /// subscription).
    fn new(now: bool) -> Self {
        Resubscribe {
            at: now.then(tokio::time::Instant::now),
            setup_failures: 0,
            ends: VecDeque::new(),
        }
    }

    /// The subscription ended unexpectedly: logs it and schedules the
    /// next attempt, backing off when it keeps ending.
    fn after_end(&mut self, served: &Served) {
        let now = Instant::now();
        self.ends.push_back(now);
        while self
            .ends
            .front()
            .is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW)
        {
            self.ends.pop_front();
        }
        tracing::error!(
            subject = %served.to.subject,
            handler = served.spec.name(),
            recent_ends = self.ends.len(),
            "the subscription ended unexpectedly; subscribing again"
        );
        // Back off when it keeps ending: 100 ms, doubling per end within
        // the window, up to 3.2 s.
        let backoff = Duration::from_millis(100 << (self.ends.len() - 1).min(5));
        self.at = Some(tokio::time::Instant::now() + backoff);
    }

    /// Subscribes again. A durable handler that cannot bind yet retries
    /// later; any other failure is fatal for the replica.
    async fn subscribe(&mut self, served: &Served, shared: &Shared) -> Option<Subscription> {
        match served.subscribe(shared).await {
            Ok(s) => {
                if self.setup_failures > 0 || !self.ends.is_empty() {
                    tracing::info!(subject = %served.to.subject, "subscribed again");
                }
                self.setup_failures = 0;
                Some(s)
            }
            // A durable consumer needs JetStream to answer: keep trying
            // while the broker is away (not ready meanwhile).
            Err(e) if served.durable.is_some() => {
                self.setup_failures += 1;
                tracing::warn!(
                    error = %e,
                    subject = %served.to.subject,
                    attempt = self.setup_failures,
                    "cannot bind the durable consumer yet; retrying"
                );
                let pause = Duration::from_millis(200 << self.setup_failures.min(4));
                self.at = Some(tokio::time::Instant::now() + pause);
                None
            }
            // Subscribing fails only when no client can be made (the
            // transport replaces a dead one): the replica cannot serve;
            // stop, so that it is restarted.
            Err(e) => {
                shared.health.set_fatal(&Error::new(
                    ErrorKind::Transport,
                    format!("cannot subscribe to {} again: {}", served.to.subject, e.message()),
                ));
                None
            }
        }
    }
}

async fn next(sub: &mut Option<Subscription>) -> Option<Delivery> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// What a serve loop takes beyond what runs: the queue (bounded in
/// messages and bytes), and the log of what it dropped.
#[derive(Default)]
struct Intake {
    queue: VecDeque<Delivery>,
    /// What the queue holds, in bytes (payloads and headers).
    bytes: usize,
    drops: DropLog,
}

impl Intake {
    /// Takes one delivery: returns it when it may run now (`room`),
    /// queues it while the queue has room, drops (and counts) it
    /// otherwise; a dropped request is answered "unavailable" at once.
    fn take(&mut self, d: Delivery, served: &Served, shared: &Shared, room: bool) -> Option<Delivery> {
        let d = if served.spec.kind() == HandlerKind::Event {
            d.unanswered()
        } else {
            d
        };
        if room {
            return Some(d);
        }
        let size = size_of(&d);
        if self.queue.len() < served.capacity
            && (self.queue.is_empty() || self.bytes + size <= served.capacity_bytes)
        {
            self.bytes += size;
            self.queue.push_back(d);
            return None;
        }
        shared.count_dropped();
        served.metrics.dropped.increment(1);
        self.drops.record(served);
        if d.expects_reply() {
            let (_, settler) = d.split();
            settler.refuse_now(
                &Error::new(ErrorKind::Unavailable, "the replica is over capacity; retry").exposed(),
            );
        }
        None
    }

    /// The oldest queued delivery.
    fn next(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(size_of(&d));
        Some(d)
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// What a queued message weighs against `CATGA_SUBSCRIPTION_BYTES`.
fn size_of(d: &Delivery) -> usize {
    crate::transport::memory::wire_size(d.headers.as_ref(), d.payload.len())
}

/// Messages taken in one go when several are waiting.
const BATCH: usize = 64;

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Logs drops without flooding: the first at once, then a count at most
/// once a second.
#[derive(Default)]
struct DropLog {
    unlogged: u64,
    last: Option<Instant>,
}

impl DropLog {
    fn record(&mut self, served: &Served) {
        self.unlogged += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.flush(served);
        }
    }

    fn flush(&mut self, served: &Served) {
        if self.unlogged > 0 {
            tracing::warn!(
                subject = %served.to.subject,
                handler = served.spec.name(),
                dropped = self.unlogged,
                in_flight_limit = served.limit,
                capacity = served.capacity,
                capacity_bytes = served.capacity_bytes,
                "slow consumer: the subscription is full, messages dropped"
            );
        }
        self.unlogged = 0;
        self.last = Some(Instant::now());
    }
}
