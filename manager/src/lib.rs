//! The node manager: one per compute node, started by a launcher from a
//! [`fnx_protocol::ManagerBootstrap`].
//!
//! # Layout
//! - [`link`]: the thread that owns the interchange socket — registration, heartbeats on its own
//!   clock, silence detection, relaying frames.
//! - [`pool`]: the main thread's loop — Python workers and shell tasks, walltime (SIGTERM, grace,
//!   SIGKILL of the process group, then a sweep by environment marker), result batching, cancel,
//!   zero-work mode.
//! - [`procs`]: starting and reading worker and shell processes (process groups, death signal,
//!   markers).
//! - [`wire`]: frames between the manager and its Python workers.
//! - [`sandbox`]: a task's own working directory with its input files.
//!
//! The Python worker runtime (`sdk/python/fnx/worker.py`) is embedded as [`WORKER_PY`].
#![deny(missing_docs)]

pub mod link;
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
    /// The key file of an encrypted link cannot be used.
    #[error("key file {path}: {what}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Read an encrypted link's key file; refuse one that others may read.
fn read_keys(path: &std::path::Path) -> Result<link::ClientKeys, ManagerError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |what: String| ManagerError::Keys {
        path: path.to_path_buf(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "has mode {mode:03o}; a key file must be readable only by its owner (chmod 600)"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let keys = fnx_protocol::KeyFile::parse(&text).map_err(|e| err(e.to_string()))?;
    let decode = |name: &str, z85: &str| {
        zmq::z85_decode(z85)
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| err(format!("{name} is not a Z85 key")))
    };
    Ok(link::ClientKeys {
        server_public: decode("server_public", &keys.server_public)?,
        public: decode("public", &keys.public)?,
        secret: decode("secret", &keys.secret)?,
    })
}

/// The directory a manager writes its logs and worker runtime into.
pub fn manager_dir(bootstrap: &ManagerBootstrap) -> PathBuf {
    bootstrap.run_dir.join(&bootstrap.uid)
}

/// Run a manager until it is released, told to stop, loses the interchange or gets a signal.
///
/// The caller sets up logging (to `manager_dir(..)/manager.log`) before calling this.
pub fn run(b: &ManagerBootstrap) -> Result<PoolEnd, ManagerError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ManagerError::Io { what, source }
    };
    let dir = manager_dir(b);
    std::fs::create_dir_all(&dir).map_err(io("cannot create the manager directory"))?;
    let script = dir.join("fnx_worker.py");
    std::fs::write(&script, WORKER_PY).map_err(io("cannot write the worker runtime"))?;
    if let Err(e) = fnx_sys::process::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({e}); orphans of tasks are found by marker only"
        );
    }
    let signals = fnx_sys::signals::install(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
        .map_err(io("cannot install signal handlers"))?;
    let cores = fnx_sys::node::usable_cpus();
    let slots = b.slots.unwrap_or(cores).max(1);
    let register = Register {
        uid: b.uid.clone(),
        host: fnx_sys::node::hostname(),
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
        heartbeat_period: Duration::from_millis(b.heartbeat_period_ms),
        heartbeat_threshold: Duration::from_millis(b.heartbeat_threshold_ms),
        max_frame_bytes: fnx_protocol::DEFAULT_MAX_FRAME_BYTES,
    };
    let link_ctx = ctx.clone();
    let link_thread = std::thread::Builder::new()
        .name("link".into())
        .spawn(move || link::run(&link_ctx, link_cfg, register, link_side))
        .map_err(io("cannot start the link thread"))?;
    let pool_cfg = pool::PoolConfig {
        slots: slots as usize,
        python: b.python.clone(),
        worker_script: script,
        log_dir: dir,
        markers: procs::Markers {
            run_id: b.run_id.clone(),
            manager: format!("{}.{}", b.run_id, b.uid),
        },
        max_result_bytes: b.max_result_bytes,
        kill_grace: Duration::from_millis(b.kill_grace_ms),
        zero_work: b.zero_work,
        max_frame_bytes: fnx_protocol::DEFAULT_MAX_FRAME_BYTES,
    };
    let end = pool::Pool::new(pool_cfg, &pool_side, &signals).run();
    let _ = link_thread.join();
    tracing::info!("manager {} stopped: {end:?}", b.uid);
    Ok(end)
}
