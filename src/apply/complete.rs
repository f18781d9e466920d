//! Completing partial rows: when an update leaves a TOASTed column unchanged, pgoutput sends no
//! value for it. A rule may still need the real value: a row moving into green through its
//! filter must be written whole, and a target column mixing changed and unchanged inputs must
//! be recomputed. Those rows are read from blue by key, one query per table and flush.
//!
//! Invariant: the values read are blue's current ones, possibly newer than the stream position;
//! every later change to the row is still in the stream, so green converges. A row no longer on
//! blue is dropped from the batch: its delete is in the stream too.

use std::collections::HashMap;

use bytes::Bytes;
use tokio_postgres::Client;

use super::ApplyError;
use super::batch::{Key, KeyedOp, TableOps};
use crate::decode::{Datum, Tuple};
use crate::failure::DbFailure;
use crate::transform::{TableMap, quote_ident};

/// Fills in unchanged-TOAST values that `tables`' rules need, from `blue`.
pub async fn complete_rows(
    blue: Option<&Client>,
    tables: &mut [TableOps],
) -> Result<(), ApplyError> {
    for ops in tables.iter_mut() {
        if !ops.map.is_keyed() {
            // Keyless tables have REPLICA IDENTITY FULL: the old image filled them already.
            continue;
        }
        // One pass: the keys that need their row, and the columns to read (only the missing
        // values and the key: columns blue has since dropped and nobody needs cannot stop the
        // stream).
        let mut needing: Vec<Key> = Vec::new();
        let mut wanted: Vec<usize> = ops.map.row_key.clone();
        for (k, p) in &ops.ops {
            if let KeyedOp::Update(t) = &p.op
                && needs_full_row(&ops.map, t)
            {
                needing.push(k.clone());
                wanted.extend(
                    t.0.iter()
                        .enumerate()
                        .filter(|(_, d)| matches!(d, Datum::UnchangedToast))
                        .map(|(i, _)| i),
                );
            }
        }
        if needing.is_empty() {
            continue;
        }
        wanted.sort_unstable();
        wanted.dedup();
        let Some(blue) = blue else {
            return Err(ApplyError::NeedsBlue {
                table: ops.map.label.clone(),
            });
        };
        let rows = fetch(blue, &ops.map, &needing, &wanted).await?;
        for key in needing {
            match rows.get(&key) {
                Some(full) => {
                    if let Some(p) = ops.ops.get_mut(&key)
                        && let KeyedOp::Update(t) = &mut p.op
                    {
                        for (d, value) in t.0.iter_mut().zip(full) {
                            if matches!(d, Datum::UnchangedToast) {
                                *d = match value {
                                    Some(v) => Datum::Text(v.clone()),
                                    None => Datum::Null,
                                };
                            }
                        }
                        p.op = KeyedOp::Upsert(std::mem::take(t));
                    }
                }
                None => {
                    ops.ops.remove(&key);
                }
            }
        }
    }
    Ok(())
}

/// Whether the rule needs values the partial image lacks: any filter (the row may be moving
/// in), or a target column reading both changed and unchanged columns.
fn needs_full_row(map: &TableMap, t: &Tuple) -> bool {
    let unchanged = |i: usize| matches!(t.0.get(i), Some(Datum::UnchangedToast));
    map.filter.is_some()
        || map.columns.iter().any(|c| {
            let u = c.inputs.iter().filter(|&&i| unchanged(i)).count();
            u > 0 && u < c.inputs.len()
        })
}

/// Current rows of the source table for `keys`, every column as text (output functions, so the
/// text is what pgoutput would have sent), keyed like the batch.
async fn fetch(
    blue: &Client,
    map: &TableMap,
    keys: &[Key],
    wanted: &[usize],
) -> Result<HashMap<Key, Vec<Option<Bytes>>>, ApplyError> {
    let cols = wanted
        .iter()
        .map(|&i| {
            let n = quote_ident(&map.source_columns[i].name);
            format!("CASE WHEN s.{n} IS NULL THEN NULL ELSE format('%s', s.{n}) END")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let key_cols = map
        .row_key
        .iter()
        .map(|&i| format!("s.{}", quote_ident(&map.source_columns[i].name)))
        .collect::<Vec<_>>()
        .join(", ");
    let casts = map
        .row_key
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("u.c{n}::{}", map.source_columns[i].blue_type))
        .collect::<Vec<_>>()
        .join(", ");
    let params = (1..=map.row_key.len())
        .map(|n| format!("${n}::text[]"))
        .collect::<Vec<_>>()
        .join(", ");
    let aliases = (0..map.row_key.len())
        .map(|n| format!("c{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {cols} FROM {} AS s WHERE ({key_cols}) IN (SELECT {casts} FROM unnest({params}) AS u({aliases}))",
        map.source.quoted()
    );
    let arrays: Vec<Vec<Option<&str>>> = (0..map.row_key.len())
        .map(|n| {
            keys.iter()
                .map(|k| k[n].as_ref().and_then(|b| std::str::from_utf8(b).ok()))
                .collect()
        })
        .collect();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = arrays
        .iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = blue.query(&sql, &params).await.map_err(|source| {
        let failure = DbFailure::from_pg(&source);
        if failure.is(&crate::failure::SqlState::UNDEFINED_COLUMN)
            || failure.is(&crate::failure::SqlState::UNDEFINED_TABLE)
        {
            ApplyError::ToastGone {
                table: map.source.to_string(),
                failure,
            }
        } else {
            ApplyError::Blue {
                table: map.source.to_string(),
                failure,
            }
        }
    })?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let mut values: Vec<Option<Bytes>> = vec![None; map.source_columns.len()];
        for (n, &i) in wanted.iter().enumerate() {
            values[i] = row.get::<_, Option<String>>(n).map(Bytes::from);
        }
        let key: Key = map.row_key.iter().map(|&i| values[i].clone()).collect();
        out.insert(key, values);
    }
    Ok(out)
}
