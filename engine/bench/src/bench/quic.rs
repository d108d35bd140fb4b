//! The raw limit of the sync figures: loopback QUIC with Keel's endpoints.

use std::time::Instant;

use anyhow::{Context, Result};
use keel_transport::{DeviceMessage, Endpoint, Identity, Pins, ReplicationMessage};
use serde_bytes::ByteBuf;
use serde_json::json;

use super::sync::loopback;
use super::{percentile, Figures};

/// Raw loopback QUIC with the same endpoints: bulk throughput and round-trip time.
pub(crate) fn run(out: &mut Figures) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let a = Identity::generate("a")?;
        let b = Identity::generate("b")?;
        let pins_a = Pins::new();
        pins_a.pin(b.device());
        let pins_b = Pins::new();
        pins_b.pin(a.device());
        let server = Endpoint::bind(&a, loopback(), pins_a)?;
        let client = Endpoint::bind(&b, loopback(), pins_b)?;
        let addr = server.local_addr()?;
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.context("no connection")??;
            // Echo small messages; count bytes of large ones.
            let mut bytes = 0usize;
            loop {
                match conn.recv().await {
                    Ok(DeviceMessage::Replication(ReplicationMessage::Push { changes }))
                        if changes.len() > 1 =>
                    {
                        bytes += changes.iter().map(|c| c.len()).sum::<usize>();
                        if bytes >= 256 << 20 {
                            conn.send(&DeviceMessage::Replication(ReplicationMessage::Push {
                                changes: Vec::new(),
                            }))
                            .await?;
                        }
                    }
                    Ok(m) => conn.send(&m).await?,
                    Err(_) => break,
                }
            }
            Ok::<_, anyhow::Error>(server)
        });
        let conn = client.connect(addr).await?;
        let ping = DeviceMessage::Replication(ReplicationMessage::Push {
            changes: vec![ByteBuf::from(vec![1u8; 64])],
        });
        let mut rtts = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            conn.send(&ping).await?;
            conn.recv().await?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        rtts.sort_by(f64::total_cmp);
        let block = DeviceMessage::Replication(ReplicationMessage::Push {
            changes: (0..16)
                .map(|_| ByteBuf::from(vec![7u8; 64 << 10]))
                .collect(),
        });
        let t = Instant::now();
        for _ in 0..256 {
            conn.send(&block).await?;
        }
        conn.recv().await?;
        let secs = t.elapsed().as_secs_f64();
        out.insert("quic_rtt_p50_ms".into(), json!(percentile(&rtts, 0.5)));
        out.insert("quic_mb_per_s".into(), json!(256.0 / secs));
        conn.close("done");
        client.close();
        let _ = accept.await;
        Ok::<_, anyhow::Error>(())
    })
}
