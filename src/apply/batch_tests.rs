//! Unit tests of batch coalescing, segments and keyed lookups.

use super::*;
use crate::decode::ReplicaIdentity;
use crate::transform::{QualifiedName, SourceColumn, TargetColumn};

fn map(keyed: bool) -> Arc<TableMap> {
    let cols = ["id", "a", "big"];
    Arc::new(TableMap {
        source: QualifiedName::new("public", "t"),
        target: QualifiedName::new("public", "t"),
        source_columns: cols
            .iter()
            .map(|c| SourceColumn {
                name: c.to_string(),
                sql_type: "text".into(),
                blue_type: "bigint".into(),
            })
            .collect(),
        columns: cols
            .iter()
            .enumerate()
            .map(|(i, c)| TargetColumn {
                name: c.to_string(),
                sql_type: "text".into(),
                base_type: "text".into(),
                expr: format!("src.\"{c}\""),
                inputs: vec![i],
                collation: None,
                has_equality: true,
                not_null: false,
            })
            .collect(),
        key: if keyed { vec![0] } else { vec![] },
        row_key: if keyed { vec![0] } else { vec![] },
        awaits_identity: false,
        partitioned: false,
        replica_identity: if keyed {
            ReplicaIdentity::Default
        } else {
            ReplicaIdentity::Full
        },
        label: "public.t".into(),
        filter: None,
        reads: vec![],
        origin: None,
        conflicts: crate::transform::ConflictPolicy::Off,
        keyed_lookups: vec![],
        plain_key: None,
        insert_new_keys: None,
        copy_new_keys: None,
    })
}

fn t(vals: &[Option<&str>]) -> Tuple {
    Tuple(
        vals.iter()
            .map(|v| match v {
                Some("<u>") => Datum::UnchangedToast,
                Some(s) => Datum::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => Datum::Null,
            })
            .collect(),
    )
}

fn key(s: &str) -> Key {
    vec![Some(Bytes::copy_from_slice(s.as_bytes()))].into_boxed_slice()
}

fn only_table(b: &mut Batch) -> TableOps {
    let mut tables = b.take();
    assert_eq!(tables.len(), 1);
    tables.pop().unwrap()
}

#[test]
fn insert_then_update_coalesces_to_one_upsert() {
    let m = map(true);
    let mut b = Batch::default();
    b.insert(
        &m,
        t(&[Some("1"), Some("x"), Some("big")]),
        Lsn::from_u64(10),
    )
    .unwrap();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("y"), Some("<u>")]),
        Lsn::from_u64(20),
    )
    .unwrap();
    assert_eq!(b.rows, 2);
    let ops = only_table(&mut b);
    assert_eq!(
        ops.ops[&key("1")].op,
        KeyedOp::Upsert(t(&[Some("1"), Some("y"), Some("big")]))
    );
    assert_eq!(ops.counts, [1, 1, 0]);
}

#[test]
fn existed_follows_each_key_s_first_change_and_commit_follows_its_last() {
    let m = map(true);
    let mut b = Batch::default();
    b.begin_txn(Lsn::from_u64(100), 7);
    b.insert(&m, t(&[Some("1"), Some("x"), Some("a")]), Lsn::from_u64(10))
        .unwrap();
    b.update(
        &m,
        None,
        t(&[Some("2"), Some("x"), Some("a")]),
        Lsn::from_u64(11),
    )
    .unwrap();
    b.delete(
        &m,
        OldTuple::Key(t(&[Some("3"), None, None])),
        Lsn::from_u64(12),
    )
    .unwrap();
    b.begin_txn(Lsn::from_u64(200), 8);
    b.delete(
        &m,
        OldTuple::Key(t(&[Some("1"), None, None])),
        Lsn::from_u64(20),
    )
    .unwrap();
    b.insert(&m, t(&[Some("3"), Some("y"), Some("b")]), Lsn::from_u64(21))
        .unwrap();
    // A key change: the old key existed, the new one did not.
    b.update(
        &m,
        Some(OldTuple::Key(t(&[Some("2"), None, None]))),
        t(&[Some("4"), Some("z"), Some("c")]),
        Lsn::from_u64(22),
    )
    .unwrap();
    let ops = only_table(&mut b);
    let seen = |k: &str| {
        let p = &ops.ops[&key(k)];
        (p.existed, p.commit_lsn, p.commit_time)
    };
    assert_eq!(seen("1"), (false, Lsn::from_u64(200), 8));
    assert_eq!(seen("2"), (true, Lsn::from_u64(200), 8));
    assert_eq!(seen("3"), (true, Lsn::from_u64(200), 8));
    assert_eq!(seen("4"), (false, Lsn::from_u64(200), 8));
}

