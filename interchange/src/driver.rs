//! The thread that connects the state machine to a ZeroMQ ROUTER socket.
//!
//! One ROUTER socket serves every manager (one file descriptor per manager connection, no
//! matter how many workers it has). `ROUTER_MANDATORY` turns a send to a vanished peer into an
//! error instead of a silent drop, high-water marks are unlimited (back-pressure comes from
//! capacity-based dispatch, not from dropped messages), and `MAXMSGSIZE` caps what a peer can
//! make us buffer. The host talks to the thread through [`Handle`] (commands, woken through an
//! inproc socket) and receives [`Event`]s on a channel, finished tasks in batches.

use crate::guard::{CurveServer, Guard};
use crate::state::{
    Comm, Config, Counts, Finished, Inputs, LoadError, ManagerStatus, NewTask, Notice, Peer,
};
use crate::tenants::Tenants;
use fnx_protocol::{
    decode, encode, Attempt, BlockId, FunctionDef, FunctionId, InterchangeToManager, ManagerId,
    ManagerToInterchange, TaskError, TaskId, TaskSpec,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How to run the driver.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// ZeroMQ endpoint to bind, e.g. `tcp://127.0.0.1:0` (port 0: any free port).
    pub bind: String,
    /// State machine tunables.
    pub state: Config,
    /// Largest frame accepted from or sent to a manager.
    pub max_frame_bytes: usize,
    /// How often expiry is checked.
    pub tick: Duration,
    /// Send [`Event::Dispatched`] for every batch handed to a manager (off by default: only a
    /// host that records task states needs it).
    pub report_dispatch: bool,
    /// Encrypt and authenticate manager links with CurveZMQ (`None`: plain links, for
    /// loopback).
    pub curve: Option<CurveServer>,
}

impl DriverConfig {
    /// Defaults, bound to `bind`.
    pub fn new(bind: impl Into<String>) -> Self {
        DriverConfig {
            bind: bind.into(),
            state: Config::default(),
            max_frame_bytes: fnx_protocol::DEFAULT_MAX_FRAME_BYTES,
            tick: Duration::from_millis(100),
            report_dispatch: false,
            curve: None,
        }
    }
}

/// The driver could not start.
#[derive(Debug, Error)]
pub enum DriverError {
    /// A ZeroMQ call failed.
    #[error("interchange socket: {what}: {source}")]
    Zmq {
        /// Which call.
        what: &'static str,
        /// The ZeroMQ error.
        source: zmq::Error,
    },
    /// The driver thread could not be started.
    #[error("cannot start the interchange thread: {0}")]
    Thread(std::io::Error),
    /// A new key could not be written as Z85 text.
    #[error("cannot encode a CurveZMQ key as Z85")]
    KeyText,
}

fn zerr(what: &'static str) -> impl FnOnce(zmq::Error) -> DriverError {
    move |source| DriverError::Zmq { what, source }
}

/// What the driver tells its host.
#[derive(Debug)]
pub enum Event {
    /// Tasks that reached their terminal state, in the order they did.
    Finished(Vec<Finished>),
    /// A manager event (registered, lost, refused, drained, ignored message).
    Notice(Notice),
    /// Tasks handed to managers, with the attempt number of that dispatch and whether it went
    /// to an idle worker slot (it starts at once, without a later `Started`); sent before any
    /// later `Finished` of the same tasks.
    Dispatched(Vec<(TaskId, Attempt, bool)>),
    /// Attempts their managers started (with `report_dispatch`); after their `Dispatched`.
    Started(Vec<(TaskId, Attempt)>),
}

enum Command {
    AllowKey(Vec<u8>, String),
    Tenants(Sender<Vec<(String, Counts)>>),
    AddFunction(FunctionDef),
    RemoveFunction(FunctionId),
    HoldFunction(FunctionId),
    ReleaseFunction(FunctionId),
    FailFunction(FunctionId, TaskError),
    Submit(String, Vec<NewTask>),
    Cancel(Vec<TaskId>),
    ManagerGone { uid: String, reason: String },
    DrainBlock(BlockId),
    DrainManager(String),
    FailTenant(String, TaskError),
    Status(Sender<(Counts, Vec<ManagerStatus>)>),
    Shutdown { reason: String },
}

