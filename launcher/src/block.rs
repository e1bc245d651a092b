//! What a block (one batch job) of a pool looks like: the provider that submits it, the
//! launcher that starts one manager per node inside it, and the files it leaves behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Who starts a pool's managers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Processes on the daemon's own host.
    Local,
    /// Slurm: `sbatch`, `squeue`, `scancel`.
    Slurm,
    /// PBS Pro (and Torque-compatible `qsub`): `qsub`, `qstat -f`, `qdel`.
    Pbs,
    /// Cobalt (ALCF Theta-class Cray machines): `qsub -n -t --mode script`, `qstat`, `qdel`.
    Cobalt,
}

impl Provider {
    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<Provider> {
        Some(match s {
            "local" => Provider::Local,
            "slurm" => Provider::Slurm,
            "pbs" => Provider::Pbs,
            "cobalt" => Provider::Cobalt,
            _ => return None,
        })
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::Slurm => "slurm",
            Provider::Pbs => "pbs",
            Provider::Cobalt => "cobalt",
        }
    }

    /// The launcher a pool gets when its configuration names none.
    pub fn default_launcher(self) -> Launcher {
        match self {
            Provider::Local => Launcher::Single,
            Provider::Slurm => Launcher::Srun,
            Provider::Pbs => Launcher::Mpiexec,
            Provider::Cobalt => Launcher::Aprun,
        }
    }
}

/// How a block starts one manager on each of its nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// The batch script runs the manager itself (one node).
    Single,
    /// `srun --ntasks-per-node=1`.
    Srun,
    /// `mpiexec` with a de-duplicated hostfile (MPICH/Hydra, Open MPI or Cray PALS).
    Mpiexec,
    /// Cray ALPS `aprun -N 1`.
    Aprun,
}

impl Launcher {
    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<Launcher> {
        Some(match s {
            "single" => Launcher::Single,
            "srun" => Launcher::Srun,
            "mpiexec" => Launcher::Mpiexec,
            "aprun" => Launcher::Aprun,
            _ => return None,
        })
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Single => "single",
            Launcher::Srun => "srun",
            Launcher::Mpiexec => "mpiexec",
            Launcher::Aprun => "aprun",
        }
    }
}

/// The command-line dialect of `mpiexec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpiFlavor {
    /// Decided inside the job from `mpiexec --version`.
    Auto,
    /// MPICH's Hydra: `-ppn 1 -f HOSTFILE`.
    Mpich,
    /// Open MPI: `--map-by ppr:1:node --hostfile HOSTFILE`.
    OpenMpi,
    /// Cray PALS (Polaris, Aurora): `--ppn 1 --hostfile HOSTFILE`.
    Pals,
}

impl MpiFlavor {
    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<MpiFlavor> {
        Some(match s {
            "auto" => MpiFlavor::Auto,
            "mpich" => MpiFlavor::Mpich,
            "openmpi" => MpiFlavor::OpenMpi,
            "pals" => MpiFlavor::Pals,
            _ => return None,
        })
    }

    /// The arguments that place one process per host of the hostfile that follows them.
    pub fn per_node_args(self) -> &'static str {
        match self {
            MpiFlavor::Mpich => "-ppn 1 -f",
            MpiFlavor::OpenMpi => "--map-by ppr:1:node --hostfile",
            MpiFlavor::Pals => "--ppn 1 --hostfile",
            MpiFlavor::Auto => "$FNX_MPI_ARGS",
        }
    }
}

/// Everything about a pool's blocks that does not change from one block to the next.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    /// The pool's name.
    pub pool: String,
    /// Who submits the block.
    pub provider: Provider,
    /// How the block starts its managers.
    pub launcher: Launcher,
    /// Nodes per block (one manager each).
    pub nodes: u32,
    /// Batch job walltime.
    pub walltime: Duration,
    /// Managers drain this long before the walltime ends (the script exports the deadline as
    /// `FNX_DRAIN_AT`, Unix seconds, counted from the job's start; zero: no deadline).
    pub drain_margin: Duration,
    /// Account / project to charge.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// PBS or Cobalt queue.
    pub queue: Option<String>,
    /// Slurm QOS.
    pub qos: Option<String>,
    /// Slurm node constraint.
    pub constraint: Option<String>,
    /// Slurm `--exclusive`.
    pub exclusive: bool,
    /// Cores per node (Slurm `--cpus-per-task` of the manager step, PBS `ncpus`, `aprun -d`).
    pub cores_per_node: Option<u32>,
    /// GPUs per node (Slurm `--gpus-per-node`, PBS `ngpus`).
    pub gpus_per_node: Option<u32>,
    /// Raw directive lines pasted after the generated ones.
    pub scheduler_options: String,
    /// Shell lines run before the launcher.
    pub worker_init: String,
    /// Extra arguments of the srun / mpiexec / aprun line (admin-written, pasted as is).
    pub launcher_options: String,
    /// The mpiexec command.
    pub mpiexec: String,
    /// Its dialect.
    pub mpi_flavor: MpiFlavor,
}

