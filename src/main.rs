//! `pipeline`: the reviewer2 command line. All logic lives in the library; see `reviewer2::cli`.

use clap::Parser;
use reviewer2::cli::{run, Cli};

/// candle allocates a fresh buffer for every op. glibc serves large blocks with mmap and returns
/// them on free, so every op pays page faults (a third of a training step was system time).
/// Keeping freed memory in the heap for reuse removes most of that.
fn tune_allocator() {
    // glibc caps the mmap threshold at 32 MiB (larger values are ignored).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("REVIEWER2_DEFAULT_MALLOC").is_none() {
        // SAFETY: mallopt takes plain integers and only adjusts glibc's allocator thresholds
        // (valid parameters, values in range); called first thing in `main`, before any thread
        // starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// candle runs elementwise ops on its own thread pool, whose workers spin 25,000 rounds before
/// parking, while gemm and the attention kernel run on rayon's pool. On a 2-core machine the
/// spinning worker takes a core from the matmuls. Without that pool (elementwise ops on the
/// calling thread), generation ran 25% faster and training steps as fast as before
/// (docs/PERF.md). Matmul threads are rayon's and unaffected. A value set by the user wins.
fn tune_thread_pools() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none()
    {
        // SAFETY: called before any thread starts, so nothing reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() {
    // `pipeline status | head` should end quietly, not panic on a closed pipe.
    #[cfg(unix)]
    // SAFETY: `SIG_DFL` for `SIGPIPE` installs no handler, only restores the default
    // disposition, and this runs first in `main`, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tune_allocator();
    tune_thread_pools();
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
        .with_ansi(reviewer2::term::colour_stderr())
        .with_target(false)
        .init();
    let debug = cli.global.verbose >= 2;
    if let Err(e) = run(cli) {
        let msg = e.to_string();
        eprintln!("error: {msg}");
        // Context already prints its cause inline; print only what the message does not say.
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            let text = c.to_string();
            if !msg.contains(&text) {
                eprintln!("  caused by: {text}");
            }
            cause = c.source();
        }
        // A library's backtrace is for whoever debugs the engine, not for the user whose file
        // was refused: printed only when asked for.
        let asked = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        if let Some(bt) = e.backtrace().filter(|_| debug || asked) {
            eprintln!("backtrace:\n{bt}");
        }
        std::process::exit(e.kind().exit_code());
    }
}
