//! A local pool: an in-process interchange plus manager processes on this host. LocalPool mode
//! (`fnx map`) runs one for a single run; the daemon runs one per `provider = "local"` pool and
//! restarts managers that end.

mod users;

pub use users::{user_dir, PerUser};

use fnx_interchange::driver::{self, DriverConfig};
use fnx_interchange::{Event, Handle, Notice};
use fnx_protocol::ManagerBootstrap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A local pool could not start.
#[derive(Debug, Error)]
pub enum LocalError {
    /// The interchange could not bind or start.
    #[error("cannot start the interchange: {0}")]
    Interchange(#[from] driver::DriverError),
    /// A file, directory, thread or process could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Managers did not come up.
    #[error("{0}")]
    Managers(String),
}

type Result<T> = std::result::Result<T, LocalError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
    let what = what.into();
    move |source| LocalError::Io { what, source }
}

/// Settings of a local pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// ZeroMQ endpoint the interchange binds (`tcp://127.0.0.1:0` for any free loopback port).
    pub bind: String,
    /// Send [`Event::Dispatched`] events (the daemon records task states).
    pub report_dispatch: bool,
    /// Largest task argument payload.
    pub max_payload_bytes: usize,
    /// The store that the inputs of tasks submitted as stored are read back from at dispatch
    /// (the daemon's; None: every task carries its inputs).
    pub inputs: Option<PathBuf>,
    /// The keys every manager link is encrypted and authenticated with (`None`: fresh keys
    /// made at start, kept in memory). There are no plain links: any account on the host can
    /// reach a loopback port.
    pub curve: Option<crate::keys::LinkKeys>,
    /// Manager processes.
    pub managers: u32,
    /// Worker slots per manager (None: the CPUs each may use).
    pub workers: Option<u32>,
    /// How each manager sizes, places and contains its workers.
    pub shape: WorkerShape,
    /// Prefetch per manager (None: as many as slots).
    pub prefetch: Option<u32>,
    /// Python interpreter.
    pub python: String,
    /// Run directory (logs).
    pub run_dir: PathBuf,
    /// Environment marker of every process of this run.
    pub run_id: String,
    /// Heartbeat period.
    pub heartbeat_period: Duration,
    /// Heartbeat threshold.
    pub heartbeat_threshold: Duration,
    /// Warm routing window (see `fnx_interchange::routing`).
    pub warm_window: u64,
    /// Largest result.
    pub max_result_bytes: u64,
    /// SIGTERM → SIGKILL grace for tasks.
    pub kill_grace: Duration,
    /// Managers complete tasks without running them.
    pub zero_work: bool,
    /// The whole environment of local managers (and so of their workers and tasks), replacing
    /// this process's (None: they inherit it, as `fnx map`'s do).
    pub env: Option<Vec<(String, String)>>,
    /// Home and working directory of local managers (and so of their workers and tasks),
    /// instead of the daemon's: container runtimes bind both into containers, and under the
    /// unit the daemon's are its data directory (None: inherited).
    pub home: Option<PathBuf>,
    /// Paths the processes local managers start must not reach (the daemon's data directory
    /// in `service` mode: see `fnx_sys::landlock`).
    pub protect: Vec<PathBuf>,
    /// Managers per user, started on demand as each user (`users.mode = "unix"`); `managers`
    /// and `launch` are then unused.
    pub per_user: Option<PerUser>,
    /// Start the managers through a parallel launcher (one per node of an allocation) instead
    /// of as `managers` local processes.
    pub launch: Option<Launch>,
}

/// Managers started by `srun`, `mpiexec` or `aprun` from inside an allocation (`fnx map
/// --launcher`): one launcher process starts a manager on every node.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The launcher and its options (provider and batch settings are unused).
    pub spec: fnx_launcher::BlockSpec,
    /// Where the mpiexec hostfile is written.
    pub files: fnx_launcher::BlockFiles,
    /// Managers expected to register (nodes).
    pub nodes: u32,
    /// Extra environment of the launcher process.
    pub env: Vec<(String, String)>,
}

