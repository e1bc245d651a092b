//! Unix accounts, and becoming one: the only code in fnx that uses privileges.
//!
//! [`Account`] is looked up in the password and group databases *before* a fork (NSS is not
//! safe to call in a forked child). [`Identity::become_it`] runs in the child between fork and
//! exec and only makes async-signal-safe system calls:
//!
//! 1. refuse uid 0, the daemon's own uid and any uid below the minimum (a second check, past
//!    whatever the caller checked), before touching anything;
//! 2. empty the capability bounding set (so a setuid-root or file-capability program the user
//!    runs later gains nothing);
//! 3. `setgroups` (the account's supplementary groups), `setresgid`, `setresuid`;
//! 4. clear the effective, permitted, inheritable and ambient capability sets;
//! 5. verify: the ids are the account's, and `setuid(0)` fails;
//! 6. umask 077, and every descriptor above 2 closed at exec.
//!
//! Any failure returns an error: the child exits before exec, so no user code runs, and the
//! parent's spawn fails with that error (FAULTS.md 25).

use std::ffi::{CStr, CString};
use std::io;
use std::path::PathBuf;

/// A Unix account as the password and group databases describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Every group it is in (the primary one included), as `initgroups` would set them.
    pub groups: Vec<u32>,
}

fn passwd_entry(
    lookup: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> i32,
) -> io::Result<Option<Account>> {
    let mut size = 1024usize;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain data; getpw*_r writes into it and into buf (of `size` bytes).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = lookup(&mut pwd, buf.as_mut_ptr(), size, &mut out);
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 4;
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if out.is_null() {
            return Ok(None);
        }
        // SAFETY: on success the strings point into `buf`, alive here.
        let (name, home) = unsafe {
            (
                CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
                CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned(),
            )
        };
        let groups = group_list(&name, pwd.pw_gid)?;
        return Ok(Some(Account {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: PathBuf::from(home),
            groups,
        }));
    }
}

fn group_list(name: &str, gid: u32) -> io::Result<Vec<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let want = n;
        // SAFETY: groups has room for `n` entries; getgrouplist writes at most that many and
        // sets n to the number it found.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return Ok(groups);
        }
        if n <= want {
            n = want * 2;
        }
        if n > 65_536 {
            return Err(io::Error::other("the account is in too many groups"));
        }
    }
}

impl Account {
    /// The account named `name` (None: there is none).
    pub fn by_name(name: &str) -> io::Result<Option<Account>> {
        let Ok(cname) = CString::new(name) else {
            return Ok(None);
        };
        passwd_entry(|pwd, buf, size, out| {
            // SAFETY: arguments as getpwnam_r documents them.
            unsafe { libc::getpwnam_r(cname.as_ptr(), pwd, buf, size, out) }
        })
    }

    /// The account with user id `uid` (None: there is none).
    pub fn by_uid(uid: u32) -> io::Result<Option<Account>> {
        passwd_entry(|pwd, buf, size, out| {
            // SAFETY: arguments as getpwuid_r documents them.
            unsafe { libc::getpwuid_r(uid, pwd, buf, size, out) }
        })
    }
}

/// What a child becomes before exec: an account's ids, with the limits it is checked against.
#[derive(Clone, Debug)]
pub struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    /// Uids below this are refused.
    min_uid: u32,
    /// The uid of the account that starts children (never a user's).
    service_uid: u32,
}

impl Identity {
    /// Become `account`, refusing uid 0, `service_uid` and uids below `min_uid` in the child
    /// too (whatever the caller checked).
    pub fn new(account: &Account, min_uid: u32, service_uid: u32) -> Identity {
        Identity {
            uid: account.uid,
            gid: account.gid,
            groups: account.groups.clone(),
            min_uid,
            service_uid,
        }
    }

