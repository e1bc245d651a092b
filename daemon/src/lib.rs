//! fnx's service: the long-running daemon that many users submit to (`fnx daemon`), as a
//! library. The binary (`cli`) parses arguments, binds the listener and calls
//! [`service::run`].
//!
//! # Layout
//! - [`config`]: the site TOML, parsed strictly and validated into [`config::SiteConfig`].
//! - [`store`]: the SQLite store (WAL): schema, read queries, and the writer thread with group
//!   commit ([`store::writer`]).
//! - [`api`]: the HTTP API (axum): routes, authentication, errors; documented in `docs/api.md`.
//! - [`records`]: stored rows and their JSON form.
//! - [`signature`]: Python signatures read from source, and argument binding checks.
//! - [`auth`]: tokens and their hashes.
//! - [`identity`]: `[users] mode`: the Unix account a user's code runs as, and who is refused.
//! - [`keys`]: CurveZMQ keys of the interchange and of each pool's managers.
//! - [`lock`]: one daemon per data directory (an `flock`ed lock file naming its PID).
//! - [`local`]: a local pool (interchange + manager processes on this host); embedded mode
//!   (`fnx map`) uses it too.
//! - [`scaler`]: the scaling rules of a batch pool (pure: reports in, actions out).
//! - [`blocks`]: a batch pool's block thread: renders and submits batch scripts, polls job
//!   states, drains and cancels blocks as the scaler decides.
//! - [`user_blocks`]: a batch pool in `unix` mode: each user's blocks, submitted as the user.
//! - [`builds`]: container images built from functions' dependencies (a content-addressed
//!   cache, one build per key).
//! - [`images`]: functions' containers at registration, and holding their tasks until their
//!   image is built.
//! - [`service`]: wiring and the start/recover/stop sequence.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod blocks;
pub mod builds;
pub mod config;
pub mod identity;
pub mod images;
pub mod invalid;
pub mod keys;
pub mod local;
pub mod lock;
pub mod records;
pub mod scaler;
pub mod service;
pub mod signature;
pub mod store;
pub mod user_blocks;
