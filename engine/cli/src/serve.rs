//! `keel serve`, `keel pair` and `keel devices`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_node::{join as join_library, revoke_in, DevicesFile, JoinOptions, Node, NodeOptions};
use keel_schema::DeviceId;

use crate::cli::{short, DevicesCommand, Io};
use crate::control::Server;

/// Runs a node until Ctrl-C or SIGTERM, then stops it cleanly.
pub(crate) fn run(
    home: &Home,
    library: Library,
    options: NodeOptions,
    gui: Option<std::net::SocketAddr>,
) -> Result<i32> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let name = library.name().to_string();
    let dir = home.library_dir(&name);
    let stop = StopSignal::install()?;
    let node = Arc::new(Node::start(library, options)?);
    let server = Server::start(&dir, node.clone())?;
    show_sync_progress(node.library().subscribe());
    println!(
        "serving {name} on {} as device {}",
        node.local_addr(),
        node.library().device_id().to_hex()
    );
    let inspector = match gui {
        Some(addr) => {
            let gui = crate::gui::Gui::start(&dir, &name, node.clone(), addr)?;
            println!(
                "inspector on http://{}/#token={} (the token is also in {})",
                gui.addr,
                gui.token,
                dir.join(crate::gui::TOKEN_FILE).display()
            );
            Some(gui)
        }
        None => None,
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    stop.wait();
    eprintln!("stopping {name}");
    drop(inspector);
    drop(server);
    match Arc::try_unwrap(node) {
        Ok(node) => node.stop()?,
        // A control request is still running: dropping the node still stops it (everything
        // acknowledged is durable in the journal already).
        Err(node) => drop(node),
    }
    Ok(0)
}

/// Ctrl-C and SIGTERM, caught from the moment this is made: one that arrives before
/// [`StopSignal::wait`] is kept for it, instead of ending the process (a service manager may
/// stop a node the moment its control socket appears).
struct StopSignal {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn install() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (term, interrupt) = runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })?;
        Ok(Self {
            runtime,
            term,
            interrupt,
        })
    }

    /// Blocks until Ctrl-C or SIGTERM (or returns at once for one that came already).
    fn wait(mut self) {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.term.recv() => {}
            }
        });
    }
}

/// `keel watch`: follows the library's locations on disk, without the network, until Ctrl-C or
/// SIGTERM; prints what each burst of changes did.
pub(crate) fn watch(library: Library) -> Result<i32> {
    let mut events = library.subscribe();
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let printer = std::thread::spawn(move || {
        while let Ok(event) = events.blocking_recv() {
            if let keel_engine::Event::JobFinished {
                job: "watcher",
                summary,
            } = event
            {
                println!("{summary}");
            }
        }
    });
    let signal = StopSignal::install()?;
    println!(
        "watching the locations of {} (Ctrl-C stops)",
        library.name()
    );
    let watched = std::thread::scope(|scope| {
        let watcher =
            scope.spawn(|| library.watch(&keel_engine::WatchOptions::default(), &stopped));
        signal.wait();
        drop(stop);
        let watched = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
        watched.map_err(anyhow::Error::from)
    });
    library.close()?;
    let _ = printer.join();
    watched.map(|()| 0)
}

