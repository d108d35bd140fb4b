//! `keel untag`, `unnote`, `flag`, `tags`, `locations`, `libraries` and `conflicts`: the
//! everyday operations beside indexing, tagging and notes.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use keel_engine::{Home, Library, Scope};

use crate::cli::Io;

/// The everyday commands on a library.
#[derive(clap::Args, Debug)]
pub(crate) struct Target {
    /// Library name.
    pub(crate) lib: String,
    /// File or folder (or an entry uuid).
    pub(crate) path: PathBuf,
    /// Resolve the path in this device's locations (by name or start of id).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// The entry's own metadata, not its content's.
    #[arg(long)]
    pub(crate) entry: bool,
}

impl Target {
    fn scope(&self) -> Scope {
        if self.entry {
            Scope::Entry
        } else {
            Scope::Content
        }
    }
}

/// `keel tags LIB …`.
#[derive(Subcommand, Debug)]
pub(crate) enum TagsCommand {
    /// Rename a tag everywhere (its uses follow).
    Rename {
        /// Its name now.
        old: String,
        /// Its new name.
        new: String,
    },
    /// Set a tag's colour (none: clear it).
    Color {
        /// The tag.
        name: String,
        /// The colour, e.g. `#ffaa00`.
        color: Option<String>,
    },
}

/// `keel locations LIB …`.
#[derive(Subcommand, Debug)]
pub(crate) enum LocationsCommand {
    /// Remove one of this device's locations: its entries become tombstones on every device
    /// (the files stay on disk).
    Remove {
        /// The location's root path or uuid.
        location: String,
    },
}

/// `keel untag`.
pub(crate) fn untag(lib: &Library, target: &Target, tags: &[String]) -> Result<()> {
    let files = crate::cli::files_on(lib, target.device.as_deref())?;
    Ok(files.untag(&target.path, tags, target.scope())?)
}

/// `keel unnote`.
pub(crate) fn unnote(lib: &Library, target: &Target) -> Result<()> {
    let files = crate::cli::files_on(lib, target.device.as_deref())?;
    Ok(files.remove_note(&target.path, target.scope())?)
}

/// `keel flag`.
pub(crate) fn flag(
    lib: &Library,
    target: &Target,
    favorite: Option<bool>,
    hidden: Option<bool>,
) -> Result<()> {
    let files = crate::cli::files_on(lib, target.device.as_deref())?;
    Ok(files.set_flags(&target.path, target.scope(), favorite, hidden)?)
}

/// `keel tags`.
pub(crate) fn tags(
    lib: &Library,
    command: Option<TagsCommand>,
    json: bool,
    first: Option<usize>,
    io: &mut dyn Io,
) -> Result<()> {
    match (command, first) {
        (Some(TagsCommand::Rename { old, new }), _) => lib.rename_tag(&old, &new)?,
        (Some(TagsCommand::Color { name, color }), _) => {
            lib.recolor_tag(&name, color.as_deref())?
        }
        (None, Some(limit)) => {
            let (tags, total) = lib.first_tags(limit)?;
            if json {
                let page = serde_json::json!({ "tags": tags, "total": total });
                io.line(&page.to_string());
            } else {
                let more = total.saturating_sub(tags.len() as u64);
                print_tags(tags, io);
                if more > 0 {
                    io.line(&format!("and {more} more"));
                }
            }
        }
        (None, None) if json => io.line(&serde_json::to_string(&lib.tags()?)?),
        (None, None) => print_tags(lib.tags()?, io),
    }
    Ok(())
}

fn print_tags(tags: Vec<keel_engine::Tag>, io: &mut dyn Io) {
    for tag in tags {
        io.line(&format!("{} {}", tag.name, tag.color.unwrap_or_default()));
    }
}

/// `keel locations`.
pub(crate) fn locations(
    lib: &Library,
    command: Option<LocationsCommand>,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    if let Some(LocationsCommand::Remove { location }) = command {
        let uuid = match uuid::Uuid::parse_str(&location) {
            Ok(uuid) => uuid,
            Err(_) => {
                let path = std::path::absolute(&location)?;
                let path = path.canonicalize().unwrap_or(path);
                lib.files()
                    .location(&path)?
                    .ok_or_else(|| anyhow::anyhow!("{location} is not a location of this device"))?
                    .uuid
            }
        };
        let removed = lib.remove_location(uuid)?;
        io.line(&format!("removed the location and its {removed} entries"));
        return Ok(());
    }
    let devices = lib.devices()?;
    let listed: Vec<serde_json::Value> = lib
        .read(|p| p.query().locations())?
        .into_iter()
        .map(|l| {
            let device = devices
                .iter()
                .find(|d| d.uuid == l.device)
                .map(|d| d.name.clone());
            serde_json::json!({ "uuid": l.uuid, "path": l.path, "device": device })
        })
        .collect();
    if json {
        io.line(&serde_json::to_string(&listed)?);
    } else {
        for l in listed {
            io.line(&format!(
                "{} {} (on {})",
                l["uuid"].as_str().unwrap_or_default(),
                l["path"].as_str().unwrap_or_default(),
                l["device"].as_str().unwrap_or("an unknown device")
            ));
        }
    }
    Ok(())
}

