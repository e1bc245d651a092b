//! Tests of the parent module.
use super::*;

#[test]
fn a_version_1_store_is_migrated_and_keeps_its_tasks() {
    let dir = std::env::temp_dir().join(format!("fnx-store-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fnx.db");
    let _ = std::fs::remove_file(&path);
    {
        // The version-1 tasks table: no `files` column.
        let c = Connection::open(&path).unwrap();
        let v1 = SCHEMA
            .replace(
                ", files BLOB, crashes INTEGER NOT NULL DEFAULT 0,\n    memory_mb INTEGER, started INTEGER);",
                ");",
            )
            .replace(", expires REAL, revoked REAL,\n    admin INTEGER);", ");")
            .replace(
                "created REAL NOT NULL,\n    fingerprint TEXT, PRIMARY",
                "created REAL NOT NULL,\n    PRIMARY",
            );
        c.execute_batch(&v1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO tasks(id, owner, function, pool, priority, retries, encoding, args,
                               state, attempt, submitted) VALUES (1, 'u', 1, 'local', 0, 2, 0, x'5b5d', 1, 3, 0)",
            [],
        )
        .unwrap();
    }
    let c = open_writer(&path, false).unwrap();
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let t = unfinished(&c, u64::MAX).unwrap();
    assert_eq!(t.len(), 1);
    assert!(t[0].was_running && t[0].task.attempt == Attempt(3) && t[0].task.files.is_empty());
    assert_eq!(t[0].task.memory_mb, None);
    // A task's own memory limit comes back with it.
    c.execute("UPDATE tasks SET memory_mb = 77 WHERE id = 1", [])
        .unwrap();
    assert_eq!(
        unfinished(&c, u64::MAX).unwrap()[0].task.memory_mb,
        Some(77)
    );
    // Daemon crashes: counted for tasks that had started only, in a row, reset by a clean
    // stop. Task 1 had started its attempt 3.
    c.execute("UPDATE tasks SET started = 3 WHERE id = 1", [])
        .unwrap();
    c.execute(
        "INSERT INTO tasks(id, owner, function, pool, priority, retries, encoding, args,
                           state, attempt, submitted) VALUES (2, 'u', 1, 'local', 0, 2, 0, x'5b5d', 0, 0, 0)",
        [],
    )
    .unwrap();
    let crashes = |c: &Connection| -> Vec<u32> {
        unfinished(c, u64::MAX)
            .unwrap()
            .iter()
            .map(|t| t.crashes)
            .collect()
    };
    let redispatch = |c: &Connection| {
        c.execute("UPDATE tasks SET state = 1 WHERE id = 1", [])
            .unwrap();
    };
    // Task 2 is dispatched, but waits in its manager's queue: it never starts.
    let prefetch = |c: &Connection| {
        c.execute(
            "UPDATE tasks SET state = 1, attempt = attempt + 1 WHERE id = 2",
            [],
        )
        .unwrap();
    };
    assert_eq!(
        crash_check(&c).unwrap(),
        None,
        "a store never run is no crash"
    );
    mark_running(&c).unwrap();
    assert_eq!(
        crash_check(&c).unwrap(),
        Some((1, 1)),
        "ready, never stopped: a crash"
    );
    assert_eq!(
        crash_check(&c).unwrap(),
        None,
        "a start that failed is no crash"
    );
    mark_running(&c).unwrap();
    assert_eq!(
        crash_check(&c).unwrap(),
        Some((0, 0)),
        "requeued, not yet dispatched again"
    );
    redispatch(&c);
    prefetch(&c);
    mark_running(&c).unwrap();
    assert_eq!(crash_check(&c).unwrap(), Some((2, 1)));
    assert_eq!(
        crashes(&c),
        [2, 0],
        "only the task that started counts a crash"
    );
    mark_stopped(&c).unwrap();
    assert_eq!(crashes(&c), [0, 0]);
    assert_eq!(crash_check(&c).unwrap(), None);
    // Tokens gained expiry, revocation and their own admin flag.
    let (admin_token, _) = create_token(&c, "u", true, None).unwrap();
    assert!(list_tokens(&c, Some("u")).unwrap()[0].admin);
    revoke_token(&c, admin_token, None).unwrap();
    let (id, _) = create_token(&c, "u", false, None).unwrap();
    assert!(
        !list_tokens(&c, Some("u")).unwrap()[1].admin,
        "rights go with the token"
    );
    assert_eq!(
        revoke_token(&c, id, Some("u")).unwrap().as_deref(),
        Some("u")
    );
    assert!(!list_tokens(&c, Some("u")).unwrap()[1].live);
    drop(c);
    // A store from a newer fnx is refused with both versions named.
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = open_writer(&path, false).unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("upgrade"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A store whose rows were written by hand (as damage, or another program, might leave them).
fn scratch_store(name: &str) -> (std::path::PathBuf, Connection) {
    let dir = std::env::temp_dir().join(format!("fnx-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fnx.db");
    let c = open_writer(&path, false).unwrap();
    (path, c)
}

fn insert_task(c: &Connection, id: i64, state: i64, encoding: i64, files: Option<&[u8]>) {
    c.execute(
        "INSERT INTO tasks(id, owner, function, pool, priority, retries, encoding, args, files,
                           state, attempt, submitted) VALUES (?1, 'u', 1, 'local', 0, 2, ?3, x'5b5d', ?4, ?2, 0, 0)",
        params![id, state, encoding, files],
    )
    .unwrap();
}

#[test]
fn an_unknown_state_code_reads_as_a_damaged_record_not_a_cancelled_task() {
    let (path, c) = scratch_store("state");
    insert_task(&c, 1, 2, 0, None);
    insert_task(&c, 2, 9, 0, None);
    let reader = Reader::new(&path);
    let conn = reader.get().unwrap();
    let one = conn.query_row(
        &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = 1"),
        [],
        row_task,
    );
    assert_eq!(one.unwrap().state, State::Success);
    let two = conn
        .query_row(
            &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = 2"),
            [],
            row_task,
        )
        .unwrap();
    assert_eq!(two.state, State::Failed);
    match two.outcome {
        Some(Outcome::Err(e)) => {
            assert!(
                e.type_name == "DamagedRecord" && e.message.contains("state 9"),
                "{e:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_outcome_that_does_not_decode_is_named_and_the_other_results_still_read() {
    let (path, c) = scratch_store("outcome");
    for id in 1..=3 {
        insert_task(&c, id, 2, 0, None);
    }
    let ok = rmp_serde::to_vec_named(&Outcome::Ok(Payload::json("1"))).unwrap();
    c.execute("UPDATE tasks SET outcome = ?1, seq = id", params![ok])
        .unwrap();
    c.execute("UPDATE tasks SET outcome = x'c1c1' WHERE id = 2", [])
        .unwrap();
    let reader = Reader::new(&path);
    let page = reader.results("u", 0, 10, u64::MAX).unwrap();
    assert_eq!(page.len(), 3, "one damaged row must not stop the stream");
    assert!(matches!(page[0].outcome, Some(Outcome::Ok(_))));
    match &page[1].outcome {
        Some(Outcome::Err(e)) => assert!(e.message.contains("does not decode"), "{e:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn recovery_leaves_inputs_that_do_not_decode_in_the_store_for_the_loader_to_name() {
    let (_path, c) = scratch_store("recover-damaged");
    insert_task(&c, 1, 0, 0, None);
    insert_task(&c, 2, 0, 0, Some(b"\xc1not msgpack"));
    insert_task(&c, 3, 0, 7, None);
    let t = unfinished(&c, u64::MAX).unwrap();
    assert_eq!(t.len(), 3, "no task is dropped");
    assert_eq!(t[0].task.stored, None);
    assert_eq!(t[0].task.args.data, b"[]");
    // Damaged files or an unknown encoding: the task reads its row at dispatch, where the
    // damage fails it alone, named (not a silent run without its files).
    assert!(t[1].task.stored.is_some() && t[1].task.files.is_empty());
    assert!(t[2].task.stored.is_some() && t[2].task.args.data.is_empty());
    let mut loader = inputs::InputLoader::new(_path.clone());
    use fnx_interchange::Loader;
    let got = loader.load(&[TaskId(1), TaskId(2), TaskId(3)]);
    assert!(got[0].is_ok());
    for (i, words) in [(1, "files do not decode"), (2, "encoding 7")] {
        match &got[i] {
            Err(fnx_interchange::LoadError::Damaged(why)) => assert!(why.contains(words), "{why}"),
            other => panic!("task {}: {other:?}", i + 1),
        }
    }
}

#[test]
fn a_function_record_that_does_not_decode_keeps_its_owner_and_names_the_damage() {
    let (path, c) = scratch_store("functions");
    let good = r#"{"kind": "python", "ref": "m:f", "name": "f"}"#;
    for (id, spec) in [(1, good), (2, "{not json"), (3, r#"{"kind": "fortran"}"#)] {
        c.execute(
            "INSERT INTO functions(id, owner, name, kind, spec, created) VALUES (?1, 'u', 'f', 'shell', ?2, 0)",
            params![id, spec],
        )
        .unwrap();
    }
    let all = all_functions(&c).unwrap();
    assert_eq!(all.len(), 3, "every record is read");
    assert!(all[0].damaged.is_none() && all[0].spec.body().is_some());
    for f in &all[1..] {
        assert!(f.damaged.as_deref().unwrap().contains("does not decode"));
        assert_eq!(
            (f.owner.as_str(), f.spec.kind),
            ("u", fnx_api::FunctionKind::Shell)
        );
        assert!(f.spec.body().is_none(), "nothing of a damaged record runs");
    }
    let reader = Reader::new(&path);
    assert_eq!(reader.functions(Some("u")).unwrap().len(), 3);
    let two = reader.function(FunctionId(2)).unwrap().unwrap();
    let shown = serde_json::to_value(two.record(false)).unwrap();
    assert_eq!(shown["damaged"].as_str(), two.damaged.as_deref());
}
