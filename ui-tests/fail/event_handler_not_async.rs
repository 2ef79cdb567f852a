include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event]
fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
