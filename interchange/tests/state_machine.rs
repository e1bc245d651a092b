//! Feed the interchange events; assert the exact messages it emits.

use fnx_interchange::state::*;
use fnx_protocol::*;
use std::time::{Duration, Instant};

mod testkit;
use testkit::*;

#[test]
fn registration_is_answered_and_tasks_go_out_in_one_batch_up_to_capacity() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 2, 1), &mut c);
    assert_eq!(c.take(), vec![(peer(1), registered(1))]);
    ic.submit((1..=5).map(task).collect(), &mut c);
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![fdef()],
                tasks: vec![spec(1, 1), spec(2, 1), spec(3, 1)]
            }
        )]
    );
    assert_eq!(ic.counts(), counts(2, 3, 1, 2));
    // A result frees one slot; the next dispatch sends one task and no function body again.
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![],
                tasks: vec![spec(4, 1)]
            }
        )]
    );
    assert_eq!(
        c.finished,
        vec![Finished {
            id: TaskId(1),
            attempt: Attempt(1),
            outcome: Outcome::Ok(Payload::json("1"))
        }]
    );
}

#[test]
fn priority_first_then_fifo() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    let mut urgent = task(9);
    urgent.priority = 10;
    ic.submit(vec![task(1), task(2), urgent], &mut c);
    ic.on_message(now, &peer(1), reg("a", 3, 0), &mut c);
    c.take();
    ic.dispatch(&mut c);
    let sent = c.take();
    let InterchangeToManager::Tasks { tasks, .. } = &sent[0].1 else {
        panic!("{sent:?}")
    };
    assert_eq!(
        tasks.iter().map(|t| t.id.0).collect::<Vec<_>>(),
        vec![9, 1, 2]
    );
}

#[test]
fn tasks_are_spread_round_robin_over_managers() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 2, 0), &mut c);
    ic.on_message(now, &peer(2), reg("b", 2, 0), &mut c);
    c.take();
    ic.submit((1..=3).map(task).collect(), &mut c);
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![
            (
                peer(1),
                InterchangeToManager::Tasks {
                    functions: vec![fdef()],
                    tasks: vec![spec(1, 1), spec(2, 1)]
                }
            ),
            (
                peer(2),
                InterchangeToManager::Tasks {
                    functions: vec![fdef()],
                    tasks: vec![spec(3, 1)]
                }
            ),
        ]
    );
}

#[test]
fn worker_lost_is_retried_with_a_new_attempt_then_fails() {
    let now = Instant::now();
    let (mut ic, mut c) = one_manager_running(now, 1, vec![task(1)]);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![err(1, 1, ErrorKind::WorkerLost)]),
        &mut c,
    );
    assert!(c.finished.is_empty(), "first loss is retried");
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![],
                tasks: vec![spec(1, 2)]
            }
        )]
    );
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![err(1, 2, ErrorKind::WorkerLost)]),
        &mut c,
    );
    assert_eq!(c.finished.len(), 1);
    let Outcome::Err(e) = &c.finished[0].outcome else {
        panic!()
    };
    assert_eq!(e.kind, ErrorKind::WorkerLost);
    assert!(
        e.message.starts_with("the task crashed 2 workers"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("host-a") && e.message.contains("attempt 2"),
        "{}",
        e.message
    );
    assert!(ic.is_idle());
}

#[test]
fn user_exceptions_are_never_retried() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 1, 0), &mut c);
    ic.submit(vec![task(1)], &mut c);
    ic.dispatch(&mut c);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![err(1, 1, ErrorKind::Exception)]),
        &mut c,
    );
    assert_eq!(c.finished.len(), 1);
    assert_eq!(
        c.finished[0].outcome,
        Outcome::Err(TaskError::new(ErrorKind::Exception, "X", "boom"))
    );
}

