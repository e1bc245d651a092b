//! `fnx bench`: measure fnx's own overhead, apart from any work.

use crate::{EXIT_OK, EXIT_USAGE};
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use fnx_daemon::local::{LocalPool, PoolOptions};
use fnx_interchange::driver::{self, DriverConfig};
use fnx_interchange::{Event, Handle, NewTask, Notice};
use fnx_protocol::{
    decode, encode, FunctionBody, FunctionDef, FunctionId, InterchangeToManager,
    ManagerToInterchange, Outcome, Payload, Register, TaskId, TaskResult, DEFAULT_MAX_FRAME_BYTES,
};
use hdrhistogram::Histogram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Tasks/s and latency through a real interchange and ZeroMQ sockets with zero-work
    /// managers (tasks complete without running); prints JSON.
    Dispatch(DispatchArgs),
    /// Bytes/s end to end through real managers and Python workers: each task takes and returns
    /// a bytes object (pickle encoding); prints JSON.
    Transfer(TransferArgs),
    /// Tasks/s and round-trip latency of a running `fnx daemon` through its HTTP API (no-op
    /// Python tasks; submits in batches while a second connection streams results); prints JSON.
    Api(crate::bench_api::ApiArgs),
    /// Simulated zero-work managers for `fnx bench dispatch`, in a process of their own; they
    /// stop when standard input closes.
    #[command(hide = true)]
    SimManagers(SimArgs),
}

/// `fnx bench sim-managers` (started by `fnx bench dispatch`).
#[derive(Args, Debug)]
pub struct SimArgs {
    /// The interchange's endpoint
    #[arg(long)]
    pub endpoint: String,
    /// Number of the first manager (their ids are `sim-N`)
    #[arg(long)]
    pub first: u32,
    /// Managers
    #[arg(long)]
    pub managers: u32,
    /// Worker slots per manager
    #[arg(long)]
    pub slots: u32,
    /// Tasks queued per manager beyond its slots
    #[arg(long)]
    pub prefetch: u32,
}

/// Simulated managers per process: each holds a TCP connection and libzmq's own descriptors
/// (about three), so a process stays well inside a hard limit of 20,000 open files.
const SIMULATED_PER_PROCESS: u32 = 2_000;

/// `fnx bench transfer`.
#[derive(Args, Debug)]
pub struct TransferArgs {
    /// Tasks
    #[arg(long, default_value_t = 1000)]
    pub tasks: u64,
    /// Bytes each task takes and returns
    #[arg(long, default_value_t = 1 << 20)]
    pub bytes: usize,
    /// Python workers
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Python interpreter
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// How zero-work managers are run.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Many managers simulated in one process (one DEALER socket each), for scales beyond what
    /// this machine can hold as processes.
    Simulated,
    /// Real `fnx manager --zero-work` processes.
    Processes,
}

