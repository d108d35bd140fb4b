//! The web inspector of `keel serve --gui ADDR`: a page for the library's operator (devices,
//! the log, jobs, conflicts, locations and tags), its JSON, live updates, and Prometheus
//! metrics, on one HTTP listener (loopback by default).
//!
//! The page reads the same JSON the commands print (`keel status --json`, `jobs`, `conflicts`,
//! `locations`, `tags`, `ls`): each request runs the command on the node, as the control socket
//! does, so the inspector shows nothing the command line does not. Everything under `/api/`
//! and `/events` needs the token `serve` prints (stored 0600 as `gui.token` in the library
//! folder), as an `Authorization: Bearer` header: reads show the library's content, and POSTs
//! change it. The page itself and `/metrics` (counts only) do not.
//!
//! Bounds: at most [`HANDLERS_MAX`] requests are served at once (others get 503), of which at
//! most [`STREAMS_MAX`] live streams; a URL longer than [`URL_LEN_MAX`] is refused; no request
//! body is read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_node::Node;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::cli::{exec, parse_forwarded, Io};

/// The token's file name in the library folder.
pub(crate) const TOKEN_FILE: &str = "gui.token";
/// Requests served at once.
const HANDLERS_MAX: usize = 16;
/// Live streams (`/events`) at once.
const STREAMS_MAX: usize = 4;
/// Longest URL accepted.
const URL_LEN_MAX: usize = 2048;
/// How often a live stream looks for a change.
const STREAM_EVERY: Duration = Duration::from_millis(250);
/// Least time between two states sent when only positions moved (jobs and conflicts go at once).
const SEND_EVERY: Duration = Duration::from_secs(1);
/// Most tags, conflicts and locations in the state (each list also gives its length): the
/// state is sent twice a second while the library changes, and drawn each time.
const LISTED_MAX: usize = 100;
/// The nice value of the inspector's threads (see [`yield_to_the_node`]).
#[cfg(target_os = "linux")]
const INSPECTOR_NICE: i32 = 19;
/// A comment on a quiet stream this often, so that a gone client is noticed.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("gui/page.html");
const SCRIPT: &str = include_str!("gui/app.js");
const STYLE: &str = include_str!("gui/app.css");

/// A running inspector; stops when dropped.
pub(crate) struct Gui {
    server: Arc<Server>,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The token that state-changing requests carry.
    pub(crate) token: String,
    token_path: PathBuf,
}

/// What each request handler shares.
struct Shared {
    node: Arc<Node>,
    lib: String,
    token: String,
    handlers: AtomicUsize,
    streams: AtomicUsize,
    stopping: Arc<AtomicBool>,
}

impl Gui {
    /// Listens on `addr` for the node serving library `lib` in `dir`, with a new token.
    pub(crate) fn start(dir: &Path, lib: &str, node: Arc<Node>, addr: SocketAddr) -> Result<Self> {
        let server = Arc::new(
            Server::http(addr)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("the inspector cannot listen on {addr}"))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .context("the inspector listens on no IP address")?;
        let token = new_token();
        let token_path = dir.join(TOKEN_FILE);
        write_private(&token_path, token.as_bytes())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            node,
            lib: lib.to_string(),
            token: token.clone(),
            handlers: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            stopping: stopping.clone(),
        });
        let thread = {
            let (server, shared) = (server.clone(), shared.clone());
            std::thread::Builder::new()
                .name("keel-gui".into())
                .spawn(move || accept(&server, &shared))
                .context("no thread for the inspector")?
        };
        Ok(Self {
            server,
            shared,
            stopping,
            thread: Some(thread),
            addr,
            token,
            token_path,
        })
    }
}

impl Drop for Gui {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Requests under way end soon (a live stream at its next look): they hold the node.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.handlers.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.token_path);
    }
}

/// 32 random bytes in hex.
fn new_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", hex::encode(a.as_bytes()), hex::encode(b.as_bytes()))
}

/// Writes `bytes` to `path`, readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

fn accept(server: &Server, shared: &Arc<Shared>) {
    yield_to_the_node();
    for request in server.incoming_requests() {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        if shared.handlers.fetch_add(1, Ordering::SeqCst) >= HANDLERS_MAX {
            shared.handlers.fetch_sub(1, Ordering::SeqCst);
            let _ = request.respond(text(503, "busy"));
            continue;
        }
        let held = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("keel-gui-request".into())
            .spawn(move || {
                handle(request, &held);
                held.handlers.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The request went with the closure (its connection closes); its slot comes back.
            shared.handlers.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("no thread for an inspector request; dropped");
        }
    }
}

/// Lowers the calling thread's priority (Linux: its nice value; the threads it starts inherit
/// it): the inspector is an observer, and its work (building states, answering a page) waits
/// for the node's (sequencing, storing, applying) when both want a core.
fn yield_to_the_node() {
    #[cfg(target_os = "linux")]
    if let Err(error) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), INSPECTOR_NICE)
    {
        tracing::debug!(%error, "the inspector runs at the node's priority");
    }
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn text(status: u16, body: &str) -> Reply {
    Response::from_string(body).with_status_code(status)
}

