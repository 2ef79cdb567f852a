include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add() -> Result<u64> {
    Ok(1)
}

fn main() {}
