//! The worker pool: runs tasks in Python workers and shell processes, enforces walltimes,
//! batches results. Runs on the manager's main thread and never touches the interchange socket
//! (the link thread does); the two talk over an inproc pair.
//!
//! The pool is a state machine without I/O: events in (messages from the interchange, worker
//! frames, exits, out-of-memory notices, signals, a tick with the time), actions out through
//! the [`Io`] trait. `manager/tests/pool.rs` drives it with a recording `Io`.
//!
//! - `mod.rs`: the state, the interchange's messages, cancel, walltime deadlines, the tick.
//! - `io.rs`: the [`Io`] trait and the events' data.
//! - `driver.rs`: the real `Io` (children, pipes, cgroups, the link) and the poll loop.
//! - `schedule.rs`: starting tasks (workers, shell commands, pipelining).
//! - `outcome.rs`: worker frames, process exits and each task's outcome.
//! - `envs.rs`: worker environments (function containers): warm workers per container, idle
//!   timeouts, start counts and the report of them to the interchange.

pub mod driver;
mod envs;
mod io;
mod memory;
mod outcome;
mod report;
mod schedule;

pub use memory::memory_cgroups;
pub(super) use memory::Limit;
use outcome::{cancelled, shell_args};

pub use io::{Exit, Io, ShellStart, Spawned, WorkerOutput, WorkerStart};

use crate::procs::Markers;
use fnx_protocol::shell::{self, ShellTemplate};
use fnx_protocol::{
    Encoding, ErrorKind, FunctionBody, FunctionId, InterchangeToManager, ManagerToInterchange,
    Outcome, Payload, TaskError, TaskId, TaskResult, TaskSpec,
};
use fnx_sys::process::describe_wait_status;
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// When to ask the interchange to drain this manager (before the batch job's walltime).
    pub drain_at: Option<Instant>,
    /// The manager's run directory (bound into containers).
    pub run_dir: PathBuf,
    /// Placement of each worker slot (`slots` entries).
    pub placement: Vec<fnx_sys::placement::SlotPlan>,
    /// The container workers and shell tasks start in.
    pub container: Option<crate::procs::Wrap>,
    /// Idle workers of a function's container exit after this long.
    pub container_idle: Duration,
    /// Memory a task's processes may use (resident bytes; None: no limit).
    pub mem_limit: Option<u64>,
}

impl PoolConfig {
    /// A pool of `slots` for a pool driven without a driver (tests and benchmarks, over an
    /// `Io` of their own): no files of its own exist, no limits apply, a kill grace of 2 s.
    pub fn detached(slots: usize) -> PoolConfig {
        PoolConfig {
            slots,
            python: "python3".into(),
            worker_script: PathBuf::from("/nonexistent/fnx_worker.py"),
            log_dir: PathBuf::from("/nonexistent/manager"),
            markers: Markers {
                run_id: "r".into(),
                manager: "m".into(),
                sandbox: None,
            },
            max_result_bytes: 1 << 20,
            kill_grace: Duration::from_secs(2),
            zero_work: false,
            max_frame_bytes: 64 << 20,
            drain_at: None,
            run_dir: PathBuf::from("/nonexistent/run"),
            placement: Vec::new(),
            container: None,
            container_idle: Duration::from_secs(300),
            mem_limit: None,
        }
    }
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

struct Func {
    body: FunctionBody,
    shell: Option<ShellTemplate>,
    /// Its worker environment (`""`: the pool's own workers).
    env: String,
}

struct Running {
    id: TaskId,
    attempt: fnx_protocol::Attempt,
    function: FunctionId,
    /// When it started (its process had it).
    started: Instant,
    deadline: Option<Instant>,
    forced: Option<TaskError>,
    kill_at: Option<Instant>,
    /// The most resident memory its process group was seen to use.
    peak_rss: u64,
    /// Its memory limit in bytes: its own `memory_mb`, else the pool's `mem_per_worker`.
    limit: Option<Limit>,
    /// Its process's memory cgroup holds it to `limit` (no sampling needed).
    held_by_cgroup: bool,
    /// The kernel's out-of-memory killer acted in its cgroup while it ran.
    oom_hit: bool,
    /// Its working directory with its input files, if it has any; held only for its `Drop`,
    /// which removes the directory when the task ends.
    #[allow(dead_code)]
    sandbox: Option<crate::sandbox::Sandbox>,
}

impl Running {
    /// Whether its memory is measured by sampling: it has a limit and is not being killed
    /// already. Held by a cgroup, the sample is only a backstop (see [`Running::kill_above`]).
    fn sampled(&self) -> bool {
        self.limit.is_some() && self.forced.is_none()
    }

