//! Feed the manager's pool events with the times they happen at; assert exactly what it asks
//! of the world (processes started, frames written, signals, messages to the interchange).
//! The races here are the ones a real node produces only now and then.

use fnx_manager::pool::{
    Exit, Io, Pool, PoolConfig, ShellStart, Spawned, WorkerOutput, WorkerStart,
};
use fnx_manager::sandbox::Sandbox;
use fnx_manager::wire::FromWorker;
use fnx_protocol::*;
use std::path::Path;
use std::time::{Duration, Instant};

const F: FunctionId = FunctionId(7);
const GRACE: Duration = Duration::from_secs(2);

/// What the pool asked for, in order.
#[derive(Debug, Clone, PartialEq)]
enum Act {
    SpawnWorker { pid: u32 },
    SpawnShell { pid: u32, task: u64 },
    Task { pid: u32, task: u64, def: bool },
    ExitFrame(u32),
    Signal(u32, i32),
    Sweep(String),
    Send(ManagerToInterchange),
}

/// A world that records and answers like an idle node: pids count up from 100; its clock
/// reads `clock` (the time a process started, for a task's walltime).
struct Rec {
    acts: Vec<Act>,
    next_pid: u32,
    clock: Instant,
    /// Processes are held by a memory cgroup of their own.
    cgroups: bool,
    /// The peak of a cgroup the kernel killed in (None: it did not).
    cgroup_peak: Option<u64>,
    /// Resident bytes of each process group.
    rss: Vec<(u32, u64)>,
    /// The node's count of out-of-memory kills.
    oom: u64,
}

impl Rec {
    fn pid(&mut self) -> u32 {
        self.next_pid += 1;
        99 + self.next_pid
    }
}

impl Io for Rec {
    fn now(&mut self) -> Instant {
        self.clock
    }
    fn spawn_worker(&mut self, w: WorkerStart<'_>) -> std::io::Result<Spawned> {
        let pid = self.pid();
        self.acts.push(Act::SpawnWorker { pid });
        Ok(Spawned {
            pid,
            marker: format!("m.w{}", w.serial),
            held: false,
        })
    }
    fn spawn_shell(&mut self, s: ShellStart<'_>) -> std::io::Result<Spawned> {
        let pid = self.pid();
        self.acts.push(Act::SpawnShell {
            pid,
            task: s.task.id.0,
        });
        Ok(Spawned {
            pid,
            marker: format!("m.s{}", s.serial),
            held: false,
        })
    }
    fn send_task(
        &mut self,
        pid: u32,
        def: Option<&FunctionBody>,
        spec: &TaskSpec,
        _cwd: Option<&Path>,
    ) -> std::io::Result<()> {
        self.acts.push(Act::Task {
            pid,
            task: spec.id.0,
            def: def.is_some(),
        });
        Ok(())
    }
    fn send_exit(&mut self, pid: u32) {
        self.acts.push(Act::ExitFrame(pid));
    }
    fn signal_group(&mut self, pid: u32, sig: i32) {
        self.acts.push(Act::Signal(pid, sig));
    }
    fn sweep(&mut self, marker: &str) -> usize {
        self.acts.push(Act::Sweep(marker.into()));
        0
    }
    fn send(&mut self, msg: &ManagerToInterchange) {
        self.acts.push(Act::Send(msg.clone()));
    }
    fn sandbox(&mut self, spec: &TaskSpec) -> Result<Option<Sandbox>, TaskError> {
        assert!(spec.files.is_empty(), "these tests send no files");
        Ok(None)
    }
    fn exists(&mut self, _path: &Path) -> bool {
        true
    }
    fn oom_kills(&mut self) -> Option<u64> {
        Some(self.oom)
    }
    fn rss_of_groups(&mut self, groups: &[u32]) -> Vec<(u32, u64)> {
        self.rss
            .iter()
            .filter(|(g, _)| groups.contains(g))
            .copied()
            .collect()
    }
    fn peak_rss(&mut self, _pid: u32) -> Option<u64> {
        None
    }
    fn reset_peak_rss(&mut self, _pid: u32) {}
    fn hold(&mut self, _pid: u32, _limit: Option<u64>) -> bool {
        self.cgroups
    }
    fn cgroup_kill_peak(&mut self, _pid: u32, noticed: bool) -> Option<u64> {
        self.cgroup_peak.filter(|_| noticed)
    }
}

fn config(slots: usize) -> PoolConfig {
    PoolConfig::detached(slots)
}

type TestPool = Pool<Rec>;

fn pool(slots: usize, t0: Instant) -> TestPool {
    pool_with(config(slots), t0)
}

