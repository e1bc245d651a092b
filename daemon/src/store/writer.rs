//! The writer thread: group commit of everything that changes the store.
//!
//! Each round takes every command that has arrived (up to a bound), runs them in one
//! transaction and commits once. Only after the commit are submits answered and their tasks
//! handed to the interchanges; results and dispatch records that could not be committed (disk
//! full, I/O error) are kept and retried, so nothing the interchange reported is lost while the
//! store is unavailable. A task's outcome is written only if the task is not yet terminal, so
//! each outcome is recorded exactly once. The statements of one round are in [`super::txn`].

mod room;

use super::txn::{Ctx, Staged};
use super::{now, State, StoreError};
use fnx_interchange::{Finished, Handle, NewTask};
use fnx_protocol::{Attempt, FunctionBody, FunctionDef, FunctionId, Payload, TaskId};
use room::is_full;
use rusqlite::{params, Connection};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Most commands in one group commit.
const MAX_COMMANDS: usize = 2048;
/// How soon results that could not be committed are tried again.
const RETRY: Duration = Duration::from_millis(250);

/// A task as submitted, validated by the API.
pub struct TaskInput {
    /// Function.
    pub function: FunctionId,
    /// Pool (validated).
    pub pool: String,
    /// Priority.
    pub priority: i32,
    /// Walltime per attempt.
    pub walltime_ms: Option<u64>,
    /// Retries after infrastructure failures.
    pub retries: u32,
    /// Arguments.
    pub args: Payload,
    /// Input files.
    pub files: Vec<fnx_protocol::TaskFile>,
    /// Its own memory limit in MiB.
    pub memory_mb: Option<u32>,
}

/// The answer to a submit.
#[derive(Debug)]
pub struct Submitted {
    /// Task ids, in request order.
    pub ids: Vec<TaskId>,
    /// The request repeated an earlier one with the same idempotency key; nothing was created.
    pub replayed: bool,
}

/// A function to register.
pub struct FunctionInput {
    /// Owner.
    pub owner: String,
    /// Name ("" for the default `<kind>-<id>`).
    pub name: String,
    /// Registration time (the API answers with it, so it is stored as given).
    pub created: f64,
    /// The API record (without id, owner, created_at).
    pub spec: fnx_api::FunctionSpec,
    /// What managers run (None for kinds that cannot run yet).
    pub body: Option<FunctionBody>,
    /// The container its tasks run in.
    pub container: Option<fnx_protocol::FunctionContainer>,
    /// The key of the image build its tasks wait for: it is added to the pools held.
    pub build: Option<String>,
}

type SubmitReply = oneshot::Sender<Result<Submitted, StoreError>>;
type RegisterReply = oneshot::Sender<Result<FunctionId, StoreError>>;
type DeleteReply = oneshot::Sender<Result<(), StoreError>>;
type SubmitReq = (
    String,
    Vec<TaskInput>,
    Option<(String, String)>,
    SubmitReply,
);
type RegisterReq = (Box<FunctionInput>, RegisterReply);
/// A failed transaction: the error, and the requests to answer with it.
type Failed = (StoreError, Vec<SubmitReq>, Vec<RegisterReq>);

/// Something for the writer to do.
pub enum Cmd {
    /// Persist a batch of tasks, then answer and hand them to the interchanges.
    Submit {
        /// Owner.
        owner: String,
        /// The tasks.
        tasks: Vec<TaskInput>,
        /// Idempotency key, with the fingerprint (a hash) of the request's body: the same key
        /// with another body is refused, never taken for a repeat (FAULTS.md 34).
        key: Option<(String, String)>,
        /// The answer.
        reply: SubmitReply,
    },
    /// Tasks were handed to managers (and whether each went to an idle slot: it started).
    Dispatched(Vec<(TaskId, Attempt, bool)>),
    /// These attempts started on their managers.
    Started(Vec<(TaskId, Attempt)>),
    /// Tasks finished.
    Finished(Vec<Finished>),
    /// Register a function.
    Register(Box<FunctionInput>, RegisterReply),
    /// Delete a function.
    Delete(FunctionId, DeleteReply),
    /// A user was sent their results with completion sequence numbers in `(after, upto]`.
    Fetched {
        /// The user.
        owner: String,
        /// The page starts after this sequence number.
        after: u64,
        /// The page ends with this sequence number.
        upto: u64,
    },
    /// These finished tasks were read by their owner.
    FetchedIds(Vec<TaskId>),
    /// A rare administrative write (tokens), run on the writer's connection after the round's
    /// group commit, in its own transaction; it answers through whatever it captured.
    Exec(Box<dyn FnOnce(&rusqlite::Connection) + Send>),
}

