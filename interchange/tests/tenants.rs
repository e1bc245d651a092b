//! One interchange per user (`Tenants`): users never share managers or tasks, and function
//! holds, failures and deletions apply to every tenant. Events in, exact messages out.

use fnx_interchange::state::*;
use fnx_interchange::tenants::Tenants;
use fnx_protocol::*;
use std::time::{Duration, Instant};

mod testkit;
use testkit::*;

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