fn pool_with(cfg: PoolConfig, t0: Instant) -> TestPool {
    let rec = Rec {
        acts: Vec::new(),
        next_pid: 0,
        clock: t0,
        cgroups: false,
        cgroup_peak: None,
        rss: Vec::new(),
        oom: 0,
    };
    Pool::new(cfg, rec, t0)
}

/// The acts since the last call.
fn acts(p: &mut TestPool) -> Vec<Act> {
    std::mem::take(&mut p.io().acts)
}

/// The messages to the interchange among `acts`.
fn messages(acts: Vec<Act>) -> Vec<ManagerToInterchange> {
    acts.into_iter()
        .filter_map(|a| match a {
            Act::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// The messages to the interchange since the last call, other acts dropped.
fn sent(p: &mut TestPool) -> Vec<ManagerToInterchange> {
    messages(acts(p))
}

/// A task of `function` too large to be pipelined behind a running one (it waits in the queue).
fn big(id: u64, function: FunctionId) -> TaskSpec {
    TaskSpec {
        args: Payload::json(format!("[\"{}\"]", "x".repeat(20 << 10))),
        ..spec(id, function)
    }
}

/// One slot, and one idle worker (pid 100) of `owner`'s environment (None: the pool's own)
/// that ran task 99 of `f` in no time: `f` is known to be quick (its tasks are pipelined).
fn idle_worker(owner: Option<&str>, f: FunctionId, t0: Instant) -> TestPool {
    let mut p = pool(1, t0);
    p.on_message(t0, tasks(vec![python_def(f, owner)], vec![spec(99, f)]));
    p.tick(t0, false);
    p.on_worker_output(t0, 100, ready(100));
    p.tick(t0, false);
    p.on_worker_output(t0, 100, result(99));
    p.tick(t0, false);
    acts(&mut p);
    p
}

fn python_def(id: FunctionId, owner: Option<&str>) -> FunctionDef {
    FunctionDef {
        owner: owner.map(String::from),
        ..FunctionDef::new(
            id,
            FunctionBody::PythonSource {
                source: "def f(x): return x".into(),
                name: "f".into(),
            },
        )
    }
}

fn spec(id: u64, function: FunctionId) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        attempt: Attempt(1),
        function,
        args: Payload::json(format!("[{id}]")),
        walltime_ms: None,
        files: Vec::new(),
        memory_mb: None,
    }
}

fn tasks(defs: Vec<FunctionDef>, tasks: Vec<TaskSpec>) -> InterchangeToManager {
    InterchangeToManager::Tasks {
        functions: defs,
        tasks,
    }
}

fn ready(pid: u32) -> WorkerOutput {
    WorkerOutput {
        frames: vec![(
            FromWorker::Ready {
                pid,
                python: "3.11.7".into(),
                executable: None,
            },
            Vec::new(),
        )],
        ..WorkerOutput::default()
    }
}

fn result(id: u64) -> WorkerOutput {
    WorkerOutput {
        frames: vec![(
            FromWorker::Result {
                tid: TaskId(id),
                outcome: Ok(Encoding::Json),
            },
            format!("{id}").into_bytes(),
        )],
        ..WorkerOutput::default()
    }
}

fn ok(id: u64) -> TaskResult {
    TaskResult {
        id: TaskId(id),
        attempt: Attempt(1),
        outcome: Outcome::Ok(Payload::json(format!("{id}"))),
    }
}

/// A wait status: killed by `sig`.
fn killed_by(sig: i32) -> i32 {
    sig
}

fn exit(pid: u32, status: i32) -> Vec<Exit> {
    vec![Exit {
        pid,
        status,
        peak: 0,
        output: None,
    }]
}

/// The error kind of each result sent, by task.
fn outcomes(msgs: &[ManagerToInterchange]) -> Vec<(u64, Result<String, ErrorKind>)> {
    msgs.iter()
        .filter_map(|m| match m {
            ManagerToInterchange::Results(rs) => Some(rs),
            _ => None,
        })
        .flatten()
        .map(|r| {
            let o = match &r.outcome {
                Outcome::Ok(p) => Ok(String::from_utf8_lossy(&p.data).into_owned()),
                Outcome::Err(e) => Err(e.kind),
            };
            (r.id.0, o)
        })
        .collect()
}

/// One worker started and ready, running task 1 (of function `F`, walltime `walltime_ms`),
/// with the acts so far taken.
fn running_one(t0: Instant, walltime_ms: Option<u64>, more: Vec<TaskSpec>) -> TestPool {
    let mut p = idle_worker(None, F, t0);
    let mut first = spec(1, F);
    first.walltime_ms = walltime_ms;
    let mut all = vec![first];
    all.extend(more);
    p.on_message(t0, tasks(Vec::new(), all));
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(
        a.contains(&Act::Task {
            pid: 100,
            task: 1,
            def: false
        }),
        "{a:?}"
    );
    p
}

#[test]
fn a_result_read_in_the_round_its_walltime_passes_is_the_outcome_and_nothing_is_killed() {
    let t0 = Instant::now();
    let mut p = running_one(t0, Some(100), Vec::new());
    let late = t0 + Duration::from_millis(150);
    // The driver hands over what it read before the round's tick.
    p.on_worker_output(late, 100, result(1));
    p.tick(late, false);
    let a = acts(&mut p);
    assert!(
        !a.iter().any(|x| matches!(x, Act::Signal(..))),
        "a finished task was killed: {a:?}"
    );
    let msgs = messages(a);
    assert_eq!(outcomes(&msgs), vec![(1, Ok("1".into()))]);
    // Later rounds do not kill or report it again.
    p.tick(late + GRACE * 2, false);
    assert!(outcomes(&sent(&mut p)).is_empty());
}

/// The task on worker 100, with a walltime of 100 ms from `started`, is not killed at `early`
/// (before that), the driver is told to wake for it, and it gets SIGTERM at its deadline.
fn killed_100ms_after(p: &mut TestPool, started: Instant, early: Instant) {
    let deadline = started + Duration::from_millis(100);
    p.tick(early, false);
    assert!(acts(p).is_empty(), "killed before its walltime ran out");
    assert_eq!(p.timeout(early), deadline - early);
    p.tick(deadline, false);
    assert_eq!(acts(p), vec![Act::Signal(100, libc::SIGTERM)]);
}

#[test]
fn a_tasks_walltime_starts_when_its_process_has_it_not_when_the_round_began() {
    let t0 = Instant::now();
    let mut p = pool(1, t0);
    let mut task = spec(1, F);
    task.walltime_ms = Some(100);
    p.on_message(t0, tasks(vec![python_def(F, None)], vec![task]));
    p.tick(t0, false);
    p.on_worker_output(t0, 100, ready(100));
    // Placing its input files and writing it to the worker took 50 ms of this round.
    let started = t0 + Duration::from_millis(50);
    p.io().clock = started;
    p.tick(t0, false);
    assert!(acts(&mut p).contains(&Act::Task {
        pid: 100,
        task: 1,
        def: true
    }));
    killed_100ms_after(&mut p, started, t0 + Duration::from_millis(100));
}

#[test]
fn a_result_after_the_walltime_kill_began_is_dropped_and_the_task_fails_once_as_walltime() {
    let t0 = Instant::now();
    let mut p = running_one(t0, Some(100), Vec::new());
    let due = t0 + Duration::from_millis(100);
    p.tick(due, false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGTERM)]);
    // The result was on its way when SIGTERM landed.
    p.on_worker_output(due, 100, result(1));
    p.tick(due + Duration::from_millis(1), false);
    assert!(
        outcomes(&sent(&mut p)).is_empty(),
        "the late result went out"
    );
    // The worker ignores SIGTERM: SIGKILL after the grace, once.
    p.tick(due + GRACE, false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGKILL)]);
    p.tick(due + GRACE * 2, false);
    assert!(acts(&mut p).is_empty());
    p.on_exits(due + GRACE * 2, exit(100, killed_by(libc::SIGKILL)));
    let a = acts(&mut p);
    assert!(a.contains(&Act::Sweep("m.w1".into())), "{a:?}");
    let msgs = messages(a);
    p.tick(due + GRACE * 2, true);
    let mut all = msgs;
    all.extend(sent(&mut p));
    assert_eq!(outcomes(&all), vec![(1, Err(ErrorKind::Walltime))]);
}

