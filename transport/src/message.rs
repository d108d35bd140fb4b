//! `DeviceMessage`: everything devices say to each other, versioned and checked on decode.
//!
//! Encoding: a version byte, then MessagePack (binary form). Decoding refuses unknown versions,
//! trailing bytes and anything over the limits below, so a hostile peer costs one closed
//! connection and nothing else.

use keel_replication::wire::{bounded, check_positions, check_records};
pub use keel_replication::wire::{
    DomainPosition, WireLogEntry, POSITIONS_MAX, RECORDS_PER_MESSAGE_MAX, RECORD_BYTES_MAX,
};
use keel_replication::ReplicationMessage;
use keel_schema::{DeviceId, Epoch, Hlc, LibraryId, Lsn};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use crate::error::TransportError;

/// The message version this build speaks.
pub const MESSAGE_VERSION: u8 = 5;
/// Largest piece of a projection snapshot in one [`DeviceMessage::SnapshotChunk`].
pub const SNAPSHOT_CHUNK_MAX: usize = 4 << 20;
/// Longest name or reason string.
pub const TEXT_LEN_MAX: usize = 256;
/// Most devices in one [`DeviceMessage::Peers`].
pub const PEERS_MAX: usize = 64;

/// Most keys in one [`DeviceMessage::LibraryKeys`] (the journal keeps at most as many).
pub const LIBRARY_KEYS_MAX: usize = 32;
/// Most revoked devices one [`DeviceMessage::LibraryKeys`] names.
pub const REVOKED_MAX: usize = 256;
/// Most key ranges one [`DeviceMessage::RangeDigestsRequest`] names.
pub const RANGES_PER_REQUEST_MAX: usize = 256;
/// Most parts (tables) one [`DeviceMessage::BackfillPlan`] names.
pub const BACKFILL_PARTS_MAX: usize = 256;

/// The record uuids of one model from `start` (inclusive; `None`: the first) to `end`
/// (exclusive; `None`: past the last).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRange {
    /// First uuid in the range.
    pub start: Option<Uuid>,
    /// First uuid after it.
    pub end: Option<Uuid>,
}

/// One range's rows as the sender holds them: how many, and their digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRangeDigest {
    /// Rows in the range.
    pub rows: u64,
    /// Their 32-byte BLAKE3 digest.
    pub digest: ByteBuf,
}

/// One table of a snapshot as [`DeviceMessage::BackfillPlan`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePart {
    /// Its table.
    pub table: String,
    /// A model's code; `None` for an internal table.
    pub model: Option<u8>,
    /// Rows it holds.
    pub rows: u64,
}

/// A key of the library, as [`DeviceMessage::LibraryKeys`] carries it. Zeroized when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireKey {
    /// Its key id.
    pub key_id: u32,
    /// Its generation.
    pub generation: u32,
    /// The 32-byte key.
    pub key: ByteBuf,
}

impl Drop for WireKey {
    fn drop(&mut self) {
        self.key.iter_mut().for_each(|b| *b = 0);
    }
}

impl std::fmt::Debug for WireKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WireKey(id {}, generation {})",
            self.key_id, self.generation
        )
    }
}

/// Where a device of the library was last reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    /// The device.
    pub device: DeviceId,
    /// Its address, as the sender saw it (a node's one UDP socket both listens and dials, so
    /// on a network without address translation this is where it listens).
    pub addr: std::net::SocketAddr,
}

/// Pairing (SPAKE2 over a short code, then key transfer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairingMessage {
    /// The joining device's SPAKE2 message and the name it wants to show.
    Start {
        /// SPAKE2 message.
        spake: ByteBuf,
        /// The joining device's name.
        name: String,
    },
    /// The inviting device's SPAKE2 message.
    Reply {
        /// SPAKE2 message.
        spake: ByteBuf,
    },
    /// Key confirmation: a MAC over the transcript under the PAKE session key.
    Confirm {
        /// The MAC.
        mac: ByteBuf,
    },
    /// Accepted: the library key sealed under the session key, and the library's identity.
    Accepted {
        /// The library id.
        library: LibraryId,
        /// The library name.
        name: String,
        /// The sealed library key.
        sealed_key: ByteBuf,
    },
    /// Refused (wrong code, rate limit, device limit, user said no).
    Rejected {
        /// Why, for the joining user.
        reason: String,
    },
}

