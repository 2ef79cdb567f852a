include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

use std::rc::Rc;

async fn audit(_: u64) {}

// An `Rc` held across an await makes the handler's future not `Send`: the
// runtime cannot move it between threads.
#[command]
async fn add(cmd: Add) -> Result<u64> {
    let shared = Rc::new(cmd.a);
    audit(*shared).await;
    Ok(*shared)
}

fn main() {}
