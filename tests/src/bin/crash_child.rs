//! Crash-test child: opens a library and commits tags in a loop, printing each acknowledged
//! change id on its own line, until it is killed. With `index PATH` after the library, it
//! indexes PATH instead, printing `progress DONE` as files are processed; with `rebuild` or
//! `verify`, it rebuilds or verifies the projections, printing `progress DONE TOTAL`.

use std::io::Write;
use std::path::PathBuf;

use keel_engine::{Home, Library, Tag};
use uuid::Uuid;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let home = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB"))?,
    );
    let name = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB"))?;
    let lib = Library::open(&Home::new(home), &name, keel_tests::PASSWORD)?;
    let mode = args.next();
    if mode.as_deref() == Some("rebuild") {
        println!("ready");
        lib.rebuild(&mut |done, total| println!("progress {done} {total}"))?;
        println!("done");
        return Ok(());
    }
    if mode.as_deref() == Some("verify") {
        println!("ready");
        let (_, digest) =
            lib.verify_with(&mut |done, total| println!("progress {done} {total}"))?;
        digest?;
        println!("done");
        return Ok(());
    }
    if mode.as_deref() == Some("index") {
        let path = PathBuf::from(
            args.next()
                .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB index PATH"))?,
        );
        println!("ready");
        lib.index(&path, &mut |p| println!("progress {}", p.done))?;
        println!("done");
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for i in 0u64.. {
        // Alternate single commits and small groups, so a kill can land inside either.
        let n = if i % 3 == 0 { 5 } else { 1 };
        let (_, receipt) = lib.transact(|tx| {
            for k in 0..n {
                tx.upsert(&Tag {
                    uuid: Uuid::now_v7(),
                    name: format!("crash-{i}-{k}"),
                    color: None,
                    created_ms: i as i64,
                });
            }
            Ok(())
        })?;
        for id in receipt.change_ids {
            writeln!(out, "{id}")?;
        }
        out.flush()?;
    }
    Ok(())
}