/// Every message between devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceMessage {
    /// First message on a connection: who, which library, how far.
    Hello {
        /// The sender.
        device: DeviceId,
        /// The library.
        library: LibraryId,
        /// The highest epoch the sender accepted.
        epoch: Epoch,
        /// Its last log position.
        log_end: Lsn,
        /// Its applied positions per domain.
        #[serde(deserialize_with = "bounded::positions")]
        positions: Vec<DomainPosition>,
    },
    /// Asks for log entries from `from` (inclusive).
    SyncPullRequest {
        /// First position wanted.
        from: Lsn,
        /// Most entries wanted.
        limit: u32,
    },
    /// Asks for the rows of one model after a uuid, within `range`, in uuid order. Answered
    /// on an anti-entropy connection (see [`DeviceMessage::RangeDigestsRequest`]).
    SyncPullModelBatchRequest {
        /// Model code.
        model: u8,
        /// Continue after this record.
        after: Option<Uuid>,
        /// Most records wanted.
        limit: u32,
        /// Only rows in this range (all of the model's without it).
        #[serde(default)]
        range: Option<WireRange>,
        /// A backfill's internal table (see [`DeviceMessage::BackfillPlan`]) instead of the
        /// model: its rows from the `skip`th on, in the snapshot's fixed order.
        #[serde(default)]
        table: Option<String>,
        /// Rows of `table` already taken.
        #[serde(default)]
        skip: u64,
        /// A backfill's request for the rest of the part: the answering side sends each
        /// batch after the one asked in turn, without waiting to be asked, until the part's
        /// last (the asking side reads them as it writes them; QUIC's flow control holds the
        /// sender back meanwhile).
        #[serde(default)]
        stream: bool,
    },
    /// Rows of one model, each a row image (every column of its projection row, clocks
    /// included; the layout is `keel_projections::Query::range_rows`'s).
    SyncPullModelBatchResponse {
        /// Model code.
        model: u8,
        /// The row images.
        #[serde(deserialize_with = "bounded::records")]
        records: Vec<ByteBuf>,
        /// Whether this was the last batch of the range.
        done: bool,
        /// The row images packed instead (a backfill's answers): one zstd frame of each image
        /// after its length (u32 BE), `records` then empty.
        #[serde(default)]
        packed: ByteBuf,
        /// The bytes `packed` unpacks to, exactly (at most [`crate::FRAME_LEN_MAX`]).
        #[serde(default)]
        raw_len: u32,
    },
    /// Anti-entropy: asks for the digests of the answering device's rows of `model` in each of
    /// `ranges`. Sent by a pinned device instead of Hello on a connection of its own, and again
    /// on it; answered by [`DeviceMessage::RangeDigests`] (and row requests by
    /// [`DeviceMessage::SyncPullModelBatchResponse`]) until the asking device closes it.
    RangeDigestsRequest {
        /// The library.
        library: LibraryId,
        /// Model code.
        model: u8,
        /// At most [`RANGES_PER_REQUEST_MAX`], in order, not overlapping.
        #[serde(deserialize_with = "bounded::seq::<_, _, RANGES_PER_REQUEST_MAX>")]
        ranges: Vec<WireRange>,
    },
    /// The digests asked for, one per range, and the log position the answering device's
    /// projection has applied.
    RangeDigests {
        /// Its applied log position.
        applied: Lsn,
        /// One per range asked for.
        #[serde(deserialize_with = "bounded::seq::<_, _, RANGES_PER_REQUEST_MAX>")]
        digests: Vec<WireRangeDigest>,
    },
    /// Election and replication (see `keel-replication`).
    Replication(ReplicationMessage),
    /// Pairing.
    Pairing(PairingMessage),
    /// The devices of the library the sender has reached, and where: so that devices paired
    /// through one another find each other. Only pinned devices are ever dialed.
    Peers {
        /// At most [`PEERS_MAX`].
        #[serde(deserialize_with = "bounded::seq::<_, _, PEERS_MAX>")]
        peers: Vec<PeerAddr>,
    },
    /// Every key of the library, sent to a pinned device when a session starts and when the
    /// key rotates (after a revocation), so changes sealed under a new key open everywhere but
    /// on the revoked device. Only ever sent inside a pinned TLS session.
    LibraryKeys {
        /// At most [`LIBRARY_KEYS_MAX`].
        #[serde(deserialize_with = "bounded::seq::<_, _, LIBRARY_KEYS_MAX>")]
        keys: Vec<WireKey>,
        /// The devices the sender has revoked (at most [`REVOKED_MAX`]): the
        /// receiver revokes them too before it takes the keys or passes them on, so a key made
        /// after a revocation never overtakes it on the way to the revoked device.
        #[serde(default, deserialize_with = "bounded::seq::<_, _, REVOKED_MAX>")]
        revoked: Vec<DeviceId>,
    },
    /// Sent instead of Hello by a device that has just joined: asks for the log and a snapshot
    /// of the projections, so it need not replay the whole log. The answer is
    /// [`DeviceMessage::SnapshotBegin`], log segments and chunks in any interleaving, then
    /// [`DeviceMessage::SnapshotEnd`]; then the connection closes.
    SnapshotRequest {
        /// The library.
        library: LibraryId,
        /// The fingerprint of the asker's models (`Registry::fingerprint`, 64 hex digits;
        /// empty: unknown). Only a sender whose projections hold the same models may start the
        /// asker's log at a base of its own: a file of other models is replayed from the log,
        /// which then has to be whole.
        #[serde(default)]
        models: String,
    },
    /// What a snapshot holds: the log up to `log_end` (as [`ReplicationMessage::LogSegment`]s
    /// from position 1) and a projection file of `file_bytes` bytes with everything up to
    /// `applied` applied.
    SnapshotBegin {
        /// The sender's epoch.
        epoch: Epoch,
        /// The last log position the projection file has applied.
        applied: Lsn,
        /// The last log position sent (at least `applied`).
        log_end: Lsn,
        /// Size of the projection file.
        file_bytes: u64,
        /// The sender's HLC high-water mark (at least every clock in the log sent).
        hlc: Hlc,
        /// The sender's compaction position: the log sent starts after it (0: from 1).
        #[serde(default)]
        base: Lsn,
        /// The epoch of the entry at `base`.
        #[serde(default)]
        base_epoch: Epoch,
        /// The epoch of the log's first entry (its founder's), which a compacted log no
        /// longer holds.
        #[serde(default)]
        head: Epoch,
        /// Whether `base` is the sender's compaction position, whose snapshot it keeps (a
        /// backfill can pull it). Otherwise a base above 0 is this join's own: the sender's log
        /// goes back further, and the file sent is the only snapshot at it.
        #[serde(default)]
        base_kept: bool,
    },
    /// A piece of the projection file.
    SnapshotChunk {
        /// Where the piece goes in the file.
        offset: u64,
        /// The bytes: as they are in the file, or (`raw_len` > 0) one zstd frame of them.
        data: ByteBuf,
        /// 0: `data` is the piece itself. Otherwise the piece's length, which `data`, a zstd
        /// frame, must decompress to exactly (at most [`SNAPSHOT_CHUNK_MAX`]).
        #[serde(default)]
        raw_len: u32,
    },
    /// Backfill: a device behind its leader's compaction point asks for the leader's snapshot,
    /// sent instead of Hello on a connection of its own by a pinned device. The answer is a
    /// [`DeviceMessage::BackfillPlan`]; then [`DeviceMessage::SyncPullModelBatchRequest`]s are
    /// answered from that snapshot until the asking device closes the connection.
    BackfillRequest {
        /// The library.
        library: LibraryId,
    },
    /// The snapshot a backfill reads: the log base it stands for, and its parts (every model
    /// in dependency order, then the internal tables) with their row counts.
    BackfillPlan {
        /// The log position the snapshot stands for: the log after it follows.
        base: Lsn,
        /// The epoch of the entry at `base`.
        base_epoch: Epoch,
        /// The epoch of the log's first entry (its founder's).
        head: Epoch,
        /// The sender's HLC high-water mark.
        hlc: Hlc,
        /// Its parts, in the order they are taken.
        #[serde(deserialize_with = "bounded::seq::<_, _, BACKFILL_PARTS_MAX>")]
        parts: Vec<WirePart>,
    },
    /// The snapshot is complete.
    SnapshotEnd {
        /// BLAKE3 of the whole projection file.
        file_hash: ByteBuf,
    },
}

