//! The path of one message, from the transport to the handler and back.
//! Every step is a small function below, called in this order by
//! [`process`] (through [`steps`]):
//!
//! 1. [`read`]: the headers become the message's identity ([`MessageMeta`]).
//! 2. [`check_deliveries`]: a durable message delivered more often than
//!    `max_deliver` without being settled is dead-lettered;
//!    [`check_id`]: an id that cannot be used is refused;
//!    [`check_version`]: a payload newer than the handler knows is refused.
//! 3. [`check_deadline`]: a request whose sender stopped waiting is not
//!    started (it may already have been retried elsewhere).
//! 4. [`claim`]: an idempotent handler takes the message's id in the inbox
//!    (bound to the payload's digest),
//!    or finds the answer it gave before, or finds it in progress.
//! 5. [`admit`]: the handler's circuit breaker lets it through, or not.
//! 6. [`call`]: the handler runs inside its span (a panic is caught); an
//!    idempotent handler's writes commit with its answer; a retryable
//!    failure is retried up to `retry = N` times ([`call_with_retries`]).
//! 7. [`record`]: the breaker learns how it went.
//! 8. [`release`]: the inbox keeps the answer (only while the claim is
//!    this attempt's), or lets a retry run it.
//! 9. [`conclude`]: the outcome becomes the answer: a reply, an error reply
//!    (5xx texts logged under an error id), an ack, a redelivery later, or a
//!    dead letter; [`Settler::settle`](crate::transport::Settler::settle)
//!    sends it.
//!
//! A step that ends the path early returns the [`Outcome`] to settle with.
//!
//! A plain handler (not idempotent, not durable, no partition, no
//! retries, not a saga or a job: nothing to await but the handler and its
//! answer) takes the same steps in [`process_in_place`], on the serve
//! loop's own poll.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tracing::Instrument;

use super::Shared;
use super::served::Served;
use crate::client::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::metrics::Ended;
use crate::registry::{HandlerKind, HandlerSpec};
use crate::resilience::{Admit, backoff};
use crate::store::{
    Answer, Claim as InboxClaim, Committed, Finished, Home, Inbox, InboxWrite, StoredReply, Work,
};
use crate::transport::{DeadLetter, Delivery, Settle, Settler};
use crate::wire::{self, MessageMeta};

/// How a message ended.
pub(crate) enum Outcome {
    /// The handler succeeded with this reply body.
    Done(Bytes),
    /// The handler answered this message before: the same answer.
    Answered(StoredReply),
    /// The message failed.
    Failed(Error),
    /// Another attempt holds it right now (idempotent handlers).
    Busy,
    /// The sender stopped waiting before the handler started.
    Expired,
}

/// Runs one message down the path (see the module documentation).
pub(crate) async fn process(served: &Served, shared: &Shared, delivery: Delivery) {
    let (incoming, settler) = delivery.split();
    let (meta, span, payload) = identify(served, incoming);
    let started = served.metrics.start();
    async move {
        // This future is moved once per message by the serve loop (into
        // its set of futures in flight): its size is a memcpy per message,
        // 7.5 KB for a `Subscription::next` and 3.6 KB for this one in the
        // fan-out bench's profile, its largest cost after the broker
        // client's. So `work` is pinned in place and awaited through the
        // pin on both paths (a `work.await` by value kept a second slot
        // as large), in a block of its own (ended before the settle, whose
        // future then takes the same room), and the rare paths of the
        // steps are boxed.
        let outcome = {
            let work = steps(served, shared, &meta, payload.clone());
            tokio::pin!(work);
            match served.progress {
                None => work.await,
                // A keyed saga's consumers have a short ack wait (a delivery
                // lost in a hand-over comes back soon) and one message in
                // flight (a redelivery while it runs would be the next one's
                // turn): tell the broker the message is still being handled.
                Some(every) => {
                    loop {
                        tokio::select! {
                            outcome = &mut work => break outcome,
                            () = tokio::time::sleep(every) => {
                                if let Err(e) = settler.progress().await {
                                    tracing::debug!(error = %e, "progress ack not sent");
                                }
                            }
                        }
                    }
                }
            }
        };
        let mut ended = ended(&outcome);
        let wait = matches!(&outcome, Outcome::Failed(e) if e.retry_after().is_some());
        let settle = conclude(served, shared, &meta, &payload, outcome);
        if wait && matches!(settle, Settle::Retry { .. }) {
            // Given back to come back when its timer is due: a wait, which
            // error-rate alerts must not count as a failure.
            ended = Ended::Waiting;
        }
        let settle = match settle {
            // Boxed: rare, and its futures would make every message's
            // as large.
            Settle::Dead(mut letter) => match Box::pin(super::letters::keep_letter(shared, &mut letter))
                .await
            {
                Ok(()) => Settle::Dead(letter),
                Err(e) => {
                    tracing::warn!(error = %e, "the dead letter could not be recorded; the message comes back later");
                    Settle::Retry {
                        delay: Duration::from_secs(5),
                    }
                }
            },
            settle => settle,
        };
        let dead = matches!(settle, Settle::Dead(_));
        if matches!(settle, Settle::Retry { .. }) && served.durable.is_some() {
            served.metrics.redeliveries.increment(1);
        }
        match settler.settle(settle).await {
            // Counted once stored, not when decided.
            Ok(()) if dead && served.durable.is_some() => served.metrics.dead_letters.increment(1),
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "the answer was not sent as is"),
        }
        served.metrics.end(started, ended);
    }
    .instrument(span)
    .await
}

