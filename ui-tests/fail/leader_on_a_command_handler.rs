include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A command goes to any replica of its queue group; only event handlers
// can wait for the leader.
#[command(leader)]
async fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
