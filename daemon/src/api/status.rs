//! `/v1/health`, `/v1/whoami`, `/v1/status` and `/metrics`.

use super::{json_response, ApiResult, App, Caller};
use crate::store::writer::UserCounts;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use fnx_interchange::{Counts, ManagerStatus};
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::Arc;

pub(super) async fn health(State(app): State<Arc<App>>) -> Response {
    let unavailable = app
        .shared
        .stats
        .lock()
        .ok()
        .and_then(|s| s.unavailable.clone());
    let (status, store) = match unavailable {
        None => (StatusCode::OK, "ok".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: {why}"),
        ),
    };
    let state = if status == StatusCode::OK {
        "ok"
    } else {
        "degraded"
    };
    json_response(
        status,
        json!({"status": state, "version": env!("CARGO_PKG_VERSION"), "store": store}),
    )
}

pub(super) async fn whoami(c: Caller) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        json!({"user": c.user, "admin": c.admin}),
    ))
}

/// Each pool's interchange counts and managers (asked on a blocking thread).
async fn pool_states(app: &Arc<App>) -> Vec<(String, Counts, Vec<ManagerStatus>)> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        app.pools
            .iter()
            .map(|p| {
                let (c, m) = p.handle.status().unwrap_or_default();
                (p.name.clone(), c, m)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

fn manager_json(m: &ManagerStatus) -> Value {
    json!({"id": m.id.0, "uid": m.uid, "user": m.tenant, "host": m.host,
           "block": m.block_id.map(|b| b.0),
           "workers": m.slots, "inflight": m.inflight, "completed": m.completed,
           "idle_s": m.idle_for.map(|d| d.as_secs_f64()).unwrap_or(0.0), "draining": m.draining,
           "environments": m.workers.iter().map(|w| {
               let (container, owner) = fnx_protocol::split_env(&w.env);
               json!({"container": container, "user": owner, "workers": w.workers,
                      "starts": w.starts})
           }).collect::<Vec<_>>()})
}

pub(super) async fn status(State(app): State<Arc<App>>, c: Caller) -> ApiResult {
    let (users, rate) = {
        let s = app.shared.stats.lock().expect("stats");
        (s.users.clone(), s.rate())
    };
    let mine = users.get(&c.user).copied().unwrap_or_default();
    let total = users
        .values()
        .fold(UserCounts::default(), |a, u| UserCounts {
            queued: a.queued + u.queued,
            running: a.running + u.running,
            finished: a.finished + u.finished,
            bytes: a.bytes + u.bytes,
        });
    let states = pool_states(&app).await;
    let pools: Vec<Value> = states
        .iter()
        .zip(&app.pools)
        .map(|((name, counts, managers), pref)| {
            let r = pref.report.lock().map(|r| r.clone()).unwrap_or_default();
            // Non-admins see what the pool offers, not what others run on it, nor any path
            // on the server (issue 11).
            let mut p = json!({"name": name, "provider": r.provider, "launcher": r.launcher,
                               "workers": counts.slots, "managers_connected": counts.managers,
                               "failed": r.failed.is_some()});
            if c.admin {
                p["queued"] = json!(counts.queued);
                p["held_for_images"] = json!(counts.held);
                p["running"] = json!(counts.running);
                p["run_dir"] = json!(r.run_dir);
                p["failed"] = json!(r.failed);
                p["submit_error"] = json!(r.submit_error);
                p["blocks"] = json!(r.blocks);
                p["managers"] = managers.iter().map(manager_json).collect();
            } else {
                // Their own managers (users' managers, in `unix` mode).
                p["managers"] = managers
                    .iter()
                    .filter(|m| m.tenant == c.user)
                    .map(manager_json)
                    .collect();
            }
            p
        })
        .collect();
    let mut doc = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "user": c.user,
        "admin": c.admin,
        "tasks": if c.admin { total } else { mine },
        "tasks_per_s": rate,
        "pools": pools,
        // The caller's own use of their per-user quota.
        "quota": {
            "queued_bytes": mine.bytes,
            "max_queued_bytes": app.limits.max_queued_bytes_per_user,
        },
    });
    if c.admin {
        doc["users"] = serde_json::to_value(&users).unwrap_or(Value::Null);
        doc["store"] = json!({"path": app.store_path, "size_bytes": app.reader.size_bytes(),
                              "healthy": app.shared.stats.lock().map(|s| s.unavailable.is_none()).unwrap_or(false)});
    }
    Ok(json_response(StatusCode::OK, doc))
}

