//! JetStream: streams for the subjects of durable events, durable pull
//! consumers, acknowledged publishing, and the dead-letter stream.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::GetStreamByNameErrorKind as stream_error;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::nats::NatsTransport;
use super::tap::SentAs;
use super::{DeadLetter, Delivery, DurableOptions, ReplyTo, Start, stream_name};

use crate::config::StreamSettings;
use crate::error::{Error, ErrorKind, Result};

/// How long whether a subject has a stream is remembered: a stream made
/// by a service deployed later is used within this time.
const STREAM_MEMORY: Duration = Duration::from_secs(10);

fn js_error(what: &str, e: impl std::fmt::Display) -> Error {
    let text = e.to_string();
    let kind = if text.contains("not enabled") || text.contains("no responders") {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Transport
    };
    Error::new(kind, format!("JetStream {what}: {text}"))
}

fn stream_config(
    name: String,
    subjects: Vec<String>,
    settings: &StreamSettings,
    max_age: Duration,
) -> stream::Config {
    stream::Config {
        name,
        subjects,
        retention: stream::RetentionPolicy::Limits,
        storage: if settings.memory_storage {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        // As the server stores them, so that the record catga keeps of a
        // stream matches the stream it then reads back: at least one
        // replica; a duplicate window of 0 is two minutes, and none is
        // longer than the age limit.
        num_replicas: settings.replicas.max(1),
        max_age,
        duplicate_window: match settings.duplicate_window {
            Duration::ZERO => Duration::from_secs(120),
            w if !max_age.is_zero() => w.min(max_age),
            w => w,
        },
        placement: settings.placement.as_ref().map(|p| stream::Placement {
            cluster: p.cluster.clone(),
            tags: p.tags.clone(),
        }),
        ..Default::default()
    }
}

/// The metadata key under which catga records the settings it gave a
/// stream, so that a later start tells whether anyone changed them since.
const SETTINGS_KEY: &str = "catga.settings";

/// What catga sets on a stream, as text (its record).
fn settings_record(c: &stream::Config) -> String {
    format!(
        "subjects={};storage={:?};replicas={};max_age_ms={};max_msgs={};duplicate_window_ms={};placement={}{}",
        c.subjects.join(","),
        c.storage,
        c.num_replicas,
        c.max_age.as_millis(),
        max_messages(c),
        c.duplicate_window.as_millis(),
        placement_text(c.placement.as_ref()),
        // Only when set, so that the records of streams made before
        // catga set it stay as they were.
        if c.allow_atomic_publish { ATOMIC_MARK } else { "" }
    )
}

/// What a record says when catga turned atomic batches on.
const ATOMIC_MARK: &str = ";atomic=1";

/// Whether a stream is catga's as `recorded`: its settings are as catga
/// recorded them, atomic batches aside (an operator who turns them off
/// leaves the rest catga's: see [`batches_turned_off`]); without a record
/// (an earlier release, a server before 2.10), unless it carries what
/// catga never sets (`foreign`).
fn recorded_as_is(recorded: Option<&String>, current: &stream::Config, foreign: bool) -> bool {
    match recorded {
        Some(recorded) => record_matches(recorded, current),
        None => !foreign,
    }
}

/// Whether `recorded` is `current`'s record, atomic batches aside.
fn record_matches(recorded: &str, current: &stream::Config) -> bool {
    let now = settings_record(current);
    recorded.strip_suffix(ATOMIC_MARK).unwrap_or(recorded) == now.strip_suffix(ATOMIC_MARK).unwrap_or(&now)
}

/// Whether someone turned off the atomic batches catga turned on: catga
/// leaves them off.
fn batches_turned_off(recorded: Option<&String>, current: &stream::Config) -> bool {
    !current.allow_atomic_publish && recorded.is_some_and(|r| r.ends_with(ATOMIC_MARK))
}

/// A stream's message limit as the server keeps it: none is -1 (a
/// request may say 0).
fn max_messages(c: &stream::Config) -> i64 {
    if c.max_messages <= 0 { -1 } else { c.max_messages }
}

fn placement_text(p: Option<&stream::Placement>) -> String {
    match p {
        None => "any".to_owned(),
        Some(p) => format!(
            "cluster={},tags={}",
            p.cluster.as_deref().unwrap_or("any"),
            p.tags.join("+")
        ),
    }
}

/// How the stream as it is differs from the stream catga would make, in
/// words.
fn differences(current: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    if current.subjects != wanted.subjects {
        out.push(format!(
            "subjects {} (catga: {})",
            current.subjects.join(","),
            wanted.subjects.join(",")
        ));
    }
    if current.num_replicas != wanted.num_replicas {
        out.push(format!(
            "replicas {} (catga: {})",
            current.num_replicas, wanted.num_replicas
        ));
    }
    if current.max_age != wanted.max_age {
        out.push(format!(
            "max age {:?} (catga: {:?})",
            current.max_age, wanted.max_age
        ));
    }
    if max_messages(current) != max_messages(wanted) {
        out.push(format!(
            "max messages {} (catga: {})",
            max_messages(current),
            max_messages(wanted)
        ));
    }
    if current.duplicate_window != wanted.duplicate_window {
        out.push(format!(
            "duplicate window {:?} (catga: {:?})",
            current.duplicate_window, wanted.duplicate_window
        ));
    }
    if current.storage != wanted.storage {
        out.push(format!(
            "storage {:?} (catga: {:?})",
            current.storage, wanted.storage
        ));
    }
    if current.placement != wanted.placement {
        out.push(format!(
            "placement {} (catga: {})",
            placement_text(current.placement.as_ref()),
            placement_text(wanted.placement.as_ref())
        ));
    }
    out
}

impl NatsTransport {
    /// Creates the stream of `subject`, or brings its settings in line.
    /// Every replica does this at start-up; it is idempotent.
    pub(crate) async fn ensure_stream(&self, subject: &str, settings: &StreamSettings) -> Result<()> {
        let mut config = stream_config(
            stream_name(subject),
            vec![subject.to_owned()],
            settings,
            settings.max_age,
        );
        // Outbox relays write a stream's events in atomic batches (see
        // `store_beside_others`), where the server knows them.
        config.allow_atomic_publish = self.wants_batches() && Box::pin(self.takes_batches()).await;
        self.ensure(config).await?;
        self.remember_stream(subject, true);
        Ok(())
    }

    /// The streams of a keyed saga's partitions (see
    /// [`partition_streams`](super::partition_streams)); each partition's
    /// subject is remembered as stored, so that routing to it needs no
    /// lookup.
    pub(crate) async fn ensure_partition_stream(
        &self,
        base: &str,
        partitions: u32,
        settings: &StreamSettings,
    ) -> Result<()> {
        let groups = super::partition_streams(base, partitions, settings.saga_streams);
        let several = groups.len() > 1;
        for (key, subjects) in groups {
            let name = stream_name(&key);
            let first = subjects.first().cloned().unwrap_or_default();
            // Several streams list their partitions' subjects: a replica
            // with another partition count would rewrite the lists, and
            // each replica would undo the other's (one stream of
            // `<base>.*` never changes).
            if several && let Ok(mut existing) = self.jetstream().get_stream(&name).await {
                let info = existing.info().await.map_err(|e| js_error("stream info", e))?;
                if info.config.subjects != subjects {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "stream {name} stores other saga partitions ({}) than this replica's {partitions} \
                             partitions over CATGA_JS_SAGA_STREAMS={} would ({}): the saga's `partitions` \
                             changed, or the setting; see the operations guide, \"Keyed sagas on a NATS cluster\"",
                            info.config.subjects.join(" "),
                            settings.saga_streams,
                            subjects.join(" ")
                        ),
                    ));
                }
            }
            if let Err(e) = self
                .ensure(stream_config(name.clone(), subjects, settings, settings.max_age))
                .await
            {
                return Err(self.other_layout(&first, &name).await.unwrap_or(e));
            }
        }
        for p in 0..partitions {
            self.remember_stream(&format!("{base}.{p}"), true);
        }
        Ok(())
    }

    /// Why the stream `name` of a keyed saga's partitions could not be
    /// made, if another stream stores its subjects: the partitions were
    /// laid out with another `CATGA_JS_SAGA_STREAMS` (JetStream refuses
    /// streams whose subjects overlap).
    async fn other_layout(&self, subject: &str, name: &str) -> Option<Error> {
        let subject = subject.replace('*', "0");
        let holder = self.jetstream().stream_by_subject(subject.clone()).await.ok()?;
        (holder != name && holder.starts_with("CATGA_")).then(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "the saga partition subject `{subject}` is stored by stream {holder}, not {name}: the \
                     partitions were laid out with another CATGA_JS_SAGA_STREAMS; set it back, or drain the \
                     saga and delete the old streams (see the operations guide, \"Keyed sagas on a NATS cluster\")"
                ),
            )
        })
    }

    /// The dead-letter stream of `service` (`catga.dead.<service>.>`):
    /// kept 30 days, or as long as events if that is longer. One stream per
    /// service, so that purging one service's letters leaves the others'.
    pub(crate) async fn ensure_dead_letters(&self, service: &str, settings: &StreamSettings) -> Result<()> {
        let subjects = DeadLetter::subjects_of(service);
        if self.stream_known(&subjects, Duration::MAX) == Some(true) {
            return Ok(());
        }
        self.set_dead_letter_settings(settings);
        let keep = settings.max_age.max(Duration::from_secs(30 * 24 * 3600));
        self.ensure(stream_config(
            stream_name(&subjects),
            vec![subjects.clone()],
            settings,
            keep,
        ))
        .await?;
        self.remember_stream(&subjects, true);
        Ok(())
    }

    /// Creates a stream as `config` says, or brings one catga made in
    /// line with it. A stream created or changed outside catga (its
    /// settings no longer what catga recorded in its metadata, or, without
    /// a record, with a placement, a mirror or sources) is used as it is:
    /// what catga would change is logged. Only what catga sets is ever
    /// changed (subjects, replicas, max age, duplicate window): an
    /// operator's placement, sources or limits stay; an existing stream is
    /// not moved to another placement, nor its storage changed.
    async fn ensure(&self, mut config: stream::Config) -> Result<()> {
        config
            .metadata
            .insert(SETTINGS_KEY.to_owned(), settings_record(&config));
        let js = self.jetstream();
        match js.get_stream(&config.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| js_error("stream info", e))?;
                let current = &info.config;
                let differs = differences(current, &config);
                let recorded = current.metadata.get(SETTINGS_KEY);
                // What catga never sets: a mirror, sources, or a placement
                // other than its own setting's.
                let foreign = current.mirror.is_some()
                    || current.sources.as_ref().is_some_and(|s| !s.is_empty())
                    || (current.placement.is_some() && current.placement != config.placement);
                // Streams of earlier releases (and of servers before 2.10,
                // which keep no metadata) have no record: taken for
                // catga's unless they carry what catga never sets.
                let catgas = recorded_as_is(recorded, current, foreign);
                // A stream of catga's made before it asked for atomic
                // batches (an earlier release, a service given store
                // shards since, or a server upgraded to 2.12 since) takes
                // them from now on. Never turned back on once an operator
                // turned them off, nor off by catga.
                let batches = catgas
                    && config.allow_atomic_publish
                    && !current.allow_atomic_publish
                    && !batches_turned_off(recorded, current);
                if differs.is_empty() {
                    // A stream of an earlier release, as catga would make
                    // it: recorded now, so that a later change by an
                    // operator is told from catga's (on a server that
                    // keeps metadata).
                    let record = recorded.is_none() && catgas && self.keeps_metadata();
                    if record || batches {
                        let updated = current.clone();
                        Box::pin(self.update(&js, updated, batches, record)).await?;
                    }
                    return Ok(());
                }
                if !catgas {
                    tracing::warn!(
                        stream = %config.name,
                        differences = %differs.join("; "),
                        "the stream was created or changed outside catga: used as it is; catga would change it"
                    );
                    return Ok(());
                }
                let mut updated = current.clone();
                updated.subjects = config.subjects.clone();
                updated.num_replicas = config.num_replicas;
                updated.max_age = config.max_age;
                updated.max_messages = config.max_messages;
                updated.duplicate_window = config.duplicate_window;
                if updated.placement != config.placement || updated.storage != config.storage {
                    tracing::warn!(
                        stream = %config.name,
                        differences = %differs.join("; "),
                        "the stream's placement or storage differs from catga's settings: an existing stream is \
                         not moved (`nats stream edit`, or recreate it)"
                    );
                }
                let changed = settings_record(&updated) != settings_record(current);
                if !changed && !batches {
                    return Ok(());
                }
                Box::pin(self.update(&js, updated, batches, changed)).await?;
                if changed {
                    tracing::info!(stream = %config.name, changes = %differs.join("; "), "stream settings updated");
                }
                Ok(())
            }
            Err(_) => match js.create_stream(config.clone()).await {
                Ok(_) => {
                    tracing::info!(stream = %config.name, subjects = ?config.subjects, "stream created");
                    Ok(())
                }
                // Another replica created it meanwhile.
                Err(e) if js.get_stream(&config.name).await.is_ok() => {
                    tracing::debug!(error = %e, "stream created by another replica");
                    Ok(())
                }
                Err(e) => Err(self
                    .stored_elsewhere(&config)
                    .await
                    .unwrap_or_else(|| js_error("stream create", e))),
            },
        }
    }

    /// Updates a stream of catga's to `updated` (recording it), with
    /// atomic batches turned on if `batches`. Turning them on is a wish,
    /// not a need: a stream that refuses it (its persistence is
    /// asynchronous, a peer's server is older, the account may not update
    /// streams) is used as it is, its relayed events sent one at a time,
    /// and the rest of the update (`needed`) is made without it.
    async fn update(
        &self,
        js: &jetstream::Context,
        mut updated: stream::Config,
        batches: bool,
        needed: bool,
    ) -> Result<bool> {
        // Batches someone turned off stay recorded as turned off.
        let off = batches_turned_off(updated.metadata.get(SETTINGS_KEY), &updated);
        updated.allow_atomic_publish |= batches;
        let record = settings_record(&updated) + if off { ATOMIC_MARK } else { "" };
        updated.metadata.insert(SETTINGS_KEY.to_owned(), record);
        match js.update_stream(&updated).await {
            // As the server keeps it: one that does not know the setting
            // (an older peer) drops it, and the record must not say catga
            // turned it on (it would read as an operator's "off").
            Ok(info) if batches && !info.config.allow_atomic_publish => {
                let mut kept = info.config;
                kept.metadata
                    .insert(SETTINGS_KEY.to_owned(), settings_record(&kept));
                // The update itself was made: a record not put right is
                // told in the log only (the stream then reads as one whose
                // batches someone turned off, and stays without them).
                if let Err(e) = js.update_stream(&kept).await {
                    tracing::warn!(stream = %kept.name, error = %e, "the stream's record could not be put right");
                }
                Ok(false)
            }
            Ok(info) => Ok(info.config.allow_atomic_publish),
            Err(e) if batches => {
                tracing::warn!(
                    stream = %updated.name,
                    error = %e,
                    "the stream could not be given allow_atomic: the outbox relays send its events one at a time"
                );
                if !needed {
                    return Ok(false);
                }
                updated.allow_atomic_publish = false;
                let record = settings_record(&updated) + if off { ATOMIC_MARK } else { "" };
                updated.metadata.insert(SETTINGS_KEY.to_owned(), record);
                js.update_stream(&updated)
                    .await
                    .map(|_| false)
                    .map_err(|e| js_error("stream update", e))
            }
            Err(e) => Err(js_error("stream update", e)),
        }
    }

    /// Why a stream could not be made, if a stream catga did not make
    /// already stores its subject: catga keeps its subjects in streams of
    /// its own names (a partition layout of its own is told by
    /// `other_layout`).
    async fn stored_elsewhere(&self, config: &stream::Config) -> Option<Error> {
        let subject = config.subjects.first()?.replace('*', "0");
        let holder = self.jetstream().stream_by_subject(subject.clone()).await.ok()?;
        (holder != config.name && !holder.starts_with("CATGA_")).then(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "the subject `{subject}` is stored by stream {holder}, which catga did not make: catga \
                     keeps it in a stream of its own, {}; take the subject out of {holder}, or give that \
                     stream this name (see the operations guide, \"Streams\")",
                    config.name
                ),
            )
        })
    }

    /// Whether the server keeps stream metadata (2.10 and later).
    fn keeps_metadata(&self) -> bool {
        self.server_at_least(2, 10, 0)
    }

    /// Whether the connected server's version is at least
    /// `major.minor.patch`.
    fn server_at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        let version = self.server_version().unwrap_or_default();
        let mut parts = version
            .trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let mut next = || parts.next().unwrap_or(0);
        (next(), next(), next()) >= (major, minor, patch)
    }

    /// Whether JetStream takes atomic batches (`allow_atomic` streams):
    /// its API level, 2 from nats-server 2.12, asked once. Not known (the
    /// question failed) is taken as no and asked again next time: a
    /// stream made meanwhile without the setting gets it when a replica
    /// next sets it up, and its relays send one message at a time until
    /// then.
    async fn takes_batches(&self) -> bool {
        if let Some(known) = self.batches_known() {
            return known;
        }
        match self.jetstream().query_account().await {
            Ok(account) => {
                // 2.12.0 has API level 2 but refuses a batch whose
                // messages carry `Nats-Msg-Id` (10177), which every
                // relayed event does: de-duplication in batches came with
                // 2.12.1. The connected server's version stands in for
                // the stream leaders' (a cluster mid-upgrade is not told
                // apart; a refusal then stops batching a while).
                let taken = account.requests.level >= 2 && self.server_at_least(2, 12, 1);
                self.learn_batches(taken);
                taken
            }
            Err(e) => {
                tracing::debug!(error = %e, "JetStream's API level is not known yet");
                false
            }
        }
    }

    /// Whether the JetStream that keeps this replica's consumers has the
    /// `prioritized` policy: its API level, 2 from nats-server 2.12. Asked
    /// of JetStream (its meta leader answers), not read from the server
    /// this replica is connected to: a leaf node (`CATGA_JS_DOMAIN`) may
    /// run another version. A server upgrade under way, with the meta
    /// leader upgraded and a stream's peers not yet, is not told apart.
    ///
    /// Not known (the question failed, as in a JetStream leader
    /// election): the replica does not bind now (its serve loop tries
    /// again). Bound as on a server without priorities, it would make a
    /// prioritized consumer plain, and nothing would make it prioritized
    /// again until a region-aware replica binds anew.
    async fn has_priorities(&self) -> Result<bool> {
        self.jetstream()
            .query_account()
            .await
            .map(|account| account.requests.level >= 2)
            .map_err(|e| js_error("JetStream API level lookup", e))
    }

    /// How a region-aware replica (`CATGA_REGION` set) pulls from a
    /// durable consumer of `stream`, where JetStream has priority groups:
    /// in catga's group, at priority 0 when the stream lives in the NATS
    /// cluster this replica is connected to (or either is not known), 1
    /// when it lives in another (a region across a gateway, or the hub of
    /// a leaf node). Decided when the consumer is bound. `None` (a plain
    /// pull, as without regions) for any other replica, or where
    /// JetStream has no priority groups.
    async fn pull_priority(&self, stream: &jetstream::stream::Stream) -> Result<Option<usize>> {
        if !self.region_aware() || !self.has_priorities().await? {
            return Ok(None);
        }
        let here = self.server_cluster();
        let there = stream.cached_info().cluster.as_ref().and_then(|c| c.name.clone());
        let remote = matches!((&here, &there), (Some(here), Some(there)) if here != there);
        if remote {
            tracing::info!(
                stream = %stream.cached_info().config.name,
                stream_cluster = there.as_deref().unwrap_or_default(),
                cluster = here.as_deref().unwrap_or_default(),
                "the stream lives in another NATS cluster: this replica pulls at a lower priority \
                 (it is given messages while no replica of that cluster pulls, with CATGA_REGION set there)"
            );
        }
        Ok(Some(usize::from(remote)))
    }

    /// Binds the durable consumer `durable` on `subject` (creating or
    /// updating it) and starts pulling from it.
    pub(crate) async fn durable_subscribe(
        &self,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
    ) -> Result<JsSubscription> {
        let js = self.jetstream();
        let stream = js
            .get_stream(stream_name(options.stream.as_deref().unwrap_or(subject)))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        let deliver_policy = match options.start {
            Start::First => consumer::DeliverPolicy::All,
            Start::Last => consumer::DeliverPolicy::LastPerSubject,
            // Bound as it was created (JetStream refuses a change of where
            // a consumer starts).
            Start::Existing => match consumer_found(&stream, durable).await? {
                Some(info) => info.config.deliver_policy,
                None => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("the durable consumer {durable} is not created yet"),
                    ));
                }
            },
        };
        let priority = self.pull_priority(&stream).await?;
        let config = consumer_config(subject, durable, options, deliver_policy, priority);
        // Bound as it is: an update, which JetStream refuses for a
        // consumer that is gone (deleted since it was found), where a
        // create-or-update would make it again where it started.
        let consumer: consumer::PullConsumer = if options.start == Start::Existing {
            stream
                .update_consumer(config)
                .await
                .map_err(|e| js_error("consumer update", e))?
        } else {
            stream
                .create_consumer(config)
                .await
                .map_err(|e| js_error("consumer create", e))?
        };
        let messages = pull(&consumer, options, priority).await?;
        // Once it exists: a test kit asks about it from now on.
        self.tap()
            .bound(options.stream.as_deref().unwrap_or(subject), durable);
        Ok(JsSubscription {
            messages: Some(messages),
            transport: self.clone(),
            subject: subject.to_owned(),
            consumer,
            options: options.clone(),
            priority,
        })
    }

    /// Creates the durable consumer `durable` on `subject` at stream
    /// sequence `seq`, unless it exists; whether it was created now.
    pub(crate) async fn create_durable_at(
        &self,
        subject: &str,
        durable: &str,
        options: &DurableOptions,
        seq: u64,
    ) -> Result<bool> {
        let stream = self
            .jetstream()
            .get_stream(stream_name(options.stream.as_deref().unwrap_or(subject)))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        if consumer_found(&stream, durable).await?.is_some() {
            return Ok(false);
        }
        let priority = self.pull_priority(&stream).await?;
        let policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        };
        match stream
            .create_consumer(consumer_config(subject, durable, options, policy, priority))
            .await
        {
            Ok(_) => Ok(true),
            // Made meanwhile by another replica elsewhere: the create was
            // then an update of where it starts, which JetStream refuses
            // (an identical one succeeds, and says made).
            Err(e) => match consumer_found(&stream, durable).await? {
                Some(_) => Ok(false),
                None => Err(js_error("consumer create", e)),
            },
        }
    }

    /// The durable consumer `durable` of `subject`, if it exists.
    pub(crate) async fn durable_found(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<Option<super::DurableFound>> {
        let stream = self
            .jetstream()
            .get_stream(stream_name(subject))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        Ok(consumer_found(&stream, durable)
            .await?
            .map(|info| super::DurableFound {
                ack_floor: info.ack_floor.stream_sequence,
                delivered: info.delivered.consumer_sequence > 0,
                routers: info
                    .config
                    .description
                    .as_deref()
                    .and_then(|d| d.strip_prefix(ROUTERS_RECORD))
                    .and_then(|n| n.parse().ok()),
            }))
    }

    /// Deletes the durable consumer `durable` of `subject` if it exists.
    pub(crate) async fn delete_durable(&self, subject: &str, durable: &str) -> Result<()> {
        let stream = self
            .jetstream()
            .get_stream(stream_name(subject))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        if consumer_found(&stream, durable).await?.is_none() {
            return Ok(());
        }
        match stream.delete_consumer(durable).await {
            Ok(_) => Ok(()),
            Err(e) => match consumer_found(&stream, durable).await? {
                None => Ok(()),
                Some(_) => Err(js_error("consumer delete", e)),
            },
        }
    }

    /// Whether the stream of `subject` exists, looked up at most every
    /// [`STREAM_MEMORY`] per subject.
    ///
    /// Asked before a JetStream publish rather than learnt from one: a
    /// JetStream publish is a request on the subject itself, so with no
    /// stream but plain subscribers it reaches them (an event delivered
    /// outside the stream) and then waits out its time-out for an
    /// acknowledgement nobody sends.
    pub(crate) async fn has_stream(&self, subject: &str) -> Result<bool> {
        if let Some(exists) = self.stream_known(subject, STREAM_MEMORY) {
            return Ok(exists);
        }
        // By subject, not by the name catga gives its streams: the
        // dead-letter stream and streams an operator made store subjects
        // by wildcard.
        let exists = match self.jetstream().stream_by_subject(subject).await {
            Ok(_) => true,
            Err(e) if e.kind() == stream_error::NotFound => false,
            Err(e) => return Err(js_error("stream lookup", e)),
        };
        self.remember_stream(subject, exists);
        Ok(exists)
    }

    /// Publishes to a stream and waits for its acknowledgement: the message
    /// is stored once this returns. No stream for the subject is an error
    /// ([`ErrorKind::NoHandler`]), found before anything is sent.
    pub(crate) async fn publish_durable(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        let slot = self
            .tap()
            .record_sent(subject, SentAs::PublishDurable, Some(&headers), &payload);
        let stored = self.store_one(subject, headers, payload, timeout).await;
        if stored.is_err() {
            self.tap().unrecord(slot);
        }
        stored
    }

    /// [`publish_durable`](Self::publish_durable) of catga's own message
    /// (a dead letter): a test kit does not record it as the user's.
    async fn store_one(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        let lookup = tokio::time::timeout(timeout, self.has_stream(subject))
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no answer from JetStream about the stream of {subject} within {timeout:?}"),
                ))
            })?;
        if !lookup {
            return Err(Error::new(
                ErrorKind::NoHandler,
                format!("no stream stores subject {subject}"),
            ));
        }
        let js = self.jetstream();
        let run = async {
            let ack = js
                .publish_with_headers(subject.to_owned(), headers, payload)
                .await
                .map_err(|e| publish_error(subject, e))?;
            let stored = ack.await.map_err(|e| publish_error(subject, e))?;
            stored_at(subject, &stored)
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("no acknowledgement from JetStream for {subject} within {timeout:?}"),
            ))
        })
    }

    /// Sends a message to a stream without waiting for its
    /// acknowledgement: messages sent one after another on this connection
    /// are stored in that order; the returned future is the
    /// acknowledgement.
    pub(crate) async fn publish_durable_start(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<super::Stored> {
        if !self.has_stream(subject).await? {
            return Err(Error::new(
                ErrorKind::NoHandler,
                format!("no stream stores subject {subject}"),
            ));
        }
        let ack = self
            .jetstream()
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| publish_error(subject, e))?;
        let subject = subject.to_owned();
        // From when it was sent, not from when the future is first polled:
        // a router polls its oldest routing first, and a deadline started
        // then made k lost acknowledgements ahead of one cost k time-outs.
        let deadline = tokio::time::Instant::now() + timeout;
        Ok(Box::pin(async move {
            match tokio::time::timeout_at(deadline, ack).await {
                Ok(Ok(stored)) => stored_at(&subject, &stored).map(|()| stored.duplicate),
                Ok(Err(e)) => Err(publish_error(&subject, e)),
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no acknowledgement from JetStream for {subject} within {timeout:?}"),
                )),
            }
        }))
    }

    /// See [`super::Transport::ensure_stored`].
    pub(crate) async fn ensure_stored(&self, subject: &str, settings: &StreamSettings) -> Result<()> {
        if self.stream_of(subject).is_some() {
            return Ok(());
        }
        match self.jetstream().stream_by_subject(subject).await {
            Ok(name) => {
                self.learn_stream_of(subject, &name);
                Ok(())
            }
            Err(e) if e.kind() == stream_error::NotFound => {
                // Nothing found, which a cluster also answers while its
                // meta leader catches up: make the subject's stream. If a
                // stream does store it, the creation fails (the name is
                // taken, or the subjects overlap) and the caller retries.
                self.ensure_stream(subject, settings).await?;
                tracing::info!(
                    subject,
                    "no stream stored this subject: created one for the outbox"
                );
                self.learn_stream_of(subject, &stream_name(subject));
                Ok(())
            }
            Err(e) => Err(js_error("stream lookup", e)),
        }
    }

    /// See [`super::Transport::store_in_order`].
    pub(crate) async fn store_in_order(
        &self,
        messages: &[super::Outgoing],
        timeout: Duration,
        go_on: &(dyn Fn() -> bool + Sync),
        order: super::Order<'_>,
    ) -> Vec<Result<()>> {
        match order {
            super::Order::Batched { stepwise } => {
                self.store_beside_others(messages, timeout, go_on, Some(stepwise))
                    .await
            }
            super::Order::Stepwise => self.store_beside_others(messages, timeout, go_on, None).await,
        }
    }

    /// [`store_in_order`](Self::store_in_order): a stream may have other
    /// writers (the relays of other store shards, a durable publish of the
    /// same event). An expected last sequence names the last message of
    /// the whole stream, so another writer's
    /// message in between would refuse the rest of a chain after the
    /// server delivered it to plain subscribers; instead each chain (a
    /// stream) goes as atomic batches where the stream takes them
    /// (`allow_atomic`, nats-server 2.12 and later): a batch is stored
    /// whole, its messages one after another, or not at all, so no other
    /// writer cuts into it and a failure leaves no later message stored
    /// before an earlier one. One round trip a batch: with 3 shards, a
    /// message at a time costs the relay 0.34x of one shard's events/s,
    /// batches 0.81x (BENCHMARKS.md, "Outbox relay").
    ///
    /// Without `batches` (and for the streams it names), and on a stream
    /// that does not take batches (made without `allow_atomic`: an
    /// operator's, or made before the server was 2.12), the messages go
    /// one at a time, each once the one before it was stored. So does a
    /// batch refused as a whole, as JetStream refuses one holding a
    /// message id it stored already or one over a limit of the server's,
    /// so that each message gets its own answer (a repeat is acknowledged
    /// as a duplicate; a message too large is told apart from the rest).
    /// The chains go side by side; a message not stored leaves the rest of
    /// its chain unsent.
    async fn store_beside_others(
        &self,
        messages: &[super::Outgoing],
        timeout: Duration,
        go_on: &(dyn Fn() -> bool + Sync),
        batches: Option<&std::collections::HashSet<String>>,
    ) -> Vec<Result<()>> {
        let js = self.jetstream();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut chains: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let chain = self.stream_of(&m.subject).unwrap_or_else(|| m.subject.clone());
            match chains.iter_mut().find(|(c, _)| *c == chain) {
                Some((_, at)) => at.push(i),
                None => chains.push((chain, vec![i])),
            }
        }
        let runs = chains.iter().map(|(chain, at)| {
            let js = js.clone();
            async move {
                let mut out = Vec::with_capacity(at.len());
                let mut rest = &at[..];
                while !rest.is_empty() {
                    if !go_on() {
                        out.extend(rest.iter().map(|&i| (i, Err(super::not_sent()))));
                        break;
                    }
                    // What a batch's commit counts a stall from.
                    let checked = std::time::Instant::now();
                    let n = batch_len(rest.iter().map(|&i| &messages[i]));
                    let (batch, after) = rest.split_at(n);
                    rest = after;
                    if batches.is_some_and(|stepwise| !stepwise.contains(chain))
                        && n > 1
                        && self.takes_batch(&js, chain, deadline).await
                        && self
                            .store_batch(&js, chain, messages, batch, deadline, checked)
                            .await
                    {
                        out.extend(batch.iter().map(|&i| (i, Ok(()))));
                        continue;
                    }
                    let stored = self
                        .store_each(&js, messages, batch, deadline, timeout, go_on)
                        .await;
                    let broken = stored.iter().any(|(_, r)| r.is_err());
                    out.extend(stored);
                    if broken {
                        out.extend(rest.iter().map(|&i| (i, Err(super::not_sent()))));
                        break;
                    }
                }
                out
            }
        });
        let mut out: Vec<Result<()>> = messages.iter().map(|_| Err(super::not_sent())).collect();
        for (i, result) in futures_util::future::join_all(runs).await.into_iter().flatten() {
            out[i] = result;
        }
        out
    }

    /// Whether the stream `chain` is sent atomic batches: it has
    /// `allow_atomic` (its settings looked up at most
    /// [`BATCH_SETTING_MEMORY`] ago), turned on here for a stream of
    /// catga's made without it, and it refused none of late. Not when
    /// `chain` is a subject whose stream no acknowledgement named yet, nor
    /// when the look-up fails or outlasts `deadline`: a batch sent to a
    /// stream that does not take it would reach plain subscribers before
    /// JetStream refused it, and again when sent a message at a time.
    async fn takes_batch(
        &self,
        js: &jetstream::Context,
        chain: &str,
        deadline: tokio::time::Instant,
    ) -> bool {
        // JetStream (or the server this replica is on) takes none, even
        // where a stream has the setting.
        if self.batches_known() == Some(false) {
            return false;
        }
        if let Some(known) = self.batch_setting(chain, BATCH_SETTING_MEMORY) {
            return known;
        }
        if !self.is_known_stream(chain) {
            return false;
        }
        let Ok(Ok(stream)) = tokio::time::timeout_at(deadline, js.get_stream(chain)).await else {
            return false;
        };
        let current = &stream.cached_info().config;
        let mut taken = current.allow_atomic_publish;
        // A stream of catga's, unchanged since, made without the setting
        // (by a service without store shards, a client's
        // `publish_durable`, or before the server was 2.12): turned on
        // now.
        let recorded = current.metadata.get(SETTINGS_KEY);
        // Only a stream catga recorded: without a record an operator's
        // placement would not be told apart here (`ensure` tells it).
        let catgas = chain.starts_with("CATGA_") && recorded.is_some_and(|r| record_matches(r, current));
        if !taken
            && catgas
            && !batches_turned_off(recorded, current)
            && self.wants_batches()
            && matches!(
                tokio::time::timeout_at(deadline, self.takes_batches()).await,
                Ok(true)
            )
        {
            let update = Box::pin(self.update(js, current.clone(), true, false));
            taken = matches!(tokio::time::timeout_at(deadline, update).await, Ok(Ok(true)));
            if taken {
                tracing::info!(stream = chain, "the stream takes atomic batches from now on");
            }
        }
        self.learn_batch_setting(chain, taken);
        taken
    }

    /// Sends `batch` (indices into `messages`, one stream's) as one atomic
    /// batch: every message but the last published plainly, the last one
    /// committing it and answered. Returns whether it was stored; if it
    /// was refused or not answered, none of it is taken as stored (the
    /// caller sends it a message at a time; what the batch did store
    /// after all is then acknowledged as a duplicate).
    async fn store_batch(
        &self,
        js: &jetstream::Context,
        chain: &str,
        messages: &[super::Outgoing],
        batch: &[usize],
        deadline: tokio::time::Instant,
        started: std::time::Instant,
    ) -> bool {
        if started.elapsed() > BATCH_STALL {
            // The look-up took that long (or the process stalled): one at
            // a time, each message asking for the lease, rather than a
            // batch that may not be committed.
            return false;
        }
        let client = js.client();
        let id = nuid::next();
        let mut slots = Vec::with_capacity(batch.len());
        let mut sent = Ok(());
        let mut commit = None;
        for (n, &i) in batch.iter().enumerate() {
            let m = &messages[i];
            let mut headers = m.headers.clone();
            headers.insert(crate::wire::headers::MESSAGE_ID, m.id.as_str());
            slots.push(self.record_outgoing(m, &headers));
            headers.insert(BATCH_ID, id.as_str());
            headers.insert(BATCH_SEQUENCE, (n + 1).to_string().as_str());
            if n + 1 < batch.len() {
                let published = client.publish_with_headers(m.subject.clone(), headers, m.payload.clone());
                match tokio::time::timeout_at(deadline, published).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        sent = Err(e.to_string());
                        break;
                    }
                    Err(_) => {
                        sent = Err("not sent in time".to_owned());
                        break;
                    }
                }
            } else if started.elapsed() > BATCH_STALL {
                // The process stalled since it found its lease held (it
                // was stopped or starved while it looked the stream up or
                // sent the batch): the lease may have gone and another
                // relay sent these since, so it is not committed (the
                // server drops it).
                sent = Err("the batch took too long to send".to_owned());
            } else {
                // Committed whether or not the lease is still this
                // relay's: a live hand-over waits for the round to end,
                // and the messages reached plain subscribers already.
                headers.insert(BATCH_COMMIT, "1");
                commit = Some(tokio::time::timeout_at(deadline, async {
                    js.publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                        .await?
                        .await
                }));
            }
        }
        let why = match (sent, commit) {
            (Err(why), _) => why,
            (Ok(()), None) => "nothing to commit".to_owned(),
            (Ok(()), Some(commit)) => match commit.await {
                Ok(Ok(ack))
                    if ack.sequence > 0
                        && ack.batch_id.as_deref() == Some(id.as_str())
                        && ack.batch_size == Some(batch.len() as u64) =>
                {
                    self.learn_stream_of(&messages[batch[0]].subject, &ack.stream);
                    return true;
                }
                // An acknowledgement of the last message alone: a server
                // that does not know batches (an older peer leading the
                // stream) stored them as plain messages, or some of them.
                // None is taken as stored: sent again one at a time, those
                // stored are acknowledged as duplicates.
                Ok(Ok(ack)) if ack.sequence > 0 => {
                    tracing::warn!(
                        stream = chain,
                        "the stream acknowledged an atomic batch as a plain message (a server before 2.12 leads \
                         it?): its relayed events go one at a time for a while"
                    );
                    self.learn_batch_setting(chain, false);
                    "acknowledged as a plain message".to_owned()
                }
                Ok(Ok(_)) => "acknowledged without a sequence".to_owned(),
                Ok(Err(e)) => {
                    match batch_error(&e) {
                        // A message of it is stored already: the next
                        // batch is another.
                        Some(jetstream::ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) => {}
                        // A header the server does not take in a batch
                        // (`Nats-Msg-Id` on 2.12.0): for good.
                        Some(jetstream::ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER) => {
                            tracing::warn!(
                                stream = chain,
                                error = %e,
                                "the stream's server takes no message ids in atomic batches (nats-server 2.12.0?): \
                                 relayed events go one at a time"
                            );
                            self.learn_batches(false);
                            self.learn_batch_setting(chain, false);
                        }
                        // Batches turned off, a limit of the server's
                        // (its batch size, the batches in flight), or a
                        // message the stream refuses: a refused batch
                        // reached plain subscribers, so none is tried
                        // again for a while.
                        Some(code) => {
                            tracing::info!(
                                stream = chain,
                                code = code.0,
                                error = %e,
                                "the stream refused an atomic batch: its relayed events go one at a time for a while"
                            );
                            self.learn_batch_setting(chain, false);
                        }
                        None => {}
                    }
                    e.to_string()
                }
                Err(_) => "no answer in time".to_owned(),
            },
        };
        tracing::debug!(stream = chain, messages = batch.len(), why = %why, "an atomic batch was not stored: sent one at a time");
        for slot in slots {
            self.tap().unrecord(slot);
        }
        false
    }

    /// Sends `batch` a message at a time, each once the one before it was
    /// stored; a message not stored leaves the rest unsent.
    async fn store_each(
        &self,
        js: &jetstream::Context,
        messages: &[super::Outgoing],
        batch: &[usize],
        deadline: tokio::time::Instant,
        timeout: Duration,
        go_on: &(dyn Fn() -> bool + Sync),
    ) -> Vec<(usize, Result<()>)> {
        let mut out = Vec::with_capacity(batch.len());
        let mut broken = false;
        for &i in batch {
            let m = &messages[i];
            if broken || !go_on() {
                broken = true;
                out.push((i, Err(super::not_sent())));
                continue;
            }
            let mut headers = m.headers.clone();
            headers.insert(crate::wire::headers::MESSAGE_ID, m.id.as_str());
            let slot = self.record_outgoing(m, &headers);
            let stored = tokio::time::timeout_at(deadline, async {
                js.publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await?
                    .await
            })
            .await;
            let result = match stored {
                Ok(Ok(ack)) => stored_at(&m.subject, &ack).map(|()| {
                    self.learn_stream_of(&m.subject, &ack.stream);
                }),
                Ok(Err(e)) => Err(publish_error(&m.subject, e)),
                Err(_) => Err(no_ack(&m.subject, timeout)),
            };
            if result.is_err() {
                self.tap().unrecord(slot);
            }
            broken = result.is_err();
            out.push((i, result));
        }
        out
    }

    /// Records a relayed message for a test kit before it is sent, as it
    /// travels (with its message id; see [`crate::transport::tap`]).
    fn record_outgoing(&self, m: &super::Outgoing, headers: &HeaderMap) -> Option<super::tap::Slot> {
        self.tap()
            .record_sent(&m.subject, SentAs::PublishDurable, Some(headers), &m.payload)
    }

    /// Messages a durable consumer delivered and has not had acknowledged
    /// (0 if the consumer does not exist yet).
    pub(crate) async fn durable_outstanding(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<super::Outstanding> {
        let js = self.jetstream();
        let stream = js
            .get_stream(stream_name(subject))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        Ok(match consumer_found(&stream, durable).await? {
            Some(info) => super::Outstanding {
                ack_pending: info.num_ack_pending as u64,
                pending: info.num_pending,
                waiting: info.num_waiting as u64,
                ack_floor: info.ack_floor.stream_sequence,
            },
            None => super::Outstanding {
                ack_pending: 0,
                pending: 0,
                waiting: 0,
                ack_floor: 0,
            },
        })
    }

    /// The sequence of the first message on `subject` at or after `seq` in
    /// the stream that keeps it; `None` when there is none.
    pub(crate) async fn next_on(&self, subject: &str, seq: u64) -> Result<Option<u64>> {
        let stream = self
            .jetstream()
            .get_stream_no_info(stream_name(subject))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        match stream.get_first_raw_message_by_subject(subject, seq).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(js_error("message lookup", e)),
        }
    }

    /// The last message on `subject` in its stream: its sequence and its
    /// message id (`None`: the stream holds none).
    pub(crate) async fn last_on(&self, subject: &str) -> Result<Option<(u64, String)>> {
        let stream = self
            .jetstream()
            .get_stream_no_info(stream_name(subject))
            .await
            .map_err(|e| js_error("stream lookup", e))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let id = m
                    .headers
                    .get(crate::wire::headers::MESSAGE_ID)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok(Some((m.sequence, id)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) if e.to_string().to_ascii_lowercase().contains("stream not found") => Err(Error::new(
                ErrorKind::NoHandler,
                format!("no stream stores subject {subject}"),
            )),
            Err(e) => Err(js_error("message lookup", e)),
        }
    }

    /// Creates the stream of a recurring job's subject, or brings its
    /// settings in line: kept without an age limit (the last occurrence
    /// tells when the job last ran, however long its period), at most
    /// [`JOB_STREAM_MESSAGES`] messages.
    pub(crate) async fn ensure_job_stream(&self, subject: &str, settings: &StreamSettings) -> Result<()> {
        let mut config = stream_config(
            stream_name(subject),
            vec![subject.to_owned()],
            settings,
            Duration::ZERO,
        );
        config.max_messages = JOB_STREAM_MESSAGES;
        self.ensure(config).await?;
        self.remember_stream(subject, true);
        Ok(())
    }

    /// Stores a message on `subject` only if the last message on that
    /// subject is still the one with sequence `after` (0: none), with
    /// `Nats-Expected-Last-Subject-Sequence`.
    pub(crate) async fn publish_after_seq(
        &self,
        subject: &str,
        mut headers: HeaderMap,
        payload: Bytes,
        after: u64,
        timeout: Duration,
    ) -> Result<super::Appended> {
        headers.insert(EXPECTED_LAST_SUBJECT_SEQ, after.to_string());
        let js = self.jetstream();
        let run = async {
            let ack = js
                .publish_with_headers(subject.to_owned(), headers, payload)
                .await
                .map_err(|e| publish_error(subject, e))?;
            match ack.await {
                Ok(stored) if stored.duplicate => Ok(super::Appended::Repeated),
                Ok(stored) => stored_at(subject, &stored).map(|()| super::Appended::Stored),
                Err(e) => match lost_race(&e) {
                    Some(how) => Ok(how),
                    None => Err(publish_error(subject, e)),
                },
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(no_ack(subject, timeout)))
    }

    async fn dlq(&self, service: &str) -> Result<stream::Stream> {
        self.jetstream()
            .get_stream(stream_name(&DeadLetter::subjects_of(service)))
            .await
            .map_err(|e| js_error("dead-letter stream", e))
    }

    /// `service`'s dead letters, oldest first, from sequence `from`, at
    /// most `limit`.
    pub(crate) async fn dead_letters(
        &self,
        service: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut s = match self.dlq(service).await {
            Ok(s) => s,
            // No letter was ever written for the service.
            Err(e) if e.message().contains("not found") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let info = s.info().await.map_err(|e| js_error("dead-letter stream", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        let mut seq = from.max(first);
        while seq <= last && out.len() < limit {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(DeadLetter::from_stored(m.sequence, m.headers, m.payload));
            }
            seq += 1;
        }
        Ok(out)
    }

    /// One of `service`'s dead letters.
    pub(crate) async fn dead_letter(&self, service: &str, seq: u64) -> Result<Option<DeadLetter>> {
        let s = self.dlq(service).await?;
        match s.get_raw_message(seq).await {
            Ok(m) => Ok(Some(DeadLetter::from_stored(m.sequence, m.headers, m.payload))),
            Err(_) => Ok(None),
        }
    }

    /// Stores a letter in its service's dead-letter stream; a stream that
    /// is gone (deleted by an operator) is made again, with the settings
    /// it was made with.
    pub(crate) async fn store_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let (subject, headers) = letter.to_stored();
        let stored = self
            .store_one(
                &subject,
                headers.clone(),
                letter.payload.clone(),
                Duration::from_secs(5),
            )
            .await;
        match stored {
            Err(e) if e.kind() == ErrorKind::NoHandler => {
                let settings = self.dead_letter_settings();
                self.remember_stream(&DeadLetter::subjects_of(&letter.service), false);
                self.ensure_dead_letters(&letter.service, &settings).await?;
                self.remember_stream(&subject, true);
                self.store_one(&subject, headers, letter.payload.clone(), Duration::from_secs(5))
                    .await
            }
            other => other,
        }
    }

    /// Deletes one of `service`'s dead letters; false if it was not there.
    pub(crate) async fn delete_dead_letter(&self, service: &str, seq: u64) -> Result<bool> {
        let s = self.dlq(service).await?;
        s.delete_message(seq)
            .await
            .map_err(|e| js_error("dead-letter delete", e))
    }

    /// Deletes every dead letter of `service` in one purge; how many.
    pub(crate) async fn purge_dead_letters(&self, service: &str) -> Result<u64> {
        let s = match self.dlq(service).await {
            Ok(s) => s,
            Err(e) if e.message().contains("not found") => return Ok(0),
            Err(e) => return Err(e),
        };
        let purged = s.purge().await.map_err(|e| js_error("dead-letter purge", e))?;
        Ok(purged.purged)
    }
}

/// Checks an acknowledgement: a stream sequence of 0 (servers before 2.11
/// answered a repeat of a message they had not stored yet with it, in a
/// cluster) means the message may not be stored.
fn stored_at(subject: &str, ack: &jetstream::publish::PublishAck) -> Result<()> {
    if ack.sequence == 0 {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "JetStream acknowledged the message on {subject} without a sequence (a repeat of one not \
                 stored yet, on a server older than 2.11): sent again later"
            ),
        ));
    }
    Ok(())
}

