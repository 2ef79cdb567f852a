include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

// A job takes nothing or the context, and returns catga::Result<()>.
#[job(every = "1m")]
fn not_async() -> Result<()> {
    Ok(())
}

#[job(every = "1m")]
async fn with_an_event(e: Added) -> Result<()> {
    let _ = e;
    Ok(())
}

#[job(every = "1m")]
async fn too_many(ctx: &Context, e: Added) -> Result<()> {
    let _ = (ctx, e);
    Ok(())
}

#[job(every = "1m")]
async fn no_return() {}

#[job(every = "1m")]
async fn wrong_return() -> Result<u64> {
    Ok(1)
}

#[job(every = "1m")]
async fn not_the_context(ctx: &String) -> Result<()> {
    let _ = ctx;
    Ok(())
}

#[job(every = "1m")]
async fn café() -> Result<()> {
    Ok(())
}

fn main() {}
