include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event(subject = numbers)]
#[derive(Serialize, Deserialize)]
pub struct Bare;

fn main() {}
