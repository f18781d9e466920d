//! Blue's rows staged into green for evaluation there: temporary tables of text (and of the
//! hashes blue computed), filled by streaming blue's `COPY ... TO STDOUT` into green's
//! `COPY ... FROM STDIN`.
//!
//! Invariants: rows pass through in blocks of [`RELAY_BYTES`], never more than one chunk's in
//! memory (read ahead, see [`read`]), a whole table's never (see [`fill`]); a staging
//! table is created in the compare's own transaction, so `TRUNCATE` empties it in place (no new
//! file per chunk) and `ON COMMIT DROP` removes it with the transaction at the latest; range
//! bounds reach blue's `COPY` as settings, never as SQL text.

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::types::ToSql;

use super::plan::Ctx;
use super::sql::{Params, Range, Rel, Side};
use super::{CompareError, db};

/// Bytes of COPY data handed to green at once.
const RELAY_BYTES: usize = 256 * 1024;

/// Creates the temporary staging table `table` (quoted) with columns `defs`.
pub(super) async fn create(
    green: &tokio_postgres::Client,
    table: &str,
    defs: &[String],
    label: &str,
) -> Result<(), CompareError> {
    green
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS pg_temp.{table}; CREATE TEMP TABLE {table} ({}) ON COMMIT DROP",
            defs.join(", ")
        ))
        .await
        .map_err(db(Side::Green, label, "creating a staging table"))
}

/// Blue's `COPY` of its rows in `range` (`blue` is keyed by the source columns the key copies),
/// each as `select` gives it; the range's bounds are set as settings first.
async fn copy_out(
    cx: &Ctx<'_>,
    blue: &Rel,
    select: &str,
    range: &Range,
) -> Result<tokio_postgres::CopyOutStream, CompareError> {
    let label = blue.label.as_str();
    let mut params = Params::settings();
    let cond = cx.shape.conditions(blue, range, &mut params);
    if let Some(set) = params.set_sql() {
        let values: Vec<&(dyn ToSql + Sync)> = params
            .values
            .iter()
            .map(|v| v as &(dyn ToSql + Sync))
            .collect();
        cx.blue.query(&set, &values).await.map_err(db(
            Side::Blue,
            label,
            "setting a range's bounds",
        ))?;
    }
    let sql = format!(
        "COPY (SELECT {select} FROM {} WHERE {cond}) TO STDOUT",
        blue.from
    );
    cx.blue
        .copy_out(&sql)
        .await
        .map_err(db(Side::Blue, label, "reading rows to stage"))
}

/// Blue's rows of `range` in blocks of about [`RELAY_BYTES`]. Text COPY sends one row per
/// message: rows go on in blocks, so that the hand-over to green costs once per block.
fn blocks(
    out: tokio_postgres::CopyOutStream,
    label: &str,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, CompareError>> + use<> {
    let label = label.to_string();
    let state = (Box::pin(out), bytes::BytesMut::new(), false);
    futures_util::stream::unfold(state, move |(mut out, mut block, done)| {
        let label = label.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match out.next().await {
                    Some(Ok(row)) => {
                        block.extend_from_slice(&row);
                        if block.len() >= RELAY_BYTES {
                            return Some((Ok(block.split().freeze()), (out, block, false)));
                        }
                    }
                    Some(Err(e)) => {
                        let e = db(Side::Blue, &label, "reading rows to stage")(e);
                        return Some((Err(e), (out, block, true)));
                    }
                    None if block.is_empty() => return None,
                    None => return Some((Ok(block.split().freeze()), (out, block, true))),
                }
            }
        }
    })
}

/// Replaces the staging table's rows by those of `rows`, streamed.
async fn write(
    cx: &Ctx<'_>,
    label: &str,
    table: &str,
    rows: impl futures_util::Stream<Item = Result<bytes::Bytes, CompareError>>,
) -> Result<u64, CompareError> {
    cx.green
        .batch_execute(&format!("TRUNCATE {table}"))
        .await
        .map_err(db(Side::Green, label, "emptying a staging table"))?;
    let writing = || db(Side::Green, label, "staging blue's rows");
    let sink = cx
        .green
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
        .await
        .map_err(writing())?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(rows);
    while let Some(block) = rows.next().await {
        sink.send(block?).await.map_err(writing())?;
    }
    sink.as_mut().finish().await.map_err(writing())
}

