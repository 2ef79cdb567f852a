include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command(reply = u64)]
async fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
