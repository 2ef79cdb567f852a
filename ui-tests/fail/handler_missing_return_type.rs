include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add(cmd: Add) {
    let _ = cmd.a;
}

fn main() {}
