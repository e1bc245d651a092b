//! One enum per direction of the manager ⇄ interchange link.
//!
//! A connection starts with [`ManagerToInterchange::Register`]; the interchange answers
//! [`InterchangeToManager::Registered`] or [`InterchangeToManager::Rejected`]. The protocol
//! version travels in every frame's envelope (see [`crate::frame`]), so a mismatch is detected
//! on the first message and refused with both versions named.

use crate::ids::{Attempt, BlockId, ManagerId, TaskId};
use crate::task::{FunctionDef, TaskResult, TaskSpec};
use serde::{Deserialize, Serialize};

/// The first message a manager sends on a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// A name for this manager process chosen by whoever launched it (unique per launch).
    pub uid: String,
    /// Host name of the node.
    pub host: String,
    /// Process id of the manager on its node.
    pub pid: u32,
    /// CPU cores the manager may use.
    pub cores: u32,
    /// Tasks it runs at once (worker slots).
    pub slots: u32,
    /// Extra tasks it accepts beyond `slots`, queued locally to hide the round trip.
    pub prefetch: u32,
    /// The block (batch job) it belongs to, if it was started by a provider.
    pub block_id: Option<BlockId>,
    /// Whether it completes tasks without running them (overhead measurement).
    pub zero_work: bool,
    /// The fnx version of the manager binary.
    pub fnx_version: String,
}

/// Messages from a manager to the interchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagerToInterchange {
    /// Announce this manager and its capacity; must be the first message.
    Register(Register),
    /// Liveness signal, sent every heartbeat period from a thread that never runs user work.
    Heartbeat,
    /// Outcomes of finished attempts, batched.
    Results(Vec<TaskResult>),
    /// The manager wants no more tasks (e.g. its allocation is about to end); it finishes what
    /// it holds and waits for [`InterchangeToManager::Drained`].
    Drain,
    /// The manager is exiting now; the tasks it still holds will not finish there.
    Bye {
        /// Why it exits.
        reason: String,
    },
    /// Answer to [`InterchangeToManager::Reclaim`]: these attempts were queued on the manager,
    /// never started, and are given back (the list may be empty).
    Returned(Vec<(TaskId, Attempt)>),
    /// The manager's Python workers per environment (container), sent when they change: the
    /// interchange routes tasks to managers that have warm workers of their environment.
    Warm(Vec<WarmWorkers>),
    /// These attempts started running (they left the manager's own queue), batched with
    /// results: a daemon crash counts against a task only if it had started.
    Started(Vec<(TaskId, Attempt)>),
}

impl ManagerToInterchange {
    /// The message's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ManagerToInterchange::Register(_) => "register",
            ManagerToInterchange::Heartbeat => "heartbeat",
            ManagerToInterchange::Results(_) => "results",
            ManagerToInterchange::Drain => "drain",
            ManagerToInterchange::Bye { .. } => "bye",
            ManagerToInterchange::Returned(_) => "returned",
            ManagerToInterchange::Warm(_) => "warm",
            ManagerToInterchange::Started(_) => "started",
        }
    }
}

/// A manager's Python workers of one environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmWorkers {
    /// The environment: a function container's key ([`crate::FunctionDef::env`]), `""` for
    /// the pool's own workers.
    pub env: String,
    /// Live workers (idle or busy) of this environment now.
    pub workers: u32,
    /// Workers of this environment started so far (container starts, for a container).
    pub starts: u64,
}

/// Messages from the interchange to a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterchangeToManager {
    /// Registration accepted.
    Registered {
        /// The id the interchange gave this manager.
        manager: ManagerId,
        /// How often the manager must send heartbeats, in milliseconds.
        heartbeat_period_ms: u64,
        /// After how long without any message each side declares the other lost.
        heartbeat_threshold_ms: u64,
    },
    /// Registration refused; the manager must exit with this reason.
    Rejected {
        /// Why, naming both sides' values where versions differ.
        reason: String,
    },
    /// Tasks to run, with the bodies of functions this manager has not been sent before.
    Tasks {
        /// Function bodies new to this manager.
        functions: Vec<FunctionDef>,
        /// The tasks, in dispatch order.
        tasks: Vec<TaskSpec>,
    },
    /// Answer to a manager heartbeat.
    Heartbeat,
    /// Kill these attempts if they are running or queued and report them `cancelled`.
    Cancel {
        /// The attempts to cancel.
        tasks: Vec<(TaskId, Attempt)>,
    },
    /// Give back up to `max` tasks held but not started (prefetched), so that idle workers
    /// elsewhere can run them; answered by [`ManagerToInterchange::Returned`].
    Reclaim {
        /// Most tasks to give back.
        max: u32,
    },
    /// Stop taking new tasks; finish the ones held. `Drained` follows when none are left.
    Drain,
    /// The manager holds no more tasks and should exit.
    Drained,
    /// Exit now, killing any running tasks.
    Shutdown {
        /// Why.
        reason: String,
    },
    /// This interchange does not know the manager (it restarted since the manager registered):
    /// register again. Running tasks go on; their results, from attempts the restarted
    /// interchange has superseded, are discarded there.
    Reregister {
        /// Why.
        reason: String,
    },
}
