//! Starting tasks: idle workers of the task's environment first, new workers up to the slots
//! (stopping idle workers of other environments to make room), shell commands, and pipelining
//! one small task behind each running one.

use super::*;

impl<I: Io> Pool<I> {
    pub(super) fn busy(&self) -> usize {
        self.busy
    }

    /// The slot a new process starts in. A Python worker keeps its slot for life (at most
    /// `slots` of them exist); a shell task takes a slot no running task uses, preferring one
    /// no idle Python worker holds either. Starting happens only below `slots` busy processes,
    /// so such a slot exists.
    fn pick_slot(&self, python: bool) -> usize {
        let held = |f: &dyn Fn(&Proc) -> bool| -> Vec<usize> {
            self.procs
                .values()
                .filter(|p| f(p))
                .map(|p| p.slot)
                .collect()
        };
        let python_slots = held(&|p| p.is_python());
        let busy_slots = held(&|p| p.task.is_some());
        let free = |taken: &[usize]| (0..self.cfg.slots).find(|s| !taken.contains(s));
        if python {
            return free(&python_slots).unwrap_or(0);
        }
        let mut either = python_slots;
        either.extend(&busy_slots);
        free(&either).or_else(|| free(&busy_slots)).unwrap_or(0)
    }

    fn slot_plan(&self, slot: usize) -> fnx_sys::placement::SlotPlan {
        self.cfg.placement.get(slot).cloned().unwrap_or_default()
    }

    pub(super) fn schedule(&mut self) {
        while let Some(spec) = self.queue.front() {
            if self.busy() >= self.cfg.slots {
                break;
            }
            let Some(func) = self.functions.get(&spec.function) else {
                let spec = self.queue.pop_front().expect("front exists");
                let e = TaskError::new(
                    ErrorKind::ImportError,
                    "UnknownFunction",
                    format!("{} was never sent to this manager", spec.function),
                );
                self.push_result(spec.id, spec.attempt, Outcome::Err(e));
                continue;
            };
            if let Err(why) = self.env_wrap(&func.env) {
                let spec = self.queue.pop_front().expect("front exists");
                let e = TaskError::new(
                    ErrorKind::ImportError,
                    "ContainerUnavailable",
                    why.to_string(),
                );
                self.push_result(spec.id, spec.attempt, Outcome::Err(e));
                continue;
            }
            if func.body.is_python() {
                if !self.start_python_task() {
                    self.run_out_of_order();
                    break;
                }
            } else {
                self.start_shell_task();
            }
        }
        self.pipeline();
    }

    /// The oldest task waits for a worker of its environment: idle workers of other
    /// environments take the oldest queued task of their own meanwhile, at most
    /// [`envs::BYPASS_LIMIT`] times per oldest task.
    fn run_out_of_order(&mut self) {
        let Some(head) = self.queue.front().map(|t| t.id) else {
            return;
        };
        if self.head_bypass.0 != Some(head) {
            self.head_bypass = (Some(head), 0);
        }
        // With a worker of the oldest task's environment alive (starting or busy), it gets
        // that worker anyway: passing it costs it nothing, so the limit does not apply.
        let head_env = self
            .queue
            .front()
            .and_then(|t| self.functions.get(&t.function))
            .map(|f| f.env.clone())
            .unwrap_or_default();
        let served = self.procs.values().any(|p| {
            p.is_python() && p.env == head_env && p.retiring.is_none() && p.exit.is_none()
        });
        while self.busy() < self.cfg.slots && (served || self.head_bypass.1 < envs::BYPASS_LIMIT) {
            let idle: Vec<(u32, String)> = self
                .procs
                .iter()
                .filter(|(_, p)| Self::is_idle_worker(p))
                .map(|(&pid, p)| (pid, p.env.clone()))
                .collect();
            let found = idle.into_iter().find_map(|(pid, env)| {
                self.queue
                    .iter()
                    .position(|t| {
                        self.functions
                            .get(&t.function)
                            .is_some_and(|f| f.body.is_python() && f.env == env)
                    })
                    .map(|i| (pid, i))
            });
            let Some((pid, i)) = found else {
                return;
            };
            let spec = self.queue.remove(i).expect("found above");
            self.run_on(pid, spec);
            if !served {
                self.head_bypass.1 += 1;
            }
        }
    }

