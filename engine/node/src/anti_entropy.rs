//! Anti-entropy with one peer (decision 0054): the two devices compare their projections model
//! by model over key ranges, and the ranges that differ can be repaired from the peer's rows,
//! instead of a full `rebuild`.
//!
//! The asking device dials the peer and sends [`DeviceMessage::RangeDigestsRequest`] instead of
//! Hello. For each model it cuts its own rows into at most [`RANGES_MAX`] ranges of about equal
//! row counts, the peer digests its rows over the same bounds, and every range that differs and
//! holds more than [`LEAF_ROWS`] rows is cut again, at most [`DEPTH_MAX`] times. A repair pulls
//! the peer's rows of each differing range ([`DeviceMessage::SyncPullModelBatchRequest`]) and
//! replaces this device's rows of that range with them, and nothing else.
//!
//! The peer is trusted with its rows as an inviter is with the projection file it sends a
//! joining device: a repair takes them as they are. It runs only when both devices have
//! applied the same log position, so that a difference is damage, not a change in flight.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use keel_engine::{image_uuid, KeyRange, NodeLink, RangeDigest, RANGES_MAX};
use keel_schema::{DeviceId, LibraryId, ModelDef};
use keel_transport::{Connection, DeviceMessage, WireRange, WireRangeDigest};
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::error::{blocking, NodeError};
use crate::net::{answer_each, recv_in_time, send_in_time};

/// A range that differs and holds at most this many rows (on either device) is not cut again.
pub const LEAF_ROWS: u64 = 64;
/// Most times a differing range is cut again.
pub const DEPTH_MAX: usize = 4;
/// Rows per [`DeviceMessage::SyncPullModelBatchResponse`].
const ROWS_PER_BATCH: usize = 1024;
/// Most requests the answering device serves on one connection.
const REQUESTS_MAX: usize = 65_536;

/// A key range of one model where the two devices' rows differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeDiff {
    /// The model's name.
    pub model: String,
    /// First uuid of the range (`None`: from the model's first).
    pub start: Option<uuid::Uuid>,
    /// First uuid after it (`None`: to the model's last).
    pub end: Option<uuid::Uuid>,
    /// Rows this device holds in it.
    pub rows_here: u64,
    /// Rows the peer holds in it.
    pub rows_there: u64,
}

/// What a comparison with a peer found, and what its repair wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AntiEntropyReport {
    /// The peer's device id, in hex.
    pub peer: String,
    /// The log position this device's projection had applied.
    pub applied_here: u64,
    /// The log position the peer's projection had applied.
    pub applied_there: u64,
    /// Models compared.
    pub models: usize,
    /// Ranges whose digests were compared, at every depth.
    pub ranges_compared: u64,
    /// The smallest ranges found to differ.
    pub differing: Vec<RangeDiff>,
    /// Whether the differing ranges were repaired.
    pub repaired: bool,
    /// Rows written by the repair (the peer's rows of the differing ranges).
    pub rows_written: u64,
}

fn failed(what: impl std::fmt::Display) -> NodeError {
    NodeError::Failed(format!("anti-entropy: {what}"))
}

fn to_wire(range: KeyRange) -> WireRange {
    WireRange {
        start: range.start,
        end: range.end,
    }
}

fn from_wire(range: WireRange) -> KeyRange {
    KeyRange {
        start: range.start,
        end: range.end,
    }
}

/// The answering side: serves the digest and row requests of a pinned device on `conn`, the
/// first being `first`, until it closes the connection.
pub(crate) async fn serve(
    library: Weak<NodeLink>,
    id: LibraryId,
    conn: Connection,
    first: DeviceMessage,
) {
    if !conn.pinned() {
        conn.close("not a device of this library");
        return;
    }
    let answer_one = |request| answer(&library, id, request);
    answer_each(&conn, "anti-entropy", Some(first), REQUESTS_MAX, answer_one).await;
}

/// The answer to one request.
async fn answer(
    library: &Weak<NodeLink>,
    id: LibraryId,
    request: DeviceMessage,
) -> Result<DeviceMessage, NodeError> {
    let weak = library.clone();
    blocking(move || {
        let link = weak.upgrade().ok_or(NodeError::Stopped)?;
        let ranges = link.library().ranges();
        match request {
            DeviceMessage::RangeDigestsRequest {
                library,
                model,
                ranges: asked,
            } if library == id => {
                let def = ranges.model(model)?;
                let asked: Vec<KeyRange> = asked.into_iter().map(from_wire).collect();
                let (applied, digests) = ranges.digests(def, &asked)?;
                Ok(DeviceMessage::RangeDigests {
                    applied,
                    digests: digests
                        .into_iter()
                        .map(|d| WireRangeDigest {
                            rows: d.rows,
                            digest: ByteBuf::from(d.digest.to_vec()),
                        })
                        .collect(),
                })
            }
            DeviceMessage::SyncPullModelBatchRequest {
                model,
                after,
                limit,
                range,
                table: None,
                ..
            } => {
                let def = ranges.model(model)?;
                let range = range.map_or(KeyRange::ALL, from_wire);
                if !range.is_valid() {
                    return Err(failed("a range that ends before it starts"));
                }
                let limit = (limit as usize).min(ROWS_PER_BATCH);
                let rows = ranges.rows(def, range, after, limit)?;
                Ok(DeviceMessage::SyncPullModelBatchResponse {
                    model,
                    done: rows.len() < limit,
                    records: rows.into_iter().map(ByteBuf::from).collect(),
                    packed: ByteBuf::new(),
                    raw_len: 0,
                })
            }
            _ => Err(failed("not an anti-entropy request")),
        }
    })
    .await
}

