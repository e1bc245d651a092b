//! The daemon's directories and their modes, and the private home of service-mode managers.

use super::{io, DaemonError};
use crate::config::SiteConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub(super) fn prepare_dir(dir: &Path) -> Result<(), DaemonError> {
    prepare_dir_mode(dir, 0o700)
}

/// Create `dir` and set its mode. In `unix` mode the data directory and the run directories
/// are 0711: users' managers pass through them to their own 0700 directories, but nobody can
/// list them; the store, `client.json` and `keys/` inside stay 0600/0700.
pub(super) fn prepare_dir_mode(dir: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    Ok(())
}

/// A new private directory (0700, in the system's temporary directory) for the home and
/// working directory of a service-mode pool's managers: never the data directory, which
/// container runtimes would otherwise bind into containers.
pub(super) fn private_home(pool: &str) -> Result<PathBuf, DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let token = crate::auth::new_token();
        let dir = base.join(format!("fnx-home-{pool}-{}", &token[4..16]));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(DaemonError::Io {
                    what: format!("cannot create {}", dir.display()),
                    source: e,
                })
            }
        }
    }
    Err(DaemonError::Io {
        what: format!(
            "cannot create a home directory for pool {pool} in {}",
            base.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    })
}

/// The mode of the directories users' managers pass through.
pub(super) fn passage_mode(cfg: &SiteConfig) -> u32 {
    match cfg.users.mode {
        crate::config::UsersMode::Unix => 0o711,
        crate::config::UsersMode::Service => 0o700,
    }
}

/// The store's files are the daemon's alone, whatever umask created them.
pub(super) fn private_store_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}
