//! Worker environments and warm routing.
//!
//! A function may run in a container; the workers started in one container serve every function
//! that names the same container, so each container is a worker *environment* (`""`: the pool's
//! own workers). Starting a container is slow, so queued tasks are kept per environment and a
//! manager is handed tasks of the environments it already has warm (live workers it reported,
//! or tasks of that environment it holds) before others — funcX's warm routing.
//!
//! Warmth never starves anyone: priority still comes first, and a warm task is preferred only
//! while the oldest queued task of another environment is at most `window` places older. Past
//! that, the oldest task goes first wherever there are free slots.

use crate::queue::{PendingQueue, Sequence};
use fnx_protocol::TaskId;
use std::collections::HashMap;

/// Index of an environment (0 is the pool's own workers, `""`).
pub type EnvIx = usize;

/// The pending queues, one per environment.
#[derive(Debug)]
pub struct EnvQueues {
    names: Vec<String>,
    index: HashMap<String, EnvIx>,
    queues: Vec<PendingQueue>,
    /// Environments whose queue has entries.
    live: Vec<EnvIx>,
    seq: Sequence,
    window: i64,
}

impl EnvQueues {
    /// Empty queues; a warm task may pass a queued task of another environment that is at most
    /// `window` places older.
    pub fn new(window: u64) -> Self {
        let mut q = EnvQueues {
            names: Vec::new(),
            index: HashMap::new(),
            queues: Vec::new(),
            live: Vec::new(),
            seq: Sequence::default(),
            window: i64::try_from(window).unwrap_or(i64::MAX),
        };
        q.env("");
        q
    }

    /// The index of environment `name`, created if new.
    pub fn env(&mut self, name: &str) -> EnvIx {
        if let Some(&ix) = self.index.get(name) {
            return ix;
        }
        let ix = self.names.len();
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), ix);
        self.queues.push(PendingQueue::default());
        ix
    }

    /// The index of environment `name`, if known.
    pub fn lookup(&self, name: &str) -> Option<EnvIx> {
        self.index.get(name).copied()
    }

    /// The name of environment `ix`.
    pub fn name(&self, ix: EnvIx) -> &str {
        &self.names[ix]
    }

    /// Queue `id` at the back of its priority level.
    pub fn push_back(&mut self, env: EnvIx, priority: i32, id: TaskId) {
        self.mark_live(env);
        self.queues[env].push_back(&mut self.seq, priority, id);
    }

    /// Queue `id` at the front of its priority level (retries, returned tasks).
    pub fn push_front(&mut self, env: EnvIx, priority: i32, id: TaskId) {
        self.mark_live(env);
        self.queues[env].push_front(&mut self.seq, priority, id);
    }

    fn mark_live(&mut self, env: EnvIx) {
        if self.queues[env].is_empty() {
            self.live.push(env);
        }
    }

    /// The next task for a manager that has the environments for which `warm` is true:
    /// the highest priority first; within it, the oldest task of a warm environment unless a
    /// task of another environment has waited more than the window longer; else the oldest.
    pub fn pop_for(&mut self, warm: impl Fn(EnvIx) -> bool) -> Option<(EnvIx, TaskId)> {
        let pick = match self.live.as_slice() {
            [] => return None,
            [only] => *only,
            live => {
                let mut best: Option<i32> = None;
                let mut oldest: Option<(i64, EnvIx)> = None;
                let mut oldest_warm: Option<(i64, EnvIx)> = None;
                for &env in live {
                    let Some((priority, seq)) = self.queues[env].peek() else {
                        continue;
                    };
                    if best.is_none_or(|b| priority > b) {
                        best = Some(priority);
                        oldest = None;
                        oldest_warm = None;
                    } else if Some(priority) != best {
                        continue;
                    }
                    if oldest.is_none_or(|(s, _)| seq < s) {
                        oldest = Some((seq, env));
                    }
                    if warm(env) && oldest_warm.is_none_or(|(s, _)| seq < s) {
                        oldest_warm = Some((seq, env));
                    }
                }
                match (oldest_warm, oldest) {
                    (Some((w, env)), Some((o, _))) if w.saturating_sub(o) <= self.window => env,
                    (_, Some((_, env))) => env,
                    _ => return None,
                }
            }
        };
        let id = self.queues[pick].pop();
        if self.queues[pick].is_empty() {
            self.live.retain(|&e| e != pick);
        }
        id.map(|id| (pick, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut EnvQueues, warm: &[EnvIx], n: usize) -> Vec<u64> {
        (0..n)
            .filter_map(|_| q.pop_for(|e| warm.contains(&e)))
            .map(|(_, id)| id.0)
            .collect()
    }

    #[test]
    fn one_environment_is_plain_fifo_by_priority() {
        let mut q = EnvQueues::new(100);
        for i in 1..=3 {
            q.push_back(0, 0, TaskId(i));
        }
        q.push_back(0, 9, TaskId(4));
        q.push_front(0, 0, TaskId(5));
        assert_eq!(drain(&mut q, &[], 10), [4, 5, 1, 2, 3]);
    }

    #[test]
    fn warm_environments_first_then_the_oldest() {
        let mut q = EnvQueues::new(100);
        let (a, b) = (q.env("pool:a"), q.env("pool:b"));
        assert_eq!(q.env("pool:a"), a);
        assert_eq!((q.name(b), q.lookup("pool:b")), ("pool:b", Some(b)));
        for i in 0..10 {
            q.push_back(if i % 2 == 0 { a } else { b }, 0, TaskId(i));
        }
        // Warm for b: b's tasks first, though a's head is older.
        assert_eq!(drain(&mut q, &[b], 3), [1, 3, 5]);
        // Nothing warm: the oldest, whatever its environment.
        assert_eq!(drain(&mut q, &[], 2), [0, 2]);
        // Warm for both: oldest first.
        assert_eq!(drain(&mut q, &[a, b], 5), [4, 6, 7, 8, 9]);
        assert_eq!(q.pop_for(|_| true), None);
    }

    #[test]
    fn priority_beats_warmth_and_the_window_bounds_passing() {
        let mut q = EnvQueues::new(3);
        let (a, b) = (q.env("a"), q.env("b"));
        q.push_back(b, 0, TaskId(100)); // the oldest, cold
        for i in 1..=6 {
            q.push_back(a, 0, TaskId(i));
        }
        q.push_back(b, 5, TaskId(200)); // higher priority, cold
        assert_eq!(drain(&mut q, &[a], 1), [200]);
        // a's tasks may pass task 100 while they are at most 3 places younger.
        assert_eq!(drain(&mut q, &[a], 4), [1, 2, 3, 100]);
        assert_eq!(drain(&mut q, &[a], 9), [4, 5, 6]);
    }
}
