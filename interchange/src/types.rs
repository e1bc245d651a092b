//! The interchange's public data types: configuration, what goes in (tasks), what comes out
//! (finished tasks, notices, the `Comm` trait), and status snapshots.

use fnx_protocol::{
    Attempt, BlockId, FunctionId, InterchangeToManager, ManagerId, Outcome, Payload, TaskFile,
    TaskId, TaskSpec,
};
use std::time::Duration;

/// The routing identity of a connected peer (opaque bytes chosen by the transport).
pub type Peer = Vec<u8>;

/// Tunables of the dispatcher.
#[derive(Clone, Debug)]
pub struct Config {
    /// Heartbeat period managers are told to use.
    pub heartbeat_period: Duration,
    /// Silence after which a manager is declared lost.
    pub heartbeat_threshold: Duration,
    /// Most tasks in one `Tasks` message.
    pub max_batch_tasks: usize,
    /// Most argument bytes in one `Tasks` message (a single larger task still goes alone).
    pub max_batch_bytes: usize,
    /// Largest accepted argument payload of one task.
    pub max_payload_bytes: usize,
    /// Warm routing: a task of an environment a manager has warm may be dispatched before a
    /// queued task of another environment that is at most this many places older (see
    /// [`crate::routing`]).
    pub warm_window: u64,
    /// The fnx release managers must be (None: any).
    pub release: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_period: Duration::from_secs(5),
            heartbeat_threshold: Duration::from_secs(30),
            max_batch_tasks: 4096,
            max_batch_bytes: 8 << 20,
            max_payload_bytes: 10 << 20,
            warm_window: 4096,
            release: Some(env!("CARGO_PKG_VERSION").to_string()),
        }
    }
}

/// A task handed to the interchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTask {
    /// Its id, unique among the tasks this interchange holds.
    pub id: TaskId,
    /// The function to run (registered with [`Interchange::add_function`]).
    pub function: FunctionId,
    /// Its arguments.
    pub args: Payload,
    /// Higher runs first.
    pub priority: i32,
    /// Per-attempt walltime in milliseconds.
    pub walltime_ms: Option<u64>,
    /// How many times it may be re-dispatched after an infrastructure failure.
    pub retries: u32,
    /// Attempts already made (0 for a new task); the next dispatch is `attempt + 1`. A daemon
    /// that restarts passes the last recorded attempt, so results of an attempt dispatched
    /// before the restart can never be taken for the new one.
    pub attempt: Attempt,
    /// Input files placed in the task's working directory on the node.
    pub files: Vec<TaskFile>,
    /// The inputs stay in the host's store: `Some(bytes)` (arguments and inline files
    /// together) means `args.data` and `files` are left empty here and are read through
    /// [`Comm::load`] each time the task is dispatched, so a large queue costs the host no
    /// memory for its payloads.
    pub stored: Option<u64>,
    /// The task's own memory limit in MiB (None: the pool's).
    pub memory_mb: Option<u32>,
}

/// The inputs of a task kept in the host's store (see [`NewTask::stored`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// Its arguments.
    pub args: Payload,
    /// Its input files.
    pub files: Vec<TaskFile>,
}

/// Why stored inputs could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The store has no such unfinished task.
    #[error("the store holds no inputs for this task")]
    Missing,
    /// Reading failed for now (the disk, a lock): tried again at a later dispatch.
    #[error("reading the store failed: {0}")]
    Store(String),
    /// The stored inputs are damaged: they will never read.
    #[error("the stored inputs are damaged: {0}")]
    Damaged(String),
    /// This host keeps no inputs in a store.
    #[error("this host keeps no task inputs in a store")]
    NoStore,
}

/// A task reached its terminal state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The task.
    pub id: TaskId,
    /// The attempt that produced the outcome (the number of dispatches so far; 0 if never sent).
    pub attempt: Attempt,
    /// What happened.
    pub outcome: Outcome,
}

