//! What the pool asks of the outside world, and what it is told.
//!
//! The pool decides; an [`Io`] acts. The manager's [`super::driver`] implements it over real
//! processes, pipes, memory cgroups and the link; the pool's tests record what was asked.
//! Time comes with every event (its `now`); the pool reads the clock only through
//! [`Io::now`], to start a task's walltime after the I/O that started it.

use crate::procs::Wrap;
use crate::sandbox::Sandbox;
use crate::wire::{FromWorker, WireError};
use fnx_protocol::{FunctionBody, ManagerToInterchange, TaskError, TaskSpec};
use fnx_sys::placement::SlotPlan;
use std::path::Path;

/// A Python worker to start.
#[derive(Debug)]
pub struct WorkerStart<'a> {
    /// Its number in this manager (in its marker, its log's name and `FNX_WORKER_ID`).
    pub serial: u64,
    /// The interpreter.
    pub python: &'a str,
    /// Where its standard error goes.
    pub log: &'a Path,
    /// Its slot's CPUs and environment.
    pub slot: &'a SlotPlan,
    /// The container it starts in.
    pub container: Option<&'a Wrap>,
    /// The memory limit of its own memory cgroup, where the node allows one.
    pub mem_limit: Option<u64>,
}

/// A shell command to start.
#[derive(Debug)]
pub struct ShellStart<'a> {
    /// Its number in this manager (in its marker).
    pub serial: u64,
    /// The script, run as `sh -c script fnx-sh args...`.
    pub script: &'a str,
    /// Its positional arguments.
    pub args: &'a [String],
    /// The task it runs (`FNX_TASK_ID`).
    pub task: &'a TaskSpec,
    /// Its working directory (the task's sandbox), if it has files.
    pub cwd: Option<&'a Path>,
    /// Its slot's CPUs and environment.
    pub slot: &'a SlotPlan,
    /// The container it starts in.
    pub container: Option<&'a Wrap>,
    /// The memory limit of its own memory cgroup, where the node allows one.
    pub mem_limit: Option<u64>,
}

/// A process that started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// Its pid, which is also its process group.
    pub pid: u32,
    /// Its `FNX_PROC` marker (found on its descendants after `setsid`).
    pub marker: String,
    /// It runs in a memory cgroup of its own held to the limit it was started with.
    pub held: bool,
}

/// A child that ended, as the driver reaped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its pid.
    pub pid: u32,
    /// Its wait status.
    pub status: i32,
    /// The largest resident size of it and the descendants it waited for (`ru_maxrss`).
    pub peak: u64,
    /// A shell task's standard output and error (their tails), read to the end.
    pub output: Option<(String, String)>,
}

/// What a worker wrote since it was last read: complete frames, the protocol error that
/// stopped the reading, and whether its stdout closed.
#[derive(Debug, Default)]
pub struct WorkerOutput {
    /// The frames, in order.
    pub frames: Vec<(FromWorker, Vec<u8>)>,
    /// The protocol error after them, if any (the frames before it count).
    pub broke: Option<WireError>,
    /// Its stdout reached end-of-file.
    pub eof: bool,
}

/// The actions of the pool on the world. Each is one system call or a few; none blocks for
/// long (pipe writes are bounded by what pipelining allows).
pub trait Io {
    /// The time now. Events carry their own time; the pool asks only where its own I/O may
    /// have taken a while: a task's walltime starts when its process has it (after its input
    /// files were placed and its command started), not when the round began.
    fn now(&mut self) -> std::time::Instant;
    /// Start a Python worker.
    fn spawn_worker(&mut self, w: WorkerStart<'_>) -> std::io::Result<Spawned>;
    /// Start a shell command.
    fn spawn_shell(&mut self, s: ShellStart<'_>) -> std::io::Result<Spawned>;
    /// Write a task to worker `pid` (the function's definition first when `def` is given).
    fn send_task(
        &mut self,
        pid: u32,
        def: Option<&FunctionBody>,
        spec: &TaskSpec,
        cwd: Option<&Path>,
    ) -> std::io::Result<()>;
    /// Ask worker `pid` to exit (best effort).
    fn send_exit(&mut self, pid: u32);
    /// Send `sig` to process group `pid`.
    fn signal_group(&mut self, pid: u32, sig: i32);
    /// Kill every process carrying `FNX_PROC=marker`; how many.
    fn sweep(&mut self, marker: &str) -> usize;
    /// Hand a message to the link thread for the interchange.
    fn send(&mut self, msg: &ManagerToInterchange);
    /// Make the task's working directory with its input files (`None`: it has none).
    fn sandbox(&mut self, spec: &TaskSpec) -> Result<Option<Sandbox>, TaskError>;
    /// Whether `path` exists (an interpreter a worker reported).
    fn exists(&mut self, path: &Path) -> bool;

    /// The node's count of kernel out-of-memory kills.
    fn oom_kills(&mut self) -> Option<u64>;
    /// The resident bytes of each of these process groups.
    fn rss_of_groups(&mut self, groups: &[u32]) -> Vec<(u32, u64)>;
    /// The largest resident size process `pid` reached since it started or was last reset.
    fn peak_rss(&mut self, pid: u32) -> Option<u64>;
    /// Start measuring `pid`'s peak from now.
    fn reset_peak_rss(&mut self, pid: u32);
    /// Hold process `pid` to `limit` bytes in a memory cgroup of its own (moving it into a
    /// new one if it has none and a limit is asked for); whether it is held to exactly that.
    fn hold(&mut self, pid: u32, limit: Option<u64>) -> bool;
    /// The peak of `pid`'s memory cgroup if the kernel killed there: `noticed` says an
    /// out-of-memory event was read for it (where the cgroup reports events; elsewhere its
    /// kill count is compared with the last one seen).
    fn cgroup_kill_peak(&mut self, pid: u32, noticed: bool) -> Option<u64>;
}
