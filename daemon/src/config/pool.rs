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

pub(super) fn validate(name: String, rp: RawPool, p: &mut Problems) -> PoolConfig {
    let key = |k: &str| format!("pools.{name}.{k}");
    let provider = match rp.provider.as_deref().map(|s| (s, Provider::parse(s))) {
        None => Provider::Local,
        Some((_, Some(prov))) => prov,
        Some((other, None)) => {
            p.0.push(format!(
                "{}: {other:?} is not a provider (\"local\", \"slurm\", \"pbs\" or \"cobalt\")",
                key("provider")
            ));
            Provider::Local
        }
    };
    let launcher = match rp.launcher.as_deref().map(|s| (s, Launcher::parse(s))) {
        None => provider.default_launcher(),
        Some((_, Some(l))) => l,
        Some((other, None)) => {
            p.0.push(format!(
                "{}: {other:?} is not a launcher (\"single\", \"srun\", \"mpiexec\" or \"aprun\")",
                key("launcher")
            ));
            provider.default_launcher()
        }
    };
    let managers = rp.managers.unwrap_or(1);
    if managers > 1024 {
        p.0.push(format!(
            "{}: must be 0..=1024, got {managers}",
            key("managers")
        ));
    }
    let python = rp.python.unwrap_or_else(|| "python3".into());
    if python.trim().is_empty() {
        p.0.push(format!("{}: must not be empty", key("python")));
    }
    if rp.workers_per_manager.is_some() && rp.workers_per_node.is_some() {
        p.0.push(format!(
            "{}: give workers_per_node or workers_per_manager (the same thing), not both",
            key("workers_per_node")
        ));
    }
    let workers = rp
        .workers_per_node
        .or(rp.workers_per_manager)
        .filter(|&w| w > 0);
    let positive = |p: &mut Problems, k: &str, v: Option<f64>| {
        v.filter(|v| {
            let ok = v.is_finite() && *v > 0.0;
            if !ok {
                p.0.push(format!("{}: must be above 0, got {v}", key(k)));
            }
            ok
        })
    };
    let cores_per_worker = positive(p, "cores_per_worker", rp.cores_per_worker);
    let mem_per_worker_mb =
        positive(p, "mem_per_worker", rp.mem_per_worker).map(|gb| (gb * 1024.0).ceil() as u64);
    let kill_grace = p.secs(&key("kill_grace_s"), rp.kill_grace_s, 2.0, 0.0);
    let cpu_affinity = rp.cpu_affinity.filter(|a| {
        let ok = a.parse::<fnx_sys::placement::CpuAffinity>();
        if let Err(e) = &ok {
            p.0.push(format!("{}: {e}", key("cpu_affinity")));
        }
        ok.is_ok()
    });
    let container = match rp.container_runtime.as_deref() {
        None => {
            if rp.container_image.is_some() || rp.container_template.is_some() {
                p.0.push(format!(
                    "{}: container_image and container_template need container_runtime",
                    key("container_runtime")
                ));
            }
            None
        }
        Some(r) => match fnx_protocol::Runtime::parse(r) {
            None => {
                p.0.push(format!(
                    "{}: {r:?} is not apptainer, singularity, docker, podman, shifter or custom",
                    key("container_runtime")
                ));
                None
            }
            Some(runtime) => {
                let c = fnx_protocol::Container {
                    runtime,
                    image: rp.container_image.unwrap_or_default(),
                    template: rp.container_template,
                };
                if let Err(e) = c.validate() {
                    p.0.push(format!("{}: {e}", key("container_runtime")));
                }
                Some(c)
            }
        },
    };
    let container_idle = rp
        .container_idle_s
        .map(|v| p.secs(&key("container_idle_s"), Some(v), 300.0, 1.0));
    let accelerators = match rp.available_accelerators {
        None => Vec::new(),
        Some(Accelerators::Count(n)) => (0..n).map(|i| i.to_string()).collect(),
        Some(Accelerators::Ids(ids)) => {
            if let Some(bad) = ids
                .iter()
                .find(|i| i.is_empty() || i.contains([',', ' ', '\n']))
            {
                p.0.push(format!(
                    "{}: {bad:?} is not an accelerator id",
                    key("available_accelerators")
                ));
            }
            ids
        }
    };

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
    let blocks = if provider == Provider::Local {
        if launcher != Launcher::Single {
            p.0.push(format!(
                "{}: a local pool starts its managers itself; {:?} needs provider \"slurm\", \
                 \"pbs\" or \"cobalt\"",
                key("launcher"),
                launcher.name()
            ));
        }
        for (k, given) in batch_keys {
            if given {
                p.0.push(format!(
                    "{}: only for batch providers (slurm, pbs, cobalt); this pool is local",
                    key(k)
                ));
            }
        }
        None
    } else {
        if rp.managers.is_some() {
            p.0.push(format!(
                "{}: a {} pool starts one manager per node of each block; use nodes_per_block",
                key("managers"),
                provider.name()
            ));
        }
        let mut spec = BlockSpec::new(&name, provider, launcher);
        spec.nodes = rp.nodes_per_block.unwrap_or(1);
        if spec.nodes == 0 || spec.nodes > 100_000 {
            p.0.push(format!(
                "{}: must be 1..=100000, got {}",
                key("nodes_per_block"),
                spec.nodes
            ));
            spec.nodes = 1;
        }
        if launcher == Launcher::Single && spec.nodes > 1 {
            p.0.push(format!(
                "{}: the single launcher starts one manager; {} nodes need launcher \"srun\", \
                 \"mpiexec\" or \"aprun\"",
                key("launcher"),
                spec.nodes
            ));
        }
        let wall = rp.walltime.unwrap_or_else(|| "00:30:00".into());
        spec.walltime = parse_walltime(&wall).unwrap_or_else(|| {
            p.0.push(format!(
                "{}: {wall:?} is not HH:MM:SS (or D-HH:MM:SS) above zero",
                key("walltime")
            ));
            Duration::from_secs(1800)
        });
        spec.account = word(p, &key("account"), rp.account);
        spec.partition = word(p, &key("partition"), rp.partition);
        spec.queue = word(p, &key("queue"), rp.queue);
        spec.qos = word(p, &key("qos"), rp.qos);
        spec.constraint = word(p, &key("constraint"), rp.constraint);
        spec.exclusive = rp.exclusive.unwrap_or(true);
        spec.cores_per_node = rp.cores_per_node.filter(|&c| c > 0);
        spec.gpus_per_node = rp.gpus_per_node.filter(|&g| g > 0);
        for (k, v, allowed) in [
            ("partition", &spec.partition, provider == Provider::Slurm),
            ("qos", &spec.qos, provider == Provider::Slurm),
            ("constraint", &spec.constraint, provider == Provider::Slurm),
            ("queue", &spec.queue, provider != Provider::Slurm),
        ] {
            if v.is_some() && !allowed {
                p.0.push(format!(
                    "{}: not used by provider {:?}{}",
                    key(k),
                    provider.name(),
                    if k == "queue" { " (use partition)" } else { "" }
                ));
            }
        }
        spec.scheduler_options = rp.scheduler_options.unwrap_or_default();
        let prefix = match provider {
            Provider::Slurm => "#SBATCH",
            Provider::Pbs => "#PBS",
            _ => "#COBALT",
        };
        for line in spec.scheduler_options.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                p.0.push(format!(
                    "{}: {line:?} is not a directive line (they start with {prefix})",
                    key("scheduler_options")
                ));
            }
        }
        spec.worker_init = rp.worker_init.unwrap_or_default();
        spec.launcher_options = rp.launcher_options.unwrap_or_default();
        if spec.launcher_options.contains('\n') {
            p.0.push(format!("{}: must be one line", key("launcher_options")));
        }
        spec.mpiexec = rp.mpiexec.unwrap_or_else(|| "mpiexec".into());
        if spec.mpiexec.trim().is_empty() || spec.mpiexec.contains(char::is_whitespace) {
            p.0.push(format!(
                "{}: must be a command name or path without spaces",
                key("mpiexec")
            ));
        }
        let flavor = rp.mpi_flavor.unwrap_or_else(|| "auto".into());
        spec.mpi_flavor = MpiFlavor::parse(&flavor).unwrap_or_else(|| {
            p.0.push(format!(
                "{}: {flavor:?} is not \"auto\", \"mpich\", \"openmpi\" or \"pals\"",
                key("mpi_flavor")
            ));
            MpiFlavor::Auto
        });
        let min_blocks = rp.min_blocks.unwrap_or(0);
        let max_blocks = rp.max_blocks.unwrap_or(1);
        let init_blocks = rp.init_blocks.unwrap_or(0);
        if max_blocks == 0 || min_blocks > max_blocks || init_blocks > max_blocks {
            p.0.push(format!(
                "{}: need 0 ≤ min_blocks ≤ max_blocks, init_blocks ≤ max_blocks and max_blocks ≥ 1 \
                 (got min {min_blocks}, init {init_blocks}, max {max_blocks})",
                key("max_blocks")
            ));
        }
        let parallelism = rp.parallelism.unwrap_or(1.0);
        if !(parallelism > 0.0 && parallelism <= 1.0) {
            p.0.push(format!(
                "{}: must be in (0, 1], got {parallelism}",
                key("parallelism")
            ));
        }
        let default_margin = (spec.walltime.as_secs_f64() / 10.0).min(300.0);
        let drain_margin = p.secs(
            &key("drain_margin_s"),
            rp.drain_margin_s,
            default_margin,
            0.0,
        );
        spec.drain_margin = drain_margin;
        if drain_margin >= spec.walltime {
            p.0.push(format!(
                "{}: must be shorter than the walltime",
                key("drain_margin_s")
            ));
        }
        let connect = match (rp.address, rp.interface) {
            (Some(_), Some(_)) => {
                p.0.push(format!(
                    "{}: give address or interface, not both",
                    key("interface")
                ));
                Connect::Interchange
            }
            (Some(a), None) => {
                if a.parse::<std::net::IpAddr>().is_err() {
                    p.0.push(format!("{}: {a:?} is not an IP address", key("address")));
                }
                Connect::Address(a)
            }
            (None, Some(i)) => Connect::Interface(i),
            (None, None) => Connect::Interchange,
        };
        Some(BlocksConfig {
            spec,
            init_blocks,
            min_blocks,
            max_blocks: max_blocks.max(1),
            parallelism: if parallelism > 0.0 && parallelism <= 1.0 {
                parallelism
            } else {
                1.0
            },
            max_idletime: p.secs(&key("max_idletime"), rp.max_idletime, 120.0, 0.0),
            drain_margin,
            connect,
            fnx_path: rp.fnx_path,
            poll_interval: p.secs(&key("poll_interval_s"), rp.poll_interval_s, 30.0, 0.1),
            scaling_interval: p.secs(&key("scaling_interval_s"), rp.scaling_interval_s, 5.0, 0.1),
            max_failed_blocks: rp.max_failed_blocks.unwrap_or(3).max(1),
            submit_timeout: p.secs(&key("submit_timeout_s"), rp.submit_timeout_s, 60.0, 1.0),
            connect_timeout: p.secs(&key("connect_timeout_s"), rp.connect_timeout_s, 300.0, 1.0),
        })
    };
    PoolConfig {
        managers: if blocks.is_some() {
            0
        } else {
            managers.min(1024)
        },
        workers_per_manager: workers,
        shape: crate::local::WorkerShape {
            cores_per_worker,
            mem_per_worker_mb,
            cpu_affinity,
            accelerators,
            container,
            container_idle,
        },
        python,
        kill_grace,
        blocks,
        name,
    }
}
