//! Scratch folders in memory, where the machine has a tmpfs (still real files, without a
//! disk's latency), for the simulator and the fuzz targets (which include this file by path).
//! A folder held in a `static` is never dropped (a test binary or libFuzzer leaves by `exit`),
//! so each is named after its process, and the first folder a process makes removes those of
//! processes that are gone.

use std::path::Path;

/// The tmpfs the folders go to, where there is one.
const SHM: &str = "/dev/shm";

/// A new scratch folder named `{prefix}-{process id}-…`; the first one a process makes removes
/// the folders named after `prefix` that processes now gone left.
pub fn dir(prefix: &str) -> tempfile::TempDir {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let shm = Path::new(SHM);
    if !shm.is_dir() {
        return tempfile::tempdir().expect("a folder");
    }
    SWEPT.call_once(|| remove_orphans(shm, prefix));
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-{}-", std::process::id()))
        .tempdir_in(shm)
        .or_else(|_| tempfile::tempdir())
        .expect("a folder")
}

/// Removes the folders of `prefix` in `shm` whose process is gone.
fn remove_orphans(shm: &Path, prefix: &str) {
    let Ok(read) = std::fs::read_dir(shm) else {
        return;
    };
    for entry in read.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix)?.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
