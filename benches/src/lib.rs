//! Shared inputs for fnx's criterion benchmarks (`cargo bench -p fnx-benches`).
//!
//! # Layout
//! - this file: builders for realistic message batches, used by `benches/codec.rs` and
//!   `benches/dispatch.rs`.
#![deny(missing_docs)]

use fnx_protocol::{
    Attempt, FunctionBody, FunctionDef, FunctionId, InterchangeToManager, ManagerToInterchange,
    Outcome, Payload, TaskId, TaskResult, TaskSpec,
};

/// The function every benchmark task calls.
pub fn function() -> FunctionDef {
    FunctionDef::new(
        FunctionId(1),
        FunctionBody::PythonRef {
            module: "m".into(),
            qualname: "f".into(),
        },
    )
}

/// A `Tasks` message of `n` tasks with `payload` argument bytes each.
pub fn task_batch(n: u64, payload: usize) -> InterchangeToManager {
    InterchangeToManager::Tasks {
        functions: vec![function()],
        tasks: (0..n)
            .map(|i| TaskSpec {
                files: Vec::new(),
                id: TaskId(i),
                attempt: Attempt(1),
                function: FunctionId(1),
                args: Payload::json(vec![b'1'; payload]),
                walltime_ms: None,
                memory_mb: None,
            })
            .collect(),
    }
}

/// A `Results` message of `n` successful results with `payload` bytes each.
pub fn result_batch(n: u64, payload: usize) -> ManagerToInterchange {
    ManagerToInterchange::Results(
        (0..n)
            .map(|i| TaskResult {
                id: TaskId(i),
                attempt: Attempt(1),
                outcome: Outcome::Ok(Payload::json(vec![b'1'; payload])),
            })
            .collect(),
    )
}
