//! The manager's pool: the cost of one task's round through it (a worker's result read, the
//! next task written to that worker, the tick after it) against the number of workers. The
//! pool runs over an `Io` that does nothing, so this is the pool's own bookkeeping. Tasks carry
//! a walltime (never reached): the deadlines are kept, not scanned.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fnx_manager::pool::{Io, Pool, PoolConfig, ShellStart, Spawned, WorkerOutput, WorkerStart};
use fnx_manager::sandbox::Sandbox;
use fnx_manager::wire::FromWorker;
use fnx_protocol::*;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

const F: FunctionId = FunctionId(1);

/// Does nothing, but remembers which tasks each worker holds (to answer with their results)
/// and keeps a clock the benchmark moves.
struct NullIo {
    next_pid: u32,
    holds: HashMap<u32, VecDeque<TaskId>>,
    clock: Instant,
}

impl Io for NullIo {
    fn now(&mut self) -> Instant {
        self.clock
    }
    fn spawn_worker(&mut self, w: WorkerStart<'_>) -> std::io::Result<Spawned> {
        self.next_pid += 1;
        Ok(Spawned {
            pid: self.next_pid,
            marker: format!("m.w{}", w.serial),
            held: false,
        })
    }
    fn spawn_shell(&mut self, _: ShellStart<'_>) -> std::io::Result<Spawned> {
        Err(std::io::Error::other("no shell tasks here"))
    }
    fn send_task(
        &mut self,
        pid: u32,
        _: Option<&FunctionBody>,
        spec: &TaskSpec,
        _: Option<&Path>,
    ) -> std::io::Result<()> {
        self.holds.entry(pid).or_default().push_back(spec.id);
        Ok(())
    }
    fn send_exit(&mut self, _: u32) {}
    fn signal_group(&mut self, _: u32, _: i32) {}
    fn sweep(&mut self, _: &str) -> usize {
        0
    }
    fn send(&mut self, msg: &ManagerToInterchange) {
        std::hint::black_box(msg);
    }
    fn sandbox(&mut self, _: &TaskSpec) -> Result<Option<Sandbox>, TaskError> {
        Ok(None)
    }
    fn exists(&mut self, _: &Path) -> bool {
        true
    }
    fn oom_kills(&mut self) -> Option<u64> {
        Some(0)
    }
    fn rss_of_groups(&mut self, _: &[u32]) -> Vec<(u32, u64)> {
        Vec::new()
    }
    fn peak_rss(&mut self, _: u32) -> Option<u64> {
        None
    }
    fn reset_peak_rss(&mut self, _: u32) {}
    fn hold(&mut self, _: u32, _: Option<u64>) -> bool {
        false
    }
    fn cgroup_kill_peak(&mut self, _: u32, _: bool) -> Option<u64> {
        None
    }
}

fn config(slots: usize) -> PoolConfig {
    PoolConfig::detached(slots)
}

fn spec(id: u64) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        attempt: Attempt(1),
        function: F,
        args: Payload::json("[1]"),
        walltime_ms: Some(3_600_000),
        files: Vec::new(),
        memory_mb: None,
    }
}

fn result(id: TaskId) -> WorkerOutput {
    WorkerOutput {
        frames: vec![(
            FromWorker::Result {
                tid: id,
                outcome: Ok(Encoding::Json),
            },
            b"1".to_vec(),
        )],
        ..WorkerOutput::default()
    }
}

/// A pool of `workers` ready workers, each running a task, with as many queued.
fn busy_pool(workers: usize, t0: Instant) -> (Pool<NullIo>, u64) {
    let io = NullIo {
        next_pid: 0,
        holds: HashMap::new(),
        clock: t0,
    };
    let mut p = Pool::new(config(workers), io, t0);
    let def = FunctionDef::new(
        F,
        FunctionBody::PythonSource {
            source: "def f(x): return x".into(),
            name: "f".into(),
        },
    );
    let n = 2 * workers as u64;
    p.on_message(
        t0,
        InterchangeToManager::Tasks {
            functions: vec![def],
            tasks: (1..=n).map(spec).collect(),
        },
    );
    p.tick(t0, false);
    for pid in 1..=workers as u32 {
        let ready = WorkerOutput {
            frames: vec![(
                FromWorker::Ready {
                    pid,
                    python: "3.11".into(),
                    executable: None,
                },
                Vec::new(),
            )],
            ..WorkerOutput::default()
        };
        p.on_worker_output(t0, pid, ready);
    }
    p.tick(t0, false);
    (p, n)
}

fn task_round(c: &mut Criterion) {
    let mut g = c.benchmark_group("manager_task_round");
    g.throughput(Throughput::Elements(1));
    for workers in [2usize, 256, 1024] {
        g.bench_with_input(
            BenchmarkId::from_parameter(workers),
            &workers,
            |b, &workers| {
                let t0 = Instant::now();
                let (mut p, mut next_id) = busy_pool(workers, t0);
                let mut now = t0;
                let mut pid = 0u32;
                b.iter(|| {
                    // One task in, one result out, on the workers in turn. Each task seems to
                    // run 5 ms whatever the number of workers: too long to pipeline behind, so
                    // every size takes the same path (a result, the worker idle, the next task
                    // written to it).
                    now += Duration::from_micros(5_000 / workers as u64);
                    pid = pid % workers as u32 + 1;
                    next_id += 1;
                    p.on_message(
                        now,
                        InterchangeToManager::Tasks {
                            functions: Vec::new(),
                            tasks: vec![spec(next_id)],
                        },
                    );
                    p.io().clock = now;
                    let done = p.io().holds.get_mut(&pid).and_then(VecDeque::pop_front);
                    if let Some(id) = done {
                        p.on_worker_output(now, pid, result(id));
                    }
                    p.tick(now, false);
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, task_round);
criterion_main!(benches);
