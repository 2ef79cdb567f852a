//! The typed state API of a handler's [`Context`]: load a value with its
//! version, change it, save it with the events it produced, in one atomic
//! store operation.
//!
//! ```
//! # use catga::{command, event, Context, Error, Result, State};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)]
//! # pub struct Order { pub paid_cents: u64 }
//! # impl State for Order { const KIND: &'static str = "order"; }
//! # impl Order {
//! #     fn pay(&mut self, cents: u64) -> Result<()> {
//! #         if self.paid_cents > 0 { return Err(Error::conflict("paid already")); }
//! #         self.paid_cents = cents;
//! #         Ok(())
//! #     }
//! # }
//! # #[event]
//! # #[derive(Serialize, Deserialize)]
//! # pub struct OrderPaid { pub id: String, pub amount_cents: u64 }
//! # #[command]
//! # #[derive(Serialize, Deserialize)]
//! # pub struct PayOrder { pub id: String, pub amount_cents: u64 }
//! # #[command]
//! # async fn pay_order(ctx: &Context, cmd: PayOrder) -> Result<()> {
//! let mut order = ctx.load::<Order>(&cmd.id).await?;        // NotFound if missing
//! order.pay(cmd.amount_cents)?;
//! ctx.save(order)                                           // Stale if it changed
//!     .with_event(OrderPaid { id: cmd.id, amount_cents: cmd.amount_cents })
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! In a handler that is not idempotent each save commits at once. In an
//! idempotent one (an `idempotent` command type, or `#[event(idempotent)]`)
//! saves and publishes are kept until the handler answers, then committed
//! together with the answer to the inbox: all of it or none, so a replica
//! that dies half way leaves nothing behind, and a retry of a message that
//! was answered gets the same answer without running again.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use bytes::Bytes;

use crate::client::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Event;
use crate::store::{Commit, Committed, OutboxEntry, StagedState, State, StateWrite, Versioned};
use crate::wire::codec::{Decode, Encode};

impl Context {
    /// Loads the state `key` of kind `T`, with its version; a missing key is
    /// [`ErrorKind::NotFound`].
    pub async fn load<T: State>(&self, key: &str) -> Result<Versioned<T>> {
        self.try_load(key)
            .await?
            .ok_or_else(|| Error::not_found(format!("{} {key} does not exist", T::KIND)))
    }

    /// Loads the state `key` of kind `T`, or `None` if there is none. In an
    /// idempotent handler, a value it saved earlier is read back as saved.
    pub async fn try_load<T: State>(&self, key: &str) -> Result<Option<Versioned<T>>> {
        let work = self.work();
        if let Some(staged) = &work.staged {
            let found = {
                let staged = staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                staged
                    .states
                    .iter()
                    .find(|s| s.kind == T::KIND && s.key == key)
                    .map(|s| (s.version, s.data.clone()))
            };
            if let Some((version, data)) = found {
                return decode::<T>(key, version, &data).map(Some);
            }
        }
        match work.store.load(T::KIND, key).await? {
            Some((version, data)) => decode::<T>(key, version, &data).map(Some),
            None => Ok(None),
        }
    }