    /// The resident size over which a sample kills it: its limit; held by a cgroup, a margin
    /// above it (resident sizes also count shared library pages the cgroup does not), so that
    /// only a task that got out of its cgroup's hold is caught.
    fn kill_above(&self) -> Option<u64> {
        let limit = self.limit?.bytes;
        Some(if self.held_by_cgroup {
            limit + limit / 4 + (32 << 20)
        } else {
            limit
        })
    }

    /// A task that starts running at `now`, in a pool whose workers have `pool` bytes of
    /// memory: its walltime clock starts here.
    fn start(spec: &TaskSpec, pool: Option<u64>, now: Instant) -> Running {
        Running {
            id: spec.id,
            attempt: spec.attempt,
            function: spec.function,
            started: now,
            deadline: spec
                .walltime_ms
                .map(|ms| now + fnx_protocol::bounded_ms(ms)),
            forced: None,
            kill_at: None,
            peak_rss: 0,
            limit: Limit::of(spec, pool),
            held_by_cgroup: false,
            oom_hit: false,
            sandbox: None,
        }
    }
}

/// What a process is, with the state the pool keeps of it.
enum Kind {
    Python {
        /// It said `ready`.
        ready: bool,
        /// Its stdout closed (it can take no task).
        eof: bool,
        /// Functions whose definitions it was sent.
        defined: HashSet<FunctionId>,
    },
    Shell,
}

struct Proc {
    kind: Kind,
    /// Its `FNX_PROC` marker.
    marker: String,
    /// The task running now.
    task: Option<Running>,
    /// A small task already written into a busy Python worker's pipe, so the worker starts it
    /// the moment the current one ends (no round trip through the manager in between). It
    /// starts its walltime clock when it becomes `task`.
    next: Option<Pipelined>,
    exit: Option<i32>,
    /// Its peak resident memory and that of the descendants it waited for, from its exit.
    exit_peak: u64,
    log: Option<PathBuf>,
    /// The worker slot whose placement (CPUs, accelerators, environment) it started with.
    slot: usize,
    /// A Python worker's environment (`""`: the pool's own).
    env: String,
    /// Since when a Python worker has had no task.
    idle_since: Option<Instant>,
    /// When it was told to exit (idle too long, or its slot is needed by another environment).
    retiring: Option<Instant>,
}

struct Pipelined {
    spec: TaskSpec,
    cancelled: bool,
}

/// Largest argument payload pipelined behind a running task (well inside a pipe's buffer, so
/// writing it never blocks the manager).
const PIPELINE_MAX_ARGS: usize = 16 * 1024;

/// A task is pipelined only behind one whose function is known to be this quick, and that
/// has run no longer than twice this: a task in a pipe cannot move to a worker that becomes
/// idle meanwhile, so it may wait no longer than a trip through the manager would take.
const PIPELINE_BEHIND: Duration = Duration::from_millis(1);

/// How long a function's tasks run here: a decaying maximum of the observed run times (the
/// last one, or seven eighths of the previous figure if that is more), so one long task
/// stops pipelining behind the function at once and dozens of short ones resume it.
#[derive(Clone, Copy, Debug, Default)]
struct RunTime(Duration);

impl RunTime {
    fn observe(&mut self, took: Duration) {
        self.0 = took.max(self.0 * 7 / 8);
    }
}

impl Proc {
    fn new(
        kind: Kind,
        marker: String,
        task: Option<Running>,
        log: Option<PathBuf>,
        slot: usize,
    ) -> Proc {
        Proc {
            kind,
            marker,
            task,
            next: None,
            exit: None,
            exit_peak: 0,
            log,
            slot,
            env: String::new(),
            idle_since: None,
            retiring: None,
        }
    }

    fn python() -> Kind {
        Kind::Python {
            ready: false,
            eof: false,
            defined: HashSet::new(),
        }
    }

    fn is_python(&self) -> bool {
        matches!(self.kind, Kind::Python { .. })
    }