    /// Every Python worker is busy and tasks wait: write one small task behind each running
    /// one that will end soon (its function is known to be quick, see [`PIPELINE_BEHIND`]), so
    /// workers go from task to task without waiting for the manager. Never behind a task that
    /// may run long: the task in its pipe would wait for it while another worker sits idle.
    pub(super) fn pipeline(&mut self) {
        // Some process without a task: a worker idle or starting.
        if self.queue.is_empty() || self.procs.len() > self.busy {
            return;
        }
        while let Some(pid) = self.pipe_candidates.pop() {
            let Some(spec) = self.queue.front() else {
                self.pipe_candidates.push(pid);
                return;
            };
            let can = self.procs.get(&pid).is_some_and(|p| {
                p.next.is_none()
                    && p.exit.is_none()
                    && p.task
                        .as_ref()
                        .is_some_and(|r| r.forced.is_none() && self.ends_soon(r))
                    && p.is_ready()
            });
            if !can {
                // Its task ended, was killed, or may run long: it is not looked at again
                // until it starts another.
                continue;
            }
            let Some(func) = self.functions.get(&spec.function) else {
                self.pipe_candidates.push(pid);
                return;
            };
            let proc = self.procs.get_mut(&pid).expect("checked above");
            let Kind::Python { defined, .. } = &mut proc.kind else {
                continue;
            };
            // It starts before the manager hears the running task end: only behind a task with
            // the same memory limit (the worker's cgroup and peak are set per task).
            let same_limit = proc.task.as_ref().map(|r| r.limit)
                == Some(super::Limit::of(spec, self.cfg.mem_limit));
            if !func.body.is_python()
                || !spec.files.is_empty()
                || spec.args.data.len() > PIPELINE_MAX_ARGS
                || !defined.contains(&spec.function)
                || proc.env != func.env
                || !same_limit
            {
                self.pipe_candidates.push(pid);
                return;
            }
            let spec = self.queue.pop_front().expect("front exists");
            if let Err(e) = self.io.send_task(pid, None, &spec, None) {
                tracing::warn!("cannot send a task to worker {pid}: {e}");
                self.io.signal_group(pid, libc::SIGKILL);
            }
            proc.next = Some(Pipelined {
                spec,
                cancelled: false,
            });
        }
    }

    /// Worker `pid` started a task: a task may be pipelined behind it. The stack is only popped
    /// while every worker is busy, so it is compacted when it outgrows the workers (to the
    /// workers that can still take one, each once).
    pub(super) fn note_candidate(&mut self, pid: u32) {
        self.pipe_candidates.push(pid);
        if self.pipe_candidates.len() > 2 * self.procs.len() + 16 {
            let mut seen = HashSet::new();
            let procs = &self.procs;
            self.pipe_candidates.retain(|pid| {
                procs
                    .get(pid)
                    .is_some_and(|p| p.task.is_some() && p.next.is_none())
                    && seen.insert(*pid)
            });
        }
    }

    /// Whether running task `r` is quick enough to pipeline another one behind: its function's
    /// tasks ran at most [`PIPELINE_BEHIND`] here so far, and it has not run twice that.
    fn ends_soon(&self, r: &Running) -> bool {
        self.run_times
            .get(&r.function)
            .is_some_and(|t| t.0 <= PIPELINE_BEHIND)
            && self.now.saturating_duration_since(r.started) <= 2 * PIPELINE_BEHIND
    }

    /// Hand the queue's head to an idle worker of its environment; `false` if none is ready
    /// (workers are started or stopped for it).
    pub(super) fn start_python_task(&mut self) -> bool {
        let env = self
            .queue
            .front()
            .and_then(|t| self.functions.get(&t.function));
        let env = env.map(|f| f.env.clone()).unwrap_or_default();
        let idle = self.take_idle(&env).or_else(|| {
            // Not found among those that became idle: look at every worker (a worker is
            // never lost to a missed note).
            self.procs
                .iter()
                .find(|(_, p)| Self::is_idle_worker(p) && p.env == env)
                .map(|(&pid, _)| pid)
        });
        let Some(pid) = idle else {
            self.spawn_workers_for_queue();
            return false;
        };
        let spec = self.queue.pop_front().expect("front exists");
        self.run_on(pid, spec);
        true
    }

