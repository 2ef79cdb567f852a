include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// Deliveries are counted by a durable consumer only.
#[event(max_deliver = 3)]
async fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