pub(super) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let pools = pool_states(&app).await;
    let mut out = String::new();
    let s = app.shared.stats.lock().expect("stats");
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    metric(
        "fnx_tasks_submitted_total",
        "counter",
        "Tasks accepted since the daemon started.",
        &one(s.submitted_total as f64),
    );
    let finished: Vec<(String, f64)> = ["success", "failed", "cancelled"]
        .iter()
        .zip(s.finished_total)
        .map(|(st, n)| (format!("{{state=\"{st}\"}}"), n as f64))
        .collect();
    metric(
        "fnx_tasks_finished_total",
        "counter",
        "Tasks that reached a terminal state since the daemon started.",
        &finished,
    );
    let per_pool = |f: &dyn Fn(&Counts) -> f64| -> Vec<(String, f64)> {
        pools
            .iter()
            .map(|(n, c, _)| (format!("{{pool=\"{n}\"}}"), f(c)))
            .collect()
    };
    metric(
        "fnx_tasks_queued",
        "gauge",
        "Tasks waiting for a worker.",
        &per_pool(&|c| c.queued as f64),
    );
    metric(
        "fnx_tasks_running",
        "gauge",
        "Tasks held by managers.",
        &per_pool(&|c| c.running as f64),
    );
    metric(
        "fnx_managers",
        "gauge",
        "Registered managers.",
        &per_pool(&|c| c.managers as f64),
    );
    metric(
        "fnx_workers",
        "gauge",
        "Worker slots of registered managers.",
        &per_pool(&|c| c.slots as f64),
    );
    metric(
        "fnx_store_commits_total",
        "counter",
        "Group commits of the task store.",
        &one(s.commits as f64),
    );
    metric(
        "fnx_store_commit_errors_total",
        "counter",
        "Failed group commits.",
        &one(s.commit_errors as f64),
    );
    metric(
        "fnx_api_long_poll_wakeups_total",
        "counter",
        "Long-polls woken by a new result of their user (each then reads the store once).",
        &one(app.poll_wakeups.load(std::sync::atomic::Ordering::Relaxed) as f64),
    );
    metric(
        "fnx_api_connections",
        "gauge",
        "Open API connections.",
        &one(app.connections.load(std::sync::atomic::Ordering::Relaxed) as f64),
    );
    metric(
        "fnx_store_size_bytes",
        "gauge",
        "Size of the task store and its log.",
        &one(app.reader.size_bytes() as f64),
    );
    metric(
        "fnx_tasks_per_second",
        "gauge",
        "Completions per second over the last 10 s.",
        &one(s.rate()),
    );
    drop(s);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// `POST /v1/pools/{pool}/blocks/{id}/drain` and `.../cancel` (admins): drain a block now, or
/// cancel its job even while it runs tasks (they are retried elsewhere).
pub(super) async fn block_action(
    State(app): State<Arc<App>>,
    c: Caller,
    Path((pool, id, action)): Path<(String, String, String)>,
) -> ApiResult {
    use crate::blocks::BlockRequest;
    if !c.admin {
        return Err(super::ApiError::forbidden(
            "only admins may drain or cancel blocks",
        ));
    }
    let id = super::parse_id(&id, "the block id")?;
    let request = match action.as_str() {
        "drain" => BlockRequest::Drain(id),
        "cancel" => BlockRequest::Cancel(id),
        other => {
            return Err(super::ApiError::not_found(format!(
                "no block action {other:?} (drain or cancel)"
            )))
        }
    };
    let p = app
        .pool(&pool)
        .ok_or_else(|| super::ApiError::not_found(format!("no pool named {pool:?}")))?;
    let mut r = p
        .report
        .lock()
        .map_err(|_| super::ApiError::unavailable("the pool's block thread failed"))?;
    let live = r
        .blocks
        .iter()
        .any(|b| b.id == id && !matches!(b.phase, crate::scaler::Phase::Ended));
    if !live {
        return Err(super::ApiError::not_found(format!(
            "pool {pool} has no live block {id}"
        )));
    }
    r.requests.push(request);
    Ok(json_response(
        StatusCode::ACCEPTED,
        json!({"pool": pool, "block": id, "action": action}),
    ))
}