    /// The user id it becomes.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Turn this process into the account (see the module's steps). For a forked child before
    /// exec: async-signal-safe, no allocation.
    ///
    /// # Safety
    /// Only between fork and exec (it changes the whole process's credentials).
    pub unsafe fn become_it(&self) -> io::Result<()> {
        let refuse = |_| Err(io::Error::from_raw_os_error(libc::EPERM));
        if self.uid == 0 || self.uid == self.service_uid || self.uid < self.min_uid {
            return refuse(());
        }
        clear_bounding_set()?;
        check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
        check(libc::setresgid(self.gid, self.gid, self.gid))?;
        check(libc::setresuid(self.uid, self.uid, self.uid))?;
        clear_capabilities()?;
        // Verify, rather than trust the calls above.
        let (mut r, mut e, mut s) = (0, 0, 0);
        check(libc::getresuid(&mut r, &mut e, &mut s))?;
        if (r, e, s) != (self.uid, self.uid, self.uid) {
            return refuse(());
        }
        check(libc::getresgid(&mut r, &mut e, &mut s))?;
        if (r, e, s) != (self.gid, self.gid, self.gid) {
            return refuse(());
        }
        if libc::setuid(0) == 0 || libc::setgid(0) == 0 {
            return refuse(());
        }
        libc::umask(0o077);
        // Nothing this process holds open reaches the user's program (stdin/out/err are set).
        if libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        ) != 0
        {
            // Before Linux 5.11: one descriptor at a time, up to the limit.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as libc::c_int
            } else {
                1024
            };
            for fd in 3..max {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
        Ok(())
    }
}

/// Keep this process's capabilities to itself: clear its ambient and inheritable sets, so
/// that no program it starts gets any capability at exec (only a child that becomes a user,
/// between fork and exec, uses the ones this process holds). A process without capabilities
/// is unaffected.
pub fn keep_capabilities_to_self() -> io::Result<()> {
    // SAFETY: prctl and the capget/capset syscalls with valid, owned arguments.
    unsafe {
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drop every capability from the bounding set. Needs `CAP_SETPCAP` (a process without any
/// capability to drop is fine: nothing to do).
unsafe fn clear_bounding_set() -> io::Result<()> {
    for cap in 0..64 {
        match libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) {
            1 => check(libc::prctl(
                libc::PR_CAPBSET_DROP,
                cap as libc::c_ulong,
                0,
                0,
                0,
            ))?,
            0 => {}
            _ => break, // EINVAL: past the kernel's last capability
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Clear the effective, permitted, inheritable and ambient sets.
unsafe fn clear_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
        return Err(io::Error::last_os_error());
    }
    check(libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn accounts_are_found_by_name_and_uid() {
        let root = Account::by_uid(0).unwrap().expect("uid 0 exists");
        assert_eq!(root.name, "root");
        assert!(root.groups.contains(&0));
        assert_eq!(Account::by_name("root").unwrap().unwrap().uid, 0);
        assert!(Account::by_name("no-such-account-fnx").unwrap().is_none());
        assert!(Account::by_name("bad\0name").unwrap().is_none());
    }

    fn run_as(id: &Identity, script: &str) -> io::Result<std::process::Output> {
        let id = id.clone();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        // SAFETY: become_it is meant for exactly this place.
        unsafe {
            cmd.pre_exec(move || id.become_it());
        }
        cmd.output()
    }

    fn nobody() -> Account {
        Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
            groups: vec![65534],
        }
    }

    #[test]
    fn a_child_becomes_the_account_with_no_capability_left() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: changing ids needs root (CI runs as root)");
            return;
        }
        let id = Identity::new(&nobody(), 1000, 0);
        let out = run_as(
            &id,
            "id -u; id -g; id -G; umask; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status",
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..4], ["65534", "65534", "65534", "0077"], "{text}");
        assert_eq!(lines.len(), 9, "{text}");
        for cap in &lines[4..9] {
            assert!(cap.ends_with("0000000000000000"), "{text}");
        }
    }

    #[test]
    fn fault_25_a_refused_or_failed_drop_runs_nothing() {
        let dir = std::env::temp_dir().join(format!("fnx-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("ran");
        let script = format!("touch {}", marker.display());
        // Refused in the child however it was asked: root, the service uid, below min_uid.
        let mut root = nobody();
        root.uid = 0;
        let cases = [
            Identity::new(&root, 1000, 4242),
            Identity::new(&nobody(), 1000, 65534),
            Identity::new(&nobody(), 65535, 0),
        ];
        for id in &cases {
            let err = run_as(id, &script).expect_err("refused");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        }
        // A group the kernel refuses ((gid_t)-1): setgroups fails, nothing runs. Without root
        // every step fails anyway; the point is that nothing runs.
        let mut bad = nobody();
        bad.groups = vec![u32::MAX];
        assert!(run_as(&Identity::new(&bad, 1000, 0), &script).is_err());
        assert!(!marker.exists(), "user code ran after a failed drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
