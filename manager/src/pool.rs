//! The worker pool: runs tasks in Python workers and shell processes, enforces walltimes,
//! batches results. Runs on the manager's main thread and never touches the interchange socket
//! (the link thread does); the two talk over an inproc pair.

use crate::procs::{Markers, PythonWorker, ShellProc};
use fnx_protocol::shell::{self, ShellTemplate};
use fnx_protocol::{
    encode, Encoding, ErrorKind, FunctionBody, FunctionId, InterchangeToManager,
    ManagerToInterchange, Outcome, Payload, TaskError, TaskId, TaskResult, TaskSpec,
};
use fnx_sys::process::{describe_wait_status, kill_group, reap_any};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How the pool runs.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Tasks run at once.
    pub slots: usize,
    /// Python interpreter.
    pub python: String,
    /// The worker runtime file.
    pub worker_script: PathBuf,
    /// Where worker logs go.
    pub log_dir: PathBuf,
    /// Environment markers for every started process.
    pub markers: Markers,
    /// Largest result.
    pub max_result_bytes: u64,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// Complete tasks without running them.
    pub zero_work: bool,
    /// Largest frame to the interchange.
    pub max_frame_bytes: usize,
}

/// Why the pool stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEnd {
    /// The interchange released this manager after a drain.
    Drained,
    /// The interchange told it to exit.
    Shutdown(String),
    /// The manager got a termination signal.
    Signal(i32),
    /// The link to the interchange ended (refused, silent).
    LinkLost(String),
}

/// Tags of messages on the inproc pair between pool and link.
pub mod tag {
    /// link → pool: a frame from the interchange.
    pub const FRAME: &[u8] = b"F";
    /// link → pool: the link ended; body is the reason.
    pub const LINK_ENDED: &[u8] = b"X";
    /// pool → link: a frame for the interchange.
    pub const SEND: &[u8] = b"R";
    /// pool → link: stop; a non-empty body is sent as `Bye` first.
    pub const QUIT: &[u8] = b"Q";
}

struct Func {
    body: FunctionBody,
    shell: Option<ShellTemplate>,
}

struct Running {
    id: TaskId,
    attempt: fnx_protocol::Attempt,
    deadline: Option<Instant>,
    forced: Option<TaskError>,
    kill_at: Option<Instant>,
}

enum Kind {
    Python(PythonWorker),
    Shell(ShellProc),
}

struct Proc {
    kind: Kind,
    /// The task running now.
    task: Option<Running>,
    /// A small task already written into a busy Python worker's pipe, so the worker starts it
    /// the moment the current one ends (no round trip through the manager in between). It
    /// starts its walltime clock when it becomes `task`.
    next: Option<Pipelined>,
    exit: Option<i32>,
    log: Option<PathBuf>,
}

struct Pipelined {
    spec: TaskSpec,
    cancelled: bool,
}

/// Largest argument payload pipelined behind a running task (well inside a pipe's buffer, so
/// writing it never blocks the manager).
const PIPELINE_MAX_ARGS: usize = 16 * 1024;

impl Proc {
    fn pidfd(&self) -> i32 {
        match &self.kind {
            Kind::Python(w) => w.pidfd.as_raw_fd(),
            Kind::Shell(s) => s.pidfd.as_raw_fd(),
        }
    }
    fn marker(&self) -> &str {
        match &self.kind {
            Kind::Python(w) => &w.marker,
            Kind::Shell(s) => &s.marker,
        }
    }
}

#[derive(Clone, Copy)]
enum Source {
    Link,
    Signal,
    Exit,
    Output(u32),
}

const FLUSH_AFTER: Duration = Duration::from_millis(1);
const FLUSH_COUNT: usize = 1024;
const FLUSH_BYTES: usize = 4 << 20;

/// The pool's state.
pub struct Pool<'a> {
    cfg: PoolConfig,
    link: &'a zmq::Socket,
    signals: &'a fnx_sys::signals::SignalPipe,
    functions: HashMap<FunctionId, Func>,
    queue: VecDeque<TaskSpec>,
    procs: HashMap<u32, Proc>,
    serial: u64,
    startup_failures: u32,
    batch: Vec<TaskResult>,
    batch_bytes: usize,
    batch_since: Option<Instant>,
    end: Option<PoolEnd>,
}

