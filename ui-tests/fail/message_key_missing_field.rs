include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// The command has no field `acount`: reported on the key.
#[command(key = acount)]
#[derive(Serialize, Deserialize)]
pub struct Deposit {
    pub account: String,
    pub amount: u64,
}

fn main() {}
