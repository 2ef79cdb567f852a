//! One handler as a runtime serves it ([`Served`]), and its running
//! serve loops ([`Serving`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::serve::ServeReport;
use super::{Shared, keyed};
use crate::config::Config;
use crate::error::Result;
use crate::registry::HandlerSpec;
use crate::transport::{DurableOptions, SubscribeTo, subject_token};

/// One handler as this runtime serves it.
pub(crate) struct Served {
    pub spec: &'static HandlerSpec,
    pub to: SubscribeTo,
    /// Handler invocations in flight per subscription.
    pub limit: usize,
    /// Messages queued per subscription beyond `limit`.
    pub capacity: usize,
    /// Bytes queued per subscription beyond `limit`.
    pub capacity_bytes: usize,
    /// Subscriptions (and tasks).
    pub parallel: usize,
    /// The durable consumer it pulls from, if any.
    pub durable: Option<(String, DurableOptions)>,
    /// The partition of a keyed saga it serves, if it does.
    pub partition: Option<Arc<keyed::Partition>>,
    /// How often to tell the broker a durable message is still being
    /// handled (a third of its ack wait).
    pub progress: Option<Duration>,
    /// Deliveries of a durable message before it is dead-lettered.
    pub max_deliver: u32,
    pub breaker: crate::resilience::Breaker,
    pub metrics: crate::ops::metrics::HandlerMetrics,
}

impl Served {
    /// Served only while this replica holds a lease (a leader handler, a
    /// keyed saga's partition): its subscriptions come and go as leases
    /// move (see `Health::want`).
    pub(crate) fn elective(&self) -> bool {
        self.partition.is_some() || self.spec.is_leader()
    }

    pub(crate) fn new(spec: &'static HandlerSpec, config: &Config) -> Served {
        let parallel = spec.parallel().unwrap_or(config.parallel).max(1);
        let queue_group = match spec.queue_group() {
            Some(g) => Some(g.to_owned()),
            // Several subscriptions of a fan-out event handler would each
            // get every event: they share a queue group of their own, so
            // that this replica still gets every event once.
            None if parallel > 1 => Some(private_group(&config.instance_id, spec)),
            None => None,
        };
        let mut limit = spec.concurrency().unwrap_or(config.concurrency).max(1);
        let mut max_ack_pending = (limit * parallel * 4).max(256);
        let mut ack_wait = config.ack_wait;
        let job = spec.job();
        if let Some(job) = job {
            // One occurrence at a time over every replica, unless the job
            // allows overlapping runs.
            if !job.overlap {
                limit = 1;
                max_ack_pending = 1;
            }
            ack_wait = ack_wait.min(super::jobs::ACK_WAIT);
        }
        let max_deliver = spec.max_deliver().unwrap_or(config.max_deliver).max(1);
        let durable = spec.durable().map(|name| {
            (
                name.to_owned(),
                DurableOptions {
                    ack_wait,
                    max_ack_pending,
                    batch: limit,
                    stream: None,
                    // A job's one delivery at a time waits, like a keyed
                    // partition's, on a pull request the broker may no
                    // longer have: a job-fault run on a loaded host held
                    // its occurrences 17 s after a replica was stopped and
                    // continued. The short expiry bounds that (see
                    // `keyed::PULL_EXPIRES`).
                    pull_expires: if job.is_some() {
                        super::keyed::PULL_EXPIRES
                    } else {
                        Duration::from_secs(30)
                    },
                    in_order: false,
                    start: if job.is_some() {
                        crate::transport::Start::Last
                    } else {
                        crate::transport::Start::First
                    },
                    routers: None,
                },
            )
        });
        // A durable message still being handled is kept by progress acks
        // (its ack wait starts again), so that the broker never hands it
        // to another replica while it runs: a saga running longer than the
        // ack wait was delivered again and ran twice at once.
        let progress = durable.as_ref().map(|_| ack_wait / 3);
        Served {
            spec,
            to: SubscribeTo {
                subject: spec.subject().to_owned(),
                queue_group,
            },
            limit,
            capacity: config.subscription_capacity,
            capacity_bytes: config.subscription_bytes,
            parallel,
            durable,
            partition: None,
            progress,
            max_deliver,
            breaker: crate::resilience::Breaker::new(config.breaker_failures, config.breaker_open),
            metrics: crate::ops::metrics::HandlerMetrics::new(spec),
        }
    }

    /// A partition of keyed saga `spec`: its own durable consumer on the
    /// partition's subject, one message at a time (the key's order).
    pub(crate) fn partition(
        spec: &'static HandlerSpec,
        config: &Config,
        partition: Arc<keyed::Partition>,
    ) -> Served {
        let mut served = Served::new(spec, config);
        let base = keyed::partition_base(&config.service, spec);
        served.to = SubscribeTo {
            subject: format!("{base}.{}", partition.index),
            queue_group: None,
        };
        served.limit = 1;
        served.parallel = 1;
        served.durable = Some((
            format!("{}-p{}", keyed::saga_name(spec), partition.index),
            DurableOptions {
                ack_wait: keyed::ack_wait(config),
                max_ack_pending: 1,
                batch: 1,
                stream: Some(partition.stream_key.clone()),
                pull_expires: keyed::PULL_EXPIRES,
                // One message at a time: the broker delivers nothing past
                // a message a lost request took until it comes back.
                in_order: false,
                start: crate::transport::Start::First,
                routers: None,
            },
        ));
        served.partition = Some(partition);
        served.progress = Some(keyed::ack_wait(config) / 3);
        served
    }

    /// Subscribes: a core subscription, or the durable consumer (creating
    /// its stream first).
    pub(crate) async fn subscribe(&self, shared: &Shared) -> Result<crate::transport::Subscription> {
        let transport = shared.client.transport();
        match &self.durable {
            None => transport.subscribe(&self.to).await,
            // Its stream was made by the ownership loop.
            Some((name, options)) if self.partition.is_some() => {
                transport.durable_subscribe(&self.to.subject, name, options).await
            }
            Some((name, options)) => {
                transport
                    .ensure_dead_letters(&shared.config.service, &shared.config.streams)
                    .await?;
                if self.spec.job().is_some() {
                    transport
                        .ensure_job_stream(&self.to.subject, &shared.config.streams)
                        .await?;
                } else {
                    transport
                        .ensure_stream(&self.to.subject, &shared.config.streams)
                        .await?;
                }
                transport.durable_subscribe(&self.to.subject, name, options).await
            }
        }
    }
}

/// A queue group that only this replica's subscriptions of `spec` join.
pub(crate) fn private_group(instance: &str, spec: &HandlerSpec) -> String {
    format!(
        "catga.{}.{}",
        subject_token(instance),
        spec.name().replace("::", ".")
    )
}

/// The running serve loops of one handler.
pub(crate) struct Serving {
    pub served: Arc<Served>,
    pub stop: watch::Sender<bool>,
    pub tasks: Vec<JoinHandle<ServeReport>>,
}
