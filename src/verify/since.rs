//! `verify --since-lsn`: the points earlier verifies recorded in green's bookkeeping
//! (`shadowsync.verify_points`), and the choice of the one an incremental verify starts from.
//!
//! Every verify that completes records, per target compared, its consistent point: the LSN,
//! whether the target matched, a fingerprint of the mapping compared, and the oldest
//! transaction still running in each side's snapshot (`pg_snapshot_xmin`, read in the very
//! snapshots the comparison used). `--since-lsn L` starts from the latest point at or before
//! `L` at which every selected target matched with the same mapping (see `compare::changed`
//! for why rows older than the point need not be compared again).
//!
//! Invariants: a point is recorded only after its comparison completed (an interrupted verify
//! records nothing), outside the comparison's snapshot; failing to record is a warning, never
//! a failed verify; a point is refused when its transaction ids are over [`MAX_AGE`] old on a
//! side (the 32-bit arithmetic of `age()` must not wrap) or ahead of the side's (another
//! cluster's ids).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::VerifyError;
use super::compare::{MappingDiff, Since};
use crate::lsn::Lsn;
use crate::transform::TableMap;

/// Oldest a point may be, in transactions on either side.
pub const MAX_AGE: i64 = 1_000_000_000;

/// The point an incremental verify starts from.
#[derive(Debug, Clone)]
pub struct Base {
    pub lsn: Lsn,
    pub since: Since,
}

/// The oldest transaction still running in the snapshot of `client`'s transaction (`xid8`
/// text): row versions with an older `xmin` were all there at the point.
pub async fn snapshot_xmin(client: &Client, side: &'static str) -> Result<String, VerifyError> {
    Ok(client
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await
        .map_err(crate::failure::on(
            side,
            "reading the snapshot's oldest transaction",
        ))?
        .get(0))
}

/// A fingerprint of the mappings writing one target: their sources, columns (name, type,
/// expression), filters and key. A point recorded under other rules does not count.
pub fn fingerprint(maps: &[Arc<TableMap>]) -> String {
    let mut text = String::new();
    for m in maps {
        text.push_str(&format!("{}>{}|", m.source, m.target));
        for c in &m.columns {
            text.push_str(&format!("{}:{}:{}|", c.name, c.sql_type, c.expr));
        }
        if let Some(f) = &m.filter {
            text.push_str(&format!("where {}|", f.expr));
        }
        text.push_str(&format!("key {:?};", m.key));
    }
    // FNV-1a, 64 bits: stable across releases and platforms (the standard hasher is not).
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The latest point at or before `since` at which every target of `groups` matched under the
/// same mappings; refused, naming the next step, when there is none.
pub async fn choose(
    green: &Client,
    slot: &str,
    since: Lsn,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
) -> Result<Base, VerifyError> {
    let targets: Vec<String> = groups.keys().cloned().collect();
    let none = || VerifyError::NoBase {
        since,
        targets: targets.join(", "),
    };
    let exists: bool = green
        .query_one(
            "SELECT to_regclass('shadowsync.verify_points') IS NOT NULL",
            &[],
        )
        .await
        .map_err(crate::failure::on("green", "looking up the verify points"))?
        .get(0);
    if !exists {
        return Err(none());
    }
    let fingerprints: Vec<String> = groups.values().map(|m| fingerprint(m)).collect();
    let row = green
        .query_opt(
            "SELECT lsn, blue_xmin::text, green_xmin::text FROM shadowsync.verify_points p
              WHERE slot = $1 AND lsn <= $2 AND matched
                AND (target, mapping) IN (SELECT * FROM unnest($3::text[], $4::text[]))
              GROUP BY lsn, blue_xmin, green_xmin
             HAVING count(*) = cardinality($3::text[])
              ORDER BY lsn DESC LIMIT 1",
            &[&slot, &since, &targets, &fingerprints],
        )
        .await
        .map_err(crate::failure::on("green", "reading the verify points"))?
        .ok_or_else(none)?;
    Ok(Base {
        lsn: row.get(0),
        since: Since {
            blue_xmin: row.get(1),
            green_xmin: row.get(2),
        },
    })
}

/// Refuses `base` when its transaction ids are too old (or not this side's), counted in the
/// snapshot of `client`'s transaction.
pub async fn check_age(
    client: &Client,
    side: &'static str,
    base: &Base,
    xmin: &str,
) -> Result<(), VerifyError> {
    let age: i64 = client
        .query_one(
            "SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::numeric - $1::text::numeric)::int8",
            &[&xmin],
        )
        .await
        .map_err(crate::failure::on(side, "counting the point's age"))?
        .get(0);
    if !(0..=MAX_AGE).contains(&age) {
        return Err(VerifyError::BaseTooOld {
            lsn: base.lsn,
            side,
            age,
        });
    }
    Ok(())
}

/// What a completed verify records about its point.
pub struct Recorded<'a> {
    pub slot: &'a str,
    pub lsn: Lsn,
    pub blue_xmin: &'a str,
    pub green_xmin: &'a str,
    pub since: Option<Lsn>,
}

/// Records the point for every target compared (`green` outside any transaction); a failure
/// is logged, not returned: the comparison stands, only a later `--since-lsn` cannot use it.
pub async fn record(
    green: &Client,
    point: &Recorded<'_>,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
    mappings: &[MappingDiff],
) {
    if let Err(e) = try_record(green, point, groups, mappings).await {
        tracing::warn!(error = %e, lsn = %point.lsn, "verify: recording the point failed; a later verify --since-lsn cannot start from it");
    }
}

async fn try_record(
    green: &Client,
    point: &Recorded<'_>,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
    mappings: &[MappingDiff],
) -> Result<(), VerifyError> {
    crate::store::migrate(green)
        .await
        .map_err(|e| VerifyError::Record(e.to_string()))?;
    for m in mappings {
        let Some(maps) = groups.get(&m.target) else {
            continue;
        };
        green
            .execute(
                "INSERT INTO shadowsync.verify_points
                        (slot, lsn, target, mapping, blue_xmin, green_xmin, matched, since_lsn)
                 VALUES ($1, $2, $3, $4, $5::text::xid8, $6::text::xid8, $7, $8)
                 ON CONFLICT (slot, lsn, target) DO UPDATE SET mapping = EXCLUDED.mapping,
                        blue_xmin = EXCLUDED.blue_xmin, green_xmin = EXCLUDED.green_xmin,
                        matched = EXCLUDED.matched, since_lsn = EXCLUDED.since_lsn,
                        finished_at = now()",
                &[
                    &point.slot,
                    &point.lsn,
                    &m.target,
                    &fingerprint(maps),
                    &point.blue_xmin,
                    &point.green_xmin,
                    &m.equal(),
                    &point.since,
                ],
            )
            .await
            .map_err(crate::failure::on("green", "recording the verify point"))?;
    }
    tracing::info!(lsn = %point.lsn, targets = mappings.len(), "verify: point recorded");
    Ok(())
}