/// The host's side of a running interchange.
pub struct Handle {
    commands: Sender<Command>,
    wake: Mutex<zmq::Socket>,
    endpoint: String,
    thread: Mutex<Option<JoinHandle<()>>>,
}

static NEXT_WAKE: AtomicU64 = AtomicU64::new(0);

/// Reads the inputs of tasks submitted with [`NewTask::stored`] (the host's store), on the
/// driver thread at dispatch.
pub trait Loader: Send {
    /// One answer per id, in order.
    fn load(&mut self, ids: &[TaskId]) -> Vec<Result<Inputs, LoadError>>;
}

/// Bind the ROUTER socket and start the driver thread (in a ZeroMQ context of its own, which
/// its sockets keep alive).
pub fn start(config: DriverConfig) -> Result<(Handle, Receiver<Event>), DriverError> {
    start_with_loader(config, None)
}

/// [`start`], with a loader for tasks whose inputs stay in the host's store.
pub fn start_with_loader(
    config: DriverConfig,
    loader: Option<Box<dyn Loader>>,
) -> Result<(Handle, Receiver<Event>), DriverError> {
    let context = zmq::Context::new();
    let ctx = &context;
    let router = ctx.socket(zmq::ROUTER).map_err(zerr("socket"))?;
    router
        .set_router_mandatory(true)
        .map_err(zerr("ROUTER_MANDATORY"))?;
    router.set_sndhwm(0).map_err(zerr("SNDHWM"))?;
    router.set_rcvhwm(0).map_err(zerr("RCVHWM"))?;
    router
        .set_maxmsgsize(config.max_frame_bytes as i64)
        .map_err(zerr("MAXMSGSIZE"))?;
    router.set_linger(2000).map_err(zerr("LINGER"))?;
    let guard = match &config.curve {
        Some(curve) => Some(Guard::install(ctx, &router, curve)?),
        None => None,
    };
    router.bind(&config.bind).map_err(zerr("bind"))?;
    let endpoint = router
        .get_last_endpoint()
        .map_err(zerr("last endpoint"))?
        .unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned());
    let wake_addr = format!(
        "inproc://fnx-interchange-wake-{}",
        NEXT_WAKE.fetch_add(1, Ordering::Relaxed)
    );
    let wake_rx = ctx.socket(zmq::PAIR).map_err(zerr("socket"))?;
    wake_rx.bind(&wake_addr).map_err(zerr("bind wake"))?;
    let wake_tx = ctx.socket(zmq::PAIR).map_err(zerr("socket"))?;
    wake_tx.connect(&wake_addr).map_err(zerr("connect wake"))?;
    let (cmd_tx, cmd_rx) = channel();
    let (ev_tx, ev_rx) = channel();
    let thread = std::thread::Builder::new()
        .name("interchange".into())
        .spawn(move || {
            let mut driver = Driver {
                ic: Tenants::new(config.state.clone()),
                router,
                wake: wake_rx,
                commands: cmd_rx,
                events: ev_tx,
                max_frame: config.max_frame_bytes,
                tick: config.tick,
                report_dispatch: config.report_dispatch,
                guard,
                discarded: RateLimit::default(),
                ignored: RateLimit::default(),
                loader,
            };
            driver.run();
        })
        .map_err(DriverError::Thread)?;
    let handle = Handle {
        commands: cmd_tx,
        wake: Mutex::new(wake_tx),
        endpoint,
        thread: Mutex::new(Some(thread)),
    };
    Ok((handle, ev_rx))
}

