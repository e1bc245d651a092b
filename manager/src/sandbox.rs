//! A task's own working directory, holding its input files; removed when the task ends.

use fnx_protocol::{ErrorKind, FileSource, TaskError, TaskSpec};
use std::path::{Path, PathBuf};

/// The working directory of one task attempt; removed (with its contents) when dropped.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    /// Create `<base>/<task>.<attempt>/` and place the task's input files in it: inline files
    /// are written, path files become symbolic links to their (shared filesystem) path.
    /// `Ok(None)` when the task has no files (it runs in the worker's usual directory).
    pub fn prepare(base: &Path, spec: &TaskSpec) -> Result<Option<Sandbox>, TaskError> {
        if spec.files.is_empty() {
            return Ok(None);
        }
        let bad = |msg: String| TaskError::new(ErrorKind::BadInput, "InputFileError", msg);
        let dir = base.join(format!("{}.{}", spec.id.0, spec.attempt.0));
        let sandbox = Sandbox { dir };
        std::fs::create_dir_all(&sandbox.dir).map_err(|e| {
            bad(format!(
                "cannot create the task directory {}: {e}",
                sandbox.dir.display()
            ))
        })?;
        for f in &spec.files {
            fnx_protocol::TaskFile::check_name(&f.name)
                .map_err(|e| bad(format!("input file {e}")))?;
            let target = sandbox.dir.join(&f.name);
            match &f.source {
                FileSource::Inline(bytes) => std::fs::write(&target, bytes).map_err(|e| {
                    bad(format!("cannot write input file {}: {e}", target.display()))
                })?,
                FileSource::Path(p) => {
                    // Opened (not just looked at) by this manager, which runs as the task's
                    // user in `unix` mode: a user links only files that user may read.
                    if let Err(e) = std::fs::File::open(p) {
                        let why = match e.kind() {
                            std::io::ErrorKind::NotFound => "does not exist on this node".into(),
                            std::io::ErrorKind::PermissionDenied => {
                                "cannot be read by the task's user (permission denied)".into()
                            }
                            _ => format!("cannot be opened: {e}"),
                        };
                        return Err(bad(format!(
                            "input file {} is passed by path but {p} {why}",
                            f.name
                        )));
                    }
                    std::os::unix::fs::symlink(p, &target).map_err(|e| {
                        bad(format!("cannot link input file {} to {p}: {e}", f.name))
                    })?
                }
            }
        }
        Ok(Some(sandbox))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove the task directory {}: {e}",
                    self.dir.display()
                );
            }
        }
    }
}
