//! A cron job in a time zone (`tz`) runs once per occurrence over the
//! replicas and is listed with its zone. Clock changes themselves are
//! covered where they can be reached without waiting for one: the
//! schedule's own tests (`catga-names`) and the scheduler's decisions
//! (`runtime::jobs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use catga::{Context, Result, command, job};
use catga_tests::Backend;
use catga_tests::backend::shutdown_all;
use serde::{Deserialize, Serialize};

/// Reads the runs.
#[command(reply = BTreeMap<u64, u32>, subject = "tests.zoned_jobs.runs")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadZonedRuns;

/// Every second on St. John's wall clock (UTC-3:30, with summer time).
#[job(cron = "* * * * * *", tz = "America/St_Johns", idempotent)]
async fn zoned_tick(ctx: &Context) -> Result<()> {
    crate::jobs::count_occurrence(ctx, "zoned-runs").await
}

#[command]
async fn read_zoned_runs(ctx: &Context, _: ReadZonedRuns) -> Result<BTreeMap<u64, u32>> {
    crate::jobs::occurrences(ctx, "zoned-runs").await
}

catga_tests::on_both!(a_zoned_job_runs_each_second_once_and_is_listed_with_its_zone);

/// Two replicas: the occurrences are consecutive seconds, each run once,
/// and the listing shows the zone.
async fn a_zoned_job_runs_each_second_once_and_is_listed_with_its_zone(b: &Backend) {
    let replicas = b.replicas(module_path!(), 2).await;
    let client = b.client().await;
    let start = Instant::now();
    let seen = loop {
        let seen: BTreeMap<u64, u32> = client.send(ReadZonedRuns).await.unwrap_or_default();
        if seen.len() >= 4 {
            break seen;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} occurrences ran in 30 s: {seen:?}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let times: Vec<u64> = seen.keys().copied().collect();
    for (at, n) in &seen {
        assert_eq!(*n, 1, "the occurrence at {at} ran {n} times: {seen:?}");
        assert_eq!(at % 1000, 0, "on whole seconds: {seen:?}");
    }
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "an occurrence was skipped: {seen:?}");
    }
    let jobs = replicas[0].jobs().await.expect("jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].schedule, "cron * * * * * * (America/St_Johns)");
    let now = std::time::SystemTime::now();
    let next = jobs[0].next.expect("a next occurrence");
    assert!(next > now && next <= now + Duration::from_secs(1), "{jobs:?}");
    shutdown_all(replicas).await;
}
