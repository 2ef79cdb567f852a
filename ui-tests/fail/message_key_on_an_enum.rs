include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// An enum has no field of its own to place its writes by.
#[event(key = account)]
#[derive(Serialize, Deserialize)]
pub enum Moved {
    In { account: String },
    Out { account: String },
}

fn main() {}