/// Step 1, and the message's span, linked to the sender's trace; the
/// payload.
fn identify(
    served: &Served,
    incoming: crate::transport::Incoming,
) -> (Arc<MessageMeta>, tracing::Span, Bytes) {
    let meta = Arc::new(read(
        incoming.subject,
        incoming.headers,
        incoming.deadline,
        incoming.delivered,
    ));
    let span = tracing::info_span!(
        "handle",
        handler = served.spec.name(),
        subject = meta.subject(),
        message_id = meta.message_id(),
        correlation_id = meta.correlation_id(),
        trace_id = tracing::field::Empty,
    );
    #[cfg(feature = "otlp")]
    meta.link_trace(|incoming| crate::wire::trace::otel::link(&span, incoming));
    if !span.is_disabled()
        && let Some(trace) = meta.trace_id()
    {
        span.record("trace_id", trace.as_str());
    }
    (meta, span, incoming.payload)
}

/// Whether `served`'s messages take [`process_in_place`]: a handler
/// whose path has no step to await before the handler (no inbox claim, no
/// partition permit), none after it but the answer (no durable
/// acknowledgement, no dead letter, no retry's pause), and not a saga or a
/// job: plain events and plain commands.
pub(crate) fn runs_in_place(served: &Served) -> bool {
    let spec = served.spec;
    !spec.is_idempotent()
        && !spec.is_saga()
        && spec.job().is_none()
        && spec.retries() == 0
        && served.durable.is_none()
        && served.partition.is_none()
        && served.progress.is_none()
}

/// What is left of a message after [`process_in_place`]: its handler's
/// future, polled once already, or its answer, not sent at once.
pub(crate) type Rest<'a> = tracing::instrument::Instrumented<Pending<'a>>;

/// A boxed future that finishes a message.
pub(crate) type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// How far a message got on its first poll in place.
enum First<F> {
    /// Its outcome is known (an early step ended it, or the handler
    /// finished).
    Ended(Outcome),
    /// Its handler is still running.
    Running(F),
}

/// The path of [`process`] for a handler that [`runs_in_place`], run on
/// the serve loop's own poll: the steps before the handler, one poll of
/// the handler's future and, if it finished, one of the answer's. A
/// message done there (most event handlers that update memory or hand
/// work on, a command whose reply the client's queue takes at once) never
/// enters the serve loop's set of futures in flight: no task node
/// allocated, no 2.8 KB future moved into it, no wake-up through it. The
/// fan-out profile spent 12% of its time in that set (push, poll,
/// release) and the span wrapper around each message. What is still
/// pending is returned, for that set.
///
/// Runs the same steps as [`process`], in the same order.
pub(crate) fn process_in_place<'a>(
    served: &'a Served,
    shared: &'a Shared,
    delivery: Delivery,
    cx: &mut std::task::Context<'_>,
) -> Option<Rest<'a>> {
    use std::future::Future;
    // The settler answers a command; an event's is kept until the
    // message is done, for the test kit's count of deliveries in flight.
    let (incoming, settler) = delivery.split();
    let (meta, span, payload) = identify(served, incoming);
    let started = served.metrics.start();
    let entered = span.enter();
    let early = check_id(&meta)
        .and_then(|()| check_version(served, &meta))
        .and_then(|()| check_deadline(shared, &meta))
        .and_then(|()| admit(served));
    let first = match early {
        Err(early) => First::Ended(early),
        Ok(()) => {
            let claim = Claim::None {
                home: home_of(served, shared, &meta, &payload, false),
            };
            match work_for(served, shared, &meta, &payload, &claim) {
                // A `leader` handler whose lease is gone: a failed run, as
                // in `call`, which the breaker hears of (a half-open
                // breaker's trial needs its verdict).
                Err(e) => {
                    let result = Err(e);
                    record(served, &result);
                    First::Ended(release_unclaimed(result))
                }
                Ok(work) => {
                    let ctx =
                        Context::new(shared.client.clone(), Arc::clone(&meta), work, served.spec.name());
                    // The handler's future is boxed (the registry holds
                    // function pointers), so it can be polled here and
                    // moved afterwards.
                    let mut run = AssertUnwindSafe(served.spec.call(ctx, payload.clone())).catch_unwind();
                    match std::pin::Pin::new(&mut run).poll(cx) {
                        std::task::Poll::Ready(ran) => First::Ended(ran_to_outcome(served, ran)),
                        std::task::Poll::Pending => First::Running(run),
                    }
                }
            }
        }
    };
    let rest = match first {
        First::Ended(outcome) => {
            answer_in_place(served, shared, (&meta, &payload), outcome, started, settler, cx)
        }
        First::Running(run) => Some(Box::pin(async move {
            let outcome = ran_to_outcome(served, run.await);
            let (ended, settle) = settle_of(served, shared, &meta, &payload, outcome);
            answer(served, settler, settle, started, ended).await;
        }) as Pending<'a>),
    };
    drop(entered);
    rest.map(|rest| rest.instrument(span))
}

/// What one run of a handler in place came to: as [`call`] and
/// [`release`] make it for a handler without an inbox claim, and the
/// breaker told ([`record`]).
fn ran_to_outcome(served: &Served, ran: std::thread::Result<Result<Bytes>>) -> Outcome {
    let result = handler_result(served, None, ran);
    record(served, &result);
    release_unclaimed(result)
}

