//! The in-memory store: the embedded mode's twin of Redis, same semantics
//! (versions, an outbox read in commit order and emptied as it is
//! published, an inbox with leases and windows, leases with fencing
//! tokens).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

#[cfg(test)]
use super::LEADER_LEASE;
use super::{Answer, Claim, Commit, Committed, Fence, Finished, Inbox, OutboxEntry};
use crate::clock::Clock;
use crate::error::Result;

#[derive(Default)]
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    /// Wakes a relay waiting for new outbox entries.
    appended: Notify,
    /// What "now" is for delayed messages: its bus's clock, which a test
    /// kit may move forward.
    clock: Arc<Clock>,
}

#[derive(Default, Clone)]
pub(crate) struct Inner {
    state: HashMap<(String, String), (u64, Bytes)>,
    /// Entries by number, each with when it was appended (unix ms, by
    /// the store's clock).
    outbox: BTreeMap<u64, (OutboxEntry, u64)>,
    next_entry: u64,
    /// Delayed messages by due time (unix ms) and entry number, and where
    /// each id is in that map.
    delayed: BTreeMap<(u64, u64), OutboxEntry>,
    delayed_ids: HashMap<String, (u64, u64)>,
    inbox: HashMap<(String, String), (InboxValue, Instant)>,
    /// Leases by name: the holder and when it runs out.
    leases: HashMap<String, (String, Instant)>,
    /// The fencing token of each lease's latest grant.
    fences: HashMap<String, u64>,
    /// Members per group, and when each last said it was alive.
    members: HashMap<String, HashMap<String, Instant>>,
    /// Saga journals, by saga id.
    sagas: HashMap<String, std::collections::BTreeMap<String, Bytes>>,
    /// Saga ids, oldest first.
    saga_order: Vec<String>,
    /// Replicas alive, and until when (see `Store::alive`).
    alive: HashMap<String, Instant>,
    /// Dead letters written, by letter id: their digest and until when.
    letters: HashMap<String, (String, Instant)>,
    /// Doubts about each member's claims (see `Store::doubt`).
    doubts: HashMap<String, std::collections::BTreeSet<String>>,
}

#[derive(Clone)]
enum InboxValue {
    /// A claim, as `Claim::mark` writes it.
    Pending(String),
    Done(Answer),
}

impl InboxValue {
    fn raw(&self) -> Vec<u8> {
        match self {
            InboxValue::Pending(mark) => mark.clone().into_bytes(),
            InboxValue::Done(answer) => answer.encode(),
        }
    }
}

impl Inner {
    /// Whether a write carrying `fence` may go ahead: it carries none, or
    /// the token of its lease's latest grant.
    fn fence_holds(&self, fence: Option<&Fence>) -> bool {
        fence.is_none_or(|f| self.fences.get(&*f.lease).copied().unwrap_or(0) == f.token)
    }

    /// Takes or extends lease `name` for `owner` (`want`), or gives it up:
    /// its token, 0 if `owner` does not hold it.
    fn lease(&mut self, name: &str, want: bool, owner: &str, ttl: Duration) -> u64 {
        let now = Instant::now();
        let held_by = self
            .leases
            .get(name)
            .filter(|(_, expires)| *expires > now)
            .map(|(o, _)| o.as_str());
        match (want, held_by) {
            (true, Some(o)) if o == owner => {
                self.leases.insert(name.to_owned(), (owner.to_owned(), now + ttl));
                match self.fences.get(name).copied().unwrap_or(0) {
                    // As on Redis: a fence that vanished is granted anew.
                    0 => {
                        let clock = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(1, |d| d.as_millis() as u64);
                        self.fences.insert(name.to_owned(), clock);
                        clock
                    }
                    t => t,
                }
            }
            (true, Some(_)) => 0,
            (true, None) => {
                // As on Redis: the greater of the last token plus one and
                // the clock in milliseconds.
                let clock = crate::wire::now_ms();
                let token = self.fences.entry(name.to_owned()).or_insert(0);
                *token = (*token + 1).max(clock);
                let token = *token;
                self.leases.insert(name.to_owned(), (owner.to_owned(), now + ttl));
                token
            }
            (false, Some(o)) if o == owner => {
                self.leases.remove(name);
                0
            }
            (false, _) => 0,
        }
    }
}

