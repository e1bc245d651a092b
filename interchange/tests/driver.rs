//! The driver on a real ROUTER socket, with managers played by DEALER sockets on loopback: what
//! a manager sees on the wire, and what the host gets as events.

use fnx_interchange::driver::{self, DriverConfig, Event, Handle};
use fnx_interchange::Notice;
use fnx_protocol::*;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

mod testkit;
use testkit::{fdef, ok, task};

const WAIT: Duration = Duration::from_secs(10);

/// A registration from a manager of this fnx release (the driver refuses other releases).
fn reg(uid: &str, slots: u32, prefetch: u32) -> ManagerToInterchange {
    let mut r = testkit::reg(uid, slots, prefetch);
    if let ManagerToInterchange::Register(r) = &mut r {
        r.fnx_version = env!("CARGO_PKG_VERSION").into();
    }
    r
}

fn start(cfg: DriverConfig) -> (Handle, Receiver<Event>) {
    let (handle, events) = driver::start(cfg).expect("the driver starts");
    handle.add_function(fdef());
    (handle, events)
}

fn config() -> DriverConfig {
    let mut cfg = DriverConfig::new("tcp://127.0.0.1:0");
    cfg.report_dispatch = true;
    cfg.tick = Duration::from_millis(20);
    cfg
}

/// A manager's socket, connected to the driver.
struct Manager {
    dealer: zmq::Socket,
    _ctx: zmq::Context,
}

impl Manager {
    fn connect(endpoint: &str) -> Manager {
        let ctx = zmq::Context::new();
        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer.connect(endpoint).unwrap();
        Manager { dealer, _ctx: ctx }
    }

    fn send(&self, msg: &ManagerToInterchange) {
        self.raw(&encode(msg, DEFAULT_MAX_FRAME_BYTES).unwrap());
    }

    fn raw(&self, bytes: &[u8]) {
        self.dealer.send(bytes, 0).unwrap();
    }

    /// The next message, waiting at most `WAIT`.
    fn recv(&self) -> InterchangeToManager {
        self.try_recv(WAIT).expect("a message from the interchange")
    }

    fn try_recv(&self, wait: Duration) -> Option<InterchangeToManager> {
        if self
            .dealer
            .poll(zmq::POLLIN, wait.as_millis() as i64)
            .unwrap()
            == 0
        {
            return None;
        }
        let frame = self.dealer.recv_bytes(0).unwrap();
        Some(decode(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap())
    }

    /// Task specs received until `n` have come (heartbeats and other messages skipped).
    fn tasks(&self, n: usize) -> Vec<TaskSpec> {
        let mut got = Vec::new();
        while got.len() < n {
            if let InterchangeToManager::Tasks { tasks, .. } = self.recv() {
                got.extend(tasks);
            }
        }
        got
    }
}

/// Events until `done` says enough, at most `WAIT`.
fn events_until(events: &Receiver<Event>, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = events.recv_timeout(left).expect("the awaited event");
        let stop = done(&e);
        got.push(e);
        if stop {
            return got;
        }
    }
}

