//! The manager's link thread against an interchange played by a real ROUTER socket, with the
//! pool's end of the inproc pair held by the test: what reaches the interchange, what reaches
//! the pool, and how the link ends.

use fnx_manager::link::{self, LinkConfig};
use fnx_manager::pair::{ToLink, ToPool};
use fnx_protocol::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
static NEXT: AtomicU64 = AtomicU64::new(0);

/// An interchange's socket, a link thread connected to it, and the pool's end of the pair.
struct Setup {
    router: zmq::Socket,
    pool: zmq::Socket,
    thread: Option<std::thread::JoinHandle<()>>,
    _ctx: zmq::Context,
}

fn register() -> Register {
    Register {
        uid: "m0".into(),
        host: "node1".into(),
        pid: 1,
        cores: 2,
        slots: 2,
        prefetch: 2,
        block_id: None,
        zero_work: false,
        fnx_version: "test".into(),
    }
}

impl Setup {
    fn start(heartbeat: Duration, threshold: Duration) -> Setup {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        let addr = format!(
            "inproc://link-test-{}",
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pool = ctx.socket(zmq::PAIR).unwrap();
        pool.bind(&addr).unwrap();
        let link_side = ctx.socket(zmq::PAIR).unwrap();
        link_side.connect(&addr).unwrap();
        let cfg = LinkConfig {
            interchange: endpoint,
            heartbeat_period: heartbeat,
            heartbeat_threshold: threshold,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            curve: None,
        };
        let link_ctx = ctx.clone();
        let thread = std::thread::spawn(move || link::run(&link_ctx, cfg, register(), link_side));
        Setup {
            router,
            pool,
            thread: Some(thread),
            _ctx: ctx,
        }
    }

    /// The next message the interchange gets, with the peer's identity.
    fn recv(&self) -> (Vec<u8>, Vec<u8>) {
        assert!(
            self.router
                .poll(zmq::POLLIN, WAIT.as_millis() as i64)
                .unwrap()
                > 0,
            "nothing reached the interchange"
        );
        let parts = self.router.recv_multipart(0).unwrap();
        (parts[0].clone(), parts[1].clone())
    }

    /// The next message that is not a heartbeat.
    fn recv_msg(&self) -> (Vec<u8>, ManagerToInterchange) {
        loop {
            let (peer, frame) = self.recv();
            let m: ManagerToInterchange = decode(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            if m != ManagerToInterchange::Heartbeat {
                return (peer, m);
            }
        }
    }

    fn send(&self, peer: &[u8], frame: &[u8]) {
        self.router.send_multipart([peer, frame], 0).unwrap();
    }

    fn to_pool(&self, wait: Duration) -> Option<ToPool> {
        if self
            .pool
            .poll(zmq::POLLIN, wait.as_millis() as i64)
            .unwrap()
            == 0
        {
            return None;
        }
        ToPool::recv(&self.pool, 0)
    }

    /// Tell the link to stop, and wait for its thread.
    fn quit(mut self, bye: Option<&str>) {
        ToLink::Quit(bye.map(str::to_string))
            .send(&self.pool)
            .unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn frame(m: &InterchangeToManager) -> Vec<u8> {
    encode(m, DEFAULT_MAX_FRAME_BYTES).unwrap()
}

#[test]
fn the_link_registers_keeps_its_heartbeat_and_forwards_task_batches_as_received() {
    let s = Setup::start(Duration::from_millis(50), WAIT);
    let (peer, m) = s.recv_msg();
    assert_eq!(m, ManagerToInterchange::Register(register()));
    s.send(
        &peer,
        &frame(&InterchangeToManager::Registered {
            manager: ManagerId(1),
            heartbeat_period_ms: 50,
            heartbeat_threshold_ms: 10_000,
        }),
    );
    // The link's own messages stay with it.
    s.send(&peer, &frame(&InterchangeToManager::Heartbeat));
    assert!(s.to_pool(Duration::from_millis(200)).is_none());
    // Heartbeats on the link's own clock.
    let t0 = Instant::now();
    let mut beats = 0;
    while beats < 3 {
        let (_, f) = s.recv();
        if decode::<ManagerToInterchange>(&f, DEFAULT_MAX_FRAME_BYTES).unwrap()
            == ManagerToInterchange::Heartbeat
        {
            beats += 1;
        }
    }
    assert!(t0.elapsed() < WAIT);
    // A task batch reaches the pool byte for byte; so do cancels.
    let tasks = frame(&InterchangeToManager::Tasks {
        functions: Vec::new(),
        tasks: vec![TaskSpec {
            id: TaskId(5),
            attempt: Attempt(1),
            function: FunctionId(1),
            args: Payload::json("[1]"),
            walltime_ms: None,
            files: Vec::new(),
            memory_mb: None,
        }],
    });
    let cancel = frame(&InterchangeToManager::Cancel {
        tasks: vec![(TaskId(5), Attempt(1))],
    });
    s.send(&peer, &tasks);
    s.send(&peer, &cancel);
    for want in [&tasks, &cancel] {
        match s.to_pool(WAIT) {
            Some(ToPool::Frame(m)) => assert_eq!(&m[..], &want[..]),
            other => panic!("{other:?}"),
        }
    }
    // What the pool sends goes out as it is.
    let results = encode(&ManagerToInterchange::Drain, DEFAULT_MAX_FRAME_BYTES).unwrap();
    ToLink::Send(zmq::Message::from(results))
        .send(&s.pool)
        .unwrap();
    assert_eq!(s.recv_msg().1, ManagerToInterchange::Drain);
    // A restarted interchange: registration again, and the pool hears of it.
    s.send(
        &peer,
        &frame(&InterchangeToManager::Reregister {
            reason: "restarted".into(),
        }),
    );
    assert_eq!(s.recv_msg().1, ManagerToInterchange::Register(register()));
    assert!(matches!(s.to_pool(WAIT), Some(ToPool::Frame(_))));
    s.quit(None);
}

#[test]
fn the_link_says_bye_when_the_pool_quits() {
    let s = Setup::start(Duration::from_secs(5), WAIT);
    let (peer, _) = s.recv_msg();
    s.send(
        &peer,
        &frame(&InterchangeToManager::Registered {
            manager: ManagerId(1),
            heartbeat_period_ms: 5000,
            heartbeat_threshold_ms: 10_000,
        }),
    );
    ToLink::Quit(Some("drained".into())).send(&s.pool).unwrap();
    assert_eq!(
        s.recv_msg().1,
        ManagerToInterchange::Bye {
            reason: "drained".into()
        }
    );
    let mut s = s;
    s.thread.take().unwrap().join().unwrap();
}

#[test]
fn the_link_ends_naming_another_version_or_a_silent_interchange() {
    // Another protocol version answers the registration.
    let s = Setup::start(Duration::from_secs(5), WAIT);
    let (peer, _) = s.recv_msg();
    let mut other = frame(&InterchangeToManager::Heartbeat);
    other[1] = 99;
    s.send(&peer, &other);
    match s.to_pool(WAIT) {
        Some(ToPool::Ended(why)) => {
            assert!(
                why.contains("protocol version mismatch") && why.contains("99"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    s.quit(None);

    // Nobody answers: the link gives up after the threshold, saying so.
    let s = Setup::start(Duration::from_millis(50), Duration::from_millis(300));
    let _ = s.recv_msg();
    match s.to_pool(WAIT) {
        Some(ToPool::Ended(why)) => {
            assert!(why.contains("did not answer the registration"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    s.quit(None);
}
