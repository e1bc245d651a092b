//! Tasks, functions and outcomes as they travel between interchange and managers.

use crate::ids::{Attempt, FunctionId, TaskId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a payload's bytes are to be read. Rust never looks inside; workers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// UTF-8 JSON text. For arguments: an array (positional) or an object (keyword arguments).
    Json,
    /// A Python pickle. For arguments: the tuple `(args, kwargs)`.
    Pickle,
}

impl Encoding {
    /// The name used on the command line, in worker frames and in the HTTP API.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Pickle => "pickle",
        }
    }
}

/// Opaque bytes with their declared encoding (task arguments or a task's result).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// How `data` is encoded.
    pub encoding: Encoding,
    /// The encoded value.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Payload {
    /// A JSON payload from its text.
    pub fn json(text: impl Into<Vec<u8>>) -> Payload {
        Payload {
            encoding: Encoding::Json,
            data: text.into(),
        }
    }
}

/// What a function is: sent once to each manager that runs it, then cached there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionBody {
    /// A Python callable importable as `module` then attribute path `qualname`.
    PythonRef {
        /// Module name, imported with the worker's `sys.path` (cwd and `PYTHONPATH` included).
        module: String,
        /// Dotted attribute path inside the module.
        qualname: String,
    },
    /// A Python callable defined in a file on a filesystem the worker can read.
    PythonFile {
        /// Absolute path of the `.py` file.
        path: String,
        /// Dotted attribute path inside the file's module.
        name: String,
    },
    /// A Python callable given as source text.
    PythonSource {
        /// Module source defining the callable.
        source: String,
        /// Dotted attribute path of the callable inside that source.
        name: String,
    },
    /// A shell command template run by `sh -c`; each `{name}` is replaced by one argument that
    /// the shell never parses as code. Arguments travel as a JSON array of strings, in the
    /// order of first appearance of each parameter in the template.
    Shell {
        /// The command template, e.g. `gzip -k {path}`.
        template: String,
    },
}

impl FunctionBody {
    /// Whether tasks of this function run in a Python worker (as opposed to the manager itself).
    pub fn is_python(&self) -> bool {
        !matches!(self, FunctionBody::Shell { .. })
    }
}

/// A function id bound to its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// The id tasks refer to.
    pub id: FunctionId,
    /// What to run.
    pub body: FunctionBody,
    /// The container its tasks run in (`None`: the pool's container, or the host).
    pub container: Option<crate::container::FunctionContainer>,
    /// The user it belongs to, when managers serve several users (a daemon in `service`
    /// mode): workers are then never shared between users (`None`: every function of a
    /// manager may share its workers, as in `fnx map` or a manager of one user).
    pub owner: Option<String>,
}

impl FunctionDef {
    /// A function that runs wherever the pool runs its workers.
    pub fn new(id: FunctionId, body: FunctionBody) -> FunctionDef {
        FunctionDef {
            id,
            body,
            container: None,
            owner: None,
        }
    }

    /// The worker environment its tasks need: the container's key (`""` for the pool's own
    /// workers), followed by [`ENV_OWNER_SEP`] and the owner when it has one. Workers are kept
    /// warm, counted and routed to by this key, and a worker only ever runs tasks of one
    /// environment.
    pub fn env(&self) -> String {
        let container = self
            .container
            .as_ref()
            .map(crate::container::FunctionContainer::key)
            .unwrap_or_default();
        match &self.owner {
            Some(owner) => format!("{container}{ENV_OWNER_SEP}{owner}"),
            None => container,
        }
    }
}

/// Separates the container key from the owner in an environment key (a control character: it
/// is in neither, images with control characters are refused).
pub const ENV_OWNER_SEP: char = '\u{1f}';

/// The container key and the owner (if any) of an environment key.
pub fn split_env(env: &str) -> (&str, Option<&str>) {
    match env.split_once(ENV_OWNER_SEP) {
        Some((container, owner)) => (container, Some(owner)),
        None => (env, None),
    }
}

/// One attempt of one task, as sent to a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task.
    pub id: TaskId,
    /// Which attempt this dispatch is.
    pub attempt: Attempt,
    /// The function to call; its body was sent to this manager before or with this task.
    pub function: FunctionId,
    /// The arguments.
    pub args: Payload,
    /// Wall-clock limit for this attempt in milliseconds, if any.
    pub walltime_ms: Option<u64>,
    /// Input files placed in the task's own working directory before it starts.
    #[serde(default)]
    pub files: Vec<TaskFile>,
    /// The task's own memory limit in MiB (None: the pool's `mem_per_worker`, if any). Last,
    /// and left out when None: frames without it decode as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
}

