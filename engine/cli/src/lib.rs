//! The `keel` command as a library: its binary (`main.rs`) runs [`run`]. Nothing here is for
//! host apps (they embed `keel-engine` and `keel-node`); it is a library so that the fuzz
//! targets reach the control socket's request grammar.

mod cli;
mod control;
mod everyday;
mod gui;
mod metrics;
mod serve;

/// Runs the command line of this process; returns its exit code (errors are printed).
pub fn run() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            let text = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {text}");
            1
        }
    }
}

#[cfg(fuzzing)]
pub use control::fuzz_request;
