//! Fuzz target: journal record decoding (log and local records) and sealed-payload opening.
#![no_main]

use keel_journal::{LibraryKey, LocalRecord, LogRecord, Sealer};
use keel_schema::LibraryId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = LogRecord::decode(data) {
        // A record that decodes re-encodes to the same bytes.
        assert_eq!(LogRecord::encode(record.epoch, record.sealed), data);
    }
    if let Ok(record) = LocalRecord::decode(data) {
        assert_eq!(LocalRecord::encode(record.state, record.sealed), data);
    }
    let _ = Sealer::peek_change_id(data);
    let sealer = LibraryKey::generate().sealer(LibraryId(uuid::Uuid::nil()));
    assert!(sealer.open(data).is_err(), "a random payload opened under a fresh key");
});