#[test]
fn unchanged_toast_without_earlier_image_stays_partial() {
    let m = map(true);
    let mut b = Batch::default();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("y"), Some("<u>")]),
        Lsn::from_u64(20),
    )
    .unwrap();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("z"), Some("<u>")]),
        Lsn::from_u64(30),
    )
    .unwrap();
    let ops = only_table(&mut b);
    assert_eq!(
        ops.ops[&key("1")].op,
        KeyedOp::Update(t(&[Some("1"), Some("z"), Some("<u>")]))
    );
}

#[test]
fn partial_then_full_update_becomes_upsert() {
    let m = map(true);
    let mut b = Batch::default();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("y"), Some("<u>")]),
        Lsn::from_u64(20),
    )
    .unwrap();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("z"), Some("new")]),
        Lsn::from_u64(30),
    )
    .unwrap();
    let ops = only_table(&mut b);
    assert_eq!(
        ops.ops[&key("1")].op,
        KeyedOp::Upsert(t(&[Some("1"), Some("z"), Some("new")]))
    );
}

#[test]
fn delete_wins_and_reinsert_wins_over_delete() {
    let m = map(true);
    let mut b = Batch::default();
    b.insert(&m, t(&[Some("1"), Some("x"), None]), Lsn::from_u64(1))
        .unwrap();
    b.delete(
        &m,
        OldTuple::Key(t(&[Some("1"), None, None])),
        Lsn::from_u64(2),
    )
    .unwrap();
    b.insert(&m, t(&[Some("2"), Some("x"), None]), Lsn::from_u64(3))
        .unwrap();
    b.delete(
        &m,
        OldTuple::Key(t(&[Some("2"), None, None])),
        Lsn::from_u64(4),
    )
    .unwrap();
    b.insert(&m, t(&[Some("2"), Some("again"), None]), Lsn::from_u64(5))
        .unwrap();
    let ops = only_table(&mut b);
    assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Delete(_)));
    assert_eq!(
        ops.ops[&key("2")].op,
        KeyedOp::Upsert(t(&[Some("2"), Some("again"), None]))
    );
}

#[test]
fn key_change_moves_the_row() {
    let m = map(true);
    let mut b = Batch::default();
    let mv = b
        .update(
            &m,
            Some(OldTuple::Key(t(&[Some("1"), None, None]))),
            t(&[Some("2"), Some("x"), Some("v")]),
            Lsn::from_u64(5),
        )
        .unwrap();
    assert!(mv.is_none());
    let ops = only_table(&mut b);
    assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Delete(_)));
    assert!(matches!(ops.ops[&key("2")].op, KeyedOp::Upsert(_)));
}

#[test]
fn key_swap_through_a_third_key_ends_right() {
    let m = map(true);
    let mut b = Batch::default();
    let k = |s: &str| Some(OldTuple::Key(t(&[Some(s), None, None])));
    b.update(
        &m,
        k("1"),
        t(&[Some("3"), Some("one"), None]),
        Lsn::from_u64(1),
    )
    .unwrap();
    b.update(
        &m,
        k("2"),
        t(&[Some("1"), Some("two"), None]),
        Lsn::from_u64(2),
    )
    .unwrap();
    b.update(
        &m,
        k("3"),
        t(&[Some("2"), Some("one"), None]),
        Lsn::from_u64(3),
    )
    .unwrap();
    let ops = only_table(&mut b);
    assert!(matches!(ops.ops[&key("3")].op, KeyedOp::Delete(_)));
    assert_eq!(
        ops.ops[&key("1")].op,
        KeyedOp::Upsert(t(&[Some("1"), Some("two"), None]))
    );
    assert_eq!(
        ops.ops[&key("2")].op,
        KeyedOp::Upsert(t(&[Some("2"), Some("one"), None]))
    );
}

