//! One daemon per data directory: `<data dir>/fnx.lock`, held with `flock` for the daemon's
//! life and naming its PID. Two daemons on one store would both dispatch the same tasks and
//! fight over the SQLite writer; the second one refuses to start instead.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The lock could not be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another fnx daemon (pid {pid}) is using the data directory {dir}; stop it first, or \
         give this one another data_dir"
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The holder's PID as it wrote it (`unknown` if unreadable).
        pid: String,
    },
    /// The lock file cannot be opened or written.
    #[error("the lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Take the lock of `dir` or say who holds it. The file is opened close-on-exec, so no child
/// process (a manager, a batch command) can keep it after the daemon is gone.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, LockError> {
    let path = dir.join("fnx.lock");
    let ioerr = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(ioerr)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(ioerr(err));
        }
        let mut text = String::new();
        let _ = (&file).take(64).read_to_string(&mut text);
        let pid = text.trim();
        let pid = if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            pid.to_string()
        } else {
            "unknown".to_string()
        };
        return Err(LockError::Held {
            dir: dir.to_path_buf(),
            pid,
        });
    }
    file.set_len(0).map_err(ioerr)?;
    file.rewind().map_err(ioerr)?;
    writeln!(file, "{}", std::process::id()).map_err(ioerr)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(held);
        lock_data_dir(dir.path()).expect("free again once dropped");
    }
}
