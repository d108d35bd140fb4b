//! Walking a folder for the indexer: every path under a root, symlinks not followed, each
//! directory's entries sorted by name, and each entry's metadata read relative to its open
//! directory (one short lookup per file instead of resolving its full path again).

use std::fs::{self, FileType, Metadata};
use std::path::{Path, PathBuf};

/// One path found by [`walk`].
pub(crate) struct Found {
    /// The full path.
    pub(crate) path: PathBuf,
    /// The folder holding it, relative to the root, `/`-separated (empty at the root).
    pub(crate) relative_path: String,
    /// Its file name.
    pub(crate) name: String,
    /// Its type (a symlink is reported as one, never followed).
    pub(crate) file_type: FileType,
    /// Its metadata (of the link itself for a symlink).
    pub(crate) metadata: Metadata,
}

/// Calls `found` for every path under `root` (not `root` itself): a directory's entries in name
/// order, then its subdirectories' in the same way, depth first. A path that cannot be read goes
/// to `skipped` and is left out (with everything under it). At most one directory is open at a
/// time, however deep the tree.
#[cfg(test)]
pub(crate) fn walk(
    root: &Path,
    found: &mut dyn FnMut(Found),
    skipped: &mut dyn FnMut(&Path, std::io::Error),
) {
    walk_under(root, &[String::new()], found, skipped);
}

/// [`walk`] of the folders (or files) `scopes` under `root` (relative, `/`-separated; empty for
/// the root itself), with paths still relative to `root`: each scope itself (but the root),
/// then, for a folder, what it holds. The scopes must not nest.
pub(crate) fn walk_under(
    root: &Path,
    scopes: &[String],
    found: &mut dyn FnMut(Found),
    skipped: &mut dyn FnMut(&Path, std::io::Error),
) {
    // Folders to read: the root, and each scope that is a folder (a file scope is only itself).
    let mut folders: Vec<&String> = Vec::new();
    for scope in scopes {
        if scope.is_empty() {
            folders.push(scope);
            continue;
        }
        let path = root.join(scope);
        match fs::symlink_metadata(&path) {
            Ok(metadata) => {
                let (relative_path, name) = match scope.rsplit_once('/') {
                    Some((parent, name)) => (parent.to_string(), name.to_string()),
                    None => (String::new(), scope.clone()),
                };
                if metadata.is_dir() {
                    folders.push(scope);
                }
                found(Found {
                    path,
                    relative_path,
                    name,
                    file_type: metadata.file_type(),
                    metadata,
                });
            }
            Err(e) => skipped(&path, e),
        }
    }
    // Directories still to read, the next one last.
    let mut pending: Vec<(PathBuf, String)> = folders
        .into_iter()
        .rev()
        .map(|scope| (root.join(scope), scope.clone()))
        .collect();
    while let Some((dir, relative)) = pending.pop() {
        let read = match fs::read_dir(&dir) {
            Ok(read) => read,
            Err(e) => {
                skipped(&dir, e);
                continue;
            }
        };
        // Each name is read once: a sort keyed by `DirEntry::file_name` would copy it out at
        // every comparison.
        let mut entries = Vec::new();
        for entry in read {
            match entry {
                Ok(entry) => entries.push((entry.file_name(), entry)),
                Err(e) => skipped(&dir, e),
            }
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut subdirs = Vec::new();
        for (name, entry) in entries {
            let path = entry.path();
            let (file_type, metadata) = match (entry.file_type(), entry.metadata()) {
                (Ok(t), Ok(m)) => (t, m),
                (Err(e), _) | (_, Err(e)) => {
                    skipped(&path, e);
                    continue;
                }
            };
            let name = name
                .into_string()
                .unwrap_or_else(|name| name.to_string_lossy().into_owned());
            if file_type.is_dir() {
                let child = if relative.is_empty() {
                    name.clone()
                } else {
                    format!("{relative}/{name}")
                };
                subdirs.push((path.clone(), child));
            }
            found(Found {
                path,
                relative_path: relative.clone(),
                name,
                file_type,
                metadata,
            });
        }
        pending.extend(subdirs.into_iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_path_once_in_name_order_without_following_links() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        for d in ["b", "a", "a/z", "a/y"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for f in ["top.txt", "a/one.txt", "a/z/deep.txt", "b/two.txt"] {
            fs::write(root.join(f), f).expect("write");
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("a"), root.join("b/link")).expect("symlink");
        let mut seen = Vec::new();
        walk(
            root,
            &mut |f| {
                let kind = if f.file_type.is_dir() {
                    "d"
                } else if f.file_type.is_symlink() {
                    "l"
                } else {
                    "f"
                };
                seen.push(format!("{kind} {}|{}", f.relative_path, f.name));
            },
            &mut |p, e| panic!("skipped {}: {e}", p.display()),
        );
        let mut expected = vec![
            "d |a",
            "d |b",
            "f |top.txt",
            "f a|one.txt",
            "d a|y",
            "d a|z",
            "f a/z|deep.txt",
            "f b|two.txt",
        ];
        if cfg!(unix) {
            expected.insert(7, "l b|link");
        }
        assert_eq!(seen, expected);
    }

    #[test]
    fn an_unreadable_root_is_reported_not_walked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nope");
        let mut skipped = Vec::new();
        walk(
            &missing,
            &mut |f| panic!("found {}", f.path.display()),
            &mut |p, _| skipped.push(p.to_path_buf()),
        );
        assert_eq!(skipped, vec![missing]);
    }
}