    /// A Python worker that said `ready` and whose stdout is open.
    fn is_ready(&self) -> bool {
        matches!(
            self.kind,
            Kind::Python {
                ready: true,
                eof: false,
                ..
            }
        )
    }
}

const FLUSH_AFTER: Duration = Duration::from_millis(1);
const FLUSH_COUNT: usize = 1024;
const FLUSH_BYTES: usize = 4 << 20;

/// The pool's state. It does no I/O of its own: events come in through its `on_*` methods
/// and [`Pool::tick`], each with the time, and actions go out through `io`.
pub struct Pool<I: Io> {
    cfg: PoolConfig,
    io: I,
    /// The time of the event being handled.
    now: Instant,
    functions: HashMap<FunctionId, Func>,
    /// How long each function's tasks run here (Python tasks with a result).
    run_times: HashMap<FunctionId, RunTime>,
    queue: VecDeque<TaskSpec>,
    procs: HashMap<u32, Proc>,
    /// Processes running a task (`procs` with a `task`).
    busy: usize,
    /// Python workers not told to exit (what the interchange hears of as warm).
    live: usize,
    /// Per environment, workers that became idle, newest last. Checked when taken (a worker
    /// may have been given a task or retired since), so it may hold stale pids: it spares the
    /// hot path a scan of every worker.
    idle: HashMap<String, Vec<u32>>,
    /// Workers whose running task may take another behind it (see `pipeline`), checked when
    /// taken.
    pipe_candidates: Vec<u32>,
    /// No deadline or kill of a running task comes before this (it may be earlier than the
    /// earliest: the deadlines are looked at then, and it moves on).
    next_check: Option<Instant>,
    /// No idle container worker is due to retire, and no retiring worker to be killed, before
    /// this (the same way).
    next_retire: Option<Instant>,
    /// A memory limit applies to some task (the pool's, or a task's own seen so far): memory
    /// is sampled only then.
    limits: bool,
    serial: u64,
    /// Start-up failures in a row per environment, with the log of the last one.
    startup_failures: HashMap<String, (u32, PathBuf)>,
    /// Worker environments: how each one's workers start (`Err`: why they cannot here).
    envs: HashMap<String, Result<Option<crate::procs::Wrap>, fnx_protocol::ContainerError>>,
    /// Python workers started per environment.
    starts: HashMap<String, u64>,
    /// The last worker report sent to the interchange, and the live workers and starts it
    /// was made from.
    warm_sent: (Vec<fnx_protocol::WarmWorkers>, usize, u64),
    /// The queue's oldest task and how many younger tasks idle workers of other environments
    /// ran before it.
    head_bypass: (Option<TaskId>, u32),
    batch: Vec<TaskResult>,
    batch_bytes: usize,
    batch_since: Option<Instant>,
    /// Attempts that started since the last flush (reported with the results).
    started: Vec<(TaskId, fnx_protocol::Attempt)>,
    end: Option<PoolEnd>,
    drain_sent: bool,
    /// Outcomes of tasks killed by a termination signal this manager did not send, held for
    /// [`HOLD_KILLED`]: when the batch system ends the job (scancel, walltime, preemption) its
    /// SIGTERM reaches the tasks and this manager in either order, and such tasks must be
    /// retried elsewhere, not reported as failed.
    held: Vec<(Instant, TaskId, fnx_protocol::Attempt, Outcome)>,
    /// When the memory of running tasks was last measured (with a memory limit).
    mem_sampled: Instant,
    /// The kernel's count of out-of-memory kills before the last batch of deaths.
    oom_seen: u64,
    /// When `oom_seen` was last brought up to date while no worker died, and the count then
    /// (it becomes `oom_seen` at the next refresh).
    oom_refreshed: Instant,
    oom_pending: u64,
}

/// Bring `slot` forward to `at` if that is earlier.
fn earlier(slot: &mut Option<Instant>, at: Option<Instant>) {
    if let Some(at) = at {
        *slot = Some(slot.map_or(at, |t| t.min(at)));
    }
}

/// How long the outcome of a task killed from outside is held (see `Pool::held`).
pub const HOLD_KILLED: Duration = Duration::from_secs(1);

/// How often running tasks' memory is measured against the limit.
const MEM_SAMPLE: Duration = Duration::from_millis(100);

impl<I: Io> Pool<I> {
    /// A pool that acts through `io`, starting at `now`.
    pub fn new(cfg: PoolConfig, mut io: I, now: Instant) -> Self {
        let oom_seen = io.oom_kills().unwrap_or(0);
        let limits = cfg.mem_limit.is_some();
        Pool {
            cfg,
            io,
            now,
            functions: HashMap::new(),
            run_times: HashMap::new(),
            queue: VecDeque::new(),
            procs: HashMap::new(),
            busy: 0,
            live: 0,
            idle: HashMap::new(),
            pipe_candidates: Vec::new(),
            next_check: None,
            next_retire: None,
            limits,
            serial: 0,
            startup_failures: HashMap::new(),
            envs: HashMap::new(),
            starts: HashMap::new(),
            warm_sent: (Vec::new(), 0, 0),
            head_bypass: (None, 0),
            batch: Vec::new(),
            batch_bytes: 0,
            batch_since: None,
            started: Vec::new(),
            end: None,
            drain_sent: false,
            held: Vec::new(),
            mem_sampled: now,
            oom_seen,
            oom_refreshed: now,
            oom_pending: 0,
        }
    }

