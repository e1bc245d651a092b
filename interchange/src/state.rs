//! The interchange as a pure state machine: events in, messages out through [`Comm`].
//!
//! No sockets, threads or clocks live here: the caller passes `now` (a monotonic `Instant`) with
//! every event and receives every effect through the [`Comm`] trait, so unit tests feed events
//! and assert the exact messages emitted.

use crate::routing::{EnvIx, EnvQueues};
pub use crate::types::{
    Comm, Config, Counts, Finished, Inputs, LoadError, ManagerStatus, NewTask, Notice, Peer,
};
use fnx_protocol::{
    Attempt, BlockId, ErrorKind, FrameError, FunctionDef, FunctionId, InterchangeToManager,
    ManagerId, ManagerToInterchange, Outcome, Payload, Register, TaskError, TaskFile, TaskId,
    TaskResult, WarmWorkers, PROTOCOL_VERSION,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

mod dispatch;
mod holds;
mod tenancy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Queued,
    /// Waiting for its function to be released (its container image is being built).
    Held,
    Running(ManagerId),
}

#[derive(Debug)]
struct TaskRec {
    function: FunctionId,
    /// Its function's worker environment.
    env: EnvIx,
    args: Payload,
    priority: i32,
    walltime_ms: Option<u64>,
    retries_left: u32,
    attempt: Attempt,
    state: TaskState,
    cancel_requested: bool,
    /// Workers this task's attempts killed (worker_lost outcomes): a poison task shows here.
    crashes: u32,
    /// Input files (a boxed slice: no allocation, 16 bytes, when there are none).
    files: Box<[TaskFile]>,
    /// The inputs stay in the host's store (`args` and `files` are empty): their size.
    stored: Option<u64>,
    /// Its own memory limit in MiB.
    memory_mb: Option<u32>,
}

#[derive(Debug)]
struct ManagerRec {
    peer: Peer,
    uid: String,
    host: String,
    block_id: Option<BlockId>,
    slots: u32,
    capacity: usize,
    inflight: HashSet<TaskId>,
    functions_sent: HashSet<FunctionId>,
    last_seen: Instant,
    idle_since: Option<Instant>,
    draining: bool,
    in_ready: bool,
    completed: u64,
    /// A `Reclaim` was sent and its `Returned` has not come back yet.
    reclaim_pending: bool,
    /// Live workers per environment, as last reported.
    warm: Vec<u32>,
    /// Tasks held per environment.
    env_held: Vec<u32>,
    /// The last report of its workers, for status displays.
    workers: Vec<WarmWorkers>,
}

impl ManagerRec {
    /// Slots with no task (0 while draining).
    fn idle_slots(&self) -> usize {
        if self.draining {
            return 0;
        }
        (self.slots as usize).saturating_sub(self.inflight.len())
    }

    /// Tasks held beyond the slots: queued on the manager, not running.
    fn excess(&self) -> usize {
        self.inflight.len().saturating_sub(self.slots as usize)
    }

    /// Whether it has workers of `env`, or holds tasks that will start some.
    fn is_warm(&self, env: EnvIx) -> bool {
        self.warm.get(env).is_some_and(|&n| n > 0) || self.env_held.get(env).is_some_and(|&n| n > 0)
    }

    /// It took a task of `env`.
    fn hold(&mut self, id: TaskId, env: EnvIx) {
        self.inflight.insert(id);
        if self.env_held.len() <= env {
            self.env_held.resize(env + 1, 0);
        }
        self.env_held[env] += 1;
    }

    /// A task of `env` left it (finished, given back); false if it did not hold it.
    fn release(&mut self, id: TaskId, env: EnvIx) -> bool {
        if !self.inflight.remove(&id) {
            return false;
        }
        if let Some(n) = self.env_held.get_mut(env) {
            *n = n.saturating_sub(1);
        }
        true
    }
}