/// What a handler's run (its panic caught) answers: its body, its error
/// (a nested send's failure in an event handler holding its claim as
/// [`Error::into_event_failure`] says, `sent_unrepeatable` telling whether
/// such a handler sent a command that is not idempotent, `None` for one
/// without a claim; else as the handler's own), or a panic as a `Panic`
/// error with its message.
fn handler_result(
    served: &Served,
    sent_unrepeatable: Option<bool>,
    ran: std::thread::Result<Result<Bytes>>,
) -> Result<Bytes> {
    match ran {
        Ok(Ok(body)) => Ok(body),
        // Only a handler that holds its inbox claim may run again after a
        // downstream failure that may have taken effect: its saves and
        // events wait for its commit, and what it sends goes under the
        // same ids. Any other handler's saves are made already (an
        // idempotent one's too, for a message without an id), and it
        // sends under new ids: for it, as for a command's caller, the
        // failure is its own.
        Ok(Err(e)) if served.spec.kind() == HandlerKind::Event && sent_unrepeatable.is_some() => {
            Err(e.into_event_failure(sent_unrepeatable == Some(true)))
        }
        Ok(Err(e)) => Err(e.into_handler_failure()),
        Err(panic) => Err(Error::new(
            ErrorKind::Panic,
            format!("the handler panicked: {}", crate::error::panic_message(&panic)),
        )),
    }
}

/// [`release`] of a message without an inbox claim.
fn release_unclaimed(result: Result<Bytes>) -> Outcome {
    match result {
        Ok(body) => Outcome::Done(body),
        Err(e) => Outcome::Failed(e),
    }
}

/// What a message not durable ends as: the label of its metrics, and its
/// answer ([`conclude`]).
fn settle_of(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    outcome: Outcome,
) -> (Ended, Settle) {
    let ended = ended(&outcome);
    (ended, conclude(served, shared, meta, payload, outcome))
}

/// Sends a message's answer, then counts it as ended, as [`process`] does
/// for a message that is not durable.
async fn answer(
    served: &Served,
    settler: Settler,
    settle: Settle,
    started: std::time::Instant,
    ended: Ended,
) {
    if !settler.answers() {
        // An event's: nothing to send (dropped after the count, as when
        // it ends in place).
        served.metrics.end(started, ended);
        return;
    }
    if let Err(e) = settler.settle(settle).await {
        tracing::warn!(error = %e, "the answer was not sent as is");
    }
    served.metrics.end(started, ended);
}

/// Ends a message in place: an event's at once, a command's answer polled
/// once (it is sent at once when the client's queue has room) and
/// returned if it is not sent yet.
fn answer_in_place<'a>(
    served: &'a Served,
    shared: &Shared,
    (meta, payload): (&MessageMeta, &Bytes),
    outcome: Outcome,
    started: std::time::Instant,
    settler: Settler,
    cx: &mut std::task::Context<'_>,
) -> Option<Pending<'a>> {
    let (ended, settle) = settle_of(served, shared, meta, payload, outcome);
    if !settler.answers() {
        served.metrics.end(started, ended);
        return None;
    }
    let mut sending: Pending<'a> = Box::pin(answer(served, settler, settle, started, ended));
    match sending.as_mut().poll(cx) {
        std::task::Poll::Ready(()) => None,
        std::task::Poll::Pending => Some(sending),
    }
}

/// The `outcome` label of the metrics.
fn ended(outcome: &Outcome) -> Ended {
    match outcome {
        Outcome::Done(_) => Ended::Ok,
        Outcome::Answered(_) => Ended::Answered,
        Outcome::Failed(e) => Ended::Failed(e.kind()),
        Outcome::Busy => Ended::Busy,
        Outcome::Expired => Ended::Expired,
    }
}

/// Steps 2 to 8.
async fn steps(served: &Served, shared: &Shared, meta: &Arc<MessageMeta>, payload: Bytes) -> Outcome {
    if let Err(early) = check_deliveries(served, meta)
        .and_then(|()| check_id(meta))
        .and_then(|()| check_version(served, meta))
        .and_then(|()| check_deadline(shared, meta))
    {
        return early;
    }
    // The inbox's futures are boxed, and only idempotent handlers await
    // them: inline, they made every message's future as large, which the
    // serve loop moves once per message (see `process`).
    let claim = if served.spec.is_idempotent() {
        match Box::pin(claim(served, shared, meta, &payload)).await {
            Ok(c) => c,
            Err(early) => return early,
        }
    } else {
        Claim::None {
            home: home_of(served, shared, meta, &payload, false),
        }
    };
    // Should this message's work be dropped half way (cancelled at a drain
    // deadline, its partition given up), its claim is given up in the
    // background instead of holding the message while this replica lives.
    let guard = ClaimGuard(match &claim {
        Claim::Owned {
            scope,
            id,
            claim,
            home,
            ..
        } => Some((&shared.plain_work.orphans, shard(home), scope, id, claim)),
        Claim::None { .. } => None,
    });
    if let Err(early) = admit(served) {
        release(shared, &claim, Err(Error::unavailable("not run"))).await;
        guard.disarm();
        return early;
    }
    let result = call_with_retries(served, shared, meta, &payload, &claim).await;
    record(served, &result);
    let outcome = release(shared, &claim, result).await;
    guard.disarm();
    outcome
}

/// Gives an owned claim up in the background if dropped armed.
struct ClaimGuard<'a>(
    Option<(
        &'a crate::store::Orphans,
        u32,
        &'a str,
        &'a String,
        &'a InboxClaim,
    )>,
);

