//! The inverse of the decoder: exact pgoutput wire bytes for a [`Message`]. Used by tests,
//! fixtures and benchmarks, never on the streaming path.

use super::{Datum, Message, OldTuple, Tuple};

impl Message {
    /// The exact pgoutput wire bytes of this message (the inverse of [`decode`]).
    ///
    /// # Panics
    ///
    /// If the message cannot be represented on the wire, since emitting something that
    /// decodes to a different message would silently corrupt fixtures: a string or prefix
    /// containing a NUL byte, more than 65535 columns, or a datum, content or relation list
    /// longer than `i32::MAX`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// Like [`Message::encode`], appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.tag());
        match self {
            Message::Begin(b) => {
                out.extend_from_slice(&b.final_lsn.as_u64().to_be_bytes());
                out.extend_from_slice(&b.commit_time.to_be_bytes());
                out.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                out.push(c.flags);
                out.extend_from_slice(&c.commit_lsn.as_u64().to_be_bytes());
                out.extend_from_slice(&c.end_lsn.as_u64().to_be_bytes());
                out.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                out.extend_from_slice(&commit_lsn.as_u64().to_be_bytes());
                put_cstr(out, name);
            }
            Message::Relation(r) => {
                out.extend_from_slice(&r.oid.to_be_bytes());
                put_cstr(out, r.namespace.as_bytes());
                put_cstr(out, r.name.as_bytes());
                out.push(r.replica_identity.as_byte());
                put_count16(out, r.columns.len());
                for c in &r.columns {
                    out.push(u8::from(c.is_key));
                    put_cstr(out, c.name.as_bytes());
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                out.extend_from_slice(&oid.to_be_bytes());
                put_cstr(out, namespace.as_bytes());
                put_cstr(out, name.as_bytes());
            }
            Message::Insert { relation, new } => {
                out.extend_from_slice(&relation.to_be_bytes());
                out.push(b'N');
                put_tuple(out, new);
            }
            Message::Update { relation, old, new } => {
                out.extend_from_slice(&relation.to_be_bytes());
                if let Some(old) = old {
                    put_old(out, old);
                }
                out.push(b'N');
                put_tuple(out, new);
            }
            Message::Delete { relation, old } => {
                out.extend_from_slice(&relation.to_be_bytes());
                put_old(out, old);
            }
            Message::Truncate { options, relations } => {
                put_len32(out, relations.len());
                out.push(*options);
                for oid in relations {
                    out.extend_from_slice(&oid.to_be_bytes());
                }
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.as_u64().to_be_bytes());
                put_cstr(out, prefix);
                put_len32(out, content.len());
                out.extend_from_slice(content);
            }
        }
    }
}

fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    assert!(!s.contains(&0), "pgoutput strings cannot contain NUL bytes");
    out.extend_from_slice(s);
    out.push(0);
}

fn put_count16(out: &mut Vec<u8>, n: usize) {
    let n = u16::try_from(n).expect("pgoutput column counts are at most 65535");
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_len32(out: &mut Vec<u8>, n: usize) {
    let n = i32::try_from(n).expect("pgoutput lengths are at most i32::MAX");
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_old(out: &mut Vec<u8>, old: &OldTuple) {
    let (marker, t) = match old {
        OldTuple::Key(t) => (b'K', t),
        OldTuple::Full(t) => (b'O', t),
    };
    out.push(marker);
    put_tuple(out, t);
}

fn put_tuple(out: &mut Vec<u8>, t: &Tuple) {
    put_count16(out, t.0.len());
    for d in &t.0 {
        match d {
            Datum::Null => out.push(b'n'),
            Datum::UnchangedToast => out.push(b'u'),
            Datum::Text(b) | Datum::Binary(b) => {
                out.push(if matches!(d, Datum::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                put_len32(out, b.len());
                out.extend_from_slice(b);
            }
        }
    }
}