fn no_ack(subject: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no acknowledgement from JetStream for {subject} within {timeout:?}"),
    )
}

/// Whether JetStream refused a publish for what the message is (over the
/// stream's message size, an expectation that cannot hold), so that
/// sending it again cannot help. Limits of the account or the server
/// (10002, 10023, 10047, 10028) may pass: those stay retryable.
/// The most messages a job's stream keeps: ten times the occurrences a
/// job may have waiting (see `runtime::jobs::MAX_WAITING`).
const JOB_STREAM_MESSAGES: i64 = 1000;

/// The header that makes a publish conditional on the last message of
/// its subject.
const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";

/// Whether a conditional publish lost to another one: the subject moved
/// on (10071, or 10164 when a clustered stream's leader checks it before
/// proposing), or a copy with the same id is being stored (10158, also
/// on a clustered stream). async-nats reports the last two as `Other`.
fn lost_race(e: &jetstream::context::PublishError) -> Option<super::Appended> {
    use jetstream::ErrorCode as C;
    if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
        return Some(super::Appended::Behind);
    }
    let code = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code)?;
    match code {
        C::STREAM_WRONG_LAST_SEQUENCE | C::STREAM_WRONG_LAST_SEQUENCE_CONSTANT => {
            Some(super::Appended::Behind)
        }
        C::STREAM_DUPLICATE_MESSAGE_CONFLICT => Some(super::Appended::Repeated),
        _ => None,
    }
}

