//! Recurring jobs (`#[job]`): every replica schedules, the broker decides.
//!
//! A job is served like a durable event handler of its own subject
//! (`catga.job.<crate>.<fn>`), with one durable consumer shared by the
//! replicas, so each stored occurrence runs on one replica: again after
//! its ack wait if that replica dies or stalls, once in effect when the
//! job is `idempotent` (its inbox is keyed by the occurrence's id,
//! `<job>:<scheduled unix ms>`).
//!
//! Each occurrence is stored once, whatever the number of replicas and
//! however late one wakes: every replica reads the last occurrence stored
//! and publishes the next with `Nats-Expected-Last-Subject-Sequence` set
//! to the last one's sequence (and the occurrence's id as its message
//! id), so the stream stores one of the replicas' copies and refuses the
//! others; a replica that stalled and wakes with an old view is refused
//! the same way. No lease is involved: while one replica lives, the
//! occurrences are published, with no hand-over gap.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use catga_names::schedule::{self, Schedule};

use super::Shared;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{HandlerSpec, JobOptions, JobSchedule};
use crate::transport::Appended;

/// How late an occurrence may be published and still count as on time
/// (besides the job's jitter): a replica's timer and the broker's round
/// trips take milliseconds; a second leaves room for a loaded host.
const ON_TIME: u64 = 1_000;

/// The longest wait between two looks at the stream: a clock set back
/// or forward is noticed within it.
const LONGEST_WAIT: Duration = Duration::from_secs(60);

/// How long one question to the broker may take.
const ASK: Duration = Duration::from_secs(5);

/// Occurrences stored and not yet run, past which a job without
/// `overlap` does not store more (it is slower than its schedule, or its
/// consumer is stuck): the next ones are missed, and `missed` decides.
pub(crate) const MAX_WAITING: u64 = 100;

/// A job's ack wait at most: a replica that dies while running an
/// occurrence gives it back this soon (a running one keeps it with
/// progress acks).
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(5);

use crate::wire::occurrence_ms;

/// The part of `spec`'s occurrence ids before the time: the job's name
/// in visible ASCII, cut (with a hash of the whole) so that an id fits
/// [`MAX_ID_LEN`](crate::wire::MAX_ID_LEN), and `:`. Room is left for
/// `:` and a time (21), and for what a run on demand adds (`.run` and a
/// time, 24) or a replayed dead letter (`.replay<n>`).
fn occurrence_prefix(spec: &HandlerSpec) -> String {
    const ROOM: usize = crate::wire::MAX_ID_LEN - 21 - 24;
    let full = spec.name();
    let mut name: String = full
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if name.len() > ROOM {
        let hash = xxhash_rust::xxh3::xxh3_64(full.as_bytes());
        name.truncate(ROOM - 17);
        name = format!("{name}~{hash:016x}");
    }
    name.push(':');
    name
}

/// The message id of `spec`'s occurrence at `at_ms`: `<job>:<ms>`.
pub(crate) fn occurrence_id(spec: &HandlerSpec, at_ms: u64) -> String {
    format!("{}{at_ms}", occurrence_prefix(spec))
}

/// The time of `spec`'s occurrence with message id `id`, if it is one the
/// scheduler stored (not a run on demand, a replayed dead letter, nor
/// anything else published on the job's subject).
fn stored_time(spec: &HandlerSpec, id: &str) -> Option<u64> {
    let digits = id.strip_prefix(&occurrence_prefix(spec))?;
    occurrence_ms(&format!(":{digits}"))
}

/// The message id of a run of `spec` on demand at `at_ms`, after the
/// last occurrence stored (`last`, if any): `<job>:<ms>.run<last ms>`.
fn run_id(spec: &HandlerSpec, at_ms: u64, last: Option<u64>) -> String {
    let last = last.map(|l| l.to_string()).unwrap_or_default();
    format!("{}{at_ms}.run{last}", occurrence_prefix(spec))
}