impl MemoryStore {
    pub(crate) fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A store whose delayed messages come due by `clock`.
    pub(crate) fn with_clock(clock: Arc<Clock>) -> MemoryStore {
        MemoryStore {
            clock,
            ..MemoryStore::default()
        }
    }

    /// Its clock.
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Everything the store holds now: what a replica that lags behind
    /// has (see [`restore`](Self::restore)).
    pub(crate) fn snapshot(&self) -> Inner {
        self.lock().clone()
    }

    /// Goes back to `snapshot`, as after a failover to a replica that had
    /// not received the writes since (Redis replicates asynchronously):
    /// states, inbox answers, outbox entries, leases, fencing tokens and
    /// journals written since are lost. The outbox's entry numbers go on
    /// from the newest (Redis' stream ids are times, never issued twice:
    /// a number issued again would let the relay remove a new entry under
    /// a lost entry's id). It waits until the clock is past every fencing
    /// token granted so far, as a failover that takes seconds does on
    /// Redis: the next grant takes the clock, so no lost token is issued
    /// again.
    pub(crate) async fn restore(&self, mut snapshot: Inner) {
        loop {
            {
                let mut inner = self.lock();
                let newest = inner.fences.values().copied().max().unwrap_or(0);
                if crate::wire::now_ms() > newest.saturating_add(1) {
                    snapshot.next_entry = snapshot.next_entry.max(inner.next_entry);
                    *inner = snapshot;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.appended.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before it can
        // panic, so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn load(&self, kind: &str, key: &str) -> Result<Option<(u64, Bytes)>> {
        Ok(self.lock().state.get(&(kind.to_owned(), key.to_owned())).cloned())
    }

    fn append(inner: &mut Inner, events: Vec<OutboxEntry>, now_ms: u64) {
        for entry in events {
            inner.next_entry += 1;
            let n = inner.next_entry;
            match entry.due_ms {
                Some(due) => {
                    // The same id again replaces it, as Redis' ZADD does.
                    if let Some(at) = inner.delayed_ids.insert(entry.id.clone(), (due, n)) {
                        inner.delayed.remove(&at);
                    }
                    inner.delayed.insert((due, n), entry);
                }
                None => {
                    inner.outbox.insert(n, (entry, now_ms));
                }
            }
        }
    }

    /// Moves the delayed messages due by `now_ms` (at most `limit`) to the
    /// outbox; how many moved, and when the next is due.
    pub(crate) fn delayed_release(&self, now_ms: u64, limit: usize) -> (usize, Option<u64>) {
        let moved = {
            let mut inner = self.lock();
            let due: Vec<(u64, u64)> = inner
                .delayed
                .range(..=(now_ms, u64::MAX))
                .take(limit)
                .map(|(k, _)| *k)
                .collect();
            for key in &due {
                if let Some(mut entry) = inner.delayed.remove(key) {
                    inner.delayed_ids.remove(&entry.id);
                    entry.due_ms = None;
                    inner.next_entry += 1;
                    let n = inner.next_entry;
                    inner.outbox.insert(n, (entry, now_ms));
                }
            }
            (due.len(), inner.delayed.keys().next().map(|(due, _)| *due))
        };
        if moved.0 > 0 {
            self.appended.notify_waiters();
        }
        moved
    }

    /// Cancels a delayed message still waiting.
    pub(crate) fn delayed_cancel(&self, id: &str) -> bool {
        let mut inner = self.lock();
        match inner.delayed_ids.remove(id) {
            Some(at) => inner.delayed.remove(&at).is_some(),
            None => false,
        }
    }

    /// The delayed messages waiting, soonest first: id, subject, due time.
    pub(crate) fn delayed_list(&self, limit: usize) -> Vec<(String, String, u64)> {
        self.lock()
            .delayed
            .iter()
            .take(limit)
            .map(|((due, _), e)| (e.id.clone(), e.subject.clone(), *due))
            .collect()
    }

    pub(crate) async fn commit(&self, commit: &Commit) -> Result<Committed> {
        let appended = {
            let mut inner = self.lock();
            if !inner.fence_holds(commit.fence.as_ref()) {
                return Ok(Committed::Fenced);
            }
            for (index, w) in commit.states.iter().enumerate() {
                let current = inner
                    .state
                    .get(&(w.kind.clone(), w.key.clone()))
                    .map_or(0, |(v, _)| *v);
                if current != w.expected {
                    return Ok(Committed::Conflict { index, current });
                }
            }
            let now = Instant::now();
            if let Some(i) = &commit.inbox {
                let owned = matches!(
                    inner.inbox.get(&(i.scope.clone(), i.id.clone())),
                    Some((InboxValue::Pending(o), expires)) if *o == i.claim && *expires > now
                );
                if !owned {
                    return Ok(Committed::LostClaim);
                }
            }
            let mut versions = Vec::with_capacity(commit.states.len());
            for w in &commit.states {
                inner
                    .state
                    .insert((w.kind.clone(), w.key.clone()), (w.expected + 1, w.data.clone()));
                versions.push(w.expected + 1);
            }
            if let Some(i) = &commit.inbox {
                inner.inbox.insert(
                    (i.scope.clone(), i.id.clone()),
                    (InboxValue::Done(i.answer.clone()), now + i.window),
                );
            }
            Self::append(&mut inner, commit.events.clone(), self.clock.now_ms());
            (versions, !commit.events.is_empty())
        };
        if appended.1 {
            self.appended.notify_waiters();
        }
        Ok(Committed::Yes(appended.0))
    }

    pub(crate) async fn outbox_read(
        &self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        let deadline = Instant::now() + block;
        loop {
            let appended = self.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let read: Vec<(String, Option<OutboxEntry>)> = self
                .lock()
                .outbox
                .iter()
                .take(count)
                .map(|(n, (e, _))| (n.to_string(), Some(e.clone())))
                .collect();
            if !read.is_empty() {
                return Ok(read);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    pub(crate) async fn outbox_read_after(
        &self,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Option<OutboxEntry>)>> {
        let after: u64 = after.parse().unwrap_or(0);
        Ok(self
            .lock()
            .outbox
            .range(after + 1..)
            .take(count)
            .map(|(n, (e, _))| (n.to_string(), Some(e.clone())))
            .collect())
    }

    pub(crate) async fn outbox_remove(&self, ids: &[String]) -> Result<()> {
        let mut inner = self.lock();
        for id in ids {
            if let Ok(n) = id.parse::<u64>() {
                inner.outbox.remove(&n);
            }
        }
        Ok(())
    }

    pub(crate) async fn outbox_backlog(&self) -> Result<u64> {
        Ok(self.lock().outbox.len() as u64)
    }

    /// The outbox's waiting entries, and how long the oldest has waited
    /// by the store's clock.
    pub(crate) async fn outbox_waiting(&self) -> Result<(u64, Duration)> {
        let inner = self.lock();
        let oldest = inner.outbox.values().next().map_or(0, |(_, at)| *at);
        let age = if inner.outbox.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_millis(self.clock.now_ms().saturating_sub(oldest))
        };
        Ok((inner.outbox.len() as u64, age))
    }

    pub(crate) async fn inbox_begin(
        &self,
        scope: &str,
        id: &str,
        claim: &Claim,
        ttl: Duration,
        alive_for: Duration,
    ) -> Result<Inbox> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.alive.insert(claim.member.clone(), now + alive_for);
        let claim = claim.mark();
        let k = (scope.to_owned(), id.to_owned());
        let found = match inner.inbox.get(&k) {
            Some((value, expires)) if *expires > now => Some(value.clone()),
            _ => None,
        };
        // A claim whose replica is no longer alive has lapsed.
        let found = found.filter(|v| match v {
            InboxValue::Pending(mark) => Claim::parse(mark.as_bytes())
                .is_some_and(|(_, member)| inner.alive.get(member).is_some_and(|until| *until > now)),
            InboxValue::Done(_) => true,
        });
        match found {
            Some(v) => Ok(Inbox::from_raw(&v.raw())),
            None => {
                inner.inbox.insert(k, (InboxValue::Pending(claim), now + ttl));
                // Expired entries go when the map is touched, a few at a
                // time, so that it does not grow without bound.
                if inner.inbox.len() > 1024 {
                    inner.inbox.retain(|_, (_, expires)| *expires > now);
                }
                Ok(Inbox::Fresh)
            }
        }
    }

    pub(crate) async fn inbox_finish(
        &self,
        scope: &str,
        id: &str,
        claim: &str,
        answer: &Answer,
        window: Duration,
    ) -> Result<Finished> {
        let now = Instant::now();
        let mut inner = self.lock();
        let k = (scope.to_owned(), id.to_owned());
        match inner.inbox.get(&k) {
            Some((InboxValue::Pending(mark), expires)) if mark == claim && *expires > now => {
                inner
                    .inbox
                    .insert(k, (InboxValue::Done(answer.clone()), now + window));
                Ok(Finished::Kept)
            }
            Some((InboxValue::Done(kept), expires)) if *expires > now => {
                Ok(Finished::NotHeld(Some(kept.clone())))
            }
            _ => Ok(Finished::NotHeld(None)),
        }
    }

    pub(crate) async fn inbox_peek(&self, scope: &str, id: &str) -> Result<Option<Vec<u8>>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .inbox
            .get(&(scope.to_owned(), id.to_owned()))
            .filter(|(_, expires)| *expires > now)
            .map(|(v, _)| v.raw()))
    }

    pub(crate) async fn alive(&self, member: &str, ttl: Duration, alive: bool) -> Result<()> {
        let mut inner = self.lock();
        if alive {
            inner.alive.insert(member.to_owned(), Instant::now() + ttl);
        } else {
            inner.alive.remove(member);
        }
        Ok(())
    }

    /// Adds `doubt` to `member`'s doubts (kept until it looks: a member
    /// that never looks is a test's, gone with the store).
    pub(crate) fn doubt(&self, member: &str, doubt: String) -> Result<()> {
        let mut inner = self.lock();
        let doubts = inner.doubts.entry(member.to_owned()).or_default();
        // Bounded as a Redis set is by its expiry.
        if doubts.len() < 4 * super::DOUBTS {
            doubts.insert(doubt);
        }
        Ok(())
    }

    /// Takes up to [`DOUBTS`](super::DOUBTS) of `member`'s doubts.
    pub(crate) fn take_doubts(&self, member: &str) -> Vec<String> {
        let mut inner = self.lock();
        let Some(doubts) = inner.doubts.get_mut(member) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        while taken.len() < super::DOUBTS
            && let Some(d) = doubts.pop_first()
        {
            taken.push(d);
        }
        if doubts.is_empty() {
            inner.doubts.remove(member);
        }
        taken
    }

    pub(crate) async fn record_letter(&self, id: &str, digest: &str, keep: Duration) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.letters.len() > 1024 {
            inner.letters.retain(|_, (_, until)| *until > now);
        }
        inner
            .letters
            .insert(id.to_owned(), (digest.to_owned(), now + keep));
        Ok(())
    }

    pub(crate) async fn forget_letter(&self, id: &str) -> Result<()> {
        self.lock().letters.remove(id);
        Ok(())
    }

    pub(crate) async fn letter_digests(&self, ids: &[String]) -> Result<Vec<Option<String>>> {
        let now = Instant::now();
        let inner = self.lock();
        Ok(ids
            .iter()
            .map(|id| {
                inner
                    .letters
                    .get(id)
                    .filter(|(_, until)| *until > now)
                    .map(|(d, _)| d.clone())
            })
            .collect())
    }

    pub(crate) async fn saga_load(&self, id: &str) -> Result<std::collections::BTreeMap<String, Bytes>> {
        Ok(self.lock().sagas.get(id).cloned().unwrap_or_default())
    }

    pub(crate) async fn saga_write(
        &self,
        id: &str,
        fields: &[(&str, &[u8])],
        fence: Option<&Fence>,
        run: Option<(&str, &str)>,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.fence_holds(fence) {
            return Ok(false);
        }
        if let Some((scope, mark)) = run {
            let held = matches!(
                inner.inbox.get(&(scope.to_owned(), id.to_owned())),
                Some((InboxValue::Pending(m), expires)) if m == mark && *expires > now
            );
            if !held {
                return Ok(false);
            }
        }
        if !inner.sagas.contains_key(id) {
            inner.saga_order.push(id.to_owned());
        }
        let journal = inner.sagas.entry(id.to_owned()).or_default();
        for (field, value) in fields {
            journal.insert((*field).to_owned(), Bytes::copy_from_slice(value));
        }
        Ok(true)
    }

    pub(crate) async fn saga_list(&self, limit: usize) -> Result<Vec<String>> {
        Ok(self.lock().saga_order.iter().rev().take(limit).cloned().collect())
    }

    pub(crate) async fn lease_sync(
        &self,
        leases: &[(String, bool)],
        owner: &str,
        ttl: Duration,
    ) -> Result<Vec<u64>> {
        let mut inner = self.lock();
        Ok(leases
            .iter()
            .map(|(name, want)| inner.lease(name, *want, owner, ttl))
            .collect())
    }

    pub(crate) async fn members(
        &self,
        group: &str,
        member: &str,
        alive: bool,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let members = inner.members.entry(group.to_owned()).or_default();
        if alive {
            members.insert(member.to_owned(), now);
        } else {
            members.remove(member);
        }
        members.retain(|_, at| now.duration_since(*at) < timeout);
        let mut out: Vec<String> = members.keys().cloned().collect();
        out.sort_unstable();
        Ok(out)
    }

    pub(crate) async fn inbox_abandon(&self, scope: &str, id: &str, claim: &str) -> Result<()> {
        let mut inner = self.lock();
        let k = (scope.to_owned(), id.to_owned());
        if matches!(inner.inbox.get(&k), Some((InboxValue::Pending(o), _)) if o == claim) {
            inner.inbox.remove(&k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> OutboxEntry {
        OutboxEntry {
            id: id.into(),
            subject: "evt.x".into(),
            headers: vec![],
            payload: b"{}".to_vec(),
            due_ms: None,
        }
    }

    fn write(key: &str, expected: u64, data: &'static [u8]) -> super::super::StateWrite {
        super::super::StateWrite {
            kind: "k".into(),
            key: key.into(),
            expected,
            data: Bytes::from_static(data),
        }
    }

    #[tokio::test]
    async fn versions_guard_commits() {
        let s = MemoryStore::new();
        let one = Commit {
            states: vec![write("a", 0, b"1")],
            ..Commit::default()
        };
        assert_eq!(s.commit(&one).await.expect("commit"), Committed::Yes(vec![1]));
        assert_eq!(
            s.commit(&one).await.expect("commit"),
            Committed::Conflict { index: 0, current: 1 }
        );
        let two = Commit {
            states: vec![write("b", 0, b"x"), write("a", 1, b"2")],
            events: vec![entry("e1")],
            inbox: None,
            fence: None,
            home: None,
        };
        assert_eq!(s.commit(&two).await.expect("commit"), Committed::Yes(vec![1, 2]));
        assert_eq!(
            s.load("k", "a").await.expect("load"),
            Some((2, Bytes::from_static(b"2")))
        );
        assert_eq!(s.outbox_backlog().await.expect("backlog"), 1);
        // All or nothing: a conflict on the second key writes neither.
        let partial = Commit {
            states: vec![write("c", 0, b"c"), write("a", 1, b"3")],
            events: vec![entry("e2")],
            inbox: None,
            fence: None,
            home: None,
        };
        assert_eq!(
            s.commit(&partial).await.expect("commit"),
            Committed::Conflict { index: 1, current: 2 }
        );
        assert_eq!(s.load("k", "c").await.expect("load"), None);
        assert_eq!(s.outbox_backlog().await.expect("backlog"), 1);
    }

    #[tokio::test]
    async fn the_outbox_is_read_in_commit_order_until_removed() {
        let s = MemoryStore::new();
        for id in ["e1", "e2", "e3"] {
            let c = Commit {
                events: vec![entry(id)],
                ..Commit::default()
            };
            s.commit(&c).await.expect("commit");
        }
        let ids = |read: &[(String, Option<OutboxEntry>)]| -> Vec<String> {
            read.iter()
                .map(|(_, e)| e.as_ref().expect("readable").id.clone())
                .collect()
        };
        let read = s.outbox_read(2, Duration::ZERO).await.expect("read");
        assert_eq!(ids(&read), ["e1", "e2"]);
        // Only e2 went out: e1 is read first again, then e3.
        s.outbox_remove(&[read[1].0.clone()]).await.expect("remove");
        let read = s.outbox_read(10, Duration::ZERO).await.expect("read");
        assert_eq!(ids(&read), ["e1", "e3"]);
        let all: Vec<String> = read.into_iter().map(|(n, _)| n).collect();
        s.outbox_remove(&all).await.expect("remove");
        assert_eq!(s.outbox_backlog().await.expect("backlog"), 0);
        let waited = std::time::Instant::now();
        assert!(
            s.outbox_read(10, Duration::from_millis(50))
                .await
                .expect("read")
                .is_empty()
        );
        assert!(
            waited.elapsed() >= Duration::from_millis(40),
            "an empty outbox is waited on"
        );
    }

    #[tokio::test]
    async fn the_outbox_says_how_long_its_oldest_entry_waited() {
        let s = MemoryStore::new();
        assert_eq!(s.outbox_waiting().await.expect("waiting"), (0, Duration::ZERO));
        for id in ["e1", "e2"] {
            let c = Commit {
                events: vec![entry(id)],
                ..Commit::default()
            };
            s.commit(&c).await.expect("commit");
            s.clock().advance(Duration::from_secs(3));
        }
        let (n, oldest) = s.outbox_waiting().await.expect("waiting");
        assert_eq!(n, 2);
        assert!(
            oldest >= Duration::from_secs(6) && oldest < Duration::from_secs(7),
            "{oldest:?}"
        );
        // e1 went out: the age is e2's.
        let read = s.outbox_read(1, Duration::ZERO).await.expect("read");
        s.outbox_remove(&[read[0].0.clone()]).await.expect("remove");
        let (n, oldest) = s.outbox_waiting().await.expect("waiting");
        assert_eq!(n, 1);
        assert!(
            oldest >= Duration::from_secs(3) && oldest < Duration::from_secs(4),
            "{oldest:?}"
        );
    }

    #[tokio::test]
    async fn the_inbox_runs_a_message_once() {
        let s = MemoryStore::new();
        let ttl = Duration::from_secs(60);
        let d = crate::store::digest(b"payload");
        let claim = |attempt: &str, member: &str| Claim {
            digest: d.clone(),
            attempt: attempt.into(),
            member: member.into(),
        };
        let (r1, r2) = (claim("a1", "r1"), claim("a2", "r2"));
        s.alive("r1", ttl, true).await.expect("alive");
        s.alive("r2", ttl, true).await.expect("alive");
        async fn begin_on(s: &MemoryStore, c: &Claim, id: &str) -> Result<Inbox> {
            s.inbox_begin("h", id, c, Duration::from_secs(60), Duration::from_secs(60))
                .await
        }
        let begin = |c, id| begin_on(&s, c, id);
        assert_eq!(begin(&r1, "m1").await.expect("begin"), Inbox::Fresh);
        assert_eq!(begin(&r2, "m1").await.expect("begin"), Inbox::Busy(r1.mark()));
        let answer = Answer {
            digest: Some(d.clone()),
            reply: crate::store::StoredReply::Ok(Bytes::from_static(b"7")),
        };
        // Only the claim's holder keeps an answer.
        assert_eq!(
            s.inbox_finish("h", "m1", &r2.mark(), &answer, ttl)
                .await
                .expect("finish"),
            Finished::NotHeld(None)
        );
        assert_eq!(
            s.inbox_finish("h", "m1", &r1.mark(), &answer, ttl)
                .await
                .expect("finish"),
            Finished::Kept
        );
        assert_eq!(
            begin(&r2, "m1").await.expect("begin"),
            Inbox::Done(answer.clone())
        );
        assert_eq!(
            s.inbox_finish("h", "m1", &r1.mark(), &answer, ttl)
                .await
                .expect("finish"),
            Finished::NotHeld(Some(answer)),
            "answered: a late attempt gets the answer kept, and writes nothing"
        );
        // Abandoned: the next attempt runs it.
        assert_eq!(begin(&r1, "m2").await.expect("begin"), Inbox::Fresh);
        s.inbox_abandon("h", "m2", &r2.mark()).await.expect("not r2's");
        assert_eq!(begin(&r2, "m2").await.expect("begin"), Inbox::Busy(r1.mark()));
        s.inbox_abandon("h", "m2", &r1.mark()).await.expect("abandon");
        assert_eq!(begin(&r2, "m2").await.expect("begin"), Inbox::Fresh);
        // r2 dies: its claim lapses with its liveness, not with a lease.
        s.alive("r2", ttl, false).await.expect("leaves");
        assert_eq!(begin(&r1, "m2").await.expect("begin"), Inbox::Fresh);
        // A claim of the same payload by a live replica: busy, whatever
        // the claim's own time to live.
        s.alive("r2", ttl, true).await.expect("alive");
        assert_eq!(begin(&r2, "m2").await.expect("begin"), Inbox::Busy(r1.mark()));
    }

    #[tokio::test]
    async fn the_leader_lease_is_held_by_one_and_fences_the_old_holder() {
        let s = crate::store::Store::from(MemoryStore::new());
        let lease = Duration::from_millis(50);
        let a = s
            .leader_acquire("a", lease)
            .await
            .expect("acquire")
            .expect("granted");
        assert_eq!(
            s.leader_acquire("b", lease).await.expect("acquire"),
            None,
            "held by a"
        );
        assert_eq!(
            s.leader_acquire("a", lease).await.expect("again"),
            Some(a),
            "a keeps its token"
        );
        assert_eq!(s.leader_acquire("a", lease).await.expect("renew"), Some(a));
        let write = |fence| Commit {
            states: vec![crate::store::StateWrite {
                kind: "k".into(),
                key: "x".into(),
                expected: 0,
                data: Bytes::from_static(b"1"),
            }],
            events: vec![],
            inbox: None,
            fence: Some(Fence {
                lease: LEADER_LEASE.into(),
                token: fence,
            }),
            home: None,
        };
        // a stalls past its lease; b takes over with a newer token.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let b = s
            .leader_acquire("b", lease)
            .await
            .expect("acquire")
            .expect("granted");
        assert!(b > a);
        assert_eq!(
            s.leader_acquire("a", lease).await.expect("renew"),
            None,
            "a lost it"
        );
        assert_eq!(s.commit(&write(a)).await.expect("commit"), Committed::Fenced);
        assert!(s.load("k", "x").await.expect("load").is_none(), "nothing written");
        assert!(matches!(
            s.commit(&write(b)).await.expect("commit"),
            Committed::Yes(_)
        ));
        s.leader_release("a").await.expect("release");
        assert_eq!(
            s.leader_acquire("b", lease)
                .await
                .expect("a cannot release b's lease"),
            Some(b)
        );
        s.leader_release("b").await.expect("release");
        assert!(
            s.leader_acquire("a", lease).await.expect("acquire").is_some(),
            "free again"
        );
    }
}
