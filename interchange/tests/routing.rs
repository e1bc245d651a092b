//! The interchange's routing by worker environment: tasks go to managers with warm workers of
//! their function's container, cold managers take one container per batch, and functions held
//! for an image build keep their tasks. Events in, exact messages out (as `state_machine.rs`).

use fnx_interchange::state::*;
use fnx_protocol::*;
use std::time::Instant;

mod testkit;
use testkit::*;

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
