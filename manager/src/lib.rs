//! The node manager: one per compute node, started by a launcher from a
//! [`fnx_protocol::ManagerBootstrap`].
//!
//! # Layout
//! - [`link`]: the thread that owns the interchange socket — registration, heartbeats on its own
//!   clock, silence detection, relaying frames.
//! - [`pool`]: the main thread — a state machine without I/O (Python workers and shell tasks,
//!   walltime, result batching, cancel, zero-work mode) and its driver (`pool::driver`: the
//!   poll loop and the real `pool::Io`). Walltime goes SIGTERM, grace, SIGKILL of the process
//!   group, then a sweep by environment marker.
//! - [`procs`]: starting and reading worker and shell processes (process groups, death signal,
//!   markers).
//! - [`wire`]: frames between the manager and its Python workers.
//! - [`sandbox`]: a task's own working directory with its input files.
//!
//! The Python worker runtime (`sdk/python/fnx/worker.py`) is embedded as [`WORKER_PY`].
#![deny(missing_docs)]

pub mod link;
pub mod pair;
pub mod pool;
pub mod procs;
pub mod sandbox;
pub mod wire;

use fnx_protocol::{ManagerBootstrap, Register};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// The Python worker runtime, written into each manager's directory at start.
pub const WORKER_PY: &str = include_str!("../../sdk/python/fnx/worker.py");

/// Default prefetch for managers with few slots: short tasks need a few dozen tasks in hand to
/// cover the round trip to the interchange (measured in benches/README.md).
pub const DEFAULT_MIN_PREFETCH: u32 = 64;

/// How a manager ended.
pub use pool::PoolEnd;

/// A manager could not start.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A ZeroMQ call failed.
    #[error("{what}: {source}")]
    Zmq {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: zmq::Error,
    },
    /// The placement policy cannot be carried out on this node.
    #[error("worker placement: {0}")]
    Placement(#[from] fnx_sys::placement::PlacementError),
    /// The container cannot be used.
    #[error("container: {0}")]
    Container(#[from] fnx_protocol::ContainerError),
    /// The key file of an encrypted link cannot be used.
    #[error("key file {path}: {what}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The keys of an encrypted link: from the file at `path`, or, when `path` is `-`, from
/// standard input (how a local pool hands its managers their keys: nothing on the command
/// line, no file).
fn read_keys(path: &std::path::Path) -> Result<link::Credentials, ManagerError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let err = |what: String| ManagerError::Keys {
        path: path.to_path_buf(),
        what,
    };
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| err(format!("cannot read keys from standard input: {e}")))?;
        text
    } else {
        let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "has mode {mode:03o}; a key file must be readable only by its owner (chmod 600)"
            )));
        }
        std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?
    };
    let keys = match fnx_protocol::Credentials::parse(&text).map_err(|e| err(e.to_string()))? {
        fnx_protocol::Credentials::Plain(p) => return Ok(link::Credentials::Plain(p)),
        fnx_protocol::Credentials::Curve(k) => k,
    };
    let decode = |name: &str, z85: &str| {
        zmq::z85_decode(z85)
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| err(format!("{name} is not a Z85 key")))
    };
    Ok(link::Credentials::Curve(link::ClientKeys {
        server_public: decode("server_public", &keys.server_public)?,
        public: decode("public", &keys.public)?,
        secret: decode("secret", &keys.secret)?,
    }))
}

