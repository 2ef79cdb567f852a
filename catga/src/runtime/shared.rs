//! What every serve loop of one runtime shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::leader::Leadership;
use super::ready::Health;
use super::served::Served;
use crate::client::Client;
use crate::config::Config;

/// What every serve loop of one runtime shares.
pub(crate) struct Shared {
    pub client: Client,
    pub config: Config,
    pub health: Health,
    pub store: crate::store::Store,
    /// Subjects with a durable handler in this process.
    pub durable_subjects: Arc<std::collections::HashSet<&'static str>>,
    /// The handlers being served, for NATS micro discovery.
    pub endpoints: std::sync::Mutex<HashMap<&'static str, Arc<Served>>>,
    /// The keyed sagas this replica runs, with the partitions it serves
    /// and whether it routes, for NATS micro discovery (kept by the
    /// keyed sagas' ownership loop).
    pub keyed_view: std::sync::Mutex<Vec<KeyedView>>,
    /// What handlers that stage nothing work with (shared by all).
    pub plain_work: Arc<crate::store::Work>,
    /// This replica's side of the leader lease.
    pub leadership: Leadership,
    /// This replica's side of the outbox relay's leases (one per shard).
    pub relay: Arc<super::outbox::RelayLeases>,
    /// Messages dropped for a full subscription.
    pub dropped: AtomicU64,
    /// Requests not started because their sender stopped waiting.
    pub expired: AtomicU64,
    /// The handlers this replica serves.
    pub handlers: Vec<&'static crate::registry::HandlerSpec>,
    /// Their AsyncAPI document, made at the first `$SRV.SCHEMA` request.
    pub asyncapi: std::sync::OnceLock<bytes::Bytes>,
    /// The tasks that take messages and come and go while it runs, for a
    /// dropped runtime to stop.
    pub tasks: Tasks,
}

/// The tasks of a runtime that take messages and come and go while it
/// runs: serve loops, keyed sagas' routers, their ownership loop and the
/// drains of what it gives up. Dropping the runtime aborts every one, as
/// a killed process stops them.
///
/// Held apart from the maps that name them, which are behind async locks
/// a drop cannot wait for: the fault simulator found a killed replica
/// whose ownership loop held its lock at that moment, so the replica's
/// partition serve loops went on, each holding a delivery forever (a run
/// not settled in 30 s, 1 in 20 runs of the order system's seed 0 on a
/// loaded host). A drain's task dropped its loops' handles when aborted,
/// which leaves tasks running too.
#[derive(Default)]
pub(crate) struct Tasks(std::sync::Mutex<TaskList>, Arc<std::sync::atomic::AtomicBool>);

#[derive(Default)]
struct TaskList {
    running: Vec<tokio::task::AbortHandle>,
    /// Aborted: a task spawned after (by one that was being polled right
    /// then, on another thread) is aborted at once.
    aborted: bool,
}

impl Tasks {
    /// Spawns `task` on the current tokio runtime, to be aborted with the
    /// others.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // A task spawned while the runtime is dropped may be polled on
        // another thread before its abort lands: it waits instead of
        // taking a message.
        let aborted = Arc::clone(&self.1);
        let handle = tokio::spawn(async move {
            if aborted.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
            task.await
        });
        let mut list = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.aborted {
            handle.abort();
        } else {
            // The finished ones go as new ones come: a replica spawns a
            // few per partition hand-over, not per message.
            list.running.retain(|t| !t.is_finished());
            list.running.push(handle.abort_handle());
        }
        handle
    }

    /// Aborts every task spawned so far and every one spawned after.
    pub(crate) fn abort_all(&self) {
        let mut list = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.1.store(true, Ordering::Release);
        list.aborted = true;
        for t in list.running.drain(..) {
            t.abort();
        }
    }
}

/// One keyed saga as this replica runs it (see [`Shared::keyed_view`]).
#[derive(Clone)]
pub(crate) struct KeyedView {
    pub spec: &'static crate::registry::HandlerSpec,
    /// The partitions served here, and their serve loops' counters.
    pub partitions: Vec<(u32, Arc<Served>)>,
    /// The router shares this replica runs (see `keyed::router_shares`).
    pub routing: Vec<u32>,
}

impl Shared {
    /// The AsyncAPI document of this replica's handlers (see
    /// [`crate::schema`]).
    pub fn asyncapi(&self) -> serde_json::Value {
        crate::schema::document(&self.config.service, &self.config.service_version, &self.handlers)
    }

    /// The same, encoded once for discovery's answers.
    pub fn asyncapi_bytes(&self) -> bytes::Bytes {
        self.asyncapi
            .get_or_init(|| self.asyncapi().to_string().into())
            .clone()
    }

    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::Tasks;
    use std::time::Duration;

    #[tokio::test]
    async fn every_task_is_aborted_and_one_spawned_after_too() {
        let tasks = Tasks::default();
        let pending = tasks.spawn(std::future::pending::<()>());
        let done = tasks.spawn(async {});
        done.await.expect("a task that ends");
        // A finished task is dropped from the list when the next comes.
        let second = tasks.spawn(std::future::pending::<()>());
        assert_eq!(tasks.0.lock().expect("list").running.len(), 2);
        tasks.abort_all();
        for t in [pending, second] {
            let e = t.await.expect_err("aborted");
            assert!(e.is_cancelled(), "{e}");
        }
        let late = tasks.spawn(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let e = late.await.expect_err("aborted at once");
        assert!(e.is_cancelled(), "{e}");
    }
}
