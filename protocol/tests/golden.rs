//! Golden bytes for every message: a change to the wire format must show up here (and bump
//! PROTOCOL_VERSION).

use fnx_protocol::*;

const MAX: usize = DEFAULT_MAX_FRAME_BYTES;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn task_result_ok() -> TaskResult {
    TaskResult {
        id: TaskId(7),
        attempt: Attempt(2),
        outcome: Outcome::Ok(Payload::json("42")),
    }
}

fn task_result_err() -> TaskResult {
    TaskResult {
        id: TaskId(8),
        attempt: Attempt(1),
        outcome: Outcome::Err(TaskError {
            kind: ErrorKind::WorkerLost,
            type_name: "WorkerLost".into(),
            message: "signal 9".into(),
            traceback: None,
        }),
    }
}

fn m2i_samples() -> Vec<(&'static str, ManagerToInterchange)> {
    vec![
        (
            "register",
            ManagerToInterchange::Register(Register {
                uid: "m0".into(),
                host: "nid001".into(),
                pid: 4242,
                cores: 64,
                slots: 64,
                prefetch: 8,
                block_id: Some(BlockId(3)),
                zero_work: false,
                fnx_version: "0.1.0".into(),
            }),
        ),
        ("heartbeat", ManagerToInterchange::Heartbeat),
        (
            "results",
            ManagerToInterchange::Results(vec![task_result_ok(), task_result_err()]),
        ),
        ("drain", ManagerToInterchange::Drain),
        (
            "bye",
            ManagerToInterchange::Bye {
                reason: "sigterm".into(),
            },
        ),
        (
            "returned",
            ManagerToInterchange::Returned(vec![(TaskId(9), Attempt(1))]),
        ),
        (
            "warm",
            ManagerToInterchange::Warm(vec![WarmWorkers {
                env: "pool:a".into(),
                workers: 2,
                starts: 3,
            }]),
        ),
    ]
}

fn i2m_samples() -> Vec<(&'static str, InterchangeToManager)> {
    vec![
        (
            "registered",
            InterchangeToManager::Registered {
                manager: ManagerId(5),
                heartbeat_period_ms: 5000,
                heartbeat_threshold_ms: 30000,
            },
        ),
        (
            "rejected",
            InterchangeToManager::Rejected {
                reason: "no".into(),
            },
        ),
        (
            "tasks",
            InterchangeToManager::Tasks {
                functions: vec![
                    FunctionDef {
                        id: FunctionId(1),
                        body: FunctionBody::PythonRef {
                            module: "m".into(),
                            qualname: "f".into(),
                        },
                        container: None,
                        owner: None,
                    },
                    FunctionDef {
                        id: FunctionId(2),
                        body: FunctionBody::Shell {
                            template: "echo {x}".into(),
                        },
                        container: Some(FunctionContainer {
                            runtime: Some(Runtime::Apptainer),
                            image: "/i.sif".into(),
                        }),
                        owner: Some("alice".into()),
                    },
                ],
                tasks: vec![TaskSpec {
                    id: TaskId(9),
                    attempt: Attempt(1),
                    function: FunctionId(1),
                    args: Payload {
                        encoding: Encoding::Pickle,
                        data: vec![0x80, 0x05],
                    },
                    walltime_ms: Some(1500),
                    memory_mb: None,
                    files: vec![
                        TaskFile {
                            name: "in.txt".into(),
                            source: FileSource::Inline(b"hi".to_vec()),
                        },
                        TaskFile {
                            name: "big.h5".into(),
                            source: FileSource::Path("/lus/big.h5".into()),
                        },
                    ],
                }],
            },
        ),
        ("heartbeat", InterchangeToManager::Heartbeat),
        (
            "cancel",
            InterchangeToManager::Cancel {
                tasks: vec![(TaskId(9), Attempt(1))],
            },
        ),
        ("reclaim", InterchangeToManager::Reclaim { max: 3 }),
        ("drain", InterchangeToManager::Drain),
        ("drained", InterchangeToManager::Drained),
        (
            "shutdown",
            InterchangeToManager::Shutdown {
                reason: "bye".into(),
            },
        ),
        (
            "reregister",
            InterchangeToManager::Reregister {
                reason: "who".into(),
            },
        ),
    ]
}

const M2I_GOLDEN: &[(&str, &str)] = &[
    ("register", "920481a8726567697374657299a26d30a66e6964303031cd109240400803c2a5302e312e30"),
    ("heartbeat", "9204a9686561727462656174"),
    ("results", "920481a7726573756c74739293070281a26f6b92a46a736f6ec402343293080181a365727294ab776f726b65725f6c6f7374aa576f726b65724c6f7374a87369676e616c2039c0"),
    ("drain", "9204a5647261696e"),
    ("bye", "920481a362796591a77369677465726d"),
    ("returned", "920481a872657475726e656491920901"),
    ("warm", "920481a47761726d9193a6706f6f6c3a610203"),
];

