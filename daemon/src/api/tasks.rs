//! `/v1/tasks/{id}`, `/v1/tasks/status`, `/v1/tasks/cancel` and `/v1/results`: look up,
//! cancel, stream results.

use super::{
    blocking, parse_id, parse_json, read_body, record_response, wait_for_results, wait_param,
    ApiError, ApiResult, App, Caller, MSGPACK,
};
use crate::records::TaskRow;
use crate::store::writer::Cmd;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fnx_protocol::{Outcome, TaskId};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The task if the caller may see it. Another user's task answers exactly like a missing one
/// (404), so that ids do not reveal what others run.
fn visible(caller: &Caller, id: u64, row: Option<TaskRow>) -> Result<TaskRow, ApiError> {
    row.filter(|r| caller.may_see(&r.owner))
        .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))
}

/// Read a task until it is terminal or `until` passes.
async fn read_until_terminal(
    app: &App,
    caller: &Caller,
    id: u64,
    until: Instant,
) -> Result<TaskRow, ApiError> {
    let mut results: Option<tokio::sync::watch::Receiver<u64>> = None;
    loop {
        if let Some(rx) = results.as_mut() {
            rx.mark_unchanged();
        }
        let row = visible(caller, id, app.reader.task(TaskId(id))?)?;
        if row.state.is_terminal() || Instant::now() >= until {
            return Ok(row);
        }
        match results.as_mut() {
            Some(rx) => wait_for_results(app, caller, rx, until).await?,
            // The task's owner's results (an admin may wait for another user's task); the
            // task is read once more after subscribing, so no commit falls in between.
            None => results = Some(app.shared.results_of(&row.owner)),
        }
    }
}

pub(super) async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_id(&id, "the task id")?;
    let until = Instant::now() + wait_param(&q)?;
    let row = read_until_terminal(&app, &caller, id, until).await?;
    if row.state.is_terminal() && row.owner == caller.user {
        let _ = app.send(Cmd::FetchedIds(vec![row.id]));
    }
    let why = app.waiting(&row.pool, row.function);
    Ok(record_response(
        StatusCode::OK,
        &row.record(false).waiting(why),
    ))
}

/// The `ids` array of a request body (at most 10,000).
fn ids_of(v: &Value) -> Result<Vec<u64>, ApiError> {
    let ids: Vec<u64> = match v.get("ids") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .ok_or_else(|| ApiError::bad(format!("ids[{i}]: must be a task id, got {x}")))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::bad("ids: required (an array of task ids)")),
    };
    if ids.len() > 10_000 {
        return Err(ApiError::too_large(format!(
            "{} ids in one request; the limit is 10000",
            ids.len()
        )));
    }
    Ok(ids)
}

/// The `ids` of a request body, and those of the tasks that exist, with outcomes adding up to
/// at most `max_bytes`.
async fn tasks_of_request(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
    max_bytes: u64,
) -> Result<(Vec<u64>, Vec<TaskRow>), ApiError> {
    // 10,000 ids fit in well under 1 MiB; a larger body is refused before it is parsed.
    let bytes = read_body(app, headers, body, 1 << 20).await?;
    let ids = ids_of(&parse_json(&bytes)?)?;
    let keys: Vec<TaskId> = ids.iter().map(|&i| TaskId(i)).collect();
    let rows = blocking(app, move |a| a.reader.tasks_within(&keys, max_bytes)).await?;
    Ok((ids, rows))
}

pub(super) async fn status_many(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let (ids, rows) = tasks_of_request(&app, &headers, body, app.limits.max_answer_bytes).await?;
    let by_id: HashMap<u64, &TaskRow> = rows
        .iter()
        .filter(|r| caller.may_see(&r.owner))
        .map(|r| (r.id.0, r))
        .collect();
    use fnx_api::service::{TaskStatus, TaskStatusList, Unknown, UnknownTask};
    let mut fetched = Vec::new();
    let tasks: Vec<TaskStatus<'_>> = ids
        .iter()
        .map(|&id| match by_id.get(&id) {
            Some(r) => {
                if r.state.is_terminal() && r.owner == caller.user {
                    fetched.push(r.id);
                }
                TaskStatus::Known(Box::new(
                    r.record(false).waiting(app.waiting(&r.pool, r.function)),
                ))
            }
            None => TaskStatus::Unknown(UnknownTask {
                id,
                state: Unknown::Unknown,
            }),
        })
        .collect();
    if !fetched.is_empty() {
        let _ = app.send(Cmd::FetchedIds(fetched));
    }
    Ok(record_response(StatusCode::OK, &TaskStatusList { tasks }))
}

pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id, "the task id")?;
    let row = visible(&caller, id, app.reader.task(TaskId(id))?)?;
    if row.state.is_terminal() {
        return Ok(record_response(StatusCode::OK, &row.record(false)));
    }
    if let Some(p) = app.pool(&row.pool) {
        p.handle.cancel(vec![row.id]);
    }
    let row =
        read_until_terminal(&app, &caller, id, Instant::now() + Duration::from_secs(5)).await?;
    let status = if row.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(record_response(status, &row.record(false)))
}

