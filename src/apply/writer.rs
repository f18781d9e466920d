//! The writer: one green connection, its prepared statements (planned again as tables grow),
//! and the pipelined write of a batch with its progress row.
//!
//! Invariants: a batch is BEGIN, a few statements per table, the progress row and COMMIT in one
//! round trip; a failed statement aborts the transaction, so COMMIT turns into a rollback and
//! the error, naming the table and blue LSN, reaches the caller; values travel only as
//! parameters or COPY data.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::{Client, Statement};
use tracing::debug;

use super::batch::{self, KeyedOp, KeylessRun, RowMove, TableOps};
use crate::config::Dsn;
use crate::decode::{Datum, Tuple};
use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::statement::{self as sql, TextArray, WordArray, conflict, keyless};
use crate::transform::TableMap;

use super::error::{ApplyError, NEW_KEYS, green_err, statement_error};

/// Rows written by one `write`, per target table and operation.
pub type WriteCounts = Vec<(String, [u64; 3])>;

/// What one `write` did.
#[derive(Debug, Default)]
pub struct Written {
    pub rows: WriteCounts,
    /// Conflicts met (and recorded in green, in the same transaction).
    pub conflicts: Vec<crate::conflicts::Seen>,
}

/// Row changes written to a table before its statements are planned again (then twice as many,
/// and so on).
const REPLAN_FIRST: u64 = 10_000;

/// One table's prepared statements, planned again as the table grows.
///
/// Why: the statements use generic plans (see `Applier::connect`), made when first run. A plan
/// made while green's table was nearly empty (at the start of a sync) joins the batch to it by
/// hash over a sequential scan; once the table holds millions of rows, that plan scans all of
/// them for every batch (measured: 2 ms per delete of 13 rows at 15k rows, growing with the
/// table). Planning again after the table has grown geometrically costs a few prepares.
#[derive(Default)]
struct TableStatements {
    by_sql: HashMap<String, Statement>,
    /// Row changes written since these were planned.
    written: u64,
    /// Plan again once `written` reaches this.
    replan_at: u64,
}

/// Green connection with its prepared statements and transaction state.
pub struct Applier {
    pub(super) client: Client,
    connection: tokio::task::JoinHandle<()>,
    /// Prepared statements per target table (label).
    statements: HashMap<String, TableStatements>,
    progress_statement: Statement,
    in_txn: bool,
    slot: String,
    /// Whether `session_replication_role = replica` is in effect.
    pub replica_role: bool,
    /// Set while bisecting a rejected batch: a failed write leaves the transaction to the
    /// caller's savepoint instead of rolling it back.
    pub(super) keep_failed_transaction: bool,
    /// Whether keys blue inserted (a key's first change in the batch is an insert) are written
    /// with a plain INSERT ([`sql::insert_new`]). The stage turns it off while replaying change
    /// by change, and bisection turns it off: there a unique violation must mean what it says.
    pub insert_new_keys: bool,
    /// Tables never written with the plain insert ([`Recovery::upsert_only`]).
    pub upsert_only: BTreeSet<String>,
}

type Pending<'a> = Pin<
    Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a>,
>;

/// The parameters of one planned statement.
type Params<'t> = Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send + 't>>;

/// What one planned statement takes: parameters, or the rows of a `COPY FROM STDIN`.
enum Input<'t> {
    Params(Params<'t>),
    Copy(bytes::Bytes),
}

impl<'t> From<Params<'t>> for Input<'t> {
    fn from(params: Params<'t>) -> Self {
        Input::Params(params)
    }
}

/// Runs a prepared `COPY FROM STDIN` with `data`, in the connection's pipeline: the request is
/// queued when first polled, and later requests go after its data.
async fn copy_in(
    client: &Client,
    statement: &Statement,
    data: bytes::Bytes,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(statement).await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await?;
    Ok(Vec::new())
}

/// The rows of `pending` (full images) in COPY's text format.
fn copy_data(pending: &[&batch::Pending], sources: &[usize]) -> bytes::Bytes {
    let size: usize = pending
        .iter()
        .map(|p| p.op.tuple().payload_bytes() + sources.len() + 8)
        .sum();
    let mut buf = bytes::BytesMut::with_capacity(size);
    for p in pending {
        sql::copy_row(&mut buf, p.op.tuple(), sources);
    }
    buf.freeze()
}

/// Where a pipelined request came from, to name it in errors.
#[derive(Clone)]
struct Origin {
    what: &'static str,
    table: String,
    lsn: Lsn,
}