impl<'a> Pool<'a> {
    /// A pool that talks to the link over `link` and watches `signals`.
    pub fn new(
        cfg: PoolConfig,
        link: &'a zmq::Socket,
        signals: &'a fnx_sys::signals::SignalPipe,
    ) -> Self {
        Pool {
            cfg,
            link,
            signals,
            functions: HashMap::new(),
            queue: VecDeque::new(),
            procs: HashMap::new(),
            serial: 0,
            startup_failures: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_since: None,
            end: None,
        }
    }

    /// Run until the interchange releases or stops this manager, the link ends or a signal
    /// arrives; then kill every process this manager started.
    pub fn run(mut self) -> PoolEnd {
        while self.end.is_none() {
            self.step();
        }
        let end = self.end.clone().expect("loop ended");
        self.flush(true);
        self.stop_all();
        let bye = match &end {
            PoolEnd::Signal(sig) => format!("received {}", fnx_sys::process::signal_name(*sig)),
            _ => String::new(),
        };
        let _ = self.link.send_multipart([tag::QUIT, bye.as_bytes()], 0);
        end
    }

    fn step(&mut self) {
        let mut sources = vec![Source::Link, Source::Signal];
        let mut fds = vec![self.signals.raw_fd()];
        for (&pid, p) in &self.procs {
            sources.push(Source::Exit);
            fds.push(p.pidfd());
            match &p.kind {
                Kind::Python(w) if !w.eof() => {
                    sources.push(Source::Output(pid));
                    fds.push(w.stdout_fd());
                }
                Kind::Python(_) => {}
                Kind::Shell(s) => {
                    for fd in s.output_fds() {
                        sources.push(Source::Output(pid));
                        fds.push(fd);
                    }
                }
            }
        }
        let mut items = Vec::with_capacity(sources.len());
        items.push(self.link.as_poll_item(zmq::POLLIN));
        items.extend(
            fds.iter()
                .map(|&fd| zmq::PollItem::from_fd(fd, zmq::POLLIN)),
        );
        let timeout = self.poll_timeout();
        if let Err(e) = zmq::poll(&mut items, timeout) {
            tracing::error!("poll failed: {e}");
        }
        let ready: Vec<Source> = items
            .iter()
            .zip(&sources)
            .filter(|(item, _)| item.get_revents().bits() != 0)
            .map(|(_, s)| *s)
            .collect();
        drop(items);
        let mut exited = false;
        for source in ready {
            match source {
                Source::Link => self.on_link(),
                Source::Signal => {
                    if let Some(&sig) = self.signals.drain().first() {
                        tracing::warn!("received {}; stopping", fnx_sys::process::signal_name(sig));
                        self.end = Some(PoolEnd::Signal(sig));
                    }
                }
                Source::Exit => exited = true,
                Source::Output(pid) => self.on_output(pid),
            }
        }
        if exited {
            self.reap();
        }
        self.check_deadlines(Instant::now());
        self.schedule();
        self.flush(false);
    }

    fn poll_timeout(&self) -> i64 {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        if let Some(since) = self.batch_since {
            next = next.min(since + FLUSH_AFTER);
        }
        for p in self.procs.values() {
            if let Some(r) = &p.task {
                for t in [r.deadline.filter(|_| r.forced.is_none()), r.kill_at]
                    .into_iter()
                    .flatten()
                {
                    next = next.min(t);
                }
            }
        }
        let wait = next.saturating_duration_since(now);
        // zmq::poll takes milliseconds; round up so a 1 ms flush does not spin.
        (wait.as_micros().div_ceil(1000)) as i64
    }

