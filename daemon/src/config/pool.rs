//! `[pools.NAME]`: who starts a pool's managers (local processes, or blocks submitted to Slurm,
//! PBS Pro or Cobalt), how big the blocks are and how they scale.

use super::Problems;
use fnx_launcher::block::parse_walltime;
use fnx_launcher::{BlockSpec, Launcher, MpiFlavor, Provider};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Deserialize, Default)]
pub(super) struct RawPool {
    provider: Option<String>,
    launcher: Option<String>,
    managers: Option<u32>,
    workers_per_manager: Option<u32>,
    workers_per_node: Option<u32>,
    cores_per_worker: Option<f64>,
    mem_per_worker: Option<f64>,
    python: Option<String>,
    kill_grace_s: Option<f64>,
    cpu_affinity: Option<String>,
    available_accelerators: Option<Accelerators>,
    container_runtime: Option<String>,
    container_image: Option<String>,
    container_template: Option<String>,
    container_idle_s: Option<f64>,
    nodes_per_block: Option<u32>,
    init_blocks: Option<u32>,
    min_blocks: Option<u32>,
    max_blocks: Option<u32>,
    parallelism: Option<f64>,
    max_idletime: Option<f64>,
    walltime: Option<String>,
    drain_margin_s: Option<f64>,
    account: Option<String>,
    partition: Option<String>,
    queue: Option<String>,
    qos: Option<String>,
    constraint: Option<String>,
    exclusive: Option<bool>,
    cores_per_node: Option<u32>,
    gpus_per_node: Option<u32>,
    scheduler_options: Option<String>,
    worker_init: Option<String>,
    launcher_options: Option<String>,
    mpiexec: Option<String>,
    mpi_flavor: Option<String>,
    address: Option<String>,
    interface: Option<String>,
    fnx_path: Option<PathBuf>,
    poll_interval_s: Option<f64>,
    scaling_interval_s: Option<f64>,
    max_failed_blocks: Option<u32>,
    submit_timeout_s: Option<f64>,
    connect_timeout_s: Option<f64>,
}

/// `available_accelerators`: a count (`4` = "0".."3") or explicit ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Accelerators {
    Count(u32),
    Ids(Vec<String>),
}

/// One pool of workers.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Its name (the key in `[pools.NAME]`).
    pub name: String,
    /// Manager processes the daemon starts on this host (local provider). 0: none; managers
    /// started elsewhere (`fnx manager --interchange ...`) connect to the pool's interchange.
    pub managers: u32,
    /// Worker slots per manager (None: one per core).
    pub workers_per_manager: Option<u32>,
    /// How its managers size, pin and contain their workers.
    pub shape: crate::local::WorkerShape,
    /// Interpreter for Python workers.
    pub python: String,
    /// SIGTERM → SIGKILL grace when a task is killed.
    pub kill_grace: Duration,
    /// Batch providers: the blocks the daemon submits (None: local pool).
    pub blocks: Option<BlocksConfig>,
}

/// How a batch pool's blocks look and scale.
#[derive(Clone, Debug)]
pub struct BlocksConfig {
    /// What each block is (provider, launcher, resources, scripts).
    pub spec: BlockSpec,
    /// Blocks submitted at start.
    pub init_blocks: u32,
    /// Blocks kept even when idle.
    pub min_blocks: u32,
    /// Most blocks at once.
    pub max_blocks: u32,
    /// Slots wanted per active task.
    pub parallelism: f64,
    /// Idle time after which a block is drained and released.
    pub max_idletime: Duration,
    /// Managers drain this long before the walltime ends.
    pub drain_margin: Duration,
    /// The address managers connect to, or the interface to take it from.
    pub connect: Connect,
    /// `fnx` on the compute nodes (None: this executable's path).
    pub fnx_path: Option<PathBuf>,
    /// Job status poll interval.
    pub poll_interval: Duration,
    /// Scaling decision interval.
    pub scaling_interval: Duration,
    /// Blocks in a row ending without a manager before the pool is marked failed.
    pub max_failed_blocks: u32,
    /// Timeout of batch commands.
    pub submit_timeout: Duration,
    /// A running job whose managers do not connect within this time is cancelled.
    pub connect_timeout: Duration,
}

