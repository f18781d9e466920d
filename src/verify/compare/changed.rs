//! The incremental comparison (`verify --since-lsn`): after an earlier point at which the
//! mappings matched, (a) the keys are compared as sets (the engine run over the key columns
//! alone: missed inserts and deletes, rows added or removed on green), then (b) in full only
//! the rows whose version on blue or on green was written since that point (missed updates,
//! edits on green).
//!
//! Why that is enough: a row version whose `xmin` is older than the oldest transaction still
//! running in the point's snapshot was written by a transaction that had ended by then, so it
//! is the version the point saw (an aborted one is never seen). A key whose versions are that
//! old on both sides therefore holds what it held at the point, where it matched, and, the
//! mapping being the same and reading no other table, still matches. Rows written since are
//! picked with `age(xmin)`, 32-bit arithmetic valid while the point is under 2^31 transactions
//! old (`verify` refuses points over 10^9); including too many (a frozen ancient version whose
//! age wrapped) only costs time, never a miss.
//!
//! Invariants: differences of (b) in rows missing or extra are not counted (the sets of (a)
//! count them); at most [`MAX_CHUNKS`] chunks of keys written since are held in memory, past
//! that the mapping is compared in full (which is then about as fast); mappings reading other
//! tables (lookups), keyless ones and keys computed by the rule are compared in full.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;

use super::keyed::Keyed;
use super::plan::{self, Ctx, Source};
use super::sql::{Rel, Shape, Side, array_literal};
use super::{CompareError, MappingDiff, Options, Sides, Since, Tally, db};
use crate::transform::TableMap;

/// Chunks of keys written since the point held at most; past it the mapping is compared in full.
const MAX_CHUNKS: u64 = 20;

/// Why the mappings of a target cannot be compared incrementally, if so.
pub(super) fn unsupported(shape: &Shape, maps: &[Arc<TableMap>]) -> Option<String> {
    if shape.key.is_empty() {
        return Some("keyless target (compared as a multiset)".into());
    }
    if let Some(m) = maps.iter().find(|m| {
        m.key
            .iter()
            .any(|&k| plan::copy_of(m, &m.columns[k]).is_none())
    }) {
        return Some(format!(
            "the key of {}'s rows is computed by the rule",
            m.source
        ));
    }
    if let Some(m) = maps.iter().find(|m| !m.reads.is_empty()) {
        return Some(format!(
            "the rule of {} reads other tables, whose rows may have changed",
            m.source
        ));
    }
    None
}

/// (a) then (b) (see the module's doc), into `diff`; falls back to the full comparison when
/// the keys cannot be read on blue or too many rows were written since.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    sides: &Sides<'_>,
    shape: &Shape,
    mapped: &[plan::Mapped<'_>],
    unique: bool,
    opts: &Options,
    since: &Since,
    diff: &mut MappingDiff,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), CompareError> {
    let first = mapped[0].map;
    let cx = Ctx {
        blue: sides.blue,
        green: sides.green,
        shape,
        statements: Default::default(),
    };
    let target = plan::target(shape, first);
    let n = opts.chunk_rows.max(1);
    let written = {
        let (sources, temp) = super::sources(&cx, mapped).await?;
        let written = if sources.iter().any(|s| matches!(s, Source::Green(..))) {
            Err("the key is computed by the rule".to_string())
        } else {
            written_since(&cx, &sources, &target, since, n * MAX_CHUNKS)
                .await?
                .ok_or_else(|| format!("over {} rows written since the point", n * MAX_CHUNKS))
        };
        // The key pass stages into tables of the same names.
        super::stage::drop_all(sides.green, &temp, &first.label).await?;
        written
    };
    let keys = match written {
        Ok(keys) => keys,
        Err(reason) => {
            diff.incremental = false;
            diff.in_full = Some(reason);
            return super::full(sides, shape, mapped, unique, opts, diff, progress).await;
        }
    };
    let (key_shape, key_mapped) = plan::keys_only(shape, mapped);
    super::full(sides, &key_shape, &key_mapped, unique, opts, diff, progress).await?;
    let (sources, temp) = super::sources(&cx, mapped).await?;
    diff.changed_rows = keys.len() as u64;
    let keys = in_key_order(&cx, &target, keys).await?;
    let mut rows = MappingDiff::default();
    for batch in keys.chunks(n as usize) {
        let mut only = shape.clone();
        only.only = Some(
            (0..shape.key.len())
                .map(|k| array_literal(batch.iter().map(|key| key[k].as_str())))
                .collect(),
        );
        let bcx = Ctx {
            blue: sides.blue,
            green: sides.green,
            shape: &only,
            statements: Default::default(),
        };
        let mut tally = Tally {
            diff: &mut rows,
            max: opts.max_keys,
        };
        Keyed::new(&bcx, &sources, &target, unique)
            .run(n, &mut tally, &|_| {})
            .await?;
    }
    super::stage::drop_all(sides.green, &temp, &first.label).await?;
    diff.chunks += rows.chunks;
    diff.differing_count += rows.differing_count;
    diff.differing.extend(rows.differing);
    diff.differing.truncate(opts.max_keys);
    Ok(())
}