#[test]
fn a_pipelined_task_cancelled_in_the_pipe_is_killed_as_it_starts_and_reported_once() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, vec![spec(2, F)]);
    // Task 2 went into the busy worker's pipe behind task 1 (no definition again).
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(
        !a.iter().any(|x| matches!(x, Act::Task { task: 2, .. })),
        "pipelined twice: {a:?}"
    );
    p.on_message(
        t0,
        InterchangeToManager::Cancel {
            tasks: vec![(TaskId(2), Attempt(1))],
        },
    );
    assert!(
        acts(&mut p).is_empty(),
        "nothing to kill before task 2 starts"
    );
    // Task 1 ends: the worker starts task 2 at once, and the pool kills it.
    let t1 = t0 + Duration::from_millis(5);
    p.on_worker_output(t1, 100, result(1));
    assert!(acts(&mut p).contains(&Act::Signal(100, libc::SIGTERM)));
    p.tick(t1, false);
    // Task 2 finished anyway before the signal landed: its result is not the outcome.
    p.on_worker_output(t1, 100, result(2));
    p.tick(t1, false);
    p.on_exits(t1, exit(100, killed_by(libc::SIGTERM)));
    p.tick(t1, true);
    let msgs = sent(&mut p);
    assert_eq!(
        outcomes(&msgs),
        vec![(1, Ok("1".into())), (2, Err(ErrorKind::Cancelled))]
    );
}

