//! Backfill over the network (decision 0056): a device behind its leader's compaction point
//! dials the leader on a connection of its own, sends [`DeviceMessage::BackfillRequest`]
//! instead of Hello, reads the [`DeviceMessage::BackfillPlan`] (the snapshot's base and its
//! parts with their row counts), and pulls every part in batches with
//! [`DeviceMessage::SyncPullModelBatchRequest`]. The library keeps the batches and their
//! checkpoint (`keel_engine::Library::backfill`); the core then drops the log, starts it
//! again after the base and reloads (`CoreEvent::Rebase`), and the log after the base arrives
//! as usual.
//!
//! The serving side answers from its snapshot, never from its live projection: every batch of
//! one backfill reads the same state.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use keel_engine::{
    BackfillPlan, BackfillReport, BackfillSource, EngineError, NodeLink, Part, PartCursor,
    SnapshotSource, BACKFILL_BATCH,
};
use keel_schema::DeviceId;
use keel_transport::{Connection, DeviceMessage, WirePart};
use serde_bytes::ByteBuf;

use crate::core::CoreEvent;
use crate::error::{blocking, NodeError};
use crate::net::{recv_in_time, send_in_time, Net};

/// Bytes of row images one answer carries at most (a frame holds 16 MiB).
const BATCH_BYTES_MAX: usize = 8 << 20;
/// zstd level of a batch of rows. At 1M entries (5 runs each), level 1 moved 96.2-96.3 bytes
/// per entry against 100.2-100.4 at the snapshot's -1, and the backfill took 6.81-8.02 s
/// (median 7.34) against 7.33-10.08 s (median 7.76): the leader packs on the core the pulling
/// side's writer leaves idle. Level 3 saved 3% more at 300k and cost far more time (decision
/// 0056).
const BACKFILL_ZSTD_LEVEL: i32 = 1;
/// Most requests one connection is served.
const REQUESTS_MAX: usize = 1 << 20;

fn failed(what: impl std::fmt::Display) -> NodeError {
    NodeError::Failed(format!("backfill: {what}"))
}

/// The serving side: answers a pinned device's backfill on `conn` from this library's snapshot
/// until it closes the connection, then keeps the snapshot unpacked for `keep` (see
/// `NodeOptions::snapshot_keep`).
pub(crate) async fn serve(library: Weak<NodeLink>, conn: Connection, keep: Duration) {
    let peer = conn.peer().short();
    if !conn.pinned() {
        conn.close("not a device of this library");
        return;
    }
    let source = match blocking(move || {
        let link = library.upgrade().ok_or(NodeError::Stopped)?;
        Ok(link.library().snapshot_source()?)
    })
    .await
    {
        Ok(source) => source,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "no snapshot to backfill from");
            conn.close("no snapshot");
            return;
        }
    };
    answer_requests(&source, &conn).await;
    // Held a while longer: the last holder to drop it removes the copy.
    tokio::spawn(async move {
        tokio::time::sleep(keep).await;
        drop(source);
    });
}

