//! The pool's driver: the real [`Io`] over child processes, their pipes and memory cgroups and
//! the link thread's pair socket, and the loop that turns what it reads into the pool's events.
//!
//! One round: one `zmq::poll` over the pair, the signal pipe, each child's pidfd, its pipes and
//! its cgroup's out-of-memory eventfd; then the events in a fixed order (out-of-memory notices
//! first, so that a result or death read in the same round is known to be one; deaths after
//! the last output of the dead), then [`Pool::tick`].

use super::{Exit, Io, Pool, PoolConfig, PoolEnd, ShellStart, Spawned, WorkerOutput, WorkerStart};
use crate::pair::{ToLink, ToPool};
use crate::procs::{Markers, PythonWorker, ShellProc, Start};
use crate::sandbox::Sandbox;
use fnx_protocol::{
    encode, FunctionBody, InterchangeToManager, ManagerToInterchange, TaskError, TaskSpec,
};
use fnx_sys::cgroup::{Leaf, MemoryCgroups};
use fnx_sys::process::{kill_group, reap_any};
use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

enum Handle {
    Python(PythonWorker),
    Shell(ShellProc),
}

/// A process the pool started, as the world holds it.
struct Child {
    handle: Handle,
    /// Its own memory cgroup.
    cgroup: Option<Leaf>,
    /// A Python worker's peak resident size, opened when first asked for.
    peak: Option<fnx_sys::memory::PeakRss>,
}

/// The real [`Io`].
pub struct SysIo<'a> {
    link: &'a zmq::Socket,
    markers: Markers,
    worker_script: PathBuf,
    max_result_bytes: u64,
    max_frame_bytes: usize,
    /// Where tasks' working directories are made.
    sandboxes: PathBuf,
    children: HashMap<u32, Child>,
    /// The parent of each child's memory cgroup, if the node lets this manager make them
    /// (otherwise limits are enforced by sampling alone). Made at start with a pool limit, else
    /// when the first task with a limit of its own comes.
    cgroups: Option<MemoryCgroups>,
    /// Whether making `cgroups` was tried.
    cgroups_tried: bool,
}

impl<'a> SysIo<'a> {
    /// `cgroups`: the parent of the workers' memory cgroups if the caller tried to make it
    /// (`Some(None)`: it could not); `None`: made here when a limit needs it.
    fn new(
        cfg: &PoolConfig,
        link: &'a zmq::Socket,
        cgroups: Option<Option<MemoryCgroups>>,
    ) -> SysIo<'a> {
        let (cgroups, cgroups_tried) = match cgroups {
            Some(made) => (made, true),
            None => (
                cfg.mem_limit.and_then(super::memory_cgroups),
                cfg.mem_limit.is_some(),
            ),
        };
        SysIo {
            link,
            markers: cfg.markers.clone(),
            worker_script: cfg.worker_script.clone(),
            max_result_bytes: cfg.max_result_bytes,
            max_frame_bytes: cfg.max_frame_bytes,
            sandboxes: cfg.log_dir.join("tasks"),
            children: HashMap::new(),
            cgroups,
            cgroups_tried,
        }
    }

    /// A memory cgroup for a new process held to `limit` bytes (None: no limit, no cgroups on
    /// this node, or this one could not be made; sampling applies then).
    fn memory_leaf(&mut self, limit: Option<u64>) -> Option<Leaf> {
        let limit = limit?;
        if !self.cgroups_tried {
            self.cgroups_tried = true;
            self.cgroups = super::memory_cgroups(0);
        }
        match self.cgroups.as_mut()?.leaf(limit) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::warn!("cannot make a memory cgroup for a worker: {e}");
                None
            }
        }
    }

    /// Keep a child that started; what the pool is told of it.
    fn keep(&mut self, pid: u32, marker: String, handle: Handle, cgroup: Option<Leaf>) -> Spawned {
        let held = cgroup.is_some();
        self.children.insert(
            pid,
            Child {
                handle,
                cgroup,
                peak: None,
            },
        );
        Spawned { pid, marker, held }
    }

    /// What the child `pid` wrote: a worker's frames; a shell's output goes to its tails.
    fn read(&mut self, pid: u32, max: usize) -> Option<WorkerOutput> {
        match &mut self.children.get_mut(&pid)?.handle {
            Handle::Shell(s) => {
                s.read_output();
                None
            }
            Handle::Python(w) => {
                let (frames, broke) = w.read_frames(max);
                Some(WorkerOutput {
                    frames,
                    broke,
                    eof: w.eof(),
                })
            }
        }
    }
}

