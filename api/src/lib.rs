//! The HTTP API's types, shared by the daemon (which serves them), the `fnx` client commands
//! and the benches, so that a record has one definition.
//!
//! - [`function`]: a function's record as registered and stored ([`FunctionSpec`]), what a
//!   client sends to register one ([`FunctionCreate`]), and its parts (container, dependencies,
//!   signature).
//! - [`submit`]: a submit's body ([`TaskBatch`]), JSON or msgpack.
//! - [`task`]: a task's record ([`TaskRecord`]) and a page of results ([`ResultsPage`]).

#![warn(missing_docs)]

pub mod function;
pub mod openapi;
pub mod service;
pub mod submit;
pub mod task;

pub use function::{
    BuildRef, BuildStatus, ContainerSpec, Dependencies, FunctionCreate, FunctionKind, FunctionSpec,
    Param, ParamKind, Signature,
};
pub use submit::{FileSubmission, TaskBatch, TaskIds, TaskSubmission};
pub use task::{ErrorRecord, ResultRecord, ResultsPage, TaskRecord, TaskState};