    /// Run `spec` on the idle Python worker `pid`.
    fn run_on(&mut self, pid: u32, spec: TaskSpec) {
        let sandbox = match self.io.sandbox(&spec) {
            Ok(s) => s,
            Err(e) => return self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        };
        let body = &self.functions[&spec.function].body;
        let proc = self.procs.get_mut(&pid).expect("an idle worker");
        let Kind::Python { defined, .. } = &mut proc.kind else {
            unreachable!("found as python")
        };
        let def = defined.insert(spec.function).then_some(body);
        let cwd = sandbox.as_ref().map(|s| s.dir().to_path_buf());
        // Its clock starts now, after its files were placed.
        let started = self.io.now();
        let running = Running {
            sandbox,
            ..Running::start(&spec, self.cfg.mem_limit, started)
        };
        let deadline = running.deadline;
        proc.task = Some(running);
        proc.idle_since = None;
        self.busy += 1;
        super::earlier(&mut self.next_check, deadline);
        if let Err(e) = self.io.send_task(pid, def, &spec, cwd.as_deref()) {
            tracing::warn!("cannot send a task to worker {pid}: {e}");
            // The worker is gone or broken; its exit is reported as worker_lost.
            self.io.signal_group(pid, libc::SIGKILL);
            return;
        }
        self.note_candidate(pid);
        self.note_started(spec.id, spec.attempt);
        self.hold_worker_to_limit(pid);
    }

    /// Start workers for the queued Python tasks that could run now (one per free slot, in
    /// queue order) and that no idle or starting worker of their environment will take. With
    /// every slot holding a worker, room is made by stopping idle workers of other
    /// environments (see [`Pool::make_room`]).
    pub(super) fn spawn_workers_for_queue(&mut self) {
        let mut available: HashMap<&str, usize> = HashMap::new();
        let (mut live, mut stopping) = (0usize, 0usize);
        for p in self.procs.values() {
            if !p.is_python() {
                continue;
            }
            live += 1;
            if p.retiring.is_some() {
                stopping += 1;
            } else if p.task.is_none() && p.exit.is_none() {
                *available.entry(p.env.as_str()).or_default() += 1;
            }
        }
        let mut budget = self.cfg.slots.saturating_sub(self.busy());
        let mut need: Vec<String> = Vec::new();
        for t in &self.queue {
            if budget == 0 {
                break;
            }
            let Some(f) = self.functions.get(&t.function) else {
                continue;
            };
            if !f.body.is_python() || self.envs.get(&f.env).is_some_and(Result::is_err) {
                continue;
            }
            budget -= 1;
            match available.get_mut(f.env.as_str()) {
                Some(n) if *n > 0 => *n -= 1,
                _ => need.push(f.env.clone()),
            }
        }
        let mut room = self.cfg.slots.saturating_sub(live);
        for env in need {
            if self.startup_failures.get(&env).map_or(0, |f| f.0) >= 3 {
                self.fail_python_queue(&env);
                continue;
            }
            if room == 0 {
                if stopping > 0 {
                    stopping -= 1; // its slot frees up when it has exited
                } else if !self.make_room(&env) {
                    return;
                }
                continue;
            }
            room -= 1;
            if !self.spawn_worker(&env) {
                return;
            }
        }
    }