/// How a pool's managers size, pin and contain their workers (the same for each of them).
#[derive(Clone, Debug, Default)]
pub struct WorkerShape {
    /// Cores each worker needs (limits the slots).
    pub cores_per_worker: Option<f64>,
    /// Memory each worker needs in MiB (limits the slots).
    pub mem_per_worker_mb: Option<u64>,
    /// How workers are pinned (`none`, `block`, `block-reverse`, `alternating`, `numa`,
    /// `list:...`; None: not pinned).
    pub cpu_affinity: Option<String>,
    /// Accelerators (GPU ids) shared out over each manager's workers.
    pub accelerators: Vec<String>,
    /// The container workers and shell tasks start in; without an image, only the runtime
    /// that functions with their own container image use.
    pub container: Option<fnx_protocol::Container>,
    /// Idle workers of a function's own container exit after this long (None: the manager's
    /// default, 300 s).
    pub container_idle: Option<Duration>,
}

impl WorkerShape {
    /// Put these settings into a manager's start-up settings.
    pub fn apply(&self, b: &mut ManagerBootstrap) {
        b.cores_per_worker = self.cores_per_worker;
        b.mem_per_worker_mb = self.mem_per_worker_mb;
        b.cpu_affinity = self.cpu_affinity.clone();
        b.accelerators = self.accelerators.clone();
        b.container = self.container.clone();
        b.container_idle_s = self.container_idle.map(|d| d.as_secs().max(1));
    }
}

impl PoolOptions {
    /// Defaults: one manager on loopback with a slot per CPU, `python3`, 5 s heartbeats.
    pub fn new(run_dir: PathBuf, run_id: String) -> PoolOptions {
        PoolOptions {
            bind: "tcp://127.0.0.1:0".into(),
            report_dispatch: false,
            inputs: None,
            max_payload_bytes: 10 << 20,
            curve: None,
            managers: 1,
            workers: None,
            shape: WorkerShape::default(),
            prefetch: None,
            python: "python3".into(),
            run_dir,
            run_id,
            heartbeat_period: Duration::from_secs(5),
            heartbeat_threshold: Duration::from_secs(30),
            warm_window: fnx_interchange::Config::default().warm_window,
            max_result_bytes: 10 << 20,
            kill_grace: Duration::from_secs(2),
            zero_work: false,
            env: None,
            home: None,
            protect: Vec::new(),
            per_user: None,
            launch: None,
        }
    }
}

/// A manager process that ended.
pub struct ManagerExit {
    /// Its uid.
    pub uid: String,
    /// How it ended.
    pub status: String,
    /// Its log file.
    pub log: PathBuf,
}

struct Child {
    uid: String,
    /// The managers this process runs (itself, or every manager a launcher started).
    managers: Vec<String>,
    pid: u32,
    log: PathBuf,
    running: bool,
    /// The user it runs as and serves (`unix` mode; None: the shared tenant).
    tenant: Option<String>,
    /// Asked to drain (it exits once it holds no task).
    draining: bool,
}

/// A running local pool.
pub struct LocalPool {
    /// The interchange (shared with whoever submits and cancels).
    pub handle: Arc<Handle>,
    /// Its events.
    pub events: Receiver<Event>,
    children: Vec<Child>,
    exits: Receiver<(String, std::io::Result<ExitStatus>)>,
    exit_tx: Sender<(String, std::io::Result<ExitStatus>)>,
    exe: PathBuf,
    opts: PoolOptions,
    stopped: bool,
    launched: u32,
    /// Managers per user (`unix` mode).
    users: Option<users::Users>,
}

