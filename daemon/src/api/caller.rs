//! Who is asking: a bearer token, or the peer's Unix account on the daemon's local socket
//! (`SO_PEERCRED`, the kernel's word). Every handler takes a [`Caller`] as an extractor.
//!
//! Tokens are looked up in the store and cached for [`TOKEN_RECHECK`]: a token revoked through
//! the API stops working at once, one revoked or expired in the store by another process (`fnx
//! token revoke`) within that time. Long-polls recheck their caller between slices of the same
//! length, so a revoked token also ends a poll that is already open within a second.

use super::{ApiError, App};
use crate::config::UsersMode;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a token lookup is trusted; also the slice of a long-poll between rechecks.
pub(crate) const TOKEN_RECHECK: Duration = Duration::from_millis(400);

/// Most tokens cached at once (the cache is emptied when it is full).
const MAX_CACHED: usize = 10_000;

/// The authenticated user of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// Sees everything.
    pub admin: bool,
    /// The hash of the token it came with (None: identified by the local socket's peer).
    token: Option<String>,
}

impl Caller {
    pub(super) fn may_see(&self, owner: &str) -> bool {
        self.admin || self.user == owner
    }
}

/// The peer of a connection on the daemon's Unix socket, as the kernel reports it.
#[derive(Clone, Copy, Debug)]
pub struct SocketPeer {
    /// Its user id (None: the kernel did not say).
    pub uid: Option<u32>,
}

/// Cached token lookups: hash → (caller, when it was looked up).
#[derive(Default)]
pub(crate) struct TokenCache(std::sync::RwLock<HashMap<String, (Caller, Instant)>>);

impl TokenCache {
    fn get(&self, hash: &str) -> Option<Caller> {
        let map = self.0.read().ok()?;
        let (c, at) = map.get(hash)?;
        (at.elapsed() < TOKEN_RECHECK).then(|| c.clone())
    }

    fn put(&self, hash: &str, c: &Caller) {
        if let Ok(mut map) = self.0.write() {
            if map.len() >= MAX_CACHED {
                map.clear();
            }
            map.insert(hash.to_string(), (c.clone(), Instant::now()));
        }
    }

    /// Forget every cached lookup (a token was revoked through the API).
    pub(crate) fn clear(&self) {
        if let Ok(mut map) = self.0.write() {
            map.clear();
        }
    }
}

fn unauthorized(m: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
}

/// The live token of `hash`, from the cache or the store.
fn by_token(app: &App, hash: &str) -> Result<Caller, ApiError> {
    if let Some(c) = app.tokens.get(hash) {
        return Ok(c);
    }
    match app.reader.token_user(hash)? {
        Some((user, admin)) => {
            // In `unix` mode a user's token holds only while the user maps to an allowed
            // account (admins may manage the service whatever their name).
            if app.identities.mode() == UsersMode::Unix && !admin {
                if let Err(r) = app.identities.account(&user) {
                    app.identities.log_refusal("a token", &r);
                    return Err(ApiError::not_allowed());
                }
            }
            let c = Caller {
                user,
                admin,
                token: Some(hash.to_string()),
            };
            app.tokens.put(hash, &c);
            Ok(c)
        }
        None => Err(unauthorized(
            "authentication failed: unknown, revoked or expired token",
        )),
    }
}

/// Authenticate by the `Authorization: Bearer` header (None: there is none).
fn by_header(app: &App, headers: &HeaderMap) -> Option<Result<Caller, ApiError>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    Some(match token {
        Some(t) => by_token(app, &crate::auth::hash_token(t)),
        None => Err(unauthorized(
            "authentication failed: the Authorization header must be 'Bearer <token>'",
        )),
    })
}

/// Authenticate a request: its token if it has one; else, on the local socket, its peer's
/// account.
pub(crate) fn authenticate(
    app: &App,
    headers: &HeaderMap,
    peer: Option<SocketPeer>,
) -> Result<Caller, ApiError> {
    if let Some(r) = by_header(app, headers) {
        return r;
    }
    match peer {
        Some(p) => by_peer(app, p.uid),
        None => Err(unauthorized(
            "authentication failed: no Authorization header (expected 'Bearer <token>')",
        )),
    }
}

/// A caller identified by the kernel on the local socket: the fnx user of the peer's account.
/// The daemon's own account is its first admin. In `unix` mode an allowed account with no fnx
/// user yet gets one (`users.auto`); in `service` mode the user must exist.
fn by_peer(app: &App, uid: Option<u32>) -> Result<Caller, ApiError> {
    let ids = &app.identities;
    let uid = uid.ok_or_else(|| {
        unauthorized("authentication failed: the kernel did not name the socket's peer")
    })?;
    let caller = |user: &str, admin| Caller {
        user: user.to_string(),
        admin,
        token: None,
    };
    if uid == ids.service_uid() {
        // In service mode users' tasks run under this very account: the kernel's word that a
        // peer is this account proves nothing then, and it would make any task an admin.
        if ids.mode() == UsersMode::Service {
            return Err(unauthorized(
                "authentication failed: in service mode the daemon's own account (which users' \
                 tasks run as) needs a token on the socket too: use the one in \
                 <data dir>/client.json",
            ));
        }
        let name = ids.service_name();
        return match app.reader.user(name)? {
            Some(admin) => Ok(caller(name, admin)),
            None => Err(unauthorized(&format!(
                "authentication failed: the daemon's own account has no fnx user {name:?}"
            ))),
        };
    }
    let account = ids.account_of_uid(uid).map_err(|r| {
        ids.log_refusal("a socket peer", &r);
        ApiError::not_allowed()
    })?;
    let unix = ids.mode() == UsersMode::Unix;
    let known = app.reader.user(&account.name)?;
    if unix && known != Some(true) {
        ids.check(&account).map_err(|r| {
            ids.log_refusal("a socket peer", &r);
            ApiError::not_allowed()
        })?;
    }
    match known {
        Some(admin) => Ok(caller(&account.name, admin)),
        None if unix && ids.config().auto => {
            // Created in the background (idempotent); the caller is known from now on.
            let name = account.name.clone();
            let _ = app.send(crate::store::writer::Cmd::Exec(Box::new(move |conn| {
                match crate::store::ensure_user(conn, &name, false) {
                    Ok(()) => tracing::info!("new user {name:?} (a socket peer, users.auto)"),
                    Err(e) => tracing::error!("cannot create user {name:?}: {e}"),
                }
            })));
            Ok(caller(&account.name, false))
        }
        None if unix => {
            ids.log_refusal(
                "a socket peer",
                &crate::identity::Refusal::Lookup {
                    name: account.name.clone(),
                    why: "it has no fnx user and users.auto is off".into(),
                },
            );
            Err(ApiError::not_allowed())
        }
        None => Err(unauthorized(&format!(
            "authentication failed: your account {:?} has no fnx user on this service; ask an \
             admin for one (fnx token create --user {})",
            account.name, account.name
        ))),
    }
}

impl App {
    /// Whether `caller` still holds (its token was not revoked and did not expire since).
    pub(crate) fn recheck(&self, caller: &Caller) -> Result<(), ApiError> {
        match &caller.token {
            Some(hash) => by_token(self, hash).map(|_| ()),
            None => Ok(()),
        }
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketPeer>>()
            .map(|c| c.0);
        authenticate(app, &parts.headers, peer)
    }
}
