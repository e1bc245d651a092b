//! Tasks whose inputs stay in the host's store: loaded per dispatch, an unreadable one failing
//! alone, a failing store leaving them queued; and the starts reported for current attempts.

use fnx_interchange::state::*;
use fnx_protocol::*;
use std::time::Instant;

mod testkit;
use testkit::*;

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
        first_batch(1, vec![spec(1, 1), spec(2, 1), spec(3, 1)])
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
    assert_eq!(c.take(), first_batch(1, vec![spec(5, 1)]));
}