/// The last occurrence of the schedule stored as of the message with id
/// `id`: its own time for an occurrence, the one it carries for a run on
/// demand (so that a run on demand, the last message of the stream,
/// does not hide the schedule's place from the schedulers), none for
/// anything else.
fn schedule_mark(spec: &HandlerSpec, id: &str) -> Option<u64> {
    let rest = id.strip_prefix(&occurrence_prefix(spec))?;
    match rest.split_once(".run") {
        Some((own, last)) => {
            occurrence_ms(&format!(":{own}"))?;
            occurrence_ms(&format!(":{last}"))
        }
        None => stored_time(spec, id),
    }
}

/// Whether the occurrence with message id `id` of job `spec` (with
/// `missed = "skip"`) is missed by now: its successor came due more than
/// the on-time margin ago.
pub(crate) fn superseded(spec: &HandlerSpec, id: &str, now: u64) -> bool {
    let Some(options) = spec.job().filter(|o| o.skip_missed) else {
        return false;
    };
    let (Ok(schedule), Some(at)) = (schedule_of(options), stored_time(spec, id)) else {
        return false;
    };
    schedule
        .next_after(at)
        .is_some_and(|next| next.saturating_add(ON_TIME + options.jitter_ms) < now)
}

/// The schedule a job's attribute wrote (checked at compile time).
pub(crate) fn schedule_of(options: &JobOptions) -> Result<Schedule> {
    match options.schedule {
        JobSchedule::Every(ms) => Ok(Schedule::Every(ms.max(schedule::MIN_EVERY_MS))),
        JobSchedule::Cron(text) => {
            let cron = schedule::parse_cron(text)
                .map_err(|why| Error::new(ErrorKind::Config, format!("cron expression {text:?}: {why}")))?;
            match options.tz {
                None => Ok(Schedule::Cron(cron)),
                Some(tz) => schedule::parse_zone(tz)
                    .map(|zone| Schedule::Zoned(cron, zone))
                    .map_err(|why| Error::new(ErrorKind::Config, format!("time zone {tz:?}: {why}"))),
            }
        }
    }
}

/// What a job's schedule, its last stored occurrence and the time say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Publish the occurrence at this time.
    Publish(u64),
    /// Nothing to do yet: look again at this time.
    WaitUntil(u64),
    /// Never again (a cron expression without a future date).
    Never,
}

/// Decides what to do at `now`, given the last occurrence stored
/// (`last`, if its time is known) and this replica's share of the jitter
/// of an occurrence (`jitter(at)`, at most the job's `jitter`).
fn decide(
    schedule: &Schedule,
    options: &JobOptions,
    last: Option<u64>,
    now: u64,
    jitter: impl Fn(u64) -> u64,
) -> Next {
    let on_time = ON_TIME.saturating_add(options.jitter_ms);
    if let Some(due) = schedule.at_or_before(now)
        && last.is_none_or(|at| at < due)
    {
        let late = now - due;
        let run = match last {
            // Never stored (a new job, or a stream that lost it): only an
            // occurrence on time, never one from before the job ran.
            None => late <= on_time,
            Some(_) => !options.skip_missed || late <= on_time,
        };
        if run {
            let start = due.saturating_add(jitter(due));
            return if now < start {
                Next::WaitUntil(start)
            } else {
                Next::Publish(due)
            };
        }
    }
    match schedule.next_after(now.max(last.unwrap_or(0))) {
        Some(next) => Next::WaitUntil(next.saturating_add(jitter(next))),
        None => Next::Never,
    }
}

/// A replica's share of the jitter of the occurrence at `at`: the same
/// for a replica and an occurrence, different across replicas.
fn jitter(instance: &str, options: &JobOptions, at: u64) -> u64 {
    if options.jitter_ms == 0 {
        return 0;
    }
    let seed = format!("{instance}:{at}");
    xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) % options.jitter_ms.saturating_add(1)
}