impl ClaimGuard<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some((orphans, shard, scope, id, claim)) = self.0.take() {
            orphans.give_up(shard, scope, id, claim);
        }
    }
}

/// Step 1: the message's identity, read from its headers on demand.
pub(crate) fn read(
    subject: async_nats::Subject,
    headers: Option<async_nats::HeaderMap>,
    deadline: Option<wire::deadline::Deadline>,
    delivered: u64,
) -> MessageMeta {
    MessageMeta::new(subject, headers, deadline, delivered)
}

/// Step 2: a durable message delivered more often than `max_deliver`
/// was taken by replicas that stopped before settling it (crashed, were
/// cancelled at a drain deadline), or its dead letter could not be stored
/// last time: it is dead-lettered without running again. The broker does
/// not limit deliveries, so this is what ends a message that crashes every
/// replica taking it.
fn check_deliveries(served: &Served, meta: &MessageMeta) -> Result<(), Outcome> {
    let max = u64::from(served.max_deliver);
    if served.durable.is_none() || meta.delivery() <= max {
        return Ok(());
    }
    Err(Outcome::Failed(Error::new(
        ErrorKind::Internal,
        format!(
            "delivered {} times (max_deliver {max}) without being settled: the replicas that took it \
             stopped before answering, or its dead letter could not be stored",
            meta.delivery()
        ),
    )))
}

/// Step 2, too: refuses a message whose id cannot be used (too long, or not
/// visible ASCII): the ids derived from it, the inbox and the dead letters
/// need a valid one. A 250-character id reached two sagas, whose step ids
/// were then too long, and a 1 MB id of an idempotent command was kept in
/// the inbox for a day.
fn check_id(meta: &MessageMeta) -> Result<(), Outcome> {
    let refuse = |which: &str, e: Error| {
        Outcome::Failed(Error::invalid(format!(
            "the message's {which} cannot be used: {}",
            e.message()
        )))
    };
    if meta.has_sender_id() {
        wire::check_id(meta.message_id()).map_err(|e| refuse("id (Nats-Msg-Id)", e))?;
    }
    // Copied onto everything its handler sends and saves (an outbox
    // entry with a 70 KB correlation id could never be stored): the same
    // rules as ids.
    if let Some(h) = meta.headers() {
        for name in [wire::headers::CORRELATION_ID, wire::headers::CAUSATION_ID] {
            if let Some(v) = h.get(name.clone()) {
                wire::check_id(v.as_str()).map_err(|e| refuse(name.as_ref(), e))?;
            }
        }
    }
    Ok(())
}

/// Step 2, last: refuses a version newer than the handler's message type.
fn check_version(served: &Served, meta: &MessageMeta) -> Result<(), Outcome> {
    let spec = served.spec;
    wire::check_version(meta.headers(), spec.message_type(), spec.version()).map_err(Outcome::Failed)
}

/// Step 3: drops a request whose deadline passed.
fn check_deadline(shared: &Shared, meta: &MessageMeta) -> Result<(), Outcome> {
    match meta.deadline() {
        Some(d) if d.is_past() => {
            shared.count_expired();
            tracing::warn!(
                deadline_unix_ms = d.unix_ms(),
                "request not started: its sender stopped waiting (if this happens for every \
                 request, check that the clocks of the hosts agree)"
            );
            Err(Outcome::Expired)
        }
        _ => Ok(()),
    }
}

/// What the inbox step decided.
enum Claim {
    /// Not an idempotent handler, or a message without an id.
    None {
        /// The store shard of the message's key, when it has one and the
        /// store has several shards.
        home: Option<Home>,
    },
    /// This attempt owns the message's id until it releases it.
    Owned {
        scope: &'static str,
        id: String,
        claim: InboxClaim,
        /// The store shard of its inbox entry (and of its writes), with
        /// several shards.
        home: Option<Home>,
        /// Counts the attempt as this replica's while it holds the claim.
        _running: crate::store::Attempt,
    },
}

impl Claim {
    fn home(&self) -> Option<&Home> {
        match self {
            Claim::None { home } | Claim::Owned { home, .. } => home.as_ref(),
        }
    }
}

/// Where a fenced handler's (a `leader` one's, a keyed saga's) events
/// published without a save commit, with several shards: its home, else
/// the shard of the keyed saga's key (one key's events in one shard, in
/// order, whatever message published them), else the shard of its message
/// id (the events of one message in order).
fn events_home(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    claim: &Claim,
) -> Option<Home> {
    let store = &shared.store;
    if store.shard_count() <= 1 {
        return None;
    }
    if let Some(home) = claim.home() {
        return Some(home.clone());
    }
    if let Ok(Some(key)) = served.spec.key_of(meta.version(), payload) {
        return Some(store.home_of("saga key", &key));
    }
    Some(store.home_of("message id", meta.message_id()))
}

/// The shard of an inbox entry: its home's, or the only one.
fn shard(home: &Option<Home>) -> u32 {
    home.as_ref().map_or(0, |h| h.shard)
}

/// Where a message's writes commit when the store has several shards: the
/// shard of its key, if its type declares one (`key = field`); else, for
/// an idempotent handler, the shard of its message id (its inbox entry's);
/// else none chosen yet (its first save's shard).
fn home_of(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    claims: bool,
) -> Option<Home> {
    let store = &shared.store;
    if store.shard_count() <= 1 {
        return None;
    }
    // A payload whose key cannot be read fails in the handler's decode.
    if let Ok(Some(key)) = served.spec.message_key(meta.version(), payload) {
        return Some(store.home_of("key", &key));
    }
    claims.then(|| store.home_of("message id", meta.message_id()))
}

