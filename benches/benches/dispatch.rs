//! The interchange state machine: submit a batch, dispatch it to managers, take the results.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fnx_benches::function;
use fnx_interchange::{Comm, Config, Finished, Interchange, NewTask, Notice, Peer};
use fnx_protocol::{
    FunctionId, InterchangeToManager, ManagerToInterchange, Outcome, Payload, Register, TaskId,
    TaskResult,
};
use std::time::Instant;

/// Keeps the task batches sent, so results can be made from them.
#[derive(Default)]
struct Collect {
    sent: Vec<(Peer, InterchangeToManager)>,
    finished: usize,
}

impl Comm for Collect {
    fn send(&mut self, to: &Peer, msg: &InterchangeToManager) {
        if matches!(msg, InterchangeToManager::Tasks { .. }) {
            self.sent.push((to.clone(), msg.clone()));
        }
    }
    fn finished(&mut self, _: Finished) {
        self.finished += 1;
    }
    fn notice(&mut self, _: Notice) {}
}

fn setup(managers: u8, slots: u32) -> Interchange {
    let mut ic = Interchange::new(Config::default());
    ic.add_function(function());
    let now = Instant::now();
    let mut sink = Collect::default();
    for m in 0..managers {
        let reg = Register {
            uid: format!("m{m}"),
            host: "h".into(),
            pid: 1,
            cores: slots,
            slots,
            prefetch: slots,
            block_id: None,
            zero_work: true,
            fnx_version: env!("CARGO_PKG_VERSION").into(),
        };
        ic.on_message(
            now,
            &vec![m],
            ManagerToInterchange::Register(reg),
            &mut sink,
        );
    }
    ic
}

fn tasks(n: u64) -> Vec<NewTask> {
    (0..n)
        .map(|i| NewTask {
            id: TaskId(i),
            function: FunctionId(1),
            args: Payload::json("[1]"),
            priority: 0,
            walltime_ms: None,
            retries: 1,
            attempt: fnx_protocol::Attempt(0),
            files: Vec::new(),
            stored: None,
            memory_mb: None,
        })
        .collect()
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("interchange");
    let n = 8192u64;
    group.throughput(Throughput::Elements(n));
    group.bench_function("submit_dispatch_complete_8192_over_64x64", |b| {
        b.iter_batched(
            || (setup(64, 64), tasks(n)),
            |(mut ic, batch)| {
                let mut comm = Collect::default();
                ic.submit(batch, &mut comm);
                ic.dispatch(&mut comm);
                let now = Instant::now();
                for (peer, msg) in std::mem::take(&mut comm.sent) {
                    let InterchangeToManager::Tasks { tasks, .. } = msg else {
                        continue;
                    };
                    let results = tasks
                        .into_iter()
                        .map(|t| TaskResult {
                            id: t.id,
                            attempt: t.attempt,
                            outcome: Outcome::Ok(t.args),
                        })
                        .collect();
                    ic.on_message(
                        now,
                        &peer,
                        ManagerToInterchange::Results(results),
                        &mut comm,
                    );
                }
                assert_eq!(comm.finished, n as usize);
                ic
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