/// One job's scheduler on this replica.
struct Scheduler {
    spec: &'static HandlerSpec,
    options: JobOptions,
    schedule: Schedule,
    /// Its stream was made (or found).
    stream_ready: bool,
    /// The newest occurrence this replica saw stored: what it goes by
    /// when the stream's last message is not an occurrence (a replayed
    /// dead letter).
    newest: Option<u64>,
    /// A warning about a last occurrence in the future was given.
    warned_future: bool,
    /// When this replica began scheduling the job (by its clock): with
    /// nothing stored yet, an occurrence after it is this replica's to
    /// store even late (it was up, but stalled, or a test kit moved the
    /// clock past it); one before it is never run.
    started: u64,
}

/// Schedules `spec` on this replica until the task is aborted (at
/// shutdown).
pub(crate) async fn schedule(shared: Arc<Shared>, spec: &'static HandlerSpec) {
    let Some(options) = spec.job().copied() else {
        return;
    };
    let schedule = match schedule_of(&options) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(job = spec.name(), error = %e, "the job is not scheduled");
            return;
        }
    };
    let mut s = Scheduler {
        spec,
        options,
        schedule,
        stream_ready: false,
        newest: None,
        warned_future: false,
        started: shared.client.transport().clock().now_ms(),
    };
    let mut failing = Duration::ZERO;
    // One watch for the whole loop: a move of the clock during a round
    // (a test kit's) is seen by the nap after it.
    let mut moved = shared.client.transport().clock().watch();
    loop {
        let wait = match s.round(&shared).await {
            Ok(wait) => {
                failing = Duration::ZERO;
                wait
            }
            Err(e) => {
                if e.kind() == ErrorKind::NoHandler {
                    // The stream is gone: made again next round.
                    s.stream_ready = false;
                }
                // 100 ms, doubling to 5 s: a broker away is asked again
                // soon after it is back.
                failing = (failing * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                if failing >= Duration::from_secs(5) {
                    tracing::warn!(job = spec.name(), error = %e, "could not schedule the job's next occurrence");
                } else {
                    tracing::debug!(job = spec.name(), error = %e, "could not schedule the job's next occurrence");
                }
                failing
            }
        };
        // A test kit moving the clock forward wakes it to look again.
        crate::clock::Clock::nap_watching(&mut moved, wait.min(LONGEST_WAIT)).await;
    }
}

impl Scheduler {
    /// One look at the stream: publishes the occurrence due, if any, and
    /// says how long to wait before the next look.
    async fn round(&mut self, shared: &Shared) -> Result<Duration> {
        let spec = self.spec;
        let transport = shared.client.transport();
        let subject = spec.subject();
        if !self.stream_ready {
            bounded(transport.ensure_job_stream(subject, &shared.config.streams)).await?;
            self.stream_ready = true;
        }
        let last = bounded(transport.last_on(subject)).await?;
        let now = transport.clock().now_ms();
        let on_time = ON_TIME.saturating_add(self.options.jitter_ms);
        let mut last_at = last.as_ref().and_then(|(_, id)| schedule_mark(spec, id));
        if let Some(at) = last_at
            && at > now.saturating_add(on_time)
        {
            if !self.warned_future {
                self.warned_future = true;
                tracing::warn!(
                    job = spec.name(),
                    last_ms = at,
                    now_ms = now,
                    "the job's last occurrence stored is in the future: a replica's clock runs ahead, or \
                     it was published by hand; going by this replica's clock"
                );
            }
            last_at = None;
        }
        let last_at = last_at.max(self.newest);
        // What the stream shows is what this replica saw stored: a later
        // round whose last message is no occurrence (a replayed dead
        // letter) goes by it.
        self.newest = last_at;
        // An empty stream: an occurrence after this replica began is its
        // to store, even late; one before, never.
        let last_at = match &last {
            None => last_at.or(Some(self.started.saturating_sub(1))),
            Some(_) => last_at,
        };
        let instance = shared.config.instance_id.as_str();
        let options = self.options;
        match decide(&self.schedule, &options, last_at, now, |at| {
            jitter(instance, &options, at)
        }) {
            Next::Publish(at) => {
                let after = last.as_ref().map_or(0, |(seq, _)| *seq);
                if after > 0 {
                    let durable = spec.durable().unwrap_or(spec.name());
                    let out = bounded(transport.durable_outstanding(subject, durable)).await?;
                    let waiting = out.pending + out.ack_pending;
                    if waiting >= MAX_WAITING {
                        tracing::warn!(
                            job = spec.name(),
                            waiting,
                            "the job runs slower than its schedule: {waiting} occurrences wait; the next is \
                             not stored until fewer do"
                        );
                        return Ok(Duration::from_millis(ON_TIME));
                    }
                }
                let id = occurrence_id(spec, at);
                let headers = crate::wire::message_headers(true, 1, crate::wire::Cause::Id(&id));
                let stored = bounded(transport.publish_after_seq(
                    subject,
                    headers,
                    bytes::Bytes::new(),
                    after,
                    shared.config.request_timeout,
                ))
                .await?;
                match stored {
                    Appended::Stored | Appended::Repeated => {
                        if stored == Appended::Stored {
                            tracing::debug!(job = spec.name(), id, late_ms = now - at, "occurrence stored");
                        }
                        self.newest = self.newest.max(Some(at));
                        let next = self.schedule.next_after(at).unwrap_or(u64::MAX);
                        Ok(Duration::from_millis(next.saturating_sub(now)))
                    }
                    // Another replica stored something since: look again.
                    Appended::Behind => Ok(Duration::ZERO),
                }
            }
            Next::WaitUntil(at) => Ok(Duration::from_millis(at.saturating_sub(now))),
            Next::Never => {
                tracing::warn!(job = spec.name(), "the job's schedule has no future occurrence");
                Ok(LONGEST_WAIT)
            }
        }
    }
}