/// `keel libraries`: the libraries of the home.
pub(crate) fn libraries(home: &Home, json: bool) -> Result<i32> {
    let names = home.libraries()?;
    if json {
        println!("{}", serde_json::to_string(&names)?);
    } else {
        for name in names {
            println!("{name}");
        }
    }
    Ok(0)
}

/// A field's value as JSON.
fn value_json(value: &keel_engine::schema::Value) -> serde_json::Value {
    use keel_engine::schema::Value;
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Text(t) => t.as_str().into(),
        Value::Bytes(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
        Value::Uuid(u) => u.to_string().into(),
    }
}

/// What `keel conflicts` does besides listing.
#[derive(Subcommand, Debug)]
pub(crate) enum ConflictsCommand {
    /// Resolve a conflict: its field gets the value kept, on every device.
    Resolve {
        /// The conflict's id.
        id: uuid::Uuid,
        /// The value to keep: a device of the conflict (its id or short id) for its value, or
        /// a value of the field's type.
        #[arg(long)]
        keep: String,
    },
    /// Set how conflicts are settled, on every device: `latest-wins` (the default),
    /// `prefer-device` (with --device) or `manual`.
    Strategy {
        /// The strategy.
        strategy: String,
        /// For `prefer-device`: the device (its name or id).
        #[arg(long)]
        device: Option<String>,
        /// Only for this model (a model's name, such as `tag`); else every model without one.
        #[arg(long)]
        model: Option<String>,
    },
}

/// The strategy `keel conflicts strategy` names.
fn strategy(lib: &Library, name: &str, device: Option<&str>) -> Result<keel_engine::Strategy> {
    Ok(match (name, device) {
        ("latest-wins", None) => keel_engine::Strategy::LatestWins,
        ("manual", None) => keel_engine::Strategy::Manual,
        ("prefer-device", Some(device)) => {
            let found = lib.device_named(device)?;
            let id = keel_engine::schema::DeviceId::from_hex(&found.device_id)
                .ok_or_else(|| anyhow::anyhow!("device {device} has a malformed id"))?;
            keel_engine::Strategy::PreferDevice(id)
        }
        ("prefer-device", None) => anyhow::bail!("prefer-device needs --device"),
        (other, _) => anyhow::bail!(
            "no strategy {other} (with these options): latest-wins, prefer-device --device D, manual"
        ),
    })
}

/// The value `keep` names for `conflict`: a side's device, else a value of the field's type.
fn kept(conflict: &keel_engine::Conflict, keep: &str) -> Result<keel_engine::schema::Value> {
    use keel_engine::schema::Value;
    let side = conflict
        .sides
        .iter()
        .find(|s| s.device.to_hex() == keep || s.device.short() == keep);
    if let Some(side) = side {
        return Ok(side.value.clone());
    }
    Ok(match &conflict.sides[0].value {
        Value::Int(_) => Value::Int(keep.parse()?),
        Value::Bool(_) => Value::Bool(keep.parse()?),
        _ => Value::Text(keep.into()),
    })
}

/// `keel conflicts`.
pub(crate) fn conflicts(
    lib: &Library,
    command: Option<ConflictsCommand>,
    json: bool,
    io: &mut dyn Io,
) -> Result<()> {
    match command {
        Some(ConflictsCommand::Resolve { id, keep }) => {
            let conflict = lib
                .conflicts()?
                .into_iter()
                .find(|c| c.id == id)
                .ok_or(keel_engine::EngineError::NoSuchConflict(id))?;
            lib.resolve_conflict(id, kept(&conflict, &keep)?)?;
            return Ok(());
        }
        Some(ConflictsCommand::Strategy {
            strategy: name,
            device,
            model,
        }) => {
            let chosen = strategy(lib, &name, device.as_deref())?;
            lib.set_conflict_strategy(model.as_deref(), chosen)?;
            return Ok(());
        }
        None => {}
    }
    for conflict in lib.conflicts()? {
        let sides: Vec<serde_json::Value> = conflict
            .sides
            .iter()
            .map(|side| {
                serde_json::json!({
                    "change": side.change.0.to_string(),
                    "device": side.device.to_hex(),
                    "written_ms": side.hlc.physical_ms,
                    "value": value_json(&side.value),
                })
            })
            .collect();
        if json {
            let line = serde_json::json!({
                "id": conflict.id.to_string(),
                "model": conflict.model,
                "record": conflict.record.to_string(),
                "field": conflict.field,
                "sides": sides,
                "winner": conflict.winner,
                "strategy": conflict.strategy,
                "position": conflict.position,
                "resolved_by": conflict.resolved.map(|(change, _)| change.0.to_string()),
            });
            io.line(&line.to_string());
            continue;
        }
        let [first, second] = &conflict.sides;
        io.line(&format!(
            "{} {}.{} of {}: {} ({}) vs {} ({}); {} won ({}){}",
            conflict.id,
            conflict.model,
            conflict.field,
            conflict.record,
            value_json(&first.value),
            first.device.short(),
            value_json(&second.value),
            second.device.short(),
            conflict.sides[conflict.winner].device.short(),
            conflict.strategy,
            if conflict.resolved.is_some() {
                "; resolved"
            } else {
                ""
            },
        ));
    }
    Ok(())
}
