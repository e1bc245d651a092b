//! Worker environments: a function may name a container, and the Python workers started in
//! one container serve every function that names it. Workers of an environment stay warm
//! while they have work; an idle worker of a function's container exits after
//! `container_idle`, or at once when its slot is needed for another environment and no task of
//! its own waits. The interchange is told the workers per environment whenever they change,
//! so it can route tasks to the managers that have their container warm.

use super::*;
use crate::procs::Wrap;
use fnx_protocol::{FunctionDef, WarmWorkers};
use std::collections::BTreeMap;

/// How many younger tasks idle workers of other environments may run before the queue's
/// oldest task, waiting for a worker of its own environment, gets one by stopping an idle
/// worker.
pub(super) const BYPASS_LIMIT: u32 = 32;

impl<I: Io> Pool<I> {
    /// Learn the environment of `def` and how its workers start; returns its name.
    pub(super) fn add_env(&mut self, def: &FunctionDef) -> String {
        let env = def.env();
        if !self.envs.contains_key(&env) {
            let wrap = match &def.container {
                None => Ok(self.default_wrap().cloned()),
                Some(fc) => {
                    let pool = self.cfg.container.as_ref().map(|w| &w.container);
                    fc.resolve(pool).map(|container| {
                        Some(Wrap {
                            container,
                            rundir: self.cfg.run_dir.clone(),
                        })
                    })
                }
            };
            match &wrap {
                Err(e) => tracing::error!("tasks of {} cannot run on this node: {e}", def.id),
                Ok(Some(w)) if def.container.is_some() => tracing::info!(
                    "{} runs in container {} ({} {})",
                    def.id,
                    fnx_protocol::split_env(&env).0,
                    w.container.runtime.name(),
                    w.container.image
                ),
                Ok(_) => {}
            }
            self.envs.insert(env.clone(), wrap);
        }
        env
    }

    /// How processes of `env` start (`Ok(None)`: on the host), or why they cannot here.
    pub(super) fn env_wrap(
        &self,
        env: &str,
    ) -> Result<Option<&Wrap>, fnx_protocol::ContainerError> {
        match self.envs.get(env) {
            Some(Ok(w)) => Ok(w.as_ref()),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(self.default_wrap()),
        }
    }

    /// The container of functions that name none: the pool's, if it is for all.
    fn default_wrap(&self) -> Option<&Wrap> {
        self.cfg
            .container
            .as_ref()
            .filter(|w| w.container.is_for_all())
    }

    /// Whether worker `p` can take a task now.
    pub(super) fn is_idle_worker(p: &Proc) -> bool {
        p.is_ready()
            && p.task.is_none()
            && p.next.is_none()
            && p.exit.is_none()
            && p.retiring.is_none()
    }

    /// Worker `pid` has no task now (it became ready, or its task ended with nothing behind
    /// it): it is idle from `now`, and the next task of its environment may take it.
    pub(super) fn became_idle(&mut self, pid: u32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if !Self::is_idle_worker(p) {
            return;
        }
        p.idle_since = Some(self.now);
        if !p.env.is_empty() {
            let due = self.now + self.cfg.container_idle;
            super::earlier(&mut self.next_retire, Some(due));
        }
        let env = p.env.clone();
        let workers = self.procs.len();
        let stack = self.idle.entry(env).or_default();
        stack.push(pid);
        // Entries of workers given a task by a scan, or gone, stay until popped: compacted
        // when the stack outgrows the workers.
        if stack.len() > 2 * workers + 16 {
            let mut seen = HashSet::new();
            let procs = &self.procs;
            stack.retain(|pid| {
                procs.get(pid).is_some_and(Self::is_idle_worker) && seen.insert(*pid)
            });
        }
    }

    /// An idle worker of `env` from those that became idle, newest first (the stale entries
    /// are dropped on the way).
    pub(super) fn take_idle(&mut self, env: &str) -> Option<u32> {
        let stack = self.idle.get_mut(env)?;
        while let Some(pid) = stack.pop() {
            if self
                .procs
                .get(&pid)
                .is_some_and(|p| Self::is_idle_worker(p) && p.env == env)
            {
                return Some(pid);
            }
        }
        None
    }