/// Step 4: an idempotent handler takes the message's id: first time, it
/// runs; answered before, the same answer; in progress elsewhere, a
/// command waits for the answer (up to its deadline) and a durable event
/// waits in place (its delivery kept alive by progress acks, so that the
/// wait spends no delivery); under another payload, a conflict.
async fn claim(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
) -> Result<Claim, Outcome> {
    let spec = served.spec;
    // `steps` does this itself without awaiting (see there); kept so that
    // no caller can claim the inbox for a handler that is not idempotent.
    if !spec.is_idempotent() {
        return Ok(Claim::None {
            home: home_of(served, shared, meta, payload, false),
        });
    }
    if !meta.has_sender_id() {
        tracing::debug!("idempotent handler, but the message has no id to remember it by");
        return Ok(Claim::None {
            home: home_of(served, shared, meta, payload, false),
        });
    }
    let home = home_of(served, shared, meta, payload, true);
    let at = shard(&home);
    let scope = match spec.kind() {
        // One handler per command subject: the subject names the scope.
        HandlerKind::Command => spec.subject(),
        HandlerKind::Event => event_scope(spec),
    };
    let id = meta.message_id().to_owned();
    let claim = InboxClaim {
        digest: crate::store::digest(payload),
        attempt: wire::new_message_id(),
        member: shared.leadership.owner().to_owned(),
    };
    // Counted before it is asked for: a claim of this replica's that no
    // attempt here holds is one whose end the store lost.
    let mut running = shared.plain_work.orphans.hold(&claim.attempt);
    let mut doubted = None;
    loop {
        let (ttl, alive_for) = (shared.config.inbox_window, shared.config.inbox_lease);
        // Dropped while the claim is asked for (a drain deadline), or
        // failed without an answer, the claim may be written: given up in
        // the background either way.
        let asking = ClaimGuard(Some((&shared.plain_work.orphans, at, scope, &id, &claim)));
        let begun = Box::pin(shared.store.inbox_begin(at, scope, &id, &claim, ttl, alive_for)).await;
        if begun.is_ok() {
            asking.disarm();
        } else {
            drop(asking);
        }
        match begun {
            Ok(Inbox::Fresh) => {
                running.owns(scope, &id);
                return Ok(Claim::Owned {
                    scope,
                    id,
                    claim,
                    home,
                    _running: running,
                });
            }
            Ok(Inbox::Done(answer)) if answer.fits(&claim.digest) => {
                return Err(Outcome::Answered(answer.reply));
            }
            Ok(Inbox::Busy(mark))
                if crate::store::Claim::digest_of(&mark) == claim.digest
                    && shared
                        .plain_work
                        .orphans
                        .is_stale(&mark, shared.leadership.owner(), scope, &id) =>
            {
                // This replica's claim, held by no attempt here: its end
                // was written, then lost (a Redis failover to a replica
                // that had not received it). Held while this replica
                // lives, it would keep the message "busy" for good.
                tracing::warn!(
                    message_id = %id,
                    "a claim of this replica's that nothing here holds (its end was lost, as in a store \
                     failover): given up, and the message claimed again"
                );
                if let Err(e) = Box::pin(shared.store.inbox_abandon_mark(at, scope, &id, &mark)).await {
                    return Err(Outcome::Failed(e));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Inbox::Busy(mark))
                if {
                    let digest = crate::store::Claim::digest_of(&mark);
                    digest.is_empty() || digest == claim.digest
                } =>
            {
                // Another replica's claim: it may be one whose end a store
                // failover lost, which only that replica can tell.
                let (me, every) = (shared.leadership.owner(), shared.config.inbox_lease);
                shared
                    .store
                    .doubt_claim(at, scope, &id, &mark, me, every, &mut doubted);
                let waits = match spec.kind() {
                    HandlerKind::Command => meta
                        .deadline()
                        .and_then(|d| d.remaining())
                        .is_some_and(|left| left > Duration::from_millis(60)),
                    HandlerKind::Event => served.durable.is_some(),
                };
                if !waits {
                    return Err(Outcome::Busy);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Inbox::Done(_) | Inbox::Busy(_)) => {
                return Err(Outcome::Failed(Error::conflict(format!(
                    "message id {id} was used before for another payload: a retry must send what the \
                     first attempt sent, and a new message needs a new id"
                ))));
            }
            Err(e) => return Err(Outcome::Failed(e)),
        }
    }
}

/// Step 5: asks the handler's breaker.
fn admit(served: &Served) -> Result<(), Outcome> {
    let admitted = served.breaker.admit();
    served.metrics.breaker(matches!(admitted, Admit::No(_)));
    match admitted {
        Admit::Yes => Ok(()),
        Admit::No(wait) => Err(Outcome::Failed(
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the handler keeps failing: its circuit breaker is open for {} ms more; retry later",
                    wait.as_millis()
                ),
            )
            .exposed(),
        )),
    }
}

