//! Property tests for the pgoutput decoder: encode/decode round trip, no panics on arbitrary or
//! corrupted input, and strict prefixes never decoding.
//!
//! Seeds use proptest's defaults: a fresh random seed per run, with failing cases persisted
//! to `proptest-regressions/` and replayed first on later runs.

use bytes::Bytes;
use proptest::prelude::*;
use shadowsync::decode::*;
use shadowsync::lsn::Lsn;

fn name() -> impl Strategy<Value = String> {
    // Any UTF-8 except NUL, which cannot appear in a wire string.
    "[^\u{0}]{0,12}"
}

fn cbytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(1u8..=255, 0..16).prop_map(Bytes::from)
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn datum() -> impl Strategy<Value = Datum> {
    prop_oneof![
        Just(Datum::Null),
        Just(Datum::UnchangedToast),
        payload().prop_map(Datum::Text),
        payload().prop_map(Datum::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    prop::collection::vec(datum(), 0..12).prop_map(Tuple)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn column() -> impl Strategy<Value = RelationColumn> {
    (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| RelationColumn {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin(Begin {
                final_lsn: Lsn::from_u64(final_lsn),
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                flags,
                commit_lsn: Lsn::from_u64(commit_lsn),
                end_lsn: Lsn::from_u64(end_lsn),
                commit_time,
            })
        ),
        (any::<u64>(), cbytes()).prop_map(|(commit_lsn, name)| Message::Origin {
            commit_lsn: Lsn::from_u64(commit_lsn),
            name
        }),
        (
            any::<u32>(),
            name(),
            name(),
            replica_identity(),
            prop::collection::vec(column(), 0..8)
        )
            .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type {
            oid,
            namespace,
            name
        }),
        (any::<u32>(), tuple()).prop_map(|(relation, new)| Message::Insert { relation, new }),
        (any::<u32>(), prop::option::of(old_tuple()), tuple())
            .prop_map(|(relation, old, new)| Message::Update { relation, old, new }),
        (any::<u32>(), old_tuple()).prop_map(|(relation, old)| Message::Delete { relation, old }),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..10))
            .prop_map(|(options, relations)| Message::Truncate { options, relations }),
        (any::<bool>(), any::<u64>(), cbytes(), payload()).prop_map(
            |(transactional, lsn, prefix, content)| Message::Message {
                transactional,
                lsn: Lsn::from_u64(lsn),
                prefix,
                content,
            }
        ),
    ]
}

/// Every value `Bytes` in a decoded message must point into the input buffer.
fn assert_zero_copy(buf: &Bytes, msg: &Message) {
    let range = buf.as_ptr() as usize..=buf.as_ptr() as usize + buf.len();
    let check = |b: &Bytes| {
        if !b.is_empty() {
            assert!(range.contains(&(b.as_ptr() as usize)), "value was copied");
        }
    };
    let check_tuple = |t: &Tuple| {
        for d in &t.0 {
            if let Datum::Text(b) | Datum::Binary(b) = d {
                check(b);
            }
        }
    };
    match msg {
        Message::Origin { name, .. } => check(name),
        Message::Message {
            prefix, content, ..
        } => {
            check(prefix);
            check(content);
        }
        Message::Insert { new, .. } => check_tuple(new),
        Message::Update { old, new, .. } => {
            if let Some(old) = old {
                check_tuple(old.tuple());
            }
            check_tuple(new);
        }
        Message::Delete { old, .. } => check_tuple(old.tuple()),
        _ => {}
    }
}