pub(super) async fn cancel_many(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let (_, rows) = tasks_of_request(&app, &headers, body, 0).await?;
    let mut per_pool: HashMap<&str, Vec<TaskId>> = HashMap::new();
    for r in rows
        .iter()
        .filter(|r| caller.may_see(&r.owner) && !r.state.is_terminal())
    {
        per_pool.entry(r.pool.as_str()).or_default().push(r.id);
    }
    let mut n = 0;
    for (pool, ids) in per_pool {
        if let Some(p) = app.pool(pool) {
            n += ids.len();
            p.handle.cancel(ids);
        }
    }
    Ok(record_response(
        StatusCode::ACCEPTED,
        &fnx_api::openapi::Cancelling {
            cancelling: n as u64,
        },
    ))
}

/// A result in a msgpack answer: payload bytes stay bytes.
#[derive(Serialize)]
struct MsgpackResult<'a> {
    id: u64,
    function: u64,
    pool: &'a str,
    state: &'static str,
    attempt: u32,
    seq: Option<u64>,
    submitted_at: f64,
    finished_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<MsgpackPayload<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

#[derive(Serialize)]
struct MsgpackPayload<'a> {
    encoding: &'static str,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

fn msgpack_results(rows: &[TaskRow], cursor: u64) -> Response {
    let results: Vec<MsgpackResult<'_>> = rows
        .iter()
        .map(|r| {
            let (result, error) = match &r.outcome {
                Some(Outcome::Ok(p)) => (
                    Some(MsgpackPayload {
                        encoding: p.encoding.as_str(),
                        data: &p.data,
                    }),
                    None,
                ),
                Some(Outcome::Err(_)) => (None, r.to_json(false).get("error").cloned()),
                None => (None, None),
            };
            MsgpackResult {
                id: r.id.0,
                function: r.function.0,
                pool: &r.pool,
                state: r.state.as_str(),
                attempt: r.attempt.0,
                seq: r.seq,
                submitted_at: r.submitted,
                finished_at: r.finished,
                result,
                error,
            }
        })
        .collect();
    #[derive(Serialize)]
    struct Page<'a> {
        results: Vec<MsgpackResult<'a>>,
        cursor: u64,
    }
    match rmp_serde::to_vec_named(&Page { results, cursor }) {
        Ok(bytes) => ([(header::CONTENT_TYPE, MSGPACK)], bytes).into_response(),
        Err(e) => ApiError::bad(format!("cannot encode msgpack: {e}")).into_response(),
    }
}

pub(super) async fn results(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let num = |k: &str, default: u64| -> Result<u64, ApiError> {
        q.get(k).map_or(Ok(default), |v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad(format!("{k}: must be a non-negative integer, got {v:?}"))
            })
        })
    };
    if q.get("since").map(String::as_str) == Some("end") {
        // Where the stream ends now, without acknowledging anything (a new consumer starts here).
        // The highest committed completion number of anyone: none of the caller's results is
        // newer, and every later one will be (numbers grow across users and restarts).
        let cursor = *app.shared.seq.borrow();
        return Ok(record_response(
            StatusCode::OK,
            &fnx_api::ResultsPage {
                results: Vec::new(),
                cursor,
            },
        ));
    }
    let since = num("since", 0)?;
    if since > i64::MAX as u64 {
        return Err(ApiError::bad(format!(
            "since: must be a cursor from 0 to {}, got {since}",
            i64::MAX
        )));
    }
    let limit = num("limit", 1000)?.clamp(1, 10_000) as usize;
    let until = Instant::now() + wait_param(&q)?;
    let mut results = app.shared.results_of(&caller.user);
    let rows = loop {
        results.mark_unchanged();
        let user = caller.user.clone();
        let max = app.limits.max_answer_bytes;
        let rows = blocking(&app, move |a| a.reader.results(&user, since, limit, max)).await?;
        if !rows.is_empty() || Instant::now() >= until {
            break rows;
        }
        wait_for_results(&app, &caller, &mut results, until).await?;
    };
    let cursor = rows.last().and_then(|r| r.seq).unwrap_or(since);
    if cursor > since {
        // What a page delivers counts as fetched (kept for store.result_retention_s more).
        let _ = app.send(Cmd::Fetched {
            owner: caller.user.clone(),
            after: since,
            upto: cursor,
        });
    }
    let wants_msgpack = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(MSGPACK));
    if wants_msgpack {
        return Ok(msgpack_results(&rows, cursor));
    }
    #[derive(Serialize)]
    struct Page<'a> {
        results: Vec<fnx_api::TaskRecord<'a>>,
        cursor: u64,
    }
    let page = Page {
        results: rows.iter().map(|r| r.record(true)).collect(),
        cursor,
    };
    Ok(record_response(StatusCode::OK, &page))
}