/// Step 6: runs the handler, again after a retryable failure while
/// `retry = N` allows and the deadline leaves time.
async fn call_with_retries(
    served: &Served,
    shared: &Shared,
    meta: &Arc<MessageMeta>,
    payload: &Bytes,
    claim: &Claim,
) -> Result<Bytes> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call(served, shared, meta, payload.clone(), claim).await {
            // Not a deliberate wait: it would only wait again.
            Err(e)
                if e.is_retryable()
                    && !e.is_in_doubt()
                    && e.retry_after().is_none()
                    && attempt <= served.spec.retries() =>
            {
                let pause = backoff(shared.config.retry_base, attempt).min(Duration::from_secs(1));
                let fits = meta
                    .deadline()
                    .is_none_or(|d| d.remaining().is_some_and(|left| left > pause));
                if !fits {
                    return Err(e);
                }
                tracing::info!(error = %e, attempt, "retrying the handler");
                served.metrics.retries.increment(1);
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

/// One run of the handler; a panic is contained. An idempotent handler's
/// saves and publishes commit here, with its answer, atomically.
async fn call(
    served: &Served,
    shared: &Shared,
    meta: &Arc<MessageMeta>,
    payload: Bytes,
    claim: &Claim,
) -> Result<Bytes> {
    // A keyed saga's partition runs at most `concurrency` sagas on this
    // replica at once, over all its partitions.
    let _permit = match &served.partition {
        Some(p) => Some(
            Arc::clone(&p.gate)
                .acquire_owned()
                .await
                .map_err(|_| crate::state::fenced())?,
        ),
        None => None,
    };
    // Only a `missed = "skip"` job asks: the id and the clock are not
    // read for every other message (they were 2.5% of a fan-out profile:
    // an event without an id had one made up here, and the clock read).
    if served.spec.job().is_some_and(|o| o.skip_missed)
        && super::jobs::superseded(
            served.spec,
            meta.message_id(),
            shared.client.transport().clock().now_ms(),
        )
    {
        // `missed = "skip"`: an occurrence whose successor came due before
        // it could run (its replicas were down, or it waited behind a
        // failed run) is done without running.
        tracing::info!(id = meta.message_id(), "job occurrence skipped: it is missed");
        return Ok(Bytes::new());
    }
    let work = work_for(served, shared, meta, &payload, claim)?;
    let ctx = Context::new(
        shared.client.clone(),
        Arc::clone(meta),
        Arc::clone(&work),
        served.spec.name(),
    );
    let ran = AssertUnwindSafe(served.spec.call(ctx, payload))
        .catch_unwind()
        .await;
    // It may run again with nothing done twice while it holds its claim
    // (what it wrote waits for its commit) and sent no command that is not
    // idempotent.
    let sent_unrepeatable = matches!(claim, Claim::Owned { .. })
        .then(|| work.sent_unrepeatable.load(std::sync::atomic::Ordering::Relaxed));
    let body = handler_result(served, sent_unrepeatable, ran)?;
    match claim {
        Claim::Owned {
            scope,
            id,
            claim,
            home,
            ..
        } => {
            Box::pin(commit_answer(
                shared,
                &work,
                (shard(home), scope, id),
                claim,
                body,
            ))
            .await
        }
        Claim::None { .. } => Ok(body),
    }
}

/// What a handler's context stages in and is fenced by. A handler that
/// stages nothing and is not fenced shares one `Work` (one allocation
/// less per message); an idempotent one gets its own to stage in, a
/// `leader` one or a keyed saga's its own with the lease's fencing token.
fn work_for(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    claim: &Claim,
) -> Result<Arc<Work>> {
    let spec = served.spec;
    let (fence, held) = match &served.partition {
        // The partition was given up or lost after this message was
        // taken; the subscription is closing.
        Some(p) => (Some(p.fence()?), Some(p.held())),
        // Not the leader (any more): likewise.
        None if spec.is_leader() => (
            Some(shared.leadership.fence().ok_or_else(crate::state::fenced)?),
            Some(shared.leadership.held()),
        ),
        None => (None, None),
    };
    Ok(match (claim, fence) {
        (Claim::None { home: None }, None) if !spec.is_saga() => Arc::clone(&shared.plain_work),
        (claim, fence) => Arc::new(Work {
            store: shared.store.clone(),
            orphans: shared.plain_work.orphans.clone(),
            staged: matches!(claim, Claim::Owned { .. }).then(Default::default),
            durable_subjects: Arc::clone(&shared.durable_subjects),
            sent: Default::default(),
            sent_unrepeatable: Default::default(),
            held,
            member: Arc::clone(&shared.plain_work.member),
            alive_for: shared.config.inbox_lease,
            last_delivery: served.durable.is_some() && meta.delivery() >= u64::from(served.max_deliver),
            saga_timeout: spec.saga_timeout(),
            home: claim.home().cloned(),
            events_home: if fence.is_some() {
                events_home(served, shared, meta, payload, claim)
            } else {
                None
            },
            fence,
        }),
    })
}

/// Commits what an idempotent handler staged together with its answer
/// `body` and the end of its inbox claim, in one store call; resolves a
/// commit whose outcome is unknown from the inbox.
async fn commit_answer(
    shared: &Shared,
    work: &Work,
    (at, scope, id): (u32, &str, &str),
    claim: &InboxClaim,
    body: Bytes,
) -> Result<Bytes> {
    let staged = work
        .staged
        .as_ref()
        .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
        .unwrap_or_default();
    let commit = staged.into_commit(
        Some(InboxWrite {
            scope: scope.to_owned(),
            id: id.to_owned(),
            claim: claim.mark(),
            answer: Answer {
                digest: Some(claim.digest.clone()),
                reply: StoredReply::Ok(body.clone()),
            },
            window: shared.config.inbox_window,
        }),
        work.fence.clone(),
        work.home.clone(),
    );
    // Boxed, here and at the other store calls: a store operation's future
    // is large, and an unboxed one would make every message's future as
    // large, idempotent or not (9 KB per message, copied on each push,
    // was 20% of a fan-out profile in memmove).
    match Box::pin(shared.store.commit(&commit)).await {
        Ok(Committed::Yes(_)) => Ok(body),
        Ok(Committed::Conflict { index, current }) => Err(Error::stale(format!(
            "{} {} changed while the handler ran (now version {current})",
            commit.states[index].kind, commit.states[index].key
        ))),
        // Taken over (this replica was thought gone): the other attempt's
        // answer, if it gave one, and no run again in place either way.
        Ok(Committed::LostClaim) => match Box::pin(shared.store.inbox_peek(at, scope, id)).await {
            Ok(Some(raw)) => match Inbox::from_raw(&raw) {
                Inbox::Done(answer) if answer.fits(&claim.digest) => match answer.reply {
                    StoredReply::Ok(body) => Ok(body),
                    StoredReply::Err { kind, message } => Err(Error::new(kind, message)),
                },
                _ => Err(lost_claim().in_doubt()),
            },
            _ => Err(lost_claim().in_doubt()),
        },
        Ok(Committed::Fenced) => Err(crate::state::fenced()),
        Err(e) => Box::pin(resolve(shared, (at, scope, id), claim, e)).await,
    }
}

fn lost_claim() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "the message was taken over by another attempt (this replica was thought gone); retry for its answer",
    )
}

