include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A time-out needs a unit, and a known one.
#[saga(timeout = "30")]
async fn no_unit(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

#[saga(timeout = "3 days")]
async fn bad_unit(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
