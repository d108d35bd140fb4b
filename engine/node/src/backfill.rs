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
use crate::net::Net;

/// Longest wait for one answer or request.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of row images one answer carries at most (a frame holds 16 MiB).
const BATCH_BYTES_MAX: usize = 8 << 20;
/// Most requests one connection is served.
const REQUESTS_MAX: usize = 1 << 20;

fn failed(what: impl std::fmt::Display) -> NodeError {
    NodeError::Failed(format!("backfill: {what}"))
}

/// The serving side: answers a pinned device's backfill on `conn` from this library's snapshot
/// until it closes the connection.
pub(crate) async fn serve(library: Weak<NodeLink>, conn: Connection) {
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
    if send(&conn, plan_message(source.plan())).await.is_err() {
        return;
    }
    for _ in 0..REQUESTS_MAX {
        let request = match tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await {
            Ok(Ok(request)) => request,
            // Closed by the asking device (done), or it went quiet.
            _ => return,
        };
        let answer = match answer(&source, request).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "backfill request refused; closed");
                conn.close("bad backfill request");
                return;
            }
        };
        if send(&conn, answer).await.is_err() {
            return;
        }
    }
    conn.close("too many requests");
}

async fn send(conn: &Connection, message: DeviceMessage) -> Result<(), NodeError> {
    match tokio::time::timeout(STEP_TIMEOUT, conn.send(&message)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(failed("the peer does not read")),
    }
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

/// The answer to one row request: rows of a part of the plan, at most [`BACKFILL_BATCH`] and
/// [`BATCH_BYTES_MAX`] bytes of them.
async fn answer(
    source: &Arc<SnapshotSource>,
    request: DeviceMessage,
) -> Result<DeviceMessage, NodeError> {
    let DeviceMessage::SyncPullModelBatchRequest {
        model,
        after,
        limit,
        table,
        skip,
        range: None,
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
    let limit = (limit as usize).min(BACKFILL_BATCH);
    let source = source.clone();
    blocking(move || {
        let mut rows = source.rows(&part, PartCursor { after, skip }, limit)?;
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
        Ok(DeviceMessage::SyncPullModelBatchResponse {
            model,
            done: fetched < limit && fits == fetched,
            records: rows.into_iter().map(ByteBuf::from).collect(),
        })
    })
    .await
}

/// The asking side's connection, as the library pulls from it.
struct Pull {
    conn: Arc<Connection>,
    rt: tokio::runtime::Handle,
}

impl BackfillSource for Pull {
    fn batch(
        &mut self,
        part: &Part,
        cursor: PartCursor,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
        let request = DeviceMessage::SyncPullModelBatchRequest {
            model: part.model.unwrap_or(0),
            after: cursor.after,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            range: None,
            table: part.model.is_none().then(|| part.table.clone()),
            skip: cursor.skip,
        };
        let conn = self.conn.clone();
        let answer = self.rt.block_on(async move {
            send(&conn, request).await?;
            recv(&conn).await
        });
        match answer.map_err(|e| EngineError::Backfill(e.to_string()))? {
            DeviceMessage::SyncPullModelBatchResponse {
                model,
                records,
                done,
            } if model == part.model.unwrap_or(0) => {
                if records.is_empty() && !done {
                    return Err(EngineError::Backfill(
                        "the leader sent an empty batch that is not the last".into(),
                    ));
                }
                Ok((records.into_iter().map(ByteBuf::into_vec).collect(), done))
            }
            _ => Err(EngineError::Backfill(
                "the leader answered something else than the rows asked".into(),
            )),
        }
    }
}

async fn recv(conn: &Connection) -> Result<DeviceMessage, NodeError> {
    Ok(tokio::time::timeout(STEP_TIMEOUT, conn.recv())
        .await
        .map_err(|_| failed("no answer"))??)
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
    send(&conn, DeviceMessage::BackfillRequest { library }).await?;
    let plan = match recv(&conn).await? {
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