/// Whatever decodes must be encodable and stable. Not byte-identical to the input: undefined
/// flag bits (Message flags, column flags) are dropped by design.
fn reencoded(msg: &Message) -> Result<Message, DecodeError> {
    decode(&Bytes::from(msg.encode()))
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Set { at: usize, value: u8 },
    Insert { at: usize, value: u8 },
    Remove { at: usize },
    Truncate { len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>();
    prop_oneof![
        (at.clone(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip {
            at: at.index(usize::MAX),
            xor
        }),
        (
            at.clone(),
            prop_oneof![Just(0u8), Just(0xFF), Just(0x80), any::<u8>()]
        )
            .prop_map(|(at, value)| Mutation::Set {
                at: at.index(usize::MAX),
                value
            }),
        (at.clone(), any::<u8>()).prop_map(|(at, value)| Mutation::Insert {
            at: at.index(usize::MAX),
            value
        }),
        at.clone().prop_map(|at| Mutation::Remove {
            at: at.index(usize::MAX)
        }),
        at.prop_map(|at| Mutation::Truncate {
            len: at.index(usize::MAX)
        }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip { at, xor } if n > 0 => bytes[at % n] ^= xor,
        Mutation::Set { at, value } if n > 0 => bytes[at % n] = value,
        Mutation::Insert { at, value } => bytes.insert(at % (n + 1), value),
        Mutation::Remove { at } if n > 0 => {
            bytes.remove(at % n);
        }
        Mutation::Truncate { len } => bytes.truncate(len % (n + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn round_trip(msg in message()) {
        let buf = Bytes::from(msg.encode());
        let decoded = decode(&buf);
        prop_assert_eq!(decoded.as_ref(), Ok(&msg));
        assert_zero_copy(&buf, decoded.as_ref().unwrap());
        // encode_into appends, so a reused buffer keeps earlier content.
        let mut out = vec![0xAB];
        msg.encode_into(&mut out);
        prop_assert_eq!(&out[1..], &buf[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_bodies_after_valid_tags_never_panic(
        tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
        body in prop::collection::vec(
            prop_oneof![any::<u8>(), prop::sample::select(b"NKOntub\0dfi".to_vec())],
            0..200,
        ),
    ) {
        let mut bytes = vec![tag];
        bytes.extend(body);
        let buf = Bytes::from(bytes);
        match decode(&buf) {
            Ok(msg) => prop_assert_eq!(reencoded(&msg), Ok(msg)),
            Err(e) => {
                prop_assert_eq!(e.tag, Some(tag as char));
                prop_assert!(e.offset <= buf.len());
            }
        }
    }

    #[test]
    fn mutated_encodings_never_panic(
        msg in message(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut bytes = msg.encode();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let buf = Bytes::from(bytes);
        match decode(&buf) {
            Ok(decoded) => prop_assert_eq!(reencoded(&decoded), Ok(decoded)),
            Err(e) => prop_assert!(e.offset <= buf.len(), "offset {} beyond input", e.offset),
        }
    }

    #[test]
    fn strict_prefixes_are_errors(msg in message()) {
        let full = msg.encode();
        for len in 0..full.len() {
            let buf = Bytes::copy_from_slice(&full[..len]);
            match decode(&buf) {
                Ok(m) => prop_assert!(false, "prefix of {} bytes decoded as {:?}", len, m),
                Err(e) => prop_assert!(e.offset <= len, "offset {} beyond prefix {}", e.offset, len),
            }
        }
    }
}

/// Rough single-core throughput of the hot path. Run with
/// `cargo test --release --test decode_props -- --ignored --nocapture`.
#[test]
#[ignore]
fn insert_throughput() {
    let msg = Message::Insert {
        relation: 16384,
        new: Tuple(
            (0..10)
                .map(|i| Datum::Text(Bytes::from(format!("value-{i:04}-abcdef"))))
                .collect(),
        ),
    };
    let buf = Bytes::from(msg.encode());
    let n = 1_000_000;
    let start = std::time::Instant::now();
    let mut bytes = 0usize;
    for _ in 0..n {
        match decode(std::hint::black_box(&buf)) {
            Ok(Message::Insert { new, .. }) => bytes += new.payload_bytes(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, n * 10 * 17);
    println!(
        "decoded {n} inserts ({} bytes each) in {secs:.3}s: {:.2} M msg/s",
        buf.len(),
        n as f64 / secs / 1e6
    );
}
