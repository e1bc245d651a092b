//! Dispatch: queued tasks to managers in batches, and reclaiming prefetched tasks for idle
//! workers.

use super::*;
use fnx_protocol::TaskSpec;

impl Interchange {
    /// Hand queued tasks to managers with free capacity, in batches, round-robin; each manager
    /// gets tasks of the worker environments it has warm first ([`crate::routing`]).
    ///
    /// Each visit gives a manager at most an even share of the queue (`queued / ready
    /// managers`, rounded up), so a short queue is spread over all managers instead of filling
    /// the first one's prefetch. Tasks go beyond a manager's slots (prefetch) only while there
    /// are more queued tasks than idle slots. When the queue is empty while workers idle and
    /// another manager holds prefetched tasks, that manager is asked to give some back
    /// ([`InterchangeToManager::Reclaim`]).
    pub fn dispatch(&mut self, comm: &mut impl Comm) {
        let mut share = 0;
        let mut visits_left = 0;
        let mut prefetch = true;
        while self.queued > 0 {
            if visits_left == 0 {
                // A new round: recompute the even share over the managers that can take work.
                visits_left = self.ready.len().max(1);
                share = self.queued.div_ceil(visits_left);
                let idle: usize = self
                    .ready
                    .iter()
                    .filter_map(|id| self.managers.get(id))
                    .map(ManagerRec::idle_slots)
                    .sum();
                prefetch = self.queued > idle;
            }
            visits_left -= 1;
            let Some(mid) = self.ready.pop_front() else {
                return;
            };
            let Some(m) = self.managers.get_mut(&mid) else {
                continue;
            };
            m.in_ready = false;
            let free = m.capacity.saturating_sub(m.inflight.len());
            if free == 0 || m.draining {
                continue;
            }
            let mut limit = free.min(self.config.max_batch_tasks).min(share);
            if !prefetch {
                limit = limit.min(m.idle_slots());
            }
            // Tasks for the manager's idle slots start at once; the rest wait in its queue.
            let direct = m.idle_slots();
            let mut tasks = Vec::with_capacity(limit.min(self.queued));
            let mut functions = Vec::new();
            let mut bytes = 0usize;
            // Places in `tasks` whose inputs are in the host's store.
            let mut stored = Vec::new();
            while tasks.len() < limit && self.queued > 0 {
                if !tasks.is_empty() && bytes >= self.config.max_batch_bytes {
                    break;
                }
                let Some((_, id)) = self.queues.pop_for(|env| m.is_warm(env)) else {
                    break;
                };
                let Some(rec) = self.tasks.get_mut(&id) else {
                    continue;
                }; // cancelled while queued
                if rec.state != TaskState::Queued {
                    continue;
                }
                self.queued -= 1;
                rec.attempt = rec.attempt.next();
                rec.state = TaskState::Running(mid);
                if m.functions_sent.insert(rec.function) {
                    if let Some(def) = self.functions.get(&rec.function) {
                        functions.push(def.clone());
                    }
                }
                bytes += match rec.stored {
                    Some(n) => {
                        stored.push(tasks.len());
                        n as usize
                    }
                    None => rec.args.data.len(),
                };
                m.hold(id, rec.env);
                tasks.push(TaskSpec {
                    id,
                    attempt: rec.attempt,
                    function: rec.function,
                    args: rec.args.clone(),
                    walltime_ms: rec.walltime_ms,
                    files: rec.files.to_vec(),
                    memory_mb: rec.memory_mb,
                });
            }
            let mut failed_loads = 0;
            let mut store_failing = false;
            if !stored.is_empty() {
                let ids: Vec<TaskId> = stored.iter().map(|&i| tasks[i].id).collect();
                let mut loaded = comm.load(&ids).into_iter();
                // Gone from the store: the task fails. The store failing: it waits (at the
                // front of its queue, its attempt not spent) for the next dispatch.
                let mut gone = Vec::new();
                let mut later = Vec::new();
                for &i in &stored {
                    match loaded.next() {
                        Some(Ok(inputs)) => {
                            tasks[i].args = inputs.args;
                            tasks[i].files = inputs.files;
                        }
                        Some(Err(LoadError::Store(_))) | None => later.push(tasks[i].id),
                        Some(Err(e)) => gone.push((tasks[i].id, e)),
                    }
                }
                failed_loads = gone.len() + later.len();
                store_failing = !later.is_empty();
                // One pass, whatever the number that failed (a failing store fails them all).
                let out: HashSet<TaskId> = gone
                    .iter()
                    .map(|g| g.0)
                    .chain(later.iter().copied())
                    .collect();
                tasks.retain(|t| !out.contains(&t.id));
                for (id, why) in gone {
                    let Some(rec) = self.tasks.remove(&id) else {
                        continue;
                    };
                    m.release(id, rec.env);
                    comm.finished(Finished {
                        id,
                        attempt: rec.attempt,
                        outcome: Outcome::Err(TaskError::new(
                            ErrorKind::BadInput,
                            "InputsUnreadable",
                            format!("its inputs cannot be read back from the store: {why}"),
                        )),
                    });
                }
                // Last first: pushed to the front, they keep their order.
                for id in later.into_iter().rev() {
                    let Some(rec) = self.tasks.get_mut(&id) else {
                        continue;
                    };
                    m.release(id, rec.env);
                    rec.attempt = Attempt(rec.attempt.0.saturating_sub(1));
                    rec.state = TaskState::Queued;
                    self.queues.push_front(rec.env, rec.priority, id);
                    self.queued += 1;
                }
            }
            if tasks.is_empty() {
                // The functions sent with this batch did not go out after all.
                for f in &functions {
                    m.functions_sent.remove(&f.id);
                }
                // Every input in the batch failed to load: the manager still has room.
                if failed_loads > 0 && !m.in_ready && m.inflight.len() < m.capacity {
                    m.in_ready = true;
                    self.ready.push_back(mid);
                }
                if store_failing {
                    break;
                }
                continue;
            }
            m.idle_since = None;
            if m.inflight.len() < m.capacity {
                m.in_ready = true;
                self.ready.push_back(mid);
            }
            comm.dispatched(mid, &tasks, direct.min(tasks.len()));
            comm.send(&m.peer, &InterchangeToManager::Tasks { functions, tasks });
            if store_failing {
                // Tried again at the next dispatch, not in a loop here.
                break;
            }
        }
        self.maybe_reclaim(comm);
    }

