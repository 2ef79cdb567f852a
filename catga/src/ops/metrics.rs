//! Metrics through the `metrics` facade, exported in the Prometheus text
//! format by `metrics-exporter-prometheus`.
//!
//! The recorder is installed once per process, when a runtime serves
//! `/metrics` (`CATGA_HTTP_ADDR`); metrics that an application records
//! itself with the `metrics` macros appear on the same page. Without it,
//! recording costs a no-op call. Labels are bounded: handler and subject
//! (both fixed at compile time) and an outcome from a fixed list, never a
//! message id.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `catga_messages_received_total` | counter | handler, subject |
//! | `catga_messages_handled_total` | counter | handler, subject, outcome |
//! | `catga_handler_duration_seconds` | histogram | handler |
//! | `catga_handler_in_flight` | gauge | handler |
//! | `catga_handler_retries_total` | counter | handler |
//! | `catga_redeliveries_total` | counter | handler |
//! | `catga_dead_letters_total` | counter | handler |
//! | `catga_messages_dropped_total` | counter | handler |
//! | `catga_breaker_open` | gauge | handler |
//! | `catga_ready`, `catga_broker_connected`, `catga_store_up` | gauge | |
//! | `catga_slow_consumer_drops_total` | counter | |
//! | `catga_store_shard_up` | gauge | shard |
//! | `catga_outbox_backlog` | gauge | |
//! | `catga_outbox_shard_backlog`, `catga_outbox_oldest_seconds` | gauge | shard |
//! | `catga_delayed_pending` | gauge | |
//! | `catga_replica_info` (always 1) | gauge | service, version, region |

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{ALL_KINDS, ErrorKind};
use crate::registry::HandlerSpec;

/// The process's Prometheus recorder: `None` if another recorder was
/// installed first (by the application).
static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets, in seconds: 100 µs to 30 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Installs the Prometheus recorder (once per process) and returns its
/// handle, or `None` when the application installed another recorder.
pub(crate) fn install() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &BUCKETS)
                .and_then(PrometheusBuilder::install_recorder);
            match built {
                Ok(handle) => {
                    describe();
                    // Histograms keep their samples until upkeep folds
                    // them in: without scrapes they would grow.
                    let keep = handle.clone();
                    std::thread::Builder::new()
                        .name("catga-metrics-upkeep".to_owned())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(Duration::from_secs(5));
                                keep.run_upkeep();
                            }
                        })
                        .map_err(|e| tracing::warn!(error = %e, "no metrics upkeep thread"))
                        .ok();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "another metrics recorder is installed: /metrics cannot show catga's metrics"
                    );
                    None
                }
            }
        })
        .clone()
}

