//! A position in blue's write-ahead log, the one unit every stage counts progress in.
//!
//! Invariants: an LSN is printed only as PostgreSQL prints it (`16/B374D848`); text that is not
//! an LSN is an error for the caller to name, never a zero (a zero drain target would be "reached"
//! at once); positions read from a server are read as `pg_lsn` values, not parsed from text.

use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use postgres_types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};

/// A WAL position (a byte offset into blue's WAL).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

/// Text that is not `X/Y` with two 32-bit hexadecimal halves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an LSN: {0:?} (expected PostgreSQL's X/Y form, such as 16/B374D848)")]
pub struct ParseLsnError(pub String);

impl Lsn {
    /// The start of the WAL: nothing confirmed, nothing applied.
    pub const ZERO: Lsn = Lsn(0);

    /// The LSN at byte offset `value`.
    pub const fn from_u64(value: u64) -> Lsn {
        Lsn(value)
    }

    /// The byte offset, for counters and gauges.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Parses PostgreSQL's `X/Y` text.
    pub fn parse(text: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(text.to_string());
        let (hi, lo) = text.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }

    /// Bytes of WAL from `earlier` to `self`; zero when `earlier` is not earlier.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(text: &str) -> Result<Lsn, ParseLsnError> {
        Lsn::parse(text)
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(lsn: pgwire_replication::Lsn) -> Lsn {
        Lsn(lsn.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(lsn: Lsn) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn::from_u64(lsn.0)
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'a> FromSql<'a> for Lsn {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Lsn, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Lsn(postgres_protocol::types::lsn_from_sql(raw)?))
    }

    accepts!(PG_LSN);
}

impl ToSql for Lsn {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        postgres_protocol::types::lsn_to_sql(self.0, out);
        Ok(IsNull::No)
    }

    accepts!(PG_LSN);

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for raw in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn::from_u64(raw);
            assert_eq!(Lsn::parse(&lsn.to_string()), Ok(lsn));
        }
        assert_eq!(Lsn::from_u64(0x16_B374_D848).to_string(), "16/B374D848");
    }

    #[test]
    fn refuses_what_is_not_an_lsn() {
        for text in [
            "nope",
            "",
            "1/",
            "/1",
            "1/2/3",
            "100000000/0",
            "0/100000000",
            "-1/0",
        ] {
            assert!(Lsn::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn distance_never_wraps() {
        let (a, b) = (Lsn::from_u64(10), Lsn::from_u64(25));
        assert_eq!(b.bytes_since(a), 15);
        assert_eq!(a.bytes_since(b), 0);
    }
}
