//! What the pool reports to the interchange: results and task starts, batched, and the
//! outcomes of tasks killed from outside, held briefly.

use super::*;

impl<I: Io> Pool<I> {
    /// Report held outcomes whose time is up (all of them with `now == None`), unless this
    /// manager is stopping on a signal: then the tasks died with its allocation, and the
    /// interchange retries them when the manager says goodbye.
    pub(super) fn release_held(&mut self, now: Option<Instant>) {
        if self.held.is_empty() {
            return;
        }
        if matches!(self.end, Some(PoolEnd::Signal(_))) {
            tracing::warn!(
                "{} tasks were killed along with this manager; the interchange retries them",
                self.held.len()
            );
            self.held.clear();
            return;
        }
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| now.is_none_or(|n| h.0 <= n));
        self.held = keep;
        for (_, id, attempt, outcome) in due {
            self.push_result(id, attempt, outcome);
        }
    }

    pub(super) fn push_result(
        &mut self,
        id: TaskId,
        attempt: fnx_protocol::Attempt,
        outcome: Outcome,
    ) {
        self.batch_bytes += match &outcome {
            Outcome::Ok(p) => p.data.len(),
            Outcome::Err(e) => e.message.len() + e.traceback.as_ref().map_or(0, String::len),
        } + 32;
        self.batch.push(TaskResult {
            id,
            attempt,
            outcome,
        });
        self.batch_since.get_or_insert(self.now);
        if self.batch.len() >= FLUSH_COUNT || self.batch_bytes >= FLUSH_BYTES {
            self.flush(true);
        }
    }

    pub(super) fn flush(&mut self, force: bool) {
        let Some(since) = self.batch_since else {
            return;
        };
        // Hold results back briefly to batch them, but only while there is local work to do:
        // a manager with nothing queued needs the interchange to see its free slots now.
        if !force
            && !self.queue.is_empty()
            && self.now.saturating_duration_since(since) < FLUSH_AFTER
        {
            return;
        }
        let results = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_since = None;
        // Starts first: a task that started and ended since the last flush is reported in
        // that order.
        if !self.started.is_empty() {
            let started = std::mem::take(&mut self.started);
            self.send(&ManagerToInterchange::Started(started));
        }
        if !results.is_empty() {
            self.send(&ManagerToInterchange::Results(results));
        }
    }

    /// A task left this manager's queue and runs: the interchange hears it with the next
    /// results (a daemon crash counts against a task only once it started).
    pub(super) fn note_started(&mut self, id: TaskId, attempt: fnx_protocol::Attempt) {
        self.started.push((id, attempt));
        self.batch_since.get_or_insert(self.now);
    }
}