/// Sends the plan, then answers `conn`'s requests from `source` until it ends. A streaming
/// request is answered with every batch of its part from its cursor on, in turn. Every batch
/// sent counts towards [`REQUESTS_MAX`], asked or streamed.
async fn answer_requests(source: &Arc<SnapshotSource>, conn: &Connection) {
    let peer = conn.peer().short();
    if let Err(e) = send_in_time(conn, &plan_message(source.plan())).await {
        tracing::debug!(%peer, error = %e, "backfill plan not sent");
        return;
    }
    // The batch an answer's cursor leads to, read and packed while the answer crosses and
    // the asking side writes it: it asks for that one next, or it is streamed next.
    let ahead: Arc<std::sync::Mutex<Option<Prepared>>> = Arc::default();
    let mut sent = 0;
    while sent < REQUESTS_MAX {
        let request = match tokio::time::timeout(crate::net::STEP_TIMEOUT, conn.recv()).await {
            Ok(Ok(request)) => request,
            // Closed by the asking device (done), or it went quiet.
            outcome => {
                tracing::debug!(%peer, ?outcome, "backfill connection ended");
                return;
            }
        };
        let stream = matches!(
            request,
            DeviceMessage::SyncPullModelBatchRequest { stream: true, .. }
        );
        let mut asked = match asked_of(source, request) {
            Ok(asked) => Some(asked),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "backfill request refused; closed");
                conn.close("bad backfill request");
                return;
            }
        };
        while let Some(wanted) = asked.take() {
            let (message, next) = match answer(source, wanted, ahead.clone()).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "backfill batch not read; closed");
                    conn.close("backfill batch not read");
                    return;
                }
            };
            if let Err(e) = send_in_time(conn, &message).await {
                tracing::debug!(%peer, error = %e, "backfill answer not sent");
                return;
            }
            sent += 1;
            asked = next.filter(|_| stream && sent < REQUESTS_MAX);
        }
    }
    conn.close("too many requests");
}

/// A request's batch: what it asks for, and its answer on the way.
struct Prepared {
    asked: Wanted,
    answer: tokio::task::JoinHandle<Result<(DeviceMessage, Option<Wanted>), NodeError>>,
}

/// What a row request asks for: a part of the plan, from a cursor, at most `limit` rows.
#[derive(Clone, PartialEq, Eq)]
struct Wanted {
    part: Part,
    model: u8,
    cursor: PartCursor,
    limit: usize,
}

fn plan_message(plan: &BackfillPlan) -> DeviceMessage {
    DeviceMessage::BackfillPlan {
        base: plan.base,
        base_epoch: plan.base_epoch,
        head: plan.head,
        hlc: plan.hlc,
        parts: plan
            .parts
            .iter()
            .map(|(part, rows)| WirePart {
                table: part.table.clone(),
                model: part.model,
                rows: *rows,
            })
            .collect(),
    }
}

/// The answer to `asked`: rows of a part of the plan, at most [`BACKFILL_BATCH`] and
/// [`BATCH_BYTES_MAX`] bytes of them, and what follows it unless it was the part's last. The
/// one `ahead` prepared when it is the one asked; the batch after it is prepared in turn.
async fn answer(
    source: &Arc<SnapshotSource>,
    asked: Wanted,
    ahead: Arc<std::sync::Mutex<Option<Prepared>>>,
) -> Result<(DeviceMessage, Option<Wanted>), NodeError> {
    let prepared = ahead.lock().map_err(|_| failed("poisoned"))?.take();
    let answer = match prepared {
        Some(prepared) if prepared.asked == asked => prepared.answer,
        // Another batch (a retry after a cut, or a new part): the one prepared is dropped.
        _ => prepare(source, asked),
    };
    let (message, next) = answer
        .await
        .map_err(|e| failed(format!("a batch's thread: {e}")))??;
    if let Some(next) = &next {
        let prepared = Prepared {
            answer: prepare(source, next.clone()),
            asked: next.clone(),
        };
        *ahead.lock().map_err(|_| failed("poisoned"))? = Some(prepared);
    }
    Ok((message, next))
}

/// What `request` asks for, checked against the plan.
fn asked_of(source: &SnapshotSource, request: DeviceMessage) -> Result<Wanted, NodeError> {
    let DeviceMessage::SyncPullModelBatchRequest {
        model,
        after,
        limit,
        table,
        skip,
        range: None,
        ..
    } = request
    else {
        return Err(failed("not a backfill request"));
    };
    let part = source
        .plan()
        .parts
        .iter()
        .map(|(p, _)| p)
        .find(|p| match &table {
            Some(table) => p.model.is_none() && p.table == *table,
            None => p.model == Some(model),
        })
        .cloned()
        .ok_or_else(|| failed("a part the snapshot does not have"))?;
    Ok(Wanted {
        part,
        model,
        cursor: PartCursor { after, skip },
        limit: (limit as usize).min(BACKFILL_BATCH),
    })
}

