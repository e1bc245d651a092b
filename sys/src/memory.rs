//! Memory of processes: the resident size of process groups (one pass over `/proc`), and a
//! process's peak resident size, which can be reset.

use std::collections::HashMap;

/// Bytes of a memory page.
fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// The process group and resident pages in the text of `/proc/PID/stat` (fields 5 and 24,
/// counted after the command name, which may hold spaces and parentheses).
fn group_and_rss(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ")": state(3) ppid(4) pgrp(5) ... rss(24).
    let pgrp = fields.nth(2)?.parse().ok()?;
    let rss = fields.nth(18)?.parse().ok()?;
    Some((pgrp, rss))
}

/// The resident bytes of each process group in `groups` (members that left the group, with
/// `setsid`, are not counted). One read of `/proc/PID/stat` per process on the node.
pub fn rss_of_groups(groups: &[u32]) -> HashMap<u32, u64> {
    let mut out: HashMap<u32, u64> = groups.iter().map(|&g| (g, 0)).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let page = page_size();
    let mut buf = String::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        buf.clear();
        let path = format!("/proc/{pid}/stat");
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        if std::io::Read::read_to_string(&mut f, &mut buf).is_err() {
            continue;
        }
        if let Some((pgrp, pages)) = group_and_rss(&buf) {
            if let Some(sum) = out.get_mut(&pgrp) {
                *sum += pages * page;
            }
        }
    }
    out
}

/// The peak resident bytes of process `pid` since it started or since
/// [`reset_peak_rss`] (`VmHWM`).
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A process's peak resident size (`VmHWM`), read again and again through one open
/// `/proc/PID/status`: no path lookup and no allocation per read (a manager reads it for
/// every task's result).
#[derive(Debug)]
pub struct PeakRss {
    status: std::fs::File,
}

impl PeakRss {
    /// Open `pid`'s status.
    pub fn open(pid: u32) -> std::io::Result<PeakRss> {
        Ok(PeakRss {
            status: std::fs::File::open(format!("/proc/{pid}/status"))?,
        })
    }

    /// The peak resident bytes now.
    pub fn read(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        // VmHWM is in the first kilobyte or two of the file.
        let mut buf = [0u8; 4096];
        let n = self.status.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
        Some(kib << 10)
    }
}

/// Start measuring `pid`'s peak resident size again from its current size (Linux 4.0+).
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5")
}

/// How many processes the kernel's out-of-memory killer has killed since boot, node-wide and
/// in memory cgroups (`oom_kill` in `/proc/vmstat`, Linux 4.13+).
pub fn oom_kills() -> Option<u64> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    let line = vmstat.lines().find(|l| l.starts_with("oom_kill "))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

static RELEASE_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Name the function that makes the process's allocator give freed memory back to the kernel
/// (the binary's global allocator knows how; the first call wins).
pub fn set_release_hook(hook: fn()) {
    let _ = RELEASE_HOOK.set(hook);
}

/// Give memory the allocator holds free back to the kernel now. Allocators keep freed memory
/// for reuse and return it after a delay, or when the thread that allocated it allocates again:
/// after a burst of large requests an idle daemon would keep its peak resident. Costs a walk
/// over the allocator's free lists; call it after large frees, when idle.
pub fn release_free_memory() {
    if let Some(hook) = RELEASE_HOOK.get() {
        hook();
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_read_again_through_the_open_status() {
        let me = PeakRss::open(std::process::id()).unwrap();
        let first = me.read().unwrap();
        // The same figure as a fresh read of the file, and read again through the same
        // descriptor (a peak only grows, whatever other test threads allocate meanwhile).
        let fresh = peak_rss(std::process::id()).unwrap();
        let again = me.read().unwrap();
        assert!(
            first > 0 && first <= fresh && fresh <= again,
            "{first} {fresh} {again}"
        );
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 777 777 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    123 4096000 321 18446744073709551615";
        assert_eq!(group_and_rss(stat), Some((777, 321)));
        assert_eq!(group_and_rss("garbage"), None);
    }

    #[test]
    fn a_group_that_allocates_is_measured_and_its_peak_reset() {
        use std::io::{BufRead, Write};
        // A child in its own group that holds 64 MiB it has written, then frees them.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, sys, time; os.setpgid(0, 0); b = bytearray(64 << 20); \
                 print('held', flush=True); sys.stdin.readline(); del b; \
                 print('freed', flush=True); time.sleep(30)",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "held");
        let pid = child.id();
        let rss = rss_of_groups(&[pid, 999_999_999]);
        assert!(rss[&pid] > 64 << 20, "{rss:?}");
        assert_eq!(rss[&999_999_999], 0);
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "freed");
        assert!(rss_of_groups(&[pid])[&pid] < 64 << 20);
        assert!(peak_rss(pid).unwrap() > 64 << 20, "the peak remembers");
        reset_peak_rss(pid).unwrap();
        assert!(peak_rss(pid).unwrap() < 64 << 20, "and starts again");
        let _ = child.kill();
        let _ = child.wait();
    }
}