/// Longest models fingerprint in a [`DeviceMessage::SnapshotRequest`] (a blake3 digest in hex).
const MODELS_FINGERPRINT_MAX: usize = 64;

fn over(what: String) -> TransportError {
    TransportError::OverLimit(what)
}

fn check_limit(limit: u32) -> Result<(), TransportError> {
    if limit as usize > RECORDS_PER_MESSAGE_MAX {
        return Err(over(format!("a request for {limit} records")));
    }
    Ok(())
}

fn check_text(what: &str, text: &str) -> Result<(), TransportError> {
    if text.len() > TEXT_LEN_MAX {
        return Err(over(format!("{what} of {} bytes", text.len())));
    }
    Ok(())
}

impl DeviceMessage {
    /// Encodes: version byte, then MessagePack.
    pub fn encode(&self) -> Result<Vec<u8>, TransportError> {
        self.check()?;
        let mut out = vec![MESSAGE_VERSION];
        let mut serializer = rmp_serde::Serializer::new(&mut out).with_binary();
        self.serialize(&mut serializer)
            .map_err(|e| TransportError::Malformed(e.to_string()))?;
        Ok(out)
    }

    /// Decodes and checks a message. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
        let (&version, body) = bytes
            .split_first()
            .ok_or(TransportError::Truncated { needed: 1 })?;
        if version != MESSAGE_VERSION {
            return Err(TransportError::Version(version));
        }
        let mut reader = body;
        let mut deserializer = rmp_serde::Deserializer::new(&mut reader).with_binary();
        let message = DeviceMessage::deserialize(&mut deserializer).map_err(|e| {
            let text = e.to_string();
            if text.contains(bounded::OVER_LIMIT) {
                TransportError::OverLimit(text)
            } else {
                TransportError::Malformed(text)
            }
        })?;
        if !reader.is_empty() {
            return Err(TransportError::Malformed(format!(
                "{} trailing bytes",
                reader.len()
            )));
        }
        message.check()?;
        Ok(message)
    }

    /// Checks the limits.
    pub fn check(&self) -> Result<(), TransportError> {
        match self {
            DeviceMessage::Hello { positions, .. } => check_positions(positions)?,
            DeviceMessage::SyncPullRequest { limit, .. } => check_limit(*limit)?,
            DeviceMessage::SyncPullModelBatchRequest { limit, table, .. } => {
                check_limit(*limit)?;
                if let Some(table) = table {
                    check_text("table", table)?;
                }
            }
            DeviceMessage::Replication(message) => message.check()?,
            DeviceMessage::Peers { peers } => {
                if peers.len() > PEERS_MAX {
                    return Err(over(format!("{} peers", peers.len())));
                }
            }
            DeviceMessage::LibraryKeys { keys, revoked } => {
                if keys.len() > LIBRARY_KEYS_MAX || keys.iter().any(|k| k.key.len() != 32) {
                    return Err(over(format!("{} library keys", keys.len())));
                }
                if revoked.len() > REVOKED_MAX {
                    return Err(over(format!("{} revoked devices", revoked.len())));
                }
            }
            DeviceMessage::SyncPullModelBatchResponse {
                records,
                packed,
                raw_len,
                ..
            } => {
                check_records("records", records.iter())?;
                if *raw_len as usize > crate::FRAME_LEN_MAX
                    || (*raw_len > 0 && !records.is_empty())
                    || (*raw_len == 0 && !packed.is_empty())
                {
                    return Err(over(format!("packed rows claiming {raw_len} bytes")));
                }
            }
            DeviceMessage::BackfillPlan { parts, .. } => {
                if parts.len() > BACKFILL_PARTS_MAX {
                    return Err(over(format!("{} backfill parts", parts.len())));
                }
                for part in parts {
                    check_text("table", &part.table)?;
                }
            }
            DeviceMessage::RangeDigestsRequest { ranges, .. } => {
                if ranges.len() > RANGES_PER_REQUEST_MAX {
                    return Err(over(format!("{} key ranges", ranges.len())));
                }
            }
            DeviceMessage::RangeDigests { digests, .. } => {
                if digests.len() > RANGES_PER_REQUEST_MAX
                    || digests.iter().any(|d| d.digest.len() != 32)
                {
                    return Err(over(format!("{} range digests", digests.len())));
                }
            }
            DeviceMessage::Pairing(p) => p.check()?,
            DeviceMessage::SnapshotChunk { data, raw_len, .. } => {
                if data.len() > SNAPSHOT_CHUNK_MAX || *raw_len as usize > SNAPSHOT_CHUNK_MAX {
                    return Err(over(format!(
                        "a snapshot chunk of {} bytes ({raw_len} uncompressed)",
                        data.len()
                    )));
                }
            }
            DeviceMessage::SnapshotEnd { file_hash } => {
                if file_hash.len() != 32 {
                    return Err(over(format!("a file hash of {} bytes", file_hash.len())));
                }
            }
            DeviceMessage::SnapshotRequest { models, .. } => {
                if models.len() > MODELS_FINGERPRINT_MAX {
                    return Err(over(format!(
                        "a models fingerprint of {} bytes",
                        models.len()
                    )));
                }
            }
            DeviceMessage::SnapshotBegin { .. } | DeviceMessage::BackfillRequest { .. } => {}
        }
        Ok(())
    }
}

