//! The outbox relay: stores the events that handlers saved with their
//! state in their streams, in commit order, and removes each from the
//! outbox once its stream acknowledged it.
//!
//! - One replica at a time relays each outbox (the holder of its relay
//!   lease, see [`super::lease`]); the others stand by and take over
//!   within a lease when it dies. A live relay's entries are never taken
//!   over, however slowly it publishes. With one outbox per store shard
//!   (`CATGA_STORE_SHARDS`), the shards are spread over the replicas by
//!   the ring the keyed sagas use ([`RelayLeases`]).
//! - Every event goes to a stream: the one that stores its subject, or
//!   one made for the subject when none does. An entry leaves the outbox
//!   only once a stream acknowledged it; the answer "no stream stores
//!   this subject" never sends an event anywhere else (a cluster gives
//!   that answer while a node restarts, which lost 8.8 % of the events of
//!   a 120 s run when the relay then published on core NATS).
//! - Order: a round reads the oldest entries and sends each stream's as
//!   one atomic batch, or one at a time where a stream takes no batches
//!   (see
//!   [`Transport::store_in_order`](crate::transport::Transport::store_in_order)),
//!   so one that is not stored holds back the rest of its stream's
//!   entries until the next round sends them again, in order, from the
//!   oldest.
//! - An entry that can never be stored (over the broker's limit) becomes a
//!   dead letter instead of holding back the entries behind it forever.
//! - Plain (core NATS) subscribers of a subject receive every publish of
//!   an event, also one the stream drops as a repeat: an entry sent again
//!   after its acknowledgement was lost, or by a relay that took over from
//!   one that died before removing it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::time::Instant;

use super::Shared;
use super::lease::Lease;
use crate::error::{Error, ErrorKind, Result};
use crate::store::OutboxEntry;
use crate::transport::{DeadLetter, Order, Outgoing};

/// The relay lease's name in the store (with one outbox; `relay:<shard>`
/// with several).
pub(crate) const RELAY_LEASE: &str = "relay";

/// The member group of the replicas that relay, for the ring that spreads
/// the outbox shards: with a `:`, which no keyed saga's group (its
/// durable name) has.
const RELAY_GROUP: &str = "outbox:relays";

/// The relay's leases, one per outbox shard.
///
/// With one shard, the single lease `relay`, which any replica takes when
/// it is free ([`Lease::keep`]), as before shards existed. With several,
/// the lease `relay:<shard>` of each: every replica says it is alive in
/// the [`RELAY_GROUP`], places the shards on the ring of the replicas
/// alive (bounded loads, as keyed sagas' partitions), wants the leases of
/// the shards the ring gives it and gives the others up: two round trips
/// every member heartbeat or third of the lease, whichever is sooner. So the relaying of a service spreads
/// over its replicas instead of resting on one, and moves when replicas
/// join or die: a dead replica's shards are taken once it left the ring
/// (`CATGA_MEMBER_TIMEOUT_MS`) and its leases ran out
/// (`CATGA_OUTBOX_LEASE_MS`); a replica that shuts down leaves at once.
pub(crate) struct RelayLeases {
    shards: Vec<Arc<Lease>>,
    /// How long the relays' ring remembers a silent replica.
    member_timeout: Duration,
    /// Held by the relay through each round of a shard: a lease given up
    /// to another replica (the ring moved) is released only once the
    /// round that was sending under it ended, so that the next holder
    /// does not send again what this one sent and had not yet removed.
    rounds: Vec<tokio::sync::Mutex<()>>,
}

impl RelayLeases {
    /// The leases of `shards` outbox shards for `owner`, lasting `ttl`;
    /// the ring forgets a replica silent for `member_timeout`.
    pub(crate) fn new(shards: u32, owner: &str, ttl: Duration, member_timeout: Duration) -> RelayLeases {
        let shards = if shards <= 1 {
            vec![Arc::new(Lease::new(
                RELAY_LEASE,
                owner,
                ttl,
                "catga_outbox_relay",
            ))]
        } else {
            (0..shards)
                .map(|s| Arc::new(Lease::quiet(&format!("{RELAY_LEASE}:{s}"), owner, ttl)))
                .collect()
        };
        let rounds = shards.iter().map(|_| tokio::sync::Mutex::new(())).collect();
        RelayLeases {
            shards,
            member_timeout,
            rounds,
        }
    }

