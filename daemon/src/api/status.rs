//! `/v1/health`, `/v1/whoami`, `/v1/status` and `/metrics`.

use super::{record_response, ApiResult, App, Caller};
use crate::store::writer::UserCounts;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use fnx_api::service as api;
use fnx_interchange::{Counts, ManagerStatus};
use serde_json::json;
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
    record_response(
        status,
        &api::Health {
            status: state.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            store,
        },
    )
}

pub(super) async fn whoami(c: Caller) -> ApiResult {
    Ok(record_response(
        StatusCode::OK,
        &api::Whoami {
            user: c.user,
            admin: c.admin,
        },
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

fn manager_status(m: &ManagerStatus) -> api::ManagerStatus {
    api::ManagerStatus {
        id: m.id.0,
        uid: m.uid.clone(),
        user: m.tenant.clone(),
        host: m.host.clone(),
        block: m.block_id.map(|b| b.0),
        workers: m.slots.into(),
        inflight: m.inflight as u64,
        completed: m.completed,
        idle_s: m.idle_for.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        draining: m.draining,
        environments: m
            .workers
            .iter()
            .map(|w| {
                let (container, owner) = fnx_protocol::split_env(&w.env);
                api::WorkerEnvironment {
                    container: container.to_string(),
                    user: owner.map(str::to_string),
                    workers: w.workers.into(),
                    starts: w.starts,
                }
            })
            .collect(),
    }
}

fn counts(u: &UserCounts) -> api::TaskCounts {
    api::TaskCounts {
        queued: u.queued,
        running: u.running,
        finished: u.finished,
    }
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
    let pools = states
        .iter()
        .zip(&app.pools)
        .map(|((name, counts, managers), pref)| {
            let r = pref.report.lock().map(|r| r.clone()).unwrap_or_default();
            // Non-admins see what the pool offers, not what others run on it, nor any path
            // on the server (issue 11); their own managers (users' managers, `unix` mode).
            let admin = c.admin.then_some(());
            api::PoolStatus {
                name: name.clone(),
                provider: r.provider.to_string(),
                launcher: r.launcher.to_string(),
                workers: counts.slots,
                managers_connected: counts.managers as u64,
                failed: match c.admin {
                    true => json!(r.failed),
                    false => json!(r.failed.is_some()),
                },
                queued: admin.map(|()| counts.queued as u64),
                held_for_images: admin.map(|()| counts.held as u64),
                running: admin.map(|()| counts.running as u64),
                run_dir: admin.map(|()| r.run_dir.display().to_string()),
                submit_error: admin.and(r.submit_error.clone()),
                blocks: admin.map(|()| {
                    r.blocks
                        .iter()
                        .map(|b| api::BlockStatus {
                            id: b.id,
                            job: b.job.clone(),
                            phase: b.phase.name().to_string(),
                            job_state: b.job_state.clone(),
                            managers: b.managers as u64,
                            dir: b.dir.display().to_string(),
                            stderr: b.stderr.display().to_string(),
                        })
                        .collect()
                }),
                managers: managers
                    .iter()
                    .filter(|m| c.admin || m.tenant == c.user)
                    .map(manager_status)
                    .collect(),
            }
        })
        .collect();
    let doc = api::StatusDocument {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: app.started.elapsed().as_secs_f64(),
        user: c.user.clone(),
        admin: c.admin,
        tasks: counts(if c.admin { &total } else { &mine }),
        tasks_per_s: rate,
        pools,
        quota: api::Quota {
            queued_bytes: mine.bytes,
            max_queued_bytes: app.limits.max_queued_bytes_per_user,
        },
        users: c
            .admin
            .then(|| users.iter().map(|(u, n)| (u.clone(), counts(n))).collect()),
        store: c.admin.then(|| api::StoreStatus {
            path: app.store_path.display().to_string(),
            size_bytes: app.reader.size_bytes(),
            healthy: app
                .shared
                .stats
                .lock()
                .map(|s| s.unavailable.is_none())
                .unwrap_or(false),
        }),
    };
    Ok(record_response(StatusCode::OK, &doc))
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
    Ok(record_response(
        StatusCode::ACCEPTED,
        &fnx_api::openapi::BlockActionAnswer {
            pool,
            block: id,
            action,
        },
    ))
}
