//! The settings a node manager starts with.
//!
//! Whoever starts managers (the embedded runner, a batch job's launch line) fills a
//! [`ManagerBootstrap`]; the `fnx-launcher` crate renders it into an `fnx manager ...` command
//! line, and `fnx manager` parses that back into the same struct.

use crate::ids::BlockId;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything a manager needs to know to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManagerBootstrap {
    /// ZeroMQ endpoint of the interchange, e.g. `tcp://10.0.0.1:54321`.
    pub interchange: String,
    /// Unique name of this manager launch (reported at registration).
    pub uid: String,
    /// The block this manager belongs to, if any.
    pub block_id: Option<BlockId>,
    /// Worker slots; `None` means one per CPU the process may use.
    pub slots: Option<u32>,
    /// Cores each worker needs: slots are at most `cores / cores_per_worker`.
    pub cores_per_worker: Option<f64>,
    /// Memory each worker needs, in MiB: slots are at most `node memory / mem_per_worker`.
    pub mem_per_worker_mb: Option<u64>,
    /// How workers are pinned: `none`, `block`, `block-reverse`, `alternating`, `numa` or
    /// `list:CPUS:CPUS...` (`None`: not pinned).
    pub cpu_affinity: Option<String>,
    /// Accelerators (GPU ids) shared out over the worker slots.
    pub accelerators: Vec<String>,
    /// The container workers and shell tasks start in (`None`: on the host); without an image,
    /// only the runtime that functions' own container images use.
    pub container: Option<crate::container::Container>,
    /// Idle workers of a function's container exit after this many seconds (`None`: 300).
    pub container_idle_s: Option<u64>,
    /// Stop taking tasks this many milliseconds after start (before the batch job's walltime
    /// ends): the manager asks the interchange to drain it, finishes what it holds and exits.
    pub drain_after_ms: Option<u64>,
    /// Tasks accepted beyond the slots, queued locally; `None` means as many as slots, at
    /// least 64.
    pub prefetch: Option<u32>,
    /// Complete tasks without running them (overhead measurement).
    pub zero_work: bool,
    /// Python interpreter for Python workers.
    pub python: String,
    /// Directory for this manager's and its workers' logs.
    pub run_dir: PathBuf,
    /// A marker put into the environment of every process this manager starts, so that a
    /// cleanup can find every descendant even after it left its process group.
    pub run_id: String,
    /// Heartbeat period in milliseconds (the interchange's value, once registered, wins).
    pub heartbeat_period_ms: u64,
    /// Silence after which the interchange is considered gone, in milliseconds.
    pub heartbeat_threshold_ms: u64,
    /// Largest result, in bytes, that a task may return.
    pub max_result_bytes: u64,
    /// Time between SIGTERM and SIGKILL when a task is killed, in milliseconds.
    pub kill_grace_ms: u64,
    /// The key file of an encrypted link ([`crate::curve::KeyFile`]); `None`: plain link.
    pub curve_keys: Option<PathBuf>,
    /// Paths that processes this manager starts on the host must not reach (the daemon's data
    /// directory when tasks run under the daemon's own account), enforced with Landlock where
    /// the kernel has it. Its own worker runtime (read only) and task directories stay
    /// reachable.
    pub protect: Vec<PathBuf>,
}

impl ManagerBootstrap {
    /// The directory this manager writes its logs and worker runtime into.
    pub fn dir(&self) -> PathBuf {
        self.run_dir.join(&self.uid)
    }

    /// Defaults for everything but the interchange address, uid, run dir and run id.
    pub fn new(interchange: String, uid: String, run_dir: PathBuf, run_id: String) -> Self {
        ManagerBootstrap {
            interchange,
            uid,
            block_id: None,
            slots: None,
            cores_per_worker: None,
            mem_per_worker_mb: None,
            drain_after_ms: None,
            cpu_affinity: None,
            accelerators: Vec::new(),
            container: None,
            container_idle_s: None,
            prefetch: None,
            zero_work: false,
            python: "python3".to_string(),
            run_dir,
            run_id,
            heartbeat_period_ms: 5_000,
            heartbeat_threshold_ms: 30_000,
            max_result_bytes: 10 << 20,
            kill_grace_ms: 2_000,
            curve_keys: None,
            protect: Vec::new(),
        }
    }
}
