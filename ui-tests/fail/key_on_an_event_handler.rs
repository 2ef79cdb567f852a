include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// Partitioning by key is what keyed sagas do; a plain event handler
// cannot take it.
#[event(key = sum)]
async fn on_added(e: Added) -> Result<()> {
    let _ = e;
    Ok(())
}

fn main() {}
