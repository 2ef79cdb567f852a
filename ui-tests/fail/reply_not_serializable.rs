use catga::command;
use serde::{Deserialize, Serialize};

pub struct NotSerializable;

#[command(reply = NotSerializable)]
#[derive(Serialize, Deserialize)]
pub struct Ask;

fn main() {}
