//! The pending queue: higher priority first, FIFO within a priority, retries to the front.
//!
//! Every entry carries a sequence number (its place in the order of arrival; entries put back at
//! the front get numbers below every other one), so that the heads of several queues (one per
//! worker environment, see [`crate::routing`]) can be compared by age.

use fnx_protocol::TaskId;
use std::collections::{BTreeMap, VecDeque};

/// Task ids waiting for dispatch. Entries of tasks that were cancelled while queued stay until
/// popped; the caller skips ids it no longer knows (lazy deletion keeps cancel O(1)).
#[derive(Debug, Default)]
pub struct PendingQueue {
    levels: BTreeMap<i32, VecDeque<(i64, TaskId)>>,
    len: usize,
}

/// A queue position: where an entry stands among all entries of every queue that shares one
/// [`Sequence`].
#[derive(Debug, Default)]
pub struct Sequence {
    back: i64,
    front: i64,
}

impl Sequence {
    fn next_back(&mut self) -> i64 {
        self.back += 1;
        self.back
    }
    fn next_front(&mut self) -> i64 {
        self.front -= 1;
        self.front
    }
}

impl PendingQueue {
    /// Append at the back of its priority level.
    pub fn push_back(&mut self, seq: &mut Sequence, priority: i32, id: TaskId) {
        let s = seq.next_back();
        self.levels.entry(priority).or_default().push_back((s, id));
        self.len += 1;
    }

    /// Put at the front of its priority level (a retried task goes before newer ones).
    pub fn push_front(&mut self, seq: &mut Sequence, priority: i32, id: TaskId) {
        let s = seq.next_front();
        self.levels.entry(priority).or_default().push_front((s, id));
        self.len += 1;
    }

    /// The next task's priority and sequence number, without taking it.
    pub fn peek(&self) -> Option<(i32, i64)> {
        let (&priority, level) = self.levels.last_key_value()?;
        level.front().map(|&(s, _)| (priority, s))
    }

    /// Take the next task: the highest priority level, oldest first.
    pub fn pop(&mut self) -> Option<TaskId> {
        let mut entry = self.levels.last_entry()?;
        let id = entry.get_mut().pop_front().map(|(_, id)| id);
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
        let mut seq = Sequence::default();
        let mut q = PendingQueue::default();
        q.push_back(&mut seq, 0, TaskId(1));
        q.push_back(&mut seq, 0, TaskId(2));
        q.push_back(&mut seq, 5, TaskId(3));
        q.push_front(&mut seq, 0, TaskId(4));
        q.push_back(&mut seq, -1, TaskId(5));
        assert_eq!(q.peek(), Some((5, 3)));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|t| t.0).collect();
        assert_eq!(order, vec![3, 4, 1, 2, 5]);
        assert!(q.is_empty());
        assert_eq!(q.peek(), None);
    }
}