/// The headers of an atomic batch (ADR-50, nats-server 2.12).
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// How long a stream's `allow_atomic` setting, once looked up, is taken
/// as it was (an operator may turn it on or off meanwhile).
const BATCH_SETTING_MEMORY: Duration = Duration::from_secs(60);

/// How long sending a batch's messages may take before its commit: far
/// more than buffering a thousand messages takes, far less than a lease.
const BATCH_STALL: Duration = Duration::from_secs(1);

/// The most messages of one atomic batch: nats-server's default
/// `jetstream.limits.batch.max_msgs`.
const BATCH_MESSAGES: usize = 1000;

/// The most bytes (payloads and headers) of one atomic batch: the server
/// stages a whole batch in memory before it commits it, so a chain of
/// large messages goes as several batches, each once the one before it
/// was stored.
const BATCH_BYTES: usize = 4 << 20;

/// How many of `messages` (one chain's, in order) go in the next atomic
/// batch: at least one, at most [`BATCH_MESSAGES`] and, past the first,
/// [`BATCH_BYTES`].
fn batch_len<'a>(messages: impl Iterator<Item = &'a super::Outgoing>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for m in messages.take(BATCH_MESSAGES) {
        bytes += super::memory::wire_size(Some(&m.headers), m.payload.len()) + m.id.len();
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// The JetStream error code of a refused publish, if it has one.
fn batch_error(e: &jetstream::context::PublishError) -> Option<jetstream::ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code)
}

