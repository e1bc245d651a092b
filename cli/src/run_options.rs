//! The options of how tasks run in embedded mode (`fnx map`, `fnx run`), their checks, and the
//! local pool they describe.

use clap::Args;
use fnx_daemon::local::{PoolOptions, WorkerShape};
use std::path::PathBuf;
use std::time::Duration;

/// How tasks run; shared by `map` and `run`.
#[derive(Args, Debug, Clone)]
pub struct RunOptions {
    /// Workers per manager [default: the CPUs this process may use]
    #[arg(short = 'w', long, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: Option<u32>,
    /// Local manager processes
    #[arg(short = 'm', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub managers: u32,
    /// Wall-clock limit per task, in seconds (SIGTERM, grace, then SIGKILL of all its processes)
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    pub walltime: Option<f64>,
    /// Python interpreter for workers
    #[arg(long, env = "FNX_PYTHON", default_value = "python3")]
    pub python: String,
    /// Re-runs of a task after an infrastructure failure (worker or manager lost); user
    /// exceptions are never retried
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
    /// Largest result a task may return, in bytes (larger: a result_too_large error)
    #[arg(long, default_value_t = 10 << 20)]
    pub max_result_bytes: u64,
    /// Directory for this run's logs [default: $FNX_HOME/runs/<time>-<pid>]
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Tasks each manager holds beyond its workers, to hide dispatch latency; lower it for
    /// long tasks spread over many managers [default: workers, at least 64]
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Seconds between SIGTERM and SIGKILL when a task is killed
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS", value_parser = seconds)]
    pub kill_grace: f64,
    /// Pin workers to cores: none, block, block-reverse, alternating, numa, or
    /// list:CPUS:CPUS... (one list per worker); `fnx manager --print-plan` shows the result
    #[arg(long, value_name = "POLICY")]
    pub cpu_affinity: Option<String>,
    /// Accelerators (GPU ids, e.g. 0,1,2,3) shared out over each manager's workers
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub accelerators: Vec<String>,
    /// Start workers and shell tasks in a container: apptainer, singularity, docker, podman,
    /// shifter, or custom (with --container-template)
    #[arg(long, value_parser = crate::manager_cmd::parse_runtime, value_name = "RUNTIME")]
    pub container_runtime: Option<fnx_protocol::Runtime>,
    /// The container image
    #[arg(long, value_name = "IMAGE", requires = "container_runtime")]
    pub container_image: Option<String>,
    /// Template of a custom runtime: words with {image}, {rundir} and a {cmd} word, e.g.
    /// "bwrap --ro-bind / / --bind {rundir} {rundir} {cmd}" (no shell is involved)
    #[arg(long, value_name = "TEMPLATE", requires = "container_runtime")]
    pub container_template: Option<String>,
    /// Heartbeat period in seconds
    #[arg(long, default_value_t = 5.0, hide = true, value_parser = seconds)]
    pub heartbeat_period: f64,
    /// Silence in seconds after which a manager or the interchange is declared lost
    #[arg(long, default_value_t = 30.0, hide = true, value_parser = seconds)]
    pub heartbeat_threshold: f64,
}

impl RunOptions {
    /// The container of `--container-*`, if one is asked for.
    pub fn container(&self) -> Option<fnx_protocol::Container> {
        self.container_runtime
            .map(|runtime| fnx_protocol::Container {
                runtime,
                image: self.container_image.clone().unwrap_or_default(),
                template: self.container_template.clone(),
            })
    }

    /// The local pool these options describe (managers started here; `fnx map --launcher`
    /// changes how).
    pub fn pool_options(&self, run_dir: PathBuf, run_id: String) -> PoolOptions {
        let secs = Duration::from_secs_f64;
        PoolOptions {
            managers: self.managers,
            workers: self.workers,
            prefetch: self.prefetch,
            python: self.python.clone(),
            heartbeat_period: secs(self.heartbeat_period),
            heartbeat_threshold: secs(self.heartbeat_threshold),
            max_result_bytes: self.max_result_bytes,
            kill_grace: secs(self.kill_grace),
            shape: WorkerShape {
                cpu_affinity: self.cpu_affinity.clone(),
                accelerators: self.accelerators.clone(),
                container: self.container(),
                ..WorkerShape::default()
            },
            ..PoolOptions::new(run_dir, run_id)
        }
    }
}

/// The most seconds a flag takes: a billion (31 years). More is a mistake, and would overflow
/// a deadline.
const MAX_SECONDS: f64 = 1e9;

/// A flag's value that is not a number of seconds it may take.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a number of seconds from 0 to {MAX_SECONDS:e}")]
pub(crate) struct NotSeconds(String);

/// A flag's number of seconds: finite, from 0 to [`MAX_SECONDS`].
pub(crate) fn seconds(text: &str) -> Result<f64, NotSeconds> {
    match text.trim().parse::<f64>() {
        Ok(v) if (0.0..=MAX_SECONDS).contains(&v) => Ok(v),
        _ => Err(NotSeconds(text.to_string())),
    }
}

/// Run options that cannot go together, or say what cannot be.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadOptions {
    /// A walltime of nothing.
    #[error("--walltime must be above 0 seconds")]
    NoWalltime,
    /// The container flags name no usable container.
    #[error("--container-runtime: {0}")]
    Container(#[from] fnx_protocol::ContainerError),
    /// Not a pinning policy.
    #[error("--cpu-affinity: {0}")]
    CpuAffinity(#[from] fnx_sys::placement::PlacementError),
}

pub(crate) fn validate_options(o: &RunOptions) -> Result<(), BadOptions> {
    // The flags' parser bounds every number of seconds; a walltime must also be above zero.
    if o.walltime == Some(0.0) {
        return Err(BadOptions::NoWalltime);
    }
    if let Some(c) = o.container() {
        c.validate()?;
    }
    if let Some(a) = &o.cpu_affinity {
        a.parse::<fnx_sys::placement::CpuAffinity>()?;
    }
    Ok(())
}
