include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A saga's events are shared by its durable consumer (and the leader
// lease), not by a queue group.
#[saga(queue_group = "fulfilment")]
async fn fulfil(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