/// An input file of a task. The manager places it in the task's working directory under
/// `name` (a plain file name), so the function opens it by that name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    /// File name in the task's working directory (no `/`, not `.` or `..`).
    pub name: String,
    /// Where its bytes come from.
    pub source: FileSource,
}

/// Where an input file's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSource {
    /// Small files travel with the task.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Large files stay where they are (a shared filesystem); the working directory gets a
    /// symbolic link to this absolute path.
    Path(String),
}

impl TaskFile {
    /// Check a file name: a plain name, no directory part. `Err` says what is wrong.
    pub fn check_name(name: &str) -> Result<(), FileNameError> {
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(FileNameError::NotPlain(name.to_string()));
        }
        if name.len() > 255 {
            return Err(FileNameError::TooLong);
        }
        Ok(())
    }
}

/// Why a task's file name cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileNameError {
    /// A path, `.`, `..`, empty, or with a NUL byte.
    #[error("{0:?} is not a plain file name (no '/', not '.' or '..')")]
    NotPlain(String),
    /// Longer than a file name can be.
    #[error("a file name may have at most 255 bytes")]
    TooLong,
}

/// Why a task failed. Every failure carries exactly one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The user's code raised (or a shell command exited non-zero). Never retried.
    Exception,
    /// The worker process running the task died (signal, `os._exit`, crash).
    WorkerLost,
    /// The manager holding the task was lost (process died, node gone, heartbeats missed).
    ManagerLost,
    /// The task ran past its walltime and was killed.
    Walltime,
    /// The result was larger than the configured limit.
    ResultTooLarge,
    /// The arguments were not valid for the function (bad input line, missing parameter).
    BadInput,
    /// The result could not be encoded in the requested encoding (e.g. not JSON-representable).
    NotSerializable,
    /// The function could not be imported or loaded.
    ImportError,
    /// The task was cancelled.
    Cancelled,
    /// The daemon crashed while the task ran, as many times in a row as it allows: the task
    /// may be what kills it, so it is not dispatched again.
    DaemonCrashed,
    /// The task's processes used more memory than its limit and were killed.
    MemoryExceeded,
    /// The kernel's out-of-memory killer killed the task's process: the node (or its memory
    /// cgroup) ran out of memory, which need not be this task's doing. Retried like a lost
    /// worker.
    OomKilled,
}

impl ErrorKind {
    /// The snake_case name used in output lines and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Exception => "exception",
            ErrorKind::WorkerLost => "worker_lost",
            ErrorKind::ManagerLost => "manager_lost",
            ErrorKind::Walltime => "walltime",
            ErrorKind::ResultTooLarge => "result_too_large",
            ErrorKind::BadInput => "bad_input",
            ErrorKind::NotSerializable => "not_serializable",
            ErrorKind::ImportError => "import_error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DaemonCrashed => "daemon_crashed",
            ErrorKind::MemoryExceeded => "memory_exceeded",
            ErrorKind::OomKilled => "oom_killed",
        }
    }

    /// Whether this failure comes from the infrastructure (and so may be retried).
    pub fn is_infrastructure(self) -> bool {
        matches!(
            self,
            ErrorKind::WorkerLost | ErrorKind::ManagerLost | ErrorKind::OomKilled
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task's failure, as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// The exception type name (`ZeroDivisionError`) or an fnx name (`WorkerLost`).
    pub type_name: String,
    /// Human-readable message.
    pub message: String,
    /// Formatted traceback or captured stderr tail, if any.
    pub traceback: Option<String>,
}

impl TaskError {
    /// A failure with no traceback.
    pub fn new(kind: ErrorKind, type_name: &str, message: impl Into<String>) -> TaskError {
        TaskError {
            kind,
            type_name: type_name.to_string(),
            message: message.into(),
            traceback: None,
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The function returned this value.
    Ok(Payload),
    /// The attempt failed.
    Err(TaskError),
}

/// The outcome of one attempt of one task, as sent by a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task.
    pub id: TaskId,
    /// The attempt this outcome belongs to.
    pub attempt: Attempt,
    /// What happened.
    pub outcome: Outcome,
}
