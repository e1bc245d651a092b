//! The store writer and its transactions on a real SQLite file: each task's outcome is
//! recorded exactly once whatever races it, nothing reported is lost while the disk is full,
//! and recovery reads back every state.

use fnx_daemon::store::writer::{
    Cmd, FunctionInput, Shared, Stats, TaskInput, Writer, WriterConfig,
};
use fnx_daemon::store::{open_writer, unfinished, Reader, State};
use fnx_interchange::Finished;
use fnx_protocol::{Attempt, ErrorKind, FunctionId, Outcome, Payload, TaskError, TaskId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

struct Store {
    tx: Option<Sender<Cmd>>,
    reader: Reader,
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The defaults, without fsync (a test's file is thrown away).
fn config() -> WriterConfig {
    WriterConfig {
        full_sync: false,
        ..WriterConfig::of_site(&fnx_daemon::config::SiteConfig::defaults())
    }
}

impl Store {
    fn open() -> Store {
        let dir = tempfile::tempdir().unwrap();
        Store::start(dir, false, |_| {})
    }

    /// A writer over `dir/fnx.db`; `setup` may change the connection first.
    fn start(
        dir: tempfile::TempDir,
        after_loss: bool,
        setup: impl FnOnce(&rusqlite::Connection),
    ) -> Store {
        Store::start_with(config(), dir, after_loss, setup)
    }

    fn start_with(
        cfg: WriterConfig,
        dir: tempfile::TempDir,
        after_loss: bool,
        setup: impl FnOnce(&rusqlite::Connection),
    ) -> Store {
        let path = dir.path().join("fnx.db");
        let conn = open_writer(&path, false).unwrap();
        setup(&conn);
        let shared = Arc::new(Shared::new(Stats::default()));
        let writer = Writer::new(conn, cfg, shared.clone(), HashMap::new(), after_loss).unwrap();
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || writer.run(rx));
        Store {
            tx: Some(tx),
            reader: Reader::new(&path),
            shared,
            path,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn send(&self, cmd: Cmd) {
        self.tx.as_ref().unwrap().send(cmd).unwrap();
    }

    /// Submit `n` tasks of `owner`; their ids, once committed.
    fn submit(&self, owner: &str, n: usize, arg_bytes: usize) -> Result<Vec<TaskId>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let tasks = (0..n)
            .map(|_| TaskInput {
                function: FunctionId(1),
                pool: "local".into(),
                priority: 0,
                walltime_ms: None,
                retries: 2,
                args: Payload::json(format!("[\"{}\"]", "x".repeat(arg_bytes))),
                files: Vec::new(),
                memory_mb: None,
            })
            .collect();
        self.send(Cmd::Submit {
            owner: owner.into(),
            tasks,
            key: None,
            reply,
        });
        match answer.blocking_recv().unwrap() {
            Ok(s) => Ok(s.ids),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Wait until everything sent before has been committed (or is being retried).
    fn sync(&self) {
        let (tx, rx) = channel();
        self.send(Cmd::Exec(Box::new(move |_| {
            let _ = tx.send(());
        })));
        rx.recv_timeout(WAIT).unwrap();
    }

    /// Why the store refuses new work (what health reports), if it does.
    fn unavailable(&self) -> Option<String> {
        self.shared.stats.lock().unwrap().unavailable.clone()
    }

    fn exec(&self, f: impl FnOnce(&rusqlite::Connection) + Send + 'static) {
        let (tx, rx) = channel();
        self.send(Cmd::Exec(Box::new(move |c| {
            f(c);
            let _ = tx.send(());
        })));
        rx.recv_timeout(WAIT).unwrap();
    }

    fn state(&self, id: TaskId) -> (State, Attempt, Option<u64>, Option<Outcome>) {
        let t = self.reader.task(id).unwrap().expect("the task is stored");
        (t.state, t.attempt, t.seq, t.outcome)
    }

    /// Stop the writer (it commits what is pending) and hand back the directory.
    fn close(mut self) -> tempfile::TempDir {
        self.tx.take();
        self.thread.take().unwrap().join().unwrap();
        std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap())
    }
}

fn ok(id: TaskId, attempt: u32, value: &str) -> Finished {
    Finished {
        id,
        attempt: Attempt(attempt),
        outcome: Outcome::Ok(Payload::json(value)),
    }
}

fn failed(id: TaskId, attempt: u32, kind: ErrorKind) -> Finished {
    Finished {
        id,
        attempt: Attempt(attempt),
        outcome: Outcome::Err(TaskError::new(kind, "X", "boom")),
    }
}

#[test]
fn exactly_one_outcome_is_kept_when_finish_cancel_and_retry_race() {
    let s = Store::open();
    let ids = s.submit("u", 4, 1).unwrap();
    let [a, b, c, d] = ids[..] else { panic!() };
    s.send(Cmd::Dispatched(vec![
        (a, Attempt(1), true),
        (b, Attempt(1), true),
        (c, Attempt(1), false),
    ]));
    // In one round: a result, then a cancel and a late attempt for the same task.
    s.send(Cmd::Finished(vec![
        ok(a, 1, "1"),
        failed(a, 1, ErrorKind::Cancelled),
        failed(a, 2, ErrorKind::WorkerLost),
    ]));
    // Across rounds: a cancel lands first, the result after it is discarded.
    s.send(Cmd::Finished(vec![failed(b, 1, ErrorKind::Cancelled)]));
    s.sync();
    s.send(Cmd::Finished(vec![ok(b, 1, "2")]));
    // A retry: dispatched again as attempt 2, which finishes.
    s.send(Cmd::Dispatched(vec![(c, Attempt(2), true)]));
    s.send(Cmd::Finished(vec![ok(c, 2, "3")]));
    // A queued task cancelled before any dispatch.
    s.send(Cmd::Finished(vec![failed(d, 0, ErrorKind::Cancelled)]));
    s.sync();

    let (state, attempt, seq_a, outcome) = s.state(a);
    assert_eq!((state, attempt), (State::Success, Attempt(1)));
    assert_eq!(outcome, Some(Outcome::Ok(Payload::json("1"))));
    let (state, _, seq_b, _) = s.state(b);
    assert_eq!(state, State::Cancelled);
    let (state, attempt, seq_c, outcome) = s.state(c);
    assert_eq!((state, attempt), (State::Success, Attempt(2)));
    assert_eq!(outcome, Some(Outcome::Ok(Payload::json("3"))));
    let (state, _, seq_d, _) = s.state(d);
    assert_eq!(state, State::Cancelled);
    // One completion number each, all different: each result is delivered once.
    let mut seqs = vec![
        seq_a.unwrap(),
        seq_b.unwrap(),
        seq_c.unwrap(),
        seq_d.unwrap(),
    ];
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 4);
    let results = s.reader.results("u", 0, 100, u64::MAX).unwrap();
    let mut got: Vec<u64> = results.iter().map(|t| t.id.0).collect();
    got.sort();
    assert_eq!(got, ids.iter().map(|t| t.0).collect::<Vec<_>>());
    // A dispatch record arriving after the outcome does not reopen the task.
    s.send(Cmd::Dispatched(vec![(a, Attempt(3), true)]));
    s.sync();
    assert_eq!(s.state(a).0, State::Success);
}

#[test]
fn a_full_disk_refuses_submits_and_keeps_reported_outcomes_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::start(dir, false, |_| {});
    let ids = s.submit("u", 2, 10).unwrap();
    // The store may not grow any more.
    s.exec(|c| {
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        c.pragma_update(None, "max_page_count", pages).unwrap();
    });
    let refused = s
        .submit("u", 50, 100 << 10)
        .expect_err("a submit past the limit");
    assert!(
        refused.contains("full") || refused.contains("cannot commit"),
        "{refused}"
    );
    // An outcome reported now cannot be written either: it waits.
    s.send(Cmd::Dispatched(vec![(ids[0], Attempt(1), true)]));
    s.send(Cmd::Finished(vec![ok(
        ids[0],
        1,
        &format!("\"{}\"", "r".repeat(200 << 10)),
    )]));
    s.sync();
    assert_ne!(
        s.state(ids[0]).0,
        State::Success,
        "written past a full disk?"
    );
    // Room again: the outcome lands without being reported again, exactly once.
    s.exec(|c| {
        c.pragma_update(None, "max_page_count", 1_073_741_823i64)
            .unwrap();
    });
    let deadline = std::time::Instant::now() + WAIT;
    while s.state(ids[0]).0 != State::Success {
        assert!(
            std::time::Instant::now() < deadline,
            "the pending outcome was lost"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.state(ids[0]).2.is_some());
    assert_eq!(s.state(ids[1]).0, State::Queued);
    assert_eq!(s.submit("u", 1, 10).unwrap().len(), 1, "submits work again");
}

#[test]
fn a_full_store_stays_unavailable_while_only_small_records_fit_and_recovers_without_a_submit() {
    // store.max_size_mb = 1, enforced the way the service does (max_page_count).
    let cfg = WriterConfig {
        max_size_bytes: Some(1 << 20),
        ..config()
    };
    let s = Store::start_with(cfg, tempfile::tempdir().unwrap(), false, |c| {
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        c.pragma_update(None, "max_page_count", (1 << 20) / page)
            .unwrap();
    });
    let ids = s.submit("u", 2, 10).unwrap();
    let mut refused = None;
    for _ in 0..200 {
        if let Err(e) = s.submit("u", 10, 8 << 10) {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("a 1 MiB store refuses a submit within 16 MiB");
    assert!(refused.contains("size limit of 1 MiB"), "{refused}");
    assert!(s.unavailable().is_some());
    // The store may grow by four pages now, whatever room the refused batch left under the
    // limit (that depends on SQLite's page layout): enough for a registration and dispatch
    // records, far from enough for the refused batch.
    s.exec(|c| {
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        c.pragma_update(None, "max_page_count", pages + 4).unwrap();
    });

    // A registration is small and fits, but it is not the work that was refused.
    let (reply, answer) = tokio::sync::oneshot::channel();
    s.send(Cmd::Register(
        Box::new(FunctionInput {
            owner: "u".into(),
            name: "f".into(),
            created: 0.0,
            spec: fnx_api::FunctionSpec::new(fnx_api::FunctionKind::Shell),
            body: None,
            container: None,
            build: None,
        }),
        reply,
    ));
    answer
        .blocking_recv()
        .unwrap()
        .expect("a registration fits in four pages");
    s.sync();
    let why = s.unavailable();
    assert!(
        why.is_some(),
        "a registration turned a full store available: {why:?}"
    );

    // A dispatch record still fits and commits (the writer retries it alone after the failed
    // round), yet submits would still fail: the store stays unavailable.
    s.send(Cmd::Dispatched(vec![(ids[0], Attempt(1), true)]));
    s.sync();
    let deadline = std::time::Instant::now() + WAIT;
    while s.state(ids[0]).0 == State::Queued {
        assert!(
            std::time::Instant::now() < deadline,
            "the dispatch record never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.sync();
    let why = s.unavailable();
    assert!(
        why.as_deref().is_some_and(|w| w.contains("size limit")),
        "a small commit turned a full store available: {why:?}"
    );

    // Room again (the limit raised): available without waiting for the next submit.
    s.exec(|c| {
        c.pragma_update(None, "max_page_count", 1_073_741_823i64)
            .unwrap();
    });
    let deadline = std::time::Instant::now() + WAIT;
    while s.unavailable().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "still unavailable with room"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.submit("u", 1, 10).unwrap().len(), 1, "submits work again");
}

#[test]
fn recovery_reads_back_every_state_and_ids_skip_ahead_after_a_loss() {
    let s = Store::open();
    let ids = s.submit("u", 6, 1).unwrap();
    let [queued, prefetched, running, done, failed_id, cancelled] = ids[..] else {
        panic!()
    };
    s.send(Cmd::Dispatched(vec![
        (prefetched, Attempt(1), false),
        (running, Attempt(1), true),
        (done, Attempt(1), true),
        (failed_id, Attempt(1), true),
    ]));
    s.send(Cmd::Finished(vec![
        ok(done, 1, "1"),
        failed(failed_id, 1, ErrorKind::Exception),
        failed(cancelled, 0, ErrorKind::Cancelled),
    ]));
    s.sync();
    let path = s.path.clone();
    let dir = s.close();
    let conn = open_writer(&path, false).unwrap();
    let back = unfinished(&conn, 16 << 10).unwrap();
    let got: Vec<(TaskId, bool, Attempt)> = back
        .iter()
        .map(|r| (r.task.id, r.was_running, r.task.attempt))
        .collect();
    assert_eq!(
        got,
        vec![
            (queued, false, Attempt(0)),
            (prefetched, true, Attempt(1)),
            (running, true, Attempt(1)),
        ]
    );
    drop(conn);
    // After a lost commit the ids move far ahead: an id handed out for a lost task never
    // names a new one.
    let s = Store::start(dir, true, |_| {});
    let next = s.submit("u", 1, 1).unwrap()[0];
    assert!(next.0 > cancelled.0 + (1 << 31), "{next:?}");
    assert_eq!(s.state(done).0, State::Success);
    assert_eq!(s.state(failed_id).0, State::Failed);
}
