include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
pub trait Adder {}

#[event]
const LIMIT: u32 = 3;

fn main() {}