impl Io for SysIo<'_> {
    fn now(&mut self) -> Instant {
        Instant::now()
    }

    fn spawn_worker(&mut self, w: WorkerStart<'_>) -> std::io::Result<Spawned> {
        let cgroup = self.memory_leaf(w.mem_limit);
        let start = Start {
            markers: &self.markers,
            slot: w.slot,
            container: w.container,
            cgroup: cgroup.as_ref(),
        };
        let worker = PythonWorker::spawn(
            w.python,
            &self.worker_script,
            w.log,
            &start,
            w.serial,
            self.max_result_bytes,
        )?;
        let (pid, marker) = (worker.pid, worker.marker.clone());
        Ok(self.keep(pid, marker, Handle::Python(worker), cgroup))
    }

    fn spawn_shell(&mut self, s: ShellStart<'_>) -> std::io::Result<Spawned> {
        let cgroup = self.memory_leaf(s.mem_limit);
        let start = Start {
            markers: &self.markers,
            slot: s.slot,
            container: s.container,
            cgroup: cgroup.as_ref(),
        };
        let proc = ShellProc::spawn(
            s.script,
            s.args,
            &start,
            s.serial,
            &s.task.id.0.to_string(),
            s.cwd,
        )?;
        let (pid, marker) = (proc.pid, proc.marker.clone());
        Ok(self.keep(pid, marker, Handle::Shell(proc), cgroup))
    }

    fn send_task(
        &mut self,
        pid: u32,
        def: Option<&FunctionBody>,
        spec: &TaskSpec,
        cwd: Option<&Path>,
    ) -> std::io::Result<()> {
        match self.children.get_mut(&pid).map(|c| &mut c.handle) {
            Some(Handle::Python(w)) => w.send_task(def, spec, cwd),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no worker {pid}"),
            )),
        }
    }

    fn send_exit(&mut self, pid: u32) {
        if let Some(Handle::Python(w)) = self.children.get_mut(&pid).map(|c| &mut c.handle) {
            w.send_exit();
        }
    }

    fn signal_group(&mut self, pid: u32, sig: i32) {
        let _ = kill_group(pid, sig);
    }

    fn sweep(&mut self, marker: &str) -> usize {
        fnx_sys::sweep::kill_marked("FNX_PROC", marker, 20)
    }

    fn send(&mut self, msg: &ManagerToInterchange) {
        match encode(msg, self.max_frame_bytes) {
            Ok(frame) => {
                if let Err(e) = ToLink::Send(zmq::Message::from(frame)).send(self.link) {
                    tracing::error!("cannot hand a message to the link thread: {e}");
                }
            }
            Err(e) => tracing::error!("cannot encode a message for the interchange: {e}"),
        }
    }

    fn sandbox(&mut self, spec: &TaskSpec) -> Result<Option<Sandbox>, TaskError> {
        Sandbox::prepare(&self.sandboxes, spec)
    }

    fn exists(&mut self, path: &Path) -> bool {
        path.exists()
    }

    fn oom_kills(&mut self) -> Option<u64> {
        fnx_sys::memory::oom_kills()
    }

    fn rss_of_groups(&mut self, groups: &[u32]) -> Vec<(u32, u64)> {
        fnx_sys::memory::rss_of_groups(groups).into_iter().collect()
    }

    fn peak_rss(&mut self, pid: u32) -> Option<u64> {
        let child = self.children.get_mut(&pid)?;
        if child.peak.is_none() {
            child.peak = fnx_sys::memory::PeakRss::open(pid).ok();
        }
        child.peak.as_ref()?.read()
    }

    fn reset_peak_rss(&mut self, pid: u32) {
        let _ = fnx_sys::memory::reset_peak_rss(pid);
    }

    fn hold(&mut self, pid: u32, limit: Option<u64>) -> bool {
        let has_cgroup = match self.children.get(&pid) {
            None => return false,
            Some(c) => c.cgroup.is_some(),
        };
        if !has_cgroup {
            let Some(leaf) = self.memory_leaf(limit) else {
                return false;
            };
            if let Err(e) = leaf.adopt(pid) {
                tracing::warn!("cannot move worker {pid} into its memory cgroup: {e}");
                return false;
            }
            if let Some(c) = self.children.get_mut(&pid) {
                c.cgroup = Some(leaf);
            }
        }
        let Some(leaf) = self.children.get_mut(&pid).and_then(|c| c.cgroup.as_mut()) else {
            return false;
        };
        if leaf.limit != limit {
            if let Err(e) = leaf.set_limit(limit) {
                tracing::warn!(
                    "cannot set worker {pid}'s memory cgroup to its task's limit: {e}; the task \
                     is sampled instead"
                );
            }
        }
        leaf.limit == limit
    }

    fn cgroup_kill_peak(&mut self, pid: u32, noticed: bool) -> Option<u64> {
        let leaf = self.children.get_mut(&pid)?.cgroup.as_mut()?;
        if leaf.oom_fd().is_some() {
            noticed.then(|| leaf.peak())
        } else {
            leaf.new_oom_kill()
        }
    }
}