fn finished_ids(events: &[Event]) -> Vec<(u64, Outcome)> {
    events
        .iter()
        .flat_map(|e| match e {
            Event::Finished(f) => f.iter().map(|f| (f.id.0, f.outcome.clone())).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn a_manager_on_a_real_socket_registers_runs_tasks_and_its_results_reach_the_host() {
    let (handle, events) = start(config());
    let m = Manager::connect(handle.endpoint());
    m.send(&reg("a", 2, 2));
    let first = m.recv();
    assert!(
        matches!(first, InterchangeToManager::Registered { .. }),
        "{first:?}"
    );
    let e = events_until(&events, |e| {
        matches!(e, Event::Notice(Notice::Registered { .. }))
    });
    assert!(matches!(
        e.last(),
        Some(Event::Notice(Notice::Registered { uid, slots: 2, .. })) if uid == "a"
    ));

    handle.submit((1..=3).map(task).collect());
    let specs = m.tasks(3);
    let ids: Vec<u64> = specs.iter().map(|s| s.id.0).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(specs.iter().all(|s| s.attempt == Attempt(1)));
    m.send(&ManagerToInterchange::Results(vec![
        ok(1, 1),
        ok(2, 1),
        ok(3, 1),
    ]));
    let mut left = 3;
    let e = events_until(&events, |e| {
        if let Event::Finished(f) = e {
            left -= f.len();
        }
        left == 0
    });
    // Every dispatch is reported before the task's outcome.
    let dispatched: Vec<u64> = e
        .iter()
        .flat_map(|e| match e {
            Event::Dispatched(d) => d.iter().map(|(id, _, _)| id.0).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(dispatched, vec![1, 2, 3]);
    let done = finished_ids(&e);
    assert_eq!(done.len(), 3);
    assert!(
        done.iter().all(|(_, o)| matches!(o, Outcome::Ok(_))),
        "{done:?}"
    );

    handle.shutdown("test over");
    loop {
        match m.recv() {
            InterchangeToManager::Shutdown { reason } => {
                assert_eq!(reason, "test over");
                break;
            }
            _ => continue,
        }
    }
}

#[test]
fn garbage_oversized_and_other_version_frames_do_not_stop_the_driver() {
    let mut cfg = config();
    cfg.max_frame_bytes = 4096;
    let (handle, events) = start(cfg);
    let stranger = Manager::connect(handle.endpoint());
    stranger.raw(b"\x00not a frame");
    stranger.raw(&[]);
    // A frame over the limit: ZeroMQ drops that connection (the manager would reconnect).
    let huge = Manager::connect(handle.endpoint());
    huge.raw(&vec![0x92; 64 << 10]);
    // Another protocol version: refused, naming both versions.
    let mut other = encode(&reg("old", 1, 0), DEFAULT_MAX_FRAME_BYTES).unwrap();
    other[1] = 99;
    stranger.raw(&other);
    match stranger.recv() {
        InterchangeToManager::Rejected { reason } => {
            assert!(
                reason.contains("99") && reason.contains(&PROTOCOL_VERSION.to_string()),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The driver still serves a good manager.
    let m = Manager::connect(handle.endpoint());
    m.send(&reg("good", 1, 0));
    assert!(matches!(m.recv(), InterchangeToManager::Registered { .. }));
    handle.submit(vec![task(7)]);
    assert_eq!(m.tasks(1)[0].id, TaskId(7));
    m.send(&ManagerToInterchange::Results(vec![ok(7, 1)]));
    let e = events_until(&events, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished_ids(&e).len(), 1);
    // Nothing the stranger sent was taken for a manager.
    let (counts, managers) = handle.status().expect("status");
    assert_eq!((counts.managers, managers.len()), (1, 1));
}

#[test]
fn a_silent_manager_is_lost_and_its_task_goes_to_another_with_a_new_attempt() {
    let mut cfg = config();
    cfg.state.heartbeat_period = Duration::from_millis(100);
    cfg.state.heartbeat_threshold = Duration::from_millis(600);
    let (handle, events) = start(cfg);
    let silent = Manager::connect(handle.endpoint());
    silent.send(&reg("silent", 1, 0));
    assert!(matches!(
        silent.recv(),
        InterchangeToManager::Registered { .. }
    ));
    handle.submit(vec![task(1)]);
    assert_eq!(silent.tasks(1)[0].attempt, Attempt(1));
    // The second manager keeps its heartbeats up; the first says nothing more.
    let alive = Manager::connect(handle.endpoint());
    alive.send(&reg("alive", 1, 0));
    let deadline = Instant::now() + WAIT;
    let spec = loop {
        assert!(Instant::now() < deadline, "the task never moved");
        alive.send(&ManagerToInterchange::Heartbeat);
        match alive.try_recv(Duration::from_millis(50)) {
            Some(InterchangeToManager::Tasks { tasks, .. }) => break tasks[0].clone(),
            _ => continue,
        }
    };
    assert_eq!((spec.id, spec.attempt), (TaskId(1), Attempt(2)));
    let e = events_until(&events, |e| matches!(e, Event::Notice(Notice::Lost { .. })));
    assert!(matches!(
        e.last(),
        Some(Event::Notice(Notice::Lost { uid, requeued: 1, .. })) if uid == "silent"
    ));
    // A late result of the first attempt does not finish the task.
    silent.send(&ManagerToInterchange::Results(vec![ok(1, 1)]));
    alive.send(&ManagerToInterchange::Results(vec![ok(1, 2)]));
    let e = events_until(&events, |e| matches!(e, Event::Finished(_)));
    let f: Vec<_> = e
        .iter()
        .filter_map(|e| match e {
            Event::Finished(f) => Some(f.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].id, f[0].attempt), (TaskId(1), Attempt(2)));
    handle.shutdown("done");
}
