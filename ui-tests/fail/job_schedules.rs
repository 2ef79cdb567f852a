use catga::{Result, job};

// A job has exactly one schedule.
#[job(every = "1m", cron = "0 * * * * *")]
async fn both() -> Result<()> {
    Ok(())
}

#[job(idempotent)]
async fn neither() -> Result<()> {
    Ok(())
}

// Keys of other attributes are refused, naming what a job takes.
#[job(every = "1m", queue_group = "workers")]
async fn grouped() -> Result<()> {
    Ok(())
}

// Both schedules, one of them also invalid: both mistakes at once.
#[job(every = "10ms", cron = "0 * * * * *")]
async fn both_and_too_often() -> Result<()> {
    Ok(())
}

// A zone is for a cron expression's wall clock.
#[job(every = "1h", tz = "Europe/Berlin")]
async fn zone_without_cron() -> Result<()> {
    Ok(())
}

// The jitter stays below the period, and below a minute.
#[job(every = "10s", jitter = "10s")]
async fn jitter_as_long_as_the_period() -> Result<()> {
    Ok(())
}

#[job(every = "1h", jitter = "5m")]
async fn jitter_too_long() -> Result<()> {
    Ok(())
}

fn main() {}
