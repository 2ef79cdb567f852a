//! Recurring jobs (`#[job]`): each occurrence runs once over every replica
//! of the service, also while replicas stop and start; the listing shows
//! a job's schedule, its next occurrence and the last one stored.
//!
//! Each run of the job counts its occurrence in a state in the store
//! (keyed by the occurrence's time), committed with its inbox entry: an
//! occurrence stored twice, or run twice with effect, counts 2.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use catga::{Context, Result, State, Versioned, command, job};
use catga_tests::Backend;
use catga_tests::backend::shutdown_all;
use serde::{Deserialize, Serialize};

/// The job's period, in ms.
const EVERY: u64 = 500;

/// Every occurrence seen: its time (unix ms) and how often it ran.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Runs {
    pub at: BTreeMap<u64, u32>,
}

impl State for Runs {
    const KIND: &'static str = "job-runs";
}

/// Reads the runs.
#[command(reply = BTreeMap<u64, u32>, subject = "tests.jobs.runs")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadRuns;

/// Counts the occurrence `ctx` runs in the runs kept under `key`, in the
/// handler's commit.
pub(crate) async fn count_occurrence(ctx: &Context, key: &str) -> Result<()> {
    let at = ctx
        .scheduled_at()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| catga::Error::invalid("an occurrence without its time"))?;
    let mut runs = ctx
        .try_load::<Runs>(key)
        .await?
        .unwrap_or_else(|| Versioned::new(key.to_owned(), Runs::default()));
    *runs.at.entry(at).or_default() += 1;
    ctx.save(runs).await?;
    Ok(())
}

/// The runs kept under `key`.
pub(crate) async fn occurrences(ctx: &Context, key: &str) -> Result<BTreeMap<u64, u32>> {
    Ok(ctx
        .try_load::<Runs>(key)
        .await?
        .map(|r| r.at.clone())
        .unwrap_or_default())
}

#[job(every = "500ms", idempotent)]
async fn tick(ctx: &Context) -> Result<()> {
    count_occurrence(ctx, "runs").await
}

#[command]
async fn read_runs(ctx: &Context, _: ReadRuns) -> Result<BTreeMap<u64, u32>> {
    occurrences(ctx, "runs").await
}

catga_tests::on_both!(
    each_occurrence_runs_once_over_replicas_that_come_and_go,
    jobs_are_listed_with_their_next_and_last_occurrence,
    a_run_on_demand_runs_once_beside_the_schedule
);

async fn runs(client: &catga::Client) -> BTreeMap<u64, u32> {
    client.send(ReadRuns).await.unwrap_or_default()
}

/// Waits until at least `n` occurrences ran.
async fn until_runs(client: &catga::Client, n: usize) -> BTreeMap<u64, u32> {
    let start = Instant::now();
    loop {
        let seen = runs(client).await;
        if seen.len() >= n {
            return seen;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} occurrences ran in 30 s, expected {n}: {seen:?}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three replicas schedule the job; one stops, one more starts: every
/// occurrence from the first on ran exactly once, one per period, none
/// skipped.
async fn each_occurrence_runs_once_over_replicas_that_come_and_go(b: &Backend) {
    let mut replicas = b.replicas(module_path!(), 3).await;
    let client = b.client().await;
    until_runs(&client, 4).await;
    let first = replicas.remove(0);
    first.shutdown().await.expect("clean shutdown");
    let seen = until_runs(&client, 8).await.len();
    replicas.push(b.runtime(module_path!(), "r4").await);
    let seen = until_runs(&client, seen + 4).await;
    let times: Vec<u64> = seen.keys().copied().collect();
    for (at, n) in &seen {
        assert_eq!(*n, 1, "the occurrence at {at} ran {n} times: {seen:?}");
        assert_eq!(
            at % EVERY,
            0,
            "occurrences fall on multiples of the period: {seen:?}"
        );
    }
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], EVERY, "an occurrence was skipped: {seen:?}");
    }
    shutdown_all(replicas).await;
}

/// The listing names the job, its schedule, when it runs next and the last
/// occurrence stored.
async fn jobs_are_listed_with_their_next_and_last_occurrence(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    until_runs(&client, 1).await;
    let jobs = rt.jobs().await.expect("jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert!(job.name.ends_with("jobs::tick"), "{job:?}");
    assert_eq!(job.schedule, "every 500ms");
    let now = std::time::SystemTime::now();
    let next = job.next.expect("a next occurrence");
    assert!(
        next > now && next <= now + Duration::from_millis(EVERY),
        "{job:?}"
    );
    let last = job.last.expect("a last occurrence");
    assert!(last <= now && last + Duration::from_secs(2) > now, "{job:?}");
    rt.shutdown().await.expect("clean shutdown");
}

/// `Runtime::run_job` stores a run now: it runs once, on one of the
/// replicas, with its own time, and the scheduled occurrences around it
/// all run, none skipped.
async fn a_run_on_demand_runs_once_beside_the_schedule(b: &Backend) {
    let replicas = b.replicas(module_path!(), 2).await;
    let client = b.client().await;
    let before = until_runs(&client, 2).await.len();
    let at = replicas[1].run_job("tick").await.expect("run now");
    let at = at.duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64;
    let start = Instant::now();
    let seen = loop {
        let seen = until_runs(&client, before + 1).await;
        // Two scheduled occurrences after the run on demand.
        if seen.contains_key(&at) && seen.keys().filter(|t| **t > at && *t % EVERY == 0).count() >= 2 {
            break seen;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(seen.values().all(|n| *n == 1), "each ran once: {seen:?}");
    let scheduled: Vec<u64> = seen.keys().copied().filter(|t| *t != at).collect();
    for pair in scheduled.windows(2) {
        assert_eq!(pair[1] - pair[0], EVERY, "an occurrence was skipped: {seen:?}");
    }
    assert!(
        replicas[0].run_job("no_such_job").await.is_err(),
        "an unknown job is refused"
    );
    shutdown_all(replicas).await;
}
