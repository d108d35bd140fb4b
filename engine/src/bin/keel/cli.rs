//! Command-line parsing and the commands of `keel`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use keel_engine::{CreateOptions, Entry, Home, KdfParams, Library, Scope};

/// Keel keeps a file library's metadata identical across your devices.
#[derive(Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    /// Data folder (default: $KEEL_HOME, else ~/.keel).
    #[arg(long, global = true, env = "KEEL_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a library.
    Init {
        /// Library name.
        name: String,
    },
    /// Index a folder (added as a Location on first use).
    Index {
        /// Library name.
        lib: String,
        /// Folder to index.
        path: PathBuf,
    },
    /// Tag a file or folder (content scope by default).
    Tag {
        /// Library name.
        lib: String,
        /// File or folder.
        path: PathBuf,
        /// Tags.
        #[arg(required = true)]
        tags: Vec<String>,
        /// Attach to this entry only, not to its content.
        #[arg(long)]
        entry: bool,
    },
    /// Set a note on a file or folder (content scope by default).
    Note {
        /// Library name.
        lib: String,
        /// File or folder.
        path: PathBuf,
        /// The note.
        text: String,
        /// Attach to this entry only, not to its content.
        #[arg(long)]
        entry: bool,
    },
    /// List locations, or the entries of a folder.
    Ls {
        /// Library name.
        lib: String,
        /// Folder inside a location.
        path: Option<PathBuf>,
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
    },
    /// Check every journal record and compare the projections with a fresh replay.
    Verify {
        /// Library name.
        lib: String,
    },
    /// Drop the projections and rebuild them from the journal.
    Rebuild {
        /// Library name.
        lib: String,
    },
    /// Change the library password (the key is rewrapped; the journal is not re-encrypted).
    /// The new password comes from KEEL_NEW_PASSWORD or a prompt.
    Passwd {
        /// Library name.
        lib: String,
    },
    /// Run the benchmarks.
    Bench {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Smaller sizes (under five minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Run the demo in a temporary home.
    Demo,
}

fn home_of(cli_home: Option<PathBuf>) -> Result<Home> {
    if let Some(h) = cli_home {
        return Ok(Home::new(h));
    }
    let base = std::env::var_os("HOME").context("no --home, KEEL_HOME or HOME set")?;
    Ok(Home::new(PathBuf::from(base).join(".keel")))
}

fn password() -> Result<String> {
    if let Ok(p) = std::env::var("KEEL_PASSWORD") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no password: set KEEL_PASSWORD or run on a terminal");
    }
    Ok(rpassword::prompt_password("Library password: ")?)
}

/// Argon2id parameters for new libraries; `KEEL_INSECURE_FAST_KDF=1` is for tests only.
fn kdf() -> KdfParams {
    if std::env::var("KEEL_INSECURE_FAST_KDF").is_ok_and(|v| v == "1") {
        KdfParams::INSECURE_FAST
    } else {
        KdfParams::RECOMMENDED
    }
}

