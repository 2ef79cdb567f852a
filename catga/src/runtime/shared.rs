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