impl LocalPool {
    /// Bind an interchange on loopback and start the manager processes.
    pub fn start(mut opts: PoolOptions) -> Result<LocalPool> {
        let keys = match opts.curve.take() {
            Some(k) => k,
            // Managers this process starts on loopback: a password (authenticated, not
            // encrypted: loopback cannot be read by other accounts, and these managers die with
            // this process). Anything else: CurveZMQ.
            None if opts.launch.is_none() && is_loopback(&opts.bind) => {
                crate::keys::LinkKeys::ephemeral_plain()
            }
            None => crate::keys::LinkKeys::ephemeral()
                .map_err(|e| LocalError::Managers(format!("cannot make link keys: {e}")))?,
        };
        opts.curve = Some(keys);
        let mut cfg = DriverConfig::new(opts.bind.clone());
        cfg.state.heartbeat_period = opts.heartbeat_period;
        cfg.state.heartbeat_threshold = opts.heartbeat_threshold;
        cfg.state.max_payload_bytes = opts.max_payload_bytes;
        cfg.state.warm_window = opts.warm_window;
        cfg.report_dispatch = opts.report_dispatch;
        cfg.curve = opts.curve.as_ref().map(|k| k.server.clone());
        let loader = opts.inputs.clone().map(|path| {
            Box::new(crate::store::inputs::InputLoader::new(path)) as Box<dyn driver::Loader>
        });
        let (handle, events) = driver::start_with_loader(cfg, loader)?;
        tracing::info!("interchange listening on {}", handle.endpoint());
        let exe = std::env::current_exe().map_err(io("cannot find the fnx executable"))?;
        let (exit_tx, exits) = channel();
        let mut children = Vec::new();
        if opts.per_user.is_some() {
            // Managers start when their user has work (`serve_users`).
        } else if let Some(launch) = &opts.launch {
            children.push(spawn_launcher(
                &exe,
                &handle,
                &opts,
                launch,
                exit_tx.clone(),
            )?);
        } else {
            let shares = manager_shares(&opts);
            for i in 0..opts.managers {
                let uid = format!("manager-{i}");
                let share = shares.get(i as usize).cloned().unwrap_or_default();
                let child = spawn_manager(&exe, &handle, &opts, &uid, share, exit_tx.clone())?;
                children.push(child);
            }
        }
        let mut pool = LocalPool {
            handle: Arc::new(handle),
            events,
            children,
            exits,
            exit_tx,
            exe,
            launched: opts.managers,
            users: opts.per_user.clone().map(users::Users::new),
            opts,
            stopped: false,
        };
        pool.wait_registered(Duration::from_secs(60))?;
        Ok(pool)
    }

