//! `fnx manager`: the node manager role. Its flags are exactly what
//! `fnx_launcher::manager_args` renders from a `ManagerBootstrap`.

use crate::{logging, EXIT_LINK, EXIT_OK, EXIT_USAGE};
use clap::Args;
use fnx_manager::PoolEnd;
use fnx_protocol::{BlockId, Container, ManagerBootstrap, Runtime};

/// A container runtime's name.
pub fn parse_runtime(s: &str) -> Result<Runtime, String> {
    Runtime::parse(s).ok_or_else(|| {
        format!("{s:?} is not a container runtime (apptainer, singularity, docker, podman, shifter, custom)")
    })
}
use std::path::PathBuf;

/// Flags of `fnx manager`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ManagerArgs {
    /// ZeroMQ endpoint of the interchange (tcp://HOST:PORT).
    #[arg(long, required_unless_present = "print_plan")]
    pub interchange: Option<String>,
    /// Unique name of this manager launch; `{rank}` is replaced by the launcher's rank of this
    /// process (SLURM_PROCID, PMI_RANK, OMPI_COMM_WORLD_RANK, PMIX_RANK, PALS_RANKID or
    /// ALPS_APP_PE), so one command line started on every node gives every manager its own name
    #[arg(long, required_unless_present = "print_plan")]
    pub uid: Option<String>,
    /// Directory for logs (the manager writes into RUN_DIR/UID/).
    #[arg(long, required_unless_present = "print_plan")]
    pub run_dir: Option<PathBuf>,
    /// Marker put into the environment of every process the manager starts.
    #[arg(long, required_unless_present = "print_plan")]
    pub run_id: Option<String>,
    /// Python interpreter for workers.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Heartbeat period in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_period_ms: u64,
    /// Interchange silence (ms) after which the manager exits.
    #[arg(long, default_value_t = 30000)]
    pub heartbeat_threshold_ms: u64,
    /// Largest result in bytes.
    #[arg(long, default_value_t = 10 << 20)]
    pub max_result_bytes: u64,
    /// Milliseconds between SIGTERM and SIGKILL when a task is killed.
    #[arg(long, default_value_t = 2000)]
    pub kill_grace_ms: u64,
    /// The block (batch job) this manager belongs to.
    #[arg(long)]
    pub block_id: Option<u64>,
    /// Worker slots (default: the CPUs this process may use).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Cores each worker needs (slots are at most cores / this)
    #[arg(long)]
    pub cores_per_worker: Option<f64>,
    /// Memory each worker needs in MiB (slots are at most node memory / this)
    #[arg(long)]
    pub mem_per_worker_mb: Option<u64>,
    /// Drain this many milliseconds after start: take no new tasks, finish the held ones, exit
    /// (batch jobs set it to end before their walltime)
    #[arg(long)]
    pub drain_after_ms: Option<u64>,
    /// How workers are pinned to this node's cores: none, block, block-reverse, alternating,
    /// numa, or list:CPUS:CPUS... (one CPU list per worker, e.g. list:0-3:4-7)
    #[arg(long, value_name = "POLICY")]
    pub cpu_affinity: Option<String>,
    /// Accelerators (GPU ids) shared out over the workers, e.g. 0,1,2,3 (several workers may
    /// share one; each sees its own through CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES and
    /// ZE_AFFINITY_MASK)
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub accelerators: Vec<String>,
    /// Start workers and shell tasks inside a container: apptainer, singularity, docker,
    /// podman, shifter, or custom (with --container-template)
    #[arg(long, value_parser = parse_runtime, value_name = "RUNTIME")]
    pub container_runtime: Option<Runtime>,
    /// The container image (a .sif file, a registry reference, ...)
    #[arg(long, value_name = "IMAGE", requires = "container_runtime")]
    pub container_image: Option<String>,
    /// Command template of a custom runtime: words, with {image}, {rundir} and a {cmd} word
    /// (e.g. "bwrap --ro-bind / / --bind {rundir} {rundir} {cmd}"); no shell is involved
    #[arg(long, value_name = "TEMPLATE", requires = "container_runtime")]
    pub container_template: Option<String>,
    /// Idle workers of a function's own container exit after this many seconds [default: 300]
    #[arg(long, value_name = "SECONDS")]
    pub container_idle_s: Option<u64>,
    /// Print the worker placement this manager would use on this node (CPUs, accelerators and
    /// environment of each worker slot) and exit
    #[arg(long)]
    pub print_plan: bool,
    /// With --print-plan: plan for the topology in this hwloc XML file (`lstopo --of xml`)
    /// instead of this node's, with all its CPUs allowed
    #[arg(long, value_name = "FILE", requires = "print_plan")]
    pub topology: Option<PathBuf>,
    /// Tasks accepted beyond the slots (default: as many as slots, at least 64).
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Complete tasks without running them (overhead measurement).
    #[arg(long)]
    pub zero_work: bool,
    /// Key file of the link to the interchange (CurveZMQ; written by the daemon into its key
    /// directory, readable only by its owner), or `-` to read the keys from standard input.
    /// Interchanges accept only managers holding keys they issued
    #[arg(long, value_name = "FILE")]
    pub curve_keys: Option<PathBuf>,
    /// Keep the processes this manager starts on the host out of PATH (repeatable): the
    /// daemon's data directory, when tasks run under the daemon's own account. Enforced with
    /// Landlock where the kernel has it (a warning otherwise)
    #[arg(long, value_name = "PATH")]
    pub protect: Vec<PathBuf>,
}

