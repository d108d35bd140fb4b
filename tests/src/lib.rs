//! Helpers shared by Keel's cross-crate tests: libraries with cheap key derivation, and reading a
//! library's journal from outside.

use std::path::Path;

use keel_engine::{CreateOptions, EngineError, Home, KdfParams, Library};

/// The password every test library uses.
pub const PASSWORD: &str = "test password";

/// Creates library `name` in a home under `root`, with cheap key derivation.
pub fn create_library(root: &Path, name: &str) -> Result<(Home, Library), EngineError> {
    let home = Home::new(root.join("home"));
    let lib = Library::create(
        &home,
        name,
        PASSWORD,
        CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        },
    )?;
    Ok((home, lib))
}