/// Per-user task counts.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct UserCounts {
    /// Waiting.
    pub queued: u64,
    /// Handed to managers.
    pub running: u64,
    /// Terminal, still in the store.
    pub finished: u64,
    /// Bytes of arguments and files of the unfinished ones (shown as `quota` in the status).
    #[serde(skip)]
    pub bytes: u64,
}

impl UserCounts {
    fn slot(&mut self, s: State) -> &mut u64 {
        match s {
            State::Queued => &mut self.queued,
            State::Running => &mut self.running,
            _ => &mut self.finished,
        }
    }
}

/// Counters shared with the API (status, metrics, health).
#[derive(Default)]
pub struct Stats {
    /// Per-user counts.
    pub users: HashMap<String, UserCounts>,
    /// Tasks accepted since start.
    pub submitted_total: u64,
    /// Tasks finished since start: success, failed, cancelled.
    pub finished_total: [u64; 3],
    /// Group commits.
    pub commits: u64,
    /// Failed commits.
    pub commit_errors: u64,
    /// Why the last commit failed, while the store is unavailable.
    pub unavailable: Option<String>,
    /// (time, finished_total sum) samples for the completion rate.
    pub rate_samples: VecDeque<(Instant, u64)>,
}

impl Stats {
    /// Completions per second over the last 10 s.
    pub fn rate(&self) -> f64 {
        match (self.rate_samples.front(), self.rate_samples.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// What the writer shares with the API.
pub struct Shared {
    /// Counters.
    pub stats: Mutex<Stats>,
    /// The highest committed completion sequence number.
    pub seq: watch::Sender<u64>,
    /// Per user with a long-poll open at some time: the completion number of the last commit
    /// that gave the user a result. Long-polls wait on their own user's, so that another
    /// user's results neither wake them nor cost a store query.
    pub by_user: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Shared {
    /// Shared state around `stats`, with no results committed yet.
    pub fn new(stats: Stats) -> Shared {
        Shared {
            stats: Mutex::new(stats),
            seq: watch::channel(0).0,
            by_user: Mutex::new(HashMap::new()),
        }
    }

    /// What a long-poll of `user`'s results waits on: changes when a commit gives the user a
    /// result. Subscribe before reading the store, so that no commit falls in between.
    pub fn results_of(&self, user: &str) -> watch::Receiver<u64> {
        let mut by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        match by_user.get(user) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(*self.seq.borrow());
                by_user.insert(user.to_string(), tx);
                rx
            }
        }
    }
}

/// Settings of the writer.
pub struct WriterConfig {
    /// Most unfinished tasks of one user.
    pub max_queued_per_user: u64,
    /// Most bytes of arguments and files of one user's unfinished tasks.
    pub max_queued_bytes_per_user: u64,
    /// Store size limit, for the error message.
    pub max_size_bytes: Option<u64>,
    /// Results are pruned this long after they were fetched.
    pub result_retention: Duration,
    /// Results never fetched are pruned after this long.
    pub unfetched_retention: Duration,
    /// How often to prune.
    pub prune_interval: Duration,
    /// fsync every commit that carries something acknowledged or an outcome (`store.sync`).
    pub full_sync: bool,
    /// Tasks go to their owner's tenant in the interchange (`users.mode = "unix"`: only the
    /// owner's managers run them); otherwise to the shared tenant.
    pub per_user: bool,
    /// Inputs larger than this stay in the store until dispatch (`limits.spill_kb`).
    pub spill_bytes: u64,
}

impl WriterConfig {
    /// The writer's settings in a site's configuration.
    pub fn of_site(cfg: &crate::config::SiteConfig) -> WriterConfig {
        WriterConfig {
            max_queued_per_user: cfg.limits.max_queued_per_user,
            max_queued_bytes_per_user: cfg.limits.max_queued_bytes_per_user,
            max_size_bytes: cfg.store.max_size_bytes,
            result_retention: cfg.store.result_retention,
            unfetched_retention: cfg.store.unfetched_retention,
            prune_interval: cfg.store.prune_interval,
            full_sync: cfg.store.sync == crate::config::SyncMode::Full,
            per_user: cfg.users.mode == crate::config::UsersMode::Unix,
            spill_bytes: cfg.limits.spill_bytes,
        }
    }
}

/// The writer's state.
pub struct Writer {
    conn: Connection,
    cfg: WriterConfig,
    shared: Arc<Shared>,
    pools: HashMap<String, Arc<Handle>>,
    next_task: u64,
    next_seq: u64,
    next_function: u64,
    synced: bool,
    pending_dispatched: Vec<(TaskId, Attempt, bool)>,
    pending_started: Vec<(TaskId, Attempt)>,
    pending_finished: Vec<Finished>,
    /// A commit failed because the store was full, and no task committed since: the bytes the
    /// refused submits need (see `available_again`).
    full: Option<u64>,
    /// Bytes of task inputs freed here (left in the store) since the allocator last gave
    /// freed memory back to the kernel.
    spilled: u64,
}

/// Freed inputs after which the allocator is asked to give memory back while submits go on
/// (an idle writer asks at once).
const TRIM_AFTER_BYTES: u64 = 256 << 20;

#[derive(Default)]
pub(super) struct Effects {
    replies: Vec<(SubmitReply, Submitted)>,
    rejected: Vec<(SubmitReply, StoreError)>,
    /// New tasks per (pool, tenant).
    to_interchange: HashMap<(String, String), Vec<NewTask>>,
    registered: Vec<(RegisterReply, FunctionId, Box<FunctionInput>)>,
    deleted: Vec<(FunctionId, DeleteReply)>,
    /// Per-user counter moves: (owner, from, to, change of the bytes of unfinished tasks).
    pub(super) moves: Vec<(String, Option<State>, State, i64)>,
    /// Outcomes recorded: success, failed, cancelled.
    pub(super) finished_states: [u64; 3],
    submitted: u64,
    /// Bytes of inputs left in the store and freed.
    spilled: u64,
}

fn max_id(conn: &Connection, sql: &str) -> Result<u64, StoreError> {
    Ok(conn
        .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?
        .unwrap_or(0) as u64)
}

impl Writer {
    /// A writer over an open store. After a commit may have been lost (`after_loss`: a torn log
    /// tail), task and function ids and result numbers skip far ahead, so that an id a client
    /// was given for a lost task never names another task, and no cursor passes new results.
    pub fn new(
        conn: Connection,
        cfg: WriterConfig,
        shared: Arc<Shared>,
        pools: HashMap<String, Arc<Handle>>,
        after_loss: bool,
    ) -> Result<Writer, StoreError> {
        let gap = if after_loss { 1 << 32 } else { 0 };
        let next_task = max_id(&conn, "SELECT max(id) FROM tasks")? + 1 + gap;
        let next_seq = max_id(&conn, "SELECT max(seq) FROM tasks")? + 1 + gap;
        let next_function = max_id(&conn, "SELECT max(id) FROM functions")? + 1 + (gap >> 12);
        let _ = shared.seq.send_replace(next_seq - 1);
        Ok(Writer {
            conn,
            cfg,
            shared,
            pools,
            next_task,
            next_seq,
            next_function,
            synced: true,
            pending_dispatched: Vec::new(),
            pending_started: Vec::new(),
            pending_finished: Vec::new(),
            full: None,
            spilled: 0,
        })
    }

    /// Run until every sender of `rx` is gone, then commit what is pending and return.
    pub fn run(mut self, rx: Receiver<Cmd>) {
        let mut next_prune = Instant::now() + self.cfg.prune_interval;
        loop {
            let retrying = !self.pending_finished.is_empty()
                || !self.pending_dispatched.is_empty()
                || !self.pending_started.is_empty();
            let wait = if retrying {
                RETRY
            } else if self.spilled > 0 || self.full.is_some() {
                next_prune
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1))
            } else {
                next_prune.saturating_duration_since(Instant::now())
            };
            let mut cmds = Vec::new();
            let closed = match rx.recv_timeout(wait) {
                Ok(c) => {
                    cmds.push(c);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            while cmds.len() < MAX_COMMANDS {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let idle = cmds.is_empty();
            if !idle || retrying {
                self.round(cmds);
            } else if self.full.is_some_and(|need| self.has_room(need)) {
                // Nothing to commit, but space came back: health turns green without waiting
                // for the next submit.
                self.mark_available();
            }
            if self.spilled >= TRIM_AFTER_BYTES || (idle && self.spilled > 0) {
                fnx_sys::memory::release_free_memory();
                self.spilled = 0;
            }
            if Instant::now() >= next_prune {
                self.prune();
                next_prune = Instant::now() + self.cfg.prune_interval;
            }
            if closed {
                if !self.pending_finished.is_empty() {
                    tracing::error!(
                        "{} results could not be committed before shutdown; those tasks will run again after restart",
                        self.pending_finished.len()
                    );
                }
                return;
            }
        }
    }

    fn round(&mut self, cmds: Vec<Cmd>) {
        let mut submits = Vec::new();
        let mut registers = Vec::new();
        let mut deletes = Vec::new();
        let mut fetched = Vec::new();
        let mut fetched_ids = Vec::new();
        let mut execs = Vec::new();
        for c in cmds {
            match c {
                Cmd::Submit {
                    owner,
                    tasks,
                    key,
                    reply,
                } => submits.push((owner, tasks, key, reply)),
                Cmd::Dispatched(d) => self.pending_dispatched.extend(d),
                Cmd::Started(d) => self.pending_started.extend(d),
                Cmd::Finished(f) => self.pending_finished.extend(f),
                Cmd::Register(f, reply) => registers.push((f, reply)),
                Cmd::Delete(id, reply) => deletes.push((id, reply)),
                Cmd::Fetched { owner, after, upto } => fetched.push((owner, after, upto)),
                Cmd::FetchedIds(ids) => fetched_ids.extend(ids),
                Cmd::Exec(f) => execs.push(f),
            }
        }
        // A commit of dispatch records and fetch marks alone is not worth an fsync: losing it in a
        // power failure only makes a task run again. Everything else is fsynced (store.sync).
        let must_sync = self.cfg.full_sync
            && !(submits.is_empty()
                && registers.is_empty()
                && deletes.is_empty()
                && self.pending_finished.is_empty());
        if must_sync != self.synced {
            let mode = if must_sync { "FULL" } else { "NORMAL" };
            if self.conn.pragma_update(None, "synchronous", mode).is_ok() {
                self.synced = must_sync;
            }
        }
        let saved = (self.next_task, self.next_seq, self.next_function);
        let mut fx = Effects::default();
        let started = Instant::now();
        let result = self.transaction(
            submits,
            registers,
            &mut deletes,
            &fetched,
            &fetched_ids,
            &mut fx,
        );
        match result {
            Ok(()) => {
                self.pending_dispatched.clear();
                self.pending_started.clear();
                self.pending_finished.clear();
                self.apply(fx);
                let took = started.elapsed();
                if took > Duration::from_secs(1) {
                    tracing::warn!("a group commit took {:.1} s", took.as_secs_f64());
                }
            }
            Err((e, submits_back, registers_back)) => {
                (self.next_task, self.next_seq, self.next_function) = saved;
                let msg = self.describe(&e);
                if is_full(&e) {
                    // What the refused submits would take, with SQLite's own overhead: the
                    // room to wait for before health turns green without a submit.
                    let need: u64 = submits_back
                        .iter()
                        .flat_map(|(_, tasks, _, _)| tasks)
                        .map(|t| super::inputs::input_bytes(&t.args, &t.files))
                        .sum();
                    let before = self.full.unwrap_or(0);
                    self.full = Some(before.max(need.saturating_mul(2)));
                }
                let first = {
                    let mut s = self.shared.stats.lock().expect("stats");
                    s.commit_errors += 1;
                    s.unavailable.replace(msg.clone()).is_none()
                };
                if first {
                    tracing::error!("the store cannot commit: {msg}; submits get 503 until it can");
                }
                for (_, _, _, reply) in submits_back {
                    let _ = reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
                for (_, reply) in registers_back {
                    let _ = reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
                for (_, reply) in deletes {
                    let _ = reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
                for (reply, err) in fx.rejected {
                    let _ = reply.send(Err(err));
                }
            }
        }
        for f in execs {
            f(&self.conn);
        }
    }

    fn transaction(
        &mut self,
        submits: Vec<SubmitReq>,
        registers: Vec<RegisterReq>,
        deletes: &mut Vec<(FunctionId, DeleteReply)>,
        fetched: &[(String, u64, u64)],
        fetched_ids: &[TaskId],
        fx: &mut Effects,
    ) -> Result<(), Failed> {
        let per_user = self.cfg.per_user;
        let spill_bytes = self.cfg.spill_bytes;
        let tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(e) => return Err((e.into(), submits, registers)),
        };
        let t = now();
        let mut ctx = Ctx {
            next_task: &mut self.next_task,
            next_seq: &mut self.next_seq,
            next_function: &mut self.next_function,
            shared: &self.shared,
            limit: self.cfg.max_queued_per_user,
            byte_limit: self.cfg.max_queued_bytes_per_user,
            t,
        };
        // Submits and registrations are consumed only when the whole transaction succeeds; on
        // failure they are handed back so that their callers get the error.
        let mut staged_submits = Vec::new();
        let mut staged_registers = Vec::new();
        let mut live_extra: HashMap<String, (u64, u64)> = HashMap::new();
        let body = (|| -> Result<(), StoreError> {
            for (f, _) in &registers {
                staged_registers.push(ctx.register(&tx, f)?);
            }
            for (id, _) in deletes.iter() {
                tx.execute(
                    "UPDATE functions SET deleted = 1 WHERE id = ?1",
                    [id.0 as i64],
                )?;
            }
            for (owner, tasks, key, _) in &submits {
                staged_submits.push(ctx.submit(
                    &tx,
                    owner,
                    tasks,
                    key.as_ref().map(|(k, f)| (k.as_str(), f.as_str())),
                    &mut live_extra,
                )?);
            }
            ctx.dispatched(&tx, &self.pending_dispatched, fx)?;
            // A task that also ends in this commit needs no start mark (most short tasks: they
            // start and end between two commits).
            if !self.pending_started.is_empty() {
                let ended: std::collections::HashSet<(TaskId, Attempt)> = self
                    .pending_finished
                    .iter()
                    .map(|f| (f.id, f.attempt))
                    .collect();
                let running: Vec<(TaskId, Attempt)> = self
                    .pending_started
                    .iter()
                    .copied()
                    .filter(|t| !ended.contains(t))
                    .collect();
                ctx.started(&tx, &running)?;
            }
            ctx.finished(&tx, &self.pending_finished, fx)?;
            ctx.fetched(&tx, fetched, fetched_ids)?;
            Ok(())
        })();
        let committed = body.and_then(|()| tx.commit().map_err(StoreError::from));
        if let Err(e) = committed {
            return Err((e, submits, registers));
        }
        for ((f, reply), id) in registers.into_iter().zip(staged_registers) {
            fx.registered.push((reply, id, f));
        }
        for (id, reply) in deletes.drain(..) {
            fx.deleted.push((id, reply));
        }
        for ((owner, tasks, _, reply), staged) in submits.into_iter().zip(staged_submits) {
            match staged {
                Staged::Rejected(err) => fx.rejected.push((reply, err)),
                Staged::Replayed(ids) => fx.replies.push((
                    reply,
                    Submitted {
                        ids,
                        replayed: true,
                    },
                )),
                Staged::Created(first, bytes) => {
                    let n = tasks.len() as u64;
                    let ids: Vec<TaskId> = (first..first + n).map(TaskId).collect();
                    fx.submitted += n;
                    // The submit's bytes ride on its first move.
                    let first_move = fx.moves.len();
                    fx.moves.extend(std::iter::repeat_n(
                        (owner.clone(), None, State::Queued, 0),
                        tasks.len(),
                    ));
                    if let Some(m) = fx.moves.get_mut(first_move) {
                        m.3 = bytes as i64;
                    }
                    for (task, id) in tasks.into_iter().zip(&ids) {
                        let tenant = if per_user {
                            owner.clone()
                        } else {
                            String::new()
                        };
                        fx.to_interchange
                            .entry((task.pool.clone(), tenant))
                            .or_default()
                            .push({
                                let mut t = NewTask {
                                    id: *id,
                                    function: task.function,
                                    args: task.args,
                                    priority: task.priority,
                                    walltime_ms: task.walltime_ms,
                                    retries: task.retries,
                                    attempt: Attempt(0),
                                    files: task.files,
                                    stored: None,
                                    memory_mb: task.memory_mb,
                                };
                                fx.spilled += super::inputs::spill(&mut t, spill_bytes);
                                t
                            });
                    }
                    fx.replies.push((
                        reply,
                        Submitted {
                            ids,
                            replayed: false,
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, fx: Effects) {
        self.spilled += fx.spilled;
        if self.unavailable() && self.available_again(fx.submitted > 0) {
            self.mark_available();
        }
        {
            let mut s = self.shared.stats.lock().expect("stats");
            s.commits += 1;
            s.submitted_total += fx.submitted;
            for (i, n) in fx.finished_states.iter().enumerate() {
                s.finished_total[i] += n;
            }
            for (owner, from, to, delta) in &fx.moves {
                // Looked up before inserting: no copy of the name per task.
                if !s.users.contains_key(owner) {
                    s.users.insert(owner.clone(), UserCounts::default());
                }
                let Some(c) = s.users.get_mut(owner) else {
                    continue;
                };
                c.bytes = c.bytes.saturating_add_signed(*delta);
                if let Some(from) = from {
                    let slot = c.slot(*from);
                    *slot = slot.saturating_sub(1);
                }
                *c.slot(*to) += 1;
            }
            let total: u64 = s.finished_total.iter().sum();
            let now = Instant::now();
            s.rate_samples.push_back((now, total));
            while s.rate_samples.len() > 2
                && now.duration_since(s.rate_samples[0].0) > Duration::from_secs(10)
            {
                s.rate_samples.pop_front();
            }
        }
        // Functions first, so that tasks referring to them find them.
        for (reply, id, f) in fx.registered {
            if let Some(body) = f.body {
                let def = FunctionDef {
                    id,
                    body,
                    container: f.container,
                    // Shared managers (service mode) keep each user's workers apart; in unix
                    // mode every manager serves one user already.
                    owner: (!self.cfg.per_user).then(|| f.owner.clone()),
                };
                for h in self.pools.values() {
                    h.add_function(def.clone());
                    if f.build.is_some() {
                        h.hold_function(id);
                    }
                }
            }
            let _ = reply.send(Ok(id));
        }
        for ((pool, tenant), tasks) in fx.to_interchange {
            if let Some(h) = self.pools.get(&pool) {
                h.submit_as(&tenant, tasks);
            }
        }
        // After the submits of this round: a task submitted just before its function's
        // delete keeps the function until it ends.
        for (id, reply) in fx.deleted {
            for h in self.pools.values() {
                h.remove_function(id);
            }
            let _ = reply.send(Ok(()));
        }
        for (reply, s) in fx.replies {
            let _ = reply.send(Ok(s));
        }
        for (reply, err) in fx.rejected {
            let _ = reply.send(Err(err));
        }
        let seq = self.next_seq - 1;
        let _ = self.shared.seq.send_replace(seq);
        let by_user = self
            .shared
            .by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (owner, _, to, _) in &fx.moves {
            if let Some(tx) = by_user.get(owner).filter(|_| to.is_terminal()) {
                tx.send_replace(seq);
            }
        }
    }

    fn prune(&mut self) {
        let t = now();
        let fetched_before = t - self.cfg.result_retention.as_secs_f64();
        let finished_before = t - self.cfg.unfetched_retention.as_secs_f64();
        let res = (|| -> Result<Vec<String>, StoreError> {
            let tx = self.conn.transaction()?;
            let owners = {
                let mut st = tx.prepare(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state >= 2 AND
                     ((fetched IS NOT NULL AND fetched < ?1) OR finished < ?2) LIMIT 50000)
                     RETURNING owner",
                )?;
                let rows = st.query_map(params![fetched_before, finished_before], |r| r.get(0))?;
                rows.collect::<Result<Vec<String>, _>>()?
            };
            tx.execute("DELETE FROM idempotency WHERE created < ?1", [t - 86400.0])?;
            tx.commit()?;
            Ok(owners)
        })();
        match res {
            Ok(owners) if !owners.is_empty() => {
                tracing::info!("pruned {} old results", owners.len());
                let mut s = self.shared.stats.lock().expect("stats");
                for o in owners {
                    let c = s.users.entry(o).or_default();
                    c.finished = c.finished.saturating_sub(1);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning old results failed: {e}"),
        }
    }
}
