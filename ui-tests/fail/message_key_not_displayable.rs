include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

/// Not `Display`: a key is written as text.
#[derive(Serialize, Deserialize)]
pub struct AccountId(u64);

#[command(key = account)]
#[derive(Serialize, Deserialize)]
pub struct Deposit {
    pub account: AccountId,
    pub amount: u64,
}

fn main() {}
