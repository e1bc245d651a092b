//! Frame encode/decode of task and result batches.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fnx_benches::{result_batch, task_batch};
use fnx_protocol::{
    decode, encode, InterchangeToManager, ManagerToInterchange, DEFAULT_MAX_FRAME_BYTES,
};
use std::hint::black_box;

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for &n in &[1u64, 64, 1024] {
        group.throughput(Throughput::Elements(n));
        let tasks = task_batch(n, 16);
        let frame = encode(&tasks, DEFAULT_MAX_FRAME_BYTES).expect("encodes");
        group.bench_with_input(BenchmarkId::new("encode_tasks", n), &tasks, |b, m| {
            b.iter(|| encode(black_box(m), DEFAULT_MAX_FRAME_BYTES).expect("encodes"))
        });
        group.bench_with_input(BenchmarkId::new("decode_tasks", n), &frame, |b, f| {
            b.iter(|| {
                decode::<InterchangeToManager>(black_box(f), DEFAULT_MAX_FRAME_BYTES)
                    .expect("decodes")
            })
        });
        let results = result_batch(n, 16);
        let frame = encode(&results, DEFAULT_MAX_FRAME_BYTES).expect("encodes");
        group.bench_with_input(BenchmarkId::new("decode_results", n), &frame, |b, f| {
            b.iter(|| {
                decode::<ManagerToInterchange>(black_box(f), DEFAULT_MAX_FRAME_BYTES)
                    .expect("decodes")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