#[test]
fn pipelining_sends_the_next_small_task_once_behind_the_running_one() {
    let t0 = Instant::now();
    let mut p = idle_worker(None, F, t0);
    p.on_message(t0, tasks(Vec::new(), vec![spec(1, F), spec(2, F)]));
    p.tick(t0, false);
    let a: Vec<_> = acts(&mut p)
        .into_iter()
        .filter(|x| matches!(x, Act::Task { .. }))
        .collect();
    assert_eq!(
        a,
        vec![
            Act::Task {
                pid: 100,
                task: 1,
                def: false
            },
            Act::Task {
                pid: 100,
                task: 2,
                def: false
            }
        ]
    );
    // Task 2 starts when task 1's result comes: reported as started then, without a write.
    p.on_worker_output(t0, 100, result(1));
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(!a.iter().any(|x| matches!(x, Act::Task { .. })), "{a:?}");
    let msgs = messages(a);
    assert!(msgs.contains(&ManagerToInterchange::Started(vec![(
        TaskId(2),
        Attempt(1)
    )])));
    p.on_worker_output(t0, 100, result(2));
    p.tick(t0, false);
    assert_eq!(outcomes(&sent(&mut p)), vec![(2, Ok("2".into()))]);
}

/// Two workers; `n` tasks of `F` (not known yet) where task 2 takes 3 s and the others 100 ms.
#[test]
fn no_task_waits_in_a_pipe_behind_a_long_one_while_another_worker_is_idle() {
    let t0 = Instant::now();
    let mut p = pool(2, t0);
    p.on_message(
        t0,
        tasks(
            vec![python_def(F, None)],
            (1..=8).map(|i| spec(i, F)).collect(),
        ),
    );
    p.tick(t0, false);
    p.on_worker_output(t0, 100, ready(100));
    p.on_worker_output(t0, 101, ready(101));
    p.tick(t0, false);
    let ran = |a: Vec<Act>| -> Vec<(u32, u64)> {
        a.into_iter()
            .filter_map(|x| match x {
                Act::Task { pid, task, .. } => Some((pid, task)),
                _ => None,
            })
            .collect()
    };
    // Nothing is known of F yet: one task per worker, none in a pipe.
    let mut first = ran(acts(&mut p));
    first.sort_by_key(|&(_, task)| task);
    assert_eq!(first.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2]);
    let (short, long) = (first[0].0, first[1].0);
    assert_ne!(short, long);
    // The short worker finishes a task every 100 ms and takes the next; the long one holds
    // task 2, and nothing is written behind it.
    let mut at = t0;
    let mut running = 1;
    for next in 3..=8 {
        at += Duration::from_millis(100);
        p.on_worker_output(at, short, result(running));
        p.tick(at, false);
        assert_eq!(ran(acts(&mut p)), vec![(short, next)], "at task {next}");
        running = next;
    }
    at += Duration::from_millis(100);
    p.on_worker_output(at, short, result(running));
    p.tick(at, false);
    p.on_worker_output(t0 + Duration::from_secs(3), long, result(2));
    p.tick(t0 + Duration::from_secs(3), false);
    assert!(ran(acts(&mut p)).is_empty());
    assert_eq!(p.queued(), 0);
}

#[test]
fn a_quick_function_is_no_longer_pipelined_once_one_of_its_tasks_ran_long() {
    let t0 = Instant::now();
    let mut p = idle_worker(None, F, t0);
    p.on_message(t0, tasks(Vec::new(), vec![spec(1, F), spec(2, F)]));
    p.tick(t0, false);
    assert_eq!(
        acts(&mut p)
            .iter()
            .filter(|x| matches!(x, Act::Task { .. }))
            .count(),
        2,
        "task 2 is pipelined behind task 1"
    );
    p.on_worker_output(t0, 100, result(1));
    // Task 2 takes 50 ms.
    let t1 = t0 + Duration::from_millis(50);
    p.on_worker_output(t1, 100, result(2));
    p.tick(t1, false);
    acts(&mut p);
    p.on_message(t1, tasks(Vec::new(), vec![spec(3, F), spec(4, F)]));
    p.tick(t1, false);
    let a = acts(&mut p);
    assert!(a.contains(&Act::Task {
        pid: 100,
        task: 3,
        def: false
    }));
    assert!(
        !a.iter().any(|x| matches!(x, Act::Task { task: 4, .. })),
        "pipelined behind a function that just ran 50 ms: {a:?}"
    );
    assert_eq!(p.queued(), 1);
}