#[derive(Clone, Copy)]
enum Source {
    Link,
    Signal,
    Exit,
    Output(u32),
    /// The kernel killed in this process's memory cgroup.
    Oom(u32),
}

/// Run the pool until the interchange releases or stops this manager, the link ends or a
/// signal arrives; then kill every process it started and say goodbye through the link.
/// `cgroups`: see [`SysIo::new`].
pub fn run(
    cfg: PoolConfig,
    link: &zmq::Socket,
    signals: &fnx_sys::signals::SignalPipe,
    cgroups: Option<Option<MemoryCgroups>>,
) -> PoolEnd {
    let grace = cfg.kill_grace;
    let manager_marker = cfg.markers.manager.clone();
    let max_frame = cfg.max_result_bytes as usize + (1 << 20);
    let io = SysIo::new(&cfg, link, cgroups);
    let mut pool = Pool::new(cfg, io, Instant::now());
    let end = loop {
        if let Some(end) = pool.end() {
            break end.clone();
        }
        step(&mut pool, link, signals, max_frame);
    };
    pool.finish(Instant::now());
    stop_all(&mut pool, grace, &manager_marker);
    let bye = match &end {
        PoolEnd::Signal(sig) => Some(format!("received {}", fnx_sys::process::signal_name(*sig))),
        _ => None,
    };
    let _ = ToLink::Quit(bye).send(link);
    end
}

