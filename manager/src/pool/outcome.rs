//! How tasks end: worker frames, process exits, and the outcome of each task.

use super::*;
use crate::wire::FromWorker;
use std::path::Path;

impl<I: Io> Pool<I> {
    /// What worker `pid` wrote since the driver last read it.
    pub fn on_worker_output(&mut self, now: Instant, pid: u32, out: WorkerOutput) {
        self.now = now;
        if out.eof {
            if let Some(Kind::Python { eof, .. }) = self.procs.get_mut(&pid).map(|p| &mut p.kind) {
                *eof = true;
            }
        }
        // A result read before a broken frame is the task's.
        for (header, payload) in out.frames {
            self.on_worker_frame(pid, header, payload);
        }
        if let Some(e) = out.broke {
            tracing::error!("worker {pid} broke the protocol: {e}; killing it");
            let kind = match e {
                crate::wire::WireError::TooLarge { .. } => ErrorKind::ResultTooLarge,
                crate::wire::WireError::BadHeader(_) => ErrorKind::WorkerLost,
            };
            self.force_kill(pid, TaskError::new(kind, "ProtocolError", e.to_string()));
        }
    }

    pub(super) fn force_kill(&mut self, pid: u32, error: TaskError) {
        if let Some(proc) = self.procs.get_mut(&pid) {
            if let Some(r) = proc.task.as_mut() {
                r.forced.get_or_insert(error);
            }
        }
        self.io.signal_group(pid, libc::SIGKILL);
    }

    fn on_worker_frame(&mut self, pid: u32, header: crate::wire::FromWorker, payload: Vec<u8>) {
        let max_result = self.cfg.max_result_bytes;
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let Kind::Python { ready, .. } = &mut proc.kind else {
            return;
        };
        match header {
            FromWorker::Ready {
                pid: _,
                python,
                executable,
            } => {
                // Only the first counts: a worker that repeats it neither grows the idle stack
                // nor restarts its idle time (and so never retires).
                let first = !std::mem::replace(ready, true);
                self.startup_failures.remove(&proc.env);
                // Start later workers with the resolved interpreter (skips wrappers such as
                // pyenv shims, which cost more than Python's own start-up).
                let exe = executable.unwrap_or_default();
                let usable = Path::new(&exe).is_absolute() && self.io.exists(Path::new(&exe));
                if usable && exe != self.cfg.python {
                    tracing::info!(
                        "workers start with {exe} (resolved from {})",
                        self.cfg.python
                    );
                    self.cfg.python = exe;
                }
                tracing::debug!("worker {pid} ready (Python {python})");
                if first {
                    self.became_idle(pid);
                }
            }
            FromWorker::Result { tid, outcome } => {
                let mut promoted = None;
                let Some(r) = proc.task.take_if(|r| r.id == tid) else {
                    // Not the running task: the worker broke the one-at-a-time order.
                    tracing::warn!("worker {pid} sent a result for task {tid} it does not hold");
                    return;
                };
                if let Some(forced) = r.forced {
                    // Killed for walltime or cancel already; the kill goes on.
                    proc.task = Some(Running {
                        forced: Some(forced),
                        ..r
                    });
                    return;
                }
                // A result: how long the function's tasks run (a killed one says nothing).
                let took = self.now.saturating_duration_since(r.started);
                self.run_times.entry(r.function).or_default().observe(took);
                self.busy -= 1;
                if let Some(next) = proc.next.take() {
                    let mut b = promote(next, self.cfg.kill_grace, self.cfg.mem_limit, self.now);
                    if b.forced.is_some() {
                        // Cancelled while it waited in the pipe.
                        self.io.signal_group(pid, libc::SIGTERM);
                    }
                    // An out-of-memory notice read before this result, which is a success:
                    // the task piped in behind it, already running, is the likelier one.
                    b.oom_hit = r.oom_hit && outcome.is_ok();
                    promoted = Some((b.id, b.attempt));
                    super::earlier(&mut self.next_check, b.deadline);
                    super::earlier(&mut self.next_check, b.kill_at);
                    proc.task = Some(b);
                    self.busy += 1;
                    self.note_candidate(pid);
                }
                // Held by its cgroup: a process of the task the kernel killed there while the
                // worker lived on shows in a failed result (a task that got over it is its
                // own business). Sampled: a peak between two samples is the worker's own
                // high-water mark, which stays below the limit until a task passes it (then
                // it is measured again from here). No file is touched for a task that went
                // well.
                let over = r.limit.and_then(|limit| {
                    if r.held_by_cgroup {
                        // A task that returned normally dealt with it.
                        if outcome.is_ok() {
                            return None;
                        }
                        let peak = self.io.cgroup_kill_peak(pid, r.oom_hit)?;
                        return Some(memory_limit_reached(peak.max(limit.bytes), limit));
                    }
                    let peak = self.io.peak_rss(pid).unwrap_or(0).max(r.peak_rss);
                    if peak <= limit.bytes {
                        return None;
                    }
                    self.io.reset_peak_rss(pid);
                    Some(memory_exceeded(peak, limit))
                });
                let outcome = if let Some(e) = over {
                    Outcome::Err(e)
                } else {
                    match outcome {
                        Ok(_) if payload.len() as u64 > max_result => {
                            Outcome::Err(too_large(payload.len() as u64, max_result))
                        }
                        Ok(encoding) => Outcome::Ok(Payload {
                            encoding,
                            data: payload,
                        }),
                        Err(e) => Outcome::Err(e.into_task_error()),
                    }
                };
                self.push_result(r.id, r.attempt, outcome);
                match promoted {
                    Some((id, attempt)) => {
                        self.note_started(id, attempt);
                        self.hold_worker_to_limit(pid);
                    }
                    None => self.became_idle(pid),
                }
            }
        }
    }

