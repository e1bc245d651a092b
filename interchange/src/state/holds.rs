//! The functions known here: held while their container image is built, forgotten once deleted and
//! unused; and the workers per environment that managers report (warm routing's view of them).

use super::*;

impl Interchange {
    /// Add the functions of the tasks here (queued, held or running) to `used`.
    pub fn used_functions(&self, used: &mut std::collections::HashSet<FunctionId>) {
        used.extend(self.tasks.values().map(|t| t.function));
    }

    /// Forget a function no task here uses (see [`Interchange::used_functions`]).
    pub fn remove_function(&mut self, id: FunctionId) {
        self.functions.remove(&id);
        self.holds.remove(&id);
        self.failed_functions.remove(&id);
    }

    /// Functions known here.
    pub fn function_count(&self) -> usize {
        self.functions.len()
    }

    /// Keep the tasks of `function` queued but undispatched until it is released or failed
    /// (its container image is being built).
    pub fn hold_function(&mut self, function: FunctionId) {
        self.failed_functions.remove(&function);
        self.holds.entry(function).or_default();
    }

    /// Let the held tasks of `function` (and its future ones) be dispatched.
    pub fn release_function(&mut self, function: FunctionId) {
        self.failed_functions.remove(&function);
        for id in self.holds.remove(&function).unwrap_or_default() {
            if let Some(rec) = self
                .tasks
                .get_mut(&id)
                .filter(|r| r.state == TaskState::Held)
            {
                rec.state = TaskState::Queued;
                self.queues.push_back(rec.env, rec.priority, id);
                self.held -= 1;
                self.queued += 1;
            }
        }
    }

    /// Finish the held tasks of `function` with `error` (its image build failed), and its later
    /// tasks too, until it is held or released again (a new build).
    pub fn fail_function(&mut self, function: FunctionId, error: TaskError, comm: &mut impl Comm) {
        self.failed_functions.insert(function, error.clone());
        for id in self.holds.remove(&function).unwrap_or_default() {
            if self
                .tasks
                .get(&id)
                .is_some_and(|r| r.state == TaskState::Held)
            {
                let rec = self.tasks.remove(&id).expect("checked");
                self.held -= 1;
                comm.finished(Finished {
                    id,
                    attempt: rec.attempt,
                    outcome: Outcome::Err(error.clone()),
                });
            }
        }
    }

    /// A manager reported its workers per environment.
    pub(super) fn on_warm(&mut self, mid: ManagerId, workers: Vec<WarmWorkers>) {
        let Some(m) = self.managers.get_mut(&mid) else {
            return;
        };
        m.warm.clear();
        for w in &workers {
            // Only environments of functions this interchange knows: names from a socket
            // must not grow its tables.
            let Some(env) = self.queues.lookup(&w.env) else {
                continue;
            };
            if m.warm.len() <= env {
                m.warm.resize(env + 1, 0);
            }
            m.warm[env] = w.workers;
        }
        m.workers = workers;
    }
}