#[test]
fn nothing_is_pipelined_behind_a_task_of_a_quick_function_that_has_run_long() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, Vec::new());
    // Task 1 has run 5 ms, more than twice what F's tasks take: it may be stuck.
    let t1 = t0 + Duration::from_millis(5);
    p.on_message(t1, tasks(Vec::new(), vec![spec(2, F)]));
    p.tick(t1, false);
    let a = acts(&mut p);
    assert!(!a.iter().any(|x| matches!(x, Act::Task { .. })), "{a:?}");
    assert_eq!(p.queued(), 1);
    // It ends: task 2 runs at once.
    p.on_worker_output(t1, 100, result(1));
    p.tick(t1, false);
    assert!(acts(&mut p).contains(&Act::Task {
        pid: 100,
        task: 2,
        def: false
    }));
}

#[test]
fn reregister_drops_the_tasks_not_started_while_the_running_one_finishes_and_reports() {
    let t0 = Instant::now();
    // Tasks 2 and 3 are too large to pipeline: they wait in the queue.
    let mut p = running_one(t0, None, vec![big(2, F), big(3, F)]);
    assert_eq!(p.queued(), 2);
    p.on_message(
        t0,
        InterchangeToManager::Reregister {
            reason: "restarted".into(),
        },
    );
    assert_eq!(p.queued(), 0);
    p.tick(t0, false);
    // The restarted interchange hears the warm workers again.
    let msgs = sent(&mut p);
    assert!(
        msgs.iter()
            .any(|m| matches!(m, ManagerToInterchange::Warm(w)
            if w.iter().any(|w| w.env.is_empty() && w.workers == 1))),
        "{msgs:?}"
    );
    p.on_worker_output(t0, 100, result(1));
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Act::Task { .. } | Act::SpawnWorker { .. })),
        "a dropped task ran: {a:?}"
    );
    let msgs = messages(a);
    assert_eq!(outcomes(&msgs), vec![(1, Ok("1".into()))]);
}

#[test]
fn a_task_killed_by_sigterm_from_outside_is_held_then_reported() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, Vec::new());
    p.on_exits(t0, exit(100, killed_by(libc::SIGTERM)));
    p.tick(t0, true);
    assert!(
        outcomes(&sent(&mut p)).is_empty(),
        "reported before the hold"
    );
    let held = fnx_manager::pool::HOLD_KILLED;
    let half = held / 2;
    assert!(
        p.timeout(t0 + half) <= held - half,
        "the driver must wake for it"
    );
    p.tick(t0 + held - Duration::from_millis(1), false);
    assert!(outcomes(&sent(&mut p)).is_empty());
    p.tick(t0 + held, false);
    assert_eq!(
        outcomes(&sent(&mut p)),
        vec![(1, Err(ErrorKind::WorkerLost))]
    );
}

#[test]
fn a_held_outcome_is_dropped_when_the_manager_then_stops_on_a_signal_so_the_task_is_retried() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, Vec::new());
    p.on_exits(t0, exit(100, killed_by(libc::SIGTERM)));
    p.tick(t0, true);
    // The batch system's SIGTERM reaches the manager just after its task.
    let t1 = t0 + Duration::from_millis(300);
    p.on_signal(libc::SIGTERM);
    assert!(matches!(
        p.end(),
        Some(fnx_manager::PoolEnd::Signal(libc::SIGTERM))
    ));
    p.finish(t1);
    let msgs = sent(&mut p);
    assert!(
        outcomes(&msgs).is_empty(),
        "a task killed with its allocation was reported failed: {msgs:?}"
    );
}

#[test]
fn a_cancel_of_a_queued_task_reports_it_without_running_it() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, vec![big(2, F)]);
    p.on_message(
        t0,
        InterchangeToManager::Cancel {
            tasks: vec![(TaskId(2), Attempt(1))],
        },
    );
    p.tick(t0, false);
    assert_eq!(
        outcomes(&sent(&mut p)),
        vec![(2, Err(ErrorKind::Cancelled))]
    );
    p.on_worker_output(t0, 100, result(1));
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(!a.iter().any(|x| matches!(x, Act::Task { .. })), "{a:?}");
}