    /// What it acts through (a test reads what was asked).
    pub fn io(&mut self) -> &mut I {
        &mut self.io
    }

    /// Why it stopped, once it has.
    pub fn end(&self) -> Option<&PoolEnd> {
        self.end.as_ref()
    }

    /// The pids of its processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.keys().copied().collect()
    }

    /// Tasks waiting here for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The link ended.
    pub fn on_link_lost(&mut self, why: String) {
        self.end = Some(PoolEnd::LinkLost(why));
    }

    /// The manager got termination signal `sig`.
    pub fn on_signal(&mut self, sig: i32) {
        tracing::warn!("received {}; stopping", fnx_sys::process::signal_name(sig));
        self.end = Some(PoolEnd::Signal(sig));
    }

    /// The kernel's out-of-memory killer acted in the memory cgroup of process `pid`.
    pub fn on_oom_notice(&mut self, pid: u32) {
        if let Some(r) = self.procs.get_mut(&pid).and_then(|p| p.task.as_mut()) {
            r.oom_hit = true;
        }
    }

    /// After the events of one round: releases held outcomes, enforces walltimes and memory
    /// limits, drains before the batch job ends, starts tasks, retires idle workers, reports
    /// warm workers and sends results. `exited`: children died this round (the OOM count is
    /// then not moved on).
    pub fn tick(&mut self, now: Instant, exited: bool) {
        self.now = now;
        if !exited && now >= self.oom_refreshed + Duration::from_secs(1) {
            // OOM kills elsewhere on the node are not ours: the count moves on without them,
            // a second late, so that a kill whose death is not reaped yet still counts.
            self.oom_refreshed = now;
            if let Some(n) = self.io.oom_kills() {
                self.oom_seen = self
                    .oom_seen
                    .max(std::mem::replace(&mut self.oom_pending, n));
            }
        }
        self.release_held(Some(now));
        self.check_deadlines(now);
        self.check_memory(now);
        if !self.drain_sent && self.cfg.drain_at.is_some_and(|at| now >= at) {
            tracing::warn!(
                "the batch job's walltime ends soon: draining (no new tasks; the held ones finish)"
            );
            self.drain_sent = true;
            self.send(&ManagerToInterchange::Drain);
        }
        self.schedule();
        self.retire_idle(now);
        self.report_warm();
        self.flush(false);
    }

    /// How long the driver may wait for events before the next [`Pool::tick`] is due.
    pub fn timeout(&self, now: Instant) -> Duration {
        let mut next = now + Duration::from_secs(1);
        if let Some(at) = self.cfg.drain_at.filter(|_| !self.drain_sent) {
            next = next.min(at);
        }
        if let Some(at) = self.held.iter().map(|h| h.0).min() {
            next = next.min(at);
        }
        if let Some(since) = self.batch_since {
            next = next.min(since + FLUSH_AFTER);
        }
        if self.limits && self.busy > 0 {
            next = next.min(self.mem_sampled + MEM_SAMPLE);
        }
        for at in [self.next_check, self.next_retire].into_iter().flatten() {
            next = next.min(at);
        }
        next.saturating_duration_since(now)
    }

