//! The batch-system commands of each provider (submit, status, cancel), what their output
//! means, and running them with a timeout.

use crate::block::{BlockFiles, BlockSpec, Provider};
use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The state of a batch job, as far as fnx cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in the queue (or held, or being configured).
    Pending,
    /// Running.
    Running,
    /// Ended; the scheduler's word for how (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...).
    Ended(String),
    /// The scheduler does not know the job (any more).
    Unknown,
}

/// A batch command failed, timed out or printed something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran past its time limit and was killed.
    #[error(
        "`{command}` did not finish within {secs}s and was killed (with everything it started)"
    )]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        secs: f64,
    },
    /// Its end could not be waited for.
    #[error("cannot wait for `{command}`: {source}")]
    Wait {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It failed: its status, and what it said (its standard error, else its output).
    #[error("`{command}` failed ({status}): {said}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it said (at most 2,000 characters).
        said: String,
    },
    /// A submit command printed no job id.
    #[error("cannot find a job id in the submit command's output {0:?}")]
    NoJobId(String),
}

/// The command that submits a block's script.
pub fn submit_argv(spec: &BlockSpec, files: &BlockFiles) -> Vec<String> {
    let script = files.script.display().to_string();
    match spec.provider {
        Provider::Slurm => vec!["sbatch".into(), "--parsable".into(), script],
        // The output paths are also directives in the script; on the command line as well they
        // hold for qsub front ends that ignore `#PBS -o/-e` (Slurm's Torque wrapper).
        Provider::Pbs => vec![
            "qsub".into(),
            "-o".into(),
            files.stdout.display().to_string(),
            "-e".into(),
            files.stderr.display().to_string(),
            script,
        ],
        Provider::Cobalt => {
            let minutes = spec.walltime.as_secs().div_ceil(60).max(1);
            let mut a = vec![
                "qsub".to_string(),
                "-n".into(),
                spec.nodes.to_string(),
                "-t".into(),
                minutes.to_string(),
            ];
            if let Some(q) = &spec.queue {
                a.extend(["-q".into(), q.clone()]);
            }
            if let Some(acc) = &spec.account {
                a.extend(["-A".into(), acc.clone()]);
            }
            let prefix = files.dir.join("job").display().to_string();
            a.extend([
                "-O".into(),
                prefix,
                "--mode".into(),
                "script".into(),
                script,
            ]);
            a
        }
        Provider::Local => vec!["/bin/bash".into(), script],
    }
}

/// The job id in a submit command's output.
pub fn parse_submit(provider: Provider, stdout: &str) -> Result<String, CommandError> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let id = match provider {
        // `--parsable`: `ID` or `ID;CLUSTER`.
        Provider::Slurm => line.split(';').next().unwrap_or(""),
        // `123.server` (PBS Pro, Torque) or `123` (Slurm's Torque wrapper).
        Provider::Pbs => line,
        // Cobalt prints the numeric id last.
        Provider::Cobalt => line,
        Provider::Local => line,
    };
    let ok = !id.is_empty()
        && id.len() < 200
        && id.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b));
    if !ok {
        return Err(CommandError::NoJobId(truncate(stdout, 300).to_string()));
    }
    Ok(id.to_string())
}

/// The command that reports the states of `ids` (one call for all of a pool's blocks).
pub fn status_argv(provider: Provider, ids: &[String]) -> Vec<String> {
    let mut a: Vec<String> = match provider {
        Provider::Slurm => vec![
            "squeue".into(),
            "--noheader".into(),
            "--states=all".into(),
            "--format=%i %T".into(),
            format!("--jobs={}", ids.join(",")),
        ],
        Provider::Pbs => vec!["qstat".into(), "-f".into()],
        Provider::Cobalt => vec!["qstat".into(), "--header".into(), "JobId:State".into()],
        Provider::Local => vec![],
    };
    if provider != Provider::Slurm {
        a.extend(ids.iter().cloned());
    }
    a
}

