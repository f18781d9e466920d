//! Narrowing a range green rejects (a value that does not fit, a constraint) down to the row
//! and column, so the copy's error names them, as the stream's poison rows do.
//!
//! How: the range is copied again from blue (same snapshot, so the same rows) into a staging
//! table of text columns numbered in arrival order; the range's write is then bisected over
//! row numbers under savepoints (log2(n) statements) until one row fails given the rows before
//! it; that row's value of each column it needs is then tried alone (cast and assignment to
//! green's column type) to find the column.
//!
//! Invariants: all of it runs in one green transaction that is always rolled back: nothing is
//! written. Rows stream from blue into green, never held in memory here. Only key values
//! (green's primary key, as blue prints its source columns) are read back, never other row
//! values. When no single row is to blame (or narrowing itself fails), the original error is
//! returned unchanged.

use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tracing::warn;

use super::copy::{Table, Worker, insert_from_staging, relay, staging_source};
use super::plan::{self, Job};
use super::{SnapshotError, green_err};
use crate::failure::DbFailure;

/// The staging table the range is copied into again.
const STAGING: &str = "\"~narrow\"";

/// The row green rejects, as the error names it.
struct Found {
    key: String,
    column: Option<String>,
    failure: DbFailure,
}

/// The error to report for a range green rejected with `original`: the row, key and column
/// when one row is to blame, else `original`.
pub(super) async fn narrow(
    w: &mut Worker,
    t: &Table,
    job: &Job,
    original: SnapshotError,
) -> SnapshotError {
    match find(w, t, job).await {
        Ok(Some(found)) => SnapshotError::Rejected(Box::new(super::Rejected {
            source_table: t.map.source.to_string(),
            target: t.map.label.clone(),
            key: found.key,
            column: found.column.map(|c| format!(", {c}")).unwrap_or_default(),
            relation: t.parts[job.part].to_string(),
            range: job.range_no,
            hint: hint_for(&found.failure),
            failure: found.failure,
        })),
        Ok(None) => original,
        Err(e) => {
            warn!(table = %t.map.source, range = job.range_no, error = %e, "could not narrow a rejected range of the initial copy down to its row");
            original
        }
    }
}

fn hint_for(failure: &DbFailure) -> &'static str {
    match failure {
        f if f.is_data_exception() => {
            "; a blue value does not fit green's column: align green's column type (ALTER TABLE ... ALTER COLUMN ... TYPE ...) or map the column with a transform rule"
        }
        f if f.is_integrity_violation() => {
            "; green's constraint rejects the row: fix the row on blue or the constraint on green"
        }
        _ => "",
    }
}

fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| matches!(crate::failure::class_of(d.code()), "22" | "23"))
}

async fn find(w: &mut Worker, t: &Table, job: &Job) -> Result<Option<Found>, SnapshotError> {
    let Worker { blue, green, .. } = w;
    let tx = green
        .transaction()
        .await
        .map_err(green_err("narrowing a rejected range"))?;
    let defs: Vec<String> = (0..t.map.source_columns.len())
        .map(|i| format!(", c{i} text"))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {STAGING} (n bigint GENERATED ALWAYS AS IDENTITY, tid text{}) ON COMMIT DROP",
        defs.concat()
    ))
    .await
    .map_err(green_err("creating the narrowing table"))?;
    let names: Vec<String> = (0..t.map.source_columns.len())
        .map(|i| format!(", c{i}"))
        .collect();
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {STAGING} (tid{}) FROM STDIN",
            names.concat()
        ))
        .await
        .map_err(green_err("narrowing a rejected range"))?;
    // Text, whatever the range was copied in: staging columns are text.
    let columns: Vec<String> = ["ctid::text".to_string()]
        .into_iter()
        .chain(t.columns())
        .collect();
    let select = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT",
        columns.join(", "),
        t.parts[job.part].quoted(),
        plan::conditions(job, t.row_filter.as_deref())
    );
    let rows = relay(blue, &select, sink, (t, job), |_, _| {}).await? as i64;
    tx.batch_execute(&format!("CREATE INDEX ON {STAGING} (n)"))
        .await
        .map_err(green_err("narrowing a rejected range"))?;
    let Some((row, failure)) = bisect(&tx, t, rows).await? else {
        return Ok(None);
    };
    let key = key_of(&tx, t, row, &t.parts[job.part].to_string()).await?;
    let column = if failure.is_data_exception() {
        column_of(&tx, t, row, failure.code.as_ref()).await?
    } else {
        // Constraints (class 23) name themselves (and NOT NULL its column) in the message.
        None
    };
    Ok(Some(Found {
        key,
        column,
        failure,
    }))
}

/// Runs `setup` (statements without parameters) then `sql` under a savepoint: `Ok(None)` if
/// they succeed (kept when `keep`), `Ok(Some(e))` if green rejects the data (rolled back),
/// `Err` for any other failure.
async fn attempt(
    tx: &Transaction<'_>,
    setup: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    keep: bool,
) -> Result<Option<tokio_postgres::Error>, SnapshotError> {
    let context = "narrowing a rejected range";
    tx.batch_execute(&format!("SAVEPOINT shadowsync_narrow; {setup}"))
        .await
        .map_err(green_err(context))?;
    match tx.execute(sql, params).await {
        Ok(_) => {
            let end = if keep {
                "RELEASE SAVEPOINT shadowsync_narrow"
            } else {
                "ROLLBACK TO SAVEPOINT shadowsync_narrow"
            };
            tx.batch_execute(end).await.map_err(green_err(context))?;
            Ok(None)
        }
        Err(e) if is_data_error(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT shadowsync_narrow")
                .await
                .map_err(green_err(context))?;
            Ok(Some(e))
        }
        Err(e) => Err(green_err(context)(e)),
    }
}