    fn on_link(&mut self) {
        while let Ok(t) = self.link.recv_msg(zmq::DONTWAIT) {
            if !t.get_more() {
                continue;
            }
            let Ok(body) = self.link.recv_msg(0) else {
                continue;
            };
            if &t[..] == tag::LINK_ENDED {
                self.end = Some(PoolEnd::LinkLost(
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                continue;
            }
            match fnx_protocol::decode::<InterchangeToManager>(&body, usize::MAX) {
                Ok(msg) => self.on_message(msg),
                Err(e) => tracing::error!("undecodable frame from the link: {e}"),
            }
        }
    }

    fn on_message(&mut self, msg: InterchangeToManager) {
        match msg {
            InterchangeToManager::Tasks { functions, tasks } => {
                for def in functions {
                    let shell = match &def.body {
                        FunctionBody::Shell { template } => shell::parse(template).ok(),
                        _ => None,
                    };
                    self.functions.insert(
                        def.id,
                        Func {
                            body: def.body,
                            shell,
                        },
                    );
                }
                if self.cfg.zero_work {
                    for spec in tasks {
                        self.push_result(spec.id, spec.attempt, Outcome::Ok(spec.args));
                    }
                } else {
                    self.queue.extend(tasks);
                }
            }
            InterchangeToManager::Cancel { tasks } => self.cancel(&tasks),
            InterchangeToManager::Drain => tracing::info!("draining: no new tasks will come"),
            InterchangeToManager::Drained => self.end = Some(PoolEnd::Drained),
            InterchangeToManager::Shutdown { reason } => {
                tracing::info!("interchange asked this manager to exit: {reason}");
                self.end = Some(PoolEnd::Shutdown(reason));
            }
            other => tracing::debug!("unexpected message for the pool: {other:?}"),
        }
    }

    fn cancel(&mut self, tasks: &[(TaskId, fnx_protocol::Attempt)]) {
        for &(id, attempt) in tasks {
            if let Some(pos) = self
                .queue
                .iter()
                .position(|t| t.id == id && t.attempt == attempt)
            {
                self.queue.remove(pos);
                self.push_result(id, attempt, Outcome::Err(cancelled()));
                continue;
            }
            let grace = self.cfg.kill_grace;
            if let Some((&pid, proc)) = self
                .procs
                .iter_mut()
                .find(|(_, p)| matches!(&p.task, Some(r) if r.id == id && r.attempt == attempt))
            {
                let r = proc.task.as_mut().expect("matched");
                if r.forced.is_none() {
                    r.forced = Some(cancelled());
                    r.kill_at = Some(Instant::now() + grace);
                    let _ = kill_group(pid, libc::SIGTERM);
                }
                continue;
            }
            // Waiting in a worker's pipe: it is killed as soon as it starts.
            if let Some(next) = self.procs.values_mut().find_map(|p| {
                p.next
                    .as_mut()
                    .filter(|n| n.spec.id == id && n.spec.attempt == attempt)
            }) {
                next.cancelled = true;
            }
        }
    }

    fn on_output(&mut self, pid: u32) {
        let max = self.cfg.max_result_bytes as usize + (1 << 20);
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        match &mut proc.kind {
            Kind::Shell(s) => s.read_output(),
            Kind::Python(w) => match w.read_frames(max) {
                Ok(frames) => {
                    for (header, payload) in frames {
                        self.on_worker_frame(pid, header, payload);
                    }
                }
                Err(e) => {
                    tracing::error!("worker {pid} broke the protocol: {e}; killing it");
                    let kind = match e {
                        crate::wire::WireError::TooLarge { .. } => ErrorKind::ResultTooLarge,
                        crate::wire::WireError::BadHeader(_) => ErrorKind::WorkerLost,
                    };
                    self.force_kill(pid, TaskError::new(kind, "ProtocolError", e.to_string()));
                }
            },
        }
    }

    fn force_kill(&mut self, pid: u32, error: TaskError) {
        if let Some(proc) = self.procs.get_mut(&pid) {
            if let Some(r) = proc.task.as_mut() {
                r.forced.get_or_insert(error);
            }
        }
        let _ = kill_group(pid, libc::SIGKILL);
    }

    fn on_worker_frame(&mut self, pid: u32, header: crate::wire::WorkerHeader, payload: Vec<u8>) {
        let max_result = self.cfg.max_result_bytes;
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let Kind::Python(worker) = &mut proc.kind else {
            return;
        };
        match header.op.as_str() {
            "ready" => {
                worker.ready = true;
                self.startup_failures = 0;
                tracing::debug!(
                    "worker {pid} ready (Python {})",
                    header.python.as_deref().unwrap_or("?")
                );
            }
            "result" => {
                let Some(r) = proc.task.take_if(|r| Some(r.id.0) == header.tid) else {
                    // Not the running task: the worker broke the one-at-a-time order.
                    tracing::warn!(
                        "worker {pid} sent a result for task {:?} it does not hold",
                        header.tid
                    );
                    return;
                };
                if let Some(forced) = r.forced {
                    // Killed for walltime or cancel already; the kill goes on.
                    proc.task = Some(Running {
                        forced: Some(forced),
                        ..r
                    });
                    return;
                }
                if let Some(next) = proc.next.take() {
                    proc.task = Some(promote(pid, next, self.cfg.kill_grace));
                }
                let outcome = if header.ok == Some(true) {
                    let encoding = match header.enc.as_deref() {
                        Some("pickle") => Encoding::Pickle,
                        _ => Encoding::Json,
                    };
                    if payload.len() as u64 > max_result {
                        Outcome::Err(too_large(payload.len() as u64, max_result))
                    } else {
                        Outcome::Ok(Payload {
                            encoding,
                            data: payload,
                        })
                    }
                } else {
                    match header.error {
                        Some(e) => Outcome::Err(e.into_task_error()),
                        None => Outcome::Err(TaskError::new(
                            ErrorKind::Exception,
                            "Unknown",
                            "worker reported a failure without details",
                        )),
                    }
                };
                self.push_result(r.id, r.attempt, outcome);
            }
            other => tracing::warn!("worker {pid} sent unknown op {other:?}"),
        }
    }

    fn reap(&mut self) {
        for (pid, status) in reap_any() {
            match self.procs.get_mut(&pid) {
                Some(p) => p.exit = Some(status),
                None => tracing::debug!(
                    "reaped orphaned descendant {pid} ({})",
                    describe_wait_status(status)
                ),
            }
        }
        let done: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.exit.is_some())
            .map(|(&pid, _)| pid)
            .collect();
        for pid in done {
            // Frames or output written just before exit are still in the pipe.
            self.on_output(pid);
            if let Some(proc) = self.procs.remove(&pid) {
                self.finish_proc(pid, proc);
            }
        }
    }

    fn finish_proc(&mut self, pid: u32, mut proc: Proc) {
        if let Some(next) = proc.next.take() {
            // It never started: run it elsewhere (or report it cancelled).
            if next.cancelled {
                self.push_result(next.spec.id, next.spec.attempt, Outcome::Err(cancelled()));
            } else {
                self.queue.push_front(next.spec);
            }
        }
        let status = proc.exit.unwrap_or(0);
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let forced = proc.task.as_ref().is_some_and(|r| r.forced.is_some());
        // Leftovers in the group go at once; with a forced end or a crash, also those that left
        // the group (found by their marker).
        let _ = kill_group(pid, libc::SIGKILL);
        if forced || !clean {
            let swept = fnx_sys::sweep::kill_marked("FNX_PROC", proc.marker(), 20);
            if swept > 0 {
                tracing::info!("killed {swept} leftover processes of {pid}");
            }
        }
        let Some(r) = proc.task.take() else {
            if let Kind::Python(w) = &proc.kind {
                if !w.ready {
                    self.startup_failures += 1;
                    tracing::error!(
                        "worker {pid} exited during start-up ({}); see {}",
                        describe_wait_status(status),
                        proc.log
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
            return;
        };
        let outcome = match (r.forced, &mut proc.kind) {
            (Some(e), _) => Outcome::Err(e),
            (None, Kind::Python(_)) => {
                let log = proc
                    .log
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Outcome::Err(TaskError::new(
                    ErrorKind::WorkerLost,
                    "WorkerLost",
                    format!(
                        "worker process {pid} died while running the task: {}; worker log: {log}",
                        describe_wait_status(status)
                    ),
                ))
            }
            (None, Kind::Shell(s)) => shell_outcome(status, s, self.cfg.max_result_bytes),
        };
        self.push_result(r.id, r.attempt, outcome);
    }

    fn check_deadlines(&mut self, now: Instant) {
        let grace = self.cfg.kill_grace;
        for (&pid, p) in self.procs.iter_mut() {
            let Some(r) = p.task.as_mut() else { continue };
            if r.forced.is_none() && r.deadline.is_some_and(|d| now >= d) {
                r.forced = Some(TaskError::new(
                    ErrorKind::Walltime,
                    "WalltimeExceeded",
                    "walltime exceeded: the task ran past its limit and its processes were killed",
                ));
                r.kill_at = Some(now + grace);
                let _ = kill_group(pid, libc::SIGTERM);
            } else if r.kill_at.is_some_and(|k| now >= k) {
                r.kill_at = None;
                let _ = kill_group(pid, libc::SIGKILL);
            }
        }
    }

    fn busy(&self) -> usize {
        self.procs.values().filter(|p| p.task.is_some()).count()
    }

    fn schedule(&mut self) {
        while let Some(spec) = self.queue.front() {
            if self.busy() >= self.cfg.slots {
                return;
            }
            let Some(func) = self.functions.get(&spec.function) else {
                let spec = self.queue.pop_front().expect("front exists");
                let e = TaskError::new(
                    ErrorKind::ImportError,
                    "UnknownFunction",
                    format!("{} was never sent to this manager", spec.function),
                );
                self.push_result(spec.id, spec.attempt, Outcome::Err(e));
                continue;
            };
            if func.body.is_python() {
                if !self.start_python_task() {
                    break;
                }
            } else {
                self.start_shell_task();
            }
        }
        self.pipeline();
    }

    /// Every Python worker is busy and tasks wait: write one small task behind each running
    /// one, so workers go from task to task without waiting for the manager.
    fn pipeline(&mut self) {
        if self.queue.is_empty()
            || self
                .procs
                .values()
                .any(|p| p.task.is_none() && p.exit.is_none())
        {
            return;
        }
        let candidates: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.next.is_none()
                    && p.exit.is_none()
                    && p.task.as_ref().is_some_and(|r| r.forced.is_none())
                    && matches!(&p.kind, Kind::Python(w) if w.ready && !w.eof())
            })
            .map(|(&pid, _)| pid)
            .collect();
        for pid in candidates {
            let Some(spec) = self.queue.front() else {
                return;
            };
            let Some(func) = self.functions.get(&spec.function) else {
                return;
            };
            let proc = self.procs.get_mut(&pid).expect("candidate");
            let Kind::Python(worker) = &mut proc.kind else {
                continue;
            };
            if !func.body.is_python()
                || spec.args.data.len() > PIPELINE_MAX_ARGS
                || !worker.knows(spec.function)
            {
                return;
            }
            let spec = self.queue.pop_front().expect("front exists");
            if let Err(e) = worker.send_task(&spec, &func.body) {
                tracing::warn!("cannot send a task to worker {pid}: {e}");
                let _ = kill_group(pid, libc::SIGKILL);
            }
            proc.next = Some(Pipelined {
                spec,
                cancelled: false,
            });
        }
    }

    /// Hand the queue's head to an idle worker; `false` if none is ready (one may be starting).
    fn start_python_task(&mut self) -> bool {
        let idle = self.procs.iter().find_map(|(&pid, p)| match &p.kind {
            Kind::Python(w) if w.ready && p.task.is_none() && !w.eof() && p.exit.is_none() => {
                Some(pid)
            }
            _ => None,
        });
        let Some(pid) = idle else {
            self.spawn_workers_for_queue();
            return false;
        };
        let spec = self.queue.pop_front().expect("front exists");
        let body = &self.functions[&spec.function].body;
        let proc = self.procs.get_mut(&pid).expect("found above");
        let Kind::Python(worker) = &mut proc.kind else {
            unreachable!("found as python")
        };
        proc.task = Some(Running {
            id: spec.id,
            attempt: spec.attempt,
            deadline: spec
                .walltime_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
            forced: None,
            kill_at: None,
        });
        if let Err(e) = worker.send_task(&spec, body) {
            tracing::warn!("cannot send a task to worker {pid}: {e}");
            // The worker is gone or broken; its exit is reported as worker_lost.
            let _ = kill_group(pid, libc::SIGKILL);
        }
        true
    }

    fn spawn_workers_for_queue(&mut self) {
        let python_procs: Vec<&Proc> = self
            .procs
            .values()
            .filter(|p| matches!(p.kind, Kind::Python(_)))
            .collect();
        let starting = python_procs
            .iter()
            .filter(|p| matches!(&p.kind, Kind::Python(w) if !w.ready))
            .count();
        let total = python_procs.len();
        let waiting = self
            .queue
            .iter()
            .filter(|t| {
                self.functions
                    .get(&t.function)
                    .is_some_and(|f| f.body.is_python())
            })
            .count();
        let free_slots = self.cfg.slots.saturating_sub(self.busy());
        let want = waiting.min(free_slots).saturating_sub(starting);
        let room = self.cfg.slots.saturating_sub(total);
        if self.startup_failures >= 3 {
            self.fail_python_queue();
            return;
        }
        for _ in 0..want.min(room) {
            self.serial += 1;
            let log = self.cfg.log_dir.join(format!("worker-{}.log", self.serial));
            match PythonWorker::spawn(
                &self.cfg.python,
                &self.cfg.worker_script,
                &log,
                &self.cfg.markers,
                self.serial,
                self.cfg.max_result_bytes,
            ) {
                Ok(w) => {
                    let pid = w.pid;
                    self.procs.insert(
                        pid,
                        Proc {
                            kind: Kind::Python(w),
                            task: None,
                            next: None,
                            exit: None,
                            log: Some(log),
                        },
                    );
                }
                Err(e) => {
                    tracing::error!("cannot start a Python worker: {e}");
                    self.startup_failures = 3;
                    self.fail_python_queue_with(format!("cannot start a Python worker: {e}"));
                    return;
                }
            }
        }
    }

    fn fail_python_queue(&mut self) {
        let log = self.cfg.log_dir.join(format!("worker-{}.log", self.serial));
        self.fail_python_queue_with(format!(
            "Python workers fail to start; see {}",
            log.display()
        ));
    }

    fn fail_python_queue_with(&mut self, message: String) {
        self.startup_failures = 0;
        let (python, rest): (Vec<TaskSpec>, Vec<TaskSpec>) =
            std::mem::take(&mut self.queue).into_iter().partition(|t| {
                self.functions
                    .get(&t.function)
                    .is_some_and(|f| f.body.is_python())
            });
        self.queue = rest.into();
        for spec in python {
            self.push_result(
                spec.id,
                spec.attempt,
                Outcome::Err(TaskError::new(
                    ErrorKind::WorkerLost,
                    "WorkerStartFailed",
                    message.clone(),
                )),
            );
        }
    }

    fn start_shell_task(&mut self) {
        let spec = self.queue.pop_front().expect("front exists");
        let func = &self.functions[&spec.function];
        let outcome = match &func.shell {
            None => Err(TaskError::new(
                ErrorKind::BadInput,
                "BadTemplate",
                "the shell command template is empty",
            )),
            Some(t) => shell_args(t, &spec.args).and_then(|args| {
                self.serial += 1;
                ShellProc::spawn(
                    &t.script,
                    &args,
                    &self.cfg.markers,
                    self.serial,
                    &spec.id.0.to_string(),
                )
                .map_err(|e| {
                    TaskError::new(
                        ErrorKind::WorkerLost,
                        "SpawnFailed",
                        format!("cannot start /bin/sh: {e}"),
                    )
                })
            }),
        };
        match outcome {
            Ok(proc) => {
                let pid = proc.pid;
                let running = Running {
                    id: spec.id,
                    attempt: spec.attempt,
                    deadline: spec
                        .walltime_ms
                        .map(|ms| Instant::now() + Duration::from_millis(ms)),
                    forced: None,
                    kill_at: None,
                };
                self.procs.insert(
                    pid,
                    Proc {
                        kind: Kind::Shell(proc),
                        task: Some(running),
                        next: None,
                        exit: None,
                        log: None,
                    },
                );
            }
            Err(e) => self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        }
    }

    fn push_result(&mut self, id: TaskId, attempt: fnx_protocol::Attempt, outcome: Outcome) {
        self.batch_bytes += match &outcome {
            Outcome::Ok(p) => p.data.len(),
            Outcome::Err(e) => e.message.len() + e.traceback.as_ref().map_or(0, String::len),
        } + 32;
        self.batch.push(TaskResult {
            id,
            attempt,
            outcome,
        });
        self.batch_since.get_or_insert_with(Instant::now);
        if self.batch.len() >= FLUSH_COUNT || self.batch_bytes >= FLUSH_BYTES {
            self.flush(true);
        }
    }

    fn flush(&mut self, force: bool) {
        let Some(since) = self.batch_since else {
            return;
        };
        // Hold results back briefly to batch them, but only while there is local work to do:
        // a manager with nothing queued needs the interchange to see its free slots now.
        if !force && !self.queue.is_empty() && since.elapsed() < FLUSH_AFTER {
            return;
        }
        let results = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_since = None;
        match encode(
            &ManagerToInterchange::Results(results),
            self.cfg.max_frame_bytes,
        ) {
            Ok(frame) => {
                if let Err(e) = self.link.send_multipart([tag::SEND, &frame[..]], 0) {
                    tracing::error!("cannot hand results to the link thread: {e}");
                }
            }
            Err(e) => tracing::error!("cannot encode results: {e}"),
        }
    }

    fn stop_all(&mut self) {
        for (&pid, p) in self.procs.iter_mut() {
            if let Kind::Python(w) = &mut p.kind {
                if p.task.is_none() {
                    w.send_exit();
                }
            }
            let _ = kill_group(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.cfg.kill_grace;
        while !self.procs.is_empty() && Instant::now() < deadline {
            for (pid, _) in reap_any() {
                self.procs.remove(&pid);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for &pid in self.procs.keys() {
            let _ = kill_group(pid, libc::SIGKILL);
        }
        let swept = fnx_sys::sweep::kill_marked("FNX_MANAGER", &self.cfg.markers.manager, 20);
        if swept > 0 {
            tracing::info!("killed {swept} leftover processes at exit");
        }
        reap_any();
    }
}

/// A pipelined task became the running one: its walltime starts now; a cancel that came while
/// it waited in the pipe kills it at once.
fn promote(pid: u32, next: Pipelined, grace: Duration) -> Running {
    let now = Instant::now();
    let mut r = Running {
        id: next.spec.id,
        attempt: next.spec.attempt,
        deadline: next
            .spec
            .walltime_ms
            .map(|ms| now + Duration::from_millis(ms)),
        forced: None,
        kill_at: None,
    };
    if next.cancelled {
        r.forced = Some(cancelled());
        r.kill_at = Some(now + grace);
        let _ = kill_group(pid, libc::SIGTERM);
    }
    r
}

fn cancelled() -> TaskError {
    TaskError::new(ErrorKind::Cancelled, "Cancelled", "the task was cancelled")
}

fn too_large(len: u64, max: u64) -> TaskError {
    TaskError::new(
        ErrorKind::ResultTooLarge,
        "ResultTooLarge",
        format!("result of {len} bytes exceeds the limit of {max} bytes"),
    )
}

/// Arguments of a shell task: a JSON array of strings, one per template parameter.
fn shell_args(t: &ShellTemplate, args: &Payload) -> Result<Vec<String>, TaskError> {
    let bad = |msg: String| TaskError::new(ErrorKind::BadInput, "BadArguments", msg);
    if args.encoding != Encoding::Json {
        return Err(bad("shell tasks take JSON arguments".into()));
    }
    let values: Vec<String> = serde_json::from_slice(&args.data).map_err(|e| {
        bad(format!(
            "shell arguments must be a JSON array of strings: {e}"
        ))
    })?;
    if values.len() != t.params.len() {
        return Err(bad(format!(
            "the template takes {} parameters ({}), got {} values",
            t.params.len(),
            t.params.join(", "),
            values.len()
        )));
    }
    if let Some((name, _)) = t.params.iter().zip(&values).find(|(_, v)| v.contains('\0')) {
        return Err(bad(format!(
            "the value of parameter '{name}' contains a NUL byte"
        )));
    }
    Ok(values)
}

fn shell_outcome(status: i32, s: &ShellProc, max: u64) -> Outcome {
    let stdout = s.out.text();
    let stderr = s.err.text();
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        let json =
            serde_json::json!({"returncode": 0, "stdout": stdout, "stderr": stderr}).to_string();
        if json.len() as u64 > max {
            return Outcome::Err(too_large(json.len() as u64, max));
        }
        return Outcome::Ok(Payload::json(json));
    }
    let (type_name, message) = if libc::WIFEXITED(status) {
        (
            "NonZeroExit",
            format!("command exited with status {}", libc::WEXITSTATUS(status)),
        )
    } else {
        (
            "KilledBySignal",
            format!("command {}", describe_wait_status(status)),
        )
    };
    let mut tb = String::new();
    if !stdout.is_empty() {
        tb.push_str("--- stdout (tail) ---\n");
        tb.push_str(&stdout);
        tb.push('\n');
    }
    tb.push_str("--- stderr (tail) ---\n");
    tb.push_str(&stderr);
    Outcome::Err(TaskError {
        kind: ErrorKind::Exception,
        type_name: type_name.into(),
        message,
        traceback: Some(tb),
    })
}