/// Where managers find the interchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    /// The interchange's own address (`interchange.address`).
    Interchange,
    /// A given address.
    Address(String),
    /// The IPv4 address of this network interface of the daemon's host.
    Interface(String),
}

/// A value pasted into a batch directive must be one plain word.
fn word(p: &mut Problems, key: &str, v: Option<String>) -> Option<String> {
    let v = v?;
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:=+@/%".contains(c))
    {
        p.0.push(format!(
            "{key}: {v:?} must be one word of letters, digits and -_.,:=+@/%"
        ));
        return None;
    }
    Some(v)
}

/// Problems found in one pool's table, each named by its key (`pools.NAME.key`).
struct Check<'a> {
    name: &'a str,
    p: &'a mut Problems,
}

impl Check<'_> {
    fn key(&self, k: &str) -> String {
        format!("pools.{}.{k}", self.name)
    }

    /// Record a problem with `k`.
    fn bad(&mut self, k: &str, why: impl std::fmt::Display) {
        let key = self.key(k);
        self.p.0.push(format!("{key}: {why}"));
    }

    /// Seconds (see [`Problems::secs`]).
    fn secs(&mut self, k: &str, v: Option<f64>, default: f64, min: f64) -> Duration {
        let key = self.key(k);
        self.p.secs(&key, v, default, min)
    }

    /// A value above 0, or None (a problem when it is not).
    fn positive(&mut self, k: &str, v: Option<f64>) -> Option<f64> {
        let v = v?;
        let ok = v.is_finite() && v > 0.0;
        if !ok {
            self.bad(k, format!("must be above 0, got {v}"));
        }
        ok.then_some(v)
    }

    /// One plain word pasted into a batch directive (see [`word`]).
    fn word(&mut self, k: &str, v: Option<String>) -> Option<String> {
        let key = self.key(k);
        word(self.p, &key, v)
    }
}

pub(super) fn validate(name: String, mut rp: RawPool, p: &mut Problems) -> PoolConfig {
    let mut c = Check { name: &name, p };
    let (provider, launcher) = provider_and_launcher(&mut c, &rp);
    let managers = rp.managers.unwrap_or(1);
    if managers > 1024 {
        c.bad("managers", format!("must be 0..=1024, got {managers}"));
    }
    let python = rp.python.take().unwrap_or_else(|| "python3".into());
    if python.trim().is_empty() {
        c.bad("python", "must not be empty");
    }
    if rp.workers_per_manager.is_some() && rp.workers_per_node.is_some() {
        c.bad(
            "workers_per_node",
            "give workers_per_node or workers_per_manager (the same thing), not both",
        );
    }
    let workers = rp
        .workers_per_node
        .or(rp.workers_per_manager)
        .filter(|&w| w > 0);
    let shape = worker_shape(&mut c, &mut rp);
    let kill_grace = c.secs("kill_grace_s", rp.kill_grace_s, 2.0, 0.0);
    let blocks = if provider == Provider::Local {
        local_only(&mut c, &rp, launcher);
        None
    } else {
        Some(blocks(&mut c, rp, provider, launcher))
    };
    PoolConfig {
        managers: if blocks.is_some() {
            0
        } else {
            managers.min(1024)
        },
        workers_per_manager: workers,
        shape,
        python,
        kill_grace,
        blocks,
        name,
    }
}