/// Replaces the staging table's rows by blue's rows of `range`, streamed from blue into green
/// (never all in memory: this is how every row of a table is staged).
pub(super) async fn fill(
    cx: &Ctx<'_>,
    blue: &Rel,
    select: &str,
    table: &str,
    range: &Range,
) -> Result<u64, CompareError> {
    let out = copy_out(cx, blue, select, range).await?;
    write(cx, &blue.label, table, blocks(out, &blue.label)).await
}

/// Blue's rows of one chunk, read ahead into memory (a chunk's rows at most), so that blue
/// produces the next chunk while green compares this one.
pub(super) async fn read(
    cx: &Ctx<'_>,
    blue: &Rel,
    select: &str,
    range: &Range,
) -> Result<Vec<bytes::Bytes>, CompareError> {
    let out = copy_out(cx, blue, select, range).await?;
    blocks(out, &blue.label).try_collect().await
}

/// Replaces the staging table's rows by blocks read with [`read`].
pub(super) async fn load(
    cx: &Ctx<'_>,
    label: &str,
    table: &str,
    blocks: Vec<bytes::Bytes>,
) -> Result<u64, CompareError> {
    write(
        cx,
        label,
        table,
        futures_util::stream::iter(blocks.into_iter().map(Ok)),
    )
    .await
}

/// Materializes `rel` (the expected rows over a staging table holding every blue row) as the
/// temporary table `table` of its key values and column hashes, indexed in key order; drops the
/// staging table `staging`. Returns the relation over it, and the rows whose computed key is
/// NULL, taken out of it: no range holds them, and green cannot hold them under its key.
pub(super) async fn materialize(
    cx: &Ctx<'_>,
    rel: &Rel,
    table: &str,
    staging: &str,
) -> Result<(Rel, u64), CompareError> {
    let shape = cx.shape;
    let mut select: Vec<String> = rel
        .keys
        .iter()
        .enumerate()
        .map(|(k, e)| format!("{e} AS k{k}"))
        .collect();
    select.extend((0..shape.names.len()).map(|i| format!("{} AS h{i}", shape.col_hash(rel, i))));
    if select.is_empty() {
        select.push("1 AS none".into());
    }
    let out = Rel {
        side: Side::Green,
        label: rel.label.clone(),
        from: format!("{table} AS t"),
        filter: None,
        keys: (0..rel.keys.len()).map(|k| format!("t.k{k}")).collect(),
        cols: (0..shape.names.len())
            .map(|i| super::sql::Col::Hash(format!("t.h{i}")))
            .collect(),
        partial: None,
    };
    // The index's expressions are the ordering's, over the table's own columns.
    let bare = Rel {
        keys: (0..rel.keys.len()).map(|k| format!("k{k}")).collect(),
        ..out.clone()
    };
    let index: Vec<String> = shape
        .order_exprs(&bare)
        .iter()
        .map(|e| format!("({e})"))
        .collect();
    let index = index.join(", ");
    green_batch(
        cx,
        &rel.label,
        "computing the expected rows",
        &format!(
            "DROP TABLE IF EXISTS pg_temp.{table};
             CREATE TEMP TABLE {table} ON COMMIT DROP AS SELECT {} FROM {};
             CREATE INDEX ON {table} ({index});
             ANALYZE {table};
             DROP TABLE {staging}",
            select.join(", "),
            rel.from
        ),
    )
    .await?;
    let null = (0..rel.keys.len())
        .map(|k| format!("k{k} IS NULL"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let removed = cx
        .green
        .execute(&format!("DELETE FROM {table} WHERE {null}"), &[])
        .await
        .map_err(db(Side::Green, &rel.label, "setting aside NULL keys"))?;
    Ok((out, removed))
}

async fn green_batch(
    cx: &Ctx<'_>,
    label: &str,
    context: &'static str,
    sql: &str,
) -> Result<(), CompareError> {
    cx.green
        .batch_execute(sql)
        .await
        .map_err(db(Side::Green, label, context))
}

/// Drops the temporary tables of the compare (`names`, quoted), if there.
pub(super) async fn drop_all(
    green: &tokio_postgres::Client,
    names: &[String],
    label: &str,
) -> Result<(), CompareError> {
    if names.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = names.iter().map(|n| format!("pg_temp.{n}")).collect();
    green
        .batch_execute(&format!("DROP TABLE IF EXISTS {}", list.join(", ")))
        .await
        .map_err(db(Side::Green, label, "dropping the staging tables"))
}
