//! A memory cgroup per worker, where the node lets the manager make one: the kernel then holds
//! each task to its limit the moment it allocates, and kills it inside its own cgroup when it
//! cannot reclaim, instead of a sampler noticing up to 100 ms later (by which time a fast task
//! may have taken the node's memory).
//!
//! Supported: a cgroup v1 memory hierarchy in which the manager's own cgroup is writable (root,
//! or a batch system that hands the job its cgroup). Elsewhere (cgroup v2, where the manager
//! would have to move itself into a leaf and enable the controller, and no cgroup at all)
//! [`MemoryCgroups::create`] says why not and the caller samples instead.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The manager's parent cgroup for its workers' leaves (`<own cgroup>/fnx-<pid>`), removed
/// with every leaf left in it when dropped.
#[derive(Debug)]
pub struct MemoryCgroups {
    /// The manager's own cgroup, the parent of `dir`.
    own: PathBuf,
    dir: PathBuf,
    next: u64,
}

/// One worker's (or one shell task's) memory cgroup, removed when dropped.
#[derive(Debug)]
pub struct Leaf {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, made before the fork (the child may not allocate).
    procs: CString,
    /// The limit, in bytes (None: none; `Some(0)`: unknown, after a failed change).
    pub limit: Option<u64>,
    /// Out-of-memory kills in it already accounted for.
    ooms_seen: u64,
    /// Readable when the kernel's out-of-memory killer acts in it (with the control file it
    /// watches, kept open while it does).
    oom_event: Option<(OwnedFd, File)>,
}

/// The manager's own directory in the v1 memory hierarchy, from `/proc/self/cgroup`.
fn own_v1_memory_dir(proc_cgroup: &str, mount: &Path) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| mount.join(path.trim_start_matches('/')))
    })
}

impl MemoryCgroups {
    /// Make the manager's parent cgroup; the error says why it cannot. `FNX_MEMORY_CGROUPS=off`
    /// in the manager's environment turns them off (limits are then sampled).
    pub fn create() -> io::Result<MemoryCgroups> {
        if std::env::var("FNX_MEMORY_CGROUPS").is_ok_and(|v| v == "off") {
            return Err(io::Error::other("turned off by FNX_MEMORY_CGROUPS=off"));
        }
        let table = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot read /proc/self/cgroup: {e}")))?;
        let own =
            own_v1_memory_dir(&table, Path::new("/sys/fs/cgroup/memory")).ok_or_else(|| {
                io::Error::other("no cgroup v1 memory hierarchy (cgroup v2 is not supported)")
            })?;
        if !own.join("memory.limit_in_bytes").exists() {
            return Err(io::Error::other(format!(
                "{} is not a memory cgroup",
                own.display()
            )));
        }
        sweep_dead_managers(&own);
        let dir = own.join(format!("fnx-{}", std::process::id()));
        // One left by an earlier process with this pid (or another pid namespace's) is not
        // ours: empty it first.
        if dir.exists() {
            remove_tree(&dir);
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create {}: {e}", dir.display()),
                ))
            }
        }
        Ok(MemoryCgroups { own, dir, next: 0 })
    }

    /// Where the leaves are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manager's own cgroup, in which `dir` was made.
    pub fn own(&self) -> &Path {
        &self.own
    }

    /// A new leaf held to `limit` bytes (memory and swap). Processes join it with
    /// [`Leaf::join_in_child`] or [`Leaf::adopt`].
    pub fn leaf(&mut self, limit: u64) -> io::Result<Leaf> {
        self.next += 1;
        let dir = self.dir.join(format!("w{}", self.next));
        std::fs::create_dir(&dir)?;
        let mut leaf = Leaf {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            dir,
            limit: None,
            ooms_seen: 0,
            oom_event: None,
        };
        leaf.set_limit(Some(limit))?;
        // Without the notification, kills are counted when a task fails instead.
        leaf.oom_event = leaf.watch_oom().ok();
        Ok(leaf)
    }
}

/// Remove a parent and its leaves (those no process is in any more).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Parents of managers that were killed before they could remove them (`fnx-<pid>` of a pid
/// that no longer runs).
fn sweep_dead_managers(own: &Path) {
    let Ok(entries) = std::fs::read_dir(own) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("fnx-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_tree(&e.path());
        }
    }
}

impl Drop for MemoryCgroups {
    fn drop(&mut self) {
        remove_tree(&self.dir);
    }
}

impl Leaf {
    /// Move the calling process into this cgroup. For `CommandExt::pre_exec`: only
    /// async-signal-safe calls, no allocation (the path was made before the fork).
    pub fn join_in_child(&self) -> io::Result<()> {
        join(&self.procs)
    }

    /// Its `cgroup.procs` path, for a child to [`join`] between fork and exec.
    pub fn procs(&self) -> CString {
        self.procs.clone()
    }

