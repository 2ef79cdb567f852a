//! The linkme rule, shown: this binary depends on `catga_extern_handlers`
//! (a dev-dependency of this package) but never names it, so the linker
//! drops its handler. `tests/extern_linked.rs` names it and keeps it.

#[test]
fn unnamed_library_crate_loses_its_handlers() {
    let names: Vec<&str> = catga::registry::handlers().iter().map(|h| h.name).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("catga_extern_handlers::")),
        "the handler of an unnamed crate is dropped at link time: {names:?}"
    );
    assert!(
        names.contains(&"catga_tests::handlers::echo::echo"),
        "handlers of named crates are kept: {names:?}"
    );
}

/// Names the harness crate (so its handlers are linked), nothing else.
#[allow(dead_code)]
fn uses_the_harness() -> catga_tests::Backend {
    catga_tests::Backend::memory()
}
