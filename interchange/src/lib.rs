//! The dispatcher between clients and node managers.
//!
//! # Layout
//! - [`state`]: the interchange as a pure, synchronous state machine — pending queue, capacity
//!   based batched dispatch, per-manager in-flight tracking, heartbeat expiry, retries, drain,
//!   cancel. Events in, messages out through the [`Comm`] trait; no I/O.
//! - [`types`]: the public data types: configuration, tasks in, finished tasks and notices out.
//! - [`queue`]: the priority-then-FIFO pending queue.
//! - [`routing`]: one queue per worker environment (container) and warm routing between them.
//! - [`tenants`]: one state machine per tenant (user), so that a user's tasks only ever go
//!   to that user's managers.
//! - [`driver`]: one thread that owns a ZeroMQ ROUTER socket (one socket for every manager),
//!   feeds the state machine and hands finished tasks to the host over a channel.
//! - [`guard`]: CurveZMQ for manager links: the server key, a ZAP handler that accepts only
//!   issued client keys, and a monitor that logs failed handshakes.
//!
//! The interchange knows nothing about how managers are started.
#![deny(missing_docs)]

pub mod driver;
pub mod guard;
pub mod queue;
pub mod routing;
pub mod state;
pub mod tenants;
pub mod types;

pub use driver::{DriverConfig, DriverError, Event, Handle, Loader, RateLimit};
pub use guard::{decode_key, new_key_pair, CurveServer, Mechanism};
pub use state::{
    Comm, Config, Counts, Finished, Inputs, Interchange, LoadError, ManagerStatus, NewTask, Notice,
    Peer,
};
