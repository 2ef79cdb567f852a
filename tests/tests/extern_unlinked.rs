//! The linkme rule, shown: this binary depends on `catga_extern_handlers`
//! (a dev-dependency of this package) but never names it, so the linker
//! drops its handler. `tests/extern_linked.rs` names it and keeps it.

use catga::{Result, command};
use serde::{Deserialize, Serialize};

/// A command of this binary.
#[command]
#[derive(Serialize, Deserialize, Debug)]
pub struct Local;

#[command]
async fn local(_: Local) -> Result<()> {
    Ok(())
}

#[test]
fn unnamed_library_crate_loses_its_handlers() {
    let names: Vec<&str> = catga::handlers().iter().map(|h| h.name()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("catga_extern_handlers::")),
        "the handler of an unnamed crate is dropped at link time: {names:?}"
    );
    assert_eq!(
        names,
        ["extern_unlinked::local"],
        "handlers of the binary itself are kept"
    );
}
