//! What the interchange's tests share: a recording [`Comm`], a configuration, and builders of
//! registrations, tasks, results and functions. Each test file includes it with `mod testkit;`
//! and uses what it needs.
#![allow(dead_code)]

use fnx_interchange::state::*;
use fnx_protocol::*;
use std::time::{Duration, Instant};

/// A [`Comm`] that records everything the interchange does, and serves stored inputs.
#[derive(Default)]
pub struct Rec {
    pub sent: Vec<(Peer, InterchangeToManager)>,
    pub finished: Vec<Finished>,
    pub notices: Vec<Notice>,
    /// Inputs of stored tasks, and every load asked for.
    pub store: std::collections::HashMap<TaskId, Inputs>,
    pub loads: Vec<Vec<TaskId>>,
    pub started: Vec<(TaskId, Attempt)>,
    /// Every load fails as a store error.
    pub store_down: bool,
}

impl Comm for Rec {
    fn started(&mut self, tasks: &[(TaskId, Attempt)]) {
        self.started.extend_from_slice(tasks);
    }
    fn load(&mut self, ids: &[TaskId]) -> Vec<Result<Inputs, LoadError>> {
        self.loads.push(ids.to_vec());
        if self.store_down {
            return ids
                .iter()
                .map(|_| Err(LoadError::Store("disk I/O error".into())))
                .collect();
        }
        ids.iter()
            .map(|id| self.store.get(id).cloned().ok_or(LoadError::Missing))
            .collect()
    }
    fn send(&mut self, to: &Peer, msg: &InterchangeToManager) {
        self.sent.push((to.clone(), msg.clone()));
    }
    fn finished(&mut self, done: Finished) {
        self.finished.push(done);
    }
    fn notice(&mut self, notice: Notice) {
        self.notices.push(notice);
    }
}

impl Rec {
    pub fn take(&mut self) -> Vec<(Peer, InterchangeToManager)> {
        std::mem::take(&mut self.sent)
    }
}

pub const F: FunctionId = FunctionId(1);

pub fn peer(n: u8) -> Peer {
    vec![0, n]
}

pub fn config() -> Config {
    Config {
        heartbeat_period: Duration::from_secs(1),
        heartbeat_threshold: Duration::from_secs(3),
        max_batch_tasks: 100,
        max_batch_bytes: 1 << 20,
        max_payload_bytes: 1000,
        warm_window: 4096,
        release: None,
    }
}

pub fn reg(uid: &str, slots: u32, prefetch: u32) -> ManagerToInterchange {
    ManagerToInterchange::Register(Register {
        uid: uid.into(),
        host: format!("host-{uid}"),
        pid: 1,
        cores: slots,
        slots,
        prefetch,
        block_id: None,
        zero_work: false,
        fnx_version: "test".into(),
    })
}

pub fn task(id: u64) -> NewTask {
    NewTask {
        id: TaskId(id),
        function: F,
        args: Payload::json(format!("[{id}]")),
        priority: 0,
        walltime_ms: None,
        memory_mb: None,
        retries: 1,
        attempt: Attempt(0),
        files: Vec::new(),
        stored: None,
    }
}

pub fn spec(id: u64, attempt: u32) -> TaskSpec {
    TaskSpec {
        files: Vec::new(),
        id: TaskId(id),
        attempt: Attempt(attempt),
        function: F,
        args: Payload::json(format!("[{id}]")),
        walltime_ms: None,
        memory_mb: None,
    }
}

pub fn fdef() -> FunctionDef {
    FunctionDef {
        id: F,
        body: FunctionBody::PythonRef {
            module: "m".into(),
            qualname: "f".into(),
        },
        container: None,
        owner: None,
    }
}

pub fn ok(id: u64, attempt: u32) -> TaskResult {
    TaskResult {
        id: TaskId(id),
        attempt: Attempt(attempt),
        outcome: Outcome::Ok(Payload::json("1")),
    }
}

pub fn err(id: u64, attempt: u32, kind: ErrorKind) -> TaskResult {
    TaskResult {
        id: TaskId(id),
        attempt: Attempt(attempt),
        outcome: Outcome::Err(TaskError::new(kind, "X", "boom")),
    }
}

pub fn setup(_now: Instant) -> (Interchange, Rec) {
    let mut ic = Interchange::new(config());
    ic.add_function(fdef());
    (ic, Rec::default())
}

pub fn counts(queued: usize, running: usize, managers: usize, slots: u64) -> Counts {
    Counts {
        queued,
        held: 0,
        running,
        managers,
        slots,
    }
}

/// One manager "a" with `slots` and no prefetch, holding the dispatched `tasks`.
pub fn one_manager_running(now: Instant, slots: u32, tasks: Vec<NewTask>) -> (Interchange, Rec) {
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", slots, 0), &mut c);
    ic.submit(tasks, &mut c);
    ic.dispatch(&mut c);
    c.take();
    (ic, c)
}

/// What manager `n` is sent when its first tasks of `fdef()` go out: the definition with them.
pub fn first_batch(n: u8, tasks: Vec<TaskSpec>) -> Vec<(Peer, InterchangeToManager)> {
    vec![(
        peer(n),
        InterchangeToManager::Tasks {
            functions: vec![fdef()],
            tasks,
        },
    )]
}

pub fn registered(id: u64) -> InterchangeToManager {
    InterchangeToManager::Registered {
        manager: ManagerId(id),
        heartbeat_period_ms: 1000,
        heartbeat_threshold_ms: 3000,
    }
}
