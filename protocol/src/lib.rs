//! The wire contract between fnx's interchange and its node managers.
//!
//! # Layout
//! - [`ids`]: newtype identifiers (`TaskId`, `Attempt`, `ManagerId`, `BlockId`, `WorkerId`,
//!   `FunctionId`) so that no bare integer crosses a module boundary.
//! - [`task`]: what a task and its outcome look like: payloads with their encoding, function
//!   bodies, typed error kinds.
//! - [`messages`]: one enum per direction of the manager ⇄ interchange link.
//! - [`frame`]: the versioned msgpack envelope, size-capped encode/decode that never panics.
//! - [`shell`]: shell command templates whose parameters become arguments, never code.
//! - [`bootstrap`]: the settings a node manager is started with, rendered to a command line by
//!   the launcher and parsed back by `fnx manager`.
#![deny(missing_docs)]

pub mod bootstrap;
pub mod container;
pub mod curve;
pub mod frame;
pub mod ids;
pub mod messages;
pub mod shell;
pub mod task;

pub use bootstrap::ManagerBootstrap;
pub use container::{Container, FunctionContainer, Runtime};
pub use curve::{Credentials, KeyFile, KeyFileError};
pub use frame::{decode, encode, FrameError, DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
pub use ids::{Attempt, BlockId, FunctionId, ManagerId, TaskId, WorkerId};
pub use messages::{InterchangeToManager, ManagerToInterchange, Register, WarmWorkers};
pub use task::{
    split_env, Encoding, ErrorKind, FileSource, FunctionBody, FunctionDef, Outcome, Payload,
    TaskError, TaskFile, TaskResult, TaskSpec, ENV_OWNER_SEP,
};
