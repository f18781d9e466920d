//! Decoder (and fixture encoder) for PostgreSQL's `pgoutput` logical replication protocol,
//! version 1: no streaming, no two-phase messages.
//!
//! It sits between the replication connection (one `XLogData` payload per [`Bytes`]) and the
//! transform stage, on the hot path of every replicated row, and keeps two invariants:
//!
//! * **Never panics, whatever the input.** Every read is bounds-checked and every failure is a
//!   [`DecodeError`] with the byte offset of the offending field, so a corrupt message is an
//!   error the pipeline can report, not a crash. Counts from the wire are checked against the
//!   bytes that remain before anything is allocated for them.
//! * **Zero-copy for values.** Text and binary datums, `Message` prefixes and contents, and
//!   origin names are [`Bytes::slice`]s of the input buffer (a reference-count bump, no copy).
//!   Per tuple the only allocation is the `Vec<Datum>`. Relation and type names are the
//!   exception: they are decoded into `String`s because they are rare (one `Relation` per
//!   table per session) and downstream code wants `&str`.
//!
//! A message must be consumed exactly: trailing bytes are an error, because they mean the
//! decoder and the server disagree about the layout and every later field would be garbage.
//!
//! [`Message::encode`] produces the exact wire bytes of a message; `decode(&m.encode()) == m`
//! for every encodable message. It exists for tests, fixtures and benchmarks.

use bytes::Bytes;

/// Positions in the messages are [`Lsn`]s, read from the wire as 64-bit integers.
pub use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
#[rustfmt::skip] // one line per variant reads like the protocol table
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    /// Sent after `Begin` when the transaction originated on another node.
    Origin { commit_lsn: Lsn, name: Bytes },
    Relation(Relation),
    Type { oid: u32, namespace: String, name: String },
    Insert { relation: u32, new: Tuple },
    Update { relation: u32, old: Option<OldTuple>, new: Tuple },
    Delete { relation: u32, old: OldTuple },
    /// `options`: bit 1 = CASCADE, bit 2 = RESTART IDENTITY.
    Truncate { options: u8, relations: Vec<u32> },
    /// A `pg_logical_emit_message` payload.
    Message { transactional: bool, lsn: Lsn, prefix: Bytes, content: Bytes },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// As sent by the server: the empty string stands for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    /// The `pg_class.relreplident` character used on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row image of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity key columns are meaningful (others are `Null`).
    Key(Tuple),
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// One row image; `Datum`s in column order of the relation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Datum>);

impl Tuple {
    /// Sum of the datums' payload lengths (for metrics and batching limits).
    pub fn payload_bytes(&self) -> usize {
        self.0.iter().map(Datum::len).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change; the server does not resend it.
    UnchangedToast,
    /// Value in the type's text output format.
    Text(Bytes),
    /// Value in the type's binary send format.
    Binary(Bytes),
}

impl Datum {
    /// Payload bytes; 0 for `Null` and `UnchangedToast`.
    pub fn len(&self) -> usize {
        match self {
            Datum::Null | Datum::UnchangedToast => 0,
            Datum::Text(b) | Datum::Binary(b) => b.len(),
        }
    }

