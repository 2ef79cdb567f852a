use catga::command;

#[command]
pub struct NoSerde {
    pub a: u64,
}

fn main() {}