/// Reads and packs the batch `asked` names on a blocking thread: its answer, and what the
/// asking side asks next unless it was the part's last.
fn prepare(
    source: &Arc<SnapshotSource>,
    asked: Wanted,
) -> tokio::task::JoinHandle<Result<(DeviceMessage, Option<Wanted>), NodeError>> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || {
        let mut rows = source.rows(&asked.part, asked.cursor, asked.limit)?;
        let fetched = rows.len();
        let mut bytes = 0usize;
        let fits = rows
            .iter()
            .position(|r| {
                bytes += r.len();
                bytes > BATCH_BYTES_MAX
            })
            .unwrap_or(fetched)
            .max(1)
            .min(fetched);
        rows.truncate(fits);
        let done = fetched < asked.limit && fits == fetched;
        let message = rows_message(asked.model, &rows, done)?;
        let next = (!done).then(|| Wanted {
            cursor: next_cursor(&asked.part, asked.cursor, &rows),
            ..asked
        });
        Ok((message, next))
    })
}

/// An answer of `rows` of `model`, packed (none: nothing to pack, since a packed answer
/// unpacks to at least one row).
fn rows_message(model: u8, rows: &[Vec<u8>], done: bool) -> Result<DeviceMessage, NodeError> {
    let (packed, raw_len) = match rows.is_empty() {
        true => (Vec::new(), 0),
        false => pack_rows(rows)?,
    };
    Ok(DeviceMessage::SyncPullModelBatchResponse {
        model,
        done,
        records: Vec::new(),
        packed: ByteBuf::from(packed),
        raw_len,
    })
}

/// Row images as one zstd frame (the level snapshot chunks cross at), each after its length (u32 BE), and the bytes it unpacks to.
fn pack_rows(rows: &[Vec<u8>]) -> Result<(Vec<u8>, u32), NodeError> {
    let mut raw = Vec::with_capacity(rows.iter().map(|r| r.len() + 4).sum());
    for row in rows {
        let len = u32::try_from(row.len()).map_err(|_| failed("a row over 4 GiB"))?;
        raw.extend_from_slice(&len.to_be_bytes());
        raw.extend_from_slice(row);
    }
    let raw_len = u32::try_from(raw.len()).map_err(|_| failed("a batch over 4 GiB"))?;
    let packed = zstd::bulk::compress(&raw, BACKFILL_ZSTD_LEVEL).map_err(failed)?;
    Ok((packed, raw_len))
}

/// The row images of a packed batch: it must unpack to exactly `raw_len` bytes (bounded by
/// the transport when the message was decoded) of at most [`BACKFILL_BATCH`] whole rows.
fn unpack_rows(packed: &[u8], raw_len: u32) -> Result<Vec<Vec<u8>>, EngineError> {
    let bad = |why: String| EngineError::Backfill(format!("a batch from the leader {why}"));
    let raw = zstd::bulk::decompress(packed, raw_len as usize)
        .map_err(|e| bad(format!("does not unpack: {e}")))?;
    if raw.len() != raw_len as usize {
        return Err(bad(format!(
            "unpacks to {} bytes, not {raw_len}",
            raw.len()
        )));
    }
    let mut rows = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("ends inside a length".into()))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() || rows.len() == BACKFILL_BATCH {
            return Err(bad("holds a row past its end, or too many".into()));
        }
        rows.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(rows)
}

/// The asking side's connection, as the library pulls from it. A part is asked for once, as a
/// stream: the leader sends its batches in turn, and while the library writes one, the next
/// is already read and unpacked. The link never waits for a request between batches.
struct Pull {
    conn: Arc<Connection>,
    rt: tokio::runtime::Handle,
    /// The batch being read ahead (the part and the cursor it starts at) and its answer to
    /// come.
    ahead: Option<(Part, PartCursor, Asked)>,
}

