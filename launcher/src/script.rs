//! Batch scripts: the directives of each provider, the pool's `worker_init`, and the launch line
//! that starts one manager per node.

use crate::block::{format_walltime, BlockFiles, BlockSpec, Launcher, MpiFlavor, Provider};
use crate::command::shell_quote;
use std::fmt::Write;

/// A rendered block: the batch script and, within it, the line that starts the managers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The whole batch script.
    pub script: String,
    /// The launch line (also contained in `script`).
    pub launch_line: String,
}

/// A value that cannot go into a batch script.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The block directory has characters batch directives cannot carry.
    #[error(
        "the block directory {0:?} contains whitespace, quotes or '%', which batch directives \
         cannot carry (Slurm expands %j and the like in file names); choose a data_dir or \
         shared_dir without them"
    )]
    Directory(String),
}

/// Render block `block` of `spec`; `manager` is the manager's whole command line (the `fnx`
/// executable first). Values pasted into directives must be single words; paths must have no
/// whitespace (batch systems cannot quote directive values).
pub fn render(
    spec: &BlockSpec,
    block: u64,
    files: &BlockFiles,
    manager: &[String],
) -> Result<Rendered, RenderError> {
    let dir = files.dir.display().to_string();
    if dir
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '%')
    {
        return Err(RenderError::Directory(dir));
    }
    let mut s = String::from("#!/bin/bash\n");
    directives(spec, block, files, &mut s);
    for line in spec.scheduler_options.lines() {
        let line = line.trim();
        if !line.is_empty() {
            s.push_str(line);
            s.push('\n');
        }
    }
    let launch_line = launch_line(spec, files, manager);
    let _ = writeln!(
        s,
        "\n# fnx {} block {block} of pool {}: one manager per node ({} launcher)",
        env!("CARGO_PKG_VERSION"),
        spec.pool,
        spec.launcher.name()
    );
    let _ = writeln!(s, "cd {}", shell_quote(&files.dir.display().to_string()));
    let _ = writeln!(
        s,
        "export FNX_POOL={} FNX_BLOCK={block}",
        shell_quote(&spec.pool)
    );
    if !spec.drain_margin.is_zero() {
        // Counted from the job's start, before worker_init and the launcher take their time.
        let _ = writeln!(
            s,
            "# managers drain {}s before the walltime ends\nexport FNX_DRAIN_AT=$(( $(date +%s) + {} ))",
            spec.drain_margin.as_secs(),
            spec.walltime.saturating_sub(spec.drain_margin).as_secs()
        );
    }
    if !spec.worker_init.trim().is_empty() {
        s.push_str("\n# worker_init\n");
        for line in spec.worker_init.trim_end().lines() {
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push('\n');
    if spec.launcher == Launcher::Mpiexec {
        s.push_str(&hostfile_prelude(spec, files));
    }
    s.push_str(&launch_line);
    s.push('\n');
    Ok(Rendered {
        script: s,
        launch_line,
    })
}

fn directives(spec: &BlockSpec, block: u64, files: &BlockFiles, s: &mut String) {
    let name = spec.job_name(block);
    let wall = format_walltime(spec.walltime);
    match spec.provider {
        Provider::Slurm => {
            let mut d = |v: String| {
                let _ = writeln!(s, "#SBATCH {v}");
            };
            d(format!("--job-name={name}"));
            d(format!("--output={}", files.stdout.display()));
            d(format!("--error={}", files.stderr.display()));
            d(format!("--nodes={}", spec.nodes));
            d("--ntasks-per-node=1".into());
            d(format!("--time={wall}"));
            if spec.exclusive {
                d("--exclusive".into());
            }
            if let Some(c) = spec.cores_per_node {
                // The allocation must hold the CPUs the manager's step asks for.
                d(format!("--cpus-per-task={c}"));
            }
            // A requeued job would come back as a block fnx already counted as ended; fnx
            // replaces failed blocks itself.
            d("--no-requeue".into());
            for (flag, v) in [
                ("account", &spec.account),
                ("partition", &spec.partition),
                ("qos", &spec.qos),
                ("constraint", &spec.constraint),
            ] {
                if let Some(v) = v {
                    d(format!("--{flag}={v}"));
                }
            }
            if let Some(g) = spec.gpus_per_node {
                d(format!("--gpus-per-node={g}"));
            }
        }
        Provider::Pbs => {
            let mut d = |v: String| {
                let _ = writeln!(s, "#PBS {v}");
            };
            d(format!("-N {name}"));
            d(format!("-o {}", files.stdout.display()));
            d(format!("-e {}", files.stderr.display()));
            let mut select = format!("select={}", spec.nodes);
            if let Some(c) = spec.cores_per_node {
                let _ = write!(select, ":ncpus={c}");
            }
            if let Some(g) = spec.gpus_per_node {
                let _ = write!(select, ":ngpus={g}");
            }
            d(format!("-l {select}"));
            d(format!("-l walltime={wall}"));
            d("-r n".into());
            if let Some(q) = &spec.queue {
                d(format!("-q {q}"));
            }
            if let Some(a) = &spec.account {
                d(format!("-A {a}"));
            }
        }
        Provider::Cobalt => {
            // Cobalt takes its settings on the qsub command line (see `provider::submit_argv`).
            let _ = writeln!(
                s,
                "# Cobalt job {name}: nodes, walltime, queue and account are qsub arguments"
            );
        }
        Provider::Local => {}
    }
}

/// The mpiexec launcher runs one manager per host of a de-duplicated hostfile, made from the
/// batch system's node list.
pub fn hostfile_prelude(spec: &BlockSpec, files: &BlockFiles) -> String {
    let hosts = shell_quote(&files.hostfile.display().to_string());
    let clean = "sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d'";
    let mut s = format!(
        "# one line per node of the allocation (blank lines and spaces are not hosts)\n\
         if [ -n \"${{PBS_NODEFILE:-}}\" ]; then {clean} \"$PBS_NODEFILE\" | sort -u > {hosts}\n\
         elif [ -n \"${{COBALT_NODEFILE:-}}\" ]; then {clean} \"$COBALT_NODEFILE\" | sort -u > {hosts}\n\
         elif [ -n \"${{SLURM_JOB_NODELIST:-}}\" ]; then scontrol show hostnames \"$SLURM_JOB_NODELIST\" > {hosts}\n\
         else hostname > {hosts}\n\
         fi\n\
         FNX_NODES=$(wc -l < {hosts})\n"
    );
    if spec.mpi_flavor == MpiFlavor::Auto {
        let _ = write!(
            s,
            "case \"$({} --version 2>&1)\" in\n\
             \x20 *\"Open MPI\"*|*OpenRTE*) FNX_MPI_ARGS=\"{}\" ;;\n\
             \x20 *HYDRA*|*MPICH*) FNX_MPI_ARGS=\"{}\" ;;\n\
             \x20 *) FNX_MPI_ARGS=\"{}\" ;;\n\
             esac\n",
            shell_quote(&spec.mpiexec),
            MpiFlavor::OpenMpi.per_node_args(),
            MpiFlavor::Mpich.per_node_args(),
            MpiFlavor::Pals.per_node_args(),
        );
    }
    s
}

/// The line that starts one manager per node of the block.
pub fn launch_line(spec: &BlockSpec, files: &BlockFiles, manager: &[String]) -> String {
    let cmd = manager
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let opts = spec.launcher_options.trim();
    let opts = if opts.is_empty() {
        String::new()
    } else {
        format!("{opts} ")
    };
    let n = spec.nodes;
    match spec.launcher {
        Launcher::Single => cmd,
        Launcher::Srun => {
            let cpus = spec
                .cores_per_node
                .map(|c| format!("--cpus-per-task={c} "))
                .unwrap_or_default();
            format!(
                "srun --nodes={n} --ntasks={n} --ntasks-per-node=1 --cpu-bind=none \
                 --kill-on-bad-exit=0 {cpus}{opts}{cmd}"
            )
        }
        Launcher::Aprun => {
            let depth = spec
                .cores_per_node
                .map(|c| format!("-d {c} "))
                .unwrap_or_default();
            format!("aprun -n {n} -N 1 {depth}-cc none {opts}{cmd}")
        }
        Launcher::Mpiexec => format!(
            "{} -n \"$FNX_NODES\" {} {} {opts}{cmd}",
            shell_quote(&spec.mpiexec),
            spec.mpi_flavor.per_node_args(),
            shell_quote(&files.hostfile.display().to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn manager() -> Vec<String> {
        ["/opt/fnx/bin/fnx", "manager", "--uid", "block-3.{rank}"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn slurm_script_has_directives_init_and_srun() {
        let mut spec = BlockSpec::new("cpu", Provider::Slurm, Launcher::Srun);
        spec.nodes = 2;
        spec.account = Some("m1234".into());
        spec.worker_init = "module load python\n".into();
        spec.scheduler_options = "#SBATCH --mail-type=NONE".into();
        let files = BlockFiles::new(Provider::Slurm, Path::new("/d/runs/cpu"), 3);
        let r = render(&spec, 3, &files, &manager()).unwrap();
        for want in [
            "#SBATCH --job-name=fnx.cpu.block-3\n",
            "#SBATCH --error=/d/runs/cpu/block-3/job.err\n",
            "#SBATCH --nodes=2\n",
            "#SBATCH --account=m1234\n",
            "#SBATCH --time=00:30:00\n",
            "#SBATCH --mail-type=NONE\n",
            "module load python\n",
            "srun --nodes=2 --ntasks=2 --ntasks-per-node=1",
        ] {
            assert!(r.script.contains(want), "{want:?} missing:\n{}", r.script);
        }
        assert!(r
            .launch_line
            .ends_with("/opt/fnx/bin/fnx manager --uid 'block-3.{rank}'"));
        // worker_init comes before the launcher.
        assert!(r.script.find("module load").unwrap() < r.script.find("\nsrun ").unwrap());
    }

    #[test]
    fn mpiexec_flavours_and_pbs_select() {
        let mut spec = BlockSpec::new("gpu", Provider::Pbs, Launcher::Mpiexec);
        spec.nodes = 4;
        spec.cores_per_node = Some(32);
        spec.gpus_per_node = Some(4);
        spec.mpi_flavor = MpiFlavor::Pals;
        let files = BlockFiles::new(Provider::Pbs, Path::new("/d/runs/gpu"), 0);
        let r = render(&spec, 0, &files, &manager()).unwrap();
        assert!(r.script.contains("#PBS -l select=4:ncpus=32:ngpus=4\n"));
        assert!(r.script.contains("'/^$/d' \"$PBS_NODEFILE\" | sort -u > "));
        assert!(r.launch_line.starts_with(
            "mpiexec -n \"$FNX_NODES\" --ppn 1 --hostfile /d/runs/gpu/block-0/hosts "
        ));
        spec.mpi_flavor = MpiFlavor::Auto;
        let r = render(&spec, 0, &files, &manager()).unwrap();
        assert!(r
            .script
            .contains("*HYDRA*|*MPICH*) FNX_MPI_ARGS=\"-ppn 1 -f\""));
        assert!(r.launch_line.contains(" $FNX_MPI_ARGS "));
    }

    #[test]
    fn aprun_line_and_paths_with_spaces_are_refused() {
        let mut spec = BlockSpec::new("knl", Provider::Cobalt, Launcher::Aprun);
        spec.nodes = 8;
        spec.cores_per_node = Some(64);
        let files = BlockFiles::new(Provider::Cobalt, Path::new("/d/runs/knl"), 1);
        let r = render(&spec, 1, &files, &manager()).unwrap();
        assert!(r
            .launch_line
            .starts_with("aprun -n 8 -N 1 -d 64 -cc none /opt/fnx/bin/fnx "));
        let bad = BlockFiles::new(Provider::Cobalt, Path::new("/my data/runs/knl"), 1);
        let err = render(&spec, 1, &bad, &manager()).unwrap_err();
        assert!(err.to_string().contains("/my data"), "{err}");
    }
}
