include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A keyed saga runs on the owner of its key's partition; the leader runs
// the sagas without a key. Both at once is a contradiction.
#[saga(key = sum, leader)]
async fn tally(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