fn refused_for_good(e: &jetstream::context::PublishError) -> bool {
    use jetstream::ErrorCode as C;
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            [
                C::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
                C::STREAM_NOT_MATCH,
                C::STREAM_WRONG_LAST_SEQUENCE,
            ]
            .contains(&j.error_code())
        })
}

fn publish_error(subject: &str, e: jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::StreamNotFound => Error::new(
            ErrorKind::NoHandler,
            format!("no stream stores subject {subject}"),
        ),
        K::MaxPayloadExceeded => {
            Error::new(ErrorKind::TooLarge, format!("message on {subject} refused: {e}"))
        }
        K::TimedOut => Error::new(ErrorKind::Timeout, format!("JetStream publish on {subject}: {e}")),
        // catga asks for a last sequence only when it publishes a job's
        // occurrence, which reads this refusal itself: only a forged
        // header gets here.
        K::WrongLastSequence => Error::new(
            ErrorKind::Invalid,
            format!("JetStream refused the message on {subject}: {e}"),
        ),
        // The stream refused it for what it is (a limit of the stream or
        // the account, a header it will not take): sending it again cannot
        // help, so it is dead-lettered rather than retried forever.
        K::Other if refused_for_good(&e) => Error::new(
            ErrorKind::Invalid,
            format!("JetStream refused the message on {subject}: {e}"),
        ),
        _ => Error::new(
            ErrorKind::Transport,
            format!("JetStream publish on {subject} failed: {e}"),
        ),
    }
}