impl Handle {
    /// The endpoint managers connect to (with the real port if port 0 was bound).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn command(&self, cmd: Command) {
        if self.commands.send(cmd).is_ok() {
            if let Ok(wake) = self.wake.lock() {
                let _ = wake.send(&[][..], zmq::DONTWAIT);
            }
        }
    }

    /// Make a function known to the interchange.
    pub fn add_function(&self, def: FunctionDef) {
        self.command(Command::AddFunction(def));
    }

    /// A function was deleted: forget its definition once its last task has ended.
    pub fn remove_function(&self, id: FunctionId) {
        self.command(Command::RemoveFunction(id));
    }

    /// Keep the tasks of a function queued, undispatched, until it is released or failed (its
    /// container image is being built).
    pub fn hold_function(&self, id: FunctionId) {
        self.command(Command::HoldFunction(id));
    }

    /// Dispatch the held tasks of a function, and its future ones.
    pub fn release_function(&self, id: FunctionId) {
        self.command(Command::ReleaseFunction(id));
    }

    /// Finish the held tasks of a function with `error`.
    pub fn fail_function(&self, id: FunctionId, error: TaskError) {
        self.command(Command::FailFunction(id, error));
    }

    /// Hand tasks to the interchange (the shared tenant's: any manager may run them).
    pub fn submit(&self, tasks: Vec<NewTask>) {
        self.command(Command::Submit(String::new(), tasks));
    }

    /// Hand tasks of `tenant` to the interchange: only managers holding a key of that tenant
    /// get them ([`crate::tenants`]).
    pub fn submit_as(&self, tenant: &str, tasks: Vec<NewTask>) {
        self.command(Command::Submit(tenant.to_string(), tasks));
    }

    /// Accept managers holding the public key `key` (32 bytes) from now on, as managers of
    /// `tenant` (with a CURVE server; ignored without).
    pub fn allow_manager_key(&self, key: Vec<u8>, tenant: &str) {
        self.command(Command::AllowKey(key, tenant.to_string()));
    }

    /// Each tenant's counts.
    pub fn tenants(&self) -> Option<Vec<(String, Counts)>> {
        let (tx, rx) = channel();
        self.command(Command::Tenants(tx));
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Cancel tasks.
    pub fn cancel(&self, ids: Vec<TaskId>) {
        self.command(Command::Cancel(ids));
    }

    /// Tell the interchange that the manager launched as `uid` has ended.
    pub fn manager_gone(&self, uid: String, reason: String) {
        self.command(Command::ManagerGone { uid, reason });
    }

    /// Drain every manager of a block: they get no new tasks and are released (and exit) once
    /// they hold none.
    pub fn drain_block(&self, block: BlockId) {
        self.command(Command::DrainBlock(block));
    }

    /// Drain the manager launched as `uid`: no new tasks; it is released (and exits) once it
    /// holds none.
    pub fn drain_manager(&self, uid: &str) {
        self.command(Command::DrainManager(uid.to_string()));
    }

    /// Finish every undispatched task of `tenant` with `error` (the tenant may not run here).
    pub fn fail_tenant(&self, tenant: &str, error: TaskError) {
        self.command(Command::FailTenant(tenant.to_string(), error));
    }

    /// Counts and managers, as the driver sees them now.
    pub fn status(&self) -> Option<(Counts, Vec<ManagerStatus>)> {
        let (tx, rx) = channel();
        self.command(Command::Status(tx));
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Tell every manager to exit, then stop the driver thread.
    pub fn shutdown(self, reason: &str) {
        self.stop(reason);
    }

    /// Tell every manager to exit and stop the driver thread; later calls do nothing. The
    /// handle may be shared between threads (it is `Sync`).
    pub fn stop(&self, reason: &str) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            self.command(Command::Shutdown {
                reason: reason.to_string(),
            });
            let _ = thread.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop("the interchange is stopping");
    }
}

struct Driver {
    ic: Tenants,
    router: zmq::Socket,
    wake: zmq::Socket,
    commands: Receiver<Command>,
    events: Sender<Event>,
    max_frame: usize,
    tick: Duration,
    report_dispatch: bool,
    guard: Option<Guard>,
    ignored: RateLimit,
    discarded: RateLimit,
    loader: Option<Box<dyn Loader>>,
}

struct Outbox<'a> {
    loader: Option<&'a mut Box<dyn Loader>>,
    router: &'a zmq::Socket,
    max_frame: usize,
    finished: Vec<Finished>,
    notices: Vec<Notice>,
    unreachable: Vec<Peer>,
    dispatched: Option<Vec<(TaskId, Attempt, bool)>>,
    started: Option<Vec<(TaskId, Attempt)>>,
}