/// `fnx bench dispatch`.
#[derive(Args, Debug)]
pub struct DispatchArgs {
    /// Managers
    #[arg(long, default_value_t = 128)]
    pub managers: u32,
    /// Worker slots per manager
    #[arg(long, default_value_t = 64)]
    pub slots: u32,
    /// Tasks
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: u64,
    /// Simulated managers in this process, or real manager processes
    #[arg(long, value_enum, default_value = "simulated")]
    pub mode: Mode,
    /// Argument bytes per task
    #[arg(long, default_value_t = 8)]
    pub payload_bytes: usize,
    /// Tasks queued per manager beyond its slots [default: slots]
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Tasks used to measure interchange memory per queued task (0: skip)
    #[arg(long, default_value_t = 200_000)]
    pub memory_tasks: u64,
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> u8 {
    crate::logging::to_stderr();
    let result = match cmd {
        BenchCommand::Dispatch(args) => dispatch(&args),
        BenchCommand::Transfer(args) => transfer(&args),
        BenchCommand::Api(args) => crate::bench_api::run(&args),
        BenchCommand::SimManagers(args) => return sim_process(&args),
    };
    match result {
        Ok(json) => {
            println!("{}", serde_json::to_string_pretty(&json).expect("json"));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fnx bench: {e:#}");
            EXIT_USAGE
        }
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Interchange memory per queued task beyond its payload, measured on the state machine.
fn queue_memory(tasks: u64, payload_bytes: usize) -> f64 {
    struct Null;
    impl fnx_interchange::Comm for Null {
        fn send(&mut self, _: &fnx_interchange::Peer, _: &InterchangeToManager) {}
        fn finished(&mut self, _: fnx_interchange::Finished) {}
        fn notice(&mut self, _: Notice) {}
    }
    let mut ic = fnx_interchange::Interchange::new(fnx_interchange::Config::default());
    ic.add_function(FunctionDef::new(
        FunctionId(1),
        FunctionBody::PythonRef {
            module: "m".into(),
            qualname: "f".into(),
        },
    ));
    let before = rss_bytes();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..tasks {
        batch.push(new_task(i, payload_bytes));
        if batch.len() == 10_000 {
            ic.submit(std::mem::take(&mut batch), &mut Null);
        }
    }
    ic.submit(batch, &mut Null);
    let after = rss_bytes();
    assert_eq!(ic.counts().queued as u64, tasks);
    (after.saturating_sub(before)) as f64 / tasks as f64 - payload_bytes as f64
}

fn new_task(i: u64, payload_bytes: usize) -> NewTask {
    NewTask {
        id: TaskId(i),
        function: FunctionId(1),
        args: Payload::json(vec![b'0'; payload_bytes]),
        priority: 0,
        walltime_ms: None,
        retries: 0,
        attempt: fnx_protocol::Attempt(0),
        files: Vec::new(),
        stored: None,
        memory_mb: None,
    }
}

fn dispatch(args: &DispatchArgs) -> Result<serde_json::Value> {
    if args.managers == 0 || args.slots == 0 || args.tasks == 0 {
        anyhow::bail!("--managers, --slots and --tasks must be at least 1");
    }
    let memory =
        (args.memory_tasks > 0).then(|| queue_memory(args.memory_tasks, args.payload_bytes));
    let threshold = Duration::from_secs(600);
    let (own_handle, own_events, sim, pool) = match args.mode {
        Mode::Simulated => {
            let mut cfg = DriverConfig::new("tcp://127.0.0.1:0");
            cfg.state.heartbeat_threshold = threshold;
            // One descriptor per manager's connection, on the interchange's side.
            let fds = fnx_sys::node::raise_fd_limit().unwrap_or(1024);
            tracing::info!("open-file limit: {fds}");
            let (handle, events) = driver::start(cfg)?;
            let sim = Sims::start(
                handle.endpoint(),
                args.managers,
                args.slots,
                args.prefetch.unwrap_or(args.slots),
            )?;
            (Some(handle), Some(events), Some(sim), None)
        }
        Mode::Processes => {
            let run_dir = std::env::temp_dir().join(format!("fnx-bench-{}", std::process::id()));
            let pool = LocalPool::start(PoolOptions {
                managers: args.managers,
                workers: Some(args.slots),
                prefetch: args.prefetch,
                python: "python3".into(),
                run_dir,
                run_id: format!("bench-{}", std::process::id()),
                heartbeat_period: Duration::from_secs(5),
                heartbeat_threshold: threshold,
                max_result_bytes: 1 << 20,
                kill_grace: Duration::from_secs(1),
                zero_work: true,
                ..PoolOptions::new(PathBuf::new(), String::new())
            })?;
            (None, None, None, Some(pool))
        }
    };
    let (handle, events): (&Handle, &Receiver<Event>) = match &pool {
        Some(p) => (&p.handle, &p.events),
        None => (
            own_handle.as_ref().expect("set"),
            own_events.as_ref().expect("set"),
        ),
    };
    handle.add_function(FunctionDef::new(
        FunctionId(1),
        FunctionBody::PythonRef {
            module: "m".into(),
            qualname: "f".into(),
        },
    ));
    // Wait for every manager to register.
    // An embedded pool has waited for its managers already.
    let mut registered = if pool.is_some() { args.managers } else { 0 };
    let deadline = Instant::now() + Duration::from_secs(120);
    while registered < args.managers {
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Notice(Notice::Registered { .. })) => registered += 1,
            Ok(_) => {}
            Err(_) if Instant::now() > deadline => anyhow::bail!(
                "only {registered} of {} managers registered within 120 s",
                args.managers
            ),
            Err(_) => {}
        }
    }
    let capacity =
        u64::from(args.managers) * u64::from(args.slots + args.prefetch.unwrap_or(args.slots));
    let window = (capacity * 2).max(10_000);
    let mut submitted_at: Vec<Option<Instant>> = vec![None; args.tasks as usize];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram")?;
    let (mut next, mut done, mut failed) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    while done < args.tasks {
        if next < args.tasks && next - done < window {
            let end = (next + 10_000).min(args.tasks).min(done + window);
            let now = Instant::now();
            let batch: Vec<NewTask> = (next..end)
                .map(|i| new_task(i, args.payload_bytes))
                .collect();
            for slot in &mut submitted_at[next as usize..end as usize] {
                *slot = Some(now);
            }
            handle.submit(batch);
            next = end;
        }
        let timeout = if next < args.tasks && next - done < window {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        match events.recv_timeout(timeout) {
            Ok(Event::Finished(batch)) => {
                let now = Instant::now();
                for f in batch {
                    done += 1;
                    if !matches!(f.outcome, Outcome::Ok(_)) {
                        failed += 1;
                    }
                    if let Some(t) = submitted_at.get_mut(f.id.0 as usize).and_then(Option::take) {
                        let _ = hist.record(now.duration_since(t).as_micros().max(1) as u64);
                    }
                }
            }
            Ok(Event::Notice(Notice::Lost { uid, reason, .. })) => {
                anyhow::bail!("manager {uid} was lost: {reason}")
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => anyhow::bail!("interchange stopped: {e}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The interchange goes first (it tells every manager to exit), then the simulated managers.
    drop(own_handle);
    if let Some(sim) = sim {
        sim.stop();
    }
    if let Some(pool) = pool {
        pool.stop("benchmark finished");
    }
    Ok(serde_json::json!({
        "benchmark": "dispatch",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "managers": args.managers,
        "slots_per_manager": args.slots,
        "workers": u64::from(args.managers) * u64::from(args.slots),
        "tasks": args.tasks,
        "failed": failed,
        "payload_bytes": args.payload_bytes,
        "seconds": elapsed,
        "tasks_per_second": args.tasks as f64 / elapsed,
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99),
            "max": hist.max(),
        },
        "queued_task_overhead_bytes": memory,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    }))
}

/// `((data,), {})` as a protocol-5 pickle: the arguments of `echo(data)`.
fn pickled_bytes_arg(len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len + 16);
    p.extend_from_slice(&[0x80, 0x05, b'B']);
    p.extend_from_slice(&(len as u32).to_le_bytes());
    p.resize(p.len() + len, b'x');
    p.extend_from_slice(&[0x85, b'}', 0x86, b'.']);
    p
}

fn transfer(args: &TransferArgs) -> Result<serde_json::Value> {
    if args.bytes > u32::MAX as usize - 64 || args.workers == 0 {
        anyhow::bail!("--bytes must be below 4 GiB and --workers at least 1");
    }
    let run_dir = std::env::temp_dir().join(format!("fnx-bench-transfer-{}", std::process::id()));
    let pool = LocalPool::start(PoolOptions {
        managers: 1,
        workers: Some(args.workers),
        prefetch: None,
        python: args.python.clone(),
        run_dir: run_dir.clone(),
        run_id: format!("bench-{}", std::process::id()),
        heartbeat_period: Duration::from_secs(5),
        heartbeat_threshold: Duration::from_secs(600),
        max_result_bytes: args.bytes as u64 + (1 << 20),
        kill_grace: Duration::from_secs(1),
        zero_work: false,
        ..PoolOptions::new(PathBuf::new(), String::new())
    })?;
    let echo = FunctionBody::PythonSource {
        source: "def echo(data):\n    return data\n".into(),
        name: "echo".into(),
    };
    pool.handle
        .add_function(FunctionDef::new(FunctionId(1), echo));
    let arg = pickled_bytes_arg(args.bytes);
    // Keep a bounded window of tasks in flight, as a streaming client would; building each
    // task's argument (a copy of `arg`) is part of the measured time.
    let window = u64::from(args.workers) * 8;
    let (mut next, mut done, mut returned) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    while done < args.tasks {
        if next < args.tasks && next - done < window {
            let end = (done + window).min(args.tasks);
            let batch: Vec<NewTask> = (next..end)
                .map(|i| NewTask {
                    id: TaskId(i),
                    function: FunctionId(1),
                    args: Payload {
                        encoding: fnx_protocol::Encoding::Pickle,
                        data: arg.clone(),
                    },
                    priority: 0,
                    walltime_ms: None,
                    retries: 0,
                    attempt: fnx_protocol::Attempt(0),
                    files: Vec::new(),
                    stored: None,
                    memory_mb: None,
                })
                .collect();
            pool.handle.submit(batch);
            next = end;
        }
        match pool.events.recv_timeout(Duration::from_secs(120)) {
            Ok(Event::Finished(batch)) => {
                for f in batch {
                    done += 1;
                    match f.outcome {
                        Outcome::Ok(p) if p.data.len() >= args.bytes => {
                            returned += p.data.len() as u64
                        }
                        other => anyhow::bail!("task {} did not echo its bytes: {other:?}", f.id.0),
                    }
                }
            }
            Ok(_) => {}
            Err(e) => anyhow::bail!("no result for 120 s ({e}); logs in {}", run_dir.display()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    pool.stop("benchmark finished");
    let _ = std::fs::remove_dir_all(&run_dir);
    let mb = (args.tasks as f64 * args.bytes as f64) / 1e6;
    Ok(serde_json::json!({
        "benchmark": "transfer",
        "tasks": args.tasks,
        "bytes_per_task": args.bytes,
        "workers": args.workers,
        "seconds": elapsed,
        "mb_per_second": mb / elapsed,
        "returned_bytes": returned,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    }))
}

/// A zero-work manager's answer: every task batch completes at once; a reclaim gets nothing
/// back (nothing is ever queued).
fn sim_reply(frame: &[u8]) -> Option<Vec<u8>> {
    let reply = match decode(frame, DEFAULT_MAX_FRAME_BYTES).ok()? {
        InterchangeToManager::Tasks { tasks, .. } => ManagerToInterchange::Results(
            tasks
                .into_iter()
                .map(|t| TaskResult {
                    id: t.id,
                    attempt: t.attempt,
                    outcome: Outcome::Ok(t.args),
                })
                .collect(),
        ),
        InterchangeToManager::Reclaim { .. } => ManagerToInterchange::Returned(Vec::new()),
        _ => return None,
    };
    encode(&reply, DEFAULT_MAX_FRAME_BYTES).ok()
}

/// The simulated managers of a run: in this process up to [`SIMULATED_PER_PROCESS`], else
/// spread over child processes (`fnx bench sim-managers`) of that many each.
enum Sims {
    Here(SimManagers),
    Children(Vec<std::process::Child>),
}

impl Sims {
    fn start(endpoint: &str, managers: u32, slots: u32, prefetch: u32) -> Result<Sims> {
        if managers <= SIMULATED_PER_PROCESS {
            return Ok(Sims::Here(SimManagers::start(
                endpoint, 0, managers, slots, prefetch,
            )?));
        }
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut children = Vec::new();
        let mut first = 0;
        while first < managers {
            let n = SIMULATED_PER_PROCESS.min(managers - first);
            let child = std::process::Command::new(&exe)
                .args(["bench", "sim-managers", "--endpoint", endpoint])
                .args(["--first", &first.to_string(), "--managers", &n.to_string()])
                .args([
                    "--slots",
                    &slots.to_string(),
                    "--prefetch",
                    &prefetch.to_string(),
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting simulated managers")?;
            children.push(child);
            first += n;
        }
        tracing::info!(
            "{managers} simulated managers in {} processes",
            children.len()
        );
        Ok(Sims::Children(children))
    }

    fn stop(self) {
        match self {
            Sims::Here(s) => s.stop(),
            Sims::Children(children) => {
                for mut c in children {
                    // Closing its standard input stops it.
                    drop(c.stdin.take());
                    let _ = c.wait();
                }
            }
        }
    }
}

/// `fnx bench sim-managers`: run the given managers until standard input closes.
fn sim_process(args: &SimArgs) -> u8 {
    if let Err(e) = fnx_sys::node::raise_fd_limit() {
        eprintln!("fnx bench sim-managers: cannot raise the open-file limit: {e}");
    }
    let sims = match SimManagers::start(
        &args.endpoint,
        args.first,
        args.managers,
        args.slots,
        args.prefetch,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fnx bench sim-managers: {e:#}");
            return EXIT_USAGE;
        }
    };
    // Nothing is written to it: this returns when the parent closes it (or dies).
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    sims.stop();
    EXIT_OK
}

/// Many zero-work managers in one thread: one DEALER socket each, answering every task batch
/// with one result batch.
struct SimManagers {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl SimManagers {
    /// Managers `sim-FIRST` to `sim-(FIRST + managers - 1)`.
    fn start(
        endpoint: &str,
        first: u32,
        managers: u32,
        slots: u32,
        prefetch: u32,
    ) -> Result<SimManagers> {
        let mut sockets = Vec::with_capacity(managers as usize);
        // libzmq allows 1023 sockets per context by default: one context per 1000 managers.
        let mut contexts = Vec::new();
        for i in 0..managers {
            if i % 1000 == 0 {
                contexts.push(zmq::Context::new());
            }
            let s = contexts.last().expect("pushed above").socket(zmq::DEALER)?;
            s.set_sndhwm(0)?;
            s.set_rcvhwm(0)?;
            s.set_linger(0)?;
            s.connect(endpoint)
                .with_context(|| format!("connect of simulated manager {i}"))?;
            let reg = Register {
                uid: format!("sim-{}", first + i),
                host: "simulated".into(),
                pid: std::process::id(),
                cores: slots,
                slots,
                prefetch,
                block_id: None,
                zero_work: true,
                fnx_version: env!("CARGO_PKG_VERSION").into(),
            };
            s.send(
                encode(
                    &ManagerToInterchange::Register(reg),
                    DEFAULT_MAX_FRAME_BYTES,
                )?,
                0,
            )?;
            sockets.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sim-managers".into())
            .spawn(move || {
                let _contexts = contexts;
                while !flag.load(Ordering::Relaxed) {
                    let mut items: Vec<zmq::PollItem> = sockets
                        .iter()
                        .map(|s| s.as_poll_item(zmq::POLLIN))
                        .collect();
                    if zmq::poll(&mut items, 50).is_err() {
                        continue;
                    }
                    let ready: Vec<usize> = items
                        .iter()
                        .enumerate()
                        .filter(|(_, i)| i.is_readable())
                        .map(|(n, _)| n)
                        .collect();
                    drop(items);
                    for n in ready {
                        while let Ok(frame) = sockets[n].recv_bytes(zmq::DONTWAIT) {
                            if let Some(reply) = sim_reply(&frame) {
                                let _ = sockets[n].send(reply, 0);
                            }
                        }
                    }
                }
            })?;
        Ok(SimManagers { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
