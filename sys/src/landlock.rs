//! Keeping tasks away from the daemon's files when they run under the daemon's own account
//! (`[users] mode = "service"`), with Landlock.
//!
//! Landlock only grants: a sandboxed process may reach what a rule allows and nothing else. So
//! to hide a directory `H`, [`Landlock::hiding`] allows everything beneath every entry of each
//! of `H`'s ancestors except the one that leads to `H` (and except `H`), plus the exceptions
//! asked for beneath `H`. What stays out of reach: `H` and what is under it (but for the
//! exceptions), and listing `H`'s ancestors themselves. Entries created in those ancestors
//! after the rules were made are out of reach too.
//!
//! Where the kernel has Landlock ABI 6, the sandbox is also scoped: its processes cannot send
//! signals to processes outside it (the manager, the daemon) nor connect to abstract Unix
//! sockets outside it.
//!
//! Landlock forbids `mount` inside a sandbox, so processes started in a container are not
//! sandboxed this way (the container is their boundary).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// Rights on files (the only ones a rule on a regular file may grant).
const FILE_RIGHTS_V1: u64 = 1 /* EXECUTE */ | 1 << 1 /* WRITE_FILE */ | 1 << 2 /* READ_FILE */;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;

/// Reading and executing only.
pub const READ: u64 = 1 | 1 << 2 | 1 << 3;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel (0: none).
pub fn abi() -> u32 {
    // SAFETY: the documented version query: null attributes, size 0.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    v.max(0) as u32
}

/// Every filesystem right the kernel of `abi` knows.
fn all_rights(abi: u32) -> u64 {
    let mut all = (1u64 << 13) - 1; // v1: EXECUTE ... MAKE_SYM
    if abi >= 2 {
        all |= 1 << 13; // REFER
    }
    if abi >= 3 {
        all |= TRUNCATE;
    }
    if abi >= 5 {
        all |= IOCTL_DEV;
    }
    all
}

fn file_rights(abi: u32) -> u64 {
    let mut r = FILE_RIGHTS_V1;
    if abi >= 3 {
        r |= TRUNCATE;
    }
    if abi >= 5 {
        r |= IOCTL_DEV;
    }
    r
}

/// A ruleset, made once and enforced in every child that should run inside it.
#[derive(Debug)]
pub struct Landlock {
    ruleset: OwnedFd,
    /// The rules it holds, for logs and tests: (path, rights).
    pub rules: Vec<(PathBuf, u64)>,
    /// Signals and abstract sockets are scoped too (ABI 6).
    pub scoped: bool,
}

/// The rules that hide `hidden` (absolute paths) but for `exceptions` (path, rights; `None`:
/// every right): see the module.
pub fn rules_hiding(
    hidden: &[PathBuf],
    exceptions: &[(PathBuf, Option<u64>)],
) -> io::Result<Vec<(PathBuf, Option<u64>)>> {
    let mut real = BTreeSet::new();
    for h in hidden {
        if !h.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not an absolute path", h.display()),
            ));
        }
        // Rules hold inodes: what counts is where the path really leads.
        real.insert(std::fs::canonicalize(h).unwrap_or_else(|_| h.clone()));
    }
    let hidden = real;
    let mut chain = BTreeSet::new();
    for h in &hidden {
        let mut a = h.parent();
        while let Some(dir) = a {
            chain.insert(dir.to_path_buf());
            a = dir.parent();
        }
    }
    let mut out = Vec::new();
    for dir in &chain {
        if hidden.iter().any(|h| dir.starts_with(h)) {
            continue; // beneath something hidden
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let p = entry.path();
            // A symbolic link is skipped: a rule would hold its target, which may be (or
            // lead to) what is hidden; an allowed target is reached by its own path anyway.
            if chain.contains(&p)
                || hidden.contains(&p)
                || entry.file_type().is_ok_and(|t| t.is_symlink())
            {
                continue;
            }
            out.push((p, None));
        }
    }
    out.extend(exceptions.iter().cloned());
    Ok(out)
}