#[test]
fn key_change_with_unchanged_toast_asks_green_to_move_the_row() {
    let m = map(true);
    let mut b = Batch::default();
    b.update(
        &m,
        None,
        t(&[Some("1"), Some("y"), Some("<u>")]),
        Lsn::from_u64(1),
    )
    .unwrap();
    let mv = b
        .update(
            &m,
            Some(OldTuple::Key(t(&[Some("1"), None, None]))),
            t(&[Some("2"), Some("x"), Some("<u>")]),
            Lsn::from_u64(5),
        )
        .unwrap()
        .expect("a move");
    assert_eq!(mv.lsn, Lsn::from_u64(5));
    // The pending partial update of key 1 is still there, to be flushed before the move.
    let ops = only_table(&mut b);
    assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Update(_)));
}

#[test]
fn key_change_with_unchanged_toast_known_in_batch_is_an_upsert() {
    let m = map(true);
    let mut b = Batch::default();
    b.insert(
        &m,
        t(&[Some("1"), Some("x"), Some("big")]),
        Lsn::from_u64(1),
    )
    .unwrap();
    let mv = b
        .update(
            &m,
            Some(OldTuple::Key(t(&[Some("1"), None, None]))),
            t(&[Some("2"), Some("x"), Some("<u>")]),
            Lsn::from_u64(5),
        )
        .unwrap();
    assert!(mv.is_none());
    let ops = only_table(&mut b);
    assert_eq!(
        ops.ops[&key("2")].op,
        KeyedOp::Upsert(t(&[Some("2"), Some("x"), Some("big")]))
    );
}

fn old(values: &[Option<&str>], update: bool) -> OldRow {
    OldRow {
        tuple: t(values),
        update,
        commit_lsn: Lsn::from_u64(0),
        commit_time: 0,
    }
}

#[test]
fn keyless_changes_stay_in_order_as_runs() {
    let m = map(false);
    let mut b = Batch::default();
    b.insert(&m, t(&[Some("1"), Some("x"), None]), Lsn::from_u64(1))
        .unwrap();
    b.insert(&m, t(&[Some("1"), Some("x"), None]), Lsn::from_u64(2))
        .unwrap();
    b.update(
        &m,
        Some(OldTuple::Full(t(&[Some("1"), Some("x"), Some("big")]))),
        t(&[Some("1"), Some("y"), Some("<u>")]),
        Lsn::from_u64(3),
    )
    .unwrap();
    b.delete(
        &m,
        OldTuple::Full(t(&[Some("1"), Some("x"), None])),
        Lsn::from_u64(4),
    )
    .unwrap();
    let ops = only_table(&mut b);
    assert_eq!(
        ops.runs,
        vec![
            KeylessRun::Insert(vec![t(&[Some("1"), Some("x"), None]); 2]),
            KeylessRun::Delete(vec![old(&[Some("1"), Some("x"), Some("big")], true)]),
            KeylessRun::Insert(vec![t(&[Some("1"), Some("y"), Some("big")])]),
            KeylessRun::Delete(vec![old(&[Some("1"), Some("x"), None], false)]),
        ]
    );
}