/// What the interchange tells the world.
pub trait Comm {
    /// Send a message to a connected peer.
    fn send(&mut self, to: &Peer, msg: &InterchangeToManager);
    /// A task is done (success, failure or cancelled); reported exactly once per task.
    fn finished(&mut self, done: Finished);
    /// Something an operator should know (registration, loss, refusals). Also logged.
    fn notice(&mut self, notice: Notice);
    /// Tasks were handed to a manager (called just before the `Tasks` message is sent), so a
    /// host that records task states can mark them running with their attempt numbers. The
    /// first `direct` of them went to idle worker slots and start at once; the others wait in
    /// the manager's queue until it reports their start ([`Comm::started`]).
    fn dispatched(&mut self, _manager: ManagerId, _tasks: &[TaskSpec], _direct: usize) {}
    /// Attempts a manager reports it started (they left its own queue and run).
    fn started(&mut self, _tasks: &[(TaskId, Attempt)]) {}
    /// Read the inputs of tasks submitted with [`NewTask::stored`], one answer per id in
    /// order. A task whose inputs are gone or damaged fails as `bad_input`
    /// (`InputsUnreadable`); one the store cannot read for now waits for a later dispatch.
    fn load(&mut self, ids: &[TaskId]) -> Vec<Result<Inputs, LoadError>> {
        ids.iter().map(|_| Err(LoadError::NoStore)).collect()
    }
}

/// Events about managers, for logs, status and the embedded runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A manager registered.
    Registered {
        /// Its id.
        id: ManagerId,
        /// The name its launcher gave it.
        uid: String,
        /// Its host.
        host: String,
        /// Its worker slots.
        slots: u32,
    },
    /// A registration was refused.
    Refused {
        /// The name the peer gave, if it could be read.
        uid: Option<String>,
        /// Why.
        reason: String,
    },
    /// A manager was lost; its tasks were retried or failed.
    Lost {
        /// Its id.
        id: ManagerId,
        /// The name its launcher gave it.
        uid: String,
        /// Its host.
        host: String,
        /// Why it was declared lost.
        reason: String,
        /// How many of its tasks were queued again.
        requeued: usize,
        /// How many of its tasks failed as `manager_lost`.
        failed: usize,
    },
    /// A manager finished draining and was released.
    Drained {
        /// Its id.
        id: ManagerId,
        /// The name its launcher gave it.
        uid: String,
    },
    /// A result was discarded: its attempt was superseded (the task was dispatched again, e.g.
    /// after its manager was declared lost or the interchange restarted) or the task is not
    /// assigned to that manager. Each task's outcome is recorded once.
    Discarded {
        /// The task.
        id: TaskId,
        /// The attempt the result came from.
        attempt: Attempt,
        /// The manager that sent it.
        manager: ManagerId,
    },
    /// A message was ignored (unknown or expired sender, malformed bytes).
    Ignored {
        /// What and why.
        reason: String,
    },
}

/// A snapshot of one manager, for status displays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerStatus {
    /// Its id.
    pub id: ManagerId,
    /// The name its launcher gave it.
    pub uid: String,
    /// Its host.
    pub host: String,
    /// Its block, if any.
    pub block_id: Option<BlockId>,
    /// Worker slots.
    pub slots: u32,
    /// Tasks it holds now.
    pub inflight: usize,
    /// Tasks it completed.
    pub completed: u64,
    /// Whether it is draining.
    pub draining: bool,
    /// How long it has held no task.
    pub idle_for: Option<Duration>,
    /// Its Python workers per environment, as it last reported them.
    pub workers: Vec<fnx_protocol::WarmWorkers>,
    /// The tenant (user) it serves; `""`: the shared tenant.
    pub tenant: String,
}

/// Counts for status displays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tasks waiting for dispatch.
    pub queued: usize,
    /// Tasks waiting for their function's container image to be built.
    pub held: usize,
    /// Tasks held by managers.
    pub running: usize,
    /// Registered managers.
    pub managers: usize,
    /// Worker slots across registered managers.
    pub slots: u64,
}