fn open(home: &Home, lib: &str) -> Result<Library> {
    Ok(Library::open(home, lib, &password()?)?)
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if std::io::stderr().is_terminal() {
        let style = ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn entry_line(e: &Entry) -> String {
    let kind = match keel_engine::EntryKind::from_code(e.kind) {
        keel_engine::EntryKind::Directory => "dir ",
        keel_engine::EntryKind::Symlink => "link",
        keel_engine::EntryKind::File => "file",
    };
    format!("{kind} {:>12} {}", e.size, e.name)
}

pub(crate) fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { json, quick } => return crate::bench::run(json, quick),
        Command::Demo => return crate::demo::run(),
        _ => {}
    }
    let home = home_of(cli.home)?;
    match cli.command {
        Command::Init { name } => {
            let lib = Library::create(&home, &name, &password()?, CreateOptions { kdf: kdf() })?;
            println!("created library {name} ({})", lib.id());
            lib.close()?;
        }
        Command::Index { lib, path } => {
            let lib = open(&home, &lib)?;
            let bar = bar(0, "indexing");
            let report = lib.index(&path, &mut |p| {
                bar.set_length(p.total);
                bar.set_position(p.done);
            })?;
            bar.finish_and_clear();
            println!(
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
            );
            lib.close()?;
        }
        Command::Tag {
            lib,
            path,
            tags,
            entry,
        } => {
            let lib = open(&home, &lib)?;
            let scope = if entry { Scope::Entry } else { Scope::Content };
            lib.tag_path(&path, &tags, scope)?;
            lib.close()?;
        }
        Command::Note {
            lib,
            path,
            text,
            entry,
        } => {
            let lib = open(&home, &lib)?;
            let scope = if entry { Scope::Entry } else { Scope::Content };
            lib.note_path(&path, &text, scope)?;
            lib.close()?;
        }
        Command::Ls { lib, path } => {
            let lib = open(&home, &lib)?;
            match path {
                None => {
                    for l in lib.read(|p| p.locations())? {
                        println!("{} {}", l.uuid, l.path);
                    }
                }
                Some(path) => {
                    let r = lib.resolve(&path)?;
                    let dir = if r.name.is_empty() {
                        r.relative_path
                    } else if r.relative_path.is_empty() {
                        r.name
                    } else {
                        format!("{}/{}", r.relative_path, r.name)
                    };
                    let mut children = lib.read(|p| p.children(r.location.uuid, &dir))?;
                    children.sort_by(|a, b| a.name.cmp(&b.name));
                    for e in children {
                        println!("{}", entry_line(&e));
                    }
                }
            }
            lib.close()?;
        }
        Command::Show { lib, path, json } => {
            let lib = open(&home, &lib)?;
            show(&lib, &path, json)?;
            lib.close()?;
        }
        Command::Status { lib, json } => {
            let lib = open(&home, &lib)?;
            let s = lib.status()?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("library   {} ({})", s.name, s.library_id);
                println!("device    {}", s.device_id);
                println!(
                    "rows      {} devices, {} locations, {} entries, {} contents, {} metadata, {} tags, {} tag links",
                    s.counts.devices,
                    s.counts.locations,
                    s.counts.entries,
                    s.counts.content_identities,
                    s.counts.user_metadata,
                    s.counts.tags,
                    s.counts.user_metadata_tags
                );
                println!(
                    "journal   {} local changes, {} pending, {} in log; applied up to {}",
                    s.journal.local_changes,
                    s.journal.pending_local,
                    s.journal.log_len,
                    s.applied_lsn
                );
                println!("digest    {}", s.digest);
            }
            lib.close()?;
        }
        Command::Digest { lib } => {
            let lib = open(&home, &lib)?;
            println!("{}", lib.digest()?);
            lib.close()?;
        }
        Command::Verify { lib } => {
            let lib = open(&home, &lib)?;
            let (report, digest) = lib.verify()?;
            for (place, reason) in &report.faults {
                println!("bad record at {place}: {reason}");
            }
            println!(
                "{} log records, {} local records, {} faults",
                report.log_records,
                report.local_records,
                report.faults.len()
            );
            let digest = digest?;
            println!("projections match a fresh replay: {digest}");
            lib.close()?;
            if !report.faults.is_empty() {
                bail!(
                    "{} journal records failed their checks",
                    report.faults.len()
                );
            }
        }
        Command::Rebuild { lib } => {
            let lib = Library::open_rebuilding(&home, &lib, &password()?)?;
            let bar = bar(0, "replaying");
            let report = lib.rebuild(&mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!(
                "rebuilt from {} changes; digest {}",
                report.changes,
                lib.digest()?
            );
            lib.close()?;
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
            Library::change_password(&home, &lib, &old, &new)?;
            println!("password changed for {lib}");
        }
        Command::Bench { .. } | Command::Demo => {}
    }
    Ok(0)
}

fn show(lib: &Library, path: &Path, json: bool) -> Result<()> {
    let entry = lib.entry_at_path(path)?;
    let md = lib.metadata_of(&entry)?;
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
        println!("{value}");
        return Ok(());
    }
    println!("{}", entry_line(&entry));
    if let Some(c) = entry.content {
        println!("content   {c}");
    }
    for (label, scope) in [("entry", &md.entry), ("content", &md.content)] {
        if let Some((m, tags)) = scope {
            let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
            println!(
                "{label:<9} tags [{}] note {}",
                names.join(", "),
                m.notes.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}
