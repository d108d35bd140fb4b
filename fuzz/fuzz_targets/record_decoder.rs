//! Fuzz target: journal record decoding (log pages, log and local records) and sealed-payload
//! opening.
#![no_main]

use keel_journal::{LibraryKey, LocalRecord, LogPage, LogRecord, PageBuilder, Sealer};
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
    if let Ok(page) = LogPage::parse(data) {
        // A page that parses rebuilds to the same records (a bound one to the same bytes
        // before its trailer, which a writer fills), and covers as many positions.
        let mut builder = PageBuilder::default();
        for record in page.records() {
            builder.push(record);
        }
        let rebuilt = builder.take();
        let again = LogPage::parse(&rebuilt).expect("a rebuilt page parses");
        assert!(again.records().eq(page.records()));
        if page.trailer().is_some() {
            assert_eq!(again.bound_bytes(), page.bound_bytes());
        }
        assert_eq!(LogPage::positions(data), page.len());
    }
    assert!(LogPage::positions(data) >= 1);
    let _ = Sealer::peek_change_id(data);
    let sealer = LibraryKey::generate().sealer(LibraryId(uuid::Uuid::nil()));
    assert!(
        sealer.open(data).is_err(),
        "a random payload opened under a fresh key"
    );
});
