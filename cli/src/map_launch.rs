//! `fnx map --launcher srun|mpiexec|aprun`: inside a batch allocation, start one manager on
//! every node through the parallel launcher (no daemon), listening where those nodes can reach.

use clap::{Args, ValueEnum};
use fnx_daemon::local::{Launch, PoolOptions};
use fnx_launcher::{BlockFiles, BlockSpec, Launcher, MpiFlavor, Provider};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// How managers are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LauncherArg {
    /// `--managers` processes on this node.
    Local,
    /// `srun`: one manager per node of the Slurm allocation.
    Srun,
    /// `mpiexec`: one manager per host of the hostfile.
    Mpiexec,
    /// `aprun` (Cray ALPS): one manager per node.
    Aprun,
}

/// The dialect of `mpiexec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlavorArg {
    /// Detected from `mpiexec --version`.
    Auto,
    /// MPICH / Hydra.
    Mpich,
    /// Open MPI.
    Openmpi,
    /// Cray PALS.
    Pals,
}

/// Where managers run.
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Start managers with a parallel launcher, one per node of the allocation this command
    /// runs in (from a batch script); `local` runs --managers processes here
    #[arg(long, value_enum, default_value = "local")]
    pub launcher: LauncherArg,
    /// Nodes (managers) for srun/aprun [default: SLURM_JOB_NUM_NODES, or COBALT_PARTSIZE]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub nodes: Option<u32>,
    /// Hostfile for mpiexec (one line per slot or node; duplicates are removed)
    /// [default: PBS_NODEFILE, COBALT_NODEFILE, the Slurm node list, or this host]
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// The mpiexec command
    #[arg(long, default_value = "mpiexec", value_name = "CMD")]
    pub mpiexec: String,
    /// The mpiexec dialect
    #[arg(long, value_enum, default_value = "auto")]
    pub mpi_flavor: FlavorArg,
    /// Extra arguments for the launcher line (e.g. "--gpu-bind=closest")
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub launcher_options: Option<String>,
    /// IP address the managers connect to (the interchange listens on it) [default with a
    /// launcher: this host's address]
    #[arg(long, value_name = "IP")]
    pub address: Option<String>,
}

/// Fill `opts` for the chosen launcher: the managers' launch, the interchange's address, and
/// CurveZMQ keys in the run directory.
pub fn configure(a: &LaunchArgs, run_dir: &Path, opts: &mut PoolOptions) -> anyhow::Result<()> {
    let launcher = match a.launcher {
        LauncherArg::Local => return Ok(()),
        LauncherArg::Srun => Launcher::Srun,
        LauncherArg::Mpiexec => Launcher::Mpiexec,
        LauncherArg::Aprun => Launcher::Aprun,
    };
    let env_num = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    let mut env = Vec::new();
    let nodes = match launcher {
        Launcher::Mpiexec => {
            let file = a.hostfile.clone().or_else(|| {
                ["PBS_NODEFILE", "COBALT_NODEFILE"]
                    .iter()
                    .find_map(|k| std::env::var_os(k).map(PathBuf::from))
            });
            match file {
                Some(f) => {
                    let text = std::fs::read_to_string(&f).map_err(|e| {
                        anyhow::anyhow!("cannot read the hostfile {}: {e}", f.display())
                    })?;
                    let hosts: BTreeSet<&str> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect();
                    if hosts.is_empty() {
                        anyhow::bail!("the hostfile {} lists no host", f.display());
                    }
                    // The launch script de-duplicates whatever PBS_NODEFILE names.
                    env.push(("PBS_NODEFILE".to_string(), f.display().to_string()));
                    hosts.len() as u32
                }
                None => env_num("SLURM_JOB_NUM_NODES").unwrap_or(1),
            }
        }
        _ => a
            .nodes
            .or_else(|| env_num("SLURM_JOB_NUM_NODES"))
            .or_else(|| env_num("COBALT_PARTSIZE"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--launcher {} needs --nodes (no SLURM_JOB_NUM_NODES or COBALT_PARTSIZE: \
                     is this running inside a batch allocation?)",
                    launcher.name()
                )
            })?,
    };
    let mut spec = BlockSpec::new("map", Provider::Local, launcher);
    spec.nodes = nodes;
    spec.mpiexec = a.mpiexec.clone();
    spec.mpi_flavor = match a.mpi_flavor {
        FlavorArg::Auto => MpiFlavor::Auto,
        FlavorArg::Mpich => MpiFlavor::Mpich,
        FlavorArg::Openmpi => MpiFlavor::OpenMpi,
        FlavorArg::Pals => MpiFlavor::Pals,
    };
    spec.launcher_options = a.launcher_options.clone().unwrap_or_default();
    let mut files = BlockFiles::new(Provider::Local, run_dir, 0);
    files.dir = run_dir.to_path_buf();
    files.hostfile = run_dir.join("hosts");
    let address = match &a.address {
        Some(ip) => {
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| anyhow::anyhow!("--address {ip:?} is not an IP address"))?;
            ip.clone()
        }
        None => host_address(),
    };
    opts.bind = if address.contains(':') {
        format!("tcp://[{address}]:0")
    } else {
        format!("tcp://{address}:0")
    };
    // Managers on other nodes read their keys from a file in the run directory (mode 0600 in
    // a 0700 directory, the user's own); a link is never plain, loopback included.
    let keys = fnx_daemon::keys::Keys::open(&run_dir.join("keys"))?;
    opts.curve = Some(keys.link("map")?);
    opts.launch = Some(Launch {
        spec,
        files,
        nodes,
        env,
    });
    Ok(())
}

/// This host's address as its name resolves (what other nodes of the allocation use), or
/// loopback when the name does not resolve.
fn host_address() -> String {
    use std::net::ToSocketAddrs;
    let name = fnx_sys::node::hostname();
    let addrs: Vec<std::net::IpAddr> = (name.as_str(), 0)
        .to_socket_addrs()
        .map(|it| it.map(|a| a.ip()).collect())
        .unwrap_or_default();
    addrs
        .iter()
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .or_else(|| addrs.first())
        .map(|a| a.to_string())
        .unwrap_or_else(|| {
            tracing::warn!("host name {name} does not resolve; managers connect to 127.0.0.1");
            "127.0.0.1".to_string()
        })
}