/// An answer to come, already unpacked (on the runtime, while the library writes).
type Asked = tokio::task::JoinHandle<Result<(Vec<Vec<u8>>, bool), EngineError>>;

impl Pull {
    /// Sends the request for the rest of `part` from `cursor`, `limit` rows a batch; the first
    /// batch comes from the handle.
    fn ask(&self, part: &Part, cursor: PartCursor, limit: usize) -> Asked {
        let request = DeviceMessage::SyncPullModelBatchRequest {
            model: part.model.unwrap_or(0),
            after: cursor.after,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            range: None,
            table: part.model.is_none().then(|| part.table.clone()),
            skip: cursor.skip,
            stream: true,
        };
        let conn = self.conn.clone();
        self.read(part, async move { send_in_time(&conn, &request).await })
    }

    /// Reads the next batch of `part`'s stream once `sent` is done.
    fn read(
        &self,
        part: &Part,
        sent: impl std::future::Future<Output = Result<(), NodeError>> + Send + 'static,
    ) -> Asked {
        let (conn, part) = (self.conn.clone(), part.clone());
        self.rt.spawn(async move {
            let asked = async {
                sent.await?;
                recv_in_time(&conn).await
            };
            let answer = asked
                .await
                .map_err(|e| EngineError::Backfill(e.to_string()))?;
            rows_of(answer, &part)
        })
    }
}

impl BackfillSource for Pull {
    fn batch(
        &mut self,
        part: &Part,
        cursor: PartCursor,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
        let failed = |e: String| EngineError::Backfill(e);
        let asked = match self.ahead.take() {
            Some((p, c, asked)) if p == *part && c == cursor => asked,
            // Batches come in order: one read ahead and not taken would be read next.
            Some(_) => return Err(failed("rows asked out of order".into())),
            None => self.ask(part, cursor, limit),
        };
        let (rows, done) = self
            .rt
            .block_on(asked)
            .map_err(|e| failed(e.to_string()))??;
        if !done {
            let next = next_cursor(part, cursor, &rows);
            self.ahead = Some((part.clone(), next, self.read(part, async { Ok(()) })));
        }
        Ok((rows, done))
    }
}

/// Where the library goes on in `part` after `rows` taken at `cursor` (what is asked ahead): a
/// model by its last uuid, an internal table by place alone.
fn next_cursor(part: &Part, cursor: PartCursor, rows: &[Vec<u8>]) -> PartCursor {
    let after = match part.model {
        Some(_) => rows
            .last()
            .and_then(|r| keel_engine::image_uuid(r))
            .or(cursor.after),
        None => cursor.after,
    };
    PartCursor {
        after,
        skip: cursor.skip + rows.len() as u64,
    }
}

/// The rows of an answer to a request for `part`, and whether they are its last.
fn rows_of(answer: DeviceMessage, part: &Part) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
    match answer {
        DeviceMessage::SyncPullModelBatchResponse {
            model,
            records,
            done,
            packed,
            raw_len,
        } if model == part.model.unwrap_or(0) => {
            let rows = if raw_len > 0 {
                unpack_rows(&packed, raw_len)?
            } else {
                records.into_iter().map(ByteBuf::into_vec).collect()
            };
            if rows.is_empty() && !done {
                return Err(EngineError::Backfill(
                    "the leader sent an empty batch that is not the last".into(),
                ));
            }
            Ok((rows, done))
        }
        _ => Err(EngineError::Backfill(
            "the leader answered something else than the rows asked".into(),
        )),
    }
}