/// A progress bar drawn with `template` (indicatif's default if the template is invalid).
fn styled_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Shows catching up with the leader (initial sync) as a progress bar on a terminal: entries
/// stored of the leader's, bytes received, rate and ETA.
fn show_sync_progress(mut events: tokio::sync::broadcast::Receiver<keel_engine::Event>) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("keel-progress".into())
        .spawn(move || {
            let bar = styled_bar("syncing {bar:40} {pos}/{len} entries, {msg} {per_sec} ETA {eta}");
            loop {
                match events.blocking_recv() {
                    Ok(keel_engine::Event::SyncProgress {
                        stored,
                        leader_end,
                        bytes,
                    }) => {
                        let left = leader_end.saturating_sub(stored);
                        if left == 0 {
                            bar.finish_and_clear();
                            continue;
                        }
                        let per_entry = bytes as f64 / stored.max(1) as f64;
                        bar.set_length(leader_end);
                        bar.set_position(stored);
                        bar.set_message(format!(
                            "{:.1} MB received, ~{:.1} MB left",
                            bytes as f64 / 1e6,
                            left as f64 * per_entry / 1e6
                        ));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
}

/// Shows the initial sync of `pair join` (log entries stored, projection bytes received, rate
/// and ETA) as a progress bar on a terminal. Ends when the sender side of `heard` is dropped.
fn show_join_progress(
    mut heard: tokio::sync::mpsc::UnboundedReceiver<keel_node::JoinProgress>,
) -> Option<std::thread::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    std::thread::Builder::new()
        .name("keel-progress".into())
        .spawn(move || {
            let bar = styled_bar("initial sync {bar:40} {pos}/{len} log entries, {msg} ETA {eta}");
            while let Some(p) = heard.blocking_recv() {
                bar.set_length(p.log_total);
                bar.set_position(p.log_stored);
                bar.set_message(format!(
                    "projections {:.1}/{:.1} MB, {:.1} MB received",
                    p.file_received as f64 / 1e6,
                    p.file_total as f64 / 1e6,
                    p.bytes as f64 / 1e6
                ));
            }
            bar.finish_and_clear();
        })
        .ok()
}

/// `keel pair join`.
pub(crate) fn join(
    home: &Home,
    addr: Option<SocketAddr>,
    discovery: keel_node::Discovery,
    code: String,
    name: Option<String>,
    password: &str,
    kdf: KdfParams,
) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (progress, heard) = tokio::sync::mpsc::unbounded_channel();
    let shown = show_join_progress(heard);
    let library = rt.block_on(join_library(
        home,
        JoinOptions {
            addr,
            discovery,
            bind: None,
            code,
            device_name: name,
            password: password.into(),
            create: CreateOptions { kdf },
            snapshot: true,
            progress: Some(progress),
            slow_link: keel_node::SlowLink::default(),
        },
    ));
    if let Some(shown) = shown {
        let _ = shown.join();
    }
    let library = library?;
    println!("joined library {library}; run `keel serve {library}` to sync it");
    Ok(library)
}

/// `keel merge` (and `pair join --merge`): what to merge into what.
pub(crate) struct Merge {
    /// The library carried over.
    pub(crate) source: String,
    /// The library it is merged into.
    pub(crate) lib: String,
    /// Only report what it would do.
    pub(crate) dry_run: bool,
    /// Print the report as JSON.
    pub(crate) json: bool,
}

/// Merges `merge.source` into `merge.lib` (both opened with `password`), with a bar on a
/// terminal, and prints the report.
pub(crate) fn merge(home: &Home, merge: &Merge, password: &str) -> Result<i32> {
    use std::io::IsTerminal;
    let source = Library::open(home, &merge.source, password)?;
    let into = Library::open(home, &merge.lib, password)?;
    let bar = crate::cli::bar(0, "merging", std::io::stderr().is_terminal());
    let report = into.merge_from(&source, merge.dry_run, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    source.close()?;
    into.close()?;
    if merge.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    let (verb, lib) = if report.dry_run {
        ("would merge", &merge.lib)
    } else {
        ("merged", &merge.lib)
    };
    println!(
        "{verb} {} into {lib}: {} changes, {} fields over another value{}",
        report.source,
        report.changes,
        report.conflicting,
        if report.resumed {
            " (went on from an interrupted merge)"
        } else {
            ""
        }
    );
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8}",
        "model", "source", "added", "updated", "unchanged", "became one", "left"
    );
    for m in &report.models {
        println!(
            "{:<20} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8}",
            m.model, m.source, m.added, m.updated, m.unchanged, m.became_one, m.left
        );
    }
    if report.conflicting > 0 && !report.dry_run {
        println!("see `keel conflicts {lib}` for the values kept as conflicts");
    }
    Ok(0)
}

/// `keel pair invite` on a running node.
pub(crate) fn invite(node: &Node, yes: bool, io: &mut dyn Io) -> Result<i32> {
    let mut handle = node.invite(yes)?;
    io.line(handle.code.as_str());
    if yes {
        io.line("the first device that proves this code will be accepted");
        return Ok(0);
    }
    let outcome = loop {
        let next = node.block_on(async {
            tokio::select! {
                question = handle.questions.recv() => Ok(question),
                outcome = &mut handle.outcome => Err(outcome),
            }
        })?;
        match next {
            Ok(Some(question)) => {
                let accepted = io.ask(&format!(
                    "accept device '{}' ({})? [y/N]",
                    question.name,
                    question.device.short()
                ));
                let _ = question.answer.send(accepted);
            }
            // No more questions (the invitation may have just succeeded): the outcome decides.
            Ok(None) => break node.block_on(&mut handle.outcome)?,
            Err(outcome) => break outcome,
        }
    };
    match outcome {
        Ok(Ok((device, name))) => {
            io.line(&format!("paired with '{name}' ({})", device.to_hex()));
            Ok(0)
        }
        Ok(Err(e)) => bail!("pairing failed: {e}"),
        Err(_) => bail!("the invitation ended"),
    }
}

/// `keel devices LIB [remove ID]`.
pub(crate) fn devices(
    lib: &Library,
    node: Option<&Node>,
    command: Option<DevicesCommand>,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    let file = DevicesFile::read(lib.dir())?;
    let records = lib.devices()?;
    let mut rows: Vec<(String, String, bool)> = records
        .iter()
        .map(|d| (d.device_id.clone(), d.name.clone(), false))
        .collect();
    for p in &file.paired {
        if !rows.iter().any(|r| r.0 == p.device_id) {
            rows.push((p.device_id.clone(), p.name.clone(), false));
        }
    }
    for r in &file.revoked {
        match rows.iter_mut().find(|row| row.0 == *r) {
            Some(row) => row.2 = true,
            None => rows.push((r.clone(), String::new(), true)),
        }
    }
    rows.sort();
    match command {
        None => {
            let me = lib.device_id().to_hex();
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(id, name, revoked)| {
                        serde_json::json!({
                            "device_id": id,
                            "name": name,
                            "revoked": revoked,
                            "this_device": *id == me,
                        })
                    })
                    .collect();
                io.line(&serde_json::to_string(&list)?);
            } else {
                for (id, name, revoked) in &rows {
                    let mut flags = String::new();
                    if *id == me {
                        flags.push_str(" (this device)");
                    }
                    if *revoked {
                        flags.push_str(" (revoked)");
                    }
                    io.line(&format!("{} {}{flags}", short(id), name));
                }
            }
        }
        Some(DevicesCommand::Remove { device }) => {
            let wanted = device.to_ascii_lowercase();
            let matches: Vec<&String> = rows
                .iter()
                .filter(|r| !r.2 && r.0.starts_with(&wanted))
                .map(|r| &r.0)
                .collect();
            let id = match matches.as_slice() {
                [one] => DeviceId::from_hex(one).context("a device id in the library")?,
                [] => bail!("no device {device} in this library"),
                _ => bail!("{device} matches several devices; give more digits"),
            };
            if id == lib.device_id() {
                bail!("this device cannot revoke itself");
            }
            match node {
                Some(node) => node.revoke(id)?,
                None => revoke_in(lib, id)?,
            }
            io.line(&format!("revoked {}", id.to_hex()));
        }
    }
    Ok(())
}