    /// The lock a round of `shard` holds.
    fn round_of(&self, shard: u32) -> &tokio::sync::Mutex<()> {
        &self.rounds[(shard as usize).min(self.rounds.len() - 1)]
    }

    /// The lease of `shard`.
    fn of(&self, shard: u32) -> &Lease {
        &self.shards[(shard as usize).min(self.shards.len() - 1)]
    }

    /// The shards whose outbox this replica relays now.
    pub(crate) fn held(&self) -> Vec<u32> {
        (0..self.shards.len() as u32)
            .filter(|s| self.of(*s).held().is_some())
            .collect()
    }

    /// Takes and keeps the leases this replica should hold, saying it is
    /// alive every `heartbeat` (and every third of the lease); runs until
    /// aborted.
    pub(crate) async fn keep(self: Arc<Self>, store: crate::store::Store, heartbeat: Duration) {
        let member_timeout = self.member_timeout;
        if let [one] = self.shards.as_slice() {
            return Arc::clone(one).keep(store).await;
        }
        let first = &self.shards[0];
        let (owner, ttl) = (first.owner().to_owned(), first.ttl());
        let every = (ttl / 3).min(heartbeat);
        let mut members: Vec<String> = Vec::new();
        loop {
            let asked = Instant::now();
            match store.members(RELAY_GROUP, &owner, true, member_timeout).await {
                Ok(alive) => members = alive,
                // The last view stands: the leases say who relays.
                Err(e) => tracing::debug!(error = %e, "the relays' member set could not be read"),
            }
            let ring = crate::ring::Ring::new(&members);
            let owners = ring.assign(self.shards.len() as u32);
            let wanted: Vec<(String, bool)> = self
                .shards
                .iter()
                .enumerate()
                .map(|(s, l)| (l.name().to_owned(), owners.get(s) == Some(&owner.as_str())))
                .collect();
            // Shards to hand over: no new round starts on any, then the
            // ones running end (all within a third of the lease) before the
            // leases are given up.
            let handed: Vec<usize> = (0..self.shards.len())
                .filter(|s| !wanted[*s].1 && self.shards[*s].held().is_some())
                .collect();
            for s in &handed {
                self.shards[*s].set(None);
            }
            let until = Instant::now() + ttl / 3;
            for s in &handed {
                if tokio::time::timeout_at(until, self.rounds[*s].lock())
                    .await
                    .is_err()
                {
                    tracing::debug!(
                        lease = self.shards[*s].name(),
                        "handed over while a round still ran"
                    );
                }
            }
            // Counted from before the request, which may come late after
            // the waits above.
            let synced = Instant::now();
            match store.lease_sync(&wanted, &owner, ttl).await {
                Ok(tokens) => {
                    for (lease, token) in self.shards.iter().zip(tokens) {
                        lease.set((token != 0).then(|| (token, lease.held_until(synced))));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the relay leases could not be renewed; they run out unless renewed in time");
                    for lease in &self.shards {
                        if lease.held().is_none() {
                            lease.set(None);
                        }
                    }
                }
            }
            metrics::gauge!("catga_outbox_relay").set(self.held().len() as f64);
            tokio::time::sleep_until(asked + every).await;
        }
    }

    /// Gives every lease held up and leaves the relays' ring (at
    /// shutdown, within `deadline`), so that other replicas take the
    /// shards at their next round.
    pub(crate) async fn release(&self, store: &crate::store::Store, deadline: Instant) {
        if let [one] = self.shards.as_slice() {
            return one.release(store, deadline).await;
        }
        let owner = self.shards[0].owner().to_owned();
        // The ring's own timeout: a shorter one would forget live
        // replicas whose heartbeat is older.
        let leave = store.members(RELAY_GROUP, &owner, false, self.member_timeout);
        if !matches!(tokio::time::timeout_at(deadline, leave).await, Ok(Ok(_))) {
            tracing::debug!("could not leave the relays' ring; this replica is forgotten once silent");
        }
        // Every lease, held or not as this replica sees it: one it was
        // handing over when the keeper stopped is still its own in the
        // store (giving up a lease another holds changes nothing).
        for lease in &self.shards {
            lease.set(None);
        }
        let unwanted: Vec<(String, bool)> =
            self.shards.iter().map(|l| (l.name().to_owned(), false)).collect();
        let ttl = self.shards[0].ttl();
        match tokio::time::timeout_at(deadline, store.lease_sync(&unwanted, &owner, ttl)).await {
            Ok(Ok(_)) => {}
            _ => tracing::warn!("the relay leases could not be given up in time; they run out by themselves"),
        }
        metrics::gauge!("catga_outbox_relay").set(0.0);
    }
}

/// Entries read and sent per round.
const BATCH: usize = 256;

/// Relays while this replica holds the relay lease; runs until aborted.
///
/// With one outbox stream, a round waits on it for new entries. With one
/// per store shard (`CATGA_STORE_SHARDS`), rounds go from shard to shard
/// without waiting (a read cannot wait on streams in different slots of a
/// cluster), and a whole turn that found nothing pauses a moment (see
/// [`idle_pause`]). A shard that fails (its master is away) waits out its
/// own back-off while the other shards go on: each key's events are in
/// one shard, so their order does not depend on the others.
pub(crate) async fn run(shared: Arc<Shared>, leases: Arc<RelayLeases>) {
    let shards = shared.store.outbox_shards().max(1);
    // One per shard: a stream left alone after a failure in one shard's
    // round (or a chain cut when its lease went) does not hold back the
    // same stream's events of the other shards this replica relays.
    let mut relays: Vec<Relay> = (0..shards).map(|_| Relay::default()).collect();
    let mut failures = vec![0u32; shards as usize];
    let mut retry_at = vec![Instant::now(); shards as usize];
    let mut shard = 0;
    let mut idle = true;
    loop {
        if shard == 0 && leases.held().is_empty() {
            failures.fill(0);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let at = shard as usize;
        shard = (shard + 1) % shards;
        let lease = leases.of(at as u32);
        // Held through the round; the lease checked again once taken.
        let round_lock = leases.round_of(at as u32).lock().await;
        if lease.held().is_none() {
            // Another replica's shard (or this one's lost): when it comes
            // back, it starts afresh.
            failures[at] = 0;
            retry_at[at] = Instant::now();
        } else if retry_at[at] <= Instant::now() {
            let block = if shards == 1 {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            match relays[at].round(&shared, lease, at as u32, block).await {
                Ok(n) => {
                    failures[at] = 0;
                    idle &= n == 0;
                }
                Err(e) => {
                    failures[at] += 1;
                    if failures[at] == 1 || failures[at].is_multiple_of(20) {
                        tracing::warn!(error = %e, failures = failures[at], shard = at, "the outbox relay cannot store every entry yet; it keeps trying, in order");
                    }
                    let pause = crate::resilience::backoff(Duration::from_millis(100), failures[at].min(6));
                    retry_at[at] = Instant::now() + pause;
                }
            }
        }
        drop(round_lock);
        if shard == 0 {
            // Of the shards this replica relays: the others' back-off
            // starts afresh when they come to it.
            let earliest = leases
                .held()
                .into_iter()
                .map(|s| retry_at[s as usize])
                .min()
                .unwrap_or_else(Instant::now);
            if earliest > Instant::now() {
                tokio::time::sleep_until(earliest).await;
            } else if idle && shards > 1 {
                tokio::time::sleep(idle_pause(shards)).await;
            }
            idle = true;
        }
    }
}

/// How long a relay of several outbox streams rests after a turn that
/// found every stream empty: 5 ms a shard, between 10 and 200 ms. What an
/// event waits at most when it is committed to an idle outbox; an idle
/// service costs each shard's master one read per pause.
fn idle_pause(shards: u32) -> Duration {
    (Duration::from_millis(5) * shards).clamp(Duration::from_millis(10), Duration::from_millis(200))
}

/// Relays what is in the outboxes this replica holds the leases of until
/// they are empty or `deadline` passes (shutdown: the embedded store's
/// outbox dies with the process).
pub(crate) async fn flush(shared: &Shared, leases: &RelayLeases, deadline: Instant) {
    let mut relays: HashMap<u32, Relay> = HashMap::new();
    while Instant::now() < deadline {
        let held = leases.held();
        if held.is_empty() {
            return;
        }
        let mut moved = 0;
        for shard in held {
            let lease = leases.of(shard);
            let _round = leases.round_of(shard).lock().await;
            let relay = relays.entry(shard).or_default();
            match tokio::time::timeout_at(deadline, relay.round(shared, lease, shard, Duration::ZERO)).await {
                Err(_) => return,
                Ok(Ok(n)) => moved += n,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, shard, "the outbox could not be flushed; its entries wait in the store");
                    return;
                }
            }
        }
        if moved == 0 {
            return;
        }
    }
}

/// Pages of [`BATCH`] entries a round reads past the entries of suspended
/// streams.
const PAGES: usize = 16;

/// How deep one round reads at most (past suspended streams' entries):
/// what a relay that took a shard over sends a message at a time (its
/// rounds read from the oldest) before it knows none of what it reads was
/// sent by the relay before it.
const STEPWISE_COVER: usize = BATCH * PAGES;

/// What a relay remembers between rounds: the streams (chains, see
/// [`Transport::chain_of`](crate::transport::Transport::chain_of)) that
/// failed to store their oldest entry, left alone until when (and how
/// often in a row). Their entries keep their place; the entries of other
/// streams behind them go out meanwhile, so that one stream that is away
/// (its leader lost, no quorum) does not hold back every other. By
/// stream, not subject: a stream's order is one chain, whatever subjects
/// it stores.
#[derive(Default)]
struct Relay {
    /// The lease token under which what this relay reads is known not to
    /// be stored yet (0: not known). Rounds until then go a message at a
    /// time ([`Order::Stepwise`]): what they read may
    /// have been stored by the relay before it (it died, or stalled past
    /// its lease, before it removed what it sent), and JetStream refuses
    /// an atomic batch holding a message it stored already, whole, after
    /// plain subscribers got every message of it. Known once the outbox
    /// was read empty, or once rounds sent without a failure past what
    /// the relay before could have sent ([`STEPWISE_COVER`] entries) or
    /// read less than a full page.
    settled_under: u64,
    /// The lease token the last round saw (0: none).
    token: u64,
    /// Entries sent a message at a time since the lease was taken.
    stepwise_sent: usize,
    /// Streams (chains) sent a message at a time even when settled: one
    /// that failed (its acknowledgement lost, it may have stored some)
    /// until a round stored its messages.
    unsettled: HashSet<String>,
    suspended: HashMap<String, (Instant, u32)>,
    /// When each shard's delayed messages are looked at next.
    release_at: HashMap<u32, Instant>,
}

/// How often the relay looks for delayed messages that came due (sooner
/// when it knows the next one's time): what a delayed message waits at
/// most past its time when the relay is idle, for one call to the store
/// a shard.
const DELAYED_POLL: Duration = Duration::from_millis(250);

impl Relay {
    /// What this relay reads under `token` is known not to be stored
    /// yet: the streams left alone meanwhile are not (their entries were
    /// not read).
    fn settle_under(&mut self, token: u64) {
        self.settled_under = token;
        self.stepwise_sent = 0;
        self.unsettled.clear();
        self.unsettled.extend(self.suspended.keys().cloned());
    }

