//! The control socket: while `keel serve` holds a library, the other `keel` commands on it are
//! sent to the node through `control.sock` in the library folder (a Unix socket readable by its
//! owner only) and run there.
//!
//! Protocol: JSON lines. The client sends `{"args": [...]}` (its command line); the node answers
//! with any number of `{"out": line}`, `{"err": line}` and `{"ask": question}` (the client
//! answers `{"answer": bool}`), then `{"exit": code}`.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use keel_node::Node;
use serde::{Deserialize, Serialize};

use crate::cli::{exec, parse_forwarded, Io};

/// The socket's file name in the library folder.
pub(crate) const SOCKET_FILE: &str = "control.sock";
/// Longest request line accepted.
const REQUEST_LEN_MAX: u64 = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Request {
    args: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply {
    Out(String),
    Err(String),
    Ask(String),
    /// Progress of a long command: what, done, total.
    Progress(String, u64, u64),
    Exit(i32),
}

/// Shortest time between two progress replies.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Serialize, Deserialize)]
struct Answer {
    answer: bool,
}

/// Sends the command line to the node serving the library in `dir`, if one runs. Returns its
/// exit code, or `None` when no node answers (the caller opens the library itself).
pub(crate) fn forward(dir: &Path, args: &[String]) -> Result<Option<i32>> {
    let path = dir.join(SOCKET_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let Ok(mut stream) = UnixStream::connect(&path) else {
        // A socket left by a node that was killed: nobody holds the library.
        return Ok(None);
    };
    let request = serde_json::to_string(&Request {
        args: args.to_vec(),
    })?;
    writeln!(stream, "{request}").context("sending to the node")?;
    let mut reader = BufReader::new(stream.try_clone().context("control socket")?);
    let mut line = String::new();
    // The node's progress, drawn here as this process would draw its own.
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .context("reading from the node")?
            == 0
        {
            anyhow::bail!("the node closed the control connection");
        }
        match serde_json::from_str::<Reply>(&line).context("a reply from the node")? {
            Reply::Out(text) => println!("{text}"),
            Reply::Err(text) => eprintln!("{text}"),
            Reply::Ask(question) => {
                let answer = crate::cli::ask_terminal(&question);
                writeln!(stream, "{}", serde_json::to_string(&Answer { answer })?)?;
            }
            Reply::Progress(what, done, total) => {
                let bar = bar.get_or_insert_with(|| {
                    crate::cli::bar(total, &what, std::io::stderr().is_terminal())
                });
                bar.set_length(total);
                bar.set_position(done);
            }
            Reply::Exit(code) => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                return Ok(Some(code));
            }
        }
    }
}

/// The node's end of one client connection.
struct SocketIo {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// When progress was last sent.
    progressed: Option<std::time::Instant>,
}

impl SocketIo {
    fn send(&mut self, reply: &Reply) {
        if let Ok(text) = serde_json::to_string(reply) {
            let _ = writeln!(self.writer, "{text}");
            let _ = self.writer.flush();
        }
    }
}

impl Io for SocketIo {
    fn line(&mut self, text: &str) {
        self.send(&Reply::Out(text.into()));
    }

    fn ask(&mut self, question: &str) -> bool {
        self.send(&Reply::Ask(question.into()));
        let mut line = String::new();
        if self.reader.read_line(&mut line).is_err() {
            return false;
        }
        serde_json::from_str::<Answer>(&line)
            .map(|a| a.answer)
            .unwrap_or(false)
    }

    fn terminal(&self) -> bool {
        false
    }

    fn progress(&mut self, what: &str, done: u64, total: u64) {
        let due = self
            .progressed
            .is_none_or(|at| at.elapsed() >= PROGRESS_EVERY || done == total);
        if due {
            self.progressed = Some(std::time::Instant::now());
            self.send(&Reply::Progress(what.into(), done, total));
        }
    }
}

/// The listening socket of a node; removed when dropped.
pub(crate) struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds the socket in `dir` (owner-only) and serves requests on `node`, one thread each.
    pub(crate) fn start(dir: &Path, node: Arc<Node>) -> Result<Self> {
        let path = dir.join(SOCKET_FILE);
        if UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "another node already serves this library ({})",
                path.display()
            );
        }
        let _ = std::fs::remove_file(&path);
        // The library folder is the owner's alone (it holds the journal too), so the socket is
        // never reachable by others, not even before its own mode is set.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        std::thread::Builder::new()
            .name("keel-control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let node = node.clone();
                    let _ = std::thread::Builder::new()
                        .name("keel-control-client".into())
                        .spawn(move || serve_client(stream, &node));
                }
            })?;
        Ok(Self { path })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a client's request: one line of at most [`REQUEST_LEN_MAX`] bytes, JSON. `None` for
/// anything else (the client is told so and the connection ends).
fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    std::io::Read::take(reader, REQUEST_LEN_MAX)
        .read_line(&mut line)
        .ok()?;
    serde_json::from_str::<Request>(&line).ok()
}

/// Fuzzing entry (`cfg(fuzzing)` only): `data` as the bytes a client sends, read and parsed as
/// `serve_client` does. Returns whether the request parsed to a command. Checks what must hold
/// of any input: nothing past the first line or past [`REQUEST_LEN_MAX`] bytes is read into the
/// request, and a command line that parses once parses again to the same command (`keel` never
/// gets two readings).
#[cfg(fuzzing)]
pub fn fuzz_request(data: &[u8]) -> bool {
    let first_line = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let read = read_request(&mut BufReader::new(data)).map(|r| r.args);
    let end = first_line.min(REQUEST_LEN_MAX as usize);
    let expected = std::str::from_utf8(&data[..end])
        .ok()
        .and_then(|line| serde_json::from_str::<Request>(line).ok())
        .map(|r| r.args);
    assert_eq!(read, expected, "a request read from past its line or limit");
    let Some(args) = read else {
        return false;
    };
    let parsed = parse_forwarded(&args);
    let again = parse_forwarded(&args);
    assert_eq!(
        format!("{parsed:?}"),
        format!("{again:?}"),
        "one command line, two readings"
    );
    parsed.is_ok()
}

fn serve_client(stream: UnixStream, node: &Node) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut io = SocketIo {
        writer: stream,
        reader: BufReader::new(read_half),
        progressed: None,
    };
    let request = match read_request(&mut io.reader) {
        Some(r) => r,
        None => {
            io.send(&Reply::Err("error: malformed control request".into()));
            io.send(&Reply::Exit(2));
            return;
        }
    };
    let code = match parse_forwarded(&request.args) {
        Err(usage) => {
            io.send(&Reply::Err(usage.trim_end().into()));
            2
        }
        Ok(command) => match exec(node.library(), Some(node), command, &mut io) {
            Ok(code) => code,
            Err(err) => {
                let text = format!("{err:#}").replace('\n', " ");
                io.send(&Reply::Err(format!("error: {text}")));
                1
            }
        },
    };
    io.send(&Reply::Exit(code));
}