/// One slot; an idle worker of alice's environment; bob's task at the head of the queue with
/// 40 of alice's behind it.
#[test]
fn the_oldest_task_waits_for_a_worker_of_its_own_environment_at_most_the_bypass_limit() {
    let t0 = Instant::now();
    let (a, b) = (FunctionId(1), FunctionId(2));
    let mut p = idle_worker(Some("alice"), a, t0);
    // Now bob's task first, then alice's: alice's idle worker runs hers meanwhile.
    let mut queue = vec![spec(1000, b)];
    // Too large to pipeline: one task per round, each seen by the scheduler.
    queue.extend((2..42).map(|i| big(i, a)));
    p.on_message(t0, tasks(vec![python_def(b, Some("bob"))], queue));
    let mut bypassed = 0;
    let mut running = None;
    for round in 0..100 {
        p.tick(t0, false);
        let acted = acts(&mut p);
        if acted.contains(&Act::ExitFrame(100)) {
            break;
        }
        let ran: Vec<u64> = acted
            .iter()
            .filter_map(|x| match x {
                Act::Task { task, .. } => Some(*task),
                _ => None,
            })
            .collect();
        assert!(ran.len() <= 1, "round {round}: {acted:?}");
        if let Some(&t) = ran.first() {
            assert_ne!(t, 1000, "bob's task on alice's worker");
            bypassed += 1;
            running = Some(t);
        }
        let t = running
            .take()
            .expect("a task runs each round until the eviction");
        p.on_worker_output(t0, 100, result(t));
    }
    assert_eq!(bypassed, 32, "younger tasks run before the oldest one");
    // Alice's worker exits; bob's worker starts in its slot and takes bob's task first.
    p.on_exits(t0, exit(100, 0));
    p.tick(t0, true);
    assert_eq!(
        acts(&mut p)
            .into_iter()
            .filter(|x| matches!(x, Act::SpawnWorker { .. }))
            .collect::<Vec<_>>(),
        vec![Act::SpawnWorker { pid: 101 }]
    );
    p.on_worker_output(t0, 101, ready(101));
    p.tick(t0, false);
    let a = acts(&mut p);
    assert!(
        a.contains(&Act::Task {
            pid: 101,
            task: 1000,
            def: true
        }),
        "{a:?}"
    );
}

#[test]
fn an_idle_worker_of_an_environment_without_queued_tasks_gives_its_slot_at_once() {
    let t0 = Instant::now();
    let (a, b) = (FunctionId(1), FunctionId(2));
    let mut p = idle_worker(Some("alice"), a, t0);
    p.on_message(
        t0,
        tasks(vec![python_def(b, Some("bob"))], vec![spec(2, b)]),
    );
    p.tick(t0, false);
    // The interchange hears that alice's environment has no worker here any more.
    let alice = python_def(a, Some("alice")).env();
    assert_eq!(
        acts(&mut p),
        vec![
            Act::ExitFrame(100),
            Act::Send(ManagerToInterchange::Warm(vec![WarmWorkers {
                env: alice,
                workers: 0,
                starts: 1
            }]))
        ]
    );
    // Until it has exited, no second worker: the slot is still taken.
    p.tick(t0, false);
    assert!(acts(&mut p).is_empty());
    // A retiring worker that outlives the grace is killed.
    p.tick(t0 + GRACE + Duration::from_millis(1), false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGKILL)]);
}

#[test]
fn a_worker_that_never_gets_ready_three_times_fails_its_environments_tasks_naming_the_log() {
    let t0 = Instant::now();
    let mut p = pool(1, t0);
    p.on_message(t0, tasks(vec![python_def(F, None)], vec![spec(1, F)]));
    for pid in 100..103 {
        p.tick(t0, false);
        assert!(acts(&mut p).contains(&Act::SpawnWorker { pid }));
        p.on_exits(t0, exit(pid, 1 << 8));
    }
    p.tick(t0, true);
    let msgs = sent(&mut p);
    let failed: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            ManagerToInterchange::Results(rs) => Some(rs),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(failed.len(), 1, "{msgs:?}");
    let Outcome::Err(e) = &failed[0].outcome else {
        panic!("{failed:?}")
    };
    assert_eq!(e.kind, ErrorKind::WorkerLost);
    assert!(e.message.contains("worker-3.log"), "{}", e.message);
}