/// Who starts the managers, and how (each defaults from the other).
fn provider_and_launcher(c: &mut Check, rp: &RawPool) -> (Provider, Launcher) {
    let provider = match rp.provider.as_deref().map(|s| (s, Provider::parse(s))) {
        None => Provider::Local,
        Some((_, Some(prov))) => prov,
        Some((other, None)) => {
            c.bad(
                "provider",
                format!(
                    "{other:?} is not a provider (\"local\", \"slurm\", \"pbs\" or \"cobalt\")"
                ),
            );
            Provider::Local
        }
    };
    let launcher = match rp.launcher.as_deref().map(|s| (s, Launcher::parse(s))) {
        None => provider.default_launcher(),
        Some((_, Some(l))) => l,
        Some((other, None)) => {
            c.bad(
                "launcher",
                format!(
                    "{other:?} is not a launcher (\"single\", \"srun\", \"mpiexec\" or \"aprun\")"
                ),
            );
            provider.default_launcher()
        }
    };
    (provider, launcher)
}

/// How the pool's managers size, pin and contain their workers.
fn worker_shape(c: &mut Check, rp: &mut RawPool) -> crate::local::WorkerShape {
    let cores_per_worker = c.positive("cores_per_worker", rp.cores_per_worker);
    let mem_per_worker_mb = c
        .positive("mem_per_worker", rp.mem_per_worker)
        .map(|gb| (gb * 1024.0).ceil() as u64);
    let cpu_affinity = rp.cpu_affinity.take().filter(|a| {
        let ok = a.parse::<fnx_sys::placement::CpuAffinity>();
        if let Err(e) = &ok {
            c.bad("cpu_affinity", e);
        }
        ok.is_ok()
    });
    let container = container(c, rp);
    let container_idle = rp
        .container_idle_s
        .map(|v| c.secs("container_idle_s", Some(v), 300.0, 1.0));
    crate::local::WorkerShape {
        cores_per_worker,
        mem_per_worker_mb,
        cpu_affinity,
        accelerators: accelerators(c, rp.available_accelerators.take()),
        container,
        container_idle,
    }
}

/// The container the pool's workers start in (`container_runtime`, `_image`, `_template`).
fn container(c: &mut Check, rp: &mut RawPool) -> Option<fnx_protocol::Container> {
    let Some(r) = rp.container_runtime.as_deref() else {
        if rp.container_image.is_some() || rp.container_template.is_some() {
            c.bad(
                "container_runtime",
                "container_image and container_template need container_runtime",
            );
        }
        return None;
    };
    let Some(runtime) = fnx_protocol::Runtime::parse(r) else {
        c.bad(
            "container_runtime",
            format!("{r:?} is not apptainer, singularity, docker, podman, shifter or custom"),
        );
        return None;
    };
    let container = fnx_protocol::Container {
        runtime,
        image: rp.container_image.take().unwrap_or_default(),
        template: rp.container_template.take(),
    };
    if let Err(e) = container.validate() {
        c.bad("container_runtime", e);
    }
    Some(container)
}

/// `available_accelerators`: a count, or ids that can go into a list.
fn accelerators(c: &mut Check, given: Option<Accelerators>) -> Vec<String> {
    match given {
        None => Vec::new(),
        Some(Accelerators::Count(n)) => (0..n).map(|i| i.to_string()).collect(),
        Some(Accelerators::Ids(ids)) => {
            if let Some(bad) = ids
                .iter()
                .find(|i| i.is_empty() || i.contains([',', ' ', '\n']))
            {
                c.bad(
                    "available_accelerators",
                    format!("{bad:?} is not an accelerator id"),
                );
            }
            ids
        }
    }
}

/// A local pool: its launcher is `single`, and no batch key may be given.
fn local_only(c: &mut Check, rp: &RawPool, launcher: Launcher) {
    if launcher != Launcher::Single {
        c.bad(
            "launcher",
            format!(
                "a local pool starts its managers itself; {:?} needs provider \"slurm\", \
                 \"pbs\" or \"cobalt\"",
                launcher.name()
            ),
        );
    }
    let batch_keys = [
        ("nodes_per_block", rp.nodes_per_block.is_some()),
        ("init_blocks", rp.init_blocks.is_some()),
        ("min_blocks", rp.min_blocks.is_some()),
        ("max_blocks", rp.max_blocks.is_some()),
        ("walltime", rp.walltime.is_some()),
        ("account", rp.account.is_some()),
        ("partition", rp.partition.is_some()),
        ("queue", rp.queue.is_some()),
        ("worker_init", rp.worker_init.is_some()),
        ("scheduler_options", rp.scheduler_options.is_some()),
        ("launcher_options", rp.launcher_options.is_some()),
    ];
    for (k, given) in batch_keys {
        if given {
            c.bad(
                k,
                "only for batch providers (slurm, pbs, cobalt); this pool is local",
            );
        }
    }
}

