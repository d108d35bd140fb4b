//! Fuzz target: hostile pairing messages. Bytes are decoded as `DeviceMessage`s and whatever
//! pairing message comes out is fed to an inviter (as a joiner's start and confirmation) and to a
//! joiner (as the inviter's reply and verdict). Nothing may panic, and a party that does not know
//! the code never gets the library key or a pinned device.
#![no_main]

use keel_schema::{DeviceId, LibraryId};
use keel_transport::{Binding, DeviceMessage, Inviter, Joiner, PairingCode, PairingMessage};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fn binding() -> Binding {
    Binding {
        exporter: [7; 32],
        inviter: DeviceId([1; 32]),
        joiner: DeviceId([2; 32]),
    }
}

fn pairing_messages(data: &[u8]) -> Vec<PairingMessage> {
    // Split the input on 0xFF into up to four candidate messages.
    data.split(|b| *b == 0xFF)
        .take(4)
        .filter_map(|chunk| match DeviceMessage::decode(chunk) {
            Ok(DeviceMessage::Pairing(m)) => Some(m),
            _ => None,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let messages = pairing_messages(data);
    let library = LibraryId(Uuid::from_u128(9));
    let mut inviter = Inviter::new(library, "lib", vec![3; 32], 16, 1_000);
    let address = std::net::IpAddr::from([127, 0, 0, 1]);
    for (i, start) in messages.iter().enumerate() {
        if let Ok((mut run, _reply)) = inviter.on_start(start, binding(), address, 1_000) {
            for confirm in &messages[i..] {
                let (verdict, outcome) =
                    inviter.on_confirm(&mut run, confirm, 1, |_, _| true, 1_001);
                // Without the code there is no valid MAC: the key must never be handed over.
                assert!(outcome.is_err());
                assert!(!matches!(verdict, PairingMessage::Accepted { .. }));
            }
        }
    }
    let code = PairingCode::parse("1234-5678").expect("a valid code");
    let (mut joiner, _start) = Joiner::start(&code, binding(), "fuzz");
    for message in &messages {
        if joiner.on_reply(message).is_ok() {
            for verdict in &messages {
                // A forged verdict cannot carry a key sealed under a session key it lacks.
                let _ = joiner.on_verdict(verdict);
            }
        }
    }
});