impl Comm for Outbox<'_> {
    fn send(&mut self, to: &Peer, msg: &InterchangeToManager) {
        let frame = match encode(msg, self.max_frame) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!("cannot encode a message for a manager: {e}");
                return;
            }
        };
        let sent = self
            .router
            .send(&to[..], zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| self.router.send(frame, zmq::DONTWAIT));
        if let Err(e) = sent {
            tracing::debug!("send to a manager failed: {e}");
            self.unreachable.push(to.clone());
        }
    }

    fn finished(&mut self, done: Finished) {
        self.finished.push(done);
    }

    fn notice(&mut self, notice: Notice) {
        self.notices.push(notice);
    }

    fn dispatched(&mut self, _manager: ManagerId, tasks: &[TaskSpec], direct: usize) {
        if let Some(d) = &mut self.dispatched {
            d.extend(
                tasks
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.id, t.attempt, i < direct)),
            );
        }
    }

    fn started(&mut self, tasks: &[(TaskId, Attempt)]) {
        if let Some(s) = &mut self.started {
            s.extend_from_slice(tasks);
        }
    }

    fn load(&mut self, ids: &[TaskId]) -> Vec<Result<Inputs, LoadError>> {
        match &mut self.loader {
            Some(loader) => loader.load(ids),
            None => ids.iter().map(|_| Err(LoadError::NoStore)).collect(),
        }
    }
}

const MAX_MESSAGES_PER_ROUND: usize = 4096;

