//! Fuzz target: the snapshot receiver of a joining device (`keel_node::fuzz_receive`), fed what
//! an inviter may send: headers, file chunks (as they are or zstd-packed), log segments and the
//! end, in any order and with any fields, each message checked against the wire limits first
//! as the transport does. Most messages are built from the input so that the whole path (a
//! file received and its hash matched) is reachable; some are decoded from the raw bytes.
//!
//! Nothing may panic, allocate beyond the limits or hang; a snapshot that ends holds exactly
//! the chunks sent, and every log position up to its end was handed to the journal.
#![no_main]

#[path = "../../tests/src/shm.rs"]
mod scratch;

use keel_replication::wire::WireLogEntry;
use keel_replication::ReplicationMessage;
use keel_schema::{DeviceId, Epoch, Hlc, Lsn};
use keel_transport::DeviceMessage;
use libfuzzer_sys::fuzz_target;
use serde_bytes::ByteBuf;

/// Reads the fuzz input as numbers; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn small(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => u64::from_le_bytes(std::array::from_fn(|_| self.u8())),
            _ => u64::from(self.u8() % 64),
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = usize::from(self.u8() % 64).min(self.0.len());
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        taken.to_vec()
    }

    fn epoch(&mut self) -> Epoch {
        Epoch {
            counter: self.small(),
            device: DeviceId([self.u8() % 3; 32]),
        }
    }
}

/// What the sender has sent of the file so far.
#[derive(Default)]
struct Sent {
    file: Vec<u8>,
    next_lsn: u64,
}

fn message(input: &mut Input<'_>, sent: &mut Sent) -> Option<DeviceMessage> {
    Some(match input.u8() % 6 {
        0 => {
            let log_end = input.small();
            let applied = input.small().min(log_end);
            DeviceMessage::SnapshotBegin {
                epoch: input.epoch(),
                applied: Lsn(applied),
                log_end: Lsn(log_end),
                file_bytes: input.small(),
                hlc: Hlc {
                    physical_ms: input.small(),
                    counter: 0,
                    device: DeviceId([1; 32]),
                },
                base: Lsn(if input.u8() % 4 == 0 {
                    input.small().min(applied)
                } else {
                    0
                }),
                base_epoch: input.epoch(),
                head: input.epoch(),
                base_kept: input.u8() % 2 == 0,
            }
        }
        1 | 2 => {
            let data = input.bytes();
            let offset = if input.u8() % 8 == 0 {
                input.small()
            } else {
                sent.file.len() as u64
            };
            let packed = input.u8() % 2 == 0;
            sent.file.extend_from_slice(&data);
            if packed {
                let frame = zstd::bulk::compress(&data, 1).ok()?;
                DeviceMessage::SnapshotChunk {
                    offset,
                    raw_len: data.len() as u32,
                    data: ByteBuf::from(frame),
                }
            } else {
                DeviceMessage::SnapshotChunk {
                    offset,
                    data: ByteBuf::from(data),
                    raw_len: 0,
                }
            }
        }
        3 => {
            let count = usize::from(input.u8() % 8);
            let first = if input.u8() % 8 == 0 {
                input.small()
            } else {
                sent.next_lsn.max(1)
            };
            sent.next_lsn = first.saturating_add(count as u64);
            let entries = (0..count)
                .map(|_| WireLogEntry {
                    epoch: input.epoch(),
                    sealed: ByteBuf::from(input.bytes()),
                })
                .collect();
            DeviceMessage::Replication(ReplicationMessage::LogSegment {
                epoch: input.epoch(),
                first: Lsn(first),
                prev_epoch: input.epoch(),
                leader_end: Lsn(input.small()),
                entries,
                base: Lsn(0),
            })
        }
        4 => {
            let hash = if input.u8() % 4 == 0 {
                input.bytes()
            } else {
                blake3::hash(&sent.file).as_bytes().to_vec()
            };
            DeviceMessage::SnapshotEnd {
                file_hash: ByteBuf::from(hash),
            }
        }
        _ => DeviceMessage::decode(&input.bytes()).ok()?,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut sent = Sent::default();
    let mut messages = Vec::new();
    while !input.0.is_empty() && messages.len() < 64 {
        if let Some(m) = message(&mut input, &mut sent) {
            // The transport checks every message against the wire limits before handing it on.
            if m.clone().encode().is_ok() {
                messages.push(m);
            }
        }
    }
    let dir = scratch::dir("keel-fuzz");
    let (entries, outcome) = keel_node::fuzz_receive(dir.path(), messages);
    if let Ok(Some((log_end, len))) = outcome {
        let file = std::fs::read(dir.path().join("projections.sqlite.incoming"))
            .expect("the received file");
        assert_eq!(file.len() as u64, len, "the file's length");
        assert!(entries <= log_end, "more entries than the log's end");
    }
});
