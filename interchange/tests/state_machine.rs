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
        first_batch(1, vec![spec(1, 1), spec(2, 1), spec(3, 1)])
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
