//! Log set-up: fnx's own logs go to files in the run directory, never to the result stream.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::EnvFilter;

/// Send tracing output to `path` (appending), filtered by `FNX_LOG` (default `info`).
pub fn to_file(path: &Path) -> std::io::Result<()> {
    let file = File::options().create(true).append(true).open(path)?;
    let filter = EnvFilter::try_from_env("FNX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_thread_names(true)
        .try_init();
    Ok(())
}

/// Send tracing output to stderr (used when there is no run directory).
pub fn to_stderr() {
    let filter = EnvFilter::try_from_env("FNX_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