    /// Stop idle workers of function containers that have had no task for `container_idle`;
    /// kill stopping workers that outlive the kill grace. Looks at the workers only when one
    /// may be due (`next_retire`), then finds the next.
    pub(super) fn retire_idle(&mut self, now: Instant) {
        if self.next_retire.is_none_or(|at| now < at) {
            return;
        }
        let (limit, grace) = (self.cfg.container_idle, self.cfg.kill_grace);
        let mut retire = Vec::new();
        let mut next = None;
        for (&pid, p) in self.procs.iter_mut() {
            if let Some(at) = p.retiring {
                if p.exit.is_none() {
                    if now.saturating_duration_since(at) > grace {
                        // Again every grace until it is reaped.
                        self.io.signal_group(pid, libc::SIGKILL);
                        super::earlier(&mut next, Some(now + grace));
                    } else {
                        super::earlier(&mut next, Some(at + grace + Duration::from_millis(1)));
                    }
                }
                continue;
            }
            if p.env.is_empty() || !Self::is_idle_worker(p) {
                continue;
            }
            let since = *p.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= limit {
                retire.push(pid);
            } else {
                super::earlier(&mut next, Some(since + limit));
            }
        }
        self.next_retire = next;
        for pid in retire {
            self.retire(pid, "idle past container_idle");
        }
    }

    /// Tell worker `pid` to exit.
    pub(super) fn retire(&mut self, pid: u32, why: &str) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.is_python() && p.retiring.is_none() {
            tracing::info!("stopping worker {pid} of environment {:?}: {why}", p.env);
            self.io.send_exit(pid);
            p.retiring = Some(self.now);
            self.live -= 1;
            let kill = self.now + self.cfg.kill_grace + Duration::from_millis(1);
            super::earlier(&mut self.next_retire, Some(kill));
        }
    }

    /// Make room for a worker of `env`: stop an idle worker whose environment has no queued
    /// task, or (when `env` is the oldest task's and it was passed over `BYPASS_LIMIT` times)
    /// the idle worker that waited longest. False if there is none.
    pub(super) fn make_room(&mut self, env: &str) -> bool {
        let queued_envs: std::collections::HashSet<&str> = self
            .queue
            .iter()
            .filter_map(|t| self.functions.get(&t.function))
            .map(|f| f.env.as_str())
            .collect();
        let head = self.queue.front();
        let head_env = head
            .and_then(|t| self.functions.get(&t.function))
            .map(|f| f.env.as_str());
        let starved = head_env == Some(env)
            && self.head_bypass.0 == head.map(|t| t.id)
            && self.head_bypass.1 >= BYPASS_LIMIT;
        let victim = self
            .procs
            .iter()
            .filter(|(_, p)| Self::is_idle_worker(p) && p.env != env)
            .filter(|(_, p)| starved || !queued_envs.contains(p.env.as_str()))
            .min_by_key(|(_, p)| p.idle_since)
            .map(|(&pid, _)| pid);
        match victim {
            Some(pid) => {
                self.retire(pid, &format!("its slot is needed for {env:?}"));
                true
            }
            None => false,
        }
    }

    /// Count a start of a worker of `env`.
    pub(super) fn count_start(&mut self, env: &str) {
        let n = self.starts.entry(env.to_string()).or_default();
        *n += 1;
        if !env.is_empty() {
            let (container, owner) = fnx_protocol::split_env(env);
            let whose = owner.map(|o| format!(" for user {o}")).unwrap_or_default();
            let place = if container.is_empty() {
                "on the host or the pool's container".to_string()
            } else {
                format!("in container {container}")
            };
            tracing::info!("starting a worker {place}{whose} (start {n} of it here)");
        }
    }

    /// Send the workers per environment to the interchange if they changed.
    pub(super) fn report_warm(&mut self) {
        // Cheap test first (every step): any change of the workers changes their number or
        // the starts.
        let live = self.live;
        let starts: u64 = self.starts.values().sum();
        if (live, starts) == (self.warm_sent.1, self.warm_sent.2) && !self.warm_sent.0.is_empty() {
            return;
        }
        let mut workers: BTreeMap<&str, u32> = BTreeMap::new();
        for p in self.procs.values() {
            if p.is_python() && p.retiring.is_none() && p.exit.is_none() {
                *workers.entry(p.env.as_str()).or_default() += 1;
            }
        }
        let changed = self.warm_sent.0.len() != self.starts.len()
            || self.warm_sent.0.iter().any(|w| {
                workers.get(w.env.as_str()).copied().unwrap_or(0) != w.workers
                    || self.starts.get(&w.env).copied().unwrap_or(0) != w.starts
            });
        if !changed {
            self.warm_sent = (std::mem::take(&mut self.warm_sent.0), live, starts);
            return;
        }
        let mut report: Vec<WarmWorkers> = self
            .starts
            .iter()
            .map(|(env, &starts)| WarmWorkers {
                env: env.clone(),
                workers: workers.get(env.as_str()).copied().unwrap_or(0),
                starts,
            })
            .collect();
        report.sort_by(|a, b| a.env.cmp(&b.env));
        self.send(&ManagerToInterchange::Warm(report.clone()));
        self.warm_sent = (report, live, starts);
    }
}