    /// Wait until every manager has registered, so the first tasks are spread over all of them
    /// (a manager that registered first would otherwise take a short queue into its prefetch).
    fn wait_registered(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut registered = 0;
        let expected: usize = self.children.iter().map(|c| c.managers.len()).sum();
        while registered < expected {
            match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Notice(Notice::Registered { .. })) => registered += 1,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => {
                    return Err(LocalError::Managers(format!(
                        "the interchange stopped: {e}"
                    )))
                }
            }
            if let Some(exit) = self.poll_exits().into_iter().next() {
                return Err(LocalError::Managers(format!(
                    "manager {} ended while starting ({}); its log: {}",
                    exit.uid,
                    exit.status,
                    exit.log.display()
                )));
            }
            if Instant::now() > deadline {
                let logs = self
                    .children
                    .iter()
                    .map(|c| c.log.display().to_string())
                    .collect::<Vec<_>>();
                return Err(LocalError::Managers(format!(
                    "only {registered} of {expected} managers registered within {}s; logs: {}",
                    timeout.as_secs(),
                    logs.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Whether managers run per user (`users.mode = "unix"`).
    pub fn per_user(&self) -> bool {
        self.users.is_some()
    }

    /// Managers still running.
    pub fn alive(&self) -> usize {
        self.children.iter().filter(|c| c.running).count()
    }

    /// Managers that ended since the last call; the interchange is told at once, so their
    /// tasks are retried elsewhere without waiting for missed heartbeats.
    pub fn poll_exits(&mut self) -> Vec<ManagerExit> {
        let mut out = Vec::new();
        while let Ok((uid, status)) = self.exits.try_recv() {
            let status = match status {
                Ok(s) => describe(s),
                Err(e) => format!("could not be waited for: {e}"),
            };
            if let Some(c) = self.children.iter_mut().find(|c| c.uid == uid) {
                c.running = false;
                // Its workers die with it (death signal); anything they started is swept.
                fnx_sys::sweep::kill_marked(
                    "FNX_MANAGER",
                    &format!("{}.{}", self.opts.run_id, uid),
                    20,
                );
                for m in &c.managers {
                    self.handle
                        .manager_gone(m.clone(), format!("its process ended ({status})"));
                }
                out.push(ManagerExit {
                    uid,
                    status,
                    log: c.log.clone(),
                });
            }
        }
        out
    }

    /// Start a new manager in place of one that ended (the daemon keeps its pools at size).
    /// Returns the new manager's uid.
    pub fn replace_manager(&mut self) -> Result<String> {
        let uid = format!("manager-{}", self.launched);
        let shares = manager_shares(&self.opts);
        let share = if shares.is_empty() {
            Vec::new()
        } else {
            shares[self.launched as usize % shares.len()].clone()
        };
        self.launched += 1;
        let child = spawn_manager(
            &self.exe,
            &self.handle,
            &self.opts,
            &uid,
            share,
            self.exit_tx.clone(),
        )?;
        self.children.retain(|c| c.running);
        self.children.push(child);
        Ok(uid)
    }

    /// The run directory (manager and worker logs).
    pub fn run_dir(&self) -> &Path {
        &self.opts.run_dir
    }

    /// Stop everything: tell managers to exit, then terminate, kill and sweep what is left.
    pub fn stop(mut self, reason: &str) {
        self.stop_all(reason);
    }

    /// [`LocalPool::stop`] through a reference; also run when the pool is dropped (an early
    /// return on an error), so no manager, worker or task outlives the run. Idempotent.
    pub fn stop_all(&mut self, reason: &str) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.handle.stop(reason);
        let exits = &self.exits;
        let mut running: Vec<&Child> = self.children.iter().filter(|c| c.running).collect();
        let wait = |running: &mut Vec<&Child>, until: Instant| {
            while !running.is_empty() && Instant::now() < until {
                if let Ok((uid, _)) = exits.recv_timeout(Duration::from_millis(20)) {
                    running.retain(|c| c.uid != uid);
                }
            }
        };
        wait(
            &mut running,
            Instant::now() + self.opts.kill_grace + Duration::from_secs(1),
        );
        for c in &running {
            let _ = fnx_sys::process::kill_group(c.pid, libc::SIGTERM);
        }
        wait(&mut running, Instant::now() + Duration::from_secs(2));
        for c in &running {
            let _ = fnx_sys::process::kill_group(c.pid, libc::SIGKILL);
        }
        wait(&mut running, Instant::now() + Duration::from_secs(2));
        let swept = fnx_sys::sweep::kill_marked("FNX_RUN_ID", &self.opts.run_id, 20);
        if swept > 0 {
            tracing::warn!("killed {swept} leftover processes of this run");
        }
        // The managers' private home (made for this pool by the daemon) goes with them.
        if let Some(home) = &self.opts.home {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        self.stop_all("fnx is exiting");
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    fnx_sys::process::describe_wait_status(s.into_raw())
}

fn bootstrap(handle: &Handle, opts: &PoolOptions, uid: &str) -> ManagerBootstrap {
    let mut b = ManagerBootstrap::new(
        handle.endpoint().to_string(),
        uid.to_string(),
        opts.run_dir.clone(),
        opts.run_id.clone(),
    );
    b.slots = opts.workers;
    b.prefetch = opts.prefetch;
    b.python = opts.python.clone();
    b.heartbeat_period_ms = opts.heartbeat_period.as_millis() as u64;
    b.heartbeat_threshold_ms = opts.heartbeat_threshold.as_millis() as u64;
    b.max_result_bytes = opts.max_result_bytes;
    b.kill_grace_ms = opts.kill_grace.as_millis() as u64;
    b.zero_work = opts.zero_work;
    // A local manager reads its keys from its standard input ("-"); see `spawn`.
    b.curve_keys = Some(PathBuf::from("-"));
    b.protect = opts.protect.clone();
    opts.shape.apply(&mut b);
    b
}

/// Whether a `tcp://HOST:PORT` endpoint is on loopback.
pub fn is_loopback(endpoint: &str) -> bool {
    let host = endpoint
        .strip_prefix("tcp://")
        .and_then(|r| r.rsplit_once(':'))
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'));
    host.and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

/// The key text a local manager reads on its standard input.
fn key_text(opts: &PoolOptions) -> Option<String> {
    let k = opts.curve.as_ref()?;
    Some(
        k.manager
            .render("fnx manager keys (from the pool that started this manager)"),
    )
}

/// With pinning and several managers on this host, each manager gets its own block of cores
/// (its affinity, within which it plans its workers), so managers never pin workers to the
/// same CPUs. Empty when there is nothing to split.
fn manager_shares(opts: &PoolOptions) -> Vec<Vec<u32>> {
    use fnx_sys::placement::{allowed_cpus, plan, CpuAffinity, Topology};
    let pinned = opts
        .shape
        .cpu_affinity
        .as_deref()
        .is_some_and(|a| a != "none");
    if !pinned || opts.managers < 2 {
        return Vec::new();
    }
    let topo = Topology::discover();
    match plan(
        &topo,
        &allowed_cpus(),
        &CpuAffinity::Block,
        opts.managers as usize,
        &[],
    ) {
        Ok(p) => p.into_iter().map(|s| s.cpus).collect(),
        Err(e) => {
            tracing::warn!("cannot give each local manager its own CPUs: {e}");
            Vec::new()
        }
    }
}

fn spawn_manager(
    exe: &Path,
    handle: &Handle,
    opts: &PoolOptions,
    uid: &str,
    cpus: Vec<u32>,
    exits: Sender<(String, std::io::Result<ExitStatus>)>,
) -> Result<Child> {
    let b = bootstrap(handle, opts, uid);
    let dir = b.dir();
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let mut cmd = Command::new(exe);
    cmd.args(fnx_launcher::manager_args(&b));
    if let Some(env) = &opts.env {
        cmd.env_clear().envs(env.iter().cloned());
    }
    if let Some(home) = &opts.home {
        cmd.env("HOME", home).current_dir(home);
    }
    spawn(
        Spawn {
            cmd,
            uid: uid.to_string(),
            managers: vec![uid.to_string()],
            log: dir.join("manager.log"),
            cpus,
            stdin: key_text(opts),
            as_user: None,
        },
        opts,
        exits,
    )
}

/// One launcher process (`srun`/`mpiexec`/`aprun` through bash) that starts a manager named
/// `manager-<rank>` on every node.
fn spawn_launcher(
    exe: &Path,
    handle: &Handle,
    opts: &PoolOptions,
    launch: &Launch,
    exits: Sender<(String, std::io::Result<ExitStatus>)>,
) -> Result<Child> {
    let mut b = bootstrap(handle, opts, "manager-{rank}");
    // Managers on other nodes read the key file (on a filesystem the nodes share).
    b.curve_keys = opts.curve.as_ref().and_then(|k| k.file.clone());
    if b.curve_keys.is_none() {
        return Err(LocalError::Managers(
            "managers started through a launcher need a key file (no keys were written)".into(),
        ));
    }
    let mut argv = vec![exe.display().to_string()];
    argv.extend(fnx_launcher::manager_args(&b));
    let mut text = String::new();
    if launch.spec.launcher == fnx_launcher::Launcher::Mpiexec {
        std::fs::create_dir_all(&launch.files.dir)
            .map_err(io(format!("cannot create {}", launch.files.dir.display())))?;
        text.push_str(&fnx_launcher::script::hostfile_prelude(
            &launch.spec,
            &launch.files,
        ));
    }
    let line = fnx_launcher::script::launch_line(&launch.spec, &launch.files, &argv);
    text.push_str(&line);
    tracing::info!("starting {} managers: {line}", launch.nodes);
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(text).envs(launch.env.iter().cloned());
    let managers = (0..launch.nodes).map(|r| format!("manager-{r}")).collect();
    let log = opts.run_dir.join("launcher.log");
    let sp = Spawn {
        cmd,
        uid: "launcher".into(),
        managers,
        log,
        cpus: Vec::new(),
        stdin: None,
        as_user: None,
    };
    spawn(sp, opts, exits)
}

/// How a child starts: its command, name, log and CPUs; `stdin`, when given, is written to its
/// standard input (a local manager's keys), which is then closed; `as_user`: it becomes that
/// user before exec and opens its own log (which only that user may write).
struct Spawn {
    cmd: Command,
    uid: String,
    managers: Vec<String>,
    log: PathBuf,
    cpus: Vec<u32>,
    stdin: Option<String>,
    as_user: Option<users::AsUser>,
}

/// Start one child in its own process group.
fn spawn(
    sp: Spawn,
    opts: &PoolOptions,
    exits: Sender<(String, std::io::Result<ExitStatus>)>,
) -> Result<Child> {
    let Spawn {
        mut cmd,
        uid,
        managers,
        log,
        cpus,
        stdin,
        as_user,
    } = sp;
    let uid = uid.as_str();
    let stderr = match &as_user {
        Some(_) => Stdio::null(), // replaced in the child, once it is the user
        None => Stdio::from(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io(format!("cannot open {}", log.display())))?,
        ),
    };
    let tenant = as_user.as_ref().map(|a| a.user.clone());
    cmd.env("FNX_RUN_ID", &opts.run_id)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(stderr);
    // Own process group (a terminal's Ctrl-C reaches only `fnx map`, which stops everything in
    // order), and SIGTERM if `fnx map` dies. The death signal is set after becoming the user:
    // a change of credentials clears it.
    // SAFETY: become, child_setup and apply_affinity only make async-signal-safe calls
    // (`cpus` and everything `as_user` holds were allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(a) = &as_user {
                a.become_it()?;
            }
            fnx_sys::process::child_setup(libc::SIGTERM)?;
            fnx_sys::placement::apply_affinity(&cpus)
        });
    }
    let what = match &tenant {
        Some(user) => format!(
            "cannot start {:?} as user {user} (becoming the user, creating its directory {} or \
             log, or running the program as the user failed)",
            cmd.get_program(),
            log.parent().unwrap_or(&log).display()
        ),
        None => format!("cannot start {:?}", cmd.get_program()),
    };
    let mut child = cmd.spawn().map_err(io(what))?;
    let pid = child.id();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        // A few hundred bytes into an empty pipe: never blocks. A manager that died at once
        // makes this fail; its exit is reported like any other.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            tracing::warn!("cannot hand manager {uid} its keys: {e}");
        }
    }
    let name = uid.to_string();
    std::thread::Builder::new()
        .name(format!("wait-{uid}"))
        .spawn(move || {
            let status = child.wait();
            let _ = exits.send((name, status));
        })
        .map_err(io("cannot start a thread"))?;
    Ok(Child {
        uid: uid.to_string(),
        managers,
        pid,
        log,
        running: true,
        tenant,
        draining: false,
    })
}
