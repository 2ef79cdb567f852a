use catga::job;

// A job is code run on a schedule: #[job] goes on an async fn.
#[job(every = "1m")]
pub struct Cleanup;

fn main() {}
