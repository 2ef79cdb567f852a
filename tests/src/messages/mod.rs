//! The messages of the replica binaries of the process tests
//! (`src/bin/*_replica.rs`), declared once for the binaries, which handle
//! them, and for the tests, which send them.

pub mod region;
pub mod relay;
pub mod upgrade;
