//! Providers and launchers: how managers get started.
//!
//! # Layout
//! - [`command`]: render a [`ManagerBootstrap`] into the `fnx manager ...` command line that a
//!   launcher runs on each node. `fnx manager` parses the same flags back into the same struct.
//! - [`block`]: what a pool's blocks (batch jobs) look like: provider, launcher, resources,
//!   and the files each block leaves in its run directory.
//! - [`script`]: render a block's batch script (directives, `worker_init`, launch line).
//! - [`provider`]: the submit / status / cancel commands of Slurm, PBS Pro and Cobalt, parsing
//!   their output, and running them with a timeout.
//!
//! This crate knows nothing about ZeroMQ or the interchange; the daemon's scaler decides when
//! blocks are submitted and cancelled.
#![deny(missing_docs)]

pub mod block;
pub mod command;
pub mod provider;
pub mod script;

pub use block::{BlockFiles, BlockSpec, Launcher, MpiFlavor, Provider};
pub use command::manager_args;
pub use fnx_protocol::ManagerBootstrap;
