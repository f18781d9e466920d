//! Comparison of a target without a key: the tables as multisets of rows. One checksum per
//! side over the whole table; when they differ, the count of each row hash on each side.
//!
//! Invariants: no key means no range, so a difference is found by streaming `(row hash, count)`
//! in hash order from blue and from green and merging the two streams (memory stays constant,
//! the servers sort); only row hashes are ever reported, never values.

use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::Row;

use super::keyed::{Sum, run_all};
use super::plan::{Ctx, Source};
use super::sql::{Params, Range, Rel, Side};
use super::{CompareError, Tally, db};

pub(super) async fn run(
    cx: &Ctx<'_>,
    sources: &[Source],
    target: &Rel,
    diff: &mut Tally<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), CompareError> {
    let expected: Vec<&Rel> = sources
        .iter()
        .map(|s| match s {
            Source::Blue(r) | Source::Green(r, _) => r,
            Source::Staged(s) => &s.expected,
        })
        .collect();
    let jobs: Vec<_> = expected
        .iter()
        .chain([&target])
        .map(|rel| {
            let mut p = Params::numbered();
            let sql = cx.shape.checksum(rel, &Range::default(), &mut p);
            (*rel, sql, p.values)
        })
        .collect();
    let rows = run_all(cx, &jobs, "summing the table's row hashes").await?;
    let sums: Vec<Sum> = rows.iter().map(|r| Sum::from_row(&r[0])).collect();
    let (actual, expected_sums) = sums.split_last().expect("the target is summed");
    let want = expected_sums.iter().fold(Sum::default(), |a, b| Sum {
        rows: a.rows + b.rows,
        hash: a.hash.wrapping_add(b.hash),
    });
    diff.diff.rows_blue = want.rows;
    diff.diff.rows_green = actual.rows;
    diff.diff.chunks = 1;
    progress(want.rows.max(actual.rows));
    if want == *actual {
        return Ok(());
    }
    merge(cx, &expected, target, diff).await
}

/// `SELECT h, sum(c)` over the signed row hashes of `parts`, in hash order.
fn counts(cx: &Ctx<'_>, parts: &[(&Rel, i64)], only_differences: bool) -> String {
    let union: Vec<String> = parts
        .iter()
        .map(|(rel, sign)| cx.shape.signed_hashes(rel, *sign))
        .collect();
    let having = if only_differences {
        " HAVING sum(c) <> 0"
    } else {
        ""
    };
    format!(
        "SELECT h, sum(c)::int8 FROM ({}) AS s GROUP BY h{having} ORDER BY h",
        union.join(" UNION ALL ")
    )
}

/// Row hashes counted on blue (what blue hashes itself) and in green (what green computes,
/// minus green's rows), merged in hash order: a positive balance is rows missing in green, a
/// negative one rows green has in excess.
async fn merge(
    cx: &Ctx<'_>,
    expected: &[&Rel],
    target: &Rel,
    diff: &mut Tally<'_>,
) -> Result<(), CompareError> {
    let blue_parts: Vec<(&Rel, i64)> = expected
        .iter()
        .filter(|r| r.side == Side::Blue)
        .map(|r| (*r, 1))
        .collect();
    let mut green_parts: Vec<(&Rel, i64)> = expected
        .iter()
        .filter(|r| r.side == Side::Green)
        .map(|r| (*r, 1))
        .collect();
    green_parts.push((target, -1));
    let label = target.label.as_str();
    let green_sql = counts(cx, &green_parts, blue_parts.is_empty());
    let reading = |side| db(side, label, "counting the row hashes");
    let green = cx
        .green
        .query_raw(&green_sql, std::iter::empty::<String>())
        .await
        .map_err(reading(Side::Green))?;
    let mut green = green.map_err(reading(Side::Green)).boxed();
    let mut blue = if blue_parts.is_empty() {
        futures_util::stream::empty().boxed()
    } else {
        let blue_sql = counts(cx, &blue_parts, false);
        cx.blue
            .query_raw(&blue_sql, std::iter::empty::<String>())
            .await
            .map_err(reading(Side::Blue))?
            .map_err(reading(Side::Blue))
            .boxed()
    };
    let pair = |r: Row| -> (i64, i64) { (r.get(0), r.get(1)) };
    let (mut b, mut g) = (
        blue.try_next().await?.map(pair),
        green.try_next().await?.map(pair),
    );
    loop {
        let (h, balance) = match (b, g) {
            (None, None) => return Ok(()),
            (Some((bh, bc)), Some((gh, gc))) if bh == gh => {
                b = blue.try_next().await?.map(pair);
                g = green.try_next().await?.map(pair);
                (bh, bc + gc)
            }
            (Some((bh, bc)), Some((gh, _))) if bh < gh => {
                b = blue.try_next().await?.map(pair);
                (bh, bc)
            }
            (Some((bh, bc)), None) => {
                b = blue.try_next().await?.map(pair);
                (bh, bc)
            }
            (_, Some((gh, gc))) => {
                g = green.try_next().await?.map(pair);
                (gh, gc)
            }
        };
        let rows = balance.unsigned_abs();
        let what = if rows > 1 {
            format!("(row hash {:016x}) x{rows}", h as u64)
        } else {
            format!("(row hash {:016x})", h as u64)
        };
        if balance > 0 {
            diff.missing_rows(what, rows);
        } else if balance < 0 {
            diff.extra_rows(what, rows);
        }
    }
}
