//! The `fnrunner` binary: parses the command line and runs one command.

use clap::Parser;

// NB: a call allocates and frees many small objects (request, stores,
// WASI contexts); mimalloc's thread caches beat glibc's malloc there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = fnrunner::commands::Cli::parse();
    cli.command.execute()
}
