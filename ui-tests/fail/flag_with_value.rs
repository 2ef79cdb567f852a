include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// `idempotent` is a flag.
#[command(reply = u64, idempotent = true)]
#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub cents: u64,
}

fn main() {}