/// After a commit whose outcome is unknown (its reply was lost: the
/// connection broke, Redis restarted), what the inbox says of it, read
/// before anything runs again: the answer kept (it went through), or this
/// attempt's claim (it did not: it may run again). Observed before: a
/// commit applied by a Redis that was SIGKILLed before replying; the
/// handler ran again, found its own payment done, answered 409, and that
/// 409 replaced the success every later retry was given.
async fn resolve(
    shared: &Shared,
    (at, scope, id): (u32, &str, &str),
    claim: &InboxClaim,
    failure: Error,
) -> Result<Bytes> {
    let mark = claim.mark();
    for attempt in 1..=8 {
        match shared.store.inbox_peek(at, scope, id).await {
            Ok(Some(raw)) if raw == mark.as_bytes() => return Err(failure),
            Ok(Some(raw)) => {
                return match Inbox::from_raw(&raw) {
                    Inbox::Done(answer) if answer.fits(&claim.digest) => {
                        tracing::info!("the commit went through though its reply was lost");
                        match answer.reply {
                            StoredReply::Ok(body) => Ok(body),
                            StoredReply::Err { kind, message } => Err(Error::new(kind, message)),
                        }
                    }
                    _ => Err(lost_claim()),
                };
            }
            Ok(None) => return Err(lost_claim()),
            Err(_) => tokio::time::sleep(backoff(Duration::from_millis(50), attempt)).await,
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!(
            "the store did not say whether the handler's commit went through ({}); retry: the retry \
             gets the answer if it did",
            failure.message()
        ),
    )
    .in_doubt())
}

/// Step 7: tells the breaker whether the handler did its job. A 4xx
/// answer (invalid input, not found, a conflict, a stale save that lost a
/// race) means it did: only failures of the handler or what it depends on
/// open the breaker, or a hot key would shut its handler down.
fn record(served: &Served, result: &Result<Bytes>) {
    let ok = match result {
        Ok(_) => true,
        // A deliberate wait (a saga's durable timer) is not a failure
        // either: sleeping sagas must not open their handler's breaker.
        Err(e) => e.kind().is_public() || e.retry_after().is_some(),
    };
    if served.breaker.record(ok) {
        tracing::error!(
            handler = served.spec.name(),
            "circuit breaker opened: the handler keeps failing"
        );
    }
}

/// Step 8: the inbox keeps a client error as the message's answer
/// (sending it again cannot change it) and lets any other failure be
/// retried; the answer of a success was written with the handler's
/// writes in step 6. Only the claim's holder writes: an attempt that lost
/// its claim (its replica was thought gone) gives the answer the inbox
/// holds, if any, instead of overwriting it.
async fn release(shared: &Shared, claim: &Claim, result: Result<Bytes>) -> Outcome {
    match claim {
        Claim::None { .. } => release_unclaimed(result),
        // Boxed, as the claim (see `steps`).
        Claim::Owned { .. } => Box::pin(release_owned(shared, claim, result)).await,
    }
}