    /// Children the driver reaped in one round (their last output already handed over).
    /// Every death of the round is compared with the OOM count before it: one OOM event that
    /// killed two workers labels both.
    pub fn on_exits(&mut self, now: Instant, exits: Vec<Exit>) {
        self.now = now;
        for e in &exits {
            match self.procs.get_mut(&e.pid) {
                Some(p) => {
                    p.exit = Some(e.status);
                    p.exit_peak = e.peak;
                }
                None => tracing::debug!(
                    "reaped orphaned descendant {} ({})",
                    e.pid,
                    describe_wait_status(e.status)
                ),
            }
        }
        let mut oom_now = None;
        for e in exits {
            if let Some(proc) = self.procs.remove(&e.pid) {
                if proc.task.is_some() {
                    self.busy -= 1;
                }
                if proc.is_python() && proc.retiring.is_none() {
                    self.live -= 1;
                }
                self.finish_proc(e.pid, proc, e.output, &mut oom_now);
            }
        }
        if let Some(n) = oom_now {
            self.oom_seen = self.oom_seen.max(n);
        }
    }

    /// `output`: a shell task's stdout and stderr tails. `oom_now`: the node's OOM count,
    /// read once per round of deaths.
    fn finish_proc(
        &mut self,
        pid: u32,
        mut proc: Proc,
        output: Option<(String, String)>,
        oom_now: &mut Option<u64>,
    ) {
        if let Some(next) = proc.next.take() {
            // It never started: run it elsewhere (or report it cancelled).
            if next.cancelled {
                self.push_result(next.spec.id, next.spec.attempt, Outcome::Err(cancelled()));
            } else {
                self.queue.push_front(next.spec);
            }
        }
        let status = proc.exit.unwrap_or(0);
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let forced = proc.task.as_ref().is_some_and(|r| r.forced.is_some());
        // Leftovers in the group go at once; with a forced end or a crash, also those that left
        // the group (found by their marker).
        self.io.signal_group(pid, libc::SIGKILL);
        if forced || !clean {
            let swept = self.io.sweep(&proc.marker);
            if swept > 0 {
                tracing::info!("killed {swept} leftover processes of {pid}");
            }
        }
        let Some(r) = proc.task.take() else {
            if let Kind::Python { ready, .. } = &proc.kind {
                if !ready && proc.retiring.is_none() {
                    let log = proc.log.clone().unwrap_or_default();
                    let failures = self.startup_failures.entry(proc.env.clone());
                    let f = failures.or_insert((0, log.clone()));
                    *f = (f.0 + 1, log);
                    tracing::error!(
                        "worker {pid} exited during start-up ({}); see {}",
                        describe_wait_status(status),
                        proc.log
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
            return;
        };
        // Killed by a termination signal this manager did not send, or a shell reporting that
        // its command was (exit 128 + signal).
        let term = |sig: i32| matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP);
        let from_outside = r.forced.is_none()
            && ((libc::WIFSIGNALED(status) && term(libc::WTERMSIG(status)))
                || (libc::WIFEXITED(status) && term(libc::WEXITSTATUS(status) - 128)));
        // SIGKILL from no one here: the kernel's out-of-memory killer, if its count moved.
        let oom = r.forced.is_none()
            && libc::WIFSIGNALED(status)
            && libc::WTERMSIG(status) == libc::SIGKILL
            && {
                let io = &mut self.io;
                let n = *oom_now.get_or_insert_with(|| io.oom_kills().unwrap_or(0));
                n > self.oom_seen
            };
        // Killed by the kernel at the limit of its own memory cgroup.
        let limited = match (r.limit, r.forced.is_none()) {
            (Some(limit), true) => self
                .io
                .cgroup_kill_peak(pid, r.oom_hit)
                .map(|p| memory_limit_reached(p.max(limit.bytes), limit)),
            _ => None,
        };
        // A shell task's whole process tree peaked over its limit between two samples: the
        // kernel's count, at its end, says so.
        let peak = proc.exit_peak.max(r.peak_rss);
        let shell_over = match (&proc.kind, r.limit) {
            (Kind::Shell, Some(limit)) if peak > limit.bytes => Some(memory_exceeded(peak, limit)),
            _ => None,
        };
        let outcome = match (r.forced, limited, shell_over, &proc.kind) {
            (Some(e), _, _, _) => Outcome::Err(e),
            (None, Some(e), _, _) => {
                tracing::warn!(
                    "task {} reached its memory limit; the kernel killed it in its cgroup",
                    r.id
                );
                Outcome::Err(e)
            }
            (None, None, _, _) if oom => {
                tracing::warn!(
                    "task {} was killed by the kernel's out-of-memory killer (process {pid})",
                    r.id
                );
                Outcome::Err(TaskError::new(
                    ErrorKind::OomKilled,
                    "OomKilled",
                    format!(
                        "the kernel's out-of-memory killer killed process {pid} of the task: the \
                         node or its memory cgroup ran out of memory (this task may or may not \
                         be the cause; set mem_per_worker to hold each task to a limit)"
                    ),
                ))
            }
            (None, None, _, Kind::Python { .. }) => {
                let log = proc
                    .log
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Outcome::Err(TaskError::new(
                    ErrorKind::WorkerLost,
                    "WorkerLost",
                    format!(
                        "worker process {pid} died while running the task: {}; worker log: {log}",
                        describe_wait_status(status)
                    ),
                ))
            }
            (None, None, Some(e), Kind::Shell) => Outcome::Err(e),
            (None, None, None, Kind::Shell) => {
                let (stdout, stderr) = output.unwrap_or_default();
                shell_outcome(status, &stdout, &stderr, self.cfg.max_result_bytes)
            }
        };
        if from_outside {
            tracing::info!(
                "task {} was killed by {} from outside; its outcome waits {}s in case this \
                 manager's allocation is ending",
                r.id,
                describe_wait_status(status),
                super::HOLD_KILLED.as_secs_f64()
            );
            self.held
                .push((self.now + super::HOLD_KILLED, r.id, r.attempt, outcome));
            return;
        }
        self.push_result(r.id, r.attempt, outcome);
    }
}

/// A pipelined task became the running one at `now`: its walltime starts then; a cancel that
/// came while it waited in the pipe has it killed at once (`forced` is set).
pub(super) fn promote(
    next: Pipelined,
    grace: Duration,
    pool_limit: Option<u64>,
    now: Instant,
) -> Running {
    let mut r = Running::start(&next.spec, pool_limit, now);
    if next.cancelled {
        r.forced = Some(cancelled());
        r.kill_at = Some(now + grace);
    }
    r
}

/// A task the kernel killed at its memory cgroup's limit: its peak and the limit, in MiB.
pub(super) fn memory_limit_reached(peak: u64, limit: Limit) -> TaskError {
    TaskError::new(
        ErrorKind::MemoryExceeded,
        "MemoryExceeded",
        format!(
            "the task used {} MiB of memory and reached its limit of {} MiB ({}): the kernel \
             killed it in its own memory cgroup",
            peak.div_ceil(1 << 20),
            limit.bytes >> 20,
            limit.source()
        ),
    )
}

/// A task over its memory limit: its peak and the limit, in MiB.
pub(super) fn memory_exceeded(peak: u64, limit: Limit) -> TaskError {
    TaskError::new(
        ErrorKind::MemoryExceeded,
        "MemoryExceeded",
        format!(
            "the task used {} MiB of memory, over its limit of {} MiB ({}); its processes \
             were killed",
            peak.div_ceil(1 << 20),
            limit.bytes >> 20,
            limit.source()
        ),
    )
}

pub(super) fn cancelled() -> TaskError {
    TaskError::new(ErrorKind::Cancelled, "Cancelled", "the task was cancelled")
}

pub(super) fn too_large(len: u64, max: u64) -> TaskError {
    TaskError::new(
        ErrorKind::ResultTooLarge,
        "ResultTooLarge",
        format!("result of {len} bytes exceeds the limit of {max} bytes"),
    )
}

/// Arguments of a shell task: a JSON array of strings, one per template parameter.
pub(super) fn shell_args(t: &ShellTemplate, args: &Payload) -> Result<Vec<String>, TaskError> {
    let bad = |msg: String| TaskError::new(ErrorKind::BadInput, "BadArguments", msg);
    if args.encoding != Encoding::Json {
        return Err(bad("shell tasks take JSON arguments".into()));
    }
    let values: Vec<String> = serde_json::from_slice(&args.data).map_err(|e| {
        bad(format!(
            "shell arguments must be a JSON array of strings: {e}"
        ))
    })?;
    if values.len() != t.params.len() {
        return Err(bad(format!(
            "the template takes {} parameters ({}), got {} values",
            t.params.len(),
            t.params.join(", "),
            values.len()
        )));
    }
    if let Some((name, _)) = t.params.iter().zip(&values).find(|(_, v)| v.contains('\0')) {
        return Err(bad(format!(
            "the value of parameter '{name}' contains a NUL byte"
        )));
    }
    Ok(values)
}

pub(super) fn shell_outcome(status: i32, stdout: &str, stderr: &str, max: u64) -> Outcome {
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        /// A shell task's result, fields in this order.
        #[derive(serde::Serialize)]
        struct ShellResult<'a> {
            returncode: i32,
            stdout: &'a str,
            stderr: &'a str,
        }
        let result = ShellResult {
            returncode: 0,
            stdout,
            stderr,
        };
        let json = serde_json::to_string(&result).expect("strings serialize");
        if json.len() as u64 > max {
            return Outcome::Err(too_large(json.len() as u64, max));
        }
        return Outcome::Ok(Payload::json(json));
    }
    let (type_name, message) = if libc::WIFEXITED(status) {
        (
            "NonZeroExit",
            format!("command exited with status {}", libc::WEXITSTATUS(status)),
        )
    } else {
        (
            "KilledBySignal",
            format!("command {}", describe_wait_status(status)),
        )
    };
    let mut tb = String::new();
    if !stdout.is_empty() {
        tb.push_str("--- stdout (tail) ---\n");
        tb.push_str(stdout);
        tb.push('\n');
    }
    tb.push_str("--- stderr (tail) ---\n");
    tb.push_str(stderr);
    Outcome::Err(TaskError {
        kind: ErrorKind::Exception,
        type_name: type_name.into(),
        message,
        traceback: Some(tb),
    })
}
