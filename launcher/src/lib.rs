//! Providers and launchers: how managers get started.
//!
//! # Layout
//! - [`command`]: render a [`ManagerBootstrap`] into the `fnx manager ...` command line that a
//!   launcher (a local process today; `srun`, `mpiexec`, `aprun` inside batch jobs later) runs
//!   on each node. `fnx manager` parses the same flags back into the same struct.
//!
//! This crate knows nothing about ZeroMQ; batch-system providers (Slurm, PBS Pro, Cobalt) and
//! MPI-aware launchers join it in the HPC issue.
#![deny(missing_docs)]

pub mod command;

pub use command::manager_args;
pub use fnx_protocol::ManagerBootstrap;
