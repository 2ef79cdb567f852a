include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// The key names a field: a string or a path is not one.
#[saga(key = "sum")]
async fn by_string(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

#[saga(key = e::sum)]
async fn by_path(saga: &Saga, e: Added) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

fn main() {}