impl PairingMessage {
    /// Checks the limits of a pairing message.
    pub fn check(&self) -> Result<(), TransportError> {
        const SPAKE_LEN_MAX: usize = 256;
        match self {
            PairingMessage::Start { spake, name } => {
                check_text("name", name)?;
                if spake.len() > SPAKE_LEN_MAX {
                    return Err(over(format!("SPAKE2 message of {} bytes", spake.len())));
                }
            }
            PairingMessage::Reply { spake } | PairingMessage::Confirm { mac: spake } => {
                if spake.len() > SPAKE_LEN_MAX {
                    return Err(over(format!("pairing blob of {} bytes", spake.len())));
                }
            }
            PairingMessage::Accepted {
                name, sealed_key, ..
            } => {
                check_text("name", name)?;
                if sealed_key.len() > SPAKE_LEN_MAX {
                    return Err(over(format!("sealed key of {} bytes", sealed_key.len())));
                }
            }
            PairingMessage::Rejected { reason } => check_text("reason", reason)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schema::SyncDomain;

    fn samples() -> Vec<DeviceMessage> {
        let device = DeviceId([1; 32]);
        let epoch = Epoch { counter: 3, device };
        vec![
            DeviceMessage::Hello {
                device,
                library: LibraryId(Uuid::nil()),
                epoch,
                log_end: Lsn(9),
                positions: vec![DomainPosition {
                    domain: SyncDomain::Index,
                    lsn: Lsn(9),
                }],
            },
            DeviceMessage::SyncPullRequest {
                from: Lsn(10),
                limit: 100,
            },
            DeviceMessage::Replication(ReplicationMessage::LogSegment {
                epoch,
                first: Lsn(10),
                prev_epoch: epoch,
                leader_end: Lsn(12),
                entries: vec![WireLogEntry {
                    epoch,
                    sealed: ByteBuf::from(vec![5u8; 90]),
                }],
                base: Lsn(4),
            }),
            DeviceMessage::Replication(ReplicationMessage::Compacted {
                epoch,
                base: Lsn(4),
                base_epoch: epoch,
            }),
            DeviceMessage::Replication(ReplicationMessage::Push {
                changes: vec![ByteBuf::from(vec![1u8; 10])],
            }),
            DeviceMessage::Replication(ReplicationMessage::Ack {
                epoch,
                ok: true,
                stored: Lsn(4),
                positions: vec![DomainPosition {
                    domain: SyncDomain::Content,
                    lsn: Lsn(3),
                }],
                floor: Some(keel_replication::wire::ClockFloor {
                    ms: 1_700_000_000_000,
                    counter: 7,
                }),
            }),
            DeviceMessage::Replication(ReplicationMessage::RequestVote {
                epoch,
                last_epoch: epoch,
                last_lsn: Lsn(4),
            }),
            DeviceMessage::Replication(ReplicationMessage::PreVote {
                epoch,
                last_epoch: epoch,
                last_lsn: Lsn(4),
            }),
            DeviceMessage::Replication(ReplicationMessage::PreVoteReply {
                epoch,
                granted: true,
                highest: epoch,
            }),
            DeviceMessage::Pairing(PairingMessage::Rejected {
                reason: "wrong code".into(),
            }),
            DeviceMessage::Peers {
                peers: vec![PeerAddr {
                    device,
                    addr: "[::1]:4000".parse().expect("addr"),
                }],
            },
            DeviceMessage::SnapshotRequest {
                library: LibraryId(Uuid::nil()),
                models: "ab".repeat(32),
            },
            DeviceMessage::SnapshotBegin {
                epoch,
                applied: Lsn(7),
                log_end: Lsn(9),
                file_bytes: 4096,
                hlc: Hlc {
                    physical_ms: 5,
                    counter: 1,
                    device,
                },
                base: Lsn(3),
                base_epoch: epoch,
                head: epoch,
                base_kept: true,
            },
            DeviceMessage::SnapshotChunk {
                offset: 4096,
                data: ByteBuf::from(vec![3u8; 100]),
                raw_len: 0,
            },
            DeviceMessage::SnapshotChunk {
                offset: 0,
                data: ByteBuf::from(vec![3u8; 100]),
                raw_len: 4096,
            },
            DeviceMessage::SnapshotEnd {
                file_hash: ByteBuf::from(vec![8u8; 32]),
            },
            DeviceMessage::RangeDigestsRequest {
                library: LibraryId(Uuid::nil()),
                model: 3,
                ranges: vec![
                    WireRange {
                        start: None,
                        end: Some(Uuid::from_u128(9)),
                    },
                    WireRange {
                        start: Some(Uuid::from_u128(9)),
                        end: None,
                    },
                ],
            },
            DeviceMessage::RangeDigests {
                applied: Lsn(12),
                digests: vec![WireRangeDigest {
                    rows: 8,
                    digest: ByteBuf::from(vec![1u8; 32]),
                }],
            },
            DeviceMessage::SyncPullModelBatchRequest {
                model: 3,
                after: Some(Uuid::from_u128(10)),
                limit: 100,
                range: Some(WireRange::default()),
                table: None,
                skip: 0,
                stream: false,
            },
            DeviceMessage::SyncPullModelBatchRequest {
                model: 0,
                after: None,
                limit: 100,
                range: None,
                table: Some("_field_writes".into()),
                skip: 4096,
                stream: false,
            },
            DeviceMessage::BackfillRequest {
                library: LibraryId(Uuid::from_u128(5)),
            },
            DeviceMessage::BackfillPlan {
                base: Lsn(900),
                base_epoch: Epoch::default(),
                head: Epoch::default(),
                hlc: Hlc::default(),
                parts: vec![WirePart {
                    table: "entry".into(),
                    model: Some(3),
                    rows: 12,
                }],
            },
            DeviceMessage::SyncPullModelBatchResponse {
                model: 3,
                records: vec![ByteBuf::from(vec![0u8, 1, 0])],
                done: true,
                packed: ByteBuf::new(),
                raw_len: 0,
            },
            DeviceMessage::SyncPullModelBatchResponse {
                model: 3,
                records: Vec::new(),
                done: false,
                packed: ByteBuf::from(vec![1u8; 20]),
                raw_len: 300,
            },
        ]
    }

    #[test]
    fn messages_round_trip() {
        for m in samples() {
            let bytes = m.encode().expect("encodes");
            assert_eq!(DeviceMessage::decode(&bytes).expect("decodes"), m);
            for cut in 0..bytes.len() {
                assert!(DeviceMessage::decode(&bytes[..cut]).is_err());
            }
        }
    }

    #[test]
    fn a_segment_s_epochs_cross_as_runs_and_runs_that_do_not_fit_are_refused() {
        use keel_replication::wire::epoch_runs;
        let (a, b) = (
            Epoch {
                counter: 2,
                device: DeviceId([1; 32]),
            },
            Epoch {
                counter: 3,
                device: DeviceId([2; 32]),
            },
        );
        let entries: Vec<WireLogEntry> = [a, a, a, b, b]
            .into_iter()
            .map(|epoch| WireLogEntry {
                epoch,
                sealed: ByteBuf::from(vec![9u8; 70]),
            })
            .collect();
        let segment = |entries: Vec<WireLogEntry>| {
            DeviceMessage::Replication(ReplicationMessage::LogSegment {
                epoch: b,
                first: Lsn(1),
                prev_epoch: Epoch::default(),
                leader_end: Lsn(5),
                entries,
                base: Lsn(0),
            })
        };
        let bytes = segment(entries.clone()).encode().expect("encodes");
        assert_eq!(
            DeviceMessage::decode(&bytes).expect("decodes"),
            segment(entries)
        );
        // Two epochs for five entries: far less than one per entry.
        let per_entry = segment(vec![WireLogEntry {
            epoch: a,
            sealed: ByteBuf::from(vec![9u8; 70]),
        }])
        .encode()
        .expect("encodes")
        .len();
        assert!(bytes.len() < 5 * 75 + per_entry, "{} bytes", bytes.len());
        let one = ByteBuf::from(vec![1u8]);
        for (runs, sealed) in [
            (vec![(1u32, a)], vec![one.clone()]),
            (vec![(0, a), (5, b)], vec![one.clone(), one.clone()]),
            (vec![(0, a), (0, b)], vec![one.clone(), one.clone()]),
            (vec![], vec![one.clone()]),
        ] {
            let bytes = rmp_serde::to_vec(&(runs.clone(), sealed)).expect("encodes");
            let decoded = epoch_runs::deserialize(&mut rmp_serde::Deserializer::new(&bytes[..]));
            assert!(decoded.is_err(), "{runs:?} accepted");
        }
    }

    #[test]
    fn limits_are_enforced_on_decode() {
        let too_many = DeviceMessage::Replication(ReplicationMessage::Push {
            changes: vec![ByteBuf::new(); RECORDS_PER_MESSAGE_MAX + 1],
        });
        assert!(matches!(
            too_many.encode(),
            Err(TransportError::OverLimit(_))
        ));
        let long_name = DeviceMessage::Pairing(PairingMessage::Start {
            spake: ByteBuf::new(),
            name: "x".repeat(TEXT_LEN_MAX + 1),
        });
        assert!(long_name.encode().is_err());
        let part = WirePart {
            table: "entry".into(),
            model: Some(3),
            rows: 1,
        };
        let plan = |parts: Vec<WirePart>| DeviceMessage::BackfillPlan {
            base: Lsn(1),
            base_epoch: Epoch::default(),
            head: Epoch::default(),
            hlc: Hlc::default(),
            parts,
        };
        assert!(plan(vec![part.clone(); BACKFILL_PARTS_MAX + 1])
            .encode()
            .is_err());
        let long_table = WirePart {
            table: "x".repeat(TEXT_LEN_MAX + 1),
            ..part
        };
        assert!(plan(vec![long_table]).encode().is_err());
        let long_table_asked = DeviceMessage::SyncPullModelBatchRequest {
            model: 0,
            after: None,
            limit: 1,
            range: None,
            table: Some("x".repeat(TEXT_LEN_MAX + 1)),
            skip: 0,
            stream: false,
        };
        assert!(long_table_asked.encode().is_err());
        let rows = |records: Vec<ByteBuf>, packed: usize, raw_len: u32| {
            DeviceMessage::SyncPullModelBatchResponse {
                model: 1,
                records,
                done: true,
                packed: ByteBuf::from(vec![0u8; packed]),
                raw_len,
            }
        };
        for (what, message) in [
            (
                "a claim past the frame limit",
                rows(Vec::new(), 8, crate::FRAME_LEN_MAX as u32 + 1),
            ),
            (
                "packed and plain rows at once",
                rows(vec![ByteBuf::new()], 8, 10),
            ),
            ("packed bytes without their length", rows(Vec::new(), 8, 0)),
        ] {
            assert!(message.encode().is_err(), "{what} accepted");
        }
        let big_chunk = DeviceMessage::SnapshotChunk {
            offset: 0,
            data: ByteBuf::from(vec![0u8; SNAPSHOT_CHUNK_MAX + 1]),
            raw_len: 0,
        };
        assert!(big_chunk.encode().is_err());
        // A small frame that claims to unpack past the limit is refused before anything is
        // unpacked.
        let bomb = DeviceMessage::SnapshotChunk {
            offset: 0,
            data: ByteBuf::from(vec![0u8; 64]),
            raw_len: SNAPSHOT_CHUNK_MAX as u32 + 1,
        };
        assert!(bomb.encode().is_err());
        let crowd = DeviceMessage::Peers {
            peers: vec![
                PeerAddr {
                    device: DeviceId([1; 32]),
                    addr: "127.0.0.1:1".parse().expect("addr"),
                };
                PEERS_MAX + 1
            ],
        };
        assert!(crowd.encode().is_err());
        let revocations = DeviceMessage::LibraryKeys {
            keys: Vec::new(),
            revoked: vec![DeviceId([1; 32]); REVOKED_MAX + 1],
        };
        assert!(revocations.encode().is_err());
        let ranges = DeviceMessage::RangeDigestsRequest {
            library: LibraryId(Uuid::nil()),
            model: 1,
            ranges: vec![WireRange::default(); RANGES_PER_REQUEST_MAX + 1],
        };
        assert!(ranges.encode().is_err());
        let short_digest = DeviceMessage::RangeDigests {
            applied: Lsn(1),
            digests: vec![WireRangeDigest {
                rows: 1,
                digest: ByteBuf::from(vec![0u8; 31]),
            }],
        };
        assert!(short_digest.encode().is_err());
        let short_hash = DeviceMessage::SnapshotEnd {
            file_hash: ByteBuf::from(vec![0u8; 31]),
        };
        assert!(short_hash.encode().is_err());
        assert_eq!(
            DeviceMessage::decode(&[9, 1, 2]),
            Err(TransportError::Version(9))
        );
    }
}