/// A response header; every name and value here is a constant of this module.
fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .unwrap_or_else(|()| panic!("a header of this module is not valid: {name}: {value}"))
}

fn typed(body: &str, content_type: &str) -> Reply {
    Response::from_string(body)
        .with_header(header("Content-Type", content_type))
        .with_header(header(
            "Content-Security-Policy",
            "default-src 'self'; frame-ancestors 'none'",
        ))
        .with_header(header("Cache-Control", "no-store"))
}

fn handle(request: Request, shared: &Shared) {
    if request.url().len() > URL_LEN_MAX {
        let _ = request.respond(text(414, "URL too long"));
        return;
    }
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = request.method().clone();
    let open = matches!(path, "/" | "/app.js" | "/app.css" | "/metrics");
    if !open && !authorized(&request, &shared.token) {
        let reply = text(401, "a token is needed: the one `keel serve --gui` printed")
            .with_header(header("WWW-Authenticate", "Bearer"));
        let _ = request.respond(reply);
        return;
    }
    let reply = match (method, path) {
        (Method::Get, "/") => typed(PAGE, "text/html; charset=utf-8"),
        (Method::Get, "/app.js") => typed(SCRIPT, "text/javascript; charset=utf-8"),
        (Method::Get, "/app.css") => typed(STYLE, "text/css; charset=utf-8"),
        (Method::Get, "/metrics") => typed(
            &crate::metrics::render(&shared.node),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (Method::Get, "/api/state") => json(&state(shared)),
        (Method::Get, "/api/ls") => json(&ls(shared, query)),
        (Method::Get, "/api/show") => json(&show(shared, query)),
        (Method::Get, "/events") => return stream(request, shared),
        (Method::Post, path) if path.starts_with("/api/") => act(shared, path),
        (Method::Get | Method::Post, _) => text(404, "not found"),
        _ => text(405, "method not allowed"),
    };
    let _ = request.respond(reply);
}

/// Whether `request` carries the token (compared in constant time).
fn authorized(request: &Request, token: &str) -> bool {
    let given = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn json(value: &serde_json::Value) -> Reply {
    typed(&value.to_string(), "application/json")
}

/// The output of a command run on the node, as the control socket runs it.
struct Captured {
    lines: Vec<String>,
}

impl Io for Captured {
    fn line(&mut self, text: &str) {
        self.lines.push(text.to_string());
    }

    fn ask(&mut self, _question: &str) -> bool {
        // Nothing the inspector runs asks; if one did, no answer is no.
        false
    }

    fn terminal(&self) -> bool {
        false
    }
}

/// Runs `args` on the node; its output lines, or the error.
fn run(shared: &Shared, args: &[&str]) -> Result<Vec<String>, String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    let command = parse_forwarded(&args)?;
    let mut io = Captured { lines: Vec::new() };
    match exec(shared.node.library(), Some(&shared.node), command, &mut io) {
        Ok(0) => Ok(io.lines),
        Ok(code) => Err(format!("exit {code}: {}", io.lines.join(" "))),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The JSON a command prints, as one array: its one line if that is an array, else its lines
/// (or `{"error": …}`).
fn lines_json(shared: &Shared, args: &[&str]) -> serde_json::Value {
    match run(shared, args) {
        Ok(lines) => {
            let mut values: Vec<serde_json::Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            match values.as_slice() {
                [serde_json::Value::Array(_)] => values.swap_remove(0),
                _ => serde_json::Value::Array(values),
            }
        }
        Err(e) => serde_json::json!({ "error": e }),
    }
}

/// Everything the page shows but the entries: the node's status (as `keel status --json` shows
/// it, without the digest, which reads the whole projection), jobs, conflicts, locations, tags.
fn state(shared: &Shared) -> serde_json::Value {
    state_with(shared, acts(shared))
}

/// What an operator acts on: the jobs and the conflicts (the first [`LISTED_MAX`], and how
/// many), as `[jobs, conflicts, conflicts_total]`. Cheaper than the whole state: a live
/// stream looks at it often and builds the rest only when it sends.
fn acts(shared: &Shared) -> [serde_json::Value; 3] {
    let lib = shared.lib.as_str();
    let (conflicts, total) = first(lines_json(shared, &["conflicts", lib, "--json"]));
    [
        lines_json(shared, &["jobs", lib, "--json"]),
        conflicts,
        total.into(),
    ]
}

/// The whole state around `acts` (see [`acts`]).
fn state_with(shared: &Shared, acts: [serde_json::Value; 3]) -> serde_json::Value {
    let lib = shared.lib.as_str();
    let library = shared.node.library();
    let node = serde_json::to_value(shared.node.status()).unwrap_or_default();
    let (sent, received) = shared.node.wire_bytes();
    let [jobs, conflicts, conflicts_total] = acts;
    let (locations, locations_total) = first(lines_json(shared, &["locations", lib, "--json"]));
    let listed = LISTED_MAX.to_string();
    let tags = lines_json(shared, &["tags", lib, "--json", "--first", &listed]);
    let (tags, tags_total) = tags_page(tags);
    serde_json::json!({
        "library": lib,
        "device_id": library.device_id().to_hex(),
        "applied_lsn": library.sync_state().applied_lsn().0,
        "wire_bytes": { "sent": sent, "received": received },
        "node": node,
        "jobs": jobs,
        "conflicts": conflicts,
        "conflicts_total": conflicts_total,
        "locations": locations,
        "locations_total": locations_total,
        "tags": tags,
        "tags_total": tags_total,
    })
}

/// The first [`LISTED_MAX`] items of a list, and its length (an error stays as it is).
fn first(list: serde_json::Value) -> (serde_json::Value, usize) {
    match list {
        serde_json::Value::Array(mut items) => {
            let total = items.len();
            items.truncate(LISTED_MAX);
            (serde_json::Value::Array(items), total)
        }
        other => (other, 0),
    }
}

/// The tags and their total from `keel tags --first` (an error stays as it is).
fn tags_page(printed: serde_json::Value) -> (serde_json::Value, u64) {
    match printed {
        serde_json::Value::Array(mut one) if one.len() == 1 => {
            let mut page = one.swap_remove(0);
            let total = page["total"].as_u64().unwrap_or(0);
            (page["tags"].take(), total)
        }
        other => (other, 0),
    }
}

/// The `path=` of a query, decoded.
fn path_of(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("path="))
        .map(percent_decode)
}

/// `keel show` of the entry `path=` names: its tags and note.
fn show(shared: &Shared, query: &str) -> serde_json::Value {
    let Some(path) = path_of(query) else {
        return serde_json::json!({ "error": "which entry? (path=)" });
    };
    let shown = lines_json(shared, &["show", shared.lib.as_str(), &path, "--json"]);
    match shown {
        serde_json::Value::Array(mut one) if one.len() == 1 => one.swap_remove(0),
        other => other,
    }
}

/// `keel ls` of the folder `path=` names (the locations when none).
fn ls(shared: &Shared, query: &str) -> serde_json::Value {
    let path = path_of(query);
    let lib = shared.lib.as_str();
    match path.as_deref() {
        Some(p) if !p.is_empty() => lines_json(shared, &["ls", lib, p, "--json"]),
        _ => lines_json(shared, &["ls", lib, "--json"]),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A POST: `/api/jobs/ID/pause|resume|cancel`, `/api/conflicts/ID/keep/DEVICE`.
fn act(shared: &Shared, path: &str) -> Reply {
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let lib = shared.lib.as_str();
    let args: Vec<&str> = match parts.as_slice() {
        ["jobs", id, action @ ("pause" | "resume" | "cancel")] => vec!["jobs", lib, action, id],
        ["conflicts", id, "keep", device] => {
            vec!["conflicts", lib, "resolve", id, "--keep", device]
        }
        _ => return text(404, "no such action"),
    };
    tracing::info!(action = %path, "inspector request");
    match run(shared, &args) {
        Ok(lines) => json(&serde_json::json!({ "ok": true, "output": lines })),
        Err(e) => text(400, &e),
    }
}

/// Server-sent events: the state (as `/api/state`) each time it changes, written straight to
/// the connection (no chunking: the response ends when the connection closes).
fn stream(request: Request, shared: &Shared) {
    if shared.streams.fetch_add(1, Ordering::SeqCst) >= STREAMS_MAX {
        shared.streams.fetch_sub(1, Ordering::SeqCst);
        let _ = request.respond(text(503, "too many live views"));
        return;
    }
    let mut writer = request.into_writer();
    let _ = send_events(&mut *writer, shared);
    shared.streams.fetch_sub(1, Ordering::SeqCst);
}

/// Writes the stream until the client goes or the inspector stops.
fn send_events(writer: &mut dyn std::io::Write, shared: &Shared) -> std::io::Result<()> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
          Connection: close\r\n\r\n",
    )?;
    writer.flush()?;
    let (mut last, mut last_acts) = (String::new(), String::new());
    let mut last_at = Instant::now();
    let mut built_at = Instant::now()
        .checked_sub(SEND_EVERY)
        .unwrap_or_else(Instant::now);
    while !shared.stopping.load(Ordering::Relaxed) {
        // What an operator acts on goes out at once; the rest (positions that move with every
        // change) at most once a second, and is built only then.
        let looked = acts(shared);
        let acts_now = serde_json::Value::from(looked.to_vec()).to_string();
        let due = acts_now != last_acts || built_at.elapsed() >= SEND_EVERY;
        let now = if due {
            built_at = Instant::now();
            state_with(shared, looked).to_string()
        } else {
            String::new()
        };
        if due && now != last {
            writer.write_all(format!("data: {now}\n\n").as_bytes())?;
            writer.flush()?;
            (last, last_acts) = (now, acts_now);
            last_at = Instant::now();
        } else if last_at.elapsed() >= KEEPALIVE_EVERY {
            writer.write_all(b": still here\n\n")?;
            writer.flush()?;
            last_at = Instant::now();
        }
        std::thread::sleep(STREAM_EVERY);
    }
    Ok(())
}

/// How long a browser started by [`watch_node`] gets to load the page before the load begins.
const BROWSER_SETTLE: Duration = Duration::from_secs(4);

/// For `keel bench --p5-inspector`: the inspector on `node` with a browser on it (headless
/// Chromium, `KEEL_CHROMIUM` or `/usr/bin/chromium`, where there is one) and a reader of its
/// live stream, until the returned value is dropped.
pub(crate) fn watch_node(node: Arc<Node>) -> Result<Box<dyn std::any::Any>> {
    let dir = node.library().dir().to_path_buf();
    let lib = node.library().name().to_string();
    let gui = Gui::start(&dir, &lib, node, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let chromium = std::env::var_os("KEEL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let browser = chromium.exists().then(|| {
        browser_command(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .arg(format!("http://{}/#token={}", gui.addr, gui.token))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    });
    let browser = browser.transpose().context("Chromium does not start")?;
    if browser.is_some() {
        // A browser that has loaded the page and settled, not one starting up (which takes
        // both cores of a small machine for a second or two).
        std::thread::sleep(BROWSER_SETTLE);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (addr, token, stop) = (gui.addr, gui.token.clone(), stop.clone());
        std::thread::spawn(move || read_stream(addr, &token, &stop))
    };
    Ok(Box::new(Watching {
        browser,
        stop,
        reader: Some(reader),
        _gui: gui,
    }))
}

/// Where `chrt` (util-linux) runs the browser under.
const CHRT: &str = "/usr/bin/chrt";

/// The command that starts `chromium`: at idle priority (`SCHED_IDLE`, through `chrt`) unless
/// `KEEL_BROWSER_PRIORITY=normal`. An operator's browser is usually on another machine; on the
/// node's own two cores at normal priority it takes them from the node while it draws, which
/// P5 measured as about 1 ms at p99 whatever the page (decision 0067).
fn browser_command(chromium: &std::path::Path) -> std::process::Command {
    let normal = std::env::var("KEEL_BROWSER_PRIORITY").is_ok_and(|p| p == "normal");
    if normal || !std::path::Path::new(CHRT).exists() {
        return std::process::Command::new(chromium);
    }
    let mut command = std::process::Command::new(CHRT);
    command.args(["--idle", "0"]).arg(chromium);
    command
}

/// Reads the live stream at `addr` until `stop` (counts its bytes, as a browser would read them).
fn read_stream(addr: SocketAddr, token: &str, stop: &AtomicBool) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let request =
        format!("GET /events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let (mut buf, mut read) = ([0u8; 16 * 1024], 0u64);
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    read
}

/// What [`watch_node`] keeps running; stops it all when dropped (the browser first).
struct Watching {
    browser: Option<std::process::Child>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<u64>>,
    _gui: Gui,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(browser) = &mut self.browser {
            let _ = browser.kill();
            let _ = browser.wait();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let read = reader.join().unwrap_or(0);
            tracing::debug!(bytes = read, "the inspector's live stream was read");
        }
    }
}
