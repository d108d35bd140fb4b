//! The `keel` command: run a library on this device, benchmark it, or demo it.

mod bench;
mod bench_sync;
mod cli;
mod control;
mod demo;
mod demo_devices;
mod serve;

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