    /// Saves `state` (if nobody saved its key since it was loaded); add the
    /// events it produced with [`Save::with_event`]: they go out through
    /// the outbox, never lost once the save returned. A stale version is a
    /// retryable [`ErrorKind::Stale`]; `retry = N` on the handler runs it
    /// again with fresh state.
    pub fn save<T: State>(&self, state: Versioned<T>) -> Save<'_, T> {
        Save {
            ctx: self,
            state,
            events: Ok(Vec::new()),
        }
    }

    /// An event as the outbox keeps it (see [`outbox_entry`](crate::client::outbox_entry)).
    pub(crate) fn outbox_entry<E: Event>(&self, event: &E) -> Result<OutboxEntry> {
        crate::client::outbox_entry(
            self.client().transport(),
            self.child_headers(true, E::VERSION),
            event,
        )
    }

    /// Publishes `event` once `delay` has passed (see
    /// [`publish_at`](Self::publish_at)); returns its message id, which
    /// [`Runtime::cancel_delayed`](crate::Runtime::cancel_delayed) takes.
    pub async fn publish_after<E: Event>(&self, delay: std::time::Duration, event: E) -> Result<String> {
        self.publish_at(
            crate::client::after_now(self.client().transport().clock(), delay)?,
            event,
        )
        .await
    }

    /// Publishes `event` at `at`, not before: it waits in the service's
    /// store (Redis, or the embedded store), committed like an event saved
    /// with state: with the handler's answer in an idempotent handler (or
    /// not at all), under the lease's fence in a `leader` handler or a
    /// keyed saga, at once otherwise. When it is due, the outbox relay
    /// stores it in its subject's stream like any event of the outbox, so
    /// it survives restarts of every replica and of the broker, and
    /// durable handlers get it once. Returns its message id, derived from
    /// the message being handled, the handler and the order of its sends:
    /// a run repeated schedules the same message again, replacing the
    /// one waiting.
    pub async fn publish_at<E: Event>(&self, at: std::time::SystemTime, event: E) -> Result<String> {
        let headers = self.delayed_headers(E::VERSION);
        let mut entry = crate::client::outbox_entry(self.client().transport(), headers, &event)?;
        entry.due_ms = Some(crate::wire::unix_ms(at));
        let id = entry.id.clone();
        if let Some(staged) = &self.work().staged {
            staged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .events
                .push(entry);
            return Ok(id);
        }
        self.work().check_fence()?;
        self.commit_events(vec![entry]).await?;
        Ok(id)
    }

    /// Commits `events` to the outbox alone, under the handler's fence.
    pub(crate) async fn commit_events(&self, events: Vec<OutboxEntry>) -> Result<()> {
        let work = self.work();
        let commit = Commit {
            states: Vec::new(),
            events,
            inbox: None,
            fence: work.fence.clone(),
            home: work.home.clone().or_else(|| work.events_home.clone()),
        };
        match work.store.commit(&commit).await? {
            Committed::Fenced => Err(fenced()),
            _ => Ok(()),
        }
    }

    async fn commit_save<T: State>(
        &self,
        state: Versioned<T>,
        events: Vec<OutboxEntry>,
    ) -> Result<Versioned<T>> {
        let data = state.encode_value()?;
        let work = self.work();
        if let Some(staged) = &work.staged {
            // Refused at the save rather than when the handler answers.
            if let Some(home) = &work.home {
                work.store.check_shard(home, T::KIND, state.key())?;
            }
            let mut staged = staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let version = match staged
                .states
                .iter_mut()
                .find(|s| s.kind == T::KIND && s.key == state.key())
            {
                Some(s) if s.version != state.version() => {
                    return Err(conflict::<T>(state.key(), state.version(), s.version));
                }
                Some(s) => {
                    s.version += 1;
                    s.data = data;
                    s.version
                }
                None => {
                    staged.states.push(StagedState {
                        kind: T::KIND,
                        key: state.key().to_owned(),
                        expected: state.version(),
                        version: state.version() + 1,
                        data,
                    });
                    state.version() + 1
                }
            };
            staged.events.extend(events);
            let (key, value) = (state.key().to_owned(), state.into_inner());
            return Ok(Versioned::loaded(key, version, value));
        }
        let commit = Commit {
            states: vec![StateWrite {
                kind: T::KIND.to_owned(),
                key: state.key().to_owned(),
                expected: state.version(),
                data,
            }],
            events,
            inbox: None,
            fence: work.fence.clone(),
            home: work.home.clone(),
        };
        match work.store.commit(&commit).await? {
            Committed::Yes(versions) => {
                let version = versions.first().copied().unwrap_or(state.version() + 1);
                let (key, value) = (state.key().to_owned(), state.into_inner());
                Ok(Versioned::loaded(key, version, value))
            }
            Committed::Conflict { current, .. } => Err(conflict::<T>(state.key(), state.version(), current)),
            Committed::LostClaim => Err(Error::new(
                ErrorKind::Unavailable,
                "the message was taken over; retry",
            )),
            Committed::Fenced => Err(fenced()),
        }
    }
}

pub(crate) use crate::store::fenced;

fn conflict<T: State>(key: &str, loaded: u64, now: u64) -> Error {
    let what = if loaded == 0 {
        format!("{} {key} exists already (version {now})", T::KIND)
    } else {
        format!(
            "{} {key} changed since it was loaded (loaded at version {loaded}, now {now})",
            T::KIND
        )
    };
    Error::stale(what)
}

fn decode<T: State>(key: &str, version: u64, data: &[u8]) -> Result<Versioned<T>> {
    let value = T::decode(data, T::KIND).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("stored {} {key} cannot be read: {}", T::KIND, e.message()),
        )
    })?;
    Ok(Versioned::loaded(key.to_owned(), version, value))
}

impl<T: State> Versioned<T> {
    fn encode_value(&self) -> Result<Bytes> {
        (**self).encode()
    }
}

/// A save in the making: add the events the change produced, then await
/// it. Returns the saved value with its new version.
#[must_use = "a save does nothing until awaited"]
pub struct Save<'a, T> {
    ctx: &'a Context,
    state: Versioned<T>,
    events: Result<Vec<OutboxEntry>>,
}

impl<T: State> Save<'_, T> {
    /// Adds an event to publish, atomically with the state.
    pub fn with_event<E: Event>(mut self, event: E) -> Self {
        if let Ok(events) = &mut self.events {
            match self.ctx.outbox_entry(&event) {
                Ok(e) => events.push(e),
                Err(e) => self.events = Err(e),
            }
        }
        self
    }

    /// Adds events to publish, atomically with the state.
    pub fn with_events<E: Event>(mut self, events: impl IntoIterator<Item = E>) -> Self {
        for e in events {
            self = self.with_event(e);
        }
        self
    }
}

impl<'a, T: State> IntoFuture for Save<'a, T> {
    type Output = Result<Versioned<T>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Versioned<T>>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let events = self.events?;
            self.ctx.commit_save(self.state, events).await
        })
    }
}