/// The priority group a region-aware replica's consumers have and its
/// pulls name (see `durable_subscribe`).
const PRIORITY_GROUP: &str = "catga";

/// What records a keyed saga's router layout on share 0's consumer (see
/// `DurableOptions::routers`), before the count.
///
/// Kept in the consumer's description, which every server keeps and an
/// update may change: metadata (2.10 and later) is dropped by an earlier
/// server, also one that leads JetStream in a cluster mid-upgrade, and a
/// layout read back as never recorded makes share 0 make the other
/// shares' consumers again each time it sets up.
const ROUTERS_RECORD: &str = "catga router shares: ";

/// The durable consumer `durable` of `stream`, if it exists.
async fn consumer_found(stream: &jetstream::stream::Stream, durable: &str) -> Result<Option<consumer::Info>> {
    match stream.consumer_info(durable).await {
        Ok(info) => Ok(Some(info)),
        Err(e) if e.to_string().to_ascii_lowercase().contains("not found") => Ok(None),
        Err(e) => Err(js_error("consumer info", e)),
    }
}

/// The configuration catga gives a durable consumer: explicit acks, no
/// server limit on deliveries, and a priority group where the replica is
/// region-aware (`priority`, see `pull_priority`).
fn consumer_config(
    subject: &str,
    durable: &str,
    options: &DurableOptions,
    deliver_policy: consumer::DeliverPolicy,
    priority: Option<usize>,
) -> consumer::pull::Config {
    let config = consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject: subject.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: options.ack_wait,
        // No limit on the server: catga counts deliveries and ends
        // every message handled or dead-lettered, also one whose
        // replicas crashed before settling it (see the pipeline). With
        // a server limit, a message whose dead letter could not be
        // stored (over the broker's limit) was naked until the limit
        // and then never delivered again: neither handled nor kept.
        max_deliver: -1,
        max_ack_pending: options.max_ack_pending as i64,
        deliver_policy,
        description: options.routers.map(|n| format!("{ROUTERS_RECORD}{n}")),
        ..Default::default()
    };
    // Region-aware (`CATGA_REGION` set, server 2.12 or later): the
    // consumer hands its messages to the pulls of the lowest priority
    // waiting, so that the replicas of the stream's own cluster take
    // them and the other regions' only while none of those pulls (see
    // `pull_priority`). The server takes a pull naming the group on a
    // plain consumer too. Any other replica binds and pulls as without
    // regions: its group-less pull is refused once a region-aware
    // replica made the consumer prioritized ("Priority Group
    // missing"), and it binds again (see `JsSubscription::next`).
    if priority.is_some() {
        consumer::pull::Config {
            priority_policy: consumer::PriorityPolicy::Prioritized,
            priority_groups: vec![PRIORITY_GROUP.to_owned()],
            ..config
        }
    } else {
        config
    }
}