impl From<ManagerArgs> for ManagerBootstrap {
    fn from(a: ManagerArgs) -> Self {
        ManagerBootstrap {
            interchange: a.interchange.unwrap_or_default(),
            uid: a.uid.unwrap_or_default(),
            block_id: a.block_id.map(BlockId),
            slots: a.slots,
            cores_per_worker: a.cores_per_worker,
            mem_per_worker_mb: a.mem_per_worker_mb,
            drain_after_ms: a.drain_after_ms,
            cpu_affinity: a.cpu_affinity,
            accelerators: a.accelerators,
            container: a.container_runtime.map(|runtime| Container {
                runtime,
                image: a.container_image.unwrap_or_default(),
                template: a.container_template,
            }),
            container_idle_s: a.container_idle_s,
            prefetch: a.prefetch,
            zero_work: a.zero_work,
            python: a.python,
            run_dir: a.run_dir.unwrap_or_default(),
            run_id: a.run_id.unwrap_or_default(),
            heartbeat_period_ms: a.heartbeat_period_ms,
            heartbeat_threshold_ms: a.heartbeat_threshold_ms,
            max_result_bytes: a.max_result_bytes,
            kill_grace_ms: a.kill_grace_ms,
            curve_keys: a.curve_keys,
            protect: a.protect,
        }
    }
}

/// `fnx manager --print-plan`: the placement of this node's (or a topology file's) worker
/// slots.
fn print_plan(args: ManagerArgs) -> u8 {
    use fnx_sys::placement::{allowed_cpus, PlanReport, Topology};
    // Only prints: `fnx manager --print-plan | head` ends quietly, like other Unix tools.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let topo_file = args.topology.clone();
    let b = ManagerBootstrap::from(args);
    let (topo, allowed) = match &topo_file {
        Some(f) => match std::fs::read_to_string(f)
            .map_err(|e| e.to_string())
            .and_then(|t| Topology::from_hwloc_xml(&t).map_err(|e| e.to_string()))
        {
            Ok(t) => {
                let all = t.pus.iter().map(|p| p.os).collect();
                (t, all)
            }
            Err(e) => {
                eprintln!("fnx manager: cannot read the topology {}: {e}", f.display());
                return EXIT_USAGE;
            }
        },
        None => (Topology::discover(), allowed_cpus()),
    };
    let cores = allowed.len() as u32;
    let slots = fnx_manager::slot_count(&b, cores, fnx_sys::node::total_memory_bytes());
    match fnx_manager::placement_plan(&b, slots, &topo, &allowed) {
        Ok(plan) => {
            let affinity = b
                .cpu_affinity
                .as_deref()
                .unwrap_or("none")
                .parse()
                .expect("parsed by placement_plan");
            print!(
                "{}",
                PlanReport {
                    topo: &topo,
                    allowed: &allowed,
                    affinity: &affinity,
                    plan: &plan,
                }
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fnx manager: {e}");
            EXIT_USAGE
        }
    }
}

/// Run a manager; the exit status tells its launcher how it ended.
pub fn run(args: ManagerArgs) -> u8 {
    if args.print_plan {
        return print_plan(args);
    }
    let mut b = ManagerBootstrap::from(args);
    b.uid = fnx_manager::expand_uid(&b.uid, |k| std::env::var(k).ok());
    let dir = b.dir();
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| logging::to_file(&dir.join("manager.log")))
    {
        eprintln!(
            "fnx manager: cannot write logs under {}: {e}",
            dir.display()
        );
        return EXIT_USAGE;
    }
    match fnx_manager::run(&b) {
        Ok(PoolEnd::Drained | PoolEnd::Shutdown(_)) => EXIT_OK,
        Ok(PoolEnd::Signal(sig)) => 128u8.saturating_add(sig as u8),
        Ok(PoolEnd::LinkLost(reason)) => {
            eprintln!("fnx manager {}: {reason}", b.uid);
            EXIT_LINK
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fnx manager {}: {e}", b.uid);
            EXIT_USAGE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(clap::Subcommand)]
    enum Sub {
        Manager(ManagerArgs),
    }

    #[test]
    fn the_launcher_command_line_parses_back_into_the_same_bootstrap() {
        let mut b = ManagerBootstrap::new(
            "tcp://10.1.2.3:5555".into(),
            "blk-1/m 0".into(),
            "/tmp/run dir".into(),
            "r1".into(),
        );
        b.block_id = Some(BlockId(7));
        b.slots = Some(64);
        b.prefetch = Some(3);
        b.zero_work = true;
        b.python = "/opt/py/bin/python3".into();
        b.kill_grace_ms = 250;
        b.curve_keys = Some("/shared/keys/gpu.manager".into());
        b.cores_per_worker = Some(1.5);
        b.mem_per_worker_mb = Some(2048);
        b.drain_after_ms = Some(3_300_000);
        b.cpu_affinity = Some("list:0-3:4-7".into());
        b.accelerators = vec!["0".into(), "1".into()];
        b.container = Some(Container {
            runtime: Runtime::Custom,
            image: "img".into(),
            template: Some("bwrap --bind {rundir} {rundir} {cmd}".into()),
        });
        let mut argv = vec!["fnx".to_string()];
        argv.extend(fnx_launcher::manager_args(&b));
        let Sub::Manager(args) = Wrapper::try_parse_from(argv).expect("parses").cmd;
        assert_eq!(ManagerBootstrap::from(args), b);
    }
}
