//! Compiles every case in `pass/` (and runs it) and every case in `fail/`,
//! comparing the compiler's output with the checked-in `.stderr` file.
//! `TRYBUILD=overwrite` regenerates them; review the diff before committing.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("pass/*.rs");
    t.compile_fail("fail/*.rs");
}