impl BlockSpec {
    /// A one-node block of `pool` with defaults for everything but provider and launcher.
    pub fn new(pool: &str, provider: Provider, launcher: Launcher) -> BlockSpec {
        BlockSpec {
            pool: pool.to_string(),
            provider,
            launcher,
            nodes: 1,
            walltime: Duration::from_secs(1800),
            drain_margin: Duration::ZERO,
            account: None,
            partition: None,
            queue: None,
            qos: None,
            constraint: None,
            exclusive: true,
            cores_per_node: None,
            gpus_per_node: None,
            scheduler_options: String::new(),
            worker_init: String::new(),
            launcher_options: String::new(),
            mpiexec: "mpiexec".to_string(),
            mpi_flavor: MpiFlavor::Auto,
        }
    }

    /// The batch job's name (`fnx.POOL.block-N`).
    pub fn job_name(&self, block: u64) -> String {
        format!("fnx.{}.block-{block}", self.pool)
    }
}

/// Where one block's files are: `<runs>/<pool>/block-<n>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockFiles {
    /// The block directory (also the managers' run directory).
    pub dir: PathBuf,
    /// The batch script.
    pub script: PathBuf,
    /// The job's stdout.
    pub stdout: PathBuf,
    /// The job's stderr (named in errors about blocks that never connect).
    pub stderr: PathBuf,
    /// The de-duplicated hostfile of the mpiexec launcher.
    pub hostfile: PathBuf,
    /// The scheduler's job id, written after submission.
    pub job_id: PathBuf,
}

impl BlockFiles {
    /// The files of block `block` under the pool's run directory.
    pub fn new(provider: Provider, pool_dir: &Path, block: u64) -> BlockFiles {
        let dir = pool_dir.join(format!("block-{block}"));
        // Cobalt names its files after the -O prefix.
        let (out, err) = match provider {
            Provider::Cobalt => ("job.output", "job.error"),
            _ => ("job.out", "job.err"),
        };
        BlockFiles {
            script: dir.join("submit.sh"),
            stdout: dir.join(out),
            stderr: dir.join(err),
            hostfile: dir.join("hosts"),
            job_id: dir.join("job_id"),
            dir,
        }
    }
}

/// Parse a walltime: `HH:MM:SS`, `D-HH:MM:SS` or `MM:SS`.
pub fn parse_walltime(s: &str) -> Option<Duration> {
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let nums: Option<Vec<u64>> = parts
        .iter()
        .map(|p| {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u64>().ok())
                .flatten()
        })
        .collect();
    let nums = nums?;
    let (h, m, sec) = match nums.as_slice() {
        [h, m, s] => (*h, *m, *s),
        [m, s] if days == 0 => (0, *m, *s),
        _ => return None,
    };
    if m >= 60 || sec >= 60 {
        return None;
    }
    let total = ((days * 24 + h) * 60 + m) * 60 + sec;
    (total > 0).then(|| Duration::from_secs(total))
}

/// A walltime as `HH:MM:SS` (hours may exceed 24, as Slurm and PBS accept).
pub fn format_walltime(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walltimes_parse_and_print() {
        assert_eq!(parse_walltime("01:00:00"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_walltime("1-00:30:00"),
            Some(Duration::from_secs(88200))
        );
        assert_eq!(parse_walltime("10:00"), Some(Duration::from_secs(600)));
        for bad in [
            "",
            "1h",
            "00:61:00",
            "00:00:00",
            "1:2:3:4",
            "-1:00:00",
            "a-01:00:00",
        ] {
            assert_eq!(parse_walltime(bad), None, "{bad}");
        }
        assert_eq!(format_walltime(Duration::from_secs(88200)), "24:30:00");
    }
}
