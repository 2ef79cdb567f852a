include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A durable consumer's name already is its group.
#[event(durable = "ledger", queue_group = "ledger")]
async fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
