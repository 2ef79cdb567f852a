include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Subtracted;

fn main() {}
