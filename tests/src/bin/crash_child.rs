//! Crash-test child: opens a library and commits tags in a loop, printing each acknowledged
//! change id on its own line, until it is killed. With `index PATH` after the library, it
//! indexes PATH instead, printing `progress DONE TOTAL` as files are processed (and at the end
//! `peak_rss_kb N`); with
//! `reidentify PATH`, it re-identifies PATH, pausing it at its first saved checkpoint and then
//! printing its progress the same way; with `rebuild [STOP]` or `verify [STOP]`, it rebuilds or
//! verifies the projections, printing `progress DONE TOTAL` (and, after a rebuild, `peak_rss_kb
//! N`), stopping for good at the first progress past STOP short of the end; with
//! `join ADDR CODE`, it joins library LIB from the node at ADDR with invitation CODE, printing
//! `progress STORED TOTAL` as the inviter's log is stored; with `merge SRC`, it merges library
//! SRC of the same home into LIB, printing `progress DONE TOTAL` as records are carried; with
//! `watch`, it watches LIB's locations (debounce 100 ms, a rescan every 300 ms of a location it
//! cannot watch), printing `watcher SUMMARY` for each report of the watcher; with `compact`, it
//! commits tags and compacts the log after every few commits, printing `tag UUID` for each tag
//! acknowledged (compacted changes leave the journal: the tags are what stays); with
//! `serve ADDR`, it runs LIB as a node that dials ADDR, printing `progress DONE TOTAL` as a
//! backfill goes, `done` once it runs past it and then `peak_rss_kb N`; with `replicate ADDR`, it runs LIB as a node
//! that dials ADDR and commits tags in a loop, printing `tag UUID` for each one acknowledged.

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
    let mode = args.next();
    if mode.as_deref() == Some("join") {
        let (addr, code) = (args.next(), args.next());
        let (Some(addr), Some(code)) = (addr, code) else {
            anyhow::bail!("usage: crash_child HOME LIB join ADDR CODE");
        };
        return join(&Home::new(home), addr.parse()?, code);
    }
    let home = Home::new(home);
    let lib = Library::open(&home, &name, keel_tests::PASSWORD)?;
    // `rebuild` and `verify` with a count after them stop at the first progress past it and
    // short of the end, until killed (see `stop_midway`).
    let stop_at: Option<u64> = if matches!(mode.as_deref(), Some("rebuild" | "verify")) {
        args.next().map(|n| n.parse()).transpose()?
    } else {
        None
    };
    if mode.as_deref() == Some("rebuild") {
        println!("ready");
        lib.rebuild(&mut |done, total| {
            println!("progress {done} {total}");
            stop_midway(stop_at, done, total);
        })?;
        print_done();
        return Ok(());
    }
    if mode.as_deref() == Some("verify") {
        println!("ready");
        let (_, digest) = lib.verify_with(&mut |done, total| {
            println!("progress {done} {total}");
            stop_midway(stop_at, done, total);
        })?;
        digest?;
        println!("done");
        return Ok(());
    }
    if mode.as_deref() == Some("merge") {
        let source = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB merge SRC"))?;
        let source = Library::open(&home, &source, keel_tests::PASSWORD)?;
        println!("ready");
        lib.merge_from(&source, false, &mut |done, total| {
            println!("progress {done} {total}")
        })?;
        println!("done");
        return Ok(());
    }
    if mode.as_deref() == Some("watch") {
        return watch(&lib);
    }
    if mode.as_deref() == Some("compact") {
        return compact(&lib);
    }
    if mode.as_deref() == Some("serve") {
        let addr = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB serve ADDR"))?;
        return serve(lib, addr.parse()?);
    }
    if mode.as_deref() == Some("replicate") {
        let addr = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB replicate ADDR"))?;
        return replicate(lib, addr.parse()?);
    }
    if mode.as_deref() == Some("reidentify") {
        let path = PathBuf::from(
            args.next()
                .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB reidentify PATH"))?,
        );
        return reidentify(&lib, &path);
    }
    if mode.as_deref() == Some("index") {
        let path = PathBuf::from(
            args.next()
                .ok_or_else(|| anyhow::anyhow!("usage: crash_child HOME LIB index PATH"))?,
        );
        println!("ready");
        lib.index(&path, &mut |p| println!("progress {} {}", p.done, p.total))?;
        print_done();
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

/// Commits tags, compacting the log after every fourth commit, until killed; prints each
/// acknowledged tag's uuid.
fn compact(lib: &Library) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for i in 0u64.. {
        let tags: Vec<Tag> = (0..20)
            .map(|k| Tag {
                uuid: Uuid::now_v7(),
                name: format!("compact-{i}-{k}"),
                color: None,
                created_ms: i as i64,
            })
            .collect();
        lib.transact(|tx| {
            for tag in &tags {
                tx.upsert(tag);
            }
            Ok(())
        })?;
        for tag in &tags {
            writeln!(out, "tag {}", tag.uuid)?;
        }
        out.flush()?;
        if i % 4 == 3 {
            let last = lib.status()?.journal.last_lsn;
            lib.compact(keel_engine::Lsn(last))?;
        }
    }
    Ok(())
}

