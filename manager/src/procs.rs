//! The processes a manager starts: Python workers and shell commands.
//!
//! Every process is started in its own process group with `PR_SET_PDEATHSIG` (so it dies with
//! the manager's pool thread), its signal mask reset, and three markers in its environment:
//! `FNX_RUN_ID` (the whole run), `FNX_MANAGER` (this manager) and `FNX_PROC` (this process
//! tree), which children inherit even after `setsid` — see `fnx_sys::sweep`.

use crate::wire::{def_frame, task_frame_head, FrameReader, FromWorker, WireError};
use fnx_protocol::{FunctionBody, TaskSpec};
use fnx_sys::placement::SlotPlan;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};

/// Environment every started process gets.
#[derive(Clone, Debug)]
pub struct Markers {
    /// `FNX_RUN_ID`.
    pub run_id: String,
    /// `FNX_MANAGER`.
    pub manager: String,
    /// The sandbox of processes started on the host (see `fnx_sys::landlock`).
    pub sandbox: Option<std::sync::Arc<fnx_sys::landlock::Landlock>>,
}

/// Largest tail of stdout/stderr kept for a shell task.
pub const TAIL_BYTES: usize = 64 * 1024;

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Read what is available from a non-blocking fd into `sink`; returns `true` at end-of-file.
fn read_available(fd: RawFd, mut sink: impl FnMut(&[u8])) -> io::Result<bool> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            return Ok(true);
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                io::ErrorKind::Interrupted => continue,
                _ => Err(err),
            };
        }
        sink(&buf[..n as usize]);
    }
}

/// A container to start processes in, with the directory bound into it.
#[derive(Clone, Debug)]
pub struct Wrap {
    /// The container.
    pub container: fnx_protocol::Container,
    /// The manager's run directory (bound inside at the same path).
    pub rundir: std::path::PathBuf,
}

/// How a process starts: the manager's markers, its slot's placement, its container.
pub struct Start<'a> {
    /// Environment markers.
    pub markers: &'a Markers,
    /// The slot's CPUs and environment.
    pub slot: &'a SlotPlan,
    /// The container, if any.
    pub container: Option<&'a Wrap>,
    /// The memory cgroup the process joins before it runs anything.
    pub cgroup: Option<&'a fnx_sys::cgroup::Leaf>,
}

fn wrap(container: Option<&Wrap>, cmd: Vec<String>) -> Vec<String> {
    match container {
        Some(w) => w.container.wrap(&w.rundir, &cmd),
        None => cmd,
    }
}

/// Markers, the slot's environment, and (between fork and exec) its own process group, death
/// signal and CPU binding: the one place where a placement plan is applied.
fn prepare(cmd: &mut Command, start: &Start, proc_marker: &str) {
    let (markers, slot) = (start.markers, start.slot);
    cmd.env("FNX_RUN_ID", &markers.run_id)
        .env("FNX_MANAGER", &markers.manager)
        .env("FNX_PROC", proc_marker)
        .envs(slot.env.iter().map(|(k, v)| (k, v)));
    let cpus = slot.cpus.clone();
    // A container is its own boundary (and Landlock would forbid its mounts).
    let sandbox = match start.container {
        None => markers.sandbox.as_ref().map(|l| l.fd()),
        Some(_) => None,
    };
    let cgroup = start.cgroup.map(|c| c.procs());
    // SAFETY: join, child_setup, apply_affinity and enforce only make async-signal-safe calls
    // (no allocation: `cpus` and the cgroup's path were allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &cgroup {
                fnx_sys::cgroup::join(procs)?;
            }
            fnx_sys::process::child_setup(libc::SIGKILL)?;
            fnx_sys::placement::apply_affinity(&cpus)?;
            if let Some(fd) = sandbox {
                fnx_sys::landlock::enforce(fd)?;
            }
            Ok(())
        });
    }
}

/// A Python worker process.
#[derive(Debug)]
pub struct PythonWorker {
    /// Its pid (and process group id).
    pub pid: u32,
    /// Readable when it exits.
    pub pidfd: OwnedFd,
    /// Its `FNX_PROC` marker.
    pub marker: String,
    stdin: ChildStdin,
    stdout: ChildStdout,
    reader: FrameReader,
    eof: bool,
}