/// A batch pool's blocks: what each is, and how they scale.
fn blocks(c: &mut Check, mut rp: RawPool, provider: Provider, launcher: Launcher) -> BlocksConfig {
    if rp.managers.is_some() {
        c.bad(
            "managers",
            format!(
                "a {} pool starts one manager per node of each block; use nodes_per_block",
                provider.name()
            ),
        );
    }
    let mut spec = block_spec(c, &mut rp, provider, launcher);
    let min_blocks = rp.min_blocks.unwrap_or(0);
    let max_blocks = rp.max_blocks.unwrap_or(1);
    let init_blocks = rp.init_blocks.unwrap_or(0);
    if max_blocks == 0 || min_blocks > max_blocks || init_blocks > max_blocks {
        c.bad(
            "max_blocks",
            format!(
                "need 0 ≤ min_blocks ≤ max_blocks, init_blocks ≤ max_blocks and max_blocks ≥ 1 \
                 (got min {min_blocks}, init {init_blocks}, max {max_blocks})"
            ),
        );
    }
    let parallelism = rp.parallelism.unwrap_or(1.0);
    let parallelism_ok = parallelism > 0.0 && parallelism <= 1.0;
    if !parallelism_ok {
        c.bad(
            "parallelism",
            format!("must be in (0, 1], got {parallelism}"),
        );
    }
    let default_margin = (spec.walltime.as_secs_f64() / 10.0).min(300.0);
    spec.drain_margin = c.secs("drain_margin_s", rp.drain_margin_s, default_margin, 0.0);
    if spec.drain_margin >= spec.walltime {
        c.bad("drain_margin_s", "must be shorter than the walltime");
    }
    let connect = connect(c, rp.address.take(), rp.interface.take());
    BlocksConfig {
        drain_margin: spec.drain_margin,
        spec,
        init_blocks,
        min_blocks,
        max_blocks: max_blocks.max(1),
        parallelism: if parallelism_ok { parallelism } else { 1.0 },
        max_idletime: c.secs("max_idletime", rp.max_idletime, 120.0, 0.0),
        connect,
        fnx_path: rp.fnx_path,
        poll_interval: c.secs("poll_interval_s", rp.poll_interval_s, 30.0, 0.1),
        scaling_interval: c.secs("scaling_interval_s", rp.scaling_interval_s, 5.0, 0.1),
        max_failed_blocks: rp.max_failed_blocks.unwrap_or(3).max(1),
        submit_timeout: c.secs("submit_timeout_s", rp.submit_timeout_s, 60.0, 1.0),
        connect_timeout: c.secs("connect_timeout_s", rp.connect_timeout_s, 300.0, 1.0),
    }
}