    /// True when there is no payload (including an empty text or binary value).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message (tag {tag:?}) at byte offset {offset}: {reason}")]
pub struct DecodeError {
    /// Offset into the message (the tag is at 0) of the field that could not be decoded.
    pub offset: usize,
    /// `None` only for an empty message.
    pub tag: Option<char>,
    pub reason: String,
}

/// Kept out of line so the formatting machinery does not bloat the inlined read paths.
#[cold]
#[inline(never)]
fn error(offset: usize, tag: Option<char>, reason: String) -> DecodeError {
    DecodeError {
        offset,
        tag,
        reason,
    }
}

/// Decode one pgoutput message. Text/binary datums and Message content/prefix/origin name are
/// `buf.slice(..)` of the input: no copying of values.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(error(0, None, "empty message".to_owned()));
    };
    let mut r = Reader {
        buf,
        pos: 1,
        tag: tag as char,
    };
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn::from_u64(r.u64("final LSN")?),
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn::from_u64(r.u64("commit LSN")?),
            end_lsn: Lsn::from_u64(r.u64("end LSN")?),
            commit_time: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: Lsn::from_u64(r.u64("origin commit LSN")?),
            name: r.cstr_bytes("origin name")?,
        },
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type {
            oid: r.u32("type OID")?,
            namespace: r.cstr_string("type namespace")?,
            name: r.cstr_string("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation OID")?;
            r.marker("new tuple marker", b"N")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation OID")?;
            let old = match r.marker("tuple marker", b"KON")? {
                b'N' => None,
                marker => Some(r.old_tuple(marker)?),
            };
            if old.is_some() {
                r.marker("new tuple marker", b"N")?;
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation OID")?;
            let marker = r.marker("old tuple marker", b"KO")?;
            Message::Delete {
                relation,
                old: r.old_tuple(marker)?,
            }
        }
        b'T' => {
            let at = r.pos;
            let count = r.i32("relation count")?;
            let Ok(n) = usize::try_from(count) else {
                return Err(r.err_at(at, format!("negative relation count {count}")));
            };
            r.check_count(at, n, 4, "relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32("truncated relation OID")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            Message::Message {
                // Only bit 0 is defined; the server ignores the others, and so do we.
                transactional: flags & 1 != 0,
                lsn: Lsn::from_u64(r.u64("message LSN")?),
                prefix: r.cstr_bytes("message prefix")?,
                content: r.len_prefixed("message content")?,
            }
        }
        other => {
            let reason = match other {
                b'S' | b'E' | b'c' | b'A' => "streaming message (needs protocol version 2+)",
                b'b' | b'P' | b'K' | b'r' | b'p' => "two-phase message (needs protocol version 3+)",
                _ => "unknown message tag",
            };
            return Err(error(0, Some(other as char), reason.to_owned()));
        }
    };
    if r.pos != buf.len() {
        let extra = buf.len() - r.pos;
        return Err(r.err_at(
            r.pos,
            format!("{extra} trailing bytes after a complete message"),
        ));
    }
    Ok(msg)
}

/// Cursor over one message. Invariant: `pos <= buf.len()`, so `remaining` cannot underflow.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: char,
}

macro_rules! read_be {
    ($($name:ident: $t:ty),*) => {$(
        #[inline]
        fn $name(&mut self, what: &str) -> Result<$t, DecodeError> {
            self.array(what).map(<$t>::from_be_bytes)
        }
    )*};
}

