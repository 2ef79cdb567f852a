use catga::saga;

// The event that starts a saga is an #[event] type; #[saga] goes on the
// async fn that runs it.
#[saga]
pub struct Fulfil {
    pub order: u64,
}

fn main() {}