/// Stores a run of `spec` at this moment, outside its schedule (an
/// operator's or a test's "run it now"): it runs like an occurrence, on
/// one replica, once in effect when the job is idempotent. Its id,
/// `<job>:<ms>.run<last>`, is not one the schedulers take for an
/// occurrence (an occurrence due at the same moment is still stored and
/// run), and it carries the last occurrence stored, which the schedulers
/// read through it (see [`schedule_mark`]). Returns its time (unix ms):
/// now, or just after the last message stored when that is later by less
/// than a second (two runs in one millisecond are two runs; a time far
/// ahead, from a clock running ahead or a forged id, is not followed).
pub(crate) async fn run_now(
    transport: &crate::transport::Transport,
    streams: &crate::config::StreamSettings,
    timeout: Duration,
    spec: &HandlerSpec,
) -> Result<u64> {
    let subject = spec.subject();
    bounded(transport.ensure_job_stream(subject, streams)).await?;
    let mut floor = 0;
    // Expected-sequence publishes race with the schedulers: a few tries.
    for _ in 0..10 {
        let last = bounded(transport.last_on(subject)).await?;
        let now = transport.clock().now_ms();
        let last_time = last
            .as_ref()
            .and_then(|(_, id)| crate::wire::occurrence_of(subject, id))
            .map(crate::wire::unix_ms)
            .filter(|t| *t <= now.saturating_add(ON_TIME));
        let at = now.max(last_time.map_or(0, |t| t.saturating_add(1))).max(floor);
        let mark = last.as_ref().and_then(|(_, id)| schedule_mark(spec, id));
        let id = run_id(spec, at, mark);
        let headers = crate::wire::message_headers(true, 1, crate::wire::Cause::Id(&id));
        let after = last.as_ref().map_or(0, |(seq, _)| *seq);
        match bounded(transport.publish_after_seq(subject, headers, bytes::Bytes::new(), after, timeout))
            .await?
        {
            Appended::Stored => return Ok(at),
            // Another process stored a run with this id: the next
            // millisecond.
            Appended::Repeated => floor = at.saturating_add(1),
            Appended::Behind => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!("the stream of job {} kept changing: try again", spec.name()),
    ))
}

