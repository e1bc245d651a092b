//! The SQL of one group commit: insert submitted tasks (with idempotency keys and the per-user
//! limit), register and delete functions, record dispatches, outcomes (only for tasks not yet
//! terminal: each outcome once) and fetch marks. Used by [`super::writer`] inside its
//! transaction; nothing here commits.

use super::writer::{Effects, FunctionInput, Shared, TaskInput};
use super::{encoding_code, State, StoreError};
use fnx_interchange::Finished;
use fnx_protocol::{Attempt, FunctionId, TaskId};
use rusqlite::{params, OptionalExtension, Transaction};
use std::collections::HashMap;

/// What became of one submit in the round.
pub(super) enum Staged {
    /// The first id, and the bytes of arguments and files stored.
    Created(u64, u64),
    Replayed(Vec<TaskId>),
    Rejected(StoreError),
}

/// The state one round's statements share.
pub(super) struct Ctx<'a> {
    pub(super) next_task: &'a mut u64,
    pub(super) next_seq: &'a mut u64,
    pub(super) next_function: &'a mut u64,
    pub(super) shared: &'a Shared,
    pub(super) limit: u64,
    pub(super) byte_limit: u64,
    pub(super) t: f64,
}

impl Ctx<'_> {
    pub(super) fn register(
        &mut self,
        tx: &Transaction<'_>,
        f: &FunctionInput,
    ) -> Result<FunctionId, StoreError> {
        let id = *self.next_function;
        let kind = f.spec.kind.name();
        let name = if f.name.is_empty() {
            format!("{kind}-{id}")
        } else {
            f.name.clone()
        };
        let mut spec = f.spec.clone();
        spec.name = Some(name.clone());
        tx.execute(
            "INSERT INTO functions(id, owner, name, kind, spec, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id as i64, f.owner, name, kind, serde_json::to_string(&spec)?, f.created],
        )?;
        *self.next_function += 1;
        Ok(FunctionId(id))
    }

    /// Insert one submit's tasks, unless its idempotency key was seen (the earlier ids) or it
    /// would exceed the user's limit; `live_extra` counts what earlier submits of this round
    /// added.
    pub(super) fn submit(
        &mut self,
        tx: &Transaction<'_>,
        owner: &str,
        tasks: &[TaskInput],
        key: Option<(&str, &str)>,
        live_extra: &mut HashMap<String, (u64, u64)>,
    ) -> Result<Staged, StoreError> {
        if let Some((key, fingerprint)) = key {
            let found: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT ids, fingerprint FROM idempotency WHERE owner = ?1 AND key = ?2",
                    params![owner, key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((ids, seen)) = found {
                // The same key with another body is another request: refuse it (the earlier
                // tasks stay as they are) instead of answering with their ids.
                if seen.as_deref().is_some_and(|s| s != fingerprint) {
                    return Ok(Staged::Rejected(StoreError::IdempotencyConflict {
                        key: key.to_string(),
                    }));
                }
                let (first, n) = ids.split_once(':').unwrap_or(("0", "0"));
                let (first, n): (u64, u64) = (first.parse().unwrap_or(0), n.parse().unwrap_or(0));
                return Ok(Staged::Replayed((first..first + n).map(TaskId).collect()));
            }
        }
        let n = tasks.len() as u64;
        let extra = live_extra.get(owner).copied().unwrap_or((0, 0));
        let (live, live_bytes) = {
            let s = self.shared.stats.lock().expect("stats");
            s.users
                .get(owner)
                .map_or((0, 0), |c| (c.queued + c.running, c.bytes))
        };
        let (live, live_bytes) = (live + extra.0, live_bytes + extra.1);
        // What each task stores (and the interchange holds until it ends): its arguments and
        // its files, as written below.
        let blobs = tasks
            .iter()
            .map(|t| {
                (!t.files.is_empty())
                    .then(|| rmp_serde::to_vec(&t.files))
                    .transpose()
            })
            .collect::<Result<Vec<Option<Vec<u8>>>, _>>()?;
        let bytes: u64 = tasks
            .iter()
            .zip(&blobs)
            .map(|(t, b)| (t.args.data.len() + b.as_ref().map_or(0, Vec::len)) as u64)
            .sum();
        if live_bytes + bytes > self.byte_limit {
            return Ok(Staged::Rejected(StoreError::ByteQuota {
                user: owner.to_string(),
                live: live_bytes,
                more: bytes,
                limit: self.byte_limit,
            }));
        }
        if live + n > self.limit {
            return Ok(Staged::Rejected(StoreError::QueueLimit {
                user: owner.to_string(),
                live,
                more: n,
                limit: self.limit,
            }));
        }
        let first = *self.next_task;
        let mut st = tx.prepare_cached(
            "INSERT INTO tasks(id, owner, function, pool, priority, walltime_ms, retries, encoding,
                               args, state, attempt, submitted, files, memory_mb)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, 0, ?10, ?11, ?12)",
        )?;
        for (i, (task, files)) in tasks.iter().zip(blobs).enumerate() {
            st.execute(params![
                (first + i as u64) as i64,
                owner,
                task.function.0 as i64,
                task.pool,
                task.priority,
                task.walltime_ms.map(|w| w as i64),
                task.retries,
                encoding_code(task.args.encoding),
                task.args.data,
                self.t,
                files,
                task.memory_mb
            ])?;
        }
        if let Some((key, fingerprint)) = key {
            tx.execute(
                "INSERT INTO idempotency(owner, key, ids, created, fingerprint)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![owner, key, format!("{first}:{n}"), self.t, fingerprint],
            )?;
        }
        *self.next_task += n;
        let e = live_extra.entry(owner.to_string()).or_default();
        *e = (e.0 + n, e.1 + bytes);
        Ok(Staged::Created(first, bytes))
    }

    /// Attempts that started on their managers: a daemon crash now counts against them.
    pub(super) fn started(
        &mut self,
        tx: &Transaction<'_>,
        tasks: &[(TaskId, Attempt)],
    ) -> Result<(), StoreError> {
        let mut st = tx.prepare_cached(
            "UPDATE tasks SET started = ?2 WHERE id = ?1 AND state = 1 AND attempt = ?2",
        )?;
        for (id, attempt) in tasks {
            st.execute(params![id.0 as i64, attempt.0])?;
        }
        Ok(())
    }

    /// Tasks handed to managers: running, with this attempt; one sent to an idle slot has
    /// started too (a daemon crash counts against it).
    pub(super) fn dispatched(
        &mut self,
        tx: &Transaction<'_>,
        tasks: &[(TaskId, Attempt, bool)],
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let mut first = tx.prepare_cached(
            "UPDATE tasks SET state = 1, attempt = ?2, started = CASE WHEN ?3 THEN ?2 END
             WHERE id = ?1 AND state = 0 RETURNING owner",
        )?;
        let mut again = tx.prepare_cached(
            "UPDATE tasks SET attempt = ?2, started = CASE WHEN ?3 THEN ?2 END
             WHERE id = ?1 AND state = 1",
        )?;
        for (id, attempt, direct) in tasks {
            let owner: Option<String> = first
                .query_row(params![id.0 as i64, attempt.0, direct], |r| r.get(0))
                .optional()?;
            match owner {
                Some(o) => fx.moves.push((o, Some(State::Queued), State::Running, 0)),
                None => {
                    again.execute(params![id.0 as i64, attempt.0, direct])?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn finished(
        &mut self,
        tx: &Transaction<'_>,
        done: &[Finished],
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let mut st = tx.prepare_cached(
            "UPDATE tasks SET state = ?2, attempt = max(attempt, ?3), seq = ?4, outcome = ?5,
                              finished = ?6
             WHERE id = ?1 AND state = ?7
             RETURNING owner, length(args) + coalesce(length(files), 0)",
        )?;
        for f in done {
            let state = State::of(&f.outcome);
            let blob = rmp_serde::to_vec_named(&f.outcome)?;
            let mut owner = None;
            for from in [State::Running, State::Queued] {
                owner = st
                    .query_row(
                        params![
                            f.id.0 as i64,
                            state as i64,
                            f.attempt.0,
                            *self.next_seq as i64,
                            blob,
                            self.t,
                            from as i64
                        ],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                    )
                    .optional()?
                    .map(|o| (o, from));
                if owner.is_some() {
                    break;
                }
            }
            match owner {
                Some(((o, bytes), from)) => {
                    *self.next_seq += 1;
                    fx.finished_states[(state as usize) - 2] += 1;
                    fx.moves.push((o, Some(from), state, -bytes));
                }
                None => tracing::warn!(
                    "discarded an outcome of {} ({}): the task is already finished or unknown",
                    f.id,
                    f.attempt
                ),
            }
        }
        Ok(())
    }

    pub(super) fn fetched(
        &mut self,
        tx: &Transaction<'_>,
        fetched: &[(String, u64, u64)],
        ids: &[TaskId],
    ) -> Result<(), StoreError> {
        let mut range = tx.prepare_cached(
            "UPDATE tasks SET fetched = ?4 WHERE owner = ?1 AND seq > ?2 AND seq <= ?3
             AND fetched IS NULL",
        )?;
        for (owner, after, upto) in fetched {
            range.execute(params![owner, *after as i64, *upto as i64, self.t])?;
        }
        let mut one = tx.prepare_cached(
            "UPDATE tasks SET fetched = ?2 WHERE id = ?1 AND state >= 2 AND fetched IS NULL",
        )?;
        for id in ids {
            one.execute(params![id.0 as i64, self.t])?;
        }
        Ok(())
    }
}
