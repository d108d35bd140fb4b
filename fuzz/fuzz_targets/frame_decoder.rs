//! Fuzz target: a frame as `Connection::recv` reads it off a stream — the header's length checked
//! by `frame_len` before the body is allocated, then the body decoded as a `DeviceMessage` —
//! never panics, never accepts a body over the limit, and a message that decodes encodes back to a
//! frame that decodes to the same message.
#![no_main]

use keel_transport::{
    decode_frame, encode_frame, frame_len, DeviceMessage, FRAME_HEADER_LEN, FRAME_LEN_MAX,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..FRAME_HEADER_LEN) else {
        assert!(decode_frame(data).is_err());
        return;
    };
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    prefix.copy_from_slice(header);
    let Ok(len) = frame_len(prefix) else {
        assert!(decode_frame(data).is_err());
        return;
    };
    assert!(len <= FRAME_LEN_MAX);
    let body = &data[FRAME_HEADER_LEN..];
    match decode_frame(data) {
        Ok(decoded) => assert_eq!(decoded, body),
        Err(_) => assert_ne!(body.len(), len),
    }
    if body.len() != len {
        return;
    }
    if let Ok(message) = DeviceMessage::decode(body) {
        let again = message.encode().expect("a decoded message encodes");
        let frame = encode_frame(&again).expect("within the limit");
        let reread = decode_frame(&frame).expect("its own frame");
        assert_eq!(DeviceMessage::decode(reread).ok(), Some(message));
    }
});