impl<'a> Reader<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err_at(&self, offset: usize, reason: String) -> DecodeError {
        error(offset, Some(self.tag), reason)
    }

    #[cold]
    #[inline(never)]
    fn unexpected(&self, at: usize, what: &str, found: u8, expected: &[u8]) -> DecodeError {
        let expected: String = expected.iter().map(|&b| b as char).collect();
        let found = found as char;
        self.err_at(
            at,
            format!("unexpected {what} {found:?}, expected one of {expected:?}"),
        )
    }

    #[cold]
    #[inline(never)]
    fn oversize(&self, at: usize, what: &str, n: usize) -> DecodeError {
        let rem = self.remaining();
        self.err_at(
            at,
            format!("{what} {n} exceeds what the {rem} remaining bytes can hold"),
        )
    }

    #[cold]
    #[inline(never)]
    fn truncated(&self, need: usize, what: &str) -> DecodeError {
        let rem = self.remaining();
        self.err_at(
            self.pos,
            format!("truncated: {what} needs {need} bytes, {rem} remain"),
        )
    }

    #[inline]
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let rest: &'a [u8] = &self.buf[self.pos..];
        match rest.first_chunk::<N>() {
            Some(chunk) => {
                self.pos += N;
                Ok(*chunk)
            }
            None => Err(self.truncated(N, what)),
        }
    }

    read_be!(u8: u8, u16: u16, i32: i32, u32: u32, i64: i64, u64: u64);

    /// Rejects a count of `n` items of at least `min_each` bytes that cannot fit in the rest
    /// of the message, so a hostile count fails here instead of sizing an allocation.
    #[inline]
    fn check_count(
        &self,
        at: usize,
        n: usize,
        min_each: usize,
        what: &str,
    ) -> Result<(), DecodeError> {
        if n > self.remaining() / min_each {
            return Err(self.oversize(at, what, n));
        }
        Ok(())
    }

    fn marker(&mut self, what: &str, allowed: &[u8]) -> Result<u8, DecodeError> {
        let at = self.pos;
        let b = self.u8(what)?;
        if !allowed.contains(&b) {
            return Err(self.unexpected(at, what, b, allowed));
        }
        Ok(b)
    }

    /// Range of a NUL-terminated string (terminator excluded); consumes the terminator.
    fn cstr_range(&mut self, what: &str) -> Result<(usize, usize), DecodeError> {
        let start = self.pos;
        let Some(n) = self.buf[start..].iter().position(|&b| b == 0) else {
            return Err(self.err_at(start, format!("truncated: {what} has no NUL terminator")));
        };
        self.pos = start + n + 1;
        Ok((start, start + n))
    }

    fn cstr_bytes(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let (start, end) = self.cstr_range(what)?;
        Ok(self.buf.slice(start..end))
    }

    fn cstr_string(&mut self, what: &str) -> Result<String, DecodeError> {
        let (start, end) = self.cstr_range(what)?;
        match std::str::from_utf8(&self.buf[start..end]) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.err_at(
                start + e.valid_up_to(),
                format!("{what} is not valid UTF-8"),
            )),
        }
    }

    /// Int32 length followed by that many bytes. Errors point at the length field, since
    /// that is the field that disagrees with the message size.
    #[inline]
    fn len_prefixed(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.i32(what)?;
        let Ok(n) = usize::try_from(len) else {
            return Err(self.err_at(at, format!("negative length {len} for {what}")));
        };
        if n > self.remaining() {
            return Err(self.oversize(at, what, n));
        }
        let start = self.pos;
        self.pos += n;
        Ok(self.buf.slice(start..self.pos))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let at = self.pos;
        let n = usize::from(self.u16("tuple column count")?);
        // Every column takes at least its kind byte.
        self.check_count(at, n, 1, "tuple column count")?;
        let mut datums = Vec::with_capacity(n);
        for _ in 0..n {
            let kind_at = self.pos;
            let datum = match self.u8("tuple datum kind")? {
                b't' => Datum::Text(self.len_prefixed("text datum length")?),
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b'b' => Datum::Binary(self.len_prefixed("binary datum length")?),
                other => return Err(self.unexpected(kind_at, "tuple datum kind", other, b"ntub")),
            };
            datums.push(datum);
        }
        Ok(Tuple(datums))
    }

    /// The tuple after a 'K' or 'O' marker (already validated by the caller).
    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple, DecodeError> {
        let t = self.tuple()?;
        Ok(if marker == b'K' {
            OldTuple::Key(t)
        } else {
            OldTuple::Full(t)
        })
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32("relation OID")?;
        let namespace = self.cstr_string("relation namespace")?;
        let name = self.cstr_string("relation name")?;
        let at = self.pos;
        let ri = self.u8("replica identity setting")?;
        let replica_identity = ReplicaIdentity::from_byte(ri)
            .ok_or_else(|| self.unexpected(at, "replica identity setting", ri, b"dnfi"))?;
        let at = self.pos;
        let n = usize::from(self.u16("relation column count")?);
        // flags + empty name + type OID + type modifier: a column is never shorter.
        self.check_count(at, n, 1 + 1 + 4 + 4, "relation column count")?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let flags = self.u8("column flags")?;
            columns.push(RelationColumn {
                // Only bit 0 (part of the key) is defined.
                is_key: flags & 1 != 0,
                name: self.cstr_string("column name")?,
                type_oid: self.u32("column type OID")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

impl Message {
    /// The wire tag byte of this message.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin { .. } => b'O',
            Message::Relation(_) => b'R',
            Message::Type { .. } => b'Y',
            Message::Insert { .. } => b'I',
            Message::Update { .. } => b'U',
            Message::Delete { .. } => b'D',
            Message::Truncate { .. } => b'T',
            Message::Message { .. } => b'M',
        }
    }
}

mod encode;

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(bytes: &[u8]) -> Result<Message, DecodeError> {
        decode(&Bytes::copy_from_slice(bytes))
    }

    /// Decodes, checks the offset and tag of the error, and returns its reason.
    fn err_at(bytes: &[u8], offset: usize) -> String {
        let e = dec(bytes).expect_err("expected a decode error");
        assert_eq!(e.offset, offset, "wrong offset for {e}");
        assert_eq!(e.tag, bytes.first().map(|&b| b as char));
        e.reason
    }

    fn text(s: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(s.as_bytes()))
    }

    /// Asserts the fixture decodes to `want` and that the encoder reproduces it byte for byte.
    fn check(bytes: &[u8], want: Message) {
        assert_eq!(dec(bytes).unwrap(), want);
        assert_eq!(want.encode(), bytes);
    }

    #[test]
    fn transaction_control() {
        #[rustfmt::skip]
        check(&[b'B',
            0, 0, 0, 1, 0x6B, 0x2C, 0xA0, 0x28, // final LSN 1/6B2CA028
            0, 0, 0, 0, 0, 0, 1, 0,             // commit time 256
            0, 0, 0x30, 0x39,                   // xid 12345
        ], Message::Begin(Begin { final_lsn: Lsn::from_u64(0x1_6B2C_A028), commit_time: 256, xid: 12345 }));
        #[rustfmt::skip]
        check(&[b'C', 0,
            0, 0, 0, 0, 0, 0, 0, 0x10,
            0, 0, 0, 0, 0, 0, 0, 0x20,
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, // commit time -2
        ], Message::Commit(Commit { flags: 0, commit_lsn: Lsn::from_u64(0x10), end_lsn: Lsn::from_u64(0x20), commit_time: -2 }));
        let name = Bytes::from_static(b"node1");
        #[rustfmt::skip]
        check(&[b'O', 0, 0, 0, 0, 0, 0, 0, 7, b'n', b'o', b'd', b'e', b'1', 0],
            Message::Origin { commit_lsn: Lsn::from_u64(7), name });
    }

    #[test]
    fn relation_and_type() {
        let column = |is_key, name: &str, type_oid, type_modifier| RelationColumn {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier,
        };
        #[rustfmt::skip]
        let b = [b'R', 0, 0, 0x40, 0x00,        // oid 16384
            b'p', b'u', b'b', 0, b't', 0, b'i', // "pub"."t", replica identity index
            0, 2,
            1, b'i', b'd', 0, 0, 0, 0, 23, 0xFF, 0xFF, 0xFF, 0xFF, // key int4, typmod -1
            0, b'v', 0, 0, 0, 4, 19, 0, 0, 0, 14]; // varchar(10): typmod 14
        let want = Relation {
            oid: 16384,
            namespace: "pub".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Index,
            columns: vec![column(true, "id", 23, -1), column(false, "v", 1043, 14)],
        };
        check(&b, Message::Relation(want));
        // Empty namespace (pg_catalog) is kept as given.
        use ReplicaIdentity::*;
        for (byte, ri) in [
            (b'd', Default),
            (b'n', Nothing),
            (b'f', Full),
            (b'i', Index),
        ] {
            let Message::Relation(r) = dec(&[b'R', 0, 0, 0, 1, 0, b'x', 0, byte, 0, 0]).unwrap()
            else {
                panic!("not a relation")
            };
            assert_eq!((r.namespace.as_str(), r.replica_identity), ("", ri));
        }
        let (namespace, name) = ("pub".into(), "mood".into());
        #[rustfmt::skip]
        check(&[b'Y', 0, 0, 0x60, 0x01, b'p', b'u', b'b', 0, b'm', b'o', b'o', b'd', 0],
            Message::Type { oid: 0x6001, namespace, name });
    }

    #[test]
    fn insert_all_datum_kinds() {
        #[rustfmt::skip]
        let b = [b'I', 0, 0, 0x40, 0x00, b'N', 0, 4,
            b'n',
            b'u',
            b't', 0, 0, 0, 2, b'4', b'2',
            b'b', 0, 0, 0, 3, 0xDE, 0xAD, 0x00];
        let binary = Datum::Binary(Bytes::from_static(&[0xDE, 0xAD, 0x00]));
        let new = Tuple(vec![Datum::Null, Datum::UnchangedToast, text("42"), binary]);
        assert_eq!((new.payload_bytes(), new.0[1].len()), (5, 0));
        assert!(new.0[0].is_empty());
        check(
            &b,
            Message::Insert {
                relation: 16384,
                new,
            },
        );
    }

    #[test]
    fn updates_and_deletes() {
        let new = Tuple(vec![text("a")]);
        #[rustfmt::skip]
        check(&[b'U', 0, 0, 0, 9, b'N', 0, 1, b't', 0, 0, 0, 1, b'a'],
            Message::Update { relation: 9, old: None, new });
        #[rustfmt::skip]
        let b = [b'U', 0, 0, 0, 9,
            b'K', 0, 2, b't', 0, 0, 0, 1, b'1', b'n',
            b'N', 0, 2, b't', 0, 0, 0, 1, b'2', b'u'];
        let old = Some(OldTuple::Key(Tuple(vec![text("1"), Datum::Null])));
        let new = Tuple(vec![text("2"), Datum::UnchangedToast]);
        check(
            &b,
            Message::Update {
                relation: 9,
                old,
                new,
            },
        );
        #[rustfmt::skip]
        let b = [b'U', 0, 0, 0, 9,
            b'O', 0, 1, b't', 0, 0, 0, 0,
            b'N', 0, 1, b't', 0, 0, 0, 1, b'x'];
        let (old, new) = (
            Some(OldTuple::Full(Tuple(vec![text("")]))),
            Tuple(vec![text("x")]),
        );
        check(
            &b,
            Message::Update {
                relation: 9,
                old,
                new,
            },
        );
        let old = OldTuple::Key(Tuple(vec![text("7")]));
        #[rustfmt::skip]
        check(&[b'D', 0, 0, 0, 9, b'K', 0, 1, b't', 0, 0, 0, 1, b'7'],
            Message::Delete { relation: 9, old });
        let old = OldTuple::Full(Tuple(vec![text("7"), Datum::Null]));
        #[rustfmt::skip]
        check(&[b'D', 0, 0, 0, 9, b'O', 0, 2, b't', 0, 0, 0, 1, b'7', b'n'],
            Message::Delete { relation: 9, old });
    }

    #[test]
    fn truncate_and_logical_messages() {
        let (options, relations) = (3, vec![16384, 16385]); // CASCADE | RESTART IDENTITY
        #[rustfmt::skip]
        check(&[b'T', 0, 0, 0, 2, 3, 0, 0, 0x40, 0x00, 0, 0, 0x40, 0x01],
            Message::Truncate { options, relations });
        let (prefix, content) = (Bytes::from_static(b"px"), Bytes::from_static(b"a\0c"));
        #[rustfmt::skip]
        check(&[b'M', 1, 0, 0, 0, 0, 0, 0, 0, 5, b'p', b'x', 0, 0, 0, 0, 3, b'a', 0, b'c'],
            Message::Message { transactional: true, lsn: Lsn::from_u64(5), prefix, content });
        let (prefix, content) = (Bytes::new(), Bytes::new());
        #[rustfmt::skip]
        check(&[b'M', 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0],
            Message::Message { transactional: false, lsn: Lsn::from_u64(6), prefix, content });
    }

    #[test]
    fn empty_and_unknown_tags() {
        let e = dec(&[]).unwrap_err();
        assert_eq!((e.offset, e.tag), (0, None));
        for tag in [b'S', b'E', b'c', b'A', b'P', b'K', b'r', b'Z', 0, 0xFF] {
            err_at(&[tag, 0, 0, 0, 0], 0);
        }
        assert!(err_at(b"S", 0).contains("streaming"));
        let e = dec(b"Z").unwrap_err();
        assert!(e.to_string().contains("'Z'"), "{e}");
    }

    #[test]
    fn truncated_messages_report_the_field_offset() {
        // Begin cut inside the commit timestamp: the error names where that field starts.
        err_at(&[b'B', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], 9);
        // Insert missing the 'N' marker.
        err_at(&[b'I', 0, 0, 0, 1], 5);
        // Text datum length claims more than is present: points at the length field.
        let r = err_at(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0, 0, 0, 5, b'a'], 9);
        assert!(r.contains("exceeds"), "{r}");
        // Datum length field itself cut short.
        err_at(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0, 0], 9);
        // Second datum kind missing (after an empty text datum).
        err_at(&[b'I', 0, 0, 0, 1, b'N', 0, 2, b't', 0, 0, 0, 0], 13);
        // Relation name without NUL: points at the start of the string.
        err_at(&[b'R', 0, 0, 0, 1, b'p', 0, b't', b'a', b'b'], 7);
        // Update with old key but no new tuple marker.
        err_at(&[b'U', 0, 0, 0, 1, b'K', 0, 1, b'n'], 9);
        // Message content shorter than its length.
        err_at(&[b'M', 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 9, b'x'], 11);
    }

    #[test]
    fn counts_beyond_the_input_fail_before_allocating() {
        err_at(&[b'I', 0, 0, 0, 1, b'N', 0xFF, 0xFF, b'n', b'n', b'n'], 6);
        err_at(&[b'I', 0, 0, 0, 1, b'N', 0, 2, b'n'], 6);
        err_at(
            &[b'R', 0, 0, 0, 1, 0, b't', 0, b'd', 0xFF, 0xFF, 0, 0, 0],
            9,
        );
        err_at(&[b'T', 0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 1], 1);
        err_at(&[b'T', 0, 0, 0, 2, 0, 0, 0, 0, 1], 1);
    }

    #[test]
    fn trailing_garbage() {
        let r = err_at(&[b'D', 0, 0, 0, 9, b'K', 0, 1, b'n', 0xAA, 0xBB], 9);
        assert!(r.contains("2 trailing"), "{r}");
        let mut begin = [0; 22];
        begin[0] = b'B';
        err_at(&begin, 21);
    }

    #[test]
    fn bad_markers_and_kinds() {
        let r = err_at(&[b'I', 0, 0, 0, 1, b'N', 0, 2, b'n', b'x'], 9);
        assert!(r.contains("datum kind 'x'"), "{r}");
        err_at(&[b'I', 0, 0, 0, 1, b'K', 0, 0], 5);
        err_at(&[b'U', 0, 0, 0, 1, b'X', 0, 0], 5);
        err_at(&[b'D', 0, 0, 0, 1, b'N', 0, 0], 5);
        err_at(&[b'R', 0, 0, 0, 1, 0, b't', 0, b'z', 0, 0], 8);
    }

    #[test]
    fn negative_lengths_and_bad_utf8() {
        let r = err_at(
            &[b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0xFF, 0xFF, 0xFF, 0xFE],
            9,
        );
        assert!(r.contains("negative"), "{r}");
        err_at(&[b'M', 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x80, 0, 0, 0], 11);
        err_at(&[b'T', 0xFF, 0xFF, 0xFF, 0xFF, 0], 1);
        let r = err_at(&[b'Y', 0, 0, 0, 1, b'a', 0xC3, 0x28, 0, b'n', 0], 6);
        assert!(r.contains("UTF-8"), "{r}");
    }
}