    /// Whether `chain` is left alone right now.
    fn waiting(&self, chain: &str, now: Instant) -> bool {
        self.suspended.get(chain).is_some_and(|(until, _)| *until > now)
    }

    /// One round: reads the oldest entries (waiting up to `block` for
    /// one), skipping those of suspended streams, sends them in order,
    /// removes those stored or dead-lettered. Returns how many left the
    /// outbox; an error only when none did and one failed (the failed ones
    /// go again in a later round, in order).
    async fn round(&mut self, shared: &Shared, lease: &Lease, shard: u32, block: Duration) -> Result<usize> {
        let store = &shared.store;
        let transport = shared.client.transport();
        // A failed release (the shard's master away, or out of memory)
        // does not hold back what is in the outbox already: it is tried
        // again at the next look.
        let block = match self.release_due(shared, shard).await {
            Ok(wait) => block.min(wait),
            Err(e) => {
                tracing::debug!(error = %e, shard, "delayed messages could not be released yet");
                block.min(DELAYED_POLL)
            }
        };
        let Page {
            ids,
            entries,
            unreadable,
        } = self.read(shared, shard, block).await?;
        // The lease lapsed meanwhile (a renewal is late): nothing is sent,
        // and what this relay knows holds if the same token comes back
        // (no other holder came in between: it would have a new one).
        let Some(token) = lease.held() else {
            return Ok(0);
        };
        if token != self.token {
            // Taken (again): what was known is not.
            self.token = token;
            self.settled_under = 0;
            self.stepwise_sent = 0;
        }
        // Streams left alone right now: their entries were read past.
        let skipped = self.suspended.values().any(|(until, _)| *until > Instant::now());
        if ids.is_empty() && unreadable.is_empty() && !skipped {
            // An empty outbox: nothing in it was sent before.
            self.settle_under(token);
        }
        // Whether there may be more behind what was read.
        let full = ids.len() + unreadable.len() >= BATCH || skipped;
        if !unreadable.is_empty() {
            // Written by a commit, so never seen; kept, they would block the
            // outbox for good.
            tracing::error!(entries = ?unreadable, "outbox entries that cannot be read: removed");
            store.outbox_remove(shard, &unreadable).await?;
        }
        let mut failure = self.ensure_streams(shared, &entries).await;
        // Now that every subject's stream is known: nothing of a stream
        // that is left alone goes out, whatever its subject.
        let (mut sent_ids, mut sent) = (Vec::new(), Vec::new());
        for (id, e) in ids.into_iter().zip(entries) {
            if !self.waiting(&transport.chain_of(&e.subject), Instant::now()) {
                sent_ids.push(id);
                sent.push(e);
            }
        }
        if sent.is_empty() {
            // Everything waits on a suspended stream: sleep until the
            // first one may be tried again, instead of reading the same
            // entries in a loop. With several shards the other shards go
            // on meanwhile: the relay's turn pauses when every shard had
            // nothing to send.
            let next = self.suspended.values().map(|(until, _)| *until).min();
            if let Some(next) = next
                && shared.store.outbox_shards() == 1
            {
                tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(20))).await;
            }
            return match failure {
                Some(e) if unreadable.is_empty() => Err(e),
                _ => Ok(unreadable.len()),
            };
        }
        let outgoing: Vec<Outgoing> = sent.iter().map(outgoing).collect();
        // Under the token what this round decided was decided under.
        let go_on = || lease.held() == Some(token);
        // Other writers may write the same streams at the same time (the
        // relays of other shards, a durable publish of the same event).
        let stepwise = self.settled_under != token;
        let order = if stepwise {
            Order::Stepwise
        } else {
            Order::Batched {
                stepwise: &self.unsettled,
            }
        };
        let results = transport
            .store_in_order(&outgoing, shared.config.request_timeout, &go_on, order)
            .await;
        let settled = settle(shared, sent_ids.into_iter().zip(&sent).zip(results)).await;
        let n = settled.done.len() + unreadable.len();
        if let Err(e) = store.outbox_remove(shard, &settled.done).await {
            // Stored and still in the outbox: read again, they must not
            // go in a batch.
            self.unsettled.extend(settled.stored_chains);
            return Err(e);
        }
        // Only once removed: entries stored and not removed are read again.
        if stepwise && settled.failure.is_none() {
            self.stepwise_sent += settled.done.len();
            if self.stepwise_sent >= STEPWISE_COVER || !full {
                self.settle_under(token);
            }
        }
        for chain in &settled.failed_chains {
            self.unsettled.insert(chain.clone());
        }
        for chain in settled.stored_chains.difference(&settled.failed_chains) {
            self.unsettled.remove(chain);
        }
        if let Some(e) = settled.failure {
            failure.get_or_insert(e);
        }
        for chain in &settled.stored_chains {
            self.suspended.remove(chain);
        }
        // A stream that stored nothing this round waits a moment; one that
        // stored some (another writer came in between, a chain cut short)
        // goes again in the next round at once.
        for chain in settled.failed_chains.difference(&settled.stored_chains) {
            self.suspend(chain.clone());
        }
        match failure {
            Some(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Moves the delayed messages of `shard` that came due to its outbox
    /// (in due order, behind what is there), when it is time to look;
    /// how long until the next look.
    async fn release_due(&mut self, shared: &Shared, shard: u32) -> Result<Duration> {
        let now = Instant::now();
        if let Some(at) = self.release_at.get(&shard)
            && *at > now
        {
            return Ok(*at - now);
        }
        // Looked at again in a moment whatever the outcome.
        self.release_at.insert(shard, now + DELAYED_POLL);
        let (moved, next) = shared.store.delayed_release(shard, BATCH).await?;
        let wait = match next {
            // More were due than one batch: the next round looks again.
            _ if moved >= BATCH => Duration::ZERO,
            Some(next) => DELAYED_POLL.min(next),
            None => DELAYED_POLL,
        };
        if moved > 0 {
            tracing::debug!(moved, shard, "delayed messages came due");
        }
        self.release_at.insert(shard, now + wait);
        Ok(wait)
    }

    /// Reads the oldest entries (waiting up to `block` for one), and while
    /// streams are suspended, up to [`PAGES`] pages past their entries.
    async fn read(&self, shared: &Shared, shard: u32, block: Duration) -> Result<Page> {
        let store = &shared.store;
        let transport = shared.client.transport();
        let now = Instant::now();
        let any_waiting = self.suspended.values().any(|(until, _)| *until > now);
        let mut page = Box::pin(store.outbox_read(shard, BATCH, block)).await?;
        let mut read = Page {
            ids: Vec::with_capacity(page.len()),
            entries: Vec::with_capacity(page.len()),
            unreadable: Vec::new(),
        };
        for _ in 0..PAGES {
            let Some(last) = page.last().map(|(id, _)| id.clone()) else {
                break;
            };
            for (id, entry) in page {
                match entry {
                    Some(e) if self.waiting(&transport.chain_of(&e.subject), now) => {}
                    Some(e) => {
                        read.ids.push(id);
                        read.entries.push(e);
                    }
                    None => read.unreadable.push(id),
                }
            }
            if !any_waiting || read.entries.len() >= BATCH {
                break;
            }
            page = Box::pin(store.outbox_read_after(shard, &last, BATCH)).await?;
        }
        Ok(read)
    }

    /// Makes sure every subject of `entries` has a stream; suspends the
    /// streams that cannot be made or found, and returns the first error.
    async fn ensure_streams(&mut self, shared: &Shared, entries: &[OutboxEntry]) -> Option<Error> {
        let transport = shared.client.transport();
        let subjects: BTreeSet<&str> = entries.iter().map(|e| e.subject.as_str()).collect();
        let mut failure = None;
        for subject in subjects {
            if let Err(e) = transport.ensure_stored(subject, &shared.config.streams).await {
                failure.get_or_insert(e);
                self.suspend(transport.chain_of(subject));
            }
        }
        failure
    }

    fn suspend(&mut self, chain: String) {
        let failures = self.suspended.get(&chain).map_or(0, |(_, f)| *f) + 1;
        let pause =
            crate::resilience::backoff(Duration::from_millis(100), failures).min(Duration::from_secs(5));
        self.suspended.insert(chain, (Instant::now() + pause, failures));
    }
}

/// Whether a failure to store an entry will happen again, whenever it is
/// tried.
fn never_stored(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::Invalid)
}

/// The entries a round read, in outbox order.
struct Page {
    ids: Vec<String>,
    entries: Vec<OutboxEntry>,
    /// Entries that cannot be decoded.
    unreadable: Vec<String>,
}

/// What became of the entries a round sent.
#[derive(Default)]
struct Settled {
    /// Out of the outbox: stored, or dead-lettered.
    done: Vec<String>,
    /// Streams that stored an entry of this round.
    stored_chains: BTreeSet<String>,
    /// Streams that failed to store one.
    failed_chains: BTreeSet<String>,
    /// The first failure.
    failure: Option<Error>,
}

/// Sorts the results of a round's sends: stored, dead-lettered (it can
/// never be stored) or failed (sent again, in order, in a later round).
async fn settle<'a>(
    shared: &Shared,
    results: impl Iterator<Item = ((String, &'a OutboxEntry), Result<()>)>,
) -> Settled {
    let transport = shared.client.transport();
    let mut settled = Settled::default();
    for ((id, entry), result) in results {
        let chain = transport.chain_of(&entry.subject);
        match result {
            Ok(()) => {
                settled.stored_chains.insert(chain);
                settled.done.push(id);
            }
            Err(e) if never_stored(&e) => match dead_letter(shared, entry, &e).await {
                Ok(()) => {
                    tracing::error!(subject = %entry.subject, message_id = %entry.id, error = %e, "an outbox event can never be stored: dead-lettered");
                    settled.done.push(id);
                }
                Err(dl) => {
                    settled.failed_chains.insert(chain);
                    settled.failure.get_or_insert(dl);
                }
            },
            Err(e) => {
                if e.kind() == ErrorKind::NoHandler {
                    // Its stream is gone: made again next round.
                    transport.forget_stored(&entry.subject);
                }
                settled.failed_chains.insert(chain);
                settled.failure.get_or_insert(e);
            }
        }
    }
    settled
}

fn outgoing(entry: &OutboxEntry) -> Outgoing {
    let mut headers = HeaderMap::new();
    for (k, v) in &entry.headers {
        headers.append(k.as_str(), v.as_str());
    }
    Outgoing {
        subject: entry.subject.clone(),
        id: entry.id.clone(),
        headers,
        payload: Bytes::copy_from_slice(&entry.payload),
    }
}

async fn dead_letter(shared: &Shared, entry: &OutboxEntry, error: &Error) -> Result<()> {
    let letter = DeadLetter {
        seq: 0,
        subject: entry.subject.clone(),
        service: shared.config.service.clone(),
        handler: "outbox".to_owned(),
        error_kind: error.kind(),
        error: error.message().to_owned(),
        deliveries: 1,
        message_id: Some(entry.id.clone()),
        headers: entry
            .headers
            .iter()
            .filter(|(k, _)| !crate::wire::is_broker_header(k))
            .cloned()
            .collect(),
        payload: Bytes::copy_from_slice(&entry.payload),
        truncated: None,
        letter_id: None,
        authentic: None,
    };
    let mut letter = letter;
    super::letters::keep_letter(shared, &mut letter).await?;
    let transport = shared.client.transport();
    transport
        .ensure_dead_letters(&shared.config.service, &shared.config.streams)
        .await?;
    transport.store_dead_letter(&letter).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_stream_is_left_alone_a_growing_moment() {
        let mut relay = Relay::default();
        let now = Instant::now();
        assert!(!relay.waiting("CATGA_orders", now));
        relay.suspend("CATGA_orders".into());
        assert!(relay.waiting("CATGA_orders", Instant::now()));
        assert!(
            !relay.waiting("CATGA_billing", Instant::now()),
            "other streams go on"
        );
        let first = relay.suspended["CATGA_orders"].0 - now;
        for _ in 0..20 {
            relay.suspend("CATGA_orders".into());
        }
        let (until, failures) = relay.suspended["CATGA_orders"];
        assert_eq!(failures, 21);
        assert!(until - Instant::now() <= Duration::from_secs(5), "capped at 5 s");
        assert!(until - Instant::now() >= first, "growing");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            !relay.waiting("CATGA_orders", Instant::now()),
            "tried again after its moment"
        );
    }

    #[test]
    fn only_what_the_message_is_makes_a_failure_final() {
        assert!(never_stored(&Error::new(ErrorKind::TooLarge, "big")));
        assert!(never_stored(&Error::new(ErrorKind::Invalid, "refused")));
        for kind in [
            ErrorKind::Timeout,
            ErrorKind::Unavailable,
            ErrorKind::NoHandler,
            ErrorKind::Transport,
        ] {
            assert!(!never_stored(&Error::new(kind, "passing")), "{kind}");
        }
    }

    /// Until `done` says so of what `leases` hold, or 5 s.
    async fn until(leases: &[&RelayLeases], done: impl Fn(&[Vec<u32>]) -> bool) -> Vec<Vec<u32>> {
        let start = std::time::Instant::now();
        loop {
            let held: Vec<Vec<u32>> = leases.iter().map(|l| l.held()).collect();
            if done(&held) || start.elapsed() > Duration::from_secs(5) {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn outbox_shards_spread_over_the_relays_and_move_when_one_dies() {
        let store: crate::store::Store = crate::store::MemoryStore::new().into();
        let (ttl, member_timeout) = (Duration::from_millis(300), Duration::from_millis(400));
        let a = Arc::new(RelayLeases::new(4, "a", ttl, member_timeout));
        let b = Arc::new(RelayLeases::new(4, "b", ttl, member_timeout));
        let ka = tokio::spawn(Arc::clone(&a).keep(store.clone(), member_timeout / 4));
        let kb = tokio::spawn(Arc::clone(&b).keep(store.clone(), member_timeout / 4));
        let split = |held: &[Vec<u32>]| {
            let mut all: Vec<u32> = held.concat();
            all.sort_unstable();
            all == [0, 1, 2, 3] && held.iter().all(|h| h.len() == 2)
        };
        let held = until(&[&a, &b], split).await;
        assert!(split(&held), "two shards each, none twice: {held:?}");
        let before: Vec<u64> = (0..4).filter_map(|s| a.of(s).held().or(b.of(s).held())).collect();
        // a stops (its process dies): b takes its shards once a left the
        // ring and its leases ran out.
        ka.abort();
        let held = until(&[&a, &b], |h| h[1].len() == 4).await;
        assert_eq!(held[1], [0, 1, 2, 3], "{held:?}");
        assert!(a.held().is_empty(), "a's grants ran out: {held:?}");
        let after: Vec<u64> = (0..4).filter_map(|s| b.of(s).held()).collect();
        assert!(
            after.iter().zip(&before).all(|(new, old)| new >= old),
            "tokens never go back: {before:?} then {after:?}"
        );
        // A replica that joins gets its share back; one that shuts down
        // leaves at once.
        let c = Arc::new(RelayLeases::new(4, "c", ttl, member_timeout));
        let kc = tokio::spawn(Arc::clone(&c).keep(store.clone(), member_timeout / 4));
        let held = until(&[&b, &c], split).await;
        assert!(split(&held), "{held:?}");
        kb.abort();
        b.release(&store, Instant::now() + Duration::from_secs(1)).await;
        assert!(b.held().is_empty());
        let released = std::time::Instant::now();
        let held = until(&[&c], |h| h[0].len() == 4).await;
        assert_eq!(held[0], [0, 1, 2, 3]);
        assert!(
            released.elapsed() < member_timeout,
            "taken over without waiting for b to be forgotten: {:?}",
            released.elapsed()
        );
        kc.abort();
    }

    #[tokio::test]
    async fn one_outbox_keeps_the_single_relay_lease() {
        let store: crate::store::Store = crate::store::MemoryStore::new().into();
        let one = Arc::new(RelayLeases::new(
            1,
            "a",
            Duration::from_millis(300),
            Duration::from_secs(5),
        ));
        assert_eq!(one.of(0).name(), RELAY_LEASE, "the name before shards existed");
        let k = tokio::spawn(Arc::clone(&one).keep(store.clone(), Duration::from_secs(1)));
        let held = until(&[&one], |h| h[0] == [0]).await;
        assert_eq!(held[0], [0]);
        k.abort();
    }
}
