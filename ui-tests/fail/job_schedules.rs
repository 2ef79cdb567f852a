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

fn main() {}
