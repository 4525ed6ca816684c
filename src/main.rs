//! The `fnrunner` binary: parses the command line and runs one command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = fnrunner::commands::Cli::parse();
    cli.command.execute()
}
