//! On-disk layout of a Keel home, `library.toml`, and the device identity.

use std::path::{Path, PathBuf};

use keel_journal::{ChainedKey, WrappedKey};
use keel_schema::{DeviceId, LibraryId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{io_at, EngineError};

/// Version of `library.toml` this build writes.
pub const LIBRARY_CONFIG_VERSION: u32 = 1;
/// Largest `library.toml` read (a bigger file is not ours).
const CONFIG_LEN_MAX: u64 = 64 * 1024;

/// A Keel home folder: `device/` and `libraries/<name>.keel/`, and the models its libraries
/// open with: Keel's, and those a host app registers ([`Home::with_model`]).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
    models: keel_schema::Registry,
}

impl Home {
    /// A home at `root` (created on first use), with Keel's models.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            models: keel_schema::Registry::builtin().clone(),
        }
    }

    /// This home with host model `M` registered: every library it opens or creates syncs `M`
    /// (its table, dependency order, clocks, tombstones and digest), and records `M`'s code in
    /// the library (see [`keel_schema::RegisteredModel`]). Register a model after the models it
    /// references. Refused as [`keel_schema::Registry::with`] refuses.
    pub fn with_model<M: keel_schema::Syncable>(mut self) -> Result<Self, EngineError> {
        self.models = self.models.with::<M>()?;
        Ok(self)
    }

    /// The models its libraries open with.
    pub fn models(&self) -> &keel_schema::Registry {
        &self.models
    }

    /// The home folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of library `name`.
    pub fn library_dir(&self, name: &str) -> PathBuf {
        self.root.join("libraries").join(format!("{name}.keel"))
    }

    /// The names of the libraries in this home.
    pub fn libraries(&self) -> Result<Vec<String>, EngineError> {
        let dir = self.root.join("libraries");
        let Ok(read) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = read
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".keel"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// This home's device identity (a key pair and self-signed certificate; the device id is the
    /// SHA-256 of the certificate), created on first use with owner-only permissions.
    pub fn device(&self) -> Result<DeviceIdentity, EngineError> {
        let dir = self.root.join("device");
        let path = dir.join("identity.toml");
        let bad = |reason: String| EngineError::BadDeviceIdentity {
            path: path.clone(),
            reason,
        };
        if path.exists() {
            let text = read_small(&path)?;
            let parsed: DeviceIdentityFile =
                toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let cert = hex::decode(&parsed.cert).map_err(|e| bad(format!("cert: {e}")))?;
            let key = hex::decode(&parsed.key).map_err(|e| bad(format!("key: {e}")))?;
            let id = DeviceId::of_certificate(&cert);
            if DeviceId::from_hex(&parsed.device_id) != Some(id) {
                return Err(bad("device_id is not the SHA-256 of the certificate".into()));
            }
            return Ok(DeviceIdentity {
                id,
                name: parsed.name,
                cert_der: cert,
                key_der: key,
            });
        }
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_at(&dir))?;
        }
        let name = default_device_name();
        let certified = rcgen::generate_simple_self_signed(vec![format!("{name}.keel")])
            .map_err(|e| bad(e.to_string()))?;
        let cert = certified.cert.der().to_vec();
        let key = certified.key_pair.serialize_der();
        let id = DeviceId::of_certificate(&cert);
        let file = DeviceIdentityFile {
            device_id: id.to_hex(),
            name: name.clone(),
            cert: hex::encode(&cert),
            key: hex::encode(&key),
        };
        let text = toml::to_string(&file).map_err(|e| bad(e.to_string()))?;
        write_private(&path, text.as_bytes())?;
        Ok(DeviceIdentity {
            id,
            name,
            cert_der: cert,
            key_der: key,
        })
    }
}

fn default_device_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this device".into())
}