#[test]
fn a_silent_manager_expires_its_tasks_requeue_and_late_messages_are_refused() {
    let t0 = Instant::now();
    let (mut ic, mut c) = setup(t0);
    ic.on_message(t0, &peer(1), reg("a", 1, 0), &mut c);
    ic.on_message(t0, &peer(2), reg("b", 1, 0), &mut c);
    let mut no_retry = task(2);
    no_retry.retries = 0;
    ic.submit(vec![task(1), no_retry], &mut c);
    ic.dispatch(&mut c);
    c.take();
    // b keeps heartbeating, a stays silent past the threshold.
    let t1 = t0 + Duration::from_secs(2);
    ic.on_message(t1, &peer(2), ManagerToInterchange::Heartbeat, &mut c);
    assert_eq!(c.take(), vec![(peer(2), InterchangeToManager::Heartbeat)]);
    let t2 = t0 + Duration::from_millis(3500);
    ic.tick(t2, &mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Shutdown {
                reason: "declared lost after missing heartbeats".into()
            }
        )]
    );
    assert!(
        matches!(&c.notices.last(), Some(Notice::Lost { uid, requeued: 1, failed: 0, .. }) if uid == "a")
    );
    // Task 1 (on a) is queued again; it goes to b once b frees its slot.
    ic.on_message(
        t2,
        &peer(2),
        ManagerToInterchange::Results(vec![ok(2, 1)]),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(2),
            InterchangeToManager::Tasks {
                functions: vec![],
                tasks: vec![spec(1, 2)]
            }
        )]
    );
    // a wakes up: its heartbeat and its stale result are refused; nothing is recorded twice.
    ic.on_message(t2, &peer(1), ManagerToInterchange::Heartbeat, &mut c);
    ic.on_message(
        t2,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    let shutdown = InterchangeToManager::Shutdown {
        reason: "not registered with this interchange (unknown or expired)".into(),
    };
    assert_eq!(
        c.take(),
        vec![(peer(1), shutdown.clone()), (peer(1), shutdown)]
    );
    assert_eq!(c.finished.iter().filter(|f| f.id == TaskId(1)).count(), 0);
    ic.on_message(
        t2,
        &peer(2),
        ManagerToInterchange::Results(vec![ok(1, 2)]),
        &mut c,
    );
    assert_eq!(c.finished.iter().filter(|f| f.id == TaskId(1)).count(), 1);
}

#[test]
fn a_lost_manager_fails_tasks_without_retries_as_manager_lost_naming_the_host() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 1, 0), &mut c);
    let mut t = task(1);
    t.retries = 0;
    ic.submit(vec![t], &mut c);
    ic.dispatch(&mut c);
    ic.manager_gone(
        "a",
        "its process exited (killed by signal 9 (SIGKILL))",
        &mut c,
    );
    let Outcome::Err(e) = &c.finished[0].outcome else {
        panic!()
    };
    assert_eq!(e.kind, ErrorKind::ManagerLost);
    assert!(
        e.message.contains("host-a") && e.message.contains("SIGKILL"),
        "{}",
        e.message
    );
    assert_eq!(ic.counts().managers, 0);
}

#[test]
fn a_result_for_a_task_held_by_another_manager_is_ignored() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 1, 0), &mut c);
    ic.on_message(now, &peer(2), reg("b", 1, 0), &mut c);
    ic.submit(vec![task(1)], &mut c);
    ic.dispatch(&mut c);
    // Task 1 went to a; b forges its result, and a second result for an unknown task.
    ic.on_message(
        now,
        &peer(2),
        ManagerToInterchange::Results(vec![ok(1, 1), ok(77, 1)]),
        &mut c,
    );
    assert!(c.finished.is_empty());
    let discarded: Vec<_> = c
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Discarded { id, attempt, .. } => Some((id.0, attempt.0)),
            _ => None,
        })
        .collect();
    assert_eq!(discarded, vec![(1, 1), (77, 1)]);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    assert_eq!(c.finished.len(), 1);
}

#[test]
fn a_wrong_protocol_version_is_refused_with_both_versions_and_others_keep_working() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 1, 0), &mut c);
    c.take();
    ic.on_bad_frame(
        &peer(9),
        &FrameError::VersionMismatch {
            peer: 99,
            ours: PROTOCOL_VERSION,
        },
        &mut c,
    );
    let reason = format!("protocol version mismatch: manager speaks version 99, interchange speaks version {PROTOCOL_VERSION}");
    assert_eq!(
        c.take(),
        vec![(peer(9), InterchangeToManager::Rejected { reason })]
    );
    ic.on_bad_frame(
        &peer(8),
        &FrameError::Malformed {
            reason: "junk".into(),
        },
        &mut c,
    );
    assert!(
        c.take().is_empty(),
        "garbage from an unknown peer gets no answer"
    );
    ic.submit(vec![task(1)], &mut c);
    ic.dispatch(&mut c);
    assert_eq!(c.take().len(), 1, "the registered manager still gets work");
}