#[test]
fn results_go_out_in_one_batch_with_the_starts_first_while_work_is_queued() {
    let t0 = Instant::now();
    let mut p = idle_worker(None, F, t0);
    // 1 runs, 2 is pipelined behind it, 3 and 4 are too large to pipeline and wait.
    p.on_message(
        t0,
        tasks(
            Vec::new(),
            vec![spec(1, F), spec(2, F), big(3, F), big(4, F)],
        ),
    );
    p.tick(t0, false);
    acts(&mut p);
    // Results of 1 and 2 in one read; 3 starts, 4 still waits: held for the batch window.
    let mut both = result(1);
    both.frames.extend(result(2).frames);
    p.on_worker_output(t0, 100, both);
    p.tick(t0, false);
    assert!(sent(&mut p).is_empty(), "sent before the batch window");
    p.tick(t0 + Duration::from_millis(1), false);
    let msgs = sent(&mut p);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(
        msgs[0],
        ManagerToInterchange::Started(vec![
            (TaskId(1), Attempt(1)),
            (TaskId(2), Attempt(1)),
            (TaskId(3), Attempt(1))
        ])
    );
    assert_eq!(msgs[1], ManagerToInterchange::Results(vec![ok(1), ok(2)]));
}

#[test]
fn with_nothing_queued_a_result_goes_out_at_once() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, Vec::new());
    p.on_worker_output(t0, 100, result(1));
    p.tick(t0, false);
    assert_eq!(outcomes(&sent(&mut p)), vec![(1, Ok("1".into()))]);
}

#[test]
fn a_shell_task_runs_in_its_own_process_and_its_output_is_its_result() {
    let t0 = Instant::now();
    let mut p = pool(1, t0);
    let sh = FunctionId(3);
    p.on_message(
        t0,
        tasks(
            vec![FunctionDef::new(
                sh,
                FunctionBody::Shell {
                    template: "echo {x}".into(),
                },
            )],
            vec![TaskSpec {
                args: Payload::json("[\"hi\"]"),
                ..spec(5, sh)
            }],
        ),
    );
    p.tick(t0, false);
    assert!(acts(&mut p).contains(&Act::SpawnShell { pid: 100, task: 5 }));
    p.on_exits(
        t0,
        vec![Exit {
            pid: 100,
            status: 0,
            peak: 0,
            output: Some(("hi\n".into(), String::new())),
        }],
    );
    p.tick(t0, true);
    let msgs = sent(&mut p);
    let out = outcomes(&msgs);
    assert_eq!(out.len(), 1, "{msgs:?}");
    let (id, Ok(json)) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(*id, 5);
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["returncode"], 0);
}

const MIB: u64 = 1 << 20;

/// One slot with `mem_per_worker` = 100 MiB; its worker (pid 100) runs task 1. `cgroups`: the
/// node holds each worker in a memory cgroup.
fn limited(t0: Instant, cgroups: bool) -> TestPool {
    let mut p = pool_with(
        PoolConfig {
            mem_limit: Some(100 * MIB),
            ..config(1)
        },
        t0,
    );
    p.io().cgroups = cgroups;
    p.on_message(t0, tasks(vec![python_def(F, None)], vec![spec(1, F)]));
    p.tick(t0, false);
    p.on_worker_output(t0, 100, ready(100));
    p.tick(t0, false);
    acts(&mut p);
    p
}

/// The one error sent, by kind, with its message.
fn error_of(msgs: &[ManagerToInterchange]) -> (ErrorKind, String) {
    let errors: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            ManagerToInterchange::Results(rs) => Some(rs),
            _ => None,
        })
        .flatten()
        .filter_map(|r| match &r.outcome {
            Outcome::Err(e) => Some((e.kind, e.message.clone())),
            Outcome::Ok(_) => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{msgs:?}");
    errors[0].clone()
}

#[test]
fn a_task_the_kernel_kills_at_its_cgroups_limit_fails_as_memory_exceeded_with_its_peak() {
    let t0 = Instant::now();
    let mut p = limited(t0, true);
    p.io().cgroup_peak = Some(100 * MIB);
    // The out-of-memory notice is read before the death, in the same round or earlier.
    p.on_oom_notice(100);
    p.on_exits(t0, exit(100, killed_by(libc::SIGKILL)));
    p.tick(t0, true);
    let (kind, message) = error_of(&sent(&mut p));
    assert_eq!(kind, ErrorKind::MemoryExceeded);
    assert!(
        message.contains("reached its limit of 100 MiB (the pool's mem_per_worker)"),
        "{message}"
    );
}

#[test]
fn a_sampled_task_over_its_limit_is_killed_at_the_next_sample_and_fails_once() {
    let t0 = Instant::now();
    let mut p = limited(t0, false);
    p.io().rss = vec![(100, 150 * MIB)];
    // Sampled every 100 ms: not before.
    p.tick(t0 + Duration::from_millis(50), false);
    assert!(acts(&mut p).is_empty());
    p.tick(t0 + Duration::from_millis(100), false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGKILL)]);
    // Its result, read before the kill landed, is not the outcome.
    p.on_worker_output(t0 + Duration::from_millis(101), 100, result(1));
    p.on_exits(
        t0 + Duration::from_millis(102),
        exit(100, killed_by(libc::SIGKILL)),
    );
    p.tick(t0 + Duration::from_millis(102), true);
    let (kind, message) = error_of(&sent(&mut p));
    assert_eq!(kind, ErrorKind::MemoryExceeded);
    assert!(
        message.contains("used 150 MiB of memory, over its limit of 100 MiB"),
        "{message}"
    );
}