/// Starts pulling from `consumer`: in catga's priority group at
/// `priority` when given one (a region-aware replica's, see
/// `NatsTransport::pull_priority`), else a plain pull.
async fn pull(
    consumer: &consumer::PullConsumer,
    options: &DurableOptions,
    priority: Option<usize>,
) -> Result<consumer::pull::Stream> {
    let pulls = consumer
        .stream()
        .max_messages_per_batch(options.batch.max(1))
        .heartbeat(options.pull_expires / 3)
        .expires(options.pull_expires);
    let pulls = match priority {
        Some(p) => pulls.group(PRIORITY_GROUP).priority(p),
        None => pulls,
    };
    pulls.messages().await.map_err(|e| js_error("pull", e))
}

/// A durable pull consumer, read as a subscription.
pub(crate) struct JsSubscription {
    messages: Option<consumer::pull::Stream>,
    transport: NatsTransport,
    subject: String,
    consumer: consumer::PullConsumer,
    options: DurableOptions,
    /// Its pulls' priority (see `NatsTransport::pull_priority`).
    priority: Option<usize>,
}

impl JsSubscription {
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            let messages = self.messages.as_mut()?;
            match messages.next().await {
                Some(Ok(m)) => return Some(self.delivery(m)),
                // The server sends no heartbeat for the pull request the
                // client waits on: it no longer has it, and async-nats
                // waits until the request would have expired before it
                // asks again. With one message in flight (a keyed saga's
                // partition), that stalled the partition 6 s in the keyed
                // benchmark, with a single replica; pull anew at once.
                // A subscriber that relies on stream order ends instead: the
                // lost request may have taken messages into an inbox nobody
                // reads, which come back after the ack wait, behind newer
                // ones a fresh pull would get first (see `keyed::route`).
                Some(Err(e))
                    if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat
                        && self.options.in_order =>
                {
                    tracing::warn!(error = %e, subject = %self.subject, "pull from JetStream lost its request; ending the subscription");
                    self.messages = None;
                    return None;
                }
                Some(Err(e)) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                    tracing::warn!(error = %e, subject = %self.subject, "pull from JetStream lost its request; pulling anew");
                    // Boxed: rare, and large (see `NatsSubscription::next`).
                    match Box::pin(pull(&self.consumer, &self.options, self.priority)).await {
                        Ok(fresh) => self.messages = Some(fresh),
                        Err(e) => {
                            tracing::warn!(error = %e, subject = %self.subject, "cannot pull anew yet");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                // The consumer refuses the pull for its priority group: a
                // region-aware replica made it prioritized since this one,
                // without a region, bound it plain. async-nats counts the
                // refused pull as pending and asks no more; bound again
                // (plain), the pull matches the consumer.
                Some(Err(e))
                    if e.kind() == consumer::pull::MessagesErrorKind::Other
                        && e.to_string().contains("Priority Group") =>
                {
                    tracing::warn!(error = %e, subject = %self.subject, "the consumer refused this replica's pull; binding it again");
                    self.messages = None;
                    return None;
                }
                Some(Err(e)) => {
                    // Other failures of a pull: the stream goes on.
                    tracing::warn!(error = %e, subject = %self.subject, "pull from JetStream failed; pulling on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => return None,
            }
        }
    }

    fn delivery(&self, m: jetstream::Message) -> Delivery {
        let delivered = m.info().map(|i| i.delivered as u64).unwrap_or(1);
        let mut d = Delivery::new(
            m.message.subject.clone(),
            m.message.headers.clone(),
            m.message.payload.clone(),
            None,
            ReplyTo::Js(Box::new(JsAck {
                message: m,
                transport: self.transport.clone(),
            })),
        );
        d.delivered = delivered;
        d.tracked(self.transport.tap())
    }

    /// Stops pulling. Messages pulled but not yet taken are given back at
    /// once (a negative ack without delay) instead of waiting out their ack
    /// wait; messages being handled are acknowledged as they finish.
    pub(crate) async fn drain(&mut self) {
        if let Some(mut messages) = self.messages.take() {
            while let Some(Some(Ok(m))) = messages.next().now_or_never() {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
}

/// Acknowledges a JetStream message.
pub(crate) struct JsAck {
    message: jetstream::Message,
    transport: NatsTransport,
}

impl JsAck {
    /// The message's sequence in its stream.
    pub(crate) fn stream_seq(&self) -> Option<u64> {
        self.message.info().ok().map(|i| i.stream_sequence)
    }

    /// The message's sequence in its stream and when it was stored (Unix
    /// nanoseconds).
    pub(crate) fn stored_at(&self) -> Option<(u64, i128)> {
        self.message
            .info()
            .ok()
            .map(|i| (i.stream_sequence, i.published.unix_timestamp_nanos()))
    }

    pub(crate) async fn ack(self) -> Result<()> {
        self.message
            .ack()
            .await
            .map_err(|e| Error::new(ErrorKind::Transport, format!("ack failed: {e}")))
    }

    /// Still working on it: the ack wait starts again.
    pub(crate) async fn progress(&self) -> Result<()> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| Error::new(ErrorKind::Transport, format!("progress ack failed: {e}")))
    }

    pub(crate) async fn nak(self, delay: Duration) -> Result<()> {
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| Error::new(ErrorKind::Transport, format!("nak failed: {e}")))
    }

    /// Stores the dead letter, then terminates the message; if the letter
    /// cannot be stored, the message is given back to be delivered again
    /// (the server's deliveries are not limited: catga counts them, see
    /// `durable_subscribe`) rather than lost.
    pub(crate) async fn dead(self, letter: DeadLetter) -> Result<()> {
        let stored = super::Transport::from(self.transport.clone())
            .store_dead_letter(&letter)
            .await;
        match stored {
            Ok(()) => self
                .message
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| Error::new(ErrorKind::Transport, format!("term failed: {e}"))),
            Err(e) => {
                let _ = self
                    .message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
                Err(e)
            }
        }
    }

    /// Sends the message back to be redelivered now (an unsettled delivery).
    pub(crate) fn give_back_now(self) {
        let _ = self.message.ack_with(AckKind::Nak(None)).now_or_never();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(atomic: bool, record: Option<String>) -> stream::Config {
        let mut c = stream::Config {
            name: "CATGA_X".to_owned(),
            subjects: vec!["x".to_owned()],
            allow_atomic_publish: atomic,
            ..Default::default()
        };
        if let Some(r) = record {
            c.metadata.insert(SETTINGS_KEY.to_owned(), r);
        }
        c
    }

    #[test]
    fn atomic_batches_aside_a_stream_recorded_as_it_is_stays_catgas() {
        let plain = settings_record(&stream(false, None));
        assert!(
            !plain.contains(ATOMIC_MARK),
            "a record without batches is as before: {plain}"
        );
        // Made without batches, turned on by catga, or on by a release that
        // did not record it: catga's either way.
        for (atomic, record) in [
            (false, plain.clone()),
            (true, plain.clone() + ATOMIC_MARK),
            (true, plain.clone()),
        ] {
            let c = stream(atomic, Some(record.clone()));
            assert!(
                recorded_as_is(c.metadata.get(SETTINGS_KEY), &c, false),
                "{record} with {atomic}"
            );
        }
        // Someone changed what catga sets: not catga's.
        let mut changed = stream(false, Some(plain.clone()));
        changed.subjects.push("y".to_owned());
        assert!(!recorded_as_is(
            changed.metadata.get(SETTINGS_KEY),
            &changed,
            false
        ));
        // No record: catga's unless it carries what catga never sets.
        assert!(recorded_as_is(None, &stream(false, None), false));
        assert!(!recorded_as_is(None, &stream(false, None), true));
    }

    #[test]
    fn batches_turned_off_after_catga_turned_them_on_stay_off() {
        let on = settings_record(&stream(true, None));
        assert!(on.ends_with(ATOMIC_MARK));
        let off = stream(false, Some(on.clone()));
        assert!(batches_turned_off(off.metadata.get(SETTINGS_KEY), &off));
        let still_on = stream(true, Some(on));
        assert!(!batches_turned_off(
            still_on.metadata.get(SETTINGS_KEY),
            &still_on
        ));
        let never = stream(false, Some(settings_record(&stream(false, None))));
        assert!(!batches_turned_off(never.metadata.get(SETTINGS_KEY), &never));
    }

    #[test]
    fn a_batch_holds_at_most_its_count_and_its_bytes_but_always_one() {
        let small = |n: usize| super::super::Outgoing {
            subject: "x".to_owned(),
            id: format!("m{n}"),
            headers: async_nats::HeaderMap::new(),
            payload: Bytes::from(vec![0u8; 100]),
        };
        let many: Vec<_> = (0..1500).map(small).collect();
        assert_eq!(batch_len(many.iter()), BATCH_MESSAGES);
        assert_eq!(batch_len(many[..3].iter()), 3);
        let big = |n: usize| super::super::Outgoing {
            payload: Bytes::from(vec![0u8; 1 << 20]),
            ..small(n)
        };
        let large: Vec<_> = (0..10).map(big).collect();
        assert_eq!(batch_len(large.iter()), 3, "three 1 MiB messages in 4 MiB");
        let huge = [super::super::Outgoing {
            payload: Bytes::from(vec![0u8; 8 << 20]),
            ..small(0)
        }];
        assert_eq!(batch_len(huge.iter()), 1, "one message alone, whatever its size");
    }
}