/// The installed recorder, if [`install`] ran and succeeded.
pub(crate) fn handle() -> Option<PrometheusHandle> {
    PROMETHEUS.get().cloned().flatten()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "catga_messages_received_total",
        "Messages taken from the broker, per handler"
    );
    describe_counter!(
        "catga_messages_handled_total",
        "Messages settled, per handler and outcome (ok, answered, expired, busy, waiting, or the error kind)"
    );
    describe_histogram!(
        "catga_handler_duration_seconds",
        metrics::Unit::Seconds,
        "Time from taking a message to settling it, retries included"
    );
    describe_gauge!("catga_handler_in_flight", "Messages being handled right now");
    describe_counter!(
        "catga_handler_retries_total",
        "Retries of a handler in place (retry = N)"
    );
    describe_counter!(
        "catga_redeliveries_total",
        "Durable messages given back for a later delivery"
    );
    describe_counter!("catga_dead_letters_total", "Messages moved to the dead letters");
    describe_counter!(
        "catga_messages_dropped_total",
        "Messages dropped because a subscription was full (its in-flight limit and queue)"
    );
    describe_gauge!(
        "catga_breaker_open",
        "1 while the handler's circuit breaker is open"
    );
    describe_gauge!("catga_ready", "1 while the replica is ready");
    describe_gauge!(
        "catga_replica_info",
        "Always 1: the replica's service, version and region (CATGA_REGION) as labels"
    );
    describe_gauge!("catga_broker_connected", "1 while the broker connection is up");
    describe_gauge!(
        "catga_store_up",
        "1 while the state store answers (with shards over a cluster: its master of the service's own keys and one shard's)"
    );
    describe_gauge!(
        "catga_store_shard_up",
        "1 while the master holding this store shard answers"
    );
    describe_counter!(
        "catga_slow_consumer_drops_total",
        "Messages the NATS client dropped because a subscription could not keep up"
    );
    describe_gauge!(
        "catga_outbox_backlog",
        "Events saved to the outbox and not yet published, in every shard (NaN while a shard does not answer)"
    );
    describe_gauge!(
        "catga_outbox_shard_backlog",
        "Events saved to this shard's outbox and not yet published (NaN while it does not answer)"
    );
    describe_gauge!(
        "catga_outbox_oldest_seconds",
        "How long the oldest event waiting in this shard's outbox has waited: the relay's lag (0 when none waits, NaN while the shard does not answer)"
    );
    describe_gauge!(
        "catga_delayed_pending",
        "Delayed messages waiting in the store until they are due"
    );
}

/// How a message ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Ok,
    Answered,
    Expired,
    Busy,
    /// A deliberate wait (a saga's durable timer): given back to the
    /// broker to come back later, not a failure.
    Waiting,
    Failed(ErrorKind),
}

const FIXED: [&str; 5] = ["ok", "answered", "expired", "busy", "waiting"];

impl Ended {
    fn index(self) -> usize {
        match self {
            Ended::Ok => 0,
            Ended::Answered => 1,
            Ended::Expired => 2,
            Ended::Busy => 3,
            Ended::Waiting => 4,
            Ended::Failed(kind) => FIXED.len() + ALL_KINDS.iter().position(|k| *k == kind).unwrap_or(0),
        }
    }

    fn label(index: usize) -> &'static str {
        FIXED
            .get(index)
            .copied()
            .unwrap_or_else(|| ALL_KINDS[index - FIXED.len()].as_str())
    }
}

/// One handler's metric handles, registered once: recording is an atomic
/// operation, no lookup per message.
pub(crate) struct HandlerMetrics {
    spec: &'static HandlerSpec,
    received: Counter,
    outcomes: [OnceLock<Counter>; FIXED.len() + ALL_KINDS.len()],
    duration: Histogram,
    in_flight: Gauge,
    pub retries: Counter,
    pub redeliveries: Counter,
    pub dead_letters: Counter,
    pub dropped: Counter,
    breaker_open: Gauge,
    /// The same, readable: for the NATS micro `$SRV.STATS` answer.
    pub stats: EndpointStats,
}

/// What NATS micro discovery reports of an endpoint.
#[derive(Default)]
pub(crate) struct EndpointStats {
    pub requests: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    pub processing_ns: std::sync::atomic::AtomicU64,
    pub last_error: std::sync::Mutex<String>,
}

impl HandlerMetrics {
    pub(crate) fn new(spec: &'static HandlerSpec) -> HandlerMetrics {
        let (h, s) = (spec.name(), spec.subject());
        HandlerMetrics {
            spec,
            received: counter!("catga_messages_received_total", "handler" => h, "subject" => s),
            outcomes: std::array::from_fn(|_| OnceLock::new()),
            duration: histogram!("catga_handler_duration_seconds", "handler" => h),
            in_flight: gauge!("catga_handler_in_flight", "handler" => h),
            retries: counter!("catga_handler_retries_total", "handler" => h),
            redeliveries: counter!("catga_redeliveries_total", "handler" => h),
            dead_letters: counter!("catga_dead_letters_total", "handler" => h),
            dropped: counter!("catga_messages_dropped_total", "handler" => h),
            breaker_open: gauge!("catga_breaker_open", "handler" => h),
            stats: EndpointStats::default(),
        }
    }