impl Landlock {
    /// A ruleset hiding `hidden` but for `exceptions`, or None when the kernel has no
    /// Landlock.
    pub fn hiding(
        hidden: &[PathBuf],
        exceptions: &[(PathBuf, Option<u64>)],
    ) -> io::Result<Option<Landlock>> {
        let abi = abi();
        if abi == 0 {
            return Ok(None);
        }
        let scoped = abi >= 6;
        let attr = RulesetAttr {
            handled_access_fs: all_rights(abi),
            handled_access_net: 0,
            scoped: if scoped {
                SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET
            } else {
                0
            },
        };
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: attr is a valid ruleset attribute of at least `size` bytes.
        let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr, size, 0u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor (close-on-exec) that we own.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut rules = Vec::new();
        for (path, rights) in rules_hiding(hidden, exceptions)? {
            let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: open with a NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                continue; // gone, or a dangling symbolic link: nothing to allow
            }
            // SAFETY: a new descriptor that we own (closed at the end of this iteration).
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
            let is_dir = std::fs::metadata(&path)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            let wanted = rights.unwrap_or(u64::MAX);
            let allowed = wanted
                & if is_dir {
                    all_rights(abi)
                } else {
                    file_rights(abi)
                };
            let beneath = PathBeneathAttr {
                allowed_access: allowed,
                parent_fd: file.as_raw_fd(),
            };
            // SAFETY: a valid rule for a ruleset descriptor we own.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.as_raw_fd(),
                    RULE_PATH_BENEATH,
                    &beneath,
                    0u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::other(format!(
                    "cannot add a sandbox rule for {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                )));
            }
            rules.push((path, allowed));
        }
        Ok(Some(Landlock {
            ruleset,
            rules,
            scoped,
        }))
    }

    /// The descriptor a child passes to [`enforce`].
    pub fn fd(&self) -> RawFd {
        self.ruleset.as_raw_fd()
    }
}

/// Put this process (and everything it starts) inside the ruleset `fd`. For a forked child
/// before exec: async-signal-safe. Sets `no_new_privs`, which Landlock requires.
///
/// # Safety
/// Only between fork and exec, with `fd` from [`Landlock::fd`].
pub unsafe fn enforce(fd: RawFd) -> io::Result<()> {
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
        return Err(io::Error::last_os_error());
    }
    if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is `dir` or beneath it.
pub fn is_beneath(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn rules_skip_the_hidden_path_and_its_ancestors() {
        let t = tempfile_dir("rules");
        std::fs::create_dir_all(t.join("secret/allowed")).unwrap();
        std::fs::create_dir_all(t.join("open")).unwrap();
        // A link beside the way to the hidden path leads into it: it must not open it up.
        std::os::unix::fs::symlink(t.join("secret"), t.join("link")).unwrap();
        let rules = rules_hiding(&[t.join("secret")], &[(t.join("secret/allowed"), None)]).unwrap();
        let paths: Vec<&PathBuf> = rules.iter().map(|(p, _)| p).collect();
        assert!(paths.contains(&&t.join("open")));
        assert!(paths.contains(&&t.join("secret/allowed")));
        assert!(!paths.contains(&&t.join("secret")));
        assert!(!paths.contains(&&t.join("link")));
        assert!(
            !paths.iter().any(|p| t.starts_with(p)),
            "no ancestor is allowed whole"
        );
        assert!(rules_hiding(&[PathBuf::from("relative")], &[]).is_err());
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fnx-landlock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_sandboxed_child_reaches_nothing_hidden_and_cannot_signal_out() {
        let t = tempfile_dir("enforce");
        std::fs::create_dir_all(t.join("secret/allowed")).unwrap();
        std::fs::create_dir_all(t.join("open")).unwrap();
        std::fs::write(t.join("secret/key"), "k").unwrap();
        std::fs::write(t.join("secret/runtime.py"), "r").unwrap();
        std::fs::write(t.join("open/data"), "d").unwrap();
        std::os::unix::fs::symlink(t.join("secret"), t.join("link")).unwrap();
        let Some(ll) = Landlock::hiding(
            &[t.join("secret")],
            &[
                (t.join("secret/allowed"), None),
                (t.join("secret/runtime.py"), Some(READ)),
            ],
        )
        .unwrap() else {
            eprintln!("skipped: this kernel has no Landlock");
            return;
        };
        let fd = ll.fd();
        let script = "cat secret/key 2>/dev/null && echo key-read; \
                      cat link/key 2>/dev/null && echo key-read-by-link; \
                      cat open/data && echo; \
                      echo x > secret/allowed/new && echo wrote-allowed; \
                      cat secret/runtime.py && echo; \
                      echo x >> secret/runtime.py 2>/dev/null && echo wrote-runtime; \
                      kill -0 $PPID 2>/dev/null && echo signalled-parent; \
                      echo done";
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).current_dir(&t);
        // SAFETY: enforce is meant for exactly this place.
        unsafe {
            cmd.pre_exec(move || enforce(fd));
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let mut want = vec!["d", "wrote-allowed", "r"];
        if !ll.scoped {
            want.push("signalled-parent");
        }
        want.push("done");
        assert_eq!(lines, want, "{text}");
        assert!(t.join("secret/allowed/new").exists());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
