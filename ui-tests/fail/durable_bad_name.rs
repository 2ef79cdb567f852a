include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// JetStream consumer names cannot hold dots.
#[event(durable = "billing.v2")]
async fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