    /// A message was taken: counts it and returns when it started.
    pub(crate) fn start(&self) -> std::time::Instant {
        self.received.increment(1);
        self.in_flight.increment(1.0);
        std::time::Instant::now()
    }

    /// A message was settled.
    pub(crate) fn end(&self, started: std::time::Instant, ended: Ended) {
        use std::sync::atomic::Ordering::Relaxed;
        let took = started.elapsed();
        self.in_flight.decrement(1.0);
        self.duration.record(took.as_secs_f64());
        self.stats.requests.fetch_add(1, Relaxed);
        self.stats
            .processing_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        if let Ended::Failed(kind) = ended {
            self.stats.errors.fetch_add(1, Relaxed);
            let mut last = self
                .stats
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.as_str() != kind.as_str() {
                kind.as_str().clone_into(&mut last);
            }
        }
        let i = ended.index();
        if let Some(slot) = self.outcomes.get(i) {
            slot.get_or_init(|| {
                counter!(
                    "catga_messages_handled_total",
                    "handler" => self.spec.name(),
                    "subject" => self.spec.subject(),
                    "outcome" => Ended::label(i)
                )
            })
            .increment(1);
        }
    }

    /// The breaker is open (`true`) or lets messages through.
    pub(crate) fn breaker(&self, open: bool) {
        self.breaker_open.set(if open { 1.0 } else { 0.0 });
    }
}

/// The replica's identity as labels of a gauge at 1 (Prometheus' "info"
/// pattern), so that dashboards can group by region.
pub(crate) fn info(service: &str, version: &str, region: Option<&str>) {
    gauge!(
        "catga_replica_info",
        "service" => service.to_owned(),
        "version" => version.to_owned(),
        "region" => region.unwrap_or("").to_owned()
    )
    .set(1.0);
}

/// Sets the replica-wide gauges, before a scrape.
pub(crate) fn replica(
    ready: bool,
    connected: bool,
    store_up: bool,
    slow_consumer_drops: u64,
    outbox: &[crate::error::Result<crate::store::OutboxShard>],
    delayed: Option<u64>,
) {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge!("catga_ready").set(flag(ready));
    gauge!("catga_broker_connected").set(flag(connected));
    gauge!("catga_store_up").set(flag(store_up));
    counter!("catga_slow_consumer_drops_total").absolute(slow_consumer_drops);
    // A figure the store did not give is unknown (NaN), not the last one
    // seen nor zero.
    let mut total = if outbox.is_empty() { f64::NAN } else { 0.0 };
    for (n, shard) in outbox.iter().enumerate() {
        let label = n.to_string();
        let (waiting, oldest) = match shard {
            Ok(s) => (s.waiting as f64, s.oldest.as_secs_f64()),
            Err(_) => (f64::NAN, f64::NAN),
        };
        total += waiting;
        gauge!("catga_outbox_shard_backlog", "shard" => label.clone()).set(waiting);
        gauge!("catga_outbox_oldest_seconds", "shard" => label).set(oldest);
    }
    gauge!("catga_outbox_backlog").set(total);
    if let Some(n) = delayed {
        gauge!("catga_delayed_pending").set(n as f64);
    }
}

/// Sets whether each store shard answers (`None`) or not.
pub(crate) fn store_shards(answers: &[Option<String>]) {
    for (n, why) in answers.iter().enumerate() {
        gauge!("catga_store_shard_up", "shard" => n.to_string()).set(if why.is_none() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_label() {
        let mut labels: Vec<&str> = (0..FIXED.len() + ALL_KINDS.len()).map(Ended::label).collect();
        assert_eq!(Ended::label(Ended::Failed(ErrorKind::Stale).index()), "stale");
        assert_eq!(Ended::label(Ended::Ok.index()), "ok");
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FIXED.len() + ALL_KINDS.len());
    }
}
