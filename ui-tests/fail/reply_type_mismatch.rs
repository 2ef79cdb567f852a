include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add(cmd: Add) -> Result<String> {
    Ok(cmd.a.to_string())
}

fn main() {}