/// States of the jobs in a status command's output; jobs it does not mention are
/// [`JobState::Unknown`].
pub fn parse_status(provider: Provider, stdout: &str, ids: &[String]) -> HashMap<String, JobState> {
    let mut out: HashMap<String, JobState> =
        ids.iter().map(|i| (i.clone(), JobState::Unknown)).collect();
    let mut set = |id: &str, state: JobState| {
        // PBS may print `123.server` for a job submitted as `123`, or the other way round.
        let short = id.split('.').next().unwrap_or(id);
        for (k, v) in out.iter_mut() {
            if k == id || k.split('.').next() == Some(short) {
                *v = state.clone();
            }
        }
    };
    match provider {
        Provider::Slurm => {
            for line in stdout.lines() {
                let mut it = line.split_whitespace();
                if let (Some(id), Some(state)) = (it.next(), it.next()) {
                    set(id, slurm_state(state));
                }
            }
        }
        Provider::Pbs => {
            let mut current: Option<String> = None;
            for line in stdout.lines() {
                let t = line.trim();
                if let Some(id) = t.strip_prefix("Job Id:") {
                    current = Some(id.trim().to_string());
                } else if let Some(v) = t.strip_prefix("job_state =") {
                    if let Some(id) = &current {
                        set(id, pbs_state(v.trim()));
                    }
                }
            }
        }
        Provider::Cobalt => {
            for line in stdout.lines() {
                let mut it = line.split_whitespace();
                if let (Some(id), Some(state)) = (it.next(), it.next()) {
                    if id.bytes().all(|b| b.is_ascii_digit()) {
                        set(id, cobalt_state(state));
                    }
                }
            }
        }
        Provider::Local => {}
    }
    out
}

fn slurm_state(s: &str) -> JobState {
    match s {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" | "SUSPENDED" | "STOPPED" | "RESIZING" => JobState::Pending,
        // COMPLETING: the job is over but Slurm still cleans up its nodes (KillWait, epilog);
        // its final state (COMPLETED, FAILED, CANCELLED, ...) follows.
        "RUNNING" | "SIGNALING" | "STAGE_OUT" | "COMPLETING" => JobState::Running,
        other => JobState::Ended(other.to_string()),
    }
}

fn pbs_state(s: &str) -> JobState {
    match s {
        "R" | "E" => JobState::Running,
        "C" => JobState::Ended("COMPLETED".into()),
        "F" | "X" => JobState::Ended("FINISHED".into()),
        // Q, H, W, T, S, U, B and anything new: the job still waits (it leaves qstat or shows
        // F when it ends).
        _ => JobState::Pending,
    }
}

fn cobalt_state(s: &str) -> JobState {
    let s = s.to_ascii_lowercase();
    match s.as_str() {
        "running" | "exiting" | "killing" | "cleanup" => JobState::Running,
        "done" | "finished" | "failed" | "terminated" => JobState::Ended(s),
        // queued, starting and every kind of hold: Cobalt drops a finished job from qstat.
        _ => JobState::Pending,
    }
}

/// The command that cancels jobs.
pub fn cancel_argv(provider: Provider, ids: &[String]) -> Vec<String> {
    let mut a = match provider {
        Provider::Slurm => vec!["scancel".to_string()],
        _ => vec!["qdel".to_string()],
    };
    a.extend(ids.iter().cloned());
    a
}

/// Ask the scheduler about `ids` in one call. Schedulers fail the whole query when one id is
/// unknown to them (`squeue` with a single purged id, PBS `qstat` with exit 153): then the jobs
/// it still printed keep their state and the rest are [`JobState::Unknown`].
pub fn query_status(
    provider: Provider,
    ids: &[String],
    cwd: &std::path::Path,
    timeout: Duration,
) -> Result<HashMap<String, JobState>, CommandError> {
    let argv = status_argv(provider, ids);
    let out = run(&argv, cwd, timeout, &Runner::default())?;
    let unknown_ids = |text: &str| {
        let t = text.to_ascii_lowercase();
        t.contains("invalid job id") || t.contains("unknown job id") || t.contains("unknown job")
    };
    // 153: PBS "Unknown Job Id"; 35: PBS Pro "Job has finished" (without -x).
    let finished = |text: &str| text.to_ascii_lowercase().contains("has finished");
    if out.success
        || unknown_ids(&out.stderr)
        || unknown_ids(&out.stdout)
        || finished(&out.stderr)
        || matches!(out.code, Some(153 | 35))
    {
        return Ok(parse_status(provider, &out.stdout, ids));
    }
    Err(out.failure(&argv))
}

