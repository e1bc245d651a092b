//! Find and kill every process that carries an environment marker.
//!
//! Process groups are not enough: a task can leave its group with `setsid` (`setsid sleep 1000 &`)
//! and its parent can exit. Every process an fnx manager starts gets `FNX_RUN_ID=<id>` in its
//! environment, which children inherit through forks, double forks and `setsid`; a sweep reads
//! `/proc/<pid>/environ` of every process and kills those that carry the marker.

use std::fs;

/// Processes (other than this one) whose initial environment contains `key=value`.
pub fn find_marked(key: &str, value: &str) -> Vec<u32> {
    let needle = format!("{key}={value}");
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Unreadable (exited, or another user's) processes are skipped.
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

/// SIGKILL every process marked `key=value`, repeating until two passes in a row find none (a
/// process may fork while the sweep runs, and one in the middle of `execve` can be unreadable
/// for an instant) or `rounds` passes were made. Returns how many kills were sent.
pub fn kill_marked(key: &str, value: &str, rounds: usize) -> usize {
    let mut killed = 0;
    let mut empty_passes = 0;
    for _ in 0..rounds {
        let pids = find_marked(key, value);
        if pids.is_empty() {
            empty_passes += 1;
            if empty_passes == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            continue;
        }
        empty_passes = 0;
        for pid in pids {
            if crate::process::kill_pid(pid, libc::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn finds_and_kills_a_marked_process_that_left_its_group() {
        let marker = format!("sweep-test-{}", std::process::id());
        // sh starts a setsid'd sleep and exits at once: the sleep is orphaned and in a new session.
        let status = Command::new("sh")
            .args(["-c", "setsid sleep 300 >/dev/null 2>&1 &"])
            .env("FNX_TEST_MARK", &marker)
            .status()
            .expect("sh runs");
        assert!(status.success());
        let mut pids = Vec::new();
        for _ in 0..100 {
            pids = find_marked("FNX_TEST_MARK", &marker);
            if !pids.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(pids.len(), 1, "the orphaned sleep carries the marker");
        assert!(kill_marked("FNX_TEST_MARK", &marker, 50) >= 1);
        for _ in 0..100 {
            if find_marked("FNX_TEST_MARK", &marker).is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("marked process survived the sweep");
    }
}
