include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// How older versions are read belongs to the message type.
#[event(upcast_from = Add)]
async fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