/// What a finished command printed.
struct Output {
    success: bool,
    code: Option<i32>,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn failure(&self, argv: &[String]) -> CommandError {
        let said = if self.stderr.trim().is_empty() {
            self.stdout.trim()
        } else {
            self.stderr.trim()
        };
        CommandError::Failed {
            command: argv.join(" "),
            status: self.status,
            said: truncate(said, 2000).to_string(),
        }
    }
}

/// Run `argv` in `cwd` with a timeout; its stdout on success. A command that is missing, fails
/// or runs over `timeout` (then killed) is an error quoting what it printed (qsub wrappers
/// print errors on stdout).
pub fn run_command(
    argv: &[String],
    cwd: &std::path::Path,
    timeout: Duration,
) -> Result<String, CommandError> {
    run_command_with(argv, cwd, timeout, &Runner::default())
}

/// How a batch command runs besides its argv: its whole environment (None: this process's),
/// what it does between fork and exec (e.g. become a user), and what it reads on stdin.
#[derive(Clone, Default)]
pub struct Runner {
    /// The environment (cleared first).
    pub env: Option<Vec<(String, String)>>,
    /// Run in the child before exec; an error stops the command before it runs.
    #[allow(clippy::type_complexity)]
    pub pre_exec: Option<std::sync::Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    /// Written to its standard input, which is then closed.
    pub stdin: Option<Vec<u8>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("env", &self.env.as_ref().map(Vec::len))
            .field("pre_exec", &self.pre_exec.is_some())
            .finish()
    }
}

/// [`run_command`] with a [`Runner`].
pub fn run_command_with(
    argv: &[String],
    cwd: &std::path::Path,
    timeout: Duration,
    runner: &Runner,
) -> Result<String, CommandError> {
    let out = run(argv, cwd, timeout, runner)?;
    if out.success {
        Ok(out.stdout)
    } else {
        Err(out.failure(argv))
    }
}