#[test]
fn drain_stops_dispatch_and_releases_the_manager_when_empty() {
    let now = Instant::now();
    let (mut ic, mut c) = one_manager_running(now, 1, vec![task(1), task(2)]);
    ic.on_message(now, &peer(1), ManagerToInterchange::Drain, &mut c);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(c.take(), vec![(peer(1), InterchangeToManager::Drained)]);
    assert_eq!(ic.counts(), counts(1, 0, 0, 0));
}

#[test]
fn cancel_finishes_queued_tasks_at_once_and_asks_the_manager_for_running_ones() {
    let now = Instant::now();
    let (mut ic, mut c) = one_manager_running(now, 1, vec![task(1), task(2)]);
    ic.cancel(&[TaskId(1), TaskId(2)], &mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Cancel {
                tasks: vec![(TaskId(1), Attempt(1))]
            }
        )]
    );
    assert_eq!(c.finished.len(), 1);
    assert_eq!(c.finished[0].id, TaskId(2));
    // The manager's kill shows up as worker_lost: it is reported cancelled, not retried.
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![err(1, 1, ErrorKind::WorkerLost)]),
        &mut c,
    );
    let Outcome::Err(e) = &c.finished[1].outcome else {
        panic!()
    };
    assert_eq!(e.kind, ErrorKind::Cancelled);
    ic.dispatch(&mut c);
    assert!(c.take().is_empty(), "the cancelled queued task never runs");
}

#[test]
fn invalid_tasks_finish_at_once_as_bad_input() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    let mut unknown = task(1);
    unknown.function = FunctionId(42);
    let mut big = task(2);
    big.args = Payload::json(vec![b' '; 1001]);
    ic.submit(vec![unknown, big, task(3), task(3)], &mut c);
    let kinds: Vec<(u64, ErrorKind)> = c
        .finished
        .iter()
        .map(|f| match &f.outcome {
            Outcome::Err(e) => (f.id.0, e.kind),
            Outcome::Ok(_) => panic!(),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, ErrorKind::BadInput),
            (2, ErrorKind::BadInput),
            (3, ErrorKind::BadInput)
        ]
    );
    assert_eq!(ic.counts().queued, 1);
}

#[test]
fn a_malformed_message_from_a_registered_manager_loses_it() {
    let now = Instant::now();
    let (mut ic, mut c) = one_manager_running(now, 1, vec![task(1)]);
    ic.on_bad_frame(
        &peer(1),
        &FrameError::Malformed {
            reason: "junk".into(),
        },
        &mut c,
    );
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Shutdown {
                reason: "malformed message: malformed frame: junk".into()
            }
        )]
    );
    assert_eq!(ic.counts(), counts(1, 0, 0, 0));
}

#[test]
fn zero_slots_and_double_registration_are_refused() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 0, 0), &mut c);
    assert!(
        matches!(&c.take()[0].1, InterchangeToManager::Rejected { reason } if reason.contains("0 worker slots"))
    );
    ic.on_message(now, &peer(2), reg("b", 1, 0), &mut c);
    ic.on_message(now, &peer(2), reg("b", 1, 0), &mut c);
    let sent = c.take();
    assert!(
        matches!(&sent[1].1, InterchangeToManager::Rejected { reason } if reason.contains("twice"))
    );
    assert_eq!(ic.counts().managers, 1);
}

