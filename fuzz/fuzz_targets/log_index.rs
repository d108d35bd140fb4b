//! Fuzz target: a saved log index (header and chunks) as a journal file holds it. The input is
//! the header, then the chunks, each after a 4-byte big-endian length.
#![no_main]

use keel_journal::LogIndex;
use libfuzzer_sys::fuzz_target;

/// Splits `data` into length-prefixed parts (the first is the header).
fn parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<4>() {
        let len = (u32::from_be_bytes(*len) as usize).min(rest.len());
        let (part, tail) = rest.split_at(len);
        out.push(part);
        data = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let parts = parts(data);
    let Some((header, chunks)) = parts.split_first() else {
        return;
    };
    // Room as the journal makes it: the entries the chunks could hold at most.
    let room = chunks.iter().map(|c| c.len()).sum::<usize>();
    let decoded = LogIndex::decode_saved(header, room, |n| -> Result<_, ()> {
        Ok(usize::try_from(n)
            .ok()
            .and_then(|n| chunks.get(n - 1))
            .map(|c| c.to_vec()))
    });
    if let Ok(Some(index)) = decoded {
        // What decodes is bounded by the chunks given, whatever the header claims, and every
        // entry lies in a run.
        assert!(index.len() <= chunks.iter().map(|c| c.len()).sum::<usize>());
        assert_eq!(index.iter().count(), index.len());
    }
});
