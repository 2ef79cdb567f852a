include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// The trigger event has no field `order_id`: reported on the key.
#[saga(key = order_id)]
async fn tally(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
