//! `#[derive(Syncable)]` gives a clear compile error for wrong attributes.

#[test]
fn wrong_attributes_fail_to_compile_with_a_clear_message() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
