//! A replica of a service with one recurring job, for the process tests
//! of jobs (`tests/job_faults.rs`): `tick` runs every 500 ms,
//! idempotent, and counts each occurrence it ran in a state committed
//! with its inbox entry; `jobs.runs` answers what was counted.
//!
//! Each run prints `running <at>` when it starts and `ran <at>` when it
//! committed, so that a test can kill a replica while it runs one.
//! `JOB_RUN_MS` (default 300) is how long a run takes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use catga::{Context, Result, State, Versioned, command, job};
use serde::{Deserialize, Serialize};

/// Per occurrence (its time, unix ms): how often it ran, and how late
/// (ms after its time) its last run committed.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Runs {
    /// Occurrence time → (runs committed, ms late of the last).
    pub at: BTreeMap<u64, (u32, u64)>,
}

impl State for Runs {
    const KIND: &'static str = "job-runs";
}

/// Reads the runs.
#[command(reply = BTreeMap<u64, (u32, u64)>, subject = "jobs.runs")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadRuns;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[job(every = "500ms", idempotent)]
async fn tick(ctx: &Context) -> Result<()> {
    let at = ctx
        .scheduled_at()
        .map(ms)
        .ok_or_else(|| catga::Error::invalid("an occurrence without its time"))?;
    println!("running {at}");
    let run_ms = std::env::var("JOB_RUN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    tokio::time::sleep(Duration::from_millis(run_ms)).await;
    let mut runs = ctx
        .try_load::<Runs>("runs")
        .await?
        .unwrap_or_else(|| Versioned::new("runs".to_owned(), Runs::default()));
    let late = ms(SystemTime::now()).saturating_sub(at);
    let entry = runs.at.entry(at).or_default();
    entry.0 += 1;
    entry.1 = late;
    ctx.save(runs).await?;
    println!("ran {at}");
    Ok(())
}

#[command]
async fn read_runs(ctx: &Context, _: ReadRuns) -> Result<BTreeMap<u64, (u32, u64)>> {
    Ok(ctx
        .try_load::<Runs>("runs")
        .await?
        .map(|r| r.at.clone())
        .unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<()> {
    catga::start().await?.run_until_signal().await
}