#[test]
fn a_short_queue_is_spread_evenly_instead_of_filling_one_prefetch() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 2, 64), &mut c);
    ic.on_message(now, &peer(2), reg("b", 2, 64), &mut c);
    c.take();
    ic.submit((1..=10).map(task).collect(), &mut c);
    ic.dispatch(&mut c);
    let sizes: Vec<(Peer, usize)> = c
        .take()
        .into_iter()
        .map(|(p, m)| match m {
            InterchangeToManager::Tasks { tasks, .. } => (p, tasks.len()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![(peer(1), 5), (peer(2), 5)]);
}

#[test]
fn idle_workers_reclaim_tasks_prefetched_by_a_busy_manager() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 1, 4), &mut c);
    ic.on_message(now, &peer(2), reg("b", 1, 4), &mut c);
    c.take();
    ic.submit((1..=10).map(task).collect(), &mut c);
    ic.dispatch(&mut c);
    assert_eq!(
        c.take().len(),
        2,
        "5 tasks each: more queued than idle slots, so prefetch"
    );
    // b finishes its five; a is stuck on its first and holds four unstarted.
    let b_results = (6..=10).map(|i| ok(i, 1)).collect();
    ic.on_message(
        now,
        &peer(2),
        ManagerToInterchange::Results(b_results),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(peer(1), InterchangeToManager::Reclaim { max: 1 })]
    );
    ic.dispatch(&mut c);
    assert!(c.take().is_empty(), "one reclaim at a time per manager");
    // a gives back its newest unstarted task; it goes to b's idle slot, not back to a.
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Returned(vec![(TaskId(5), Attempt(1))]),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(2),
            InterchangeToManager::Tasks {
                functions: vec![],
                tasks: vec![spec(5, 2)]
            }
        )],
        "no further reclaim: no slot is idle any more"
    );
    assert_eq!(ic.counts(), counts(0, 5, 2, 2));
}

#[test]
fn a_short_queue_goes_to_idle_slots_only() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("a", 2, 64), &mut c);
    ic.on_message(now, &peer(2), reg("b", 2, 64), &mut c);
    ic.submit((1..=4).map(task).collect(), &mut c);
    ic.dispatch(&mut c);
    c.take();
    // Both managers are full (2 running each). Two more tasks arrive; a frees one slot.
    ic.submit((5..=6).map(task).collect(), &mut c);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    ic.dispatch(&mut c);
    // Two queued tasks, one idle slot: prefetch is allowed (more work than idle slots) and
    // shared evenly between the two managers with capacity.
    let sent = c.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(2, 1)]),
        &mut c,
    );
    ic.submit(vec![task(7)], &mut c);
    ic.dispatch(&mut c);
    // One task, one idle slot (on a): it goes to a, not into b's prefetch.
    let sent = c.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, peer(1));
}

#[test]
fn a_manager_unknown_to_a_restarted_interchange_is_asked_to_register_again() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    // Peer 5 registered with an earlier incarnation of this interchange: its heartbeat and its
    // result arrive first on the new one.
    ic.on_message(now, &peer(5), ManagerToInterchange::Heartbeat, &mut c);
    ic.on_message(
        now,
        &peer(5),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut c,
    );
    let again = InterchangeToManager::Reregister {
        reason: "this interchange does not know this manager (it restarted?)".into(),
    };
    assert_eq!(c.take(), vec![(peer(5), again.clone()), (peer(5), again)]);
    assert!(
        c.finished.is_empty(),
        "a result from an unknown manager is never recorded"
    );
    // It registers again and gets work; a manager that was declared lost is still told to exit
    // (fault 7), see a_silent_manager_expires_its_tasks_requeue_and_late_messages_are_refused.
    ic.on_message(now, &peer(5), reg("a", 1, 0), &mut c);
    assert!(matches!(
        c.take().as_slice(),
        [(_, InterchangeToManager::Registered { .. })]
    ));
}

#[test]
fn drain_block_drains_only_that_blocks_managers() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    for (n, block) in [(1u8, 7u64), (2, 7), (3, 8)] {
        let ManagerToInterchange::Register(mut r) = reg(&format!("m{n}"), 1, 0) else {
            unreachable!()
        };
        r.block_id = Some(BlockId(block));
        ic.on_message(now, &peer(n), ManagerToInterchange::Register(r), &mut c);
    }
    c.take();
    ic.drain_block(BlockId(7), &mut c);
    // Idle managers of block 7 are told to drain and released at once; block 8 is untouched.
    let sent = c.take();
    for n in [1u8, 2] {
        assert!(
            sent.contains(&(peer(n), InterchangeToManager::Drain)),
            "{sent:?}"
        );
        assert!(
            sent.contains(&(peer(n), InterchangeToManager::Drained)),
            "{sent:?}"
        );
    }
    assert!(sent.iter().all(|(p, _)| *p != peer(3)), "{sent:?}");
    ic.submit(vec![task(1)], &mut c);
    ic.dispatch(&mut c);
    let sent = c.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, peer(3), "only block 8's manager gets work");
}

