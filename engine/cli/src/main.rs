//! The `keel` command: run a library on this device, benchmark it, or demo it.

/// mimalloc: the replay and sync pipelines allocate changes on one thread and free them on
/// another, which glibc's allocator serialises on its arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(keel::run());
}