/// The sandbox of the processes this manager starts on the host: `b.protect` out of reach,
/// but for the worker runtime (read only) and the task directories. None when nothing is to
/// be protected, or the kernel cannot (logged: the admin should know).
fn sandbox(
    b: &ManagerBootstrap,
    dir: &std::path::Path,
    script: &std::path::Path,
    cgroups: Option<(&std::path::Path, &std::path::Path)>,
) -> Option<std::sync::Arc<fnx_sys::landlock::Landlock>> {
    if b.protect.is_empty() {
        return None;
    }
    // The manager's own cgroup is out of reach (a task could move itself there, or make a
    // cgroup of its own); the workers' cgroups can be read (their limits), not changed.
    let mut protect = b.protect.clone();
    protect.extend(cgroups.map(|(own, _)| own.to_path_buf()));
    let tasks = dir.join("tasks");
    if let Err(e) = std::fs::create_dir_all(&tasks) {
        tracing::warn!("cannot create {}: {e}", tasks.display());
    }
    let mut exceptions = vec![
        (script.to_path_buf(), Some(fnx_sys::landlock::READ)),
        (tasks, None),
    ];
    exceptions
        .extend(cgroups.map(|(_, leaves)| (leaves.to_path_buf(), Some(fnx_sys::landlock::READ))));
    let shown: Vec<String> = protect.iter().map(|p| p.display().to_string()).collect();
    match fnx_sys::landlock::Landlock::hiding(&protect, &exceptions) {
        Ok(Some(l)) => {
            tracing::info!(
                "tasks run sandboxed away from {} ({} rules{})",
                shown.join(", "),
                l.rules.len(),
                if l.scoped {
                    "; they cannot signal processes outside the sandbox"
                } else {
                    ""
                }
            );
            Some(std::sync::Arc::new(l))
        }
        Ok(None) => {
            tracing::warn!(
                "this kernel has no Landlock: tasks can reach {} (they run under this account)",
                shown.join(", ")
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                "cannot sandbox tasks away from {}: {e}; they can reach it",
                shown.join(", ")
            );
            None
        }
    }
}

/// The environment variables in which launchers give a process its rank, in the order tried.
/// The MPI launchers' variables come first: a batch script under Slurm carries
/// `SLURM_PROCID=0`, which mpiexec passes on to every rank.
const RANK_VARS: [&str; 6] = [
    "PMI_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    "PALS_RANKID",
    "ALPS_APP_PE",
    "SLURM_PROCID",
];

/// Replace `{rank}` in the uid with this process's launcher rank (0 when no launcher set one),
/// so that one command line started on every node names every manager differently.
pub fn expand_uid(uid: &str, env: impl Fn(&str) -> Option<String>) -> String {
    if !uid.contains("{rank}") {
        return uid.to_string();
    }
    let rank = RANK_VARS
        .iter()
        .find_map(|v| env(v).filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit())))
        .unwrap_or_else(|| "0".to_string());
    uid.replace("{rank}", &rank)
}

/// When to drain: `drain_after_ms` after the manager started, or earlier at `FNX_DRAIN_AT`
/// (Unix seconds, exported by a block's batch script at the job's start, so the time its
/// `worker_init` and launcher took counts too).
pub fn drain_deadline(
    started: std::time::Instant,
    after_ms: Option<u64>,
    at_epoch: Option<&str>,
) -> Option<std::time::Instant> {
    let relative = after_ms.map(|ms| started + fnx_protocol::bounded_ms(ms));
    let absolute = at_epoch
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(|at| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            std::time::Instant::now()
                + Duration::from_secs(at.saturating_sub(now)).min(fnx_protocol::LONGEST_WAIT)
        });
    match (relative, absolute) {
        (Some(r), Some(a)) => Some(r.min(a)),
        (r, a) => r.or(a),
    }
}