/// The dispatcher state.
#[derive(Debug)]
pub struct Interchange {
    config: Config,
    functions: HashMap<FunctionId, FunctionDef>,
    /// Functions whose tasks wait for [`Interchange::release_function`], with those tasks.
    holds: HashMap<FunctionId, Vec<TaskId>>,
    held: usize,
    /// Functions whose image build failed, with the error their tasks finish with.
    failed_functions: HashMap<FunctionId, TaskError>,
    tasks: HashMap<TaskId, TaskRec>,
    queues: EnvQueues,
    managers: HashMap<ManagerId, ManagerRec>,
    peers: HashMap<Peer, ManagerId>,
    /// Connections of managers declared lost (bounded, oldest forgotten first): a message from
    /// one of them is answered `Shutdown`; a message from a connection never seen is answered
    /// `Reregister` (this interchange restarted since that manager registered).
    expired: HashSet<Peer>,
    expired_order: VecDeque<Peer>,
    ready: VecDeque<ManagerId>,
    next_manager: u64,
    queued: usize,
}

impl Interchange {
    /// An empty interchange.
    pub fn new(config: Config) -> Self {
        Interchange {
            queues: EnvQueues::new(config.warm_window),
            config,
            functions: HashMap::new(),
            holds: HashMap::new(),
            held: 0,
            failed_functions: HashMap::new(),
            tasks: HashMap::new(),
            managers: HashMap::new(),
            peers: HashMap::new(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
            ready: VecDeque::new(),
            next_manager: 1,
            queued: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Make a function known; tasks may refer to it from now on.
    pub fn add_function(&mut self, def: FunctionDef) {
        self.queues.env(&def.env());
        self.functions.insert(def.id, def);
    }

    /// Accept tasks. Invalid ones (unknown function, payload over the limit, duplicate id)
    /// finish at once as `bad_input`.
    pub fn submit(&mut self, tasks: Vec<NewTask>, comm: &mut impl Comm) {
        for t in tasks {
            if let Some(err) = self.validate(&t) {
                comm.finished(Finished {
                    id: t.id,
                    attempt: Attempt(0),
                    outcome: Outcome::Err(err),
                });
                continue;
            }
            if let Some(err) = self.failed_functions.get(&t.function) {
                comm.finished(Finished {
                    id: t.id,
                    attempt: t.attempt,
                    outcome: Outcome::Err(err.clone()),
                });
                continue;
            }
            let env = self
                .functions
                .get(&t.function)
                .and_then(|f| self.queues.lookup(&f.env()))
                .unwrap_or(0);
            let state = match self.holds.get_mut(&t.function) {
                Some(held) => {
                    held.push(t.id);
                    self.held += 1;
                    TaskState::Held
                }
                None => {
                    self.queues.push_back(env, t.priority, t.id);
                    self.queued += 1;
                    TaskState::Queued
                }
            };
            self.tasks.insert(
                t.id,
                TaskRec {
                    function: t.function,
                    env,
                    args: t.args,
                    priority: t.priority,
                    walltime_ms: t.walltime_ms,
                    retries_left: t.retries,
                    attempt: t.attempt,
                    state,
                    cancel_requested: false,
                    crashes: 0,
                    files: t.files.into_boxed_slice(),
                    stored: t.stored,
                    memory_mb: t.memory_mb,
                },
            );
        }
    }

    fn validate(&self, t: &NewTask) -> Option<TaskError> {
        if self.tasks.contains_key(&t.id) {
            return Some(TaskError::new(
                ErrorKind::BadInput,
                "DuplicateTask",
                format!("{} is already held", t.id),
            ));
        }
        if !self.functions.contains_key(&t.function) {
            return Some(TaskError::new(
                ErrorKind::BadInput,
                "UnknownFunction",
                format!("{} is not registered", t.function),
            ));
        }
        let len = t.args.data.len();
        if t.stored.is_none() && len > self.config.max_payload_bytes {
            return Some(TaskError::new(
                ErrorKind::BadInput,
                "PayloadTooLarge",
                format!(
                    "arguments of {len} bytes exceed the limit of {} bytes",
                    self.config.max_payload_bytes
                ),
            ));
        }
        None
    }

    /// Cancel tasks: a queued task never runs; a running one is killed by its manager and
    /// reported `cancelled` when the manager confirms (or when the manager is lost).
    pub fn cancel(&mut self, ids: &[TaskId], comm: &mut impl Comm) {
        let mut per_manager: HashMap<ManagerId, Vec<(TaskId, Attempt)>> = HashMap::new();
        for &id in ids {
            let Some(rec) = self.tasks.get_mut(&id) else {
                continue;
            };
            match rec.state {
                TaskState::Queued | TaskState::Held => {
                    let attempt = rec.attempt;
                    match rec.state {
                        TaskState::Held => self.held -= 1,
                        _ => self.queued -= 1,
                    }
                    self.tasks.remove(&id);
                    comm.finished(Finished {
                        id,
                        attempt,
                        outcome: Outcome::Err(cancelled()),
                    });
                }
                TaskState::Running(mid) => {
                    rec.cancel_requested = true;
                    per_manager.entry(mid).or_default().push((id, rec.attempt));
                }
            }
        }
        for (mid, tasks) in per_manager {
            if let Some(m) = self.managers.get(&mid) {
                comm.send(&m.peer, &InterchangeToManager::Cancel { tasks });
            }
        }
    }

    /// A frame arrived from `peer`.
    pub fn on_message(
        &mut self,
        now: Instant,
        peer: &Peer,
        msg: ManagerToInterchange,
        comm: &mut impl Comm,
    ) {
        if let ManagerToInterchange::Register(reg) = msg {
            self.on_register(now, peer, reg, comm);
            return;
        }
        let Some(&mid) = self.peers.get(peer) else {
            if self.expired.contains(peer) {
                comm.notice(Notice::Ignored {
                    reason: format!("{} from an expired manager; told it to exit", msg.kind()),
                });
                comm.send(
                    peer,
                    &InterchangeToManager::Shutdown {
                        reason: "not registered with this interchange (unknown or expired)".into(),
                    },
                );
            } else {
                comm.notice(Notice::Ignored {
                    reason: format!(
                        "{} from a manager this interchange does not know (registered before \
                         a restart?): discarded (results of its tasks' earlier attempts are \
                         superseded); told it to register again",
                        msg.kind()
                    ),
                });
                comm.send(
                    peer,
                    &InterchangeToManager::Reregister {
                        reason: "this interchange does not know this manager (it restarted?)"
                            .into(),
                    },
                );
            }
            return;
        };
        if let Some(m) = self.managers.get_mut(&mid) {
            m.last_seen = now;
        }
        match msg {
            ManagerToInterchange::Register(_) => unreachable!("handled above"),
            ManagerToInterchange::Heartbeat => comm.send(peer, &InterchangeToManager::Heartbeat),
            ManagerToInterchange::Results(results) => self.on_results(now, mid, results, comm),
            ManagerToInterchange::Drain => {
                if let Some(m) = self.managers.get_mut(&mid) {
                    m.draining = true;
                }
                self.release_if_drained(mid, comm);
            }
            ManagerToInterchange::Bye { reason } => {
                self.lose_manager(mid, &format!("it exited: {reason}"), comm)
            }
            ManagerToInterchange::Returned(tasks) => self.on_returned(mid, &tasks),
            ManagerToInterchange::Warm(workers) => self.on_warm(mid, workers),
            ManagerToInterchange::Started(tasks) => self.on_started(mid, &tasks, comm),
        }
    }

    /// A manager gave back tasks it had not started: queue them again (not a retry).
    fn on_returned(&mut self, mid: ManagerId, tasks: &[(TaskId, Attempt)]) {
        let Some(m) = self.managers.get_mut(&mid) else {
            return;
        };
        m.reclaim_pending = false;
        let mut returned: Vec<TaskId> = Vec::with_capacity(tasks.len());
        for &(id, attempt) in tasks {
            let Some(t) = self
                .tasks
                .get(&id)
                .filter(|t| t.state == TaskState::Running(mid) && t.attempt == attempt)
            else {
                continue;
            };
            if m.release(id, t.env) {
                returned.push(id);
            }
        }
        if !m.in_ready && !m.draining {
            m.in_ready = true;
            self.ready.push_back(mid);
        }
        // Oldest first at the front of their level.
        for &id in returned.iter().rev() {
            if let Some(rec) = self.tasks.get_mut(&id) {
                rec.state = TaskState::Queued;
                self.queues.push_front(rec.env, rec.priority, id);
                self.queued += 1;
            }
        }
    }

    /// Bytes from `peer` could not be decoded.
    pub fn on_bad_frame(&mut self, peer: &Peer, err: &FrameError, comm: &mut impl Comm) {
        if let FrameError::VersionMismatch { peer: theirs, .. } = err {
            let reason = format!(
                "protocol version mismatch: manager speaks version {theirs}, interchange speaks version {PROTOCOL_VERSION}"
            );
            comm.notice(Notice::Refused {
                uid: None,
                reason: reason.clone(),
            });
            comm.send(peer, &InterchangeToManager::Rejected { reason });
            return;
        }
        match self.peers.get(peer).copied() {
            Some(mid) => {
                self.lose_manager(mid, &format!("it sent a malformed message ({err})"), comm);
                comm.send(
                    peer,
                    &InterchangeToManager::Shutdown {
                        reason: format!("malformed message: {err}"),
                    },
                );
            }
            None => comm.notice(Notice::Ignored {
                reason: format!("malformed message from an unregistered peer: {err}"),
            }),
        }
    }

    fn on_register(&mut self, now: Instant, peer: &Peer, reg: Register, comm: &mut impl Comm) {
        if self.peers.contains_key(peer) {
            let reason = format!("manager {} registered twice on one connection", reg.uid);
            comm.notice(Notice::Refused {
                uid: Some(reg.uid),
                reason: reason.clone(),
            });
            comm.send(peer, &InterchangeToManager::Rejected { reason });
            return;
        }
        if let Some(other) = self.managers.values().find(|m| m.uid == reg.uid) {
            let reason = format!(
                "a manager named {} is already connected (on {}); every manager needs its own \
                 --uid (with '{{rank}}' in it, a launcher that sets no rank variable gives every \
                 process rank 0)",
                reg.uid, other.host
            );
            comm.notice(Notice::Refused {
                uid: Some(reg.uid),
                reason: reason.clone(),
            });
            comm.send(peer, &InterchangeToManager::Rejected { reason });
            return;
        }
        if let Some(ours) = self
            .config
            .release
            .as_ref()
            .filter(|r| **r != reg.fnx_version)
        {
            // The protocol number may agree while the releases behave differently.
            let reason = format!(
                "fnx release mismatch: manager {} on {} is fnx {}, the interchange is fnx \
                 {ours}; run the same fnx release on the nodes (the pool's fnx_path)",
                reg.uid, reg.host, reg.fnx_version
            );
            comm.notice(Notice::Refused {
                uid: Some(reg.uid),
                reason: reason.clone(),
            });
            comm.send(peer, &InterchangeToManager::Rejected { reason });
            return;
        }
        if reg.slots == 0 {
            let reason = format!("manager {} on {} offers 0 worker slots", reg.uid, reg.host);
            comm.notice(Notice::Refused {
                uid: Some(reg.uid),
                reason: reason.clone(),
            });
            comm.send(peer, &InterchangeToManager::Rejected { reason });
            return;
        }
        let id = ManagerId(self.next_manager);
        self.next_manager += 1;
        comm.send(
            peer,
            &InterchangeToManager::Registered {
                manager: id,
                heartbeat_period_ms: self.config.heartbeat_period.as_millis() as u64,
                heartbeat_threshold_ms: self.config.heartbeat_threshold.as_millis() as u64,
            },
        );
        comm.notice(Notice::Registered {
            id,
            uid: reg.uid.clone(),
            host: reg.host.clone(),
            slots: reg.slots,
        });
        self.managers.insert(
            id,
            ManagerRec {
                peer: peer.clone(),
                uid: reg.uid,
                host: reg.host,
                block_id: reg.block_id,
                slots: reg.slots,
                capacity: reg.slots as usize + reg.prefetch as usize,
                inflight: HashSet::new(),
                functions_sent: HashSet::new(),
                last_seen: now,
                idle_since: Some(now),
                draining: false,
                in_ready: true,
                completed: 0,
                reclaim_pending: false,
                warm: Vec::new(),
                env_held: Vec::new(),
                workers: Vec::new(),
            },
        );
        self.peers.insert(peer.clone(), id);
        self.ready.push_back(id);
    }

    fn on_results(
        &mut self,
        now: Instant,
        mid: ManagerId,
        results: Vec<TaskResult>,
        comm: &mut impl Comm,
    ) {
        for r in results {
            let assigned = self
                .tasks
                .get(&r.id)
                .filter(|t| t.state == TaskState::Running(mid) && t.attempt == r.attempt)
                .map(|t| t.env);
            let Some(env) = assigned else {
                comm.notice(Notice::Discarded {
                    id: r.id,
                    attempt: r.attempt,
                    manager: mid,
                });
                continue;
            };
            let Some(m) = self.managers.get_mut(&mid) else {
                return;
            };
            m.release(r.id, env);
            m.completed += 1;
            if m.inflight.is_empty() {
                m.idle_since = Some(now);
            }
            if !m.in_ready && !m.draining {
                m.in_ready = true;
                self.ready.push_back(mid);
            }
            let host = m.host.clone();
            self.settle(r.id, r.outcome, &host, comm);
        }
        self.release_if_drained(mid, comm);
    }

    /// Record an attempt's outcome: retry an infrastructure failure if allowed, else finish.
    fn settle(&mut self, id: TaskId, outcome: Outcome, host: &str, comm: &mut impl Comm) {
        let Some(rec) = self.tasks.get_mut(&id) else {
            return;
        };
        if let Outcome::Err(e) = &outcome {
            if e.kind == ErrorKind::WorkerLost {
                rec.crashes += 1;
            }
            if e.kind.is_infrastructure() && rec.retries_left > 0 && !rec.cancel_requested {
                rec.retries_left -= 1;
                rec.state = TaskState::Queued;
                self.queues.push_front(rec.env, rec.priority, id);
                self.queued += 1;
                return;
            }
        }
        let mut outcome = outcome;
        if rec.cancel_requested && matches!(&outcome, Outcome::Err(e) if e.kind.is_infrastructure())
        {
            outcome = Outcome::Err(cancelled());
        }
        if let Outcome::Err(e) = &mut outcome {
            if e.kind.is_infrastructure() && !e.message.contains(host) {
                e.message = format!("{} (on host {host}, attempt {})", e.message, rec.attempt.0);
            }
            if e.kind == ErrorKind::WorkerLost && rec.crashes > 1 {
                e.message = format!(
                    "the task crashed {} workers; last: {}",
                    rec.crashes, e.message
                );
            }
        }
        let attempt = rec.attempt;
        self.tasks.remove(&id);
        comm.finished(Finished {
            id,
            attempt,
            outcome,
        });
    }

    /// Periodic housekeeping: declare managers lost whose silence passed the threshold.
    pub fn tick(&mut self, now: Instant, comm: &mut impl Comm) {
        let threshold = self.config.heartbeat_threshold;
        let expired: Vec<(ManagerId, Duration)> = self
            .managers
            .iter()
            .filter_map(|(&id, m)| {
                let silent = now.saturating_duration_since(m.last_seen);
                (silent > threshold).then_some((id, silent))
            })
            .collect();
        for (mid, silent) in expired {
            let peer = self.managers[&mid].peer.clone();
            self.lose_manager(
                mid,
                &format!(
                    "no message for {:.1}s (threshold {:.1}s)",
                    silent.as_secs_f64(),
                    threshold.as_secs_f64()
                ),
                comm,
            );
            comm.send(
                &peer,
                &InterchangeToManager::Shutdown {
                    reason: "declared lost after missing heartbeats".into(),
                },
            );
        }
    }

    /// The launcher saw the manager named `uid` end (e.g. its process exited).
    pub fn manager_gone(&mut self, uid: &str, reason: &str, comm: &mut impl Comm) {
        let found = self
            .managers
            .iter()
            .find(|(_, m)| m.uid == uid)
            .map(|(&id, _)| id);
        if let Some(mid) = found {
            self.lose_manager(mid, reason, comm);
        }
    }

    /// A peer cannot be reached any more (the transport refused a send to it).
    pub fn peer_unreachable(&mut self, peer: &Peer, comm: &mut impl Comm) {
        if let Some(mid) = self.peers.get(peer).copied() {
            self.lose_manager(mid, "its connection is gone", comm);
        }
    }

    fn remember_expired(&mut self, peer: Peer) {
        const MAX_EXPIRED: usize = 65_536;
        if self.expired.insert(peer.clone()) {
            self.expired_order.push_back(peer);
            if self.expired_order.len() > MAX_EXPIRED {
                if let Some(old) = self.expired_order.pop_front() {
                    self.expired.remove(&old);
                }
            }
        }
    }

    fn lose_manager(&mut self, mid: ManagerId, reason: &str, comm: &mut impl Comm) {
        let Some(m) = self.managers.remove(&mid) else {
            return;
        };
        self.peers.remove(&m.peer);
        self.remember_expired(m.peer.clone());
        let (mut requeued, mut failed) = (0, 0);
        let mut held: Vec<TaskId> = m.inflight.into_iter().collect();
        held.sort_unstable_by(|a, b| b.cmp(a)); // pushed to the front: oldest ends up first
        for id in held {
            let error = TaskError::new(
                ErrorKind::ManagerLost,
                "ManagerLost",
                format!(
                    "manager {} ({mid}) on host {} was lost: {reason}",
                    m.uid, m.host
                ),
            );
            let before = self.queued;
            self.settle(id, Outcome::Err(error), &m.host, comm);
            if self.queued > before {
                requeued += 1;
            } else {
                failed += 1;
            }
        }
        comm.notice(Notice::Lost {
            id: mid,
            uid: m.uid,
            host: m.host,
            reason: reason.to_string(),
            requeued,
            failed,
        });
    }

    /// Ask a manager to drain: it gets no new tasks and is released once it holds none.
    pub fn drain_manager(&mut self, mid: ManagerId, comm: &mut impl Comm) {
        let Some(m) = self.managers.get_mut(&mid) else {
            return;
        };
        m.draining = true;
        comm.send(&m.peer, &InterchangeToManager::Drain);
        self.release_if_drained(mid, comm);
    }

    fn release_if_drained(&mut self, mid: ManagerId, comm: &mut impl Comm) {
        let done =
            matches!(self.managers.get(&mid), Some(m) if m.draining && m.inflight.is_empty());
        if done {
            let m = self.managers.remove(&mid).expect("checked above");
            self.peers.remove(&m.peer);
            comm.send(&m.peer, &InterchangeToManager::Drained);
            comm.notice(Notice::Drained {
                id: mid,
                uid: m.uid,
            });
        }
    }

    /// Drain every manager of a block: they get no new tasks and are released (and exit) once
    /// they hold none.
    pub fn drain_block(&mut self, block: BlockId, comm: &mut impl Comm) {
        let ids: Vec<ManagerId> = self
            .managers
            .iter()
            .filter(|(_, m)| m.block_id == Some(block) && !m.draining)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.drain_manager(id, comm);
        }
    }

    /// Tell every manager to exit now.
    pub fn shutdown_all(&mut self, reason: &str, comm: &mut impl Comm) {
        for m in self.managers.values() {
            comm.send(
                &m.peer,
                &InterchangeToManager::Shutdown {
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// Queue, running and manager counts.
    pub fn counts(&self) -> Counts {
        Counts {
            queued: self.queued,
            held: self.held,
            running: self.tasks.len() - self.queued - self.held,
            managers: self.managers.len(),
            slots: self.managers.values().map(|m| u64::from(m.slots)).sum(),
        }
    }

    /// Whether no task is queued or running.
    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// A snapshot of every registered manager.
    pub fn managers(&self, now: Instant) -> Vec<ManagerStatus> {
        let mut out: Vec<ManagerStatus> = self
            .managers
            .iter()
            .map(|(&id, m)| ManagerStatus {
                id,
                uid: m.uid.clone(),
                host: m.host.clone(),
                block_id: m.block_id,
                slots: m.slots,
                inflight: m.inflight.len(),
                completed: m.completed,
                draining: m.draining,
                idle_for: m.idle_since.map(|t| now.saturating_duration_since(t)),
                workers: m.workers.clone(),
                tenant: String::new(),
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }
}

fn cancelled() -> TaskError {
    TaskError::new(ErrorKind::Cancelled, "Cancelled", "the task was cancelled")
}
