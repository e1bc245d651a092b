//! Recovery at start: read the store's functions, unfinished tasks and per-user counts, and
//! hand them to the pools (tasks run again; those of a crash loop fail as `daemon_crashed`).

use super::{DaemonError, LocalPool};
use crate::store::writer::{Cmd, UserCounts};
use crate::store::{self, State};
use fnx_interchange::{Finished, NewTask};
use fnx_protocol::{ErrorKind, FunctionDef, Outcome, TaskError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Instant;

/// What the store holds for a start: read in full before any pool starts, so that a damaged
/// store stops the daemon before it has started anything.
pub(super) struct Loaded {
    /// Functions, with the key of the image build each one waits for, and whether it was
    /// deleted (then it is held only until its unfinished tasks end).
    pub(super) functions: Vec<(FunctionDef, Option<String>, bool)>,
    tasks: Vec<store::Recovered>,
    counts: HashMap<String, UserCounts>,
    started: Instant,
}

/// Read stored functions, unfinished tasks and per-user counts.
pub(super) fn load(
    conn: &rusqlite::Connection,
    path: &Path,
    per_user: bool,
    spill_bytes: u64,
) -> Result<Loaded, DaemonError> {
    let serr = |source| super::store_failure(path, source);
    let started = Instant::now();
    let tasks = store::unfinished(conn, spill_bytes).map_err(serr)?;
    // Deleted functions are held only while tasks of theirs are unfinished.
    let used: std::collections::HashSet<fnx_protocol::FunctionId> =
        tasks.iter().map(|t| t.task.function).collect();
    let functions = store::all_functions(conn)
        .map_err(serr)?
        .into_iter()
        .filter(|f| !f.deleted || used.contains(&f.id))
        .filter_map(|f| {
            if let Some(why) = &f.damaged {
                tracing::error!(
                    "function {} of {}: {why}; its tasks fail until it is registered again",
                    f.id,
                    f.owner
                );
            }
            let body = f.spec.body()?;
            let def = FunctionDef {
                id: f.id,
                body,
                container: crate::images::container_of(&f.spec),
                owner: (!per_user).then(|| f.owner.clone()),
            };
            Some((def, f.spec.build_key().map(str::to_string), f.deleted))
        })
        .collect();
    let mut counts: HashMap<String, UserCounts> = HashMap::new();
    {
        let mut st = conn
            .prepare("SELECT owner, state, count(*) FROM tasks GROUP BY owner, state")
            .map_err(|e| serr(e.into()))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| serr(e.into()))?;
        for row in rows {
            let (owner, state, n) = row.map_err(|e| serr(e.into()))?;
            // A state code that is none (a damaged row) counts as finished: the row is shown
            // as a damaged record, and never dispatched.
            let state = State::from_i64(state).unwrap_or_else(|| {
                tracing::error!(
                    "{n} tasks of {owner} have the unknown state code {state} (a damaged \
                     store): they count as finished"
                );
                State::Failed
            });
            let c = counts.entry(owner).or_default();
            match state {
                State::Queued => c.queued += n as u64,
                State::Running => c.running += n as u64,
                _ => c.finished += n as u64,
            }
        }
    }
    {
        let mut st = conn
            .prepare(
                "SELECT owner, sum(length(args) + coalesce(length(files), 0)) FROM tasks
                 WHERE state < 2 GROUP BY owner",
            )
            .map_err(|e| serr(e.into()))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| serr(e.into()))?;
        for row in rows {
            let (owner, bytes) = row.map_err(|e| serr(e.into()))?;
            counts.entry(owner).or_default().bytes = bytes as u64;
        }
    }
    Ok(Loaded {
        functions,
        tasks,
        counts,
        started,
    })
}

/// Hand stored functions and unfinished tasks to the pools; returns per-user counts.
pub(super) fn recover(
    loaded: Loaded,
    pools: &[LocalPool],
    names: &[String],
    writer: &Sender<Cmd>,
    builds: &crate::builds::Builds,
    per_user: bool,
    crash_limit: u32,
) -> HashMap<String, UserCounts> {
    for (def, build, _) in &loaded.functions {
        for p in pools {
            p.handle.add_function(def.clone());
        }
        if let Some(key) = build {
            // Its tasks wait until the image exists; an interrupted build starts again.
            let handles = pools.iter().map(|p| p.handle.clone()).collect();
            crate::images::hold_until_built(builds, key, def.id, handles);
        }
    }
    let (total, mut rerun) = (loaded.tasks.len(), 0usize);
    // Per pool, per tenant (the owner in `unix` mode, else the shared tenant "").
    let mut per_pool: Vec<HashMap<String, Vec<NewTask>>> =
        pools.iter().map(|_| HashMap::new()).collect();
    let mut orphans = Vec::new();
    let mut crashed = 0usize;
    for t in loaded.tasks {
        // Counts grow only at a crash, for the tasks running then (now queued again).
        if t.crashes >= crash_limit {
            // It may be what kills the daemon: running it again could crash it again, forever
            // under a supervisor that restarts it.
            crashed += 1;
            orphans.push(Finished {
                id: t.task.id,
                attempt: t.task.attempt,
                outcome: Outcome::Err(TaskError::new(
                    ErrorKind::DaemonCrashed,
                    "DaemonCrashed",
                    format!(
                        "the fnx daemon crashed {} times in a row while this task ran; it is \
                         not run again (limits.max_daemon_crashes = {crash_limit})",
                        t.crashes
                    ),
                )),
            });
            continue;
        }
        rerun += t.was_running as usize;
        match names.iter().position(|n| *n == t.pool) {
            Some(i) => per_pool[i]
                .entry(if per_user { t.owner } else { String::new() })
                .or_default()
                .push(t.task),
            None => orphans.push(Finished {
                id: t.task.id,
                attempt: t.task.attempt,
                outcome: Outcome::Err(TaskError::new(
                    ErrorKind::BadInput,
                    "UnknownPool",
                    format!("pool {:?} is no longer configured", t.pool),
                )),
            }),
        }
    }
    for (p, tenants) in pools.iter().zip(per_pool) {
        for (tenant, tasks) in tenants {
            p.handle.submit_as(&tenant, tasks);
        }
        // After the tasks: each deleted function goes once its last task has ended.
        for (def, _, deleted) in &loaded.functions {
            if *deleted {
                p.handle.remove_function(def.id);
            }
        }
    }
    if crashed > 0 {
        tracing::warn!(
            "{crashed} tasks were running in each of the last {crash_limit} daemon crashes; \
             they fail as daemon_crashed"
        );
    }
    if orphans.len() > crashed {
        tracing::warn!(
            "{} unfinished tasks name a pool that is no longer configured; they fail",
            orphans.len() - crashed
        );
    }
    if !orphans.is_empty() {
        let _ = writer.send(Cmd::Finished(orphans));
    }
    if total > 0 {
        tracing::info!(
            "recovered {total} unfinished tasks ({rerun} were running and run again with a new attempt) in {:.2} s",
            loaded.started.elapsed().as_secs_f64()
        );
    }
    loaded.counts
}
