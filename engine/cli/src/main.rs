//! The `keel` command: run a library on this device, benchmark it, or demo it.

mod cli;
mod control;
mod everyday;
mod serve;

/// mimalloc: the replay and sync pipelines allocate changes on one thread and free them on
/// another, which glibc's allocator serialises on its arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let code = match cli::run() {
        Ok(code) => code,
        Err(err) => {
            let text = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {text}");
            1
        }
    };
    std::process::exit(code);
}