    /// A manager started attempts it held: report those that are its current ones (a late
    /// report of a superseded attempt is dropped).
    pub(super) fn on_started(
        &mut self,
        mid: ManagerId,
        tasks: &[(TaskId, Attempt)],
        comm: &mut impl Comm,
    ) {
        let current: Vec<(TaskId, Attempt)> = tasks
            .iter()
            .copied()
            .filter(|(id, attempt)| {
                self.tasks
                    .get(id)
                    .is_some_and(|t| t.state == TaskState::Running(mid) && t.attempt == *attempt)
            })
            .collect();
        if !current.is_empty() {
            comm.started(&current);
        }
    }

    /// Nothing queued, some worker idle, and some manager holds tasks beyond its slots: ask the
    /// manager with the most to give back as many as there are idle slots (one request at a time
    /// per manager).
    fn maybe_reclaim(&mut self, comm: &mut impl Comm) {
        if self.queued > 0 {
            return;
        }
        let idle: usize = self.managers.values().map(ManagerRec::idle_slots).sum();
        if idle == 0 {
            return;
        }
        let donor = self
            .managers
            .iter_mut()
            .filter(|(_, m)| !m.draining && !m.reclaim_pending && m.excess() > 0)
            .max_by_key(|(_, m)| m.excess());
        if let Some((_, m)) = donor {
            m.reclaim_pending = true;
            let max = m.excess().min(idle) as u32;
            comm.send(&m.peer, &InterchangeToManager::Reclaim { max });
        }
    }
}
