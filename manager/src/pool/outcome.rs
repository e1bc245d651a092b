//! How tasks end: worker frames, process exits, and the outcome of each task.

use super::*;
use crate::wire::FromWorker;
use std::path::Path;

impl Pool<'_> {
    pub(super) fn on_output(&mut self, pid: u32) {
        let max = self.cfg.max_result_bytes as usize + (1 << 20);
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        match &mut proc.kind {
            Kind::Shell(s) => s.read_output(),
            Kind::Python(w) => {
                let (frames, broke) = w.read_frames(max);
                // A result read before a broken frame is the task's.
                for (header, payload) in frames {
                    self.on_worker_frame(pid, header, payload);
                }
                if let Some(e) = broke {
                    tracing::error!("worker {pid} broke the protocol: {e}; killing it");
                    let kind = match e {
                        crate::wire::WireError::TooLarge { .. } => ErrorKind::ResultTooLarge,
                        crate::wire::WireError::BadHeader(_) => ErrorKind::WorkerLost,
                    };
                    self.force_kill(pid, TaskError::new(kind, "ProtocolError", e.to_string()));
                }
            }
        }
    }

    pub(super) fn force_kill(&mut self, pid: u32, error: TaskError) {
        if let Some(proc) = self.procs.get_mut(&pid) {
            if let Some(r) = proc.task.as_mut() {
                r.forced.get_or_insert(error);
            }
        }
        let _ = kill_group(pid, libc::SIGKILL);
    }

    pub(super) fn on_worker_frame(
        &mut self,
        pid: u32,
        header: crate::wire::FromWorker,
        payload: Vec<u8>,
    ) {
        let max_result = self.cfg.max_result_bytes;
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let Kind::Python(worker) = &mut proc.kind else {
            return;
        };
        match header {
            FromWorker::Ready {
                pid: _,
                python,
                executable,
            } => {
                worker.ready = true;
                self.startup_failures.remove(&proc.env);
                // Start later workers with the resolved interpreter (skips wrappers such as
                // pyenv shims, which cost more than Python's own start-up).
                let exe = executable.unwrap_or_default();
                let usable = Path::new(&exe).is_absolute() && Path::new(&exe).exists();
                if usable && exe != self.cfg.python {
                    tracing::info!(
                        "workers start with {exe} (resolved from {})",
                        self.cfg.python
                    );
                    self.cfg.python = exe;
                }
                tracing::debug!("worker {pid} ready (Python {python})");
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
                if let Some(next) = proc.next.take() {
                    let mut b = promote(pid, next, self.cfg.kill_grace, self.cfg.mem_limit);
                    // An out-of-memory notice read before this result, which is a success:
                    // the task piped in behind it, already running, is the likelier one.
                    b.oom_hit = r.oom_hit && outcome.is_ok();
                    promoted = Some((b.id, b.attempt));
                    proc.task = Some(b);
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
                        let leaf = proc.cgroup.as_mut()?;
                        let peak = if leaf.oom_fd().is_some() {
                            r.oom_hit.then(|| leaf.peak())?
                        } else {
                            leaf.new_oom_kill()?
                        };
                        return Some(memory_limit_reached(peak.max(limit.bytes), limit));
                    }
                    if proc.peak.is_none() {
                        proc.peak = fnx_sys::memory::PeakRss::open(pid).ok();
                    }
                    let peak = proc
                        .peak
                        .as_ref()
                        .and_then(|p| p.read())
                        .unwrap_or(0)
                        .max(r.peak_rss);
                    if peak <= limit.bytes {
                        return None;
                    }
                    let _ = fnx_sys::memory::reset_peak_rss(pid);
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
                if let Some((id, attempt)) = promoted {
                    self.note_started(id, attempt);
                    self.hold_worker_to_limit(pid);
                }
            }
        }
    }

    pub(super) fn reap(&mut self) {
        for (pid, status, peak) in fnx_sys::process::reap_any_with_peak() {
            match self.procs.get_mut(&pid) {
                Some(p) => {
                    p.exit = Some(status);
                    p.exit_peak = peak;
                }
                None => tracing::debug!(
                    "reaped orphaned descendant {pid} ({})",
                    describe_wait_status(status)
                ),
            }
        }
        let done: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.exit.is_some())
            .map(|(&pid, _)| pid)
            .collect();
        // Every death of this batch is compared with the OOM count before it: one OOM event
        // that killed two workers labels both.
        self.oom_now = None;
        for pid in done {
            // Frames or output written just before exit are still in the pipe.
            self.on_output(pid);
            if let Some(proc) = self.procs.remove(&pid) {
                self.finish_proc(pid, proc);
            }
        }
        if let Some(n) = self.oom_now {
            self.oom_seen = self.oom_seen.max(n);
        }
    }

    pub(super) fn finish_proc(&mut self, pid: u32, mut proc: Proc) {
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
        let _ = kill_group(pid, libc::SIGKILL);
        if forced || !clean {
            let swept = fnx_sys::sweep::kill_marked("FNX_PROC", proc.marker(), 20);
            if swept > 0 {
                tracing::info!("killed {swept} leftover processes of {pid}");
            }
        }
        let Some(r) = proc.task.take() else {
            if let Kind::Python(w) = &proc.kind {
                if !w.ready && proc.retiring.is_none() {
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
                let n = *self
                    .oom_now
                    .get_or_insert_with(|| fnx_sys::memory::oom_kills().unwrap_or(0));
                n > self.oom_seen
            };
        // Killed by the kernel at the limit of its own memory cgroup.
        let limited = match (r.limit, r.forced.is_none(), proc.cgroup.as_mut()) {
            (Some(limit), true, Some(leaf)) => {
                let peak = if leaf.oom_fd().is_some() {
                    r.oom_hit.then(|| leaf.peak())
                } else {
                    leaf.new_oom_kill()
                };
                peak.map(|p| memory_limit_reached(p.max(limit.bytes), limit))
            }
            _ => None,
        };
        // A shell task's whole process tree peaked over its limit between two samples: the
        // kernel's count, at its end, says so.
        let peak = proc.exit_peak.max(r.peak_rss);
        let shell_over = match (&proc.kind, r.limit) {
            (Kind::Shell(_), Some(limit)) if peak > limit.bytes => {
                Some(memory_exceeded(peak, limit))
            }
            _ => None,
        };
        let outcome = match (r.forced, limited, shell_over, &mut proc.kind) {
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
            (None, None, _, Kind::Python(_)) => {
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
            (None, None, Some(e), Kind::Shell(_)) => Outcome::Err(e),
            (None, None, None, Kind::Shell(s)) => {
                shell_outcome(status, s, self.cfg.max_result_bytes)
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
            self.held.push((
                Instant::now() + super::HOLD_KILLED,
                r.id,
                r.attempt,
                outcome,
            ));
            return;
        }
        self.push_result(r.id, r.attempt, outcome);
    }
}

/// A pipelined task became the running one: its walltime starts now; a cancel that came while
/// it waited in the pipe kills it at once.
pub(super) fn promote(
    pid: u32,
    next: Pipelined,
    grace: Duration,
    pool_limit: Option<u64>,
) -> Running {
    let mut r = Running::start(&next.spec, pool_limit);
    if next.cancelled {
        r.forced = Some(cancelled());
        r.kill_at = Some(Instant::now() + grace);
        let _ = kill_group(pid, libc::SIGTERM);
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

pub(super) fn shell_outcome(status: i32, s: &ShellProc, max: u64) -> Outcome {
    let stdout = s.out.text();
    let stderr = s.err.text();
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
            stdout: &stdout,
            stderr: &stderr,
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
        tb.push_str(&stdout);
        tb.push('\n');
    }
    tb.push_str("--- stderr (tail) ---\n");
    tb.push_str(&stderr);
    Outcome::Err(TaskError {
        kind: ErrorKind::Exception,
        type_name: type_name.into(),
        message,
        traceback: Some(tb),
    })
}