#[test]
fn a_worker_the_nodes_oom_killer_took_fails_its_task_as_oom_killed_and_other_kills_do_not() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, Vec::new());
    // The node's count moved: this SIGKILL that no one here sent was the OOM killer's.
    p.io().oom = 1;
    p.on_exits(t0, exit(100, killed_by(libc::SIGKILL)));
    p.tick(t0, true);
    assert_eq!(error_of(&sent(&mut p)).0, ErrorKind::OomKilled);
    // The next worker dies by a SIGKILL while the count stays: lost, not OOM.
    p.on_message(t0, tasks(Vec::new(), vec![spec(2, F)]));
    p.tick(t0, false);
    p.on_worker_output(t0, 101, ready(101));
    p.tick(t0, false);
    acts(&mut p);
    p.on_exits(t0, exit(101, killed_by(libc::SIGKILL)));
    p.tick(t0, true);
    assert_eq!(error_of(&sent(&mut p)).0, ErrorKind::WorkerLost);
}

#[test]
fn an_idle_container_worker_retires_after_container_idle_even_if_it_repeats_ready() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(5);
    let mut p = pool_with(
        PoolConfig {
            container_idle: idle,
            ..config(1)
        },
        t0,
    );
    p.on_message(
        t0,
        tasks(vec![python_def(F, Some("alice"))], vec![spec(1, F)]),
    );
    p.tick(t0, false);
    p.on_worker_output(t0, 100, ready(100));
    p.tick(t0, false);
    p.on_worker_output(t0, 100, result(1));
    p.tick(t0, false);
    acts(&mut p);
    // The driver wakes for the retirement.
    assert_eq!(
        p.timeout(t0 + Duration::from_millis(4500)),
        Duration::from_millis(500)
    );
    // A worker saying `ready` again (a hostile task's thread, say) does not restart its
    // idle time.
    for s in 1..5 {
        let at = t0 + Duration::from_secs(s);
        p.on_worker_output(at, 100, ready(100));
        p.tick(at, false);
        assert!(acts(&mut p).is_empty());
    }
    p.tick(t0 + idle, false);
    assert!(acts(&mut p).contains(&Act::ExitFrame(100)));
    // It does not exit: SIGKILL after the grace, and again every grace until it is reaped.
    p.tick(t0 + idle + GRACE + Duration::from_millis(1), false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGKILL)]);
    p.tick(t0 + idle + GRACE * 2 + Duration::from_millis(1), false);
    assert_eq!(acts(&mut p), vec![Act::Signal(100, libc::SIGKILL)]);
}

#[test]
fn a_pipelined_tasks_walltime_runs_from_when_it_starts() {
    let t0 = Instant::now();
    let mut second = spec(2, F);
    second.walltime_ms = Some(100);
    let mut p = running_one(t0, None, vec![second]);
    // Task 1 ends 50 ms later: task 2 starts then.
    let t1 = t0 + Duration::from_millis(50);
    p.on_worker_output(t1, 100, result(1));
    p.tick(t1, false);
    acts(&mut p);
    killed_100ms_after(&mut p, t1, t0 + Duration::from_millis(100));
}

#[test]
fn a_worker_that_dies_with_a_task_in_its_pipe_frees_its_slot_and_the_task_runs_elsewhere() {
    let t0 = Instant::now();
    let mut p = running_one(t0, None, vec![spec(2, F)]);
    p.on_exits(t0, exit(100, killed_by(libc::SIGSEGV)));
    p.tick(t0, true);
    // The slot is free again: a new worker starts for task 2, which never ran.
    let a = acts(&mut p);
    assert!(a.contains(&Act::SpawnWorker { pid: 101 }), "{a:?}");
    // Task 1's outcome goes out with the batch (task 2 waits, so it is held 1 ms).
    p.tick(t0 + Duration::from_millis(1), false);
    assert_eq!(error_of(&sent(&mut p)).0, ErrorKind::WorkerLost);
    p.on_worker_output(t0, 101, ready(101));
    p.tick(t0, false);
    assert!(acts(&mut p).contains(&Act::Task {
        pid: 101,
        task: 2,
        def: true
    }));
}
