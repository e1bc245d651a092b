//! What [`crate::tenants`] asks of each tenant's state machine: its own range of manager ids,
//! draining a manager by name, and failing a tenant's waiting tasks.

use super::*;

impl Interchange {
    /// Number managers from `first` on (before any registered): state machines that share a
    /// driver ([`crate::tenants`]) never hand out the same id.
    pub fn set_first_manager_id(&mut self, first: u64) {
        self.next_manager = self.next_manager.max(first);
    }

    /// Finish every task not yet dispatched (queued or held) with `error`: their user may not
    /// run anything here. Tasks already on managers are left to finish.
    pub fn fail_queued(&mut self, error: &TaskError, comm: &mut impl Comm) {
        let ids: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, r)| matches!(r.state, TaskState::Queued | TaskState::Held))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let Some(rec) = self.tasks.remove(&id) else {
                continue;
            };
            match rec.state {
                TaskState::Held => self.held -= 1,
                _ => self.queued -= 1,
            }
            comm.finished(Finished {
                id,
                attempt: rec.attempt,
                outcome: Outcome::Err(error.clone()),
            });
        }
    }

    /// Drain the manager launched as `uid` (see [`Interchange::drain_manager`]).
    pub fn drain_named(&mut self, uid: &str, comm: &mut impl Comm) {
        let found = self
            .managers
            .iter()
            .find(|(_, m)| m.uid == uid && !m.draining)
            .map(|(&id, _)| id);
        if let Some(id) = found {
            self.drain_manager(id, comm);
        }
    }
}
