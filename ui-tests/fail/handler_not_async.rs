include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
