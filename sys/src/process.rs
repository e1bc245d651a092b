//! Process control: groups, death signals, subreaper, pidfds, group kills.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Code to run in a freshly forked child before `exec`: new process group, death signal tied
/// to the parent thread, default signal dispositions and an empty signal mask.
///
/// Only async-signal-safe calls are made. Use it from `CommandExt::pre_exec`.
///
/// # Safety
/// Must only be called in the child between `fork` and `exec`.
pub unsafe fn child_setup(death_signal: libc::c_int) -> io::Result<()> {
    if libc::setpgid(0, 0) != 0 {
        return Err(io::Error::last_os_error());
    }
    if libc::prctl(
        libc::PR_SET_PDEATHSIG,
        death_signal as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
    {
        return Err(io::Error::last_os_error());
    }
    // If the parent died between fork and prctl, the death signal will never come.
    if libc::getppid() == 1 {
        libc::raise(death_signal);
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGPIPE,
        libc::SIGCHLD,
    ] {
        libc::signal(sig, libc::SIG_DFL);
    }
    Ok(())
}

/// Make this process a child subreaper: orphaned descendants are re-parented to it instead
/// of to init, so they can still be found and reaped.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: plain prctl call with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make this process undumpable: processes of the same account (the tasks it runs, in a
/// shared-account pool) can no longer read its memory, environment or open files through
/// `/proc/PID/…`, nor attach a debugger to it. Not inherited across `exec`.
pub fn set_undumpable() -> io::Result<()> {
    // SAFETY: plain prctl call with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Open a pidfd for `pid`: a file descriptor that becomes readable when the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: raw syscall with integer arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Send `signal` to process group `pgid`. A group that no longer exists is not an error.
pub fn kill_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill with a negative pid signals the process group.
    let rc = unsafe { libc::kill(-(pgid as libc::pid_t), signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Send `signal` to one process. A process that no longer exists is not an error.
pub fn kill_pid(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain kill syscall.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Whether any process is still in group `pgid`.
pub fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pgid as libc::pid_t), 0) == 0 }
}

/// SIGTERM the group, wait up to `grace` for it to empty, then SIGKILL it.
///
/// Blocks for at most `grace`; callers that must not block use [`kill_group`] and a timer.
pub fn terminate_group(pgid: u32, grace: Duration) {
    let _ = kill_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill_group(pgid, libc::SIGKILL);
}

/// Reap any exited children without blocking; returns `(pid, raw wait status)` pairs.
pub fn reap_any() -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG writes the status of an exited child, if any.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid as u32, status));
    }
}

/// [`reap_any`], with each child's peak resident memory in bytes: the largest of its own and
/// of the descendants it waited for (the kernel's `ru_maxrss` of `wait4`), so a short spike
/// that no sample saw is counted.
pub fn reap_any_with_peak() -> Vec<(u32, i32, u64)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 with WNOHANG writes the status and usage of an exited child, if any.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        if pid <= 0 {
            return out;
        }
        let peak = (usage.ru_maxrss.max(0) as u64).saturating_mul(1024);
        out.push((pid as u32, status, peak));
    }
}

/// Describe a raw wait status: `"exit status 3"` or `"killed by signal 9 (SIGKILL)"`.
pub fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("killed by signal {} ({})", sig, signal_name(sig))
    } else {
        format!("wait status {status}")
    }
}

/// The conventional name of a signal number (`SIGKILL`), or `SIG<n>` if unknown.
pub fn signal_name(sig: libc::c_int) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("SIG{sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_are_conventional() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
        assert_eq!(signal_name(99), "SIG99");
    }

    #[test]
    fn wait_status_is_described() {
        // exit status 3 is encoded as 3 << 8; signal 9 as 9.
        assert_eq!(describe_wait_status(3 << 8), "exit status 3");
        assert_eq!(describe_wait_status(9), "killed by signal 9 (SIGKILL)");
    }
}