#[test]
fn a_second_manager_with_the_same_uid_is_rejected() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.on_message(now, &peer(1), reg("same", 1, 0), &mut c);
    c.take();
    ic.on_message(now, &peer(2), reg("same", 1, 0), &mut c);
    let sent = c.take();
    assert_eq!(sent.len(), 1);
    let InterchangeToManager::Rejected { reason } = &sent[0].1 else {
        panic!("{sent:?}")
    };
    assert!(reason.contains("already connected"), "{reason}");
    assert_eq!(ic.counts().managers, 1);
}

fn container_fn(id: u64, image: &str) -> FunctionDef {
    FunctionDef {
        id: FunctionId(id),
        body: FunctionBody::PythonRef {
            module: "m".into(),
            qualname: "f".into(),
        },
        container: Some(FunctionContainer {
            runtime: None,
            image: image.into(),
        }),
        owner: None,
    }
}

fn task_of(id: u64, function: u64) -> NewTask {
    NewTask {
        function: FunctionId(function),
        ..task(id)
    }
}

/// The task ids of every `Tasks` message sent to `to`.
fn sent_ids(sent: &[(Peer, InterchangeToManager)], to: &Peer) -> Vec<u64> {
    sent.iter()
        .filter(|(p, _)| p == to)
        .flat_map(|(_, m)| match m {
            InterchangeToManager::Tasks { tasks, .. } => tasks.iter().map(|t| t.id.0).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn tasks_go_to_managers_with_warm_workers_of_their_container() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.add_function(container_fn(2, "alpha"));
    ic.add_function(container_fn(3, "beta"));
    ic.on_message(now, &peer(1), reg("a", 1, 0), &mut c);
    ic.on_message(now, &peer(2), reg("b", 1, 0), &mut c);
    // Manager b has a warm beta worker, manager a an alpha one.
    let warm = |env: &str| {
        ManagerToInterchange::Warm(vec![WarmWorkers {
            env: env.into(),
            workers: 1,
            starts: 1,
        }])
    };
    ic.on_message(now, &peer(2), warm("pool:beta"), &mut c);
    ic.on_message(now, &peer(1), warm("pool:alpha"), &mut c);
    c.take();
    // Interleaved: even ids alpha, odd ids beta.
    ic.submit((10..20).map(|i| task_of(i, 2 + (i % 2))).collect(), &mut c);
    for _ in 0..5 {
        ic.dispatch(&mut c);
        let sent = c.take();
        let (a, b) = (sent_ids(&sent, &peer(1)), sent_ids(&sent, &peer(2)));
        assert!(a.iter().all(|i| i % 2 == 0), "alpha to a: {a:?}");
        assert!(b.iter().all(|i| i % 2 == 1), "beta to b: {b:?}");
        let results =
            |ids: &[u64]| ManagerToInterchange::Results(ids.iter().map(|&i| ok(i, 1)).collect());
        ic.on_message(now, &peer(1), results(&a), &mut c);
        ic.on_message(now, &peer(2), results(&b), &mut c);
    }
    assert_eq!(c.finished.len(), 10);
    // The status shows what each manager reported.
    let status = ic.managers(now);
    assert_eq!(status[0].workers[0].env, "pool:alpha");
}

#[test]
fn cold_managers_get_one_container_per_batch_and_the_oldest_is_never_starved() {
    let now = Instant::now();
    let (mut ic, mut c) = (Interchange::new(config()), Rec::default());
    ic.add_function(container_fn(2, "alpha"));
    ic.add_function(container_fn(3, "beta"));
    ic.on_message(now, &peer(1), reg("a", 2, 2), &mut c);
    ic.on_message(now, &peer(2), reg("b", 2, 2), &mut c);
    c.take();
    ic.submit((0..8).map(|i| task_of(i, 2 + (i % 2))).collect(), &mut c);
    ic.dispatch(&mut c);
    let sent = c.take();
    // Neither manager is warm: the first gets the oldest (alpha) and then alpha only; the
    // second gets beta.
    assert_eq!(sent_ids(&sent, &peer(1)), [0, 2, 4, 6]);
    assert_eq!(sent_ids(&sent, &peer(2)), [1, 3, 5, 7]);
    // A manager warm for alpha takes beta once beta's oldest has waited past the window.
    let (mut ic, mut c) = (Interchange::new(config_window(2)), Rec::default());
    ic.add_function(container_fn(2, "alpha"));
    ic.add_function(container_fn(3, "beta"));
    ic.on_message(now, &peer(1), reg("a", 8, 0), &mut c);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Warm(vec![WarmWorkers {
            env: "pool:alpha".into(),
            workers: 1,
            starts: 1,
        }]),
        &mut c,
    );
    c.take();
    ic.submit(
        [
            task_of(1, 3),
            task_of(2, 2),
            task_of(3, 2),
            task_of(4, 2),
            task_of(5, 2),
        ]
        .into(),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(sent_ids(&c.take(), &peer(1)), [2, 3, 1, 4, 5]);
}

fn config_window(window: u64) -> Config {
    Config {
        warm_window: window,
        ..config()
    }
}

#[test]
fn held_functions_keep_their_tasks_until_released_or_failed() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    ic.add_function(container_fn(2, "built"));
    ic.hold_function(FunctionId(2));
    ic.on_message(now, &peer(1), reg("a", 4, 0), &mut c);
    c.take();
    ic.submit(vec![task_of(1, 2), task_of(2, 2), task(3)], &mut c);
    ic.dispatch(&mut c);
    assert_eq!(sent_ids(&c.take(), &peer(1)), [3]);
    let n = ic.counts();
    assert_eq!((n.queued, n.held, n.running), (0, 2, 1));
    // Cancelling a held task finishes it at once.
    ic.cancel(&[TaskId(2)], &mut c);
    assert_eq!(c.finished.len(), 1);
    ic.release_function(FunctionId(2));
    ic.dispatch(&mut c);
    assert_eq!(sent_ids(&c.take(), &peer(1)), [1]);
    assert_eq!(ic.counts().held, 0);
    // A failed build fails the held tasks with its error.
    ic.add_function(container_fn(4, "broken"));
    ic.hold_function(FunctionId(4));
    ic.submit(vec![task_of(7, 4)], &mut c);
    let e = TaskError::new(
        ErrorKind::BadInput,
        "ImageBuildFailed",
        "apptainer build failed",
    );
    ic.fail_function(FunctionId(4), e.clone(), &mut c);
    let last = c.finished.last().unwrap();
    assert_eq!(
        (last.id, &last.outcome),
        (TaskId(7), &Outcome::Err(e.clone()))
    );
    assert_eq!(ic.counts().held, 0);
    // Later tasks of the failed function finish with the same error at once (a daemon that
    // restarts hands its stored tasks over after the build is known to have failed) ...
    ic.submit(vec![task_of(8, 4)], &mut c);
    let last = c.finished.last().unwrap();
    assert_eq!((last.id, &last.outcome), (TaskId(8), &Outcome::Err(e)));
    // ... until a new build holds it again.
    ic.hold_function(FunctionId(4));
    ic.submit(vec![task_of(9, 4)], &mut c);
    assert_eq!(ic.counts().held, 1);
}

// ---------------------------------------------------------------------------------------------
// Tenants (issue 11): a user's tasks only ever go to that user's managers
// ---------------------------------------------------------------------------------------------

use fnx_interchange::tenants::Tenants;

fn dispatched_to(sent: &[(Peer, InterchangeToManager)]) -> Vec<(Peer, Vec<u64>)> {
    sent.iter()
        .filter_map(|(p, m)| match m {
            InterchangeToManager::Tasks { tasks, .. } => {
                Some((p.clone(), tasks.iter().map(|t| t.id.0).collect()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn issue_11_tenants_never_share_managers_or_tasks() {
    let now = Instant::now();
    let mut t = Tenants::new(config());
    let mut rec = Rec::default();
    t.add_function(fdef());
    // Alice's manager says it is bob's: its key made it alice's, and that is what counts.
    t.on_message("alice", now, &peer(1), reg("bob", 2, 0), &mut rec);
    t.on_message("bob", now, &peer(2), reg("bob-real", 2, 0), &mut rec);
    let ids: Vec<ManagerId> = rec
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Registered { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "manager ids are unique across tenants");
    rec.take();
    t.submit("bob", vec![task(1), task(2), task(3)], &mut rec);
    t.dispatch(&mut rec);
    assert_eq!(dispatched_to(&rec.take()), vec![(peer(2), vec![1, 2])]);
    // Alice's idle manager gets nothing of bob's, however long it waits.
    t.tick(now + Duration::from_millis(500), &mut rec);
    t.dispatch(&mut rec);
    assert!(dispatched_to(&rec.take()).is_empty());
    t.submit("alice", vec![task(10)], &mut rec);
    t.dispatch(&mut rec);
    assert_eq!(dispatched_to(&rec.take()), vec![(peer(1), vec![10])]);
    // Bob's result from alice's manager is refused (not assigned to it), bob's own accepted.
    t.on_message(
        "alice",
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut rec,
    );
    assert!(
        rec.finished.is_empty(),
        "a forged result was recorded: {:?}",
        rec.finished
    );
    t.on_message(
        "bob",
        now,
        &peer(2),
        ManagerToInterchange::Results(vec![ok(1, 1)]),
        &mut rec,
    );
    assert_eq!(rec.finished.len(), 1);
    let per: Vec<(String, usize)> = t
        .tenant_counts()
        .into_iter()
        .map(|(n, c)| (n, c.managers))
        .collect();
    assert_eq!(per, vec![("alice".into(), 1), ("bob".into(), 1)]);
    let tenants: Vec<String> = t.managers(now).into_iter().map(|m| m.tenant).collect();
    assert_eq!(tenants, vec!["alice".to_string(), "bob".to_string()]);
    // A cancel reaches whichever tenant holds the task.
    t.cancel(&[TaskId(3)], &mut rec);
    assert!(rec.finished.iter().any(|f| f.id == TaskId(3)));
}

#[test]
fn issue_11_held_and_failed_functions_apply_to_tenants_created_later() {
    let now = Instant::now();
    let mut t = Tenants::new(config());
    let mut rec = Rec::default();
    t.add_function(fdef());
    t.hold_function(F);
    t.on_message("carol", now, &peer(3), reg("c", 2, 0), &mut rec);
    rec.take();
    t.submit("carol", vec![task(1)], &mut rec);
    t.dispatch(&mut rec);
    assert!(dispatched_to(&rec.take()).is_empty(), "held");
    assert_eq!(t.counts().held, 1);
    t.fail_function(
        F,
        TaskError::new(ErrorKind::Exception, "ImageBuildFailed", "no"),
        &mut rec,
    );
    assert_eq!(rec.finished.len(), 1);
    // A tenant that appears after the failure gets its tasks failed at once too.
    t.submit("dave", vec![task(2)], &mut rec);
    assert_eq!(rec.finished.len(), 2, "{:?}", rec.finished);
}

#[test]
fn issue_12_a_deleted_function_is_forgotten_once_its_last_task_ends() {
    let now = Instant::now();
    let mut t = Tenants::new(config());
    let mut rec = Rec::default();
    t.add_function(fdef());
    let other = FunctionDef {
        id: FunctionId(2),
        ..fdef()
    };
    t.add_function(other);
    t.submit("alice", vec![task(1)], &mut rec);
    let held = t.function_count();
    // At the next tick: function 2 has no task, forgotten; function 1's task is queued, kept.
    t.remove_function(FunctionId(2));
    t.remove_function(F);
    t.tick(now, &mut rec);
    assert_eq!(t.function_count(), held - 1, "its task still needs it");
    t.cancel(&[TaskId(1)], &mut rec);
    assert_eq!(rec.finished.len(), 1);
    // Looked for again at most every 5 s: then nothing of it is left.
    t.tick(now + Duration::from_secs(1), &mut rec);
    assert_eq!(t.function_count(), held - 1);
    t.tick(now + Duration::from_secs(6), &mut rec);
    assert_eq!(t.function_count(), 0);
}

/// A stored task: its inputs live in the host's store, not in the interchange.
fn stored_task(id: u64) -> NewTask {
    NewTask {
        args: Payload {
            encoding: fnx_protocol::Encoding::Json,
            data: Vec::new(),
        },
        stored: Some(5),
        ..task(id)
    }
}

#[test]
fn stored_inputs_are_loaded_per_dispatch_and_an_unreadable_one_fails_alone() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    for id in [1, 3] {
        c.store.insert(
            TaskId(id),
            Inputs {
                args: Payload::json(format!("[{id}]")),
                files: Vec::new(),
            },
        );
    }
    ic.on_message(now, &peer(1), reg("a", 4, 0), &mut c);
    c.take();
    ic.submit(
        vec![stored_task(1), task(2), stored_task(3), stored_task(4)],
        &mut c,
    );
    ic.dispatch(&mut c);
    // One load for the batch, of the stored tasks only; task 4's inputs are gone.
    assert_eq!(c.loads, vec![vec![TaskId(1), TaskId(3), TaskId(4)]]);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![fdef()],
                tasks: vec![spec(1, 1), spec(2, 1), spec(3, 1)]
            }
        )]
    );
    assert_eq!(c.finished.len(), 1);
    assert_eq!(c.finished[0].id, TaskId(4));
    match &c.finished[0].outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind, ErrorKind::BadInput);
            assert_eq!(e.type_name, "InputsUnreadable");
            assert!(e.message.contains("no inputs"), "{}", e.message);
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(ic.counts(), counts(0, 3, 1, 4));
    // A retried stored task is loaded again on its next dispatch (nothing was kept).
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Results(vec![err(1, 1, ErrorKind::WorkerLost)]),
        &mut c,
    );
    ic.dispatch(&mut c);
    assert_eq!(c.loads.last(), Some(&vec![TaskId(1)]));
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![],
                tasks: vec![spec(1, 2)]
            }
        )]
    );
}

