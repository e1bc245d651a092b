//! The service's answers besides tasks and functions: errors, health, identity, status,
//! tokens, and a function's record as shown (its registration plus id, owner and build).

use crate::function::FunctionSpec;
use crate::task::TaskRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Every error answer has this shape, with the HTTP status given in the response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `bad_request`, `unauthorized`, `not_found`, `payload_too_large`,
    /// `queue_limit`, `store_unavailable`, `busy`, `identity_not_allowed`, ...
    pub code: String,
    /// What to do about it, naming the field (`tasks[3].args: ...`) where one is at fault.
    pub message: String,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` (with status 503) while the store cannot commit.
    pub status: String,
    /// The daemon's fnx version.
    pub version: String,
    /// `ok`, or `unavailable: <reason>` (answered with status 503) while the last commit
    /// failed.
    pub store: String,
}

/// `GET /v1/whoami`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    /// The user the token belongs to.
    pub user: String,
    /// Whether the token has admin rights.
    pub admin: bool,
}

/// A function as `GET /v1/functions/{id}` shows it (lists leave out `source`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FunctionRecord {
    /// Its id.
    pub id: u64,
    /// Who registered it.
    pub owner: String,
    /// When (Unix seconds).
    pub created_at: f64,
    /// Deleted: its earlier tasks still run, new ones are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Why its stored record cannot be read (its tasks are refused until it is registered
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    /// Its registration.
    #[serde(flatten)]
    pub spec: FunctionSpec,
}

/// `GET /v1/functions`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FunctionList {
    /// Your functions (admins: everyone's), without their source.
    pub functions: Vec<FunctionRecord>,
}

/// `POST /v1/tasks/status` and `POST /v1/tasks/cancel`: up to 10,000 task ids.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskIdList {
    /// Task ids.
    pub ids: Vec<u64>,
}

/// An id that does not exist or is not yours, in `POST /v1/tasks/status` answers.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UnknownTask {
    /// The id asked for.
    pub id: u64,
    /// Always `unknown` (no task's state is).
    pub state: Unknown,
}

/// The state of a task id that is not the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// Unknown.
    Unknown,
}

/// One task of a status answer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TaskStatus<'a> {
    /// A task of yours.
    #[serde(borrow)]
    Known(Box<TaskRecord<'a>>),
    /// Not a task of yours.
    Unknown(UnknownTask),
}

/// `POST /v1/tasks/status`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskStatusList<'a> {
    /// In the order asked.
    #[serde(borrow)]
    pub tasks: Vec<TaskStatus<'a>>,
}

/// Tasks by state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct TaskCounts {
    /// Waiting in the daemon.
    pub queued: u64,
    /// Handed to managers.
    pub running: u64,
    /// Finished (kept until pruned).
    pub finished: u64,
}

/// A manager's Python workers of one environment.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerEnvironment {
    /// `""` for the pool's own workers, `pool:IMAGE` for a function image with the pool's
    /// runtime, `RUNTIME:IMAGE` otherwise.
    pub container: String,
    /// Live workers of it now.
    pub workers: u64,
    /// Workers of it started since the manager started.
    pub starts: u64,
    /// The user these workers belong to; null for shared ones.
    #[serde(default)]
    pub user: Option<String>,
}

/// A connected manager: all of them for admins, a user's own otherwise.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ManagerStatus {
    /// Its id in the interchange.
    pub id: u64,
    /// The name its launcher gave it.
    pub uid: String,
    /// The user whose tasks it runs; "" for a manager shared by every user.
    pub user: String,
    /// Its host.
    pub host: String,
    /// The block (batch job) it runs in; null for local pools.
    pub block: Option<u64>,
    /// Its worker slots.
    pub workers: u64,
    /// Tasks it holds.
    pub inflight: u64,
    /// Tasks it finished.
    pub completed: u64,
    /// Seconds since it last had work.
    pub idle_s: f64,
    /// Finishing what it holds, taking nothing new.
    pub draining: bool,
    /// Its Python workers per environment, as it last reported them.
    pub environments: Vec<WorkerEnvironment>,
}

/// A batch pool's block.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BlockStatus {
    /// Block number, unique in the pool's run directory.
    pub id: u64,
    /// The batch system's job id.
    pub job: String,
    /// `pending`: submitted, no manager yet; `running`: managers connected; `draining`:
    /// scaled in or near its walltime; `ended`: the job is over.
    pub phase: String,
    /// The batch system's last word on the job (PENDING, RUNNING, COMPLETED, ...).
    pub job_state: String,
    /// Managers of this block connected now.
    pub managers: u64,
    /// Its directory.
    pub dir: String,
    /// The job's stderr file.
    pub stderr: String,
}

/// A pool. Admins see its whole load and where it runs; others what it offers, and their
/// own managers.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolStatus {
    /// Its name.
    pub name: String,
    /// `local`, `slurm`, `pbs` or `cobalt`.
    pub provider: String,
    /// `single`, `srun`, `mpiexec` or `aprun`.
    pub launcher: String,
    /// Worker slots connected.
    pub workers: u64,
    /// Managers connected.
    pub managers_connected: u64,
    /// Whether the pool is marked failed (several blocks in a row ended, or could not be
    /// submitted, without any manager connecting; cleared when one connects). Admins get the
    /// reason (a string naming the last job's stderr file, or null); others `true` or
    /// `false`.
    #[schema(value_type = Value)]
    pub failed: serde_json::Value,
    /// Admins: tasks waiting in its interchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// Admins: tasks waiting for their function's image build (not in `queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_for_images: Option<u64>,
    /// Admins: tasks its managers hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u64>,
    /// Admins: its run directory, one `block-N` directory per block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<String>,
    /// Admins: why its last block could not be submitted, until one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_error: Option<String>,
    /// Admins: live blocks, then the most recently ended ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<BlockStatus>>,
    /// Its managers (admins: all; others: their own).
    pub managers: Vec<ManagerStatus>,
}

