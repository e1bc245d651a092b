//! `fnx token create|list|revoke`: the store of a data directory, opened for one admin
//! command (SQLite serialises its writes with a running daemon's writer).

use super::{dirs::prepare_dir, store_path, DaemonError};
use crate::store::{self, StoreError};
use std::path::{Path, PathBuf};

/// The store of `data_dir` opened for an admin command (`fnx token ...`), created if needed.
/// SQLite serialises its writes with a running daemon's writer.
fn admin_store(data_dir: &Path) -> Result<(rusqlite::Connection, PathBuf), DaemonError> {
    let path = store_path(data_dir);
    // A new data directory is private; an existing one keeps the mode its daemon gave it.
    if !data_dir.exists() {
        prepare_dir(data_dir)?;
    }
    let conn = store::open_writer(&path, true).map_err(|source| DaemonError::Store {
        path: path.clone(),
        source,
    })?;
    Ok((conn, path))
}

fn store_err(path: &Path) -> impl FnOnce(StoreError) -> DaemonError + '_ {
    move |source| DaemonError::Store {
        path: path.to_path_buf(),
        source,
    }
}

/// Create a token for `user` in the store of `data_dir`, valid until `expires` (seconds since
/// the epoch; None: until revoked). Returns its id and the token.
pub fn create_token(
    data_dir: &Path,
    user: &str,
    admin: bool,
    expires: Option<f64>,
) -> Result<(i64, String), DaemonError> {
    let (conn, path) = admin_store(data_dir)?;
    store::create_token(&conn, user, admin, expires).map_err(store_err(&path))
}

/// The tokens in the store of `data_dir` (of `user`, or everyone's).
pub fn list_tokens(
    data_dir: &Path,
    user: Option<&str>,
) -> Result<Vec<store::TokenInfo>, DaemonError> {
    let (conn, path) = admin_store(data_dir)?;
    store::list_tokens(&conn, user).map_err(store_err(&path))
}

/// Revoke token `id` in the store of `data_dir`; its user, or None if there is no such token.
/// A running daemon stops accepting it within a second.
pub fn revoke_token(data_dir: &Path, id: i64) -> Result<Option<String>, DaemonError> {
    let (conn, path) = admin_store(data_dir)?;
    store::revoke_token(&conn, id, None).map_err(store_err(&path))
}