/// The job among `specs` named `name`: its path (`crate::module::fn`) or
/// its function's name when no other job has it.
pub(crate) fn find<'a>(
    specs: impl IntoIterator<Item = &'a HandlerSpec>,
    name: &str,
) -> Result<&'a HandlerSpec> {
    let jobs: Vec<&HandlerSpec> = specs.into_iter().filter(|s| s.job().is_some()).collect();
    if let Some(exact) = jobs.iter().find(|s| s.name() == name) {
        return Ok(exact);
    }
    let mut by_fn = jobs.iter().filter(|s| s.name().rsplit("::").next() == Some(name));
    match (by_fn.next(), by_fn.next()) {
        (Some(one), None) => Ok(one),
        (Some(_), Some(_)) => Err(Error::new(
            ErrorKind::Invalid,
            format!("several jobs are named `{name}`: give the job's path (`crate::module::{name}`)"),
        )),
        (None, _) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no job `{name}` here; the jobs are: {}",
                jobs.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    crate::resilience::within(ASK, "a question to the broker", f).await
}

/// A job as [`Runtime::jobs`](crate::Runtime::jobs) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's function (`crate::module::fn_name`).
    pub name: &'static str,
    /// Its schedule as written: `every 30s` or `cron 0 */5 * * * *`.
    pub schedule: String,
    /// The next occurrence after now.
    pub next: Option<SystemTime>,
    /// The last run stored (published for a replica to run): an
    /// occurrence, a run on demand or a replayed dead letter.
    pub last: Option<SystemTime>,
}

/// A delayed message waiting in the store, as
/// [`Runtime::delayed`](crate::Runtime::delayed) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayedInfo {
    /// Its message id.
    pub id: String,
    /// The subject it is published on.
    pub subject: String,
    /// When it is due.
    pub due: SystemTime,
}

