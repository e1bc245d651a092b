//! Users and their tokens: created by the daemon's first start, the token API and `fnx token`
//! (which opens the store itself; SQLite serialises it with the daemon's writer).

use super::{now, StoreError};
use rusqlite::{params, Connection, OptionalExtension};

/// Create a user (or update its admin flag) and a new token for it, valid until `expires`
/// (seconds since the epoch; None: until revoked); returns the token's id and the token. Used
/// by the daemon on its first start, by the token API, and by `fnx token create` (which opens
/// the store itself; SQLite serialises it with the daemon's writer).
pub fn create_token(
    conn: &Connection,
    user: &str,
    admin: bool,
    expires: Option<f64>,
) -> Result<(i64, String), StoreError> {
    let token = crate::auth::new_token();
    let t = now();
    // Admin rights belong to the token (the user's own flag is for the daemon's first admin,
    // known by the local socket).
    ensure_user(conn, user, false)?;
    conn.execute(
        "INSERT INTO tokens(hash, user, created, expires, admin) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            crate::auth::hash_token(&token),
            user,
            t,
            expires,
            admin as i64
        ],
    )?;
    Ok((conn.last_insert_rowid(), token))
}

/// Create a user if it does not exist (or raise its admin flag).
pub fn ensure_user(conn: &Connection, user: &str, admin: bool) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO users(name, admin, created) VALUES (?1, ?2, ?3)
         ON CONFLICT(name) DO UPDATE SET admin = max(admin, excluded.admin)",
        params![user, admin as i64, now()],
    )?;
    Ok(())
}

/// A token as listed (never the token itself: only its hash is stored).
pub use fnx_api::service::TokenInfo;

/// Tokens of `user` (or everyone's), oldest first.
pub fn list_tokens(conn: &Connection, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError> {
    let t = now();
    let mut st = conn.prepare(
        "SELECT t.rowid, t.user, COALESCE(t.admin, u.admin), t.created, t.expires, t.revoked
         FROM tokens t JOIN users u ON u.name = t.user
         WHERE ?1 IS NULL OR t.user = ?1 ORDER BY t.rowid",
    )?;
    let rows = st.query_map([user], |r| {
        let expires: Option<f64> = r.get(4)?;
        let revoked: Option<f64> = r.get(5)?;
        Ok(TokenInfo {
            id: r.get(0)?,
            user: r.get(1)?,
            admin: r.get::<_, i64>(2)? != 0,
            created: r.get(3)?,
            expires,
            revoked,
            live: revoked.is_none() && expires.is_none_or(|e| e > t),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revoke token `id` (only if it belongs to `owner`, when given). Returns the token's user, or
/// None when there is no such token (of that owner). Revoking twice is not an error.
pub fn revoke_token(
    conn: &Connection,
    id: i64,
    owner: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let user: Option<String> = conn
        .query_row(
            "SELECT user FROM tokens WHERE rowid = ?1 AND (?2 IS NULL OR user = ?2)",
            params![id, owner],
            |r| r.get(0),
        )
        .optional()?;
    if user.is_some() {
        conn.execute(
            "UPDATE tokens SET revoked = ?2 WHERE rowid = ?1 AND revoked IS NULL",
            params![id, now()],
        )?;
    }
    Ok(user)
}

/// How many users exist.
pub fn user_count(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn.query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))? as u64)
}