/// The asking side's connection and what it has learnt.
struct Asking {
    conn: Connection,
    link: Arc<NodeLink>,
    library: LibraryId,
    report: AntiEntropyReport,
}

/// Compares this device's projection with `peer`'s at `addr`; with `repair`, replaces the
/// differing ranges with the peer's rows (only when both have applied the same position).
pub(crate) async fn compare(
    endpoint: &keel_transport::Endpoint,
    link: Arc<NodeLink>,
    library: LibraryId,
    (peer, addr): (DeviceId, SocketAddr),
    repair: bool,
) -> Result<AntiEntropyReport, NodeError> {
    let conn = crate::net::dial_for_talk(endpoint, library, (peer, addr)).await?;
    let mut asking = Asking {
        conn,
        link,
        library,
        report: AntiEntropyReport {
            peer: peer.to_hex(),
            ..AntiEntropyReport::default()
        },
    };
    let result = asking.run(repair).await;
    asking.conn.close("done");
    result.map(|()| asking.report)
}

impl Asking {
    async fn run(&mut self, repair: bool) -> Result<(), NodeError> {
        let models = self.link.library().ranges().models();
        self.report.models = models.len();
        for def in &models {
            self.compare_model(def).await?;
        }
        if !repair || self.report.differing.is_empty() {
            return Ok(());
        }
        if self.report.applied_here != self.report.applied_there {
            return Err(failed(format!(
                "not repaired: this device has applied up to {} and the peer up to {}; \
                 wait until both are in sync",
                self.report.applied_here, self.report.applied_there
            )));
        }
        for diff in self.report.differing.clone() {
            let def = models
                .iter()
                .find(|d| d.name == diff.model)
                .ok_or_else(|| failed("a model vanished"))?;
            self.report.rows_written += self.repair(def, &diff).await?;
        }
        self.report.repaired = true;
        Ok(())
    }

    /// Finds the smallest differing ranges of one model.
    async fn compare_model(&mut self, def: &'static ModelDef) -> Result<(), NodeError> {
        let mut pending = vec![(KeyRange::ALL, 0usize)];
        while let Some((within, depth)) = pending.pop() {
            let link = self.link.clone();
            let (applied, mine) =
                blocking(move || Ok(link.library().ranges().split(def, within, RANGES_MAX)?))
                    .await?;
            self.report.applied_here = applied.0;
            let theirs = self.their_digests(def, &mine).await?;
            self.report.ranges_compared += mine.len() as u64;
            for ((range, here), there) in mine.into_iter().zip(theirs) {
                if here == there {
                    continue;
                }
                let rows = here.rows.max(there.rows);
                if rows > LEAF_ROWS && here.rows > 1 && depth < DEPTH_MAX {
                    pending.push((range, depth + 1));
                } else {
                    self.report.differing.push(RangeDiff {
                        model: def.name.to_string(),
                        start: range.start,
                        end: range.end,
                        rows_here: here.rows,
                        rows_there: there.rows,
                    });
                }
            }
        }
        Ok(())
    }

    /// The peer's digests over the bounds of `mine`.
    async fn their_digests(
        &mut self,
        def: &ModelDef,
        mine: &[(KeyRange, RangeDigest)],
    ) -> Result<Vec<RangeDigest>, NodeError> {
        let request = DeviceMessage::RangeDigestsRequest {
            library: self.library,
            model: def.code,
            ranges: mine.iter().map(|(r, _)| to_wire(*r)).collect(),
        };
        send_in_time(&self.conn, &request).await?;
        let DeviceMessage::RangeDigests { applied, digests } = recv_in_time(&self.conn).await?
        else {
            return Err(failed("the peer answered something else than digests"));
        };
        if digests.len() != mine.len() {
            return Err(failed("the peer answered digests of other ranges"));
        }
        self.report.applied_there = applied.0;
        Ok(digests
            .into_iter()
            .map(|d| RangeDigest {
                rows: d.rows,
                digest: d.digest.as_ref().try_into().unwrap_or([0; 32]),
            })
            .collect())
    }

    /// Pulls the peer's rows of one range and puts them in place of this device's; returns the
    /// rows written.
    async fn repair(&mut self, def: &'static ModelDef, diff: &RangeDiff) -> Result<u64, NodeError> {
        let range = KeyRange {
            start: diff.start,
            end: diff.end,
        };
        let mut images: Vec<Vec<u8>> = Vec::new();
        let mut after = None;
        loop {
            let request = DeviceMessage::SyncPullModelBatchRequest {
                model: def.code,
                after,
                limit: ROWS_PER_BATCH as u32,
                range: Some(to_wire(range)),
                table: None,
                skip: 0,
                stream: false,
            };
            send_in_time(&self.conn, &request).await?;
            let DeviceMessage::SyncPullModelBatchResponse {
                model,
                records,
                done,
                raw_len: 0,
                ..
            } = recv_in_time(&self.conn).await?
            else {
                return Err(failed("the peer answered something else than rows"));
            };
            if model != def.code {
                return Err(failed("the peer answered rows of another model"));
            }
            // The peer said how many rows the range holds: more is a peer that never ends.
            if images.len() + records.len() > diff.rows_there as usize + ROWS_PER_BATCH {
                return Err(failed("the peer sent more rows than its range holds"));
            }
            after = records.last().and_then(|r| image_uuid(r));
            images.extend(records.into_iter().map(ByteBuf::into_vec));
            if done || after.is_none() {
                break;
            }
        }
        let link = self.link.clone();
        blocking(move || Ok(link.library().ranges().replace(def, range, &images)?)).await
    }
}
