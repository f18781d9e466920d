//! Parameter encodings of the apply statements: values travel as blue sent them, in binary
//! arrays or COPY text, never spliced into SQL.
//!
//! Invariant: no UTF-8 check or copy of a value on the way (blue already produced valid text in
//! the database encoding); COPY text escapes exactly what COPY would otherwise read as syntax.

use bytes::{BufMut, BytesMut};
use postgres_types::{IsNull, ToSql, Type, to_sql_checked};

use crate::decode::{Datum, Tuple};

/// A `text[]` parameter built from borrowed bytes, without UTF-8 checks or copies: blue already
/// produced valid text in the database encoding.
#[derive(Debug, Default)]
pub struct TextArray<'a>(pub Vec<Option<&'a [u8]>>);

impl ToSql for TextArray<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let dims = [postgres_protocol::types::ArrayDimension {
            len: i32::try_from(self.0.len())?,
            lower_bound: 1,
        }];
        postgres_protocol::types::array_to_sql(
            dims,
            Type::TEXT.oid(),
            self.0.iter(),
            |v, buf| match v {
                Some(bytes) => {
                    buf.put_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// An array of 8-byte binary values (`pg_lsn`, `timestamptz`: both are 64-bit integers on the
/// wire), sent without conversion.
#[derive(Debug)]
pub struct WordArray(pub Vec<i64>);

impl ToSql for WordArray {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let element = match *ty {
            Type::PG_LSN_ARRAY => Type::PG_LSN,
            _ => Type::TIMESTAMPTZ,
        };
        let dims = [postgres_protocol::types::ArrayDimension {
            len: i32::try_from(self.0.len())?,
            lower_bound: 1,
        }];
        postgres_protocol::types::array_to_sql(
            dims,
            element.oid(),
            self.0.iter(),
            |v, buf| {
                buf.put_i64(*v);
                Ok(postgres_protocol::IsNull::No)
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::PG_LSN_ARRAY || *ty == Type::TIMESTAMPTZ_ARRAY
    }

    to_sql_checked!();
}

/// Appends one row in COPY's text format: `sources[k]` is the source column of target column k.
pub fn copy_row(buf: &mut BytesMut, t: &Tuple, sources: &[usize]) {
    for (k, &c) in sources.iter().enumerate() {
        if k > 0 {
            buf.put_u8(b'\t');
        }
        match &t.0[c] {
            Datum::Text(b) | Datum::Binary(b) => copy_escape(buf, b),
            Datum::Null | Datum::UnchangedToast => buf.put_slice(b"\\N"),
        }
    }
    buf.put_u8(b'\n');
}

/// A value in COPY's text format: backslash, and the delimiter and line ends it would read as
/// such, escaped.
fn copy_escape(buf: &mut BytesMut, mut v: &[u8]) {
    while let Some(at) = v
        .iter()
        .position(|&b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        buf.put_slice(&v[..at]);
        buf.put_slice(match v[at] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        v = &v[at + 1..];
    }
    buf.put_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_what_copy_text_would_read_otherwise() {
        let t = Tuple(vec![
            Datum::Text(bytes::Bytes::from_static(b"7")),
            Datum::Text(bytes::Bytes::from_static(b"a\tb\nc\rd\\e\\Nf")),
            Datum::Null,
        ]);
        let mut buf = BytesMut::new();
        copy_row(&mut buf, &t, &[0, 1, 2]);
        copy_row(&mut buf, &t, &[2, 0]);
        assert_eq!(
            &buf[..],
            b"7\ta\\tb\\nc\\rd\\\\e\\\\Nf\t\\N\n\\N\t7\n".as_slice()
        );
    }
}