fn run(
    argv: &[String],
    cwd: &std::path::Path,
    timeout: Duration,
    runner: &Runner,
) -> Result<Output, CommandError> {
    let shown = argv.join(" ");
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(cwd)
        .stdin(if runner.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever it started too (a wrapper's
        // sbatch).
        .process_group(0);
    if let Some(env) = &runner.env {
        cmd.env_clear().envs(env.iter().cloned());
    }
    if let Some(f) = runner.pre_exec.clone() {
        // SAFETY: the caller's hook is documented to be async-signal-safe.
        unsafe {
            cmd.pre_exec(move || f());
        }
    }
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let (Some(data), Some(mut pipe)) = (runner.stdin.clone(), child.stdin.take()) {
        use std::io::Write;
        // A batch script: small; written on a thread so a command that does not read cannot
        // block the caller past its deadline.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    // Read both pipes on threads so a chatty command cannot fill one and block; a descendant
    // that keeps a pipe open cannot hold the caller past the deadline either.
    let (tx, rx) = std::sync::mpsc::channel();
    for (which, pipe) in [
        (
            0,
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        ),
        (1, Box::new(child.stderr.take().expect("piped"))),
    ] {
        let tx = tx.clone();
        let mut pipe = pipe;
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = pipe.read_to_end(&mut b);
            let _ = tx.send((which, b));
        });
    }
    let deadline = Instant::now() + timeout;
    let kill_group = |child: &mut std::process::Child| {
        // SAFETY: kill(2) with a negative pid signals the group the child leads.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                return Err(CommandError::Timeout {
                    command: shown.clone(),
                    secs: timeout.as_secs_f64(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(CommandError::Wait {
                    command: shown.clone(),
                    source,
                })
            }
        }
    };
    let mut texts = [String::new(), String::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match rx.recv_timeout(left) {
            Ok((which, b)) => texts[which] = String::from_utf8_lossy(&b).into_owned(),
            Err(_) => break,
        }
    }
    let [stdout, stderr] = texts;
    Ok(Output {
        success: status.success(),
        code: status.code(),
        status,
        stdout,
        stderr,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::Launcher;
    use std::path::Path;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn submit_outputs_give_job_ids() {
        assert_eq!(parse_submit(Provider::Slurm, "1234\n").unwrap(), "1234");
        assert_eq!(
            parse_submit(Provider::Slurm, "1234;perlmutter\n").unwrap(),
            "1234"
        );
        assert_eq!(
            parse_submit(
                Provider::Pbs,
                "5678.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov\n"
            )
            .unwrap(),
            "5678.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
        );
        assert_eq!(
            parse_submit(Provider::Cobalt, "Job routed to queue \"debug\".\n42\n").unwrap(),
            "42"
        );
        let err = parse_submit(Provider::Slurm, "sbatch: error: invalid account\n").unwrap_err();
        assert!(err.to_string().contains("invalid account"), "{err}");
    }

    #[test]
    fn slurm_states() {
        let out = "11 RUNNING\n12 PENDING\n13 CANCELLED\n14 COMPLETED\n16 COMPLETING\n";
        let s = parse_status(
            Provider::Slurm,
            out,
            &ids(&["11", "12", "13", "14", "15", "16"]),
        );
        assert_eq!(s["16"], JobState::Running, "COMPLETING is not final yet");
        assert_eq!(s["11"], JobState::Running);
        assert_eq!(s["12"], JobState::Pending);
        assert_eq!(s["13"], JobState::Ended("CANCELLED".into()));
        assert_eq!(s["14"], JobState::Ended("COMPLETED".into()));
        assert_eq!(s["15"], JobState::Unknown);
        let argv = status_argv(Provider::Slurm, &ids(&["11", "12"]));
        assert_eq!(argv.last().unwrap(), "--jobs=11,12");
    }

    #[test]
    fn pbs_and_cobalt_states() {
        let out = "Job Id: 7.server\n    Job_Name = x\n    job_state = R\n\nJob Id: 8.server\n    job_state = F\n";
        let s = parse_status(Provider::Pbs, out, &ids(&["7.server", "8", "9.server"]));
        assert_eq!(s["7.server"], JobState::Running);
        assert_eq!(s["8"], JobState::Ended("FINISHED".into()));
        assert_eq!(s["9.server"], JobState::Unknown);
        let out = "JobId  State\n-----------\n42     queued\n43     running\n45     maxrun_hold\n";
        let s = parse_status(Provider::Cobalt, out, &ids(&["42", "43", "44", "45"]));
        assert_eq!(s["45"], JobState::Pending, "an unknown hold still waits");
        assert_eq!(s["42"], JobState::Pending);
        assert_eq!(s["43"], JobState::Running);
        assert_eq!(s["44"], JobState::Unknown);
    }

    #[test]
    fn cobalt_submit_takes_settings_as_arguments() {
        let mut spec = BlockSpec::new("knl", Provider::Cobalt, Launcher::Aprun);
        spec.nodes = 8;
        spec.walltime = Duration::from_secs(3601);
        spec.queue = Some("debug-cache-quad".into());
        spec.account = Some("proj".into());
        let files = BlockFiles::new(Provider::Cobalt, Path::new("/d/knl"), 2);
        assert_eq!(
            submit_argv(&spec, &files).join(" "),
            "qsub -n 8 -t 61 -q debug-cache-quad -A proj -O /d/knl/block-2/job --mode script \
             /d/knl/block-2/submit.sh"
        );
    }

    #[test]
    fn commands_report_failure_and_timeout() {
        let dir = Path::new("/");
        let ok = run_command(&ids(&["sh", "-c", "echo 12"]), dir, Duration::from_secs(5));
        assert_eq!(ok.unwrap().trim(), "12");
        let err = run_command(
            &ids(&["sh", "-c", "echo nope >&2; exit 3"]),
            dir,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = run_command(&ids(&["sleep", "5"]), dir, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        // A descendant that keeps the output pipe open does not hold the caller.
        let t0 = Instant::now();
        let out = run_command(
            &ids(&["sh", "-c", "sleep 30 & echo 7"]),
            dir,
            Duration::from_millis(300),
        );
        assert_eq!(
            out.unwrap().trim(),
            "",
            "output still unread when the deadline passed"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        let err = run_command(&ids(&["/no/such/sbatch"]), dir, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
        // A qsub wrapper that explains itself on stdout.
        let err = run_command(
            &ids(&["sh", "-c", "echo bad account; exit 1"]),
            dir,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad account"), "{err}");
    }
}