impl PythonWorker {
    /// Start `python -u -B script` with the protocol on its stdin/stdout and `log` as stderr.
    pub fn spawn(
        python: &str,
        script: &Path,
        log: &Path,
        start: &Start,
        serial: u64,
        max_result_bytes: u64,
    ) -> io::Result<PythonWorker> {
        let log_file = File::options().create(true).append(true).open(log)?;
        let marker = format!("{}.w{serial}", start.markers.manager);
        let argv = wrap(
            start.container,
            vec![
                python.to_string(),
                "-u".into(),
                "-B".into(),
                script.display().to_string(),
            ],
        );
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("FNX_WORKER_ID", serial.to_string())
            .env("FNX_MAX_RESULT_BYTES", max_result_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        prepare(&mut cmd, start, &marker);
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", argv[0])))?;
        let pid = child.id();
        let pidfd = fnx_sys::process::pidfd_open(pid)?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        set_nonblocking(stdout.as_raw_fd())?;
        Ok(PythonWorker {
            pid,
            pidfd,
            marker,
            stdin,
            stdout,
            reader: FrameReader::default(),
            eof: false,
        })
    }

    /// The fd to poll for frames.
    pub fn stdout_fd(&self) -> RawFd {
        self.stdout.as_raw_fd()
    }

    /// Whether its stdout reached end-of-file.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Send a task, after its function's definition `def` (the first time this worker gets
    /// one of its tasks).
    pub fn send_task(
        &mut self,
        def: Option<&FunctionBody>,
        spec: &TaskSpec,
        cwd: Option<&std::path::Path>,
    ) -> io::Result<()> {
        if let Some(body) = def {
            self.stdin.write_all(&def_frame(spec.function, body))?;
        }
        let head = task_frame_head(
            spec.id,
            spec.function,
            spec.args.encoding,
            spec.args.data.len(),
            cwd,
        );
        if spec.args.data.len() < 64 * 1024 {
            let mut frame = head;
            frame.extend_from_slice(&spec.args.data);
            self.stdin.write_all(&frame)
        } else {
            self.stdin.write_all(&head)?;
            self.stdin.write_all(&spec.args.data)
        }
    }

    /// Ask it to exit (best effort).
    pub fn send_exit(&mut self) {
        let _ = self.stdin.write_all(&crate::wire::exit_frame());
    }

    /// Read what its stdout has, then return the complete frames, and the protocol error
    /// that stopped the reading, if one did (the frames before it count).
    pub fn read_frames(&mut self, max: usize) -> (Vec<(FromWorker, Vec<u8>)>, Option<WireError>) {
        let eof = self.reader.fill_from(self.stdout.as_raw_fd());
        self.eof = matches!(eof, Ok(true) | Err(_));
        let mut frames = Vec::new();
        loop {
            match self.reader.next_frame(max) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }
}

/// Keeps the last `TAIL_BYTES` of a stream.
#[derive(Debug, Default)]
pub struct Tail {
    buf: Vec<u8>,
    dropped: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * TAIL_BYTES {
            let cut = self.buf.len() - TAIL_BYTES;
            self.dropped += cut;
            self.buf.drain(..cut);
        }
    }

    /// The kept text (lossy UTF-8), with a marker if the start was cut.
    pub fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(TAIL_BYTES);
        let dropped = self.dropped + start;
        let text = String::from_utf8_lossy(&self.buf[start..]);
        if dropped > 0 {
            format!("[... {dropped} bytes truncated]\n{text}")
        } else {
            text.into_owned()
        }
    }
}

/// A running shell command.
#[derive(Debug)]
pub struct ShellProc {
    /// Its pid (and process group id).
    pub pid: u32,
    /// Readable when it exits.
    pub pidfd: OwnedFd,
    /// Its `FNX_PROC` marker.
    pub marker: String,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Captured stdout tail.
    pub out: Tail,
    /// Captured stderr tail.
    pub err: Tail,
}

impl ShellProc {
    /// Start `sh -c script fnx-sh args...` in `cwd`.
    pub fn spawn(
        script: &str,
        args: &[String],
        start: &Start,
        serial: u64,
        task: &str,
        cwd: Option<&std::path::Path>,
    ) -> io::Result<ShellProc> {
        let marker = format!("{}.s{serial}", start.markers.manager);
        let mut sh = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            script.to_string(),
            "fnx-sh".into(),
        ];
        sh.extend(args.iter().cloned());
        let argv = wrap(start.container, sh);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("FNX_TASK_ID", task)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = cwd {
            cmd.current_dir(dir).env("FNX_TASK_DIR", dir);
        }
        prepare(&mut cmd, start, &marker);
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", argv[0])))?;
        let pid = child.id();
        let pidfd = fnx_sys::process::pidfd_open(pid)?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        set_nonblocking(stdout.as_raw_fd())?;
        set_nonblocking(stderr.as_raw_fd())?;
        Ok(ShellProc {
            pid,
            pidfd,
            marker,
            stdout: Some(stdout),
            stderr: Some(stderr),
            out: Tail::default(),
            err: Tail::default(),
        })
    }

    /// Open output fds to poll.
    pub fn output_fds(&self) -> Vec<RawFd> {
        self.stdout
            .iter()
            .map(|s| s.as_raw_fd())
            .chain(self.stderr.iter().map(|s| s.as_raw_fd()))
            .collect()
    }

    /// Read what is available; closes a stream at end-of-file.
    pub fn read_output(&mut self) {
        if let Some(s) = &self.stdout {
            let out = &mut self.out;
            if !matches!(read_available(s.as_raw_fd(), |d| out.push(d)), Ok(false)) {
                self.stdout = None;
            }
        }
        if let Some(s) = &self.stderr {
            let err = &mut self.err;
            if !matches!(read_available(s.as_raw_fd(), |d| err.push(d)), Ok(false)) {
                self.stderr = None;
            }
        }
    }
}
