//! Memory limits: where a task's comes from, the workers' memory cgroups, and sampling.

use super::*;

/// A task's memory limit and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// The task's own `memory_mb` (else the pool's `mem_per_worker`).
    pub own: bool,
}

impl Limit {
    /// The limit of `spec` in a pool whose workers have `pool` bytes.
    pub(super) fn of(spec: &TaskSpec, pool: Option<u64>) -> Option<Limit> {
        match spec.memory_mb {
            Some(mb) => Some(Limit {
                bytes: u64::from(mb) << 20,
                own: true,
            }),
            None => pool.map(|bytes| Limit { bytes, own: false }),
        }
    }

    /// Where it was set, for messages.
    pub fn source(self) -> &'static str {
        if self.own {
            "the task's memory_mb"
        } else {
            "the pool's mem_per_worker"
        }
    }
}

/// A memory cgroup per worker, if the node allows them, for tasks with memory limits
/// (`limit`: the pool's, if any, bytes); says which.
pub fn memory_cgroups(limit: u64) -> Option<fnx_sys::cgroup::MemoryCgroups> {
    let what = match limit {
        0 => "tasks' own memory limits".to_string(),
        l => format!("memory limit {} MiB per worker", l >> 20),
    };
    match fnx_sys::cgroup::MemoryCgroups::create() {
        Ok(c) => {
            tracing::info!(
                "{what}: held by a memory cgroup per worker under {}",
                c.dir().display()
            );
            Some(c)
        }
        Err(e) => {
            tracing::info!(
                "{what}: sampled every {} ms (no cgroup per worker: {e})",
                MEM_SAMPLE.as_millis()
            );
            None
        }
    }
}

impl<I: Io> Pool<I> {
    /// With a memory limit: measure each running task's process group every [`MEM_SAMPLE`],
    /// and kill a task over the limit (it fails as `memory_exceeded`; the worker slot is
    /// started again, the other tasks go on).
    pub(super) fn check_memory(&mut self, now: Instant) {
        if !self.limits || now < self.mem_sampled + MEM_SAMPLE {
            return;
        }
        self.mem_sampled = now;
        let groups: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.task.as_ref().is_some_and(Running::sampled))
            .map(|(&pid, _)| pid)
            .collect();
        if groups.is_empty() {
            return;
        }
        for (pid, rss) in self.io.rss_of_groups(&groups) {
            let Some(r) = self.procs.get_mut(&pid).and_then(|p| p.task.as_mut()) else {
                continue;
            };
            r.peak_rss = r.peak_rss.max(rss);
            let (Some(limit), Some(above)) = (r.limit, r.kill_above()) else {
                continue;
            };
            if rss > above {
                tracing::warn!(
                    "task {} uses {} MiB, over its limit of {} MiB: killing it",
                    r.id,
                    rss >> 20,
                    limit.bytes >> 20
                );
                self.force_kill(pid, outcome::memory_exceeded(rss, limit));
            }
        }
    }

    /// Hold the Python worker `pid` to the limit of the task it now runs: its memory cgroup
    /// gets that limit (none for a task without one); a worker without a cgroup is moved into
    /// a new one where the node allows it. Where neither works the task is sampled.
    pub(super) fn hold_worker_to_limit(&mut self, pid: u32) {
        let Some(r) = self.procs.get_mut(&pid).and_then(|p| p.task.as_mut()) else {
            return;
        };
        // Sampled, the worker's peak so far was measured against the last task's limit: a
        // task with a limit of its own is measured from its start.
        if r.limit.is_some_and(|l| l.own) {
            self.io.reset_peak_rss(pid);
        }
        r.held_by_cgroup = self.io.hold(pid, r.limit.map(|l| l.bytes));
        if r.limit.is_some() && !r.held_by_cgroup {
            tracing::debug!(
                "task {} on worker {pid} is sampled, not held by a cgroup",
                r.id
            );
        }
    }
}
