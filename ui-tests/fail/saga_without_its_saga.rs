include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A saga function takes its saga first, then the event that starts it.
#[saga(leader)]
async fn fulfil(e: Added) -> Result<()> {
    let _ = e;
    Ok(())
}

fn main() {}
