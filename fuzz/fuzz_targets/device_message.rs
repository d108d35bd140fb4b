//! Fuzz target: `DeviceMessage` (including the pairing messages) decodes without panicking, and
//! whatever decodes re-encodes to a message that decodes equal.
#![no_main]

use keel_transport::DeviceMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = DeviceMessage::decode(data) {
        let bytes = message
            .encode()
            .expect("a decoded message is within limits");
        assert_eq!(
            DeviceMessage::decode(&bytes).expect("re-encoded decodes"),
            message
        );
    }
});
