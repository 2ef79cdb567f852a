#![allow(unused_imports)] // the shared header imports more than each case uses

use catga::{Context, Result, command, event};
use serde::{Deserialize, Serialize};

#[command(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Add {
    pub a: u64,
}

#[event]
#[derive(Serialize, Deserialize)]
pub struct Added {
    pub sum: u64,
}

#[event(subject = "numbers.one", subject = "numbers.two")]
#[derive(Serialize, Deserialize)]
pub struct Twice;
fn main() {}