/// A period as the attribute may have written it (`30s`, `5m`).
fn written(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// `spec`'s listing, its last occurrence read from the job's stream
/// through `transport`.
pub(crate) async fn info(
    transport: &crate::transport::Transport,
    spec: &'static HandlerSpec,
) -> Result<Option<JobInfo>> {
    let Some(options) = spec.job() else {
        return Ok(None);
    };
    let schedule = schedule_of(options)?;
    let last = match bounded(transport.last_on(spec.subject())).await {
        // Any run stored: an occurrence, a run on demand, a replay.
        Ok(last) => last
            .and_then(|(_, id)| crate::wire::occurrence_of(spec.subject(), &id))
            .map(crate::wire::unix_ms),
        // Its stream is not made yet: nothing stored.
        Err(e) if e.kind() == ErrorKind::NoHandler => None,
        Err(e) => return Err(e),
    };
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    Ok(Some(JobInfo {
        name: spec.name(),
        schedule: match options.schedule {
            JobSchedule::Every(ms) => format!("every {}", written(ms)),
            JobSchedule::Cron(text) => match options.tz {
                Some(tz) => format!("cron {text} ({tz})"),
                None => format!("cron {text}"),
            },
        },
        next: schedule.next_after(transport.clock().now_ms()).map(at),
        last: last.map(at),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::now_ms;

    fn options(skip_missed: bool, jitter_ms: u64) -> JobOptions {
        JobOptions {
            schedule: JobSchedule::Every(500),
            skip_missed,
            jitter_ms,
            overlap: false,
            tz: None,
        }
    }

    fn none(_: u64) -> u64 {
        0
    }

    #[test]
    fn an_occurrence_is_published_once_its_time_comes() {
        let s = Schedule::Every(500);
        let o = options(false, 0);
        assert_eq!(decide(&s, &o, Some(1_000), 1_499, none), Next::WaitUntil(1_500));
        assert_eq!(decide(&s, &o, Some(1_000), 1_500, none), Next::Publish(1_500));
        assert_eq!(decide(&s, &o, Some(1_500), 1_700, none), Next::WaitUntil(2_000));
    }

    #[test]
    fn a_replica_waits_for_its_share_of_the_jitter() {
        let s = Schedule::Every(3_600_000);
        let o = options(false, 30_000);
        let mine = |_| 20_000;
        assert_eq!(
            decide(&s, &o, Some(3_600_000), 7_200_000 + 5_000, mine),
            Next::WaitUntil(7_220_000)
        );
        assert_eq!(
            decide(&s, &o, Some(3_600_000), 7_220_000, mine),
            Next::Publish(7_200_000)
        );
        assert_eq!(
            decide(&s, &o, Some(7_200_000), 7_220_000, mine),
            Next::WaitUntil(10_820_000)
        );
    }

    #[test]
    fn missed_occurrences_run_the_latest_once_or_are_skipped() {
        let s = Schedule::Every(500);
        // Down from 1,000 to 60,200: the newest due is 60,000.
        assert_eq!(
            decide(&s, &options(false, 0), Some(1_000), 60_200, none),
            Next::Publish(60_000)
        );
        assert_eq!(
            decide(&s, &options(true, 0), Some(1_000), 60_200, none),
            Next::Publish(60_000)
        );
        // Every hour, found 30 minutes late.
        let hourly = Schedule::Every(3_600_000);
        let late = 7_200_000 + 1_800_000;
        assert_eq!(
            decide(&hourly, &options(false, 0), Some(3_600_000), late, none),
            Next::Publish(7_200_000)
        );
        assert_eq!(
            decide(&hourly, &options(true, 0), Some(3_600_000), late, none),
            Next::WaitUntil(10_800_000)
        );
        // The jitter is part of being on time.
        assert_eq!(
            decide(
                &hourly,
                &options(true, 600_000),
                Some(3_600_000),
                7_200_000 + 500_000,
                none
            ),
            Next::Publish(7_200_000)
        );
    }

    #[test]
    fn a_zoned_job_through_the_clock_changes() {
        // 02:30 in New York, once a day: on 2026-03-08 the clocks skip from
        // 02:00 to 03:00 (07:00 UTC), and the occurrence runs then.
        let tz = JobOptions {
            schedule: JobSchedule::Cron("0 30 2 * * *"),
            tz: Some("America/New_York"),
            ..options(false, 0)
        };
        let s = schedule_of(&tz).expect("a schedule");
        let change = 1_772_953_200_000;
        let day_before = change - 86_400_000 + 1_800_000;
        assert_eq!(
            decide(&s, &tz, Some(day_before), change - 1, none),
            Next::WaitUntil(change)
        );
        assert_eq!(
            decide(&s, &tz, Some(day_before), change, none),
            Next::Publish(change)
        );
        assert_eq!(
            decide(&s, &tz, Some(change), change + 1, none),
            Next::WaitUntil(change + 86_400_000 - 1_800_000)
        );
        let unknown = JobOptions {
            tz: Some("Mars/Olympus"),
            ..tz
        };
        let e = schedule_of(&unknown).expect_err("no such zone");
        assert!(e.to_string().contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn a_run_on_demand_last_in_the_stream_keeps_the_schedules_place() {
        // Hourly; the 1:00 occurrence stored, a run on demand at 1:30,
        // every replica down from 1:59 to 2:02: the 2:00 occurrence runs
        // once (missed = "latest"), and a replica waking with an old view
        // does not store 1:00 again.
        let hourly = Schedule::Every(3_600_000);
        let spec = spec("app::expire", None);
        let run = run_id(&spec, 5_400_000, Some(3_600_000));
        let mark = schedule_mark(&spec, &run);
        assert_eq!(
            decide(&hourly, &options(false, 0), mark, 7_320_000, none),
            Next::Publish(7_200_000)
        );
        assert_eq!(
            decide(&hourly, &options(false, 0), mark, 3_700_000, none),
            Next::WaitUntil(7_200_000)
        );
    }

    #[test]
    fn a_new_job_does_not_run_an_occurrence_from_before() {
        let hourly = Schedule::Every(3_600_000);
        assert_eq!(
            decide(&hourly, &options(false, 0), None, 7_200_000 + 1_800_000, none),
            Next::WaitUntil(10_800_000)
        );
        assert_eq!(
            decide(&hourly, &options(false, 0), None, 7_200_000 + 300, none),
            Next::Publish(7_200_000)
        );
    }

    struct Never;
    impl crate::registry::JobHandler for Never {
        async fn call(_: crate::Context) -> Result<()> {
            Ok(())
        }
    }

    fn spec(name: &'static str, options: Option<JobOptions>) -> HandlerSpec {
        HandlerSpec::for_job::<Never>(
            name,
            "catga.job.app.expire",
            crate::registry::HandlerOptions {
                job: options,
                ..crate::registry::HandlerOptions::DEFAULT
            },
        )
    }

    #[test]
    fn occurrence_ids_carry_their_time_and_fit() {
        let long: &'static str = Box::leak("m::".repeat(200).into_boxed_str());
        for name in ["app::jobs::expire", long] {
            let spec = spec(name, None);
            let id = occurrence_id(&spec, 1_796_547_600_000);
            assert!(id.len() <= crate::wire::MAX_ID_LEN, "{id}");
            assert_eq!(stored_time(&spec, &id), Some(1_796_547_600_000));
            let run = run_id(&spec, u64::MAX, Some(u64::MAX));
            assert!(run.len() <= crate::wire::MAX_ID_LEN, "{run}");
            let replay = format!("{}.replay99", occurrence_id(&spec, u64::MAX));
            assert!(replay.len() <= crate::wire::MAX_ID_LEN, "{replay}");
            let run = run_id(&spec, 1_796_547_700_000, Some(1_796_547_600_000));
            assert_eq!(
                stored_time(&spec, &run),
                None,
                "a run on demand is not an occurrence"
            );
            assert_eq!(
                schedule_mark(&spec, &run),
                Some(1_796_547_600_000),
                "but it tells the last one stored"
            );
            assert_eq!(schedule_mark(&spec, &run_id(&spec, 5, None)), None);
            assert_eq!(schedule_mark(&spec, &id), Some(1_796_547_600_000));
            assert_eq!(
                crate::wire::occurrence_of("catga.job.app.expire", &run),
                Some(UNIX_EPOCH + Duration::from_millis(1_796_547_700_000)),
                "its own time for the handler"
            );
            assert_eq!(
                crate::wire::occurrence_of("catga.job.app.expire", &id),
                Some(UNIX_EPOCH + Duration::from_millis(1_796_547_600_000))
            );
        }
        assert_eq!(crate::wire::occurrence_of("evt.x", "a:1"), None);
        // A replayed dead letter keeps its time for the handler; the
        // scheduler does not take it, nor another job's id, nor a forged
        // one, for an occurrence it stored.
        let spec = spec("app::expire", None);
        assert_eq!(
            crate::wire::occurrence_of("catga.job.app.expire", "app::expire:1500.replay7"),
            Some(UNIX_EPOCH + Duration::from_millis(1_500))
        );
        assert_eq!(stored_time(&spec, "app::expire:1500.replay7"), None);
        assert_eq!(stored_time(&spec, "app::expire:+15"), None);
        assert_eq!(stored_time(&spec, "x:99999999999999"), None);
        assert_eq!(stored_time(&spec, "app::other:1500"), None);
        assert_eq!(schedule_mark(&spec, "app::expire:1500.replay7"), None);
        assert_eq!(schedule_mark(&spec, "app::expire:1500.run+3"), None);
        assert_eq!(schedule_mark(&spec, "app::expire:x.run1500"), None);
    }

    #[test]
    fn only_an_occurrence_whose_successor_is_long_due_is_skipped() {
        let skip = spec("app::expire", Some(options(true, 0)));
        let keep = spec("app::expire", Some(options(false, 0)));
        let now = now_ms();
        let old = occurrence_id(&skip, now / 500 * 500 - 5_000);
        let fresh = occurrence_id(&skip, now / 500 * 500);
        assert!(superseded(&skip, &old, now));
        assert!(!superseded(&skip, &fresh, now));
        assert!(!superseded(&keep, &old, now), "`latest` runs what was stored");
    }
}