    /// Start one Python worker of `env`; false if it could not be started (its environment's
    /// queued tasks then fail with the reason).
    fn spawn_worker(&mut self, env: &str) -> bool {
        self.serial += 1;
        let log = self.cfg.log_dir.join(format!("worker-{}.log", self.serial));
        let slot = self.pick_slot(true);
        let placement = self.slot_plan(slot);
        let wrap = self.env_wrap(env).ok().flatten().cloned();
        let start = WorkerStart {
            serial: self.serial,
            python: &self.cfg.python,
            log: &log,
            slot: &placement,
            container: wrap.as_ref(),
            mem_limit: self.cfg.mem_limit,
        };
        match self.io.spawn_worker(start) {
            Ok(w) => {
                let mut proc = Proc::new(Proc::python(), w.marker, None, Some(log), slot);
                proc.env = env.to_string();
                self.procs.insert(w.pid, proc);
                self.live += 1;
                self.count_start(env);
                true
            }
            Err(e) => {
                let what = match &wrap {
                    Some(w) if env.is_empty() => format!(
                        "cannot start a Python worker in the pool's container ({} {}): {e}",
                        w.container.runtime.name(),
                        w.container.image
                    ),
                    Some(w) => format!(
                        "cannot start a Python worker in container {} ({} {}): {e}",
                        env,
                        w.container.runtime.name(),
                        w.container.image
                    ),
                    None => format!("cannot start a Python worker: {e}"),
                };
                tracing::error!("{what}");
                self.fail_python_queue_with(env, what);
                false
            }
        }
    }

    pub(super) fn fail_python_queue(&mut self, env: &str) {
        let log = self
            .startup_failures
            .get(env)
            .map(|f| f.1.clone())
            .unwrap_or_else(|| self.cfg.log_dir.join(format!("worker-{}.log", self.serial)));
        self.fail_python_queue_with(
            env,
            format!("Python workers fail to start; see {}", log.display()),
        );
    }

    /// Fail the queued Python tasks of environment `env` with `message`.
    pub(super) fn fail_python_queue_with(&mut self, env: &str, message: String) {
        self.startup_failures.remove(env);
        let (python, rest): (Vec<TaskSpec>, Vec<TaskSpec>) =
            std::mem::take(&mut self.queue).into_iter().partition(|t| {
                self.functions
                    .get(&t.function)
                    .is_some_and(|f| f.body.is_python() && f.env == env)
            });
        self.queue = rest.into();
        for spec in python {
            self.push_result(
                spec.id,
                spec.attempt,
                Outcome::Err(TaskError::new(
                    ErrorKind::WorkerLost,
                    "WorkerStartFailed",
                    message.clone(),
                )),
            );
        }
    }

    pub(super) fn start_shell_task(&mut self) {
        let spec = self.queue.pop_front().expect("front exists");
        let sandbox = match self.io.sandbox(&spec) {
            Ok(s) => s,
            Err(e) => return self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        };
        let cwd = sandbox.as_ref().map(|s| s.dir().to_path_buf());
        let slot = self.pick_slot(false);
        let placement = self.slot_plan(slot);
        let limit = super::Limit::of(&spec, self.cfg.mem_limit);
        let func = &self.functions[&spec.function];
        let wrap = self.env_wrap(&func.env).ok().flatten().cloned();
        let outcome = match &func.shell {
            None => Err(TaskError::new(
                ErrorKind::BadInput,
                "BadTemplate",
                "the shell command template is empty",
            )),
            Some(t) => shell_args(t, &spec.args).and_then(|args| {
                self.serial += 1;
                let start = ShellStart {
                    serial: self.serial,
                    script: &t.script,
                    args: &args,
                    task: &spec,
                    cwd: cwd.as_deref(),
                    slot: &placement,
                    container: wrap.as_ref(),
                    mem_limit: limit.map(|l| l.bytes),
                };
                self.io.spawn_shell(start).map_err(|e| {
                    TaskError::new(
                        ErrorKind::WorkerLost,
                        "SpawnFailed",
                        format!("cannot start the command: {e}"),
                    )
                })
            }),
        };
        match outcome {
            Ok(started) => {
                // Its clock starts now, with its process.
                let running = Running {
                    sandbox,
                    held_by_cgroup: started.held,
                    ..Running::start(&spec, self.cfg.mem_limit, self.io.now())
                };
                let deadline = running.deadline;
                let proc = Proc::new(Kind::Shell, started.marker, Some(running), None, slot);
                self.procs.insert(started.pid, proc);
                self.busy += 1;
                self.watch(deadline);
                self.note_started(spec.id, spec.attempt);
            }
            Err(e) => self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        }
    }
}