#[test]
fn a_lookup_barrier_starts_a_segment_written_in_order() {
    let users = map(true);
    let mut vms = (*map(true)).clone();
    vms.label = "public.vms".into();
    vms.reads = vec![vec!["t".into()]];
    let vms = Arc::new(vms);
    let mut free = (*map(true)).clone();
    free.label = "public.free".into();
    let free = Arc::new(free);
    let mut b = Batch::default();
    b.set_readers(vec![vms.clone()]);
    b.insert(&free, t(&[Some("1"), Some("f"), None]), Lsn::from_u64(1))
        .unwrap();
    b.insert(&vms, t(&[Some("1"), Some("vm"), None]), Lsn::from_u64(2))
        .unwrap();
    assert!(
        b.affects_pending_reader(&users, &[Some(&t(&[Some("9"), None, None]))]),
        "vms reads public.t (not keyed)"
    );
    b.start_segment();
    b.insert(&users, t(&[Some("9"), Some("u"), None]), Lsn::from_u64(3))
        .unwrap();
    b.insert(&vms, t(&[Some("2"), Some("vm"), None]), Lsn::from_u64(4))
        .unwrap();
    b.insert(&free, t(&[Some("2"), Some("f"), None]), Lsn::from_u64(5))
        .unwrap();
    assert!(
        b.affects_pending_reader(&users, &[Some(&t(&[Some("9"), None, None]))]),
        "a later users change would need yet another segment"
    );
    let taken = b.take();
    let labels: Vec<&str> = taken.iter().map(|o| o.map.label.as_str()).collect();
    // A table outside lookups coalesces across segments (one entry, first); then segment
    // 1: vms; segment 2: users (read) before vms (reader).
    assert_eq!(
        labels,
        ["public.free", "public.vms", "public.t", "public.vms"]
    );
    assert_eq!(taken[0].ops.len(), 2);
}

#[test]
fn keyed_lookups_split_only_for_keys_a_pending_reader_looked_up() {
    let mut users = (*map(true)).clone();
    users.plain_key = Some(0);
    let users = Arc::new(users);
    let mut vms = (*map(true)).clone();
    vms.label = "public.vms".into();
    vms.reads = vec![vec!["t".into()]];
    vms.keyed_lookups = vec![crate::transform::KeyedLookup {
        relation: vec!["t".into()],
        key: "id".into(),
        column: 1,
    }];
    let vms = Arc::new(vms);
    let mut b = Batch::default();
    b.set_readers(vec![vms.clone()]);
    b.insert(&vms, t(&[Some("1"), Some("5"), None]), Lsn::from_u64(1))
        .unwrap();
    assert!(
        !b.affects_pending_reader(&users, &[Some(&t(&[Some("9"), None, None]))]),
        "a new user 9"
    );
    assert!(
        b.affects_pending_reader(&users, &[Some(&t(&[Some("5"), None, None]))]),
        "user 5 was looked up"
    );
    assert!(
        b.affects_pending_reader(&users, &[Some(&t(&[Some("<u>"), None, None]))]),
        "an unknown key"
    );
    b.update(
        &vms,
        None,
        t(&[Some("1"), Some("<u>"), None]),
        Lsn::from_u64(2),
    )
    .unwrap();
    assert!(
        b.affects_pending_reader(&users, &[Some(&t(&[Some("9"), None, None]))]),
        "a looked-up value is unknown"
    );
    b.start_segment();
    assert!(
        !b.affects_pending_reader(&users, &[Some(&t(&[Some("5"), None, None]))]),
        "a new segment"
    );
    // A key that is not copied verbatim cannot be compared.
    let mut computed = (*users).clone();
    computed.plain_key = None;
    b.insert(&vms, t(&[Some("2"), Some("7"), None]), Lsn::from_u64(3))
        .unwrap();
    assert!(b.affects_pending_reader(&computed, &[Some(&t(&[Some("9"), None, None]))]));
}

#[test]
fn keyless_update_without_old_row_is_a_clear_error() {
    let m = map(false);
    let mut b = Batch::default();
    let err = b
        .update(&m, None, t(&[Some("1"), None, None]), Lsn::from_u64(0x10))
        .unwrap_err();
    assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");
}

#[test]
fn toasted_key_is_a_clear_error() {
    let m = map(true);
    let mut b = Batch::default();
    let err = b
        .update(&m, None, t(&[Some("<u>"), None, None]), Lsn::from_u64(0x10))
        .unwrap_err();
    assert!(err.to_string().contains("key column id"), "{err}");
}
