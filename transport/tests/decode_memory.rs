//! Issue 24: decoding a hostile message must not allocate far more than the message's own size.
//! A 16 MiB `Push` of empty byte strings used to become a vector of millions of empty buffers
//! (24 bytes each) before the record limit refused it. This binary measures its own peak
//! resident memory around the decode (Linux).

use keel_transport::{DeviceMessage, TransportError, MESSAGE_VERSION, RECORDS_PER_MESSAGE_MAX};

/// This process's peak resident memory, in bytes (Linux).
fn peak_rss() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `DeviceMessage::Replication(ReplicationMessage::Push { changes })` with `n` empty byte
/// strings, written by hand as MessagePack (serde's enum form: a map of variant to content).
fn amplified_push(n: u32) -> Vec<u8> {
    let mut out = vec![MESSAGE_VERSION];
    // {"Replication": {"Push": {"changes"-as-array: [...]}}} in rmp-serde's default form:
    // an enum is a one-entry map, a struct an array of its fields.
    out.extend_from_slice(&[0x81, 0xab]);
    out.extend_from_slice(b"Replication");
    out.extend_from_slice(&[0x81, 0xa4]);
    out.extend_from_slice(b"Push");
    out.push(0x91); // the struct: an array of one field
    out.push(0xdd); // array 32
    out.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        out.extend_from_slice(&[0xc4, 0x00]); // bin8, empty
    }
    out
}

#[cfg(target_os = "linux")]
#[test]
fn an_amplified_push_is_refused_without_allocating_for_its_records() {
    // Just over the record limit, and far over it (8M records fill a 16 MiB frame).
    for n in [RECORDS_PER_MESSAGE_MAX as u32 + 1, 8_000_000] {
        let bytes = amplified_push(n);
        // Resets the peak to what is resident now.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = peak_rss();
        let decoded = DeviceMessage::decode(&bytes);
        let extra = peak_rss().saturating_sub(before);
        assert!(
            matches!(decoded, Err(TransportError::OverLimit(_))),
            "{n} records: {:?}",
            decoded.as_ref().map(|_| "decoded")
        );
        assert!(
            extra < 48 << 20,
            "decoding {n} empty records allocated {} MB",
            extra >> 20
        );
    }
}
