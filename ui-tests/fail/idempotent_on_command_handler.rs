include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// Idempotency of a command is declared on its type: its senders then
// attach a message id.
#[command(idempotent)]
async fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