/// The keys of rows written since the point on blue (every source) or on green, each once;
/// `None` past `limit` keys.
async fn written_since(
    cx: &Ctx<'_>,
    sources: &[Source],
    target: &Rel,
    since: &Since,
    limit: u64,
) -> Result<Option<HashSet<Vec<String>>>, CompareError> {
    let blue_rels: Vec<&Rel> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Blue(r) => Some(r),
            Source::Staged(s) => Some(&s.blue),
            Source::Green(..) => None,
        })
        .collect();
    let blue = async {
        let mut keys = HashSet::new();
        for rel in blue_rels {
            if !collect(cx, rel, &since.blue_xmin, &mut keys, limit).await? {
                return Ok(None);
            }
        }
        Ok::<_, CompareError>(Some(keys))
    };
    let green = async {
        let mut keys = HashSet::new();
        let done = collect(cx, target, &since.green_xmin, &mut keys, limit).await?;
        Ok::<_, CompareError>(done.then_some(keys))
    };
    let (blue, green) = futures_util::future::try_join(blue, green).await?;
    let (Some(mut keys), Some(green)) = (blue, green) else {
        return Ok(None);
    };
    keys.extend(green);
    Ok((keys.len() as u64 <= limit).then_some(keys))
}

/// Adds to `keys` those of `rel`'s rows whose version was written by a transaction at or after
/// `xmin` (an `xid8`); false when past `limit` keys.
async fn collect(
    cx: &Ctx<'_>,
    rel: &Rel,
    xmin: &str,
    keys: &mut HashSet<Vec<String>>,
    limit: u64,
) -> Result<bool, CompareError> {
    let client = match rel.side {
        Side::Blue => cx.blue,
        Side::Green => cx.green,
    };
    // `age()` counts from one transaction id for the whole transaction, so both sides of the
    // comparison are counted from the same one.
    let sql = format!(
        "SELECT {} FROM {} WHERE {} AND age(t.xmin) BETWEEN 0 AND age(($1::text)::xid8::xid)",
        cx.shape.key_texts(rel),
        rel.from,
        rel.filter.as_deref().unwrap_or("true"),
    );
    let context = "reading the keys of rows written since the point";
    let rows = client
        .query_raw(sql.as_str(), [xmin])
        .await
        .map_err(db(rel.side, &rel.label, context))?;
    futures_util::pin_mut!(rows);
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(db(rel.side, &rel.label, context))?
    {
        keys.insert(
            (0..row.len())
                .map(|k| row.get::<_, Option<String>>(k).unwrap_or_default())
                .collect(),
        );
        if keys.len() as u64 > limit {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `keys` in the key order ranges use (sorted by green), so that batches are ranges of the
/// index and keys are reported in order.
async fn in_key_order(
    cx: &Ctx<'_>,
    target: &Rel,
    keys: HashSet<Vec<String>>,
) -> Result<Vec<Vec<String>>, CompareError> {
    let mut keys: Vec<Vec<String>> = keys.into_iter().collect();
    if keys.len() < 2 {
        return Ok(keys);
    }
    let columns: Vec<Vec<&str>> = (0..cx.shape.key.len())
        .map(|k| keys.iter().map(|key| key[k].as_str()).collect())
        .collect();
    let values: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    let order: Vec<i64> = cx
        .green
        .query(&cx.shape.key_order(), &values)
        .await
        .map_err(db(
            Side::Green,
            &target.label,
            "ordering the keys written since",
        ))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut slots: Vec<Option<Vec<String>>> = keys.drain(..).map(Some).collect();
    Ok(order
        .into_iter()
        .filter_map(|n| slots.get_mut((n - 1) as usize)?.take())
        .collect())
}