/// This device's identity: what it proves itself with on the network (the node builds its TLS
/// identity from these bytes).
#[derive(Clone)]
pub struct DeviceIdentity {
    /// The device id (SHA-256 of the certificate).
    pub id: DeviceId,
    /// A readable name.
    pub name: String,
    /// The self-signed certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER. Never logged (see the `Debug` impl).
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("cert_der", &format_args!("{} bytes", self.cert_der.len()))
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct DeviceIdentityFile {
    device_id: String,
    name: String,
    /// Certificate, DER, hex.
    cert: String,
    /// PKCS#8 private key, DER, hex.
    key: String,
}

/// `library.toml`: the library's ids and its wrapped key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LibraryConfig {
    /// File version.
    pub version: u32,
    /// Library name.
    pub name: String,
    /// Library id.
    pub library_id: Uuid,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// The library key wrapped under the password (Argon2id parameters and salt inside).
    pub key: WrappedKey,
    /// The library's other keys (from rotations), each sealed under `key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotated: Vec<ChainedKey>,
    /// A check value of the key `key` wraps (16 bytes of a keyed BLAKE3 hash, hex), so that a key
    /// a host keeps in its keychain is checked before use ([`crate::Library::open_with_library_key`]).
    /// Written at creation, or the next time the library opens with its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

impl LibraryConfig {
    /// The typed library id.
    pub fn library(&self) -> LibraryId {
        LibraryId(self.library_id)
    }

    /// Reads and checks `library.toml` in `dir`.
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("library.toml");
        if !path.exists() {
            return Err(EngineError::MissingConfig(dir.to_path_buf()));
        }
        let text = read_small(&path)?;
        Self::parse(&text, &path)
    }

    /// Parses and checks the text of a `library.toml` (`path` names it in errors): its version
    /// and its key derivation parameters (bounded before anything derives a key with them).
    pub fn parse(text: &str, path: &Path) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let config: LibraryConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if config.version > LIBRARY_CONFIG_VERSION {
            return Err(bad(format!(
                "version {} is newer than this build ({LIBRARY_CONFIG_VERSION})",
                config.version
            )));
        }
        config.key.kdf.check().map_err(|e| bad(e.to_string()))?;
        Ok(config)
    }

    /// Writes `library.toml` in `dir` atomically (temp file, fsync, rename).
    pub fn write(&self, dir: &Path) -> Result<(), EngineError> {
        let path = dir.join("library.toml");
        let text = toml::to_string_pretty(self).map_err(|e| EngineError::BadConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_private(&path, text.as_bytes())
    }
}

/// Makes a library folder its owner's alone: the folder 0700, and the files in it that hold
/// library data 0600 (the wrapped key, the journal, the projections and their WAL). New files
/// inherit nothing from the folder, but nobody else can reach them through it.
pub(crate) fn make_private(dir: &Path) -> Result<(), EngineError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |path: &Path, mode: u32| -> Result<(), EngineError> {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(EngineError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }),
            }
        };
        set(dir, 0o700)?;
        for file in [
            "library.toml",
            crate::library::JOURNAL_FILE,
            crate::library::PROJECTIONS_FILE,
            "projections.sqlite-wal",
            "projections.sqlite-shm",
        ] {
            set(&dir.join(file), 0o600)?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn read_small(path: &Path) -> Result<String, EngineError> {
    let meta = std::fs::metadata(path).map_err(io_at(path))?;
    if meta.len() > CONFIG_LEN_MAX {
        return Err(EngineError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("file is {} bytes, larger than any Keel config", meta.len()),
        });
    }
    let bytes = std::fs::read(path).map_err(io_at(path))?;
    String::from_utf8(bytes).map_err(|_| EngineError::BadConfig {
        path: path.to_path_buf(),
        reason: "not UTF-8".into(),
    })
}

/// Like [`write_atomic`], but the file is created readable by its owner only (the device's
/// private key), never visible with wider permissions.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    write_with_mode(path, bytes, 0o600)
}

/// Writes a file so that a crash leaves either the old or the new content (a synced temporary
/// file renamed over it, then the folder synced).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    write_with_mode(path, bytes, 0o644)
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EngineError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp).map_err(io_at(&tmp))?;
        file.write_all(bytes).map_err(io_at(&tmp))?;
        file.sync_all().map_err(io_at(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    if let Some(parent) = path.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Whether `name` is a usable library name.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
