//! Command-line parsing and the commands of `keel`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use keel_engine::{CreateOptions, EngineError, Entry, Home, KdfParams, Library, Scope};

/// Keel keeps a file library's metadata identical across your devices.
#[derive(Parser, Debug)]
#[command(name = "keel", version, about)]
struct Cli {
    /// Data folder (default: $KEEL_HOME, else ~/.keel).
    #[arg(long, global = true, env = "KEEL_HOME")]
    home: Option<PathBuf>,
    /// Read the library password from this file (one trailing newline is dropped), for
    /// services: it need not sit in the environment. Else KEEL_PASSWORD, else a prompt.
    #[arg(long, global = true, env = "KEEL_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create a library.
    Init {
        /// Library name.
        name: String,
    },
    /// Index a folder (added as a Location on first use).
    Index {
        /// Library name.
        lib: String,
        /// Folder to index (or a folder or file inside a location: that part of it).
        path: PathBuf,
        /// Re-identify contents: hash every file again, even one whose size and time match
        /// (PATH must be in a location of this device).
        #[arg(long)]
        rehash: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tag a file or folder (content scope by default): a path in any device's location, or an
    /// entry's uuid.
    Tag {
        /// Library name.
        lib: String,
        /// File or folder (or an entry uuid).
        path: PathBuf,
        /// Resolve the path in this device's locations (by name).
        #[arg(long)]
        device: Option<String>,
        /// Tags.
        #[arg(required = true)]
        tags: Vec<String>,
        /// Attach to this entry only, not to its content.
        #[arg(long)]
        entry: bool,
    },
    /// Set a note on a file or folder (content scope by default): a path in any device's
    /// location, or an entry's uuid.
    Note {
        /// Library name.
        lib: String,
        /// File or folder (or an entry uuid).
        path: PathBuf,
        /// Resolve the path in this device's locations (by name).
        #[arg(long)]
        device: Option<String>,
        /// The note.
        text: String,
        /// Attach to this entry only, not to its content.
        #[arg(long)]
        entry: bool,
    },
    /// Remove tags from a file or folder.
    Untag {
        #[command(flatten)]
        target: crate::everyday::Target,
        /// Tags.
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Remove the note of a file or folder.
    Unnote {
        #[command(flatten)]
        target: crate::everyday::Target,
    },
    /// Mark a file or folder favourite or hidden (or not).
    Flag {
        #[command(flatten)]
        target: crate::everyday::Target,
        /// Favourite (`true` or `false`).
        #[arg(long)]
        favorite: Option<bool>,
        /// Hidden (`true` or `false`).
        #[arg(long)]
        hidden: Option<bool>,
    },
    /// List the conflicts (two devices' writes to one field, neither of which saw the other),
    /// or resolve one.
    Conflicts {
        /// Library name.
        lib: String,
        #[command(subcommand)]
        command: Option<crate::everyday::ConflictsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tags, or rename or recolour one.
    Tags {
        /// Library name.
        lib: String,
        #[command(subcommand)]
        command: Option<crate::everyday::TagsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List only the first N tags by name, and how many there are (with `--json`: an
        /// object, `{"tags": [...], "total": T}`).
        #[arg(long, value_name = "N")]
        first: Option<usize>,
    },
    /// List the locations of every device, or remove one of this device's.
    Locations {
        /// Library name.
        lib: String,
        #[command(subcommand)]
        command: Option<crate::everyday::LocationsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the libraries of this home.
    Libraries {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List locations, or the entries of a folder.
    Ls {
        /// Library name.
        lib: String,
        /// Folder inside a location.
        path: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the library's jobs (running, paused, interrupted, and the finished history), or
    /// pause, resume or cancel one.
    Jobs {
        /// Library name.
        lib: String,
        #[command(subcommand)]
        command: Option<JobsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Find entries by words of their names or of their notes (the first search builds the
    /// index).
    Search {
        /// Library name.
        lib: String,
        /// The words (all must match, each as a word or a word's start).
        text: String,
        /// Entries shown at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an entry with its tags and notes in both scopes.
    Show {
        /// Library name.
        lib: String,
        /// File or folder.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the library's counters and digest.
    Status {
        /// Library name.
        lib: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the projection digest.
    Digest {
        /// Library name.
        lib: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge library SOURCE of this home into library LIB (both opened with the one password):
    /// contents of the same hash and tags of the same name become one, this device's locations
    /// and entries and every note and tag are carried over; a note LIB holds another value of
    /// is kept as a conflict. Merging again changes nothing; an interrupted merge goes on from
    /// its checkpoint when asked again. SOURCE is left as it was.
    Merge {
        /// The library carried over.
        source: String,
        /// The library it is merged into.
        lib: String,
        /// Report what it would do (counts per model), write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every journal record and compare the projections with a fresh replay; with
    /// `--against PEER` (on a running node), compare them with a connected device's instead,
    /// range by range.
    Verify {
        /// Library name.
        lib: String,
        /// A connected device (its name, or the start of its id): report the key ranges where
        /// the two devices' projections differ.
        #[arg(long, value_name = "PEER")]
        against: Option<String>,
        /// With `--against`: replace this device's rows of every differing range by the
        /// peer's (both must have applied the same log position). Without it, on a running
        /// node that follows: drop the log from its first damaged record on and fetch it again
        /// from the leader.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop the projections and rebuild them from the journal.
    Rebuild {
        /// Library name.
        lib: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compact the log: keep a snapshot of the projections and drop the log up to what every
    /// device has (on a running node, what they acknowledged; without one, only a library
    /// with no other device).
    Compact {
        /// Library name.
        lib: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show this device's vote floor (set when it cut its log at a damaged record: it votes
    /// only for logs reaching it), or forget it. Forget it only when every device that held
    /// the entries past the cut lost them too and no leader can be elected: entries no device
    /// holds are then lost for good. Stop `keel serve` first.
    VoteFloor {
        /// Library name.
        lib: String,
        /// Forget the floor.
        #[arg(long)]
        forget: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the library password (the key is rewrapped; the journal is not re-encrypted).
    /// The new password comes from KEEL_NEW_PASSWORD or a prompt.
    Passwd {
        /// Library name.
        lib: String,
    },
    /// Run a node: hold the library open, listen, connect to peers, and serve the other `keel`
    /// commands on this library through a control socket in its folder.
    Serve {
        /// Library name.
        lib: String,
        /// Address to listen on (QUIC/UDP).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// A peer to connect to, `HOST:PORT` (a name or an IP; repeatable; paired devices'
        /// addresses are remembered).
        #[arg(long = "peer", value_parser = resolve_addr)]
        peers: Vec<std::net::SocketAddr>,
        /// Most devices in the library.
        #[arg(long, default_value_t = keel_node::DEVICE_LIMIT_DEFAULT)]
        device_limit: usize,
        #[command(flatten)]
        lan: LanArgs,
        /// Do not follow this device's locations on disk (then only `keel index` updates them).
        #[arg(long, env = "KEEL_NO_WATCH", value_parser = clap::builder::BoolishValueParser::new())]
        no_watch: bool,
        /// Serve the web inspector and `/metrics` on ADDR (HTTP; 127.0.0.1 on a free port if
        /// no ADDR is given). It prints the address with the token that requests need.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:0")]
        gui: Option<std::net::SocketAddr>,
    },
    /// Follow this device's locations on disk without the network (a single device): files
    /// created, edited, moved and deleted become changes. Runs until Ctrl-C.
    Watch {
        /// Library name.
        lib: String,
    },
    /// Pair devices.
    Pair {
        #[command(subcommand)]
        command: PairCommand,
    },
    /// List the library's devices, or revoke one.
    Devices {
        /// Library name.
        lib: String,
        #[command(subcommand)]
        command: Option<DevicesCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the benchmarks.
    Bench(BenchArgs),
    /// Run the demo in a temporary home.
    Demo {
        /// Files in the generated tree (at least 40).
        #[arg(long, default_value_t = 3000)]
        files: usize,
    },
}

/// `keel bench`'s options (see `keel_bench::BenchOptions`).
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Smaller sizes (under five minutes).
    #[arg(long)]
    quick: bool,
    /// Only the steps whose name starts with this (p1 … p8, quic, watch, merge, push; `scale`
    /// runs only when named whole).
    #[arg(long)]
    only: Option<String>,
    /// Run this one step in this process (what `keel bench` runs each step as).
    #[arg(long, hide = true)]
    step: Option<String>,
    /// Files in P4's library.
    #[arg(long)]
    p4_files: Option<usize>,
    /// P4 joins by replaying the log instead of by snapshot (the older path).
    #[arg(long)]
    p4_replication_only: bool,
    /// P5's load, changes per second (default 1000).
    #[arg(long)]
    p5_rate: Option<u64>,
    /// P5's leader commits through its offline journal (the older path).
    #[arg(long)]
    p5_through_offline_journal: bool,
    /// P5 with the leader's inspector open in a browser (headless Chromium where installed, at
    /// idle priority unless KEEL_BROWSER_PRIORITY=normal) and a reader of its live stream.
    #[arg(long)]
    p5_inspector: bool,
    /// P6's rounds (one leader killed in each).
    #[arg(long)]
    p6_rounds: Option<usize>,
    /// Files in P7's library.
    #[arg(long)]
    p7_files: Option<usize>,
    /// Files in the scale run's library (`--only scale`: generate, replay, compact, join).
    #[arg(long)]
    scale_files: Option<usize>,
}

impl From<BenchArgs> for keel_bench::BenchOptions {
    fn from(a: BenchArgs) -> Self {
        Self {
            json: a.json,
            quick: a.quick,
            only: a.only,
            step: a.step,
            p4_files: a.p4_files,
            p4_replication_only: a.p4_replication_only,
            p5_rate: a.p5_rate,
            p5_through_offline_journal: a.p5_through_offline_journal,
            p5_inspector: a
                .p5_inspector
                .then(|| keel_bench::Observer(std::sync::Arc::new(crate::gui::watch_node))),
            p6_rounds: a.p6_rounds,
            p7_files: a.p7_files,
            scale_files: a.scale_files,
        }
    }
}

/// `keel pair …`.
#[derive(Subcommand, Debug)]
pub(crate) enum PairCommand {
    /// On a running node: print a pairing code (first line of stdout) and accept a device that
    /// proves it.
    Invite {
        /// Library name.
        lib: String,
        /// Accept the first device that proves the code, without asking; return at once.
        #[arg(long)]
        yes: bool,
    },
    /// On a new device: pair with a running node and set the library up in this home.
    Join {
        /// The inviting node's address, `HOST:PORT` (a name or an IP). Without it, the one
        /// device with an open invitation on the local network is found by mDNS.
        #[arg(long, value_parser = resolve_addr)]
        addr: Option<std::net::SocketAddr>,
        /// The code it printed.
        #[arg(long)]
        code: String,
        /// This device's name, shown to the inviting user.
        #[arg(long)]
        name: Option<String>,
        /// A library of this home to merge into the joined one once it has arrived (see
        /// `keel merge`); it is checked to open before pairing.
        #[arg(long)]
        merge: Option<String>,
        /// With `--merge`: join, then report what the merge would do without merging
        /// (`keel merge` does it later).
        #[arg(long, requires = "merge")]
        dry_run: bool,
        #[command(flatten)]
        lan: LanArgs,
    },
}

/// How `serve` and `pair join` use the local network to find devices (mDNS/DNS-SD).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LanArgs {
    /// Neither announce this device nor look for others on the local network.
    #[arg(long, env = "KEEL_NO_DISCOVERY", value_parser = clap::builder::BoolishValueParser::new())]
    no_discovery: bool,
    /// The UDP port mDNS runs on (a test, or a second setup on one machine, may use its own).
    #[arg(long, env = "KEEL_MDNS_PORT", default_value_t = keel_node::MDNS_PORT)]
    mdns_port: u16,
    /// Announce and look on the loopback interface only (devices on this machine).
    #[arg(long, env = "KEEL_MDNS_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    mdns_loopback: bool,
}

impl LanArgs {
    /// The node's discovery settings (`None`: off).
    pub(crate) fn discovery(&self) -> Option<keel_node::Discovery> {
        (!self.no_discovery).then_some(keel_node::Discovery {
            port: self.mdns_port,
            loopback_only: self.mdns_loopback,
        })
    }
}

/// `keel jobs LIB …`.
#[derive(Subcommand, Debug)]
pub(crate) enum JobsCommand {
    /// Pause a running job at its next checkpoint.
    Pause {
        /// The job's id.
        id: uuid::Uuid,
    },
    /// Resume a paused job, or run an interrupted one again (to its end).
    Resume {
        /// The job's id.
        id: uuid::Uuid,
    },
    /// Cancel a running, paused or interrupted job (what it committed stays).
    Cancel {
        /// The job's id.
        id: uuid::Uuid,
    },
}

/// `keel devices LIB …`.
#[derive(Subcommand, Debug)]
pub(crate) enum DevicesCommand {
    /// Revoke a device: it can no longer connect, and its Device record is deleted everywhere.
    Remove {
        /// Device id (hex, or a unique prefix).
        device: String,
    },
}

fn home_of(cli_home: Option<PathBuf>) -> Result<Home> {
    if let Some(h) = cli_home {
        return Ok(Home::new(h));
    }
    let base = std::env::var_os("HOME").context("no --home, KEEL_HOME or HOME set")?;
    Ok(Home::new(PathBuf::from(base).join(".keel")))
}

/// The `--password-file` of this run, set once at start.
static PASSWORD_FILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Longest password file read.
const PASSWORD_FILE_MAX: u64 = 4096;

fn password_from_file(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("password file {}", path.display()))?
        .len();
    if len > PASSWORD_FILE_MAX {
        bail!(
            "password file {} is {len} bytes; at most {PASSWORD_FILE_MAX}",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("password file {}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(text.to_string())
}

pub(crate) fn password() -> Result<String> {
    if let Some(Some(path)) = PASSWORD_FILE.get() {
        return password_from_file(path);
    }
    if let Ok(p) = std::env::var("KEEL_PASSWORD") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no password: set KEEL_PASSWORD or run on a terminal");
    }
    Ok(rpassword::prompt_password("Library password: ")?)
}

/// Argon2id parameters for new libraries; `KEEL_INSECURE_FAST_KDF=1` is for tests only.
pub(crate) fn kdf() -> KdfParams {
    if std::env::var("KEEL_INSECURE_FAST_KDF").is_ok_and(|v| v == "1") {
        KdfParams::INSECURE_FAST
    } else {
        KdfParams::RECOMMENDED
    }
}

fn open(home: &Home, lib: &str) -> Result<Library> {
    Ok(Library::open(home, lib, &password()?)?)
}

pub(crate) fn bar(total: u64, what: &str, terminal: bool) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if terminal {
        let style = ProgressStyle::with_template(&format!(
            "{what} {{msg}}{{bar:40}} {{pos}}/{{len}} {{per_sec}} ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// `args` with the command's path argument made absolute against the working directory (an
/// entry uuid given in its place is left as it is).
fn absolute_path_args(mut args: Vec<String>, command: &Command) -> Result<Vec<String>> {
    let path = match command {
        Command::Index { path, .. }
        | Command::Tag { path, .. }
        | Command::Note { path, .. }
        | Command::Show { path, .. } => Some(path),
        Command::Untag { target, .. }
        | Command::Unnote { target }
        | Command::Flag { target, .. } => Some(&target.path),
        Command::Ls { path, .. } => path.as_ref(),
        _ => None,
    };
    let Some(path) = path else {
        return Ok(args);
    };
    let Some(given) = path.to_str() else {
        return Ok(args);
    };
    if path.is_absolute() || uuid::Uuid::parse_str(given).is_ok() {
        return Ok(args);
    }
    let absolute = std::path::absolute(path)?;
    if let Some(arg) = args.iter_mut().find(|a| a.as_str() == given) {
        *arg = absolute.to_string_lossy().into_owned();
    }
    Ok(args)
}

/// The files of `lib` as device `device` has them (by name), or as resolved by default.
pub(crate) fn files_on<'a>(
    lib: &'a Library,
    device: Option<&str>,
) -> Result<keel_engine::Files<'a>> {
    Ok(match device {
        Some(name) => lib.files().on(lib.device_named(name)?.uuid),
        None => lib.files(),
    })
}

/// `keel jobs`: lists the jobs, or steers one.
fn jobs(lib: &Library, command: Option<JobsCommand>, json: bool, io: &mut dyn Io) -> Result<()> {
    match command {
        Some(JobsCommand::Pause { id }) => lib.pause_job(id)?,
        Some(JobsCommand::Resume { id }) => lib.resume_job(id)?,
        Some(JobsCommand::Cancel { id }) => lib.cancel_job(id)?,
        None if json => io.line(&serde_json::to_string(&lib.jobs()?)?),
        None => {
            for job in lib.jobs()? {
                let what = match &job.kind {
                    keel_engine::JobKind::Index { folder, .. } if folder.is_empty() => {
                        "index".to_string()
                    }
                    keel_engine::JobKind::Index { folder, .. } => format!("index {folder}"),
                    keel_engine::JobKind::Identify { folder, .. } => {
                        format!("re-identify {folder}").trim_end().to_string()
                    }
                    keel_engine::JobKind::Rebuild => "rebuild".into(),
                    keel_engine::JobKind::Verify => "verify".into(),
                    keel_engine::JobKind::CatchUp => "catch up".into(),
                    keel_engine::JobKind::Join { inviter } => format!("join from {inviter}"),
                    keel_engine::JobKind::Merge { source, .. } => format!("merge of {source}"),
                    keel_engine::JobKind::Compact { .. } => "compact".into(),
                    keel_engine::JobKind::Backfill { from, base } => {
                        format!("backfill from {} at {base}", short(from))
                    }
                };
                let state = serde_json::to_value(job.state)?;
                io.line(&format!(
                    "{} {:<11} {what}: {}/{} {}",
                    job.id,
                    state.as_str().unwrap_or("?"),
                    job.progress.done,
                    job.progress.total,
                    job.summary.unwrap_or_default()
                ));
            }
        }
    }
    Ok(())
}

fn entry_line(e: &Entry) -> String {
    let kind = match keel_engine::EntryKind::from_code(e.kind) {
        keel_engine::EntryKind::Directory => "dir ",
        keel_engine::EntryKind::Symlink => "link",
        keel_engine::EntryKind::File => "file",
    };
    format!("{kind} {:>12} {}", e.size, e.name)
}

/// Where a command's output goes: this terminal, or a `keel` client on the control socket.
pub(crate) trait Io {
    /// Prints one line of output.
    fn line(&mut self, text: &str);
    /// Asks the user a yes/no question (no answer is no).
    fn ask(&mut self, question: &str) -> bool;
    /// Whether progress bars make sense.
    fn terminal(&self) -> bool;
    /// Progress of a long command, for a caller that is not this process (a control-socket
    /// client draws it); this process draws its own bar.
    fn progress(&mut self, _what: &str, _done: u64, _total: u64) {}
}

/// This process's own stdout and stdin.
pub(crate) struct Terminal;

impl Io for Terminal {
    fn line(&mut self, text: &str) {
        println!("{text}");
    }

    fn ask(&mut self, question: &str) -> bool {
        ask_terminal(question)
    }

    fn terminal(&self) -> bool {
        std::io::stderr().is_terminal()
    }
}

/// Asks on this terminal; false without one.
pub(crate) fn ask_terminal(question: &str) -> bool {
    use std::io::Write;
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes")
}

impl Command {
    /// The library a command works on, if it works on one through the node.
    fn library(&self) -> Option<&str> {
        match self {
            Command::Index { lib, .. }
            | Command::Tag { lib, .. }
            | Command::Note { lib, .. }
            | Command::Ls { lib, .. }
            | Command::Search { lib, .. }
            | Command::Untag {
                target: crate::everyday::Target { lib, .. },
                ..
            }
            | Command::Unnote {
                target: crate::everyday::Target { lib, .. },
            }
            | Command::Flag {
                target: crate::everyday::Target { lib, .. },
                ..
            }
            | Command::Jobs { lib, .. }
            | Command::Tags { lib, .. }
            | Command::Conflicts { lib, .. }
            | Command::Locations { lib, .. }
            | Command::Show { lib, .. }
            | Command::Status { lib, .. }
            | Command::Digest { lib, .. }
            | Command::Verify { lib, .. }
            | Command::Rebuild { lib, .. }
            | Command::Compact { lib, .. }
            | Command::VoteFloor { lib, .. }
            | Command::Devices { lib, .. } => Some(lib),
            Command::Pair {
                command: PairCommand::Invite { lib, .. },
            } => Some(lib),
            _ => None,
        }
    }
}

/// Parses arguments given to a running node over its control socket.
pub(crate) fn parse_forwarded(args: &[String]) -> Result<Command, String> {
    Cli::try_parse_from(std::iter::once("keel".to_string()).chain(args.iter().cloned()))
        .map(|cli| cli.command)
        .map_err(|e| e.to_string())
}

pub(crate) fn run() -> Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = Cli::parse();
    let _ = PASSWORD_FILE.set(cli.password_file.clone());
    match cli.command {
        Command::Bench(args) => return keel_bench::run_bench(&args.into()),
        Command::Demo { files } => return keel_bench::run_demo(&keel_bench::DemoOptions { files }),
        _ => {}
    }
    let home = home_of(cli.home)?;
    match cli.command {
        Command::Init { name } => {
            let lib = Library::create(&home, &name, &password()?, CreateOptions { kdf: kdf() })?;
            println!("created library {name} ({})", lib.id());
            lib.close()?;
            Ok(0)
        }
        Command::Passwd { lib } => {
            let old = password()?;
            let new = match std::env::var("KEEL_NEW_PASSWORD") {
                Ok(p) => p,
                Err(_) if std::io::stdin().is_terminal() => {
                    let first = rpassword::prompt_password("New password: ")?;
                    let again = rpassword::prompt_password("New password again: ")?;
                    if first != again {
                        bail!("the new passwords differ");
                    }
                    first
                }
                Err(_) => bail!("no new password: set KEEL_NEW_PASSWORD or run on a terminal"),
            };
            // The recommended key derivation, whatever the library was made with (a library
            // made for tests moves to it).
            Library::change_password(&home, &lib, &old, &new, kdf())?;
            println!("password changed for {lib}");
            Ok(0)
        }
        Command::Serve {
            lib,
            listen,
            peers,
            device_limit,
            lan,
            no_watch,
            gui,
        } => {
            let library = open(&home, &lib)?;
            let options = keel_node::NodeOptions {
                listen,
                peers,
                device_limit,
                discovery: lan.discovery(),
                watch: (!no_watch).then(keel_engine::WatchOptions::default),
                ..keel_node::NodeOptions::default()
            };
            crate::serve::run(&home, library, options, gui)
        }
        Command::Watch { lib } => crate::serve::watch(open(&home, &lib)?),
        Command::Libraries { json } => crate::everyday::libraries(&home, json),
        Command::Pair {
            command:
                PairCommand::Join {
                    addr,
                    code,
                    name,
                    merge,
                    dry_run,
                    lan,
                },
        } => {
            let discovery = lan.discovery();
            if addr.is_none() && discovery.is_none() {
                bail!("no --addr and LAN discovery is off: give the inviting node's address");
            }
            let discovery = discovery.unwrap_or_default();
            let password = password()?;
            if let Some(source) = &merge {
                // Before the invitation is spent: the library to merge opens with this password.
                Library::open(&home, source, &password)?.close()?;
            }
            let joined = crate::serve::join(&home, addr, discovery, code, name, &password, kdf())?;
            match merge {
                Some(source) => {
                    let merge = crate::serve::Merge {
                        source,
                        lib: joined,
                        dry_run,
                        json: false,
                    };
                    crate::serve::merge(&home, &merge, &password)
                }
                None => Ok(0),
            }
        }
        Command::Merge {
            source,
            lib,
            dry_run,
            json,
        } => {
            let merge = crate::serve::Merge {
                source,
                lib,
                dry_run,
                json,
            };
            crate::serve::merge(&home, &merge, &password()?)
        }
        command => {
            let Some(lib) = command.library().map(str::to_string) else {
                return Ok(0);
            };
            // A running node holds the library: ask it, with paths made absolute here (the node
            // runs elsewhere; a path means what it means where the caller stands).
            let args = absolute_path_args(args, &command)?;
            if let Some(code) = crate::control::forward(&home.library_dir(&lib), &args)? {
                return Ok(code);
            }
            if matches!(command, Command::Pair { .. }) {
                bail!("`pair invite` needs a running node: start `keel serve {lib}` first");
            }
            let library = if matches!(command, Command::Rebuild { .. }) {
                // The rebuild replays aside while the live projection serves; one that does not
                // open is discarded first (and rebuilt by the open).
                let password = password()?;
                match Library::open(&home, &lib, &password) {
                    Err(EngineError::ProjectionAhead { .. } | EngineError::Projection(_)) => {
                        Library::open_rebuilding(&home, &lib, &password)?
                    }
                    opened => opened?,
                }
            } else {
                open(&home, &lib)?
            };
            let result = exec(&library, None, command, &mut Terminal);
            library.close()?;
            result
        }
    }
}

/// `keel verify --against PEER [--repair]`: the differing ranges, and what a repair wrote.
fn verify_against(
    node: &keel_node::Node,
    peer: &str,
    repair: bool,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    let report = node.verify_against(peer, repair)?;
    if json {
        io.line(&serde_json::to_string(&report)?);
        return Ok(());
    }
    let hex = |u: Option<uuid::Uuid>| u.map_or("…".to_string(), |u| u.simple().to_string());
    io.line(&format!(
        "compared {} models in {} ranges with {} (applied here {}, there {})",
        report.models,
        report.ranges_compared,
        &report.peer[..12.min(report.peer.len())],
        report.applied_here,
        report.applied_there
    ));
    for d in &report.differing {
        io.line(&format!(
            "differs: {} [{} .. {}) {} rows here, {} there",
            d.model,
            hex(d.start),
            hex(d.end),
            d.rows_here,
            d.rows_there
        ));
    }
    if report.differing.is_empty() {
        io.line("no difference");
    } else if report.repaired {
        io.line(&format!(
            "repaired {} ranges: {} rows written from the peer",
            report.differing.len(),
            report.rows_written
        ));
    }
    Ok(())
}

/// Runs a library command on an open library (directly, or in a node for a socket client).
pub(crate) fn exec(
    lib: &Library,
    node: Option<&keel_node::Node>,
    command: Command,
    io: &mut dyn Io,
) -> Result<i32> {
    match command {
        Command::Index {
            path, json, rehash, ..
        } => index(lib, &path, json, rehash, io)?,
        Command::Tag {
            path,
            tags,
            entry,
            device,
            ..
        } => {
            let scope = if entry { Scope::Entry } else { Scope::Content };
            files_on(lib, device.as_deref())?.tag(&path, &tags, scope)?;
        }
        Command::Note {
            path,
            text,
            entry,
            device,
            ..
        } => {
            let scope = if entry { Scope::Entry } else { Scope::Content };
            files_on(lib, device.as_deref())?.note(&path, &text, scope)?;
        }
        Command::Ls {
            path: None, json, ..
        } => crate::everyday::locations(lib, None, json, io)?,
        Command::Ls {
            path: Some(path),
            json,
            ..
        } => list_dir(lib, &path, json, io)?,
        Command::Jobs { command, json, .. } => jobs(lib, command, json, io)?,
        Command::Untag { target, tags } => crate::everyday::untag(lib, &target, &tags)?,
        Command::Unnote { target } => crate::everyday::unnote(lib, &target)?,
        Command::Flag {
            target,
            favorite,
            hidden,
        } => crate::everyday::flag(lib, &target, favorite, hidden)?,
        Command::Tags {
            command,
            json,
            first,
            ..
        } => crate::everyday::tags(lib, command, json, first, io)?,
        Command::Conflicts { command, json, .. } => {
            crate::everyday::conflicts(lib, command, json, io)?
        }
        Command::Locations { command, json, .. } => {
            crate::everyday::locations(lib, command, json, io)?
        }
        Command::Search {
            text, limit, json, ..
        } => search(lib, &text, limit, json, io)?,
        Command::Show { path, json, .. } => show(lib, &path, json, io)?,
        Command::Status { json, .. } => status(lib, node, json, io)?,
        Command::Digest { json: false, .. } => io.line(&lib.digest()?),
        Command::Digest { json: true, .. } => {
            io.line(&serde_json::json!({ "digest": lib.digest()? }).to_string())
        }
        Command::Verify {
            against: Some(peer),
            repair,
            json,
            ..
        } => {
            let Some(node) = node else {
                bail!("`verify --against` needs a running node: start `keel serve` first");
            };
            verify_against(node, &peer, repair, json, io)?;
        }
        Command::Verify { json: true, .. } => verify_json(lib, io)?,
        Command::Verify { repair, .. } => verify(lib, node, repair, io)?,
        Command::Rebuild { json, .. } => rebuild(lib, json, io)?,
        Command::Compact { json, .. } => compact(lib, node, json, io)?,
        Command::VoteFloor { forget, json, .. } => vote_floor(lib, node, forget, json, io)?,
        Command::Devices { command, json, .. } => {
            crate::serve::devices(lib, node, command, json, io)?;
        }
        Command::Pair {
            command: PairCommand::Invite { yes, .. },
        } => {
            let Some(node) = node else {
                bail!("`pair invite` needs a running node");
            };
            return crate::serve::invite(node, yes, io);
        }
        Command::Init { .. }
        | Command::Passwd { .. }
        | Command::Serve { .. }
        | Command::Watch { .. }
        | Command::Libraries { .. }
        | Command::Merge { .. }
        | Command::Pair { .. }
        | Command::Bench { .. }
        | Command::Demo { .. } => bail!("this command does not run on an open library"),
    }
    Ok(0)
}

/// `keel index`.
fn index(
    lib: &Library,
    path: &std::path::Path,
    json: bool,
    rehash: bool,
    io: &mut dyn Io,
) -> Result<()> {
    let bar = bar(0, "indexing", io.terminal() && !json);
    let mut progress = |p: keel_engine::IndexProgress| {
        // While the walk goes on, the total is only what was found so far.
        bar.set_message(if p.walking { "(still walking) " } else { "" });
        bar.set_length(p.total);
        bar.set_position(p.done);
        io.progress("indexing", p.done, p.total);
    };
    let report = if rehash {
        lib.reidentify(path, &mut progress)?
    } else {
        lib.index(path, &mut progress)?
    };
    bar.finish_and_clear();
    if json {
        io.line(&serde_json::to_string(&report)?);
        return Ok(());
    }
    io.line(&format!(
        "indexed {}: {} files, {} dirs; {} new, {} changed, {} moved, {} removed, {} unchanged in {:.2}s",
        path.display(),
        report.files,
        report.dirs,
        report.new,
        report.changed,
        report.moved,
        report.removed,
        report.unchanged,
        report.elapsed.as_secs_f64()
    ));
    Ok(())
}

/// `keel ls PATH`: the entries of a folder, by name.
fn list_dir(lib: &Library, path: &std::path::Path, json: bool, io: &mut dyn Io) -> Result<()> {
    let r = lib.files().resolve(path)?;
    let dir = if r.name.is_empty() {
        r.relative_path
    } else if r.relative_path.is_empty() {
        r.name
    } else {
        format!("{}/{}", r.relative_path, r.name)
    };
    let mut children = lib.read(|p| p.query().children(r.location.uuid, &dir))?;
    children.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        io.line(&serde_json::to_string(&children)?);
    }
    for e in children.iter().filter(|_| !json) {
        io.line(&entry_line(e));
    }
    Ok(())
}

/// `keel search`.
fn search(lib: &Library, text: &str, limit: usize, json: bool, io: &mut dyn Io) -> Result<()> {
    let hits = lib.search(text, limit)?;
    if json {
        io.line(&serde_json::to_string(&hits)?);
    }
    for hit in hits.iter().filter(|_| !json) {
        let by = match hit.matched {
            keel_engine::SearchMatch::Name => "name",
            keel_engine::SearchMatch::Note => "note",
        };
        io.line(&format!("{by} {}", entry_line(&hit.entry)));
    }
    Ok(())
}

/// `keel verify --json`: the checks as one JSON object; an error if any failed.
fn verify_json(lib: &Library, io: &mut dyn Io) -> Result<()> {
    let (report, digest) = lib.verify_with(&mut |done, total| {
        io.progress("verifying", done, total);
    })?;
    let faults: Vec<String> = report
        .faults
        .iter()
        .map(|(place, reason)| format!("{place}: {reason}"))
        .collect();
    let value = serde_json::json!({
        "log_records": report.log_records,
        "local_records": report.local_records,
        "faults": faults,
        "digest": digest.as_ref().ok(),
        "mismatch": digest.as_ref().err().map(|e| e.to_string()),
    });
    io.line(&value.to_string());
    if !faults.is_empty() || digest.is_err() {
        bail!("the library failed its checks");
    }
    Ok(())
}

/// `keel verify [--repair]`, for a person: a progress bar, each bad record, the totals.
fn verify(
    lib: &Library,
    node: Option<&keel_node::Node>,
    repair: bool,
    io: &mut dyn Io,
) -> Result<()> {
    if repair && node.is_none() {
        bail!("`verify --repair` needs a running node (it fetches from the leader, or with `--against` from that peer): start `keel serve` first");
    }
    let bar = bar(0, "verifying", io.terminal());
    let (report, digest) = lib.verify_with(&mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        io.progress("verifying", done, total);
    })?;
    bar.finish_and_clear();
    for (place, reason) in &report.faults {
        io.line(&format!("bad record at {place}: {reason}"));
    }
    if let (true, false, Some(node)) = (repair, report.faults.is_empty(), node) {
        if let Some(from) = node.repair_log()? {
            io.line(&format!(
                "the log from position {from} on is dropped and fetched again from the leader"
            ));
            return Ok(());
        }
    }
    io.line(&format!(
        "{} log records, {} local records, {} faults",
        report.log_records,
        report.local_records,
        report.faults.len()
    ));
    let digest = digest?;
    io.line(&format!("projections match a fresh replay: {digest}"));
    if !report.faults.is_empty() {
        bail!(
            "{} journal records failed their checks",
            report.faults.len()
        );
    }
    Ok(())
}

/// `keel rebuild`.
fn rebuild(lib: &Library, json: bool, io: &mut dyn Io) -> Result<()> {
    let bar = bar(0, "replaying", io.terminal() && !json);
    let report = lib.rebuild(&mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        io.progress("replaying", done, total);
    })?;
    bar.finish_and_clear();
    if json {
        let value = serde_json::json!({ "changes": report.changes, "digest": lib.digest()? });
        io.line(&value.to_string());
        return Ok(());
    }
    io.line(&format!(
        "rebuilt from {} changes; digest {}",
        report.changes,
        lib.digest()?
    ));
    Ok(())
}

/// `keel vote-floor`.
fn vote_floor(
    lib: &Library,
    node: Option<&keel_node::Node>,
    forget: bool,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    if forget && node.is_some() {
        bail!("a running node holds the vote floor: stop `keel serve` first");
    }
    let floor = if forget {
        lib.forget_vote_floor()?
    } else {
        lib.vote_floor()?
    };
    if json {
        let value = floor.map(|(counter, device, at)| {
            serde_json::json!({ "epoch": counter, "by": device.to_hex(), "position": at })
        });
        io.line(
            &serde_json::json!({ "vote_floor": value, "forgotten": forget && floor.is_some() })
                .to_string(),
        );
        return Ok(());
    }
    io.line(&match (floor, forget) {
        (None, _) => "no vote floor: this device never cut its log".to_string(),
        (Some((counter, device, at)), false) => format!(
            "vote floor: position {at} of epoch {counter} (by {}); this device votes only for logs reaching it",
            device.short()
        ),
        (Some((counter, _, at)), true) => format!(
            "forgot the vote floor (position {at} of epoch {counter}): entries past it that no device holds are lost"
        ),
    });
    Ok(())
}

fn status(
    lib: &Library,
    node: Option<&keel_node::Node>,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    let s = lib.status()?;
    let n = node.map(|n| n.status());
    if json {
        let mut value = serde_json::to_value(&s)?;
        if let (Some(n), Some(map)) = (&n, value.as_object_mut()) {
            // The node's fields as it serializes them (roles by name, epochs in hex).
            let serde_json::Value::Object(node) = serde_json::to_value(n)? else {
                anyhow::bail!("a node status that is not a JSON object");
            };
            for key in [
                "role",
                "epoch",
                "leader",
                "peers",
                "offline",
                "listen",
                "compactable",
                "horizon",
                "behind_compaction",
                "storage_failed",
                "joining",
            ] {
                if let Some(field) = node.get(key) {
                    map.insert(key.into(), field.clone());
                }
            }
        }
        io.line(&serde_json::to_string(&value)?);
        return Ok(());
    }
    io.line(&format!("library   {} ({})", s.name, s.library_id));
    io.line(&format!("device    {}", s.device_id));
    io.line(&format!(
        "rows      {} devices, {} locations, {} entries, {} contents, {} metadata, {} tags, {} tag links",
        s.counts.devices,
        s.counts.locations,
        s.counts.entries,
        s.counts.content_identities,
        s.counts.user_metadata,
        s.counts.tags,
        s.counts.user_metadata_tags
    ));
    io.line(&format!(
        "journal   {} local changes, {} pending, {} in log after position {}; applied up to {}",
        s.journal.local_changes,
        s.journal.offline,
        s.journal.log_len,
        s.journal.compacted_to,
        s.applied_lsn
    ));
    if let Some(at) = s.journal.snapshot_waiting_at {
        io.line(&format!(
            "          a snapshot at position {at} waits for every device to acknowledge it"
        ));
    }
    if s.journal.dropped_log_pages > 0 {
        io.line(&format!(
            "          {} pages of a dropped log still being deleted",
            s.journal.dropped_log_pages
        ));
    }
    let mb = |bytes: u64| bytes as f64 / 1e6;
    io.line(&format!(
        "disk      {:.1} MB: journal {:.1}, projections {:.1}, snapshot {:.1}, other {:.1}",
        mb(s.disk.total()),
        mb(s.disk.journal),
        mb(s.disk.projections),
        mb(s.disk.snapshot),
        mb(s.disk.other)
    ));
    if let Some(n) = n {
        io.line(&format!(
            "node      {} in epoch {} ({}), leader {}, listening on {}, {} to push",
            n.role,
            n.epoch.counter,
            short(&n.epoch.device.to_hex()),
            n.leader.as_deref().map(short).unwrap_or("none"),
            n.listen,
            n.offline
        ));
        if let Some(h) = n.horizon {
            io.line(&format!(
                "horizon   every device has passed {} ms.{}: tombstones before it are collected \
                 at the next compaction",
                h.ms, h.counter
            ));
        }
        if !n.horizon_waits_for.is_empty() {
            let devices: Vec<&str> = n.horizon_waits_for.iter().map(|d| short(d)).collect();
            io.line(&format!(
                "horizon   none yet: waiting for the clock floor of {} (away, or paired and not \
                 joined yet; revoking a device that will not come back lets collection go on)",
                devices.join(", ")
            ));
        }
        if n.behind_compaction > 0 {
            io.line(&format!(
                "behind    the leader compacted its log up to {}, which this device lacks: \
                 it backfills from the leader's snapshot (`keel jobs` shows how far)",
                n.behind_compaction
            ));
        }
        if n.storage_failed {
            io.line(
                "storage   FAILED: the journal could not be opened again after a write failed; \
                 replication is stopped and commits are refused until it can (retried every 100 ms)",
            );
        }
        for j in &n.joining {
            io.line(&format!(
                "joining   {} initial sync: file {:.1} of {:.1} MB, log {} of {}",
                short(&j.device_id),
                mb(j.file_sent),
                mb(j.file_bytes),
                j.log_sent,
                j.log_end
            ));
        }
        for p in &n.peers {
            let stored = p
                .stored
                .map(|lsn| format!(", stored to {lsn}"))
                .unwrap_or_default();
            io.line(&format!(
                "peer      {} {} {}{stored}",
                short(&p.device_id),
                p.addr.as_deref().unwrap_or("-"),
                if p.connected {
                    "connected"
                } else {
                    "not connected"
                }
            ));
        }
    }
    io.line(&format!("digest    {}", s.digest));
    Ok(())
}

/// The first 8 hex digits of a device id.
pub(crate) fn short(hex: &str) -> &str {
    hex.get(..8).unwrap_or(hex)
}

fn show(lib: &Library, path: &Path, json: bool, io: &mut dyn Io) -> Result<()> {
    let entry = lib.files().entry(path)?;
    let md = lib.files().metadata(&entry)?;
    let scope_json = |s: &Option<(keel_engine::UserMetadata, Vec<keel_engine::Tag>)>| match s {
        Some((m, tags)) => serde_json::json!({
            "uuid": m.uuid.to_string(),
            "notes": m.notes,
            "favorite": m.favorite,
            "hidden": m.hidden,
            "tags": tags.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        }),
        None => serde_json::Value::Null,
    };
    let value = serde_json::json!({
        "uuid": entry.uuid.map(|u| u.to_string()),
        "name": entry.name,
        "relative_path": entry.relative_path,
        "kind": entry.kind,
        "size": entry.size,
        "modified_ms": entry.modified_ms,
        "content": entry.content.map(|u| u.to_string()),
        "entry_metadata": scope_json(&md.entry),
        "content_metadata": scope_json(&md.content),
    });
    if json {
        io.line(&value.to_string());
        return Ok(());
    }
    io.line(&entry_line(&entry));
    if let Some(c) = entry.content {
        io.line(&format!("content   {c}"));
    }
    for (label, scope) in [("entry", &md.entry), ("content", &md.content)] {
        if let Some((m, tags)) = scope {
            let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
            io.line(&format!(
                "{label:<9} tags [{}] note {}",
                names.join(", "),
                m.notes.as_deref().unwrap_or("-")
            ));
        }
    }
    Ok(())
}

/// Resolves `HOST:PORT` (a host name or an IP literal) to its first address, for `--peer` and
/// `--addr`.
fn resolve_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// `keel compact`: through the node when one runs (it knows what every device acknowledged);
/// without one, only a library whose only device is this one.
fn compact(
    lib: &Library,
    node: Option<&keel_node::Node>,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    let report = match node {
        Some(node) => node.compact()?,
        None => {
            let me = lib.device_id().to_hex();
            let others = lib
                .devices()?
                .into_iter()
                .filter(|d| d.device_id != me)
                .count();
            if others > 0 {
                bail!(
                    "the library has {others} other device(s): compact on a running node \
                     (`keel serve`), which knows what they have"
                );
            }
            let last = lib.status()?.journal.last_lsn;
            lib.compact(keel_engine::Lsn(last))?
        }
    };
    if json {
        io.line(&serde_json::to_string(&report)?);
    } else if let Some(at) = report.waiting_at {
        io.line(&format!(
            "nothing compacted yet: a snapshot at position {at} waits for every device to \
             acknowledge it (the node puts it in place then)"
        ));
    } else if report.dropped == 0 {
        io.line(&format!(
            "nothing to compact: the log starts after position {}",
            report.base
        ));
    } else {
        io.line(&format!(
            "compacted to position {}: {} log records dropped, snapshot {:.1} MB",
            report.base,
            report.dropped,
            report.snapshot_bytes as f64 / 1e6
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24: `--peer` and `pair join --addr` take host names as well as IP literals.
    #[test]
    fn addresses_may_be_host_names() {
        let addr = resolve_addr("localhost:7700").expect("resolves");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 7700);
        assert_eq!(
            resolve_addr("192.0.2.1:9").expect("parses"),
            "192.0.2.1:9".parse().expect("addr")
        );
        assert!(resolve_addr("no port here").is_err());
        let cli = Cli::try_parse_from([
            "keel",
            "pair",
            "join",
            "--addr",
            "localhost:7701",
            "--code",
            "1234-5678",
        ])
        .expect("parses a host name");
        assert!(matches!(
            cli.command,
            Command::Pair {
                command: PairCommand::Join { addr: Some(addr), .. }
            } if addr.port() == 7701
        ));
    }
}
