//! Criterion benchmarks of the hot paths: encode+seal, durable commit, projection apply.
#![allow(missing_docs)] // criterion_group! generates undocumented items.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keel_bench::workload::library_changes;
use keel_journal::{Journal, JournalOptions, LibraryKey};
use keel_projections::Projections;
use keel_schema::{DeviceId, LibraryId};
use uuid::Uuid;

fn encode_and_seal(c: &mut Criterion) {
    let library = LibraryId(Uuid::new_v4());
    let sealer = LibraryKey::generate().sealer(library);
    let changes = library_changes(library.0, 1000, 1);
    let mut group = c.benchmark_group("change");
    group.throughput(Throughput::Elements(changes.len() as u64));
    group.bench_function("encode_seal_open_decode", |b| {
        b.iter(|| {
            for change in &changes {
                let sealed = sealer.seal(change.id, &change.encode());
                let (_, plain) = sealer.open(&sealed).unwrap_or_default();
                std::hint::black_box(keel_schema::Change::decode(&plain).ok());
            }
        })
    });
    group.finish();
}

fn commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let library = LibraryId(Uuid::new_v4());
    let device = DeviceId([2; 32]);
    let journal = Journal::open(
        &dir.path().join("j.redb"),
        library,
        &LibraryKey::generate(),
        device,
        JournalOptions::default(),
    )
    .unwrap_or_else(|e| panic!("journal: {e}"));
    let changes = library_changes(library.0, 500, 2);
    let mut group = c.benchmark_group("journal");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("commit_batch_1000", |b| {
        b.iter_batched(
            || changes[..1000].to_vec(),
            |batch| journal.commit(batch).map(|p| p.len()).unwrap_or(0),
            BatchSize::SmallInput,
        )
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("commit_one", |b| {
        b.iter_batched(
            || vec![changes[0].clone()],
            |batch| journal.commit(batch).map(|p| p.len()).unwrap_or(0),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn apply(c: &mut Criterion) {
    let changes = library_changes(Uuid::new_v4(), 5000, 3);
    let mut group = c.benchmark_group("projections");
    group.throughput(Throughput::Elements(changes.len() as u64));
    group.sample_size(10);
    group.bench_function("apply_fresh_10k", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
                let p = Projections::open(&dir.path().join("p.sqlite"))
                    .unwrap_or_else(|e| panic!("projections: {e}"));
                (dir, p)
            },
            |(_dir, mut p)| p.apply(&changes, None).map(|s| s.applied).unwrap_or(0),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, encode_and_seal, commit, apply);
criterion_main!(benches);
