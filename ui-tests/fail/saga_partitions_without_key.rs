include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// Partitions split a keyed saga's instances: without a key there is
// nothing to split by.
#[saga(partitions = 16)]
async fn tally(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
