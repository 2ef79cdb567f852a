include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// `queue_group` needs a value; a bare word is a flag.
#[command(queue_group)]
async fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
