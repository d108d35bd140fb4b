//! Fuzz target: the canonical change decoder; whatever decodes must re-encode and decode equal.
#![no_main]

use keel_schema::Change;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(change) = Change::decode(data) {
        let again = Change::decode(&change.encode()).expect("re-encoded change decodes");
        assert_eq!(again, change);
    }
});