const I2M_GOLDEN: &[(&str, &str)] = &[
    ("registered", "920481aa726567697374657265649305cd1388cd7530"),
    ("rejected", "920481a872656a656374656491a26e6f"),
    ("tasks", "920481a57461736b739292940181aa707974686f6e5f72656692a16da166c0c0940281a57368656c6c91a86563686f207b787d92a96170707461696e6572a62f692e736966a5616c696365919609010192a67069636b6c65c4028005cd05dc9292a6696e2e74787481a6696e6c696e65c402686992a66269672e683581a470617468ab2f6c75732f6269672e6835"),
    ("heartbeat", "9204a9686561727462656174"),
    ("cancel", "920481a663616e63656c9191920901"),
    ("reclaim", "920481a77265636c61696d9103"),
    ("drain", "9204a5647261696e"),
    ("drained", "9204a7647261696e6564"),
    ("shutdown", "920481a873687574646f776e91a3627965"),
    ("reregister", "920481aa7265726567697374657291a377686f"),
];

#[test]
fn manager_to_interchange_golden_bytes() {
    let samples = m2i_samples();
    let mut actual = Vec::new();
    for (name, msg) in &samples {
        let bytes = encode(msg, MAX).unwrap();
        let back: ManagerToInterchange = decode(&bytes, MAX).unwrap();
        assert_eq!(&back, msg, "{name} round-trips");
        actual.push((*name, hex(&bytes)));
    }
    let expected: Vec<(&str, String)> = M2I_GOLDEN
        .iter()
        .map(|(n, h)| (*n, h.to_string()))
        .collect();
    assert_eq!(actual, expected, "manager→interchange wire bytes changed");
}

#[test]
fn interchange_to_manager_golden_bytes() {
    let samples = i2m_samples();
    let mut actual = Vec::new();
    for (name, msg) in &samples {
        let bytes = encode(msg, MAX).unwrap();
        let back: InterchangeToManager = decode(&bytes, MAX).unwrap();
        assert_eq!(&back, msg, "{name} round-trips");
        actual.push((*name, hex(&bytes)));
    }
    let expected: Vec<(&str, String)> = I2M_GOLDEN
        .iter()
        .map(|(n, h)| (*n, h.to_string()))
        .collect();
    assert_eq!(actual, expected, "interchange→manager wire bytes changed");
}

#[test]
fn a_task_memory_limit_travels_last_and_only_when_set() {
    let tasks = |memory_mb| InterchangeToManager::Tasks {
        functions: vec![],
        tasks: vec![TaskSpec {
            id: TaskId(3),
            attempt: Attempt(1),
            function: FunctionId(1),
            args: Payload::json("[]"),
            walltime_ms: None,
            files: vec![],
            memory_mb,
        }],
    };
    let without = encode(&tasks(None), MAX).unwrap();
    let with = encode(&tasks(Some(512)), MAX).unwrap();
    // Set, it is one more element at the end of the task (512: 0xcd 0x02 0x00).
    assert_eq!(with.len(), without.len() + 3);
    assert!(hex(&with).ends_with("cd0200"), "{}", hex(&with));
    for (bytes, limit) in [(without, None), (with, Some(512))] {
        let back: InterchangeToManager = decode(&bytes, MAX).unwrap();
        assert_eq!(back, tasks(limit));
    }
}

#[test]
fn the_variant_of_every_message_is_read_without_decoding_it() {
    let m2i = m2i_samples()
        .into_iter()
        .map(|(name, m)| (name, encode(&m, MAX).unwrap()));
    let i2m = i2m_samples()
        .into_iter()
        .map(|(name, m)| (name, encode(&m, MAX).unwrap()));
    for (name, frame) in m2i.chain(i2m) {
        assert_eq!(peek_variant(&frame), Ok(name), "{}", hex(&frame));
    }
    // Another version is named as such; bytes that are no message are malformed.
    let mut other = encode(&InterchangeToManager::Heartbeat, MAX).unwrap();
    other[1] = 99;
    assert!(matches!(
        peek_variant(&other),
        Err(FrameError::VersionMismatch { peer: 99, .. })
    ));
    for bad in [
        &[][..],
        &[0x92, 0x04],
        &[0x92, 0x04, 0x82, 0xa1, b'a', 0xc0],
        &[0x92, 0x04, 0x07],
    ] {
        assert!(
            matches!(peek_variant(bad), Err(FrameError::Malformed { .. })),
            "{}",
            hex(bad)
        );
    }
}
