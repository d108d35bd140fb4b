//! Fuzz target: the text files of a library folder that Keel reads back, as someone with the
//! folder may have left them. The first byte picks the file:
//! - `library.toml`: parsed and checked (version, key derivation parameters bounded before
//!   use); when its parameters are small enough to try quickly, its key is unwrapped with a
//!   password and its rotated keys unchained, as an open does;
//! - `devices.toml`: parsed, used (addresses, ids, revocations, a device added, an address
//!   remembered), and written back: what it writes parses to the same contents.
//!
//! Nothing may panic, whatever the text.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use keel_engine::LibraryConfig;
use keel_journal::LibraryKey;
use keel_node::DevicesFile;
use keel_schema::DeviceId;
use libfuzzer_sys::fuzz_target;

fn library_toml(text: &str) {
    let Ok(config) = LibraryConfig::parse(text, Path::new("library.toml")) else {
        return;
    };
    let kdf = config.key.kdf;
    if kdf.m_kib <= 64 && kdf.t <= 2 && kdf.p <= 2 {
        let library = config.library();
        if let Ok(key) = LibraryKey::unwrap_with(&config.key, library, "password") {
            let _ = key.unchain(library, &config.rotated);
        }
    }
}

fn devices_toml(text: &str) {
    let Ok(mut file) = DevicesFile::parse(text, Path::new("devices.toml")) else {
        return;
    };
    let written = toml::to_string(&file).expect("a parsed file serializes");
    let again = DevicesFile::parse(&written, Path::new("devices.toml"))
        .expect("what Keel writes, it reads");
    assert_eq!(again, file, "a round trip changed the file");
    let _ = file.addrs().count();
    let ids: Vec<DeviceId> = file.ids().chain(file.revoked_ids()).collect();
    let addr: SocketAddr = ([127, 0, 0, 1], 9).into();
    for id in ids.iter().take(4) {
        let _ = file.is_revoked(id);
        file.remember_addr(*id, addr);
    }
    let stranger = DeviceId([7; 32]);
    file.add(stranger, "fuzz", Some(addr), 1);
    file.revoke(stranger);
    assert!(file.is_revoked(&stranger));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if which % 2 == 0 {
        library_toml(text);
    } else {
        devices_toml(text);
    }
});