    /// A message from the interchange.
    pub fn on_message(&mut self, now: Instant, msg: InterchangeToManager) {
        self.now = now;
        match msg {
            InterchangeToManager::Tasks { functions, tasks } => {
                for def in functions {
                    let shell = match &def.body {
                        FunctionBody::Shell { template } => shell::parse(template).ok(),
                        _ => None,
                    };
                    let env = self.add_env(&def);
                    self.functions.insert(
                        def.id,
                        Func {
                            body: def.body,
                            shell,
                            env,
                        },
                    );
                }
                self.limits |= tasks.iter().any(|t| t.memory_mb.is_some());
                if self.cfg.zero_work {
                    for spec in tasks {
                        self.push_result(spec.id, spec.attempt, Outcome::Ok(spec.args));
                    }
                } else {
                    self.queue.extend(tasks);
                }
            }
            InterchangeToManager::Cancel { tasks } => self.cancel(&tasks),
            InterchangeToManager::Reclaim { max } => self.give_back(max as usize),
            InterchangeToManager::Drain => tracing::info!("draining: no new tasks will come"),
            InterchangeToManager::Drained => self.end = Some(PoolEnd::Drained),
            InterchangeToManager::Shutdown { reason } => {
                tracing::info!("interchange asked this manager to exit: {reason}");
                self.end = Some(PoolEnd::Shutdown(reason));
            }
            InterchangeToManager::Reregister { .. } => {
                // Tasks not started yet are dispatched again by the restarted interchange
                // (with a new attempt); running ones go on, their results are discarded there.
                let dropped = self.queue.len();
                self.queue.clear();
                // The restarted interchange learns this manager's warm workers again.
                self.warm_sent = (Vec::new(), 0, 0);
                tracing::info!("registering again; dropped {dropped} tasks not yet started");
            }
            other => tracing::debug!("unexpected message for the pool: {other:?}"),
        }
    }

    /// Return up to `max` queued (never started) tasks, newest first, so idle workers on other
    /// managers can run them. Results gathered so far go first, so the interchange's view of
    /// what this manager holds is current.
    fn give_back(&mut self, max: usize) {
        let n = max.min(self.queue.len());
        let returned: Vec<_> = self
            .queue
            .drain(self.queue.len() - n..)
            .map(|t| (t.id, t.attempt))
            .collect();
        self.flush(true);
        if !returned.is_empty() {
            tracing::debug!("giving back {} unstarted tasks", returned.len());
        }
        self.send(&ManagerToInterchange::Returned(returned));
    }

    /// Hand a message for the interchange to the link thread.
    fn send(&mut self, msg: &ManagerToInterchange) {
        self.io.send(msg);
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
            let kill_at = self.now + self.cfg.kill_grace;
            if let Some((&pid, proc)) = self
                .procs
                .iter_mut()
                .find(|(_, p)| matches!(&p.task, Some(r) if r.id == id && r.attempt == attempt))
            {
                let r = proc.task.as_mut().expect("matched");
                if r.forced.is_none() {
                    r.forced = Some(cancelled());
                    r.kill_at = Some(kill_at);
                    self.io.signal_group(pid, libc::SIGTERM);
                    self.watch(Some(kill_at));
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

    /// A running task's deadline or kill is due at `at`: [`Pool::check_deadlines`] looks then.
    fn watch(&mut self, at: Option<Instant>) {
        earlier(&mut self.next_check, at);
    }

    /// Kill the tasks past their walltime (SIGTERM, then SIGKILL after the grace). Looks at
    /// the running tasks only when one may be due (`next_check`), then finds the next.
    fn check_deadlines(&mut self, now: Instant) {
        if self.next_check.is_none_or(|at| now < at) {
            return;
        }
        let grace = self.cfg.kill_grace;
        let mut next: Option<Instant> = None;
        for (&pid, p) in self.procs.iter_mut() {
            let Some(r) = p.task.as_mut() else { continue };
            if r.forced.is_none() && r.deadline.is_some_and(|d| now >= d) {
                r.forced = Some(TaskError::new(
                    ErrorKind::Walltime,
                    "WalltimeExceeded",
                    "walltime exceeded: the task ran past its limit and its processes were killed",
                ));
                r.kill_at = Some(now + grace);
                self.io.signal_group(pid, libc::SIGTERM);
            } else if r.kill_at.is_some_and(|k| now >= k) {
                r.kill_at = None;
                self.io.signal_group(pid, libc::SIGKILL);
            }
            for at in [r.deadline.filter(|_| r.forced.is_none()), r.kill_at]
                .into_iter()
                .flatten()
            {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
        }
        self.next_check = next;
    }

    /// The pool is over (see [`Pool::end`]): report what is held and gathered, then ask every
    /// process to stop (idle workers by their pipe, all by SIGTERM to their group). The driver
    /// reaps them, kills the rest after the grace, and says goodbye to the interchange.
    pub fn finish(&mut self, now: Instant) {
        self.now = now;
        self.release_held(None);
        self.flush(true);
        let pids: Vec<(u32, bool)> = self
            .procs
            .iter()
            .map(|(&pid, p)| (pid, p.is_python() && p.task.is_none()))
            .collect();
        for (pid, idle) in pids {
            if idle {
                self.io.send_exit(pid);
            }
            self.io.signal_group(pid, libc::SIGTERM);
        }
    }
}