/// Joins a library as device "b", printing the log's progress, then `done`.
fn join(home: &Home, addr: std::net::SocketAddr, code: String) -> anyhow::Result<()> {
    let (progress, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let options = keel_node::JoinOptions {
        addr: Some(addr),
        discovery: keel_node::Discovery::default(),
        bind: None,
        code,
        device_name: Some("b".into()),
        password: keel_tests::PASSWORD.into(),
        create: keel_engine::CreateOptions {
            kdf: keel_engine::KdfParams::INSECURE_FAST,
        },
        snapshot: true,
        progress: Some(progress),
        // Copy the file whatever the link: tests measure nothing.
        slow_link: keel_node::SlowLink::never(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let printing = async {
            while let Some(p) = heard.recv().await {
                println!("progress {} {}", p.log_stored, p.log_total);
            }
        };
        let (joined, ()) = tokio::join!(keel_node::join(home, options), printing);
        joined
    })?;
    println!("done");
    Ok(())
}

/// Watches `lib` until killed, printing the watcher's reports.
fn watch(lib: &Library) -> anyhow::Result<()> {
    let mut events = lib.subscribe();
    std::thread::spawn(move || {
        while let Ok(event) = events.blocking_recv() {
            if let keel_engine::Event::JobFinished {
                job: "watcher",
                summary,
            } = event
            {
                println!("watcher {summary}");
            }
        }
    });
    println!("ready");
    let options = keel_engine::WatchOptions {
        debounce: std::time::Duration::from_millis(100),
        poll_every: std::time::Duration::from_millis(300),
        ..keel_engine::WatchOptions::default()
    };
    let (_stop, stopped) = crossbeam_channel::bounded::<()>(1);
    lib.watch(&options, &stopped)?;
    Ok(())
}

/// Re-identifies `path`; once the job has saved a checkpoint, pauses it and prints its
/// `progress DONE TOTAL`, so that a kill lands after a checkpoint and before the end.
fn reidentify(lib: &Library, path: &std::path::Path) -> anyhow::Result<()> {
    paused_at_first_checkpoint(lib, |lib| lib.reidentify(path, &mut |_| {}))
}

/// Runs `work` on `lib`, pausing its job at the job's first saved checkpoint and printing its
/// progress then (`progress DONE TOTAL`), or `done` if it ended first.
fn paused_at_first_checkpoint<T>(
    lib: &Library,
    work: impl FnOnce(&Library) -> Result<T, keel_engine::EngineError>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut events = lib.subscribe();
    let ended = AtomicBool::new(false);
    println!("ready");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !ended.load(Ordering::Relaxed) {
                let Ok(keel_engine::Event::JobChanged { job }) = events.try_recv() else {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                };
                if job.checkpoint.is_some() && job.state == keel_engine::JobState::Running {
                    let _ = lib.pause_job(job.id);
                    println!("progress {} {}", job.progress.done, job.progress.total);
                    return;
                }
            }
        });
        let result = work(lib);
        ended.store(true, Ordering::Relaxed);
        result?;
        println!("done");
        Ok(())
    })
}

/// Stops this thread for good (until the process is killed) once `done` reached `stop_at`
/// and work is left: a parent that kills on such a progress line then always kills midway.
fn stop_midway(stop_at: Option<u64>, done: u64, total: u64) {
    if stop_at.is_some_and(|n| done >= n && done < total) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Prints `done`, then this process's peak memory (`peak_rss_kb N`) where the platform says.
fn print_done() {
    println!("done");
    if let Some(kb) = peak_rss_kb() {
        println!("peak_rss_kb {kb}");
    }
}

/// This process's peak resident memory (Linux: `VmHWM`), in KiB.
fn peak_rss_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs `lib` as a node that dials `addr` and commits tags (one, or a group of four) in a
/// loop, printing `tag UUID` once each commit is acknowledged.
fn replicate(lib: Library, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let node = keel_node::Node::start(
        lib,
        keel_node::NodeOptions {
            peers: vec![addr],
            ..keel_tests::cluster::options(Vec::new())
        },
    )?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for i in 0u64.. {
        let tags: Vec<Tag> = (0..if i % 3 == 0 { 4 } else { 1 })
            .map(|k| Tag {
                uuid: Uuid::now_v7(),
                name: format!("soak-{i}-{k}"),
                color: None,
                created_ms: i as i64,
            })
            .collect();
        node.library().transact(|tx| {
            for t in &tags {
                tx.upsert(t);
            }
            Ok(())
        })?;
        for t in &tags {
            writeln!(out, "tag {}", t.uuid)?;
        }
        out.flush()?;
    }
    Ok(())
}

/// Runs `lib` as a node dialing `addr` until killed, printing the progress of its backfill
/// (polled from its jobs and its scratch file's checkpoint rows) and `done` once its log
/// starts after a base it did not have.
fn serve(lib: Library, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let base = lib.status()?.journal.compacted_to;
    let node = keel_node::Node::start(
        lib,
        keel_node::NodeOptions {
            peers: vec![addr],
            ..keel_tests::cluster::options(Vec::new())
        },
    )?;
    println!("ready");
    let mut last = None;
    loop {
        let status = node.status();
        if status.compacted_to > base && status.behind_compaction == 0 {
            print_done();
            return Ok(());
        }
        let backfill = node
            .library()
            .jobs()?
            .into_iter()
            .rev()
            .find(|j| matches!(j.kind, keel_engine::JobKind::Backfill { .. }));
        if let Some(job) = backfill {
            let now = (job.progress.done, job.progress.total);
            if last != Some(now) {
                println!("progress {} {}", now.0, now.1);
                last = Some(now);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