#[test]
fn starts_of_current_attempts_are_reported_and_others_dropped() {
    let now = Instant::now();
    let (mut ic, mut c) = one_manager_running(now, 2, vec![task(1), task(2)]);
    ic.on_message(now, &peer(2), reg("b", 1, 0), &mut c);
    ic.on_message(
        now,
        &peer(1),
        ManagerToInterchange::Started(vec![
            (TaskId(1), Attempt(1)),
            (TaskId(2), Attempt(7)), // not its current attempt
            (TaskId(9), Attempt(1)), // no such task
        ]),
        &mut c,
    );
    // Another manager cannot report a start of a task it does not hold.
    ic.on_message(
        now,
        &peer(2),
        ManagerToInterchange::Started(vec![(TaskId(2), Attempt(1))]),
        &mut c,
    );
    assert_eq!(c.started, vec![(TaskId(1), Attempt(1))]);
}

#[test]
fn a_failing_store_leaves_stored_tasks_queued_with_their_attempt_and_definitions_unsent() {
    let now = Instant::now();
    let (mut ic, mut c) = setup(now);
    c.store.insert(
        TaskId(5),
        Inputs {
            args: Payload::json("[5]"),
            files: Vec::new(),
        },
    );
    ic.on_message(now, &peer(1), reg("a", 2, 0), &mut c);
    c.take();
    c.store_down = true;
    ic.submit(vec![stored_task(5)], &mut c);
    ic.dispatch(&mut c);
    assert_eq!(c.loads.len(), 1, "tried once per dispatch, not in a loop");
    assert!(c.take().is_empty() && c.finished.is_empty());
    assert_eq!(ic.counts(), counts(1, 0, 1, 2));
    // The store is back: the same attempt goes out, with the function's definition.
    c.store_down = false;
    ic.dispatch(&mut c);
    assert_eq!(
        c.take(),
        vec![(
            peer(1),
            InterchangeToManager::Tasks {
                functions: vec![fdef()],
                tasks: vec![spec(5, 1)]
            }
        )]
    );
}
