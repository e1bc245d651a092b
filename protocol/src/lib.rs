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
pub use container::{Container, ContainerError, FunctionContainer, Runtime};
pub use curve::{Credentials, KeyFile, KeyFileError};
pub use frame::{
    decode, encode, peek_variant, FrameError, DEFAULT_MAX_FRAME_BYTES, LARGEST_RESULT_BYTES,
    PROTOCOL_VERSION,
};
pub use ids::{Attempt, BlockId, FunctionId, ManagerId, TaskId, WorkerId};
pub use messages::{InterchangeToManager, ManagerToInterchange, Register, WarmWorkers};
pub use task::{
    split_env, Encoding, ErrorKind, FileNameError, FileSource, FunctionBody, FunctionDef, Outcome,
    Payload, TaskError, TaskFile, TaskResult, TaskSpec, ENV_OWNER_SEP,
};

/// The longest wait any message or setting can ask for: a billion seconds (31 years). Longer
/// is a mistake, and a deadline that far would overflow the clock.
pub const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(1_000_000_000);

/// `ms` milliseconds, at most [`LONGEST_WAIT`]: for durations read from a message, a command
/// line or a file, which a deadline is then computed from (`Instant + Duration` panics when it
/// overflows).
pub fn bounded_ms(ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(ms).min(LONGEST_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_duration_is_bounded_so_a_deadline_cannot_overflow() {
        assert_eq!(bounded_ms(1500), std::time::Duration::from_millis(1500));
        assert_eq!(bounded_ms(u64::MAX), LONGEST_WAIT);
        let _far = std::time::Instant::now() + bounded_ms(u64::MAX);
    }
}
