//! Micro-benchmarks of the CPU-bound stages: pgoutput decoding and batch coalescing, in
//! messages (rows) per second on one core. Run: `cargo bench --bench pipeline`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shadowsync::apply::batch::Batch;
use shadowsync::decode::{self, Datum, Message, ReplicaIdentity, Tuple};
use shadowsync::transform::{QualifiedName, SourceColumn, TableMap, TargetColumn};

const ROWS: usize = 10_000;

/// An 11-column row like the W1 benchmark table: bigint key, text, jsonb, timestamps.
fn row(i: usize) -> Tuple {
    let cols: Vec<String> = vec![
        i.to_string(),
        format!("name-{i}"),
        "some description text of moderate length".into(),
        format!("{{\"cpu\": {}, \"mem\": {}}}", i % 64, i % 1024),
        "2026-11-21 10:00:00.123456+00".into(),
        "2026-11-21 10:00:01.654321+00".into(),
        (i * 7).to_string(),
        "active".into(),
        "3.14159".into(),
        "t".into(),
        format!("tag-{}", i % 10),
    ];
    Tuple(
        cols.into_iter()
            .map(|c| Datum::Text(Bytes::from(c)))
            .collect(),
    )
}

fn map() -> Arc<TableMap> {
    let names = [
        "id",
        "name",
        "descr",
        "doc",
        "created_at",
        "updated_at",
        "n",
        "status",
        "ratio",
        "flag",
        "tag",
    ];
    Arc::new(TableMap {
        source: QualifiedName::new("public", "w1"),
        target: QualifiedName::new("public", "w1"),
        source_columns: names
            .iter()
            .map(|n| SourceColumn {
                name: n.to_string(),
                sql_type: "text".into(),
                blue_type: "text".into(),
            })
            .collect(),
        columns: names
            .iter()
            .enumerate()
            .map(|(i, n)| TargetColumn {
                name: n.to_string(),
                sql_type: "text".into(),
                base_type: "text".into(),
                expr: format!("src.\"{n}\""),
                inputs: vec![i],
                collation: None,
                has_equality: true,
                not_null: false,
            })
            .collect(),
        key: vec![0],
        row_key: vec![0],
        awaits_identity: false,
        partitioned: false,
        replica_identity: ReplicaIdentity::Default,
        label: "public.w1".into(),
        filter: None,
        reads: vec![],
        origin: None,
        conflicts: shadowsync::transform::ConflictPolicy::Off,
        keyed_lookups: vec![],
        plain_key: None,
        insert_new_keys: None,
        copy_new_keys: None,
    })
}

fn bench(c: &mut Criterion) {
    let encoded: Vec<Bytes> = (0..ROWS)
        .map(|i| {
            Bytes::from(
                Message::Insert {
                    relation: 16384,
                    new: row(i),
                }
                .encode(),
            )
        })
        .collect();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("insert_11_text_columns", |b| {
        b.iter(|| {
            for m in &encoded {
                black_box(decode::decode(m).unwrap());
            }
        })
    });
    group.finish();

    let rows: Vec<Tuple> = (0..ROWS).map(row).collect();
    let m = map();
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(2 * ROWS as u64));
    // W1's shape: each transaction inserts a row and updates it.
    // One batch reused, as the apply stage does.
    let mut batch = Batch::default();
    group.bench_function("insert_then_update_coalesced", |b| {
        b.iter(|| {
            for (i, r) in rows.iter().enumerate() {
                batch
                    .insert(&m, r.clone(), shadowsync::lsn::Lsn::from_u64(i as u64))
                    .unwrap();
                batch
                    .update(
                        &m,
                        None,
                        r.clone(),
                        shadowsync::lsn::Lsn::from_u64(i as u64 + 1),
                    )
                    .unwrap();
            }
            black_box(batch.take());
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