/// The caller's own use of their queue quota.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    /// Bytes of arguments and files of their unfinished tasks.
    pub queued_bytes: u64,
    /// `limits.max_queued_mb_per_user`, in bytes.
    pub max_queued_bytes: u64,
}

/// The store (admins only).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StoreStatus {
    /// The SQLite file.
    pub path: String,
    /// Its size with its write-ahead log.
    pub size_bytes: u64,
    /// Whether the last commit succeeded.
    pub healthy: bool,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusDocument {
    /// The daemon's fnx version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Who is asking.
    pub user: String,
    /// Whether the caller is an admin.
    pub admin: bool,
    /// Your own tasks (admins: everyone's).
    pub tasks: TaskCounts,
    /// Completion rate over the last 10 s.
    pub tasks_per_s: f64,
    /// The pools.
    pub pools: Vec<PoolStatus>,
    /// Your use of your queue quota.
    pub quota: Quota,
    /// Admins only: tasks per user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<BTreeMap<String, TaskCounts>>,
    /// Admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
}

/// A token (never the token itself).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Its id (to revoke it).
    pub id: i64,
    /// Its user.
    pub user: String,
    /// Admin rights.
    pub admin: bool,
    /// Seconds since the epoch.
    pub created: f64,
    /// Seconds since the epoch; null: never.
    pub expires: Option<f64>,
    /// When it was revoked; null: it was not.
    pub revoked: Option<f64>,
    /// Neither revoked nor expired.
    pub live: bool,
}

/// `GET /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    /// Your tokens (admins: everyone's).
    pub tokens: Vec<TokenInfo>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// Default: the caller. Non-admins may only name themselves.
    #[serde(default)]
    pub user: Option<String>,
    /// Admins only.
    #[serde(default)]
    pub admin: Option<bool>,
    /// Valid for this many seconds; default: until revoked.
    #[serde(default)]
    pub expires_s: Option<f64>,
}

/// The answer to `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// Its id.
    pub id: i64,
    /// Its user.
    pub user: String,
    /// Admin rights.
    pub admin: bool,
    /// Seconds since the epoch; null: never.
    pub expires: Option<f64>,
    /// Shown once: only its hash is stored.
    pub token: String,
}
