//! `pipeline`: the reviewer2 command line. All logic lives in the library; see `reviewer2::cli`.

use clap::Parser;
use reviewer2::cli::{run, Cli};

fn main() {
    let cli = Cli::parse();
    let level = if cli.global.quiet {
        "error"
    } else {
        match cli.global.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("REVIEWER2_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("reviewer2={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