/// [`release`] of a claim this attempt owns.
async fn release_owned(shared: &Shared, claim: &Claim, result: Result<Bytes>) -> Outcome {
    let Claim::Owned {
        scope,
        id,
        claim,
        home,
        ..
    } = claim
    else {
        return match result {
            Ok(body) => Outcome::Done(body),
            Err(e) => Outcome::Failed(e),
        };
    };
    match result {
        Ok(body) => Outcome::Done(body),
        Err(e) if e.kind().is_public() && !e.is_retryable() => {
            let answer = Answer {
                digest: Some(claim.digest.clone()),
                reply: StoredReply::Err {
                    kind: e.kind(),
                    message: e.message().to_owned(),
                },
            };
            let window = shared.config.inbox_window;
            match Box::pin(
                shared
                    .store
                    .inbox_finish(shard(home), scope, id, claim, &answer, window),
            )
            .await
            {
                Ok(Finished::NotHeld(Some(kept))) if kept.fits(&claim.digest) => {
                    tracing::info!(error = %e, "answered by another attempt meanwhile: its answer is given");
                    Outcome::Answered(kept.reply)
                }
                Ok(_) => Outcome::Failed(e),
                Err(err) => {
                    tracing::warn!(error = %err, "the inbox could not keep the answer; a retry runs the message again");
                    shared.plain_work.orphans.give_up(shard(home), scope, id, claim);
                    Outcome::Failed(e)
                }
            }
        }
        Err(e) => {
            if let Err(err) = Box::pin(shared.store.inbox_abandon(shard(home), scope, id, claim)).await {
                tracing::warn!(error = %err, "the claim could not be given up; trying again in the background");
                shared.plain_work.orphans.give_up(shard(home), scope, id, claim);
            }
            Outcome::Failed(e)
        }
    }
}

/// Step 9: logs the outcome and decides the answer. A 5xx failure gets an
/// error id: the log line carries the full text, the reply only the id. A
/// durable message that failed is redelivered later while it may still
/// succeed and its deliveries last, and dead-lettered otherwise.
fn conclude(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    outcome: Outcome,
) -> Settle {
    let durable = served.durable.is_some();
    match outcome {
        Outcome::Done(body) => {
            tracing::trace!("handled");
            Settle::Reply(body)
        }
        Outcome::Answered(StoredReply::Ok(body)) => {
            tracing::debug!("answered before: the same answer again");
            Settle::Reply(body)
        }
        Outcome::Answered(StoredReply::Err { kind, message }) => Settle::Error {
            error: Error::new(kind, message),
            error_id: None,
        },
        Outcome::Expired => Settle::Drop,
        Outcome::Busy if durable => Settle::Retry {
            delay: Duration::from_secs(1),
        },
        Outcome::Busy => Settle::Error {
            error: Error::new(
                ErrorKind::Unavailable,
                "this message is being handled right now; retry for its answer",
            )
            .exposed(),
            error_id: None,
        },
        Outcome::Failed(error) if durable => {
            let max = served.max_deliver;
            let delivered = meta.delivery();
            if error.is_retryable() && delivered < u64::from(max) {
                if let Some(delay) = error.retry_after() {
                    // A deliberate wait (a saga's durable timer), not a failure.
                    tracing::info!(reason = %error, ?delay, "waiting; it will be delivered again");
                    return Settle::Retry { delay };
                }
                let delay = backoff(shared.config.retry_base, delivered as u32);
                tracing::warn!(error = %error, delivered, max, ?delay, "failed; it will be delivered again");
                return Settle::Retry { delay };
            }
            // A 5xx text stays in this log, under an error id the letter
            // names, as in error replies.
            let error_id = wire::new_message_id();
            tracing::error!(error = %error, delivered, %error_id, "failed for good: dead-lettered");
            let mut letter = dead_letter(served, shared, meta, payload, &error);
            if !error.is_public() {
                letter.error = format!(
                    "{} (error id {error_id}: the full text is in the log of replica {})",
                    error.kind(),
                    shared.config.instance_id
                );
            }
            Settle::Dead(Box::new(letter))
        }
        Outcome::Failed(error) if error.is_public() => {
            tracing::info!(error = %error, "message rejected");
            Settle::Error {
                error,
                error_id: None,
            }
        }
        Outcome::Failed(error) => {
            let error_id = wire::new_message_id();
            if error.kind() == ErrorKind::Panic {
                tracing::error!(error = %error, %error_id, "handler panicked");
            } else {
                tracing::error!(error = %error, %error_id, "handler failed");
            }
            Settle::Error {
                error,
                error_id: Some(error_id),
            }
        }
    }
}

pub(crate) fn dead_letter(
    served: &Served,
    shared: &Shared,
    meta: &MessageMeta,
    payload: &Bytes,
    error: &Error,
) -> DeadLetter {
    DeadLetter {
        seq: 0,
        subject: meta.subject().to_owned(),
        service: shared.config.service.clone(),
        handler: served.spec.name().to_owned(),
        error_kind: error.kind(),
        error: error.message().to_owned(),
        deliveries: meta.delivery(),
        message_id: meta.has_sender_id().then(|| meta.message_id().to_owned()),
        headers: meta
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|(k, _)| {
                        let k: &str = k.as_ref();
                        !wire::is_broker_header(k) && !k.to_ascii_lowercase().starts_with("catga-dlq-")
                    })
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
        payload: payload.clone(),
        truncated: None,
        letter_id: None,
        authentic: None,
    }
}

/// The inbox scope of an idempotent event handler: its subject and
/// durable name when it is durable (what a release keeps when the function
/// moves to another module, as the consumer it reads from), else its path.
/// Made once per handler.
fn event_scope(spec: &HandlerSpec) -> &'static str {
    type Scopes = std::collections::HashMap<(&'static str, &'static str), &'static str>;
    static SCOPES: std::sync::OnceLock<std::sync::Mutex<Scopes>> = std::sync::OnceLock::new();
    let Some(durable) = spec.durable() else {
        return spec.name();
    };
    let mut scopes = SCOPES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    scopes
        .entry((spec.subject(), durable))
        .or_insert_with(|| Box::leak(format!("{}#{durable}", spec.subject()).into_boxed_str()))
}
