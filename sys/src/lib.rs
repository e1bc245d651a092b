//! Facts and syscalls of the node that the manager and the embedded runner need.
//!
//! # Layout
//! - [`process`]: process groups, death signals, child subreaper, pidfds, killing a process
//!   group with a grace period, signal names.
//! - [`sweep`]: finding every process that carries an fnx environment marker (so that children
//!   that left their process group with `setsid` are still found) and killing them.
//! - [`signals`]: turning SIGINT/SIGTERM/SIGHUP into a readable file descriptor (self-pipe),
//!   so event loops can poll for them.
//! - [`memory`]: resident memory of process groups, and a process's peak (for per-task
//!   memory limits).
//! - [`node`]: host name and the number of CPUs this process may use.
//! - [`landlock`]: hiding the daemon's files from tasks that run under its own account
//!   (Landlock rules, scoped signals).
//! - [`user`]: Unix accounts, and becoming one between fork and exec (the one privileged
//!   part of fnx).
//!
//! - [`placement`]: the node's topology (sysfs, or an hwloc XML export) and pinning plans: pure
//!   data computed from topology + policy, applied in one place before exec.
#![deny(missing_docs)]

pub mod cgroup;
pub mod landlock;
pub mod memory;
pub mod node;
pub mod placement;
pub mod process;
pub mod signals;
pub mod sweep;
pub mod user;