/// What one block is: its size and walltime, the scheduler's directives, its launch line.
fn block_spec(
    c: &mut Check,
    rp: &mut RawPool,
    provider: Provider,
    launcher: Launcher,
) -> BlockSpec {
    let mut spec = BlockSpec::new(c.name, provider, launcher);
    spec.nodes = rp.nodes_per_block.unwrap_or(1);
    if spec.nodes == 0 || spec.nodes > 100_000 {
        c.bad(
            "nodes_per_block",
            format!("must be 1..=100000, got {}", spec.nodes),
        );
        spec.nodes = 1;
    }
    if launcher == Launcher::Single && spec.nodes > 1 {
        c.bad(
            "launcher",
            format!(
                "the single launcher starts one manager; {} nodes need launcher \"srun\", \
                 \"mpiexec\" or \"aprun\"",
                spec.nodes
            ),
        );
    }
    let wall = rp.walltime.take().unwrap_or_else(|| "00:30:00".into());
    spec.walltime = parse_walltime(&wall).unwrap_or_else(|| {
        c.bad(
            "walltime",
            format!("{wall:?} is not HH:MM:SS (or D-HH:MM:SS) above zero"),
        );
        Duration::from_secs(1800)
    });
    scheduler(c, rp, &mut spec);
    spec.worker_init = rp.worker_init.take().unwrap_or_default();
    spec.launcher_options = rp.launcher_options.take().unwrap_or_default();
    if spec.launcher_options.contains('\n') {
        c.bad("launcher_options", "must be one line");
    }
    spec.mpiexec = rp.mpiexec.take().unwrap_or_else(|| "mpiexec".into());
    if spec.mpiexec.trim().is_empty() || spec.mpiexec.contains(char::is_whitespace) {
        c.bad("mpiexec", "must be a command name or path without spaces");
    }
    let flavor = rp.mpi_flavor.take().unwrap_or_else(|| "auto".into());
    spec.mpi_flavor = MpiFlavor::parse(&flavor).unwrap_or_else(|| {
        c.bad(
            "mpi_flavor",
            format!("{flavor:?} is not \"auto\", \"mpich\", \"openmpi\" or \"pals\""),
        );
        MpiFlavor::Auto
    });
    spec
}

/// The scheduler's side of a block: account, partition or queue, QoS, constraint, whole
/// nodes, cores and GPUs per node, and extra directive lines.
fn scheduler(c: &mut Check, rp: &mut RawPool, spec: &mut BlockSpec) {
    let provider = spec.provider;
    spec.account = c.word("account", rp.account.take());
    spec.partition = c.word("partition", rp.partition.take());
    spec.queue = c.word("queue", rp.queue.take());
    spec.qos = c.word("qos", rp.qos.take());
    spec.constraint = c.word("constraint", rp.constraint.take());
    spec.exclusive = rp.exclusive.unwrap_or(true);
    spec.cores_per_node = rp.cores_per_node.filter(|&n| n > 0);
    spec.gpus_per_node = rp.gpus_per_node.filter(|&g| g > 0);
    for (k, given, allowed) in [
        (
            "partition",
            spec.partition.is_some(),
            provider == Provider::Slurm,
        ),
        ("qos", spec.qos.is_some(), provider == Provider::Slurm),
        (
            "constraint",
            spec.constraint.is_some(),
            provider == Provider::Slurm,
        ),
        ("queue", spec.queue.is_some(), provider != Provider::Slurm),
    ] {
        if given && !allowed {
            let hint = if k == "queue" { " (use partition)" } else { "" };
            c.bad(
                k,
                format!("not used by provider {:?}{hint}", provider.name()),
            );
        }
    }
    spec.scheduler_options = rp.scheduler_options.take().unwrap_or_default();
    let prefix = match provider {
        Provider::Slurm => "#SBATCH",
        Provider::Pbs => "#PBS",
        _ => "#COBALT",
    };
    for line in spec.scheduler_options.lines().map(str::trim) {
        if !line.is_empty() && !line.starts_with('#') {
            c.bad(
                "scheduler_options",
                format!("{line:?} is not a directive line (they start with {prefix})"),
            );
        }
    }
}

/// Where the managers of a batch pool find the interchange.
fn connect(c: &mut Check, address: Option<String>, interface: Option<String>) -> Connect {
    match (address, interface) {
        (Some(_), Some(_)) => {
            c.bad("interface", "give address or interface, not both");
            Connect::Interchange
        }
        (Some(a), None) => {
            if a.parse::<std::net::IpAddr>().is_err() {
                c.bad("address", format!("{a:?} is not an IP address"));
            }
            Connect::Address(a)
        }
        (None, Some(i)) => Connect::Interface(i),
        (None, None) => Connect::Interchange,
    }
}
