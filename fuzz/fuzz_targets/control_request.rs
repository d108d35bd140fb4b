//! Fuzz target: the control socket's requests (`keel serve`'s `control.sock`), as the node reads
//! them: one line of at most 64 KiB, JSON `{"args": [...]}`, then the forwarded command-line
//! grammar (clap). Its checks are in `keel::fuzz_request`: nothing past the first line or the
//! limit is read into a request, and a command line parses the same way twice. A share of the
//! inputs is built as a JSON request from the bytes, so the grammar is reached beyond the JSON;
//! some of those are padded to either side of the line limit, with junk after the padding.
//! (Reading 128 KiB instead of 64 was found in under 40 s.)
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Words the grammar knows, so that byte strings become command lines that get somewhere.
const WORDS: &[&str] = &[
    "status", "ls", "tag", "untag", "note", "verify", "rebuild", "index", "jobs", "pause",
    "resume", "cancel", "compact", "conflicts", "resolve", "devices", "revoke", "pair", "invite",
    "serve", "init", "--json", "--against", "--repair", "--device", "--yes", "lib", "x", "-",
    "--", "--help", "-h", "1", "0", "/tmp", ".",
];

fuzz_target!(|data: &[u8]| {
    if data.first().is_some_and(|b| b & 1 == 1) {
        // Raw bytes: the JSON reader's turn.
        keel::fuzz_request(&data[1..]);
        return;
    }
    let args: Vec<String> = data
        .iter()
        .skip(1)
        .map(|b| match WORDS.get(usize::from(*b)) {
            Some(word) => (*word).to_string(),
            None => format!("w{b}"),
        })
        .collect();
    let mut request = serde_json::json!({ "args": args }).to_string().into_bytes();
    if data.first().is_some_and(|b| b & 2 == 2) {
        // Padded with whitespace to about the limit (64 KiB), either side of it.
        let pad = 60 * 1024 + usize::from(data.len() as u8) * 64;
        request.resize(request.len() + pad, b' ');
        if data.first().is_some_and(|b| b & 4 == 4) {
            // Junk after the padding: a request only if the junk lies past the limit.
            request.push(b'x');
        }
    }
    request.push(b'\n');
    keel::fuzz_request(&request);
});
