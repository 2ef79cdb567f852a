//! The in-memory store: the embedded mode's twin of Redis, same semantics
//! (versions, an outbox with entries taken, marked sent, and taken over
//! when their relay goes quiet, an inbox with leases and windows).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Commit, Committed, Fence, Inbox, LEADER_LEASE, OutboxEntry, StoredReply};
use crate::error::Result;

#[derive(Default)]
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    /// Wakes a relay waiting for new outbox entries.
    appended: Notify,
}

#[derive(Default)]
struct Inner {
    state: HashMap<(String, String), (u64, Bytes)>,
    outbox: BTreeMap<u64, Queued>,
    next_entry: u64,
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
}

struct Queued {
    entry: OutboxEntry,
    /// The relay that took it, and when.
    taken: Option<(String, Instant)>,
}

#[derive(Clone)]
enum InboxValue {
    Pending(String),
    Done(StoredReply),
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
                self.fences.get(name).copied().unwrap_or(0)
            }
            (true, Some(_)) => 0,
            (true, None) => {
                let token = self.fences.entry(name.to_owned()).or_insert(0);
                *token += 1;
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before it can
        // panic, so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        Ok(())
    }

    pub(crate) async fn load(&self, kind: &str, key: &str) -> Result<Option<(u64, Bytes)>> {
        Ok(self.lock().state.get(&(kind.to_owned(), key.to_owned())).cloned())
    }

    fn append(inner: &mut Inner, events: Vec<OutboxEntry>) {
        for entry in events {
            inner.next_entry += 1;
            let n = inner.next_entry;
            inner.outbox.insert(n, Queued { entry, taken: None });
        }
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
                    Some((InboxValue::Pending(o), expires)) if *o == i.owner && *expires > now
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
                    (InboxValue::Done(i.reply.clone()), now + i.window),
                );
            }
            Self::append(&mut inner, commit.events.clone());
            (versions, !commit.events.is_empty())
        };
        if appended.1 {
            self.appended.notify_waiters();
        }
        Ok(Committed::Yes(appended.0))
    }

    fn take_now(&self, relay: &str, count: usize, stale: Duration) -> Vec<(String, OutboxEntry)> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut out = Vec::new();
        for (n, q) in inner.outbox.iter_mut() {
            if out.len() >= count {
                break;
            }
            let free = match &q.taken {
                None => true,
                Some((_, at)) => now.duration_since(*at) >= stale,
            };
            if free {
                q.taken = Some((relay.to_owned(), now));
                out.push((n.to_string(), q.entry.clone()));
            }
        }
        out
    }

    pub(crate) async fn outbox_take(
        &self,
        relay: &str,
        count: usize,
        block: Duration,
        stale: Duration,
    ) -> Result<Vec<(String, OutboxEntry)>> {
        let deadline = Instant::now() + block;
        loop {
            let appended = self.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let taken = self.take_now(relay, count, stale);
            if !taken.is_empty() {
                return Ok(taken);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    pub(crate) async fn outbox_done(&self, ids: &[String]) -> Result<()> {
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

    pub(crate) async fn inbox_begin(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Inbox> {
        let now = Instant::now();
        let mut inner = self.lock();
        let k = (scope.to_owned(), id.to_owned());
        match inner.inbox.get(&k) {
            Some((value, expires)) if *expires > now => Ok(match value {
                InboxValue::Done(r) => Inbox::Done(r.clone()),
                InboxValue::Pending(_) => Inbox::Busy,
            }),
            _ => {
                inner
                    .inbox
                    .insert(k, (InboxValue::Pending(owner.to_owned()), now + lease));
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
        reply: &StoredReply,
        window: Duration,
    ) -> Result<()> {
        self.lock().inbox.insert(
            (scope.to_owned(), id.to_owned()),
            (InboxValue::Done(reply.clone()), Instant::now() + window),
        );
        Ok(())
    }

    pub(crate) async fn saga_load(&self, id: &str) -> Result<std::collections::BTreeMap<String, Bytes>> {
        Ok(self.lock().sagas.get(id).cloned().unwrap_or_default())
    }

    pub(crate) async fn saga_write(
        &self,
        id: &str,
        field: &str,
        value: &[u8],
        fence: Option<&Fence>,
    ) -> Result<bool> {
        let mut inner = self.lock();
        if !inner.fence_holds(fence) {
            return Ok(false);
        }
        if !inner.sagas.contains_key(id) {
            inner.saga_order.push(id.to_owned());
        }
        inner
            .sagas
            .entry(id.to_owned())
            .or_default()
            .insert(field.to_owned(), Bytes::copy_from_slice(value));
        Ok(true)
    }

    pub(crate) async fn saga_list(&self, limit: usize) -> Result<Vec<String>> {
        Ok(self.lock().saga_order.iter().rev().take(limit).cloned().collect())
    }

    pub(crate) async fn leader_renew(&self, owner: &str, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.lock();
        Ok(match inner.leases.get_mut(LEADER_LEASE) {
            Some((o, expires)) if o == owner && *expires > now => {
                *expires = now + lease;
                true
            }
            _ => false,
        })
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

    pub(crate) async fn inbox_renew(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.lock();
        let k = (scope.to_owned(), id.to_owned());
        Ok(match inner.inbox.get_mut(&k) {
            Some((InboxValue::Pending(o), expires)) if o == owner && *expires > now => {
                *expires = now + lease;
                true
            }
            _ => false,
        })
    }

    pub(crate) async fn inbox_abandon(&self, scope: &str, id: &str, owner: &str) -> Result<()> {
        let mut inner = self.lock();
        let k = (scope.to_owned(), id.to_owned());
        if matches!(inner.inbox.get(&k), Some((InboxValue::Pending(o), _)) if o == owner) {
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
        };
        assert_eq!(
            s.commit(&partial).await.expect("commit"),
            Committed::Conflict { index: 1, current: 2 }
        );
        assert_eq!(s.load("k", "c").await.expect("load"), None);
        assert_eq!(s.outbox_backlog().await.expect("backlog"), 1);
    }

    #[tokio::test]
    async fn outbox_entries_are_taken_over_when_their_relay_goes_quiet() {
        let s = MemoryStore::new();
        let c = Commit {
            events: vec![entry("e1")],
            ..Commit::default()
        };
        s.commit(&c).await.expect("commit");
        let stale = Duration::from_millis(50);
        let a = s.outbox_take("a", 10, Duration::ZERO, stale).await.expect("take");
        assert_eq!(a.len(), 1);
        assert!(
            s.outbox_take("b", 10, Duration::ZERO, stale)
                .await
                .expect("take")
                .is_empty()
        );
        tokio::time::sleep(stale).await;
        let b = s.outbox_take("b", 10, Duration::ZERO, stale).await.expect("take");
        assert_eq!(b.len(), 1, "relay a went quiet: b takes over");
        s.outbox_done(&[b[0].0.clone()]).await.expect("done");
        assert_eq!(s.outbox_backlog().await.expect("backlog"), 0);
    }

    #[tokio::test]
    async fn the_inbox_runs_a_message_once() {
        let s = MemoryStore::new();
        let lease = Duration::from_secs(5);
        assert_eq!(
            s.inbox_begin("h", "m1", "r1", lease).await.expect("begin"),
            Inbox::Fresh
        );
        assert_eq!(
            s.inbox_begin("h", "m1", "r2", lease).await.expect("begin"),
            Inbox::Busy
        );
        let reply = StoredReply::Ok(Bytes::from_static(b"7"));
        s.inbox_finish("h", "m1", &reply, lease).await.expect("finish");
        assert_eq!(
            s.inbox_begin("h", "m1", "r2", lease).await.expect("begin"),
            Inbox::Done(reply)
        );
        assert_eq!(
            s.inbox_begin("h", "m2", "r1", lease).await.expect("begin"),
            Inbox::Fresh
        );
        assert!(s.inbox_renew("h", "m2", "r1", lease).await.expect("renew"));
        assert!(!s.inbox_renew("h", "m2", "r2", lease).await.expect("renew"));
        s.inbox_abandon("h", "m2", "r1").await.expect("abandon");
        assert!(!s.inbox_renew("h", "m2", "r1", lease).await.expect("renew"));
        assert_eq!(
            s.inbox_begin("h", "m2", "r2", lease).await.expect("begin"),
            Inbox::Fresh
        );
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
        assert!(s.leader_renew("a", lease).await.expect("renew"));
        assert!(!s.leader_renew("b", lease).await.expect("renew"));
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
        };
        // a stalls past its lease; b takes over with a newer token.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let b = s
            .leader_acquire("b", lease)
            .await
            .expect("acquire")
            .expect("granted");
        assert!(b > a);
        assert!(!s.leader_renew("a", lease).await.expect("renew"), "a lost it");
        assert_eq!(s.commit(&write(a)).await.expect("commit"), Committed::Fenced);
        assert!(s.load("k", "x").await.expect("load").is_none(), "nothing written");
        assert!(matches!(
            s.commit(&write(b)).await.expect("commit"),
            Committed::Yes(_)
        ));
        s.leader_release("a").await.expect("release");
        assert!(
            s.leader_renew("b", lease)
                .await
                .expect("a cannot release b's lease")
        );
        s.leader_release("b").await.expect("release");
        assert!(
            s.leader_acquire("a", lease).await.expect("acquire").is_some(),
            "free again"
        );
    }
}