/// Pulls `leader`'s snapshot (at `addr`) into this library and has the core start the log
/// again after its base.
pub(crate) async fn pull(
    net: &Net,
    link: Arc<NodeLink>,
    (leader, addr): (DeviceId, SocketAddr),
) -> Result<BackfillReport, NodeError> {
    let library = net.library;
    let conn = crate::net::dial_for_talk(&net.endpoint, library, (leader, addr)).await?;
    send_in_time(&conn, &DeviceMessage::BackfillRequest { library }).await?;
    let plan = match recv_in_time(&conn).await? {
        DeviceMessage::BackfillPlan {
            base,
            base_epoch,
            head,
            hlc,
            parts,
        } => BackfillPlan {
            base,
            base_epoch,
            head,
            hlc,
            parts: parts
                .into_iter()
                .map(|p| {
                    let part = Part {
                        table: p.table,
                        model: p.model,
                    };
                    (part, p.rows)
                })
                .collect(),
        },
        _ => return Err(failed("the leader answered something else than a plan")),
    };
    let conn = Arc::new(conn);
    let mut source = Pull {
        conn: conn.clone(),
        rt: tokio::runtime::Handle::current(),
        ahead: None,
    };
    let pulled = {
        let (link, plan) = (link.clone(), plan.clone());
        blocking(move || {
            Ok(link
                .library()
                .backfill(leader, &plan, &mut source, &mut |_, _| {})?)
        })
        .await
    };
    conn.close("done");
    if let Ok(mut ended) = net.ended_bytes.lock() {
        let (sent, received) = conn.wire_bytes();
        ended.0 += sent;
        ended.1 += received;
    }
    let mut report = pulled?;
    let (reply, replied) = crossbeam_channel::bounded(1);
    net.core
        .send(CoreEvent::Rebase {
            plan: Box::new(plan),
            reply,
        })
        .map_err(|_| NodeError::Stopped)?;
    report.resubmitted = blocking(move || replied.recv().map_err(|_| NodeError::Stopped)?).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_unpack_to_themselves_and_a_lying_batch_is_refused() {
        let rows: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; usize::from(i) * 3]).collect();
        let (packed, raw_len) = pack_rows(&rows).expect("packs");
        assert!(packed.len() < raw_len as usize, "compressible rows shrink");
        assert_eq!(unpack_rows(&packed, raw_len).expect("unpacks"), rows);
        // A length that is not the frame's, either way, and a row cut short.
        for claim in [raw_len - 1, raw_len + 1] {
            assert!(unpack_rows(&packed, claim).is_err(), "{claim} accepted");
        }
        let (cut, cut_len) = {
            let mut raw = 10u32.to_be_bytes().to_vec();
            raw.extend_from_slice(&[1, 2, 3]);
            let len = raw.len() as u32;
            (zstd::bulk::compress(&raw, 1).expect("packs"), len)
        };
        assert!(unpack_rows(&cut, cut_len).is_err());
        assert!(unpack_rows(b"not zstd", 8).is_err());
    }

    #[test]
    fn the_cursor_asked_ahead_is_the_one_the_library_asks_next() {
        // A row whose first cell is a 16-byte blob, as `_conflicts` and `_refused` rows are.
        let mut row = vec![0u8, 2, 4, 0, 0, 0, 16];
        row.extend_from_slice(&[9u8; 16]);
        row.extend_from_slice(&[0]);
        let rows = vec![row];
        let internal = Part {
            table: "_conflicts".into(),
            model: None,
        };
        let next = next_cursor(&internal, PartCursor::default(), &rows);
        assert_eq!(
            next,
            PartCursor {
                after: None,
                skip: 1
            },
            "by place only"
        );
        let model = Part {
            table: "tag".into(),
            model: Some(5),
        };
        let next = next_cursor(&model, PartCursor::default(), &rows);
        assert_eq!(next.after, keel_engine::image_uuid(&rows[0]));
        assert_eq!(next.skip, 1);
    }

    #[test]
    fn an_answer_of_rows_encodes_even_empty() {
        for rows in [Vec::new(), vec![vec![1u8, 2, 3]]] {
            let message = rows_message(4, &rows, true).expect("packs");
            message.encode().expect("within the limits");
        }
    }
}