fn step(
    pool: &mut Pool<SysIo<'_>>,
    link: &zmq::Socket,
    signals: &fnx_sys::signals::SignalPipe,
    max_frame: usize,
) {
    let mut sources = vec![Source::Link, Source::Signal];
    let mut fds = vec![signals.raw_fd()];
    {
        let children = &pool.io().children;
        // Out-of-memory notices first: a task's result or death read in the same round is
        // then known to be one.
        for (&pid, c) in children {
            if let Some(fd) = c.cgroup.as_ref().and_then(|c| c.oom_fd()) {
                sources.push(Source::Oom(pid));
                fds.push(fd);
            }
        }
        for (&pid, c) in children {
            sources.push(Source::Exit);
            match &c.handle {
                Handle::Python(w) => {
                    fds.push(w.pidfd.as_raw_fd());
                    if !w.eof() {
                        sources.push(Source::Output(pid));
                        fds.push(w.stdout_fd());
                    }
                }
                Handle::Shell(s) => {
                    fds.push(s.pidfd.as_raw_fd());
                    for fd in s.output_fds() {
                        sources.push(Source::Output(pid));
                        fds.push(fd);
                    }
                }
            }
        }
    }
    let mut items = Vec::with_capacity(sources.len());
    items.push(link.as_poll_item(zmq::POLLIN));
    items.extend(
        fds.iter()
            .map(|&fd| zmq::PollItem::from_fd(fd, zmq::POLLIN)),
    );
    // zmq::poll takes milliseconds; round up so a 1 ms flush does not spin.
    let timeout = pool.timeout(Instant::now()).as_micros().div_ceil(1000) as i64;
    match zmq::poll(&mut items, timeout) {
        Ok(_) | Err(zmq::Error::EINTR) => {}
        Err(e) => tracing::error!("poll failed: {e}"),
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
        let now = Instant::now();
        match source {
            Source::Link => {
                while let Some(m) = ToPool::recv(link, zmq::DONTWAIT) {
                    match m {
                        ToPool::Ended(why) => pool.on_link_lost(why),
                        ToPool::Frame(body) => {
                            match fnx_protocol::decode::<InterchangeToManager>(&body, usize::MAX) {
                                Ok(msg) => pool.on_message(now, msg),
                                Err(e) => tracing::error!("undecodable frame from the link: {e}"),
                            }
                        }
                    }
                }
            }
            Source::Signal => {
                if let Some(&sig) = signals.drain().first() {
                    pool.on_signal(sig);
                }
            }
            Source::Exit => exited = true,
            Source::Output(pid) => {
                if let Some(out) = pool.io().read(pid, max_frame) {
                    pool.on_worker_output(now, pid, out);
                }
            }
            Source::Oom(pid) => {
                let hit = pool
                    .io()
                    .children
                    .get_mut(&pid)
                    .and_then(|c| c.cgroup.as_mut())
                    .is_some_and(|c| c.take_oom());
                if hit {
                    pool.on_oom_notice(pid);
                }
            }
        }
    }
    if exited {
        reap(pool, max_frame);
    }
    pool.tick(Instant::now(), exited);
}

/// Hand the pool the children that died, each after what it wrote last.
fn reap(pool: &mut Pool<SysIo<'_>>, max_frame: usize) {
    let now = Instant::now();
    let mut exits = Vec::new();
    for (pid, status, peak) in fnx_sys::process::reap_any_with_peak() {
        // Frames or output written just before exit are still in the pipe.
        let output = match pool.io().read(pid, max_frame) {
            Some(out) => {
                pool.on_worker_output(now, pid, out);
                None
            }
            None => match pool.io().children.get(&pid).map(|c| &c.handle) {
                Some(Handle::Shell(s)) => Some((s.out.text(), s.err.text())),
                _ => None,
            },
        };
        exits.push(Exit {
            pid,
            status,
            peak,
            output,
        });
    }
    let pids: Vec<u32> = exits.iter().map(|e| e.pid).collect();
    pool.on_exits(now, exits);
    for pid in pids {
        pool.io().children.remove(&pid);
    }
}

/// After [`Pool::finish`]: wait up to the grace for every child, kill the rest and what they
/// left behind.
fn stop_all(pool: &mut Pool<SysIo<'_>>, grace: Duration, manager_marker: &str) {
    let mut left: HashSet<u32> = pool.io().children.keys().copied().collect();
    let deadline = Instant::now() + grace;
    while !left.is_empty() && Instant::now() < deadline {
        for (pid, _) in reap_any() {
            left.remove(&pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for &pid in &left {
        let _ = kill_group(pid, libc::SIGKILL);
    }
    let swept = fnx_sys::sweep::kill_marked("FNX_MANAGER", manager_marker, 20);
    if swept > 0 {
        tracing::info!("killed {swept} leftover processes at exit");
    }
    reap_any();
    pool.io().children.clear();
}