/// The node's name as the batch system knows it (`SLURMD_NODENAME`), else the host name.
pub fn node_name() -> String {
    std::env::var("SLURMD_NODENAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(fnx_sys::node::hostname)
}

/// Worker slots: the configured count (default: one per usable core), at most
/// `cores / cores_per_worker` and `memory / mem_per_worker`, and at least one.
pub fn slot_count(b: &ManagerBootstrap, cores: u32, mem_bytes: u64) -> u32 {
    let mut slots = b.slots.unwrap_or(cores);
    if let Some(c) = b.cores_per_worker.filter(|c| *c > 0.0) {
        slots = slots.min((cores as f64 / c).floor() as u32);
    }
    if let Some(m) = b.mem_per_worker_mb.filter(|m| *m > 0) {
        slots = slots.min((mem_bytes / (m << 20)) as u32);
    }
    slots.max(1)
}

/// The placement of `slots` worker slots on `topo` within `allowed` CPUs, as `b` asks for.
pub fn placement_plan(
    b: &ManagerBootstrap,
    slots: u32,
    topo: &fnx_sys::placement::Topology,
    allowed: &[u32],
) -> Result<Vec<fnx_sys::placement::SlotPlan>, ManagerError> {
    let affinity: fnx_sys::placement::CpuAffinity = b
        .cpu_affinity
        .as_deref()
        .unwrap_or("none")
        .parse()
        .map_err(ManagerError::Placement)?;
    fnx_sys::placement::plan(topo, allowed, &affinity, slots as usize, &b.accelerators)
        .map_err(ManagerError::Placement)
}

/// Run a manager until it is released, told to stop, loses the interchange or gets a signal.
///
/// The caller sets up logging (to `ManagerBootstrap::dir()/manager.log`) before calling this.
pub fn run(b: &ManagerBootstrap) -> Result<PoolEnd, ManagerError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ManagerError::Io { what, source }
    };
    let dir = b.dir();
    std::fs::create_dir_all(&dir).map_err(io("cannot create the manager directory"))?;
    // Tasks run under this account: keep them out of this process's memory (its link keys).
    if let Err(e) = fnx_sys::process::set_undumpable() {
        tracing::warn!("cannot protect the manager's memory from its tasks: {e}");
    }
    let script = dir.join("fnx_worker.py");
    std::fs::write(&script, WORKER_PY).map_err(io("cannot write the worker runtime"))?;
    if let Err(e) = fnx_sys::process::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({e}); orphans of tasks are found by marker only"
        );
    }
    let signals = fnx_sys::signals::install(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
        .map_err(io("cannot install signal handlers"))?;
    let started = std::time::Instant::now();
    let cores = fnx_sys::node::usable_cpus();
    let slots = slot_count(b, cores, fnx_sys::node::total_memory_bytes());
    if let Some(c) = &b.container {
        c.validate().map_err(ManagerError::Container)?;
    }
    let placement = placement_plan(
        b,
        slots,
        &fnx_sys::placement::Topology::discover(),
        &fnx_sys::placement::allowed_cpus(),
    )?;
    let register = Register {
        uid: b.uid.clone(),
        host: node_name(),
        pid: std::process::id(),
        cores,
        slots,
        prefetch: b.prefetch.unwrap_or(slots.max(DEFAULT_MIN_PREFETCH)),
        block_id: b.block_id,
        zero_work: b.zero_work,
        fnx_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tracing::info!(
        "manager {} starting: {slots} slots on {} ({} cores), interchange {}",
        b.uid,
        register.host,
        cores,
        b.interchange
    );
    let zerr = |what: &'static str| move |source| ManagerError::Zmq { what, source };
    let ctx = zmq::Context::new();
    let pool_side = ctx.socket(zmq::PAIR).map_err(zerr("socket"))?;
    pool_side
        .bind("inproc://fnx-manager-link")
        .map_err(zerr("bind inproc"))?;
    let link_side = ctx.socket(zmq::PAIR).map_err(zerr("socket"))?;
    link_side
        .connect("inproc://fnx-manager-link")
        .map_err(zerr("connect inproc"))?;
    let curve = match &b.curve_keys {
        Some(path) => Some(read_keys(path)?),
        None => None,
    };
    let link_cfg = link::LinkConfig {
        curve,
        interchange: b.interchange.clone(),
        heartbeat_period: fnx_protocol::bounded_ms(b.heartbeat_period_ms),
        heartbeat_threshold: fnx_protocol::bounded_ms(b.heartbeat_threshold_ms),
        max_frame_bytes: fnx_protocol::DEFAULT_MAX_FRAME_BYTES,
    };
    let link_ctx = ctx.clone();
    let link_thread = std::thread::Builder::new()
        .name("link".into())
        .spawn(move || link::run(&link_ctx, link_cfg, register, link_side))
        .map_err(io("cannot start the link thread"))?;
    let mem_limit = b.mem_per_worker_mb.filter(|m| *m > 0).map(|m| m << 20);
    // A result travels to the interchange in one message with others of up to a few MiB: a
    // larger one than a message can hold would be lost, so it is refused as too large.
    let max_result_bytes = b.max_result_bytes.min(fnx_protocol::LARGEST_RESULT_BYTES);
    if max_result_bytes < b.max_result_bytes {
        tracing::warn!(
            "results are limited to {} MiB here, not {} MiB (limits.max_result_mb): a message \
             to the interchange holds at most {} MiB",
            max_result_bytes >> 20,
            b.max_result_bytes >> 20,
            fnx_protocol::DEFAULT_MAX_FRAME_BYTES >> 20
        );
    }
    // Sandboxed tasks share this account: the workers' memory cgroups are made before the
    // sandbox, which hides them (a task could otherwise raise its own limit).
    let cgroups = (!b.protect.is_empty()).then(|| pool::memory_cgroups(mem_limit.unwrap_or(0)));
    let cgroup_dirs = cgroups
        .as_ref()
        .and_then(|c| c.as_ref())
        .map(|c| (c.own(), c.dir()));
    let sandbox = sandbox(b, &dir, &script, cgroup_dirs);
    let pool_cfg = pool::PoolConfig {
        slots: slots as usize,
        python: b.python.clone(),
        worker_script: script,
        log_dir: dir,
        markers: procs::Markers {
            run_id: b.run_id.clone(),
            manager: format!("{}.{}", b.run_id, b.uid),
            sandbox,
        },
        max_result_bytes,
        kill_grace: fnx_protocol::bounded_ms(b.kill_grace_ms),
        zero_work: b.zero_work,
        max_frame_bytes: fnx_protocol::DEFAULT_MAX_FRAME_BYTES,
        run_dir: b.run_dir.clone(),
        placement,
        container: b.container.clone().map(|container| procs::Wrap {
            container,
            rundir: b.run_dir.clone(),
        }),
        container_idle: Duration::from_secs(b.container_idle_s.unwrap_or(300))
            .min(fnx_protocol::LONGEST_WAIT),
        mem_limit,
        drain_at: drain_deadline(
            started,
            b.drain_after_ms,
            std::env::var("FNX_DRAIN_AT").ok().as_deref(),
        ),
    };
    let end = pool::driver::run(pool_cfg, &pool_side, &signals, cgroups);
    let _ = link_thread.join();
    tracing::info!("manager {} stopped: {end:?}", b.uid);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_placeholders_use_the_launchers_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(expand_uid("b3.{rank}", env(&[("PMI_RANK", "2")])), "b3.2");
        assert_eq!(
            expand_uid(
                "b3.{rank}",
                env(&[("SLURM_PROCID", "0"), ("PMI_RANK", "5")])
            ),
            "b3.5",
            "mpiexec's rank wins over the batch script's SLURM_PROCID"
        );
        assert_eq!(
            expand_uid("b3.{rank}", env(&[("SLURM_PROCID", "1")])),
            "b3.1"
        );
        assert_eq!(
            expand_uid("b3.{rank}", env(&[("ALPS_APP_PE", "x")])),
            "b3.0"
        );
        assert_eq!(expand_uid("plain", env(&[("PMI_RANK", "2")])), "plain");
    }

    #[test]
    fn the_drain_deadline_is_the_earlier_of_relative_and_absolute() {
        let t0 = std::time::Instant::now();
        let d = drain_deadline(t0, Some(60_000), None).unwrap();
        assert_eq!(d, t0 + Duration::from_secs(60));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let d = drain_deadline(t0, Some(600_000), Some(&(now + 10).to_string())).unwrap();
        assert!(d <= std::time::Instant::now() + Duration::from_secs(11));
        assert!(drain_deadline(t0, None, Some("garbage")).is_none());
        assert!(drain_deadline(t0, None, None).is_none());
    }

    #[test]
    fn slots_respect_cores_and_memory_per_worker() {
        let mut b = ManagerBootstrap::new("tcp://h:1".into(), "u".into(), "/r".into(), "r".into());
        assert_eq!(slot_count(&b, 64, 1 << 40), 64);
        b.cores_per_worker = Some(4.0);
        assert_eq!(slot_count(&b, 64, 1 << 40), 16);
        b.mem_per_worker_mb = Some(16 << 10);
        assert_eq!(slot_count(&b, 64, 128 << 30), 8);
        b.slots = Some(2);
        assert_eq!(slot_count(&b, 64, 128 << 30), 2);
        b.cores_per_worker = Some(128.0);
        assert_eq!(slot_count(&b, 64, 128 << 30), 1);
    }
}
