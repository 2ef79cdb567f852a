include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