/// The first row (by number) that green rejects once the rows before it are written, with
/// green's refusal; `None` when every row goes in (the failure needed something else).
async fn bisect(
    tx: &Transaction<'_>,
    t: &Table,
    rows: i64,
) -> Result<Option<(i64, DbFailure)>, SnapshotError> {
    let sql = insert_from_staging(&t.map, STAGING, Some("s.n BETWEEN $1 AND $2"));
    let (mut lo, mut hi) = (1i64, rows);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match attempt(tx, "", &sql, &[&lo, &mid], true).await? {
            Some(e) if lo == mid => return Ok(Some((lo, DbFailure::from_pg(&e)))),
            Some(_) => hi = mid,
            // The first half goes in: keep it (later rows may collide with it), search the rest.
            None => lo = mid + 1,
        }
    }
    Ok(None)
}

/// `(id)=(5)`: the key columns and values, as PostgreSQL writes keys in its messages (and the
/// stream's poison errors do); a table without a key is located by the row's ctid on blue.
async fn key_of(
    tx: &Transaction<'_>,
    t: &Table,
    row: i64,
    relation: &str,
) -> Result<String, SnapshotError> {
    let map = &t.map;
    if map.row_key.is_empty() {
        let tid: Option<String> = tx
            .query_one(&format!("SELECT tid FROM {STAGING} WHERE n = $1"), &[&row])
            .await
            .map_err(green_err("reading the rejected row's location"))?
            .get(0);
        return Ok(format!(
            "(none: green's table has no primary key; the row is at ctid {} of blue table {relation})",
            tid.unwrap_or_default()
        ));
    }
    let cols: Vec<String> = map.row_key.iter().map(|i| format!("c{i}")).collect();
    let r = tx
        .query_one(
            &format!("SELECT {} FROM {STAGING} WHERE n = $1", cols.join(", ")),
            &[&row],
        )
        .await
        .map_err(green_err("reading the rejected row's key"))?;
    let names: Vec<&str> = map
        .row_key
        .iter()
        .map(|&i| map.source_columns[i].name.as_str())
        .collect();
    let values: Vec<String> = (0..cols.len())
        .map(|i| {
            r.get::<_, Option<String>>(i)
                .unwrap_or_else(|| "NULL".into())
        })
        .collect();
    Ok(format!("({})=({})", names.join(", "), values.join(", ")))
}

/// The column of row `row` whose value green rejects with SQLSTATE `code`: a source column
/// whose blue text green's type does not accept, the rule's filter, or a target column whose
/// value does not fit (assigned to a column of green's type, as the INSERT would).
async fn column_of(
    tx: &Transaction<'_>,
    t: &Table,
    row: i64,
    code: Option<&crate::failure::SqlState>,
) -> Result<Option<String>, SnapshotError> {
    let map = &t.map;
    let same = |e: &tokio_postgres::Error| e.as_db_error().map(|d| d.code()) == code;
    let mut used: Vec<usize> = map.columns.iter().flat_map(|c| c.inputs.clone()).collect();
    used.extend(map.filter.iter().flat_map(|f| f.inputs.clone()));
    used.sort_unstable();
    used.dedup();
    for &i in &used {
        let c = &map.source_columns[i];
        let sql = format!(
            "SELECT s.c{i}::{} FROM {STAGING} AS s WHERE s.n = $1",
            c.sql_type
        );
        if attempt(tx, "", &sql, &[&row], false)
            .await?
            .is_some_and(|e| same(&e))
        {
            return Ok(Some(format!(
                "column {} (blue's text is not a valid {})",
                c.name, c.sql_type
            )));
        }
    }
    let source = |inputs: &[usize]| {
        format!(
            "(SELECT {} FROM {STAGING} AS s WHERE s.n = $1) AS src",
            staging_source(map, inputs)
        )
    };
    if let Some(f) = &map.filter {
        let sql = format!("SELECT ({}) FROM {}", f.expr, source(&f.inputs));
        if attempt(tx, "", &sql, &[&row], false)
            .await?
            .is_some_and(|e| same(&e))
        {
            return Ok(Some("the rule's filter".into()));
        }
    }
    for (j, c) in map.columns.iter().enumerate() {
        // A column of green's exact type (modifier included) and no constraint: the INSERT's
        // assignment applies varchar(n), numeric(p,s), domains, ... as the target would.
        let probe = format!("\"~probe_{j}\"");
        let setup = format!(
            "CREATE TEMP TABLE {probe} (v {}) ON COMMIT DROP",
            c.sql_type
        );
        let sql = format!(
            "INSERT INTO {probe} (v) SELECT CAST(({}) AS {}) FROM {}",
            c.expr,
            c.base_type,
            source(&c.inputs)
        );
        if attempt(tx, &setup, &sql, &[&row], false)
            .await?
            .is_some_and(|e| same(&e))
        {
            return Ok(Some(format!("column {}", c.name)));
        }
    }
    Ok(None)
}
