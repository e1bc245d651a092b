//! Starting tasks: idle workers first, new workers up to the slots, shell commands, and
//! pipelining one small task behind each running one.

use super::*;
use crate::procs::Start;
use crate::sandbox::Sandbox;

impl Pool<'_> {
    pub(super) fn busy(&self) -> usize {
        self.procs.values().filter(|p| p.task.is_some()).count()
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
        let python_slots = held(&|p| matches!(p.kind, Kind::Python(_)));
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
                return;
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
            if func.body.is_python() {
                if !self.start_python_task() {
                    break;
                }
            } else {
                self.start_shell_task();
            }
        }
        self.pipeline();
    }

    /// Every Python worker is busy and tasks wait: write one small task behind each running
    /// one, so workers go from task to task without waiting for the manager.
    pub(super) fn pipeline(&mut self) {
        if self.queue.is_empty()
            || self
                .procs
                .values()
                .any(|p| p.task.is_none() && p.exit.is_none())
        {
            return;
        }
        let candidates: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.next.is_none()
                    && p.exit.is_none()
                    && p.task.as_ref().is_some_and(|r| r.forced.is_none())
                    && matches!(&p.kind, Kind::Python(w) if w.ready && !w.eof())
            })
            .map(|(&pid, _)| pid)
            .collect();
        for pid in candidates {
            let Some(spec) = self.queue.front() else {
                return;
            };
            let Some(func) = self.functions.get(&spec.function) else {
                return;
            };
            let proc = self.procs.get_mut(&pid).expect("candidate");
            let Kind::Python(worker) = &mut proc.kind else {
                continue;
            };
            if !func.body.is_python()
                || !spec.files.is_empty()
                || spec.args.data.len() > PIPELINE_MAX_ARGS
                || !worker.knows(spec.function)
            {
                return;
            }
            let spec = self.queue.pop_front().expect("front exists");
            if let Err(e) = worker.send_task(&spec, &func.body, None) {
                tracing::warn!("cannot send a task to worker {pid}: {e}");
                let _ = kill_group(pid, libc::SIGKILL);
            }
            proc.next = Some(Pipelined {
                spec,
                cancelled: false,
            });
        }
    }

    /// Hand the queue's head to an idle worker; `false` if none is ready (one may be starting).
    pub(super) fn start_python_task(&mut self) -> bool {
        let idle = self.procs.iter().find_map(|(&pid, p)| match &p.kind {
            Kind::Python(w) if w.ready && p.task.is_none() && !w.eof() && p.exit.is_none() => {
                Some(pid)
            }
            _ => None,
        });
        let Some(pid) = idle else {
            self.spawn_workers_for_queue();
            return false;
        };
        let spec = self.queue.pop_front().expect("front exists");
        let sandbox = match Sandbox::prepare(&self.cfg.log_dir.join("tasks"), &spec) {
            Ok(s) => s,
            Err(e) => {
                self.push_result(spec.id, spec.attempt, Outcome::Err(e));
                return true;
            }
        };
        let body = &self.functions[&spec.function].body;
        let proc = self.procs.get_mut(&pid).expect("found above");
        let Kind::Python(worker) = &mut proc.kind else {
            unreachable!("found as python")
        };
        let cwd = sandbox.as_ref().map(|s| s.dir().to_path_buf());
        proc.task = Some(Running {
            sandbox,
            ..Running::start(&spec)
        });
        if let Err(e) = worker.send_task(&spec, body, cwd.as_deref()) {
            tracing::warn!("cannot send a task to worker {pid}: {e}");
            // The worker is gone or broken; its exit is reported as worker_lost.
            let _ = kill_group(pid, libc::SIGKILL);
        }
        true
    }

    pub(super) fn spawn_workers_for_queue(&mut self) {
        let python_procs: Vec<&Proc> = self
            .procs
            .values()
            .filter(|p| matches!(p.kind, Kind::Python(_)))
            .collect();
        let starting = python_procs
            .iter()
            .filter(|p| matches!(&p.kind, Kind::Python(w) if !w.ready))
            .count();
        let total = python_procs.len();
        let waiting = self
            .queue
            .iter()
            .filter(|t| {
                self.functions
                    .get(&t.function)
                    .is_some_and(|f| f.body.is_python())
            })
            .count();
        let free_slots = self.cfg.slots.saturating_sub(self.busy());
        let want = waiting.min(free_slots).saturating_sub(starting);
        let room = self.cfg.slots.saturating_sub(total);
        if self.startup_failures >= 3 {
            self.fail_python_queue();
            return;
        }
        for _ in 0..want.min(room) {
            self.serial += 1;
            let log = self.cfg.log_dir.join(format!("worker-{}.log", self.serial));
            let slot = self.pick_slot(true);
            let placement = self.slot_plan(slot);
            let start = Start {
                markers: &self.cfg.markers,
                slot: &placement,
                container: self.cfg.container.as_ref(),
            };
            match PythonWorker::spawn(
                &self.cfg.python,
                &self.cfg.worker_script,
                &log,
                &start,
                self.serial,
                self.cfg.max_result_bytes,
            ) {
                Ok(w) => {
                    let pid = w.pid;
                    self.procs
                        .insert(pid, Proc::new(Kind::Python(w), None, Some(log), slot));
                }
                Err(e) => {
                    tracing::error!("cannot start a Python worker: {e}");
                    self.startup_failures = 3;
                    self.fail_python_queue_with(format!("cannot start a Python worker: {e}"));
                    return;
                }
            }
        }
    }

    pub(super) fn fail_python_queue(&mut self) {
        let log = self.cfg.log_dir.join(format!("worker-{}.log", self.serial));
        self.fail_python_queue_with(format!(
            "Python workers fail to start; see {}",
            log.display()
        ));
    }

    pub(super) fn fail_python_queue_with(&mut self, message: String) {
        self.startup_failures = 0;
        let (python, rest): (Vec<TaskSpec>, Vec<TaskSpec>) =
            std::mem::take(&mut self.queue).into_iter().partition(|t| {
                self.functions
                    .get(&t.function)
                    .is_some_and(|f| f.body.is_python())
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
        let sandbox = match Sandbox::prepare(&self.cfg.log_dir.join("tasks"), &spec) {
            Ok(s) => s,
            Err(e) => return self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        };
        let cwd = sandbox.as_ref().map(|s| s.dir().to_path_buf());
        let slot = self.pick_slot(false);
        let placement = self.slot_plan(slot);
        let func = &self.functions[&spec.function];
        let outcome = match &func.shell {
            None => Err(TaskError::new(
                ErrorKind::BadInput,
                "BadTemplate",
                "the shell command template is empty",
            )),
            Some(t) => shell_args(t, &spec.args).and_then(|args| {
                self.serial += 1;
                let start = Start {
                    markers: &self.cfg.markers,
                    slot: &placement,
                    container: self.cfg.container.as_ref(),
                };
                ShellProc::spawn(
                    &t.script,
                    &args,
                    &start,
                    self.serial,
                    &spec.id.0.to_string(),
                    cwd.as_deref(),
                )
                .map_err(|e| {
                    TaskError::new(
                        ErrorKind::WorkerLost,
                        "SpawnFailed",
                        format!("cannot start the command: {e}"),
                    )
                })
            }),
        };
        match outcome {
            Ok(proc) => {
                let pid = proc.pid;
                let running = Running {
                    sandbox,
                    ..Running::start(&spec)
                };
                self.procs
                    .insert(pid, Proc::new(Kind::Shell(proc), Some(running), None, slot));
            }
            Err(e) => self.push_result(spec.id, spec.attempt, Outcome::Err(e)),
        }
    }
}