impl Applier {
    /// Connects, creates the `shadowsync` schema when missing and prepares the progress write.
    pub async fn connect(dsn: &Dsn, slot: &str) -> Result<Applier, ApplyError> {
        let (client, connection) =
            dsn.connect("shadowsync-apply")
                .await
                .map_err(|source| ApplyError::Connect {
                    dsn: dsn.to_string(),
                    failure: DbFailure::from_pg(&source),
                })?;
        // The apply statements run thousands of times with arrays of varying length: a generic
        // plan (index lookups per row) is right for all of them, and re-planning each execution
        // costs more than executing a small one.
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await
            .map_err(green_err("setting plan_cache_mode"))?;
        let replica_role = crate::session_role::set_replica(&client)
            .await
            .map_err(green_err("setting session_replication_role"))?;
        // One apply session per slot on green, for as long as this connection lives: a killed
        // predecessor's transaction may still be open (blocked on a lock), and must end (commit
        // or not) before this session reads the progress row and writes after it.
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('shadowsync.apply:' || $1, 0))",
                &[&slot],
            )
            .await
            .map_err(green_err("taking the per-slot session lock"))?
            .get(0);
        if !locked {
            return Err(ApplyError::SessionBusy {
                slot: slot.to_string(),
            });
        }
        crate::store::migrate(&client).await?;
        let progress_statement = client
            .prepare(crate::progress::WRITE_SQL)
            .await
            .map_err(green_err("preparing the progress write"))?;
        Ok(Applier {
            client,
            connection,
            statements: HashMap::new(),
            progress_statement,
            in_txn: false,
            slot: slot.to_string(),
            replica_role,
            keep_failed_transaction: false,
            insert_new_keys: true,
            upsert_only: BTreeSet::new(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn in_transaction(&self) -> bool {
        self.in_txn
    }

    /// The prepared statement for `sql`, a statement writing `table`.
    async fn prepared(
        &mut self,
        table: &str,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        self.prepared_typed(table, sql, &[]).await
    }

    /// [`Self::prepared`] with declared parameter types (for statements leaving some unread).
    async fn prepared_typed(
        &mut self,
        table: &str,
        sql: &str,
        types: &[tokio_postgres::types::Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(table).and_then(|t| t.by_sql.get(sql)) {
            return Ok(s.clone());
        }
        let s = self.client.prepare_typed(sql, types).await?;
        let entry = self
            .statements
            .entry(table.to_string())
            .or_insert_with(|| TableStatements {
                replan_at: REPLAN_FIRST,
                ..Default::default()
            });
        entry.by_sql.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Counts row changes written to `table`; past its threshold, its statements are dropped
    /// (closed on green) and planned again at their next use ([`TableStatements`]).
    fn note_written(&mut self, table: &str, changes: u64) {
        if let Some(t) = self.statements.get_mut(table) {
            t.written += changes;
            if t.written >= t.replan_at {
                debug!(
                    table,
                    changes = t.written,
                    "planning the table's statements again"
                );
                t.by_sql.clear();
                t.written = 0;
                t.replan_at = t.replan_at.saturating_mul(2);
            }
        }
    }

    /// Writes the pending ops of `tables` (inside the open green transaction, opening one when
    /// needed) and, with `commit = Some((end_lsn, commit_time))`, the progress row and COMMIT,
    /// all in one pipelined round trip. `lsn` names the batch's last blue LSN in errors.
    pub async fn write(
        &mut self,
        tables: &[TableOps],
        commit: Option<(Lsn, i64)>,
        lsn: Lsn,
    ) -> Result<Written, ApplyError> {
        // Statements first (preparing is a round trip, but only the first time per shape).
        let mut plans: Vec<(Statement, Input<'_>, Origin)> = Vec::new();
        for ops in tables {
            self.plan_table(ops, lsn, &mut plans)
                .await
                .map_err(|source| {
                    statement_error("preparing a statement", &ops.map.label, lsn, source)
                })?;
        }
        let params: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = plans
            .iter()
            .map(|(_, input, _)| match input {
                Input::Params(params) => params
                    .iter()
                    .map(|a| a.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect(),
                Input::Copy(_) => Vec::new(),
            })
            .collect();
        let progress_params: Option<(String, Lsn, i64)> =
            commit.map(|(end, time)| (self.slot.clone(), end, time));

        let mut origins: Vec<Origin> = Vec::new();
        let mut pending: Vec<Pending<'_>> = Vec::new();
        let client = &self.client;
        if !self.in_txn {
            origins.push(Origin {
                what: "BEGIN",
                table: String::new(),
                lsn,
            });
            pending.push(Box::pin(async move {
                client.batch_execute("BEGIN").await.map(|_| Vec::new())
            }));
        }
        for ((stmt, input, origin), p) in plans.iter().zip(params.iter()) {
            origins.push(origin.clone());
            match input {
                Input::Params(_) => pending.push(Box::pin(client.query(stmt, p))),
                Input::Copy(data) => pending.push(Box::pin(copy_in(client, stmt, data.clone()))),
            }
        }
        if let Some((slot, end, time)) = &progress_params {
            let stmt = &self.progress_statement;
            origins.push(Origin {
                what: "the progress row",
                table: "shadowsync.progress".into(),
                lsn,
            });
            pending.push(Box::pin(async move {
                client
                    .execute(stmt, &[slot, end, time])
                    .await
                    .map(|_| Vec::new())
            }));
            origins.push(Origin {
                what: "COMMIT",
                table: String::new(),
                lsn,
            });
            pending.push(Box::pin(async move {
                client.batch_execute("COMMIT").await.map(|_| Vec::new())
            }));
        }
        self.in_txn = true;
        // join_all (not try_join_all) so that every response is read and the first error in
        // pipeline order is the one reported: later ones only say the transaction is aborted.
        let results = futures_util::future::join_all(pending).await;
        let mut written = Written::default();
        for (result, origin) in results.into_iter().zip(origins) {
            let rows = match result {
                Ok(rows) => rows,
                Err(source) => {
                    if self.keep_failed_transaction {
                        // Bisecting under a savepoint: the caller rolls back to it.
                        return Err(statement_error(
                            origin.what,
                            &origin.table,
                            origin.lsn,
                            source,
                        ));
                    }
                    self.in_txn = false;
                    // A pipelined COMMIT has already ended the aborted transaction.
                    if commit.is_none() {
                        let _ = self.client.batch_execute("ROLLBACK").await;
                    }
                    return Err(statement_error(
                        origin.what,
                        &origin.table,
                        origin.lsn,
                        source,
                    ));
                }
            };
            // Only the conflict-detecting statements return rows: one per recorded conflict.
            for r in rows {
                written.conflicts.push(crate::conflicts::Seen {
                    table: origin.table.clone(),
                    kind: r.get(0),
                    resolution: r.get(1),
                    key: r.get(2),
                });
            }
        }
        for ops in tables {
            self.note_written(&ops.map.label, ops.counts.iter().sum());
            written.rows.push((ops.map.label.clone(), ops.counts));
        }
        if commit.is_some() {
            self.in_txn = false;
        }
        Ok(written)
    }

    /// Commits the open transaction (or an empty one) with the progress row.
    pub async fn commit(&mut self, end_lsn: Lsn, commit_time: i64) -> Result<(), ApplyError> {
        self.write(&[], Some((end_lsn, commit_time)), end_lsn)
            .await
            .map(|_| ())
    }

    /// Abandons the open transaction, if any (an incomplete blue transaction at shutdown).
    pub async fn rollback(&mut self) -> Result<(), ApplyError> {
        if self.in_txn {
            self.in_txn = false;
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(green_err("rolling back"))?;
        }
        Ok(())
    }

    async fn plan_table<'t>(
        &mut self,
        ops: &'t TableOps,
        lsn: Lsn,
        plans: &mut Vec<(Statement, Input<'t>, Origin)>,
    ) -> Result<(), tokio_postgres::Error> {
        let map = &ops.map;
        let origin = |what| Origin {
            what,
            table: map.label.clone(),
            lsn,
        };
        let all: Vec<usize> = (0..map.source_columns.len()).collect();
        if map.is_keyed() {
            let detect = map.conflicts.detects();
            let labels = (self.slot.clone(), map.source.to_string(), map.label.clone());
            let params = |rows: &[&'t batch::Pending], cols: &[usize], bound: bool| {
                keyed_params(rows, cols, detect.then_some(&labels), bound)
            };
            let insert_new = self.insert_new_keys
                && map.insert_new_keys.is_some()
                && !self.upsert_only.contains(&map.label);
            let mut deletes = Vec::new();
            let mut upserts = Vec::new();
            let mut new_keys = Vec::new();
            let mut partial: HashMap<Vec<bool>, Vec<&batch::Pending>> = HashMap::new();
            for p in ops.ops.values() {
                match &p.op {
                    KeyedOp::Delete(_) => deletes.push(p),
                    // Blue had no row for this key before the batch: neither has green, unless
                    // a writer on green inserted it (then the insert fails, and the batch is
                    // retried with upserts: `ApplyError::NewKeyExists`).
                    KeyedOp::Upsert(_) if insert_new && !p.existed => new_keys.push(p),
                    // Without a replica identity on blue (for a moment), a key green holds is
                    // no conflict to resolve but a row blue has twice: the plain insert fails,
                    // and the row is named as a poison row.
                    KeyedOp::Upsert(_) if map.awaits_identity => new_keys.push(p),
                    KeyedOp::Upsert(_) => upserts.push(p),
                    KeyedOp::Update(t) => {
                        partial.entry(batch::unchanged_mask(t)).or_default().push(p)
                    }
                }
            }
            if !deletes.is_empty() {
                let text = if detect {
                    conflict::delete(map)
                } else {
                    sql::delete(map)
                };
                let s = self.prepared(&map.label, &text).await?;
                plans.push((
                    s,
                    params(&deletes, &map.row_key, false).into(),
                    origin("a delete"),
                ));
            }
            if !upserts.is_empty() {
                if let Some(text) = sql::delete_unmatched(map, &all) {
                    let s = self.prepared(&map.label, &text).await?;
                    plans.push((
                        s,
                        keyed_params(&upserts, &all, None, false).into(),
                        origin("a delete of rows the filter excludes"),
                    ));
                }
                let text = if detect {
                    conflict::upsert(map, &all)
                } else {
                    sql::upsert(map, &all)
                };
                let s = self.prepared(&map.label, &text).await?;
                let bound = detect && conflict::upsert_takes_commit_bound(map);
                plans.push((
                    s,
                    params(&upserts, &all, bound).into(),
                    origin("an insert or update"),
                ));
            }
            for (mask, rows) in partial {
                let cols: Vec<usize> = all.iter().copied().filter(|&c| !mask[c]).collect();
                let text = if detect {
                    conflict::update(map, &cols)
                } else {
                    sql::update(map, &cols)
                };
                if let Some(text) = text {
                    let s = self.prepared(&map.label, &text).await?;
                    plans.push((s, params(&rows, &cols, false).into(), origin("an update")));
                }
            }
            // Last: rows blue inserted usually reuse unique values that the batch's updates and
            // deletes free.
            if !new_keys.is_empty() {
                // COPY only as the first statement of the write (after BEGIN at most): a COPY
                // that fails before the server enters copy mode (an earlier statement aborted
                // the transaction) leaves tokio-postgres one reply out of step with its requests
                // (rust-postgres #789). As the first statement it can only fail that way on a
                // privilege, which stops the session and drops the connection.
                let copy = map.copy_new_keys.as_ref().filter(|_| plans.is_empty());
                let (s, input) = match (conflict::insert_new(map, &all), copy) {
                    (Some(text), _) => {
                        let types = conflict::param_types(all.len());
                        let s = self.prepared_typed(&map.label, &text, &types).await?;
                        (s, params(&new_keys, &all, false).into())
                    }
                    (None, Some(sources)) => {
                        let s = self.prepared(&map.label, &sql::copy_new(map)).await?;
                        (s, Input::Copy(copy_data(&new_keys, sources)))
                    }
                    (None, None) => {
                        let s = self
                            .prepared(&map.label, &sql::insert_new(map, &all))
                            .await?;
                        (s, keyed_params(&new_keys, &all, None, false).into())
                    }
                };
                plans.push((s, input, origin(NEW_KEYS)));
            }
        } else {
            for run in &ops.runs {
                match run {
                    KeylessRun::Insert(rows) => {
                        let s = self.prepared(&map.label, &sql::upsert(map, &all)).await?;
                        let rows: Vec<&Tuple> = rows.iter().collect();
                        plans.push((s, boxed(arrays(&rows, &all)).into(), origin("an insert")));
                    }
                    KeylessRun::Delete(rows) => {
                        let detect = map.conflicts.detects();
                        let text = keyless::delete_matching(map, &all, detect);
                        let s = self.prepared(&map.label, &text).await?;
                        let tuples: Vec<&Tuple> = rows.iter().map(|r| &r.tuple).collect();
                        let mut params = boxed(arrays(&tuples, &all));
                        if detect {
                            params.extend(keyless_meta(rows, &self.slot, map));
                        }
                        plans.push((s, params.into(), origin("a delete (full-row match)")));
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves one row to a new key inside the open transaction (see [`RowMove`]).
    pub async fn move_row(&mut self, mv: &RowMove) -> Result<(), ApplyError> {
        let map = &mv.map;
        let present: Vec<usize> = (0..map.source_columns.len())
            .filter(|&c| !matches!(mv.new.0[c], Datum::UnchangedToast))
            .collect();
        let text = sql::move_row(map, &present);
        let err = |source| statement_error("a key change", &map.label, mv.lsn, source);
        let stmt = self.prepared(&map.label, &text).await.map_err(err)?;
        let mut params = arrays(&[&mv.old_key], &map.row_key);
        params.extend(arrays(&[&mv.new], &present));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        self.begin_if_needed().await?;
        self.client.execute(&stmt, &refs).await.map_err(err)?;
        Ok(())
    }

    /// Truncates target tables inside the open transaction.
    /// Only the listed tables: blue's CASCADE is not repeated, as PostgreSQL's own apply worker
    /// does not (it could empty green-only tables that reference a replicated one).
    pub async fn truncate(
        &mut self,
        maps: &[Arc<TableMap>],
        restart_identity: bool,
        lsn: Lsn,
    ) -> Result<(), ApplyError> {
        let targets: Vec<String> = maps.iter().map(|m| m.target.quoted()).collect();
        let labels: Vec<String> = maps.iter().map(|m| m.label.clone()).collect();
        self.begin_if_needed().await?;
        self.client
            .batch_execute(&sql::truncate(&targets, restart_identity))
            .await
            .map_err(|source| statement_error("TRUNCATE", &labels.join(", "), lsn, source))
    }

    pub(super) async fn begin_if_needed(&mut self) -> Result<(), ApplyError> {
        if !self.in_txn {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(green_err("BEGIN"))?;
            self.in_txn = true;
        }
        Ok(())
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn boxed(arrays: Vec<TextArray<'_>>) -> Params<'_> {
    arrays
        .into_iter()
        .map(|a| Box::new(a) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>)
        .collect()
}

/// Parameters of a keyed statement: the listed columns' arrays, then, for the
/// conflict-detecting forms (`labels` = slot, source, target), the per-row metadata and labels
/// (see `conflict`), and with `bound` the latest commit time among the rows.
fn keyed_params<'t>(
    rows: &[&'t batch::Pending],
    cols: &[usize],
    labels: Option<&(String, String, String)>,
    bound: bool,
) -> Params<'t> {
    let tuples: Vec<&Tuple> = rows.iter().map(|p| p.op.tuple()).collect();
    let mut params = boxed(arrays(&tuples, cols));
    if let Some((slot, source, target)) = labels {
        params.push(Box::new(
            rows.iter().map(|p| p.existed).collect::<Vec<bool>>(),
        ));
        params.push(Box::new(WordArray(
            rows.iter().map(|p| p.commit_lsn.as_u64() as i64).collect(),
        )));
        params.push(Box::new(WordArray(
            rows.iter().map(|p| p.commit_time).collect(),
        )));
        params.push(Box::new(slot.clone()));
        params.push(Box::new(source.clone()));
        params.push(Box::new(target.clone()));
        if bound {
            let latest = rows.iter().map(|p| p.commit_time).max().unwrap_or(0);
            params.push(Box::new(crate::progress::pg_time(latest)));
        }
    }
    params
}

/// The detection parameters of a keyless delete (see `keyless::delete_matching`): per image
/// whether it is an update's, its commit LSN and time; then slot, source and target labels.
fn keyless_meta<'t>(rows: &[batch::OldRow], slot: &str, map: &TableMap) -> Params<'t> {
    vec![
        Box::new(rows.iter().map(|r| r.update).collect::<Vec<bool>>()),
        Box::new(WordArray(
            rows.iter().map(|r| r.commit_lsn.as_u64() as i64).collect(),
        )),
        Box::new(WordArray(rows.iter().map(|r| r.commit_time).collect())),
        Box::new(slot.to_string()),
        Box::new(map.source.to_string()),
        Box::new(map.label.clone()),
    ]
}

/// One text array per listed source column, one element per row; for no column, one array of
/// NULLs, one per row (rows of a table without columns: see `sql::src_relation`).
fn arrays<'t>(rows: &[&'t Tuple], cols: &[usize]) -> Vec<TextArray<'t>> {
    if cols.is_empty() {
        return vec![TextArray(vec![None; rows.len()])];
    }
    let mut arrays: Vec<TextArray<'t>> = cols
        .iter()
        .map(|_| TextArray(Vec::with_capacity(rows.len())))
        .collect();
    // Row by row: each row's columns are read while they are in cache.
    for t in rows {
        for (array, &c) in arrays.iter_mut().zip(cols) {
            array.0.push(match &t.0[c] {
                Datum::Text(b) | Datum::Binary(b) => Some(b.as_ref()),
                Datum::Null | Datum::UnchangedToast => None,
            });
        }
    }
    arrays
}
