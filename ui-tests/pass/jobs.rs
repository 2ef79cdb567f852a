//! Recurring jobs: `every` and `cron` (in UTC and in a zone), with and
//! without the context, and their options.

use catga::{Context, JobSchedule, Result, job};

#[job(every = "30s")]
async fn sweep() -> Result<()> {
    Ok(())
}

#[job(cron = "0 */5 * * * MON-FRI", idempotent, missed = "skip", jitter = "10s", max_deliver = 3, retry = 2)]
async fn report(ctx: &Context) -> Result<()> {
    let _ = ctx.scheduled_at();
    Ok(())
}

#[job(cron = "0 30 8 * * MON-FRI", tz = "Europe/Berlin")]
async fn morning() -> Result<()> {
    Ok(())
}

#[job(every = "1h", overlap)]
async fn rebuild(_ctx: &Context) -> Result<()> {
    Ok(())
}

fn main() {
    let table = catga::handlers();
    let find = |name: &str| {
        table
            .iter()
            .find(|h| h.name().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not registered"))
    };
    let sweep = find("::sweep");
    let options = sweep.job().expect("a job");
    assert_eq!(options.schedule, JobSchedule::Every(30_000));
    assert!(!options.skip_missed && !options.overlap && options.jitter_ms == 0);
    assert!(!sweep.is_idempotent());
    assert!(sweep.subject().starts_with("catga.job.") && sweep.subject().ends_with(".sweep"));
    assert_eq!(sweep.durable(), Some("sweep"));
    let report = find("::report");
    let options = report.job().expect("a job");
    assert_eq!(options.schedule, JobSchedule::Cron("0 */5 * * * MON-FRI"));
    assert!(options.skip_missed && options.jitter_ms == 10_000);
    assert!(report.is_idempotent());
    assert_eq!((report.max_deliver(), report.retries()), (Some(3), 2));
    assert!(find("::rebuild").job().expect("a job").overlap);
    let morning = find("::morning").job().expect("a job");
    assert_eq!(morning.tz, Some("Europe/Berlin"));
    assert_eq!(sweep.job().expect("a job").tz, None);
}