    /// Hold it to `limit` bytes, memory and swap (None: no limit). Fails (EBUSY) when lowered
    /// below what it holds and the kernel cannot reclaim enough; the old limit then stays.
    pub fn set_limit(&mut self, limit: Option<u64>) -> io::Result<()> {
        let value = limit.map_or_else(|| "-1".to_string(), |l| l.to_string());
        let mem = self.dir.join("memory.limit_in_bytes");
        // Without swap accounting the file is absent: there is no swap to escape into.
        let memsw = self.dir.join("memory.memsw.limit_in_bytes");
        let memsw = memsw.exists().then_some(memsw);
        // The swap limit may never be below the memory limit: raise it first, lower it last.
        let raising = match (limit, self.limit) {
            (None, _) => true,
            (Some(_), None) => false,
            // Unknown: the swap limit may be either side; try it first and again last.
            (Some(_), Some(0)) => {
                if let Some(sw) = &memsw {
                    let _ = std::fs::write(sw, &value);
                }
                false
            }
            (Some(new), Some(old)) => new > old,
        };
        // Until both are written the limit is unknown: a failure half-way is written again.
        self.limit = Some(0);
        if raising {
            if let Some(sw) = &memsw {
                std::fs::write(sw, &value)?;
            }
            std::fs::write(&mem, &value)?;
        } else {
            std::fs::write(&mem, &value)?;
            if let Some(sw) = &memsw {
                std::fs::write(sw, &value)?;
            }
        }
        self.limit = limit;
        // The peak is reported against this limit from now on.
        let _ = std::fs::write(self.dir.join("memory.max_usage_in_bytes"), "0");
        Ok(())
    }

    /// An eventfd the kernel signals when it kills in this cgroup for lack of memory
    /// (`cgroup.event_control` on `memory.oom_control`).
    fn watch_oom(&self) -> io::Result<(OwnedFd, File)> {
        let control = File::open(self.dir.join("memory.oom_control"))?;
        // SAFETY: eventfd takes no pointers; the descriptor it returns is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::write(
            self.dir.join("cgroup.event_control"),
            format!("{} {}", event.as_raw_fd(), control.as_raw_fd()),
        )?;
        Ok((event, control))
    }

    /// The descriptor to poll for out-of-memory kills in it, if it is watched.
    pub fn oom_fd(&self) -> Option<RawFd> {
        self.oom_event.as_ref().map(|(e, _)| e.as_raw_fd())
    }

    /// Whether the kernel's out-of-memory killer acted in it since the last call (reads the
    /// notification). cgroup v1 also notifies a cgroup of an out-of-memory event of a cgroup
    /// above it (a batch job's limit); this kernel's counters do not tell the two apart (its
    /// `memory.failcnt` stays 0 on an out-of-memory kill), so both count.
    pub fn take_oom(&mut self) -> bool {
        let Some((event, _)) = &self.oom_event else {
            return false;
        };
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `count`, a buffer of 8 bytes.
        let n = unsafe { libc::read(event.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        n == 8 && u64::from_ne_bytes(count) > 0
    }

    /// Move the running process `pid` into it (its threads; children it makes later follow).
    /// Memory it already holds stays counted where it was.
    pub fn adopt(&self, pid: u32) -> io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Out-of-memory kills in it since the last call that returned them: `Some(peak bytes)`
    /// if there were any (the kernel killed a process of it at its limit). With the
    /// notification ([`Leaf::oom_fd`]), its caller knows which task it hit; this then only
    /// counts (and gives the peak).
    pub fn new_oom_kill(&mut self) -> Option<u64> {
        let control = std::fs::read_to_string(self.dir.join("memory.oom_control")).ok()?;
        let n: u64 = control
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))?
            .trim()
            .parse()
            .ok()?;
        if n <= self.ooms_seen {
            return None;
        }
        self.ooms_seen = n;
        Some(self.peak().max(self.limit.unwrap_or(0)))
    }

    /// The most memory it has used since its limit was last set (page cache included).
    pub fn peak(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        // Fails while a process is still in it (one being killed): the parent's drop retries.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Write "0" (the writer itself) into the `cgroup.procs` file at `procs`. Async-signal-safe.
pub fn join(procs: &CString) -> io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path made before the fork; no allocation.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_line_of_proc_self_cgroup_names_the_directory() {
        let table = "12:pids:/a\n4:memory:/process_api/abc\n0::/user.slice\n";
        let mount = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            own_v1_memory_dir(table, mount),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            own_v1_memory_dir("5:cpu,memory:/\n", mount),
            Some(mount.to_path_buf())
        );
        assert_eq!(own_v1_memory_dir("0::/user.slice\n", mount), None);
    }
}
