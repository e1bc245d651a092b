//! The pending queue: higher priority first, FIFO within a priority, retries to the front.

use fnx_protocol::TaskId;
use std::collections::{BTreeMap, VecDeque};

/// Task ids waiting for dispatch. Entries of tasks that were cancelled while queued stay until
/// popped; the caller skips ids it no longer knows (lazy deletion keeps cancel O(1)).
#[derive(Debug, Default)]
pub struct PendingQueue {
    levels: BTreeMap<i32, VecDeque<TaskId>>,
    len: usize,
}

impl PendingQueue {
    /// Append at the back of its priority level.
    pub fn push_back(&mut self, priority: i32, id: TaskId) {
        self.levels.entry(priority).or_default().push_back(id);
        self.len += 1;
    }

    /// Put at the front of its priority level (a retried task goes before newer ones).
    pub fn push_front(&mut self, priority: i32, id: TaskId) {
        self.levels.entry(priority).or_default().push_front(id);
        self.len += 1;
    }

    /// Take the next task: the highest priority level, oldest first.
    pub fn pop(&mut self) -> Option<TaskId> {
        let mut entry = self.levels.last_entry()?;
        let id = entry.get_mut().pop_front();
        if entry.get().is_empty() {
            entry.remove();
        }
        if id.is_some() {
            self.len -= 1;
        }
        id
    }

    /// Entries, including stale ones of cancelled tasks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_fifo_and_retries_first() {
        let mut q = PendingQueue::default();
        q.push_back(0, TaskId(1));
        q.push_back(0, TaskId(2));
        q.push_back(5, TaskId(3));
        q.push_front(0, TaskId(4));
        q.push_back(-1, TaskId(5));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|t| t.0).collect();
        assert_eq!(order, vec![3, 4, 1, 2, 5]);
        assert!(q.is_empty());
    }
}
