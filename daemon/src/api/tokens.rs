//! `/v1/tokens`: list, create and revoke tokens. Admins manage everyone's; a user manages
//! their own (for example a user known by the local socket makes a token for remote use).

use super::{parse_id, parse_json, read_body, record_response, ApiError, ApiResult, App, Caller};
use crate::config::UsersMode;
use crate::store::writer::Cmd;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Run `f` on the writer's connection and wait for its answer.
async fn write<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.send(Cmd::Exec(Box::new(move |conn| {
        let _ = tx.send(f(conn));
    })))?;
    rx.await
        .map_err(|_| ApiError::unavailable("the store is shutting down"))?
        .map_err(ApiError::from)
}

pub(super) async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let user = match (caller.admin, q.get("user")) {
        (true, u) => u.cloned(),
        (false, _) => Some(caller.user.clone()),
    };
    let tokens = app.reader.tokens(user.as_deref())?;
    Ok(record_response(
        StatusCode::OK,
        &fnx_api::service::TokenList { tokens },
    ))
}

pub(super) async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let v = parse_json(&read_body(&app, &headers, body, 64 << 10).await?)?;
    let Value::Object(m) = &v else {
        return Err(ApiError::bad("the body must be a JSON object"));
    };
    for k in m.keys() {
        if !["user", "admin", "expires_s"].contains(&k.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown field {k:?} (user, admin, expires_s)"
            )));
        }
    }
    let user = match m.get("user") {
        None => caller.user.clone(),
        Some(Value::String(u)) if !u.is_empty() && u.len() <= 256 => u.clone(),
        Some(_) => return Err(ApiError::bad("user must be a non-empty name")),
    };
    if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::bad("user must be a name without spaces"));
    }
    let admin = match m.get("admin") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("admin must be true or false")),
    };
    let expires = match m.get("expires_s") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(s) if s.is_finite() && s > 0.0 && s <= 100.0 * 365.0 * 86400.0 => {
                Some(crate::store::now() + s)
            }
            _ => {
                return Err(ApiError::bad(
                    "expires_s must be a number of seconds above 0 (at most 100 years)",
                ))
            }
        },
    };
    if !caller.admin && (user != caller.user || admin) {
        return Err(ApiError::forbidden(
            "only admins may create tokens for other users or admin tokens",
        ));
    }
    if app.identities.mode() == UsersMode::Unix && !admin {
        app.identities
            .account(&user)
            .map_err(|r| ApiError::bad(format!("users.mode is \"unix\": {r}")))?;
    }
    let name = user.clone();
    let (id, token) = write(&app, move |c| {
        crate::store::create_token(c, &name, admin, expires)
    })
    .await?;
    tracing::info!("{} created token {id} for {user:?}", caller.user);
    Ok(record_response(
        StatusCode::CREATED,
        &fnx_api::service::TokenCreated {
            id,
            user,
            admin,
            expires,
            token,
        },
    ))
}

pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id, "the token id")? as i64;
    let owner = (!caller.admin).then(|| caller.user.clone());
    let user = write(&app, move |c| {
        crate::store::revoke_token(c, id, owner.as_deref())
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("token {id} does not exist")))?;
    // Every cached lookup goes: the revoked token fails from the next request on.
    app.tokens.clear();
    tracing::info!("{} revoked token {id} of {user:?}", caller.user);
    Ok(StatusCode::NO_CONTENT.into_response())
}