impl Driver {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let (router_ready, wake_ready) = {
                let mut items = vec![
                    self.router.as_poll_item(zmq::POLLIN),
                    self.wake.as_poll_item(zmq::POLLIN),
                ];
                if let Some(g) = &self.guard {
                    items.push(g.zap.as_poll_item(zmq::POLLIN));
                    items.push(g.monitor.as_poll_item(zmq::POLLIN));
                }
                if let Err(e) = zmq::poll(&mut items, timeout.as_millis().max(1) as i64) {
                    tracing::error!("poll failed: {e}");
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            if let Some(g) = &mut self.guard {
                g.serve_zap();
                g.drain_monitor();
            }
            let mut out = Outbox {
                loader: self.loader.as_mut(),
                router: &self.router,
                max_frame: self.max_frame,
                finished: Vec::new(),
                notices: Vec::new(),
                unreachable: Vec::new(),
                dispatched: self.report_dispatch.then(Vec::new),
                started: self.report_dispatch.then(Vec::new),
            };
            let mut stop = None;
            if wake_ready {
                while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    Command::AddFunction(def) => self.ic.add_function(def),
                    Command::RemoveFunction(id) => self.ic.remove_function(id),
                    Command::HoldFunction(id) => self.ic.hold_function(id),
                    Command::ReleaseFunction(id) => self.ic.release_function(id),
                    Command::FailFunction(id, e) => self.ic.fail_function(id, e, &mut out),
                    Command::Submit(tenant, tasks) => self.ic.submit(&tenant, tasks, &mut out),
                    Command::AllowKey(key, tenant) => {
                        if let Some(g) = &mut self.guard {
                            g.allow(key, tenant);
                        }
                    }
                    Command::Tenants(reply) => {
                        let _ = reply.send(self.ic.tenant_counts());
                    }
                    Command::Cancel(ids) => self.ic.cancel(&ids, &mut out),
                    Command::ManagerGone { uid, reason } => {
                        self.ic.manager_gone(&uid, &reason, &mut out)
                    }
                    Command::DrainBlock(block) => self.ic.drain_block(block, &mut out),
                    Command::DrainManager(uid) => self.ic.drain_named(&uid, &mut out),
                    Command::FailTenant(tenant, e) => self.ic.fail_queued(&tenant, &e, &mut out),
                    Command::Status(reply) => {
                        let _ = reply.send((self.ic.counts(), self.ic.managers(Instant::now())));
                    }
                    Command::Shutdown { reason } => stop = Some(reason),
                }
            }
            if router_ready {
                let now = Instant::now();
                for _ in 0..MAX_MESSAGES_PER_ROUND {
                    match recv_message(&self.router) {
                        Ok(Some(m)) => {
                            handle_message(&mut self.ic, now, m, self.max_frame, &mut out)
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!("receive failed: {e}");
                            break;
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.ic.tick(now, &mut out);
                next_tick = now + self.tick;
            }
            if let Some(reason) = &stop {
                self.ic.shutdown_all(reason, &mut out);
            } else {
                self.ic.dispatch(&mut out);
            }
            while !out.unreachable.is_empty() {
                let peers = std::mem::take(&mut out.unreachable);
                for peer in peers {
                    self.ic.peer_unreachable(&peer, &mut out);
                }
            }
            let Outbox {
                finished,
                notices,
                dispatched,
                started,
                ..
            } = out;
            if let Some(d) = dispatched.filter(|d| !d.is_empty()) {
                let _ = self.events.send(Event::Dispatched(d));
            }
            if let Some(s) = started.filter(|s| !s.is_empty()) {
                let _ = self.events.send(Event::Started(s));
            }
            for notice in notices {
                self.log_notice(&notice);
                let _ = self.events.send(Event::Notice(notice));
            }
            if !finished.is_empty() {
                let _ = self.events.send(Event::Finished(finished));
            }
            if stop.is_some() {
                return;
            }
        }
    }

    fn log_notice(&mut self, notice: &Notice) {
        match notice {
            Notice::Registered { id, uid, host, slots } => {
                tracing::info!("manager {uid} ({id}) on {host} registered with {slots} slots")
            }
            Notice::Refused { uid, reason } => {
                tracing::warn!("refused manager {}: {reason}", uid.as_deref().unwrap_or("(unnamed)"))
            }
            Notice::Lost { id, uid, host, reason, requeued, failed } => tracing::warn!(
                "manager {uid} ({id}) on {host} lost: {reason}; {requeued} tasks requeued, {failed} failed"
            ),
            Notice::Drained { id, uid } => tracing::info!("manager {uid} ({id}) drained and released"),
            Notice::Discarded { id, attempt, manager } => {
                if let Some(suppressed) = self.discarded.allow(Instant::now()) {
                    if suppressed > 0 {
                        tracing::warn!("{suppressed} more discarded results were not logged");
                    }
                    tracing::warn!(
                        "discarded the result of {id} {attempt} from {manager}: that attempt was \
                         superseded (the task was dispatched again) or is not assigned to it"
                    );
                }
            }
            Notice::Ignored { reason } => {
                if let Some(suppressed) = self.ignored.allow(Instant::now()) {
                    if suppressed > 0 {
                        tracing::warn!("{suppressed} more ignored messages were not logged");
                    }
                    tracing::warn!("ignored: {reason}");
                }
            }
        }
    }
}

/// One message from a peer: its routing id, its frames (at most two are kept; a message of
/// more is malformed anyway), and its tenant as the ZAP handler named it (`User-Id`).
struct Incoming {
    peer: Vec<u8>,
    frames: Vec<zmq::Message>,
    extra_frames: bool,
    tenant: String,
}

/// The next whole message, or None when there is none.
fn recv_message(router: &zmq::Socket) -> Result<Option<Incoming>, zmq::Error> {
    let peer = match router.recv_msg(zmq::DONTWAIT) {
        Ok(m) => m.to_vec(),
        Err(zmq::Error::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut frames = Vec::new();
    let mut extra_frames = false;
    let mut tenant = None;
    while router.get_rcvmore()? {
        let mut m = router.recv_msg(0)?;
        if tenant.is_none() {
            tenant = Some(m.gets("User-Id").unwrap_or("").to_string());
        }
        if frames.len() < 2 {
            frames.push(m);
        } else {
            extra_frames = true;
        }
    }
    Ok(Some(Incoming {
        peer,
        frames,
        extra_frames,
        tenant: tenant.unwrap_or_default(),
    }))
}

fn handle_message(ic: &mut Tenants, now: Instant, m: Incoming, max: usize, out: &mut Outbox<'_>) {
    let tenant = m.tenant.as_str();
    if m.frames.len() != 1 || m.extra_frames {
        let err = fnx_protocol::FrameError::Malformed {
            reason: "expected exactly one frame per message".into(),
        };
        ic.on_bad_frame(tenant, &m.peer, &err, out);
        return;
    }
    match decode::<ManagerToInterchange>(&m.frames[0], max) {
        Ok(msg) => ic.on_message(tenant, now, &m.peer, msg, out),
        Err(err) => ic.on_bad_frame(tenant, &m.peer, &err, out),
    }
}

/// Lets through a few warnings per window and counts the rest.
#[derive(Default)]
pub struct RateLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    const WINDOW: Duration = Duration::from_secs(10);
    const PER_WINDOW: u32 = 10;

    /// `Some(suppressed since last allowed)` if this one may be logged.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(start) if now.duration_since(start) < Self::WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < Self::PER_WINDOW {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}
