use catga::{Result, job};

// Each mistake in a schedule is named where it is written.
#[job(cron = "0 */5 * * *  * *")]
async fn seven_fields() -> Result<()> {
    Ok(())
}

#[job(cron = "0 61 * * * *")]
async fn minute_out_of_range() -> Result<()> {
    Ok(())
}

#[job(cron = "0 0 0 31 4 *")]
async fn never() -> Result<()> {
    Ok(())
}

#[job(every = "10ms")]
async fn too_often() -> Result<()> {
    Ok(())
}

#[job(every = "5")]
async fn no_unit() -> Result<()> {
    Ok(())
}

#[job(cron = "0 0 9 * * *", tz = "Europe/Atlantis")]
async fn unknown_zone() -> Result<()> {
    Ok(())
}

#[job(cron = "0 0 9 * * *", tz = "europe/berlin")]
async fn zone_spelled_otherwise() -> Result<()> {
    Ok(())
}

#[job(every = "1m", missed = "all")]
async fn unknown_policy() -> Result<()> {
    Ok(())
}

fn main() {}
