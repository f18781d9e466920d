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
use tracing::{debug, warn};

use super::batch::{RowMove, TableOps};
use crate::config::Dsn;
use crate::decode::{Datum, Tuple};
use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::statement::{self as sql, TextArray};
use crate::transform::TableMap;

use super::error::{ApplyError, green_err, statement_error};

mod plan;
mod remap;

pub use remap::Remaps;

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
/// How long a planned session end waits for green to release its session lock.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Readers re-derived after their looked-up tables' writes ([`Remaps`]).
    pub remaps: Remaps,
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

/// Where a pipelined request came from, to name it in errors.
#[derive(Clone)]
struct Origin {
    what: &'static str,
    table: String,
    lsn: Lsn,
}

/// One planned statement: the statement, its input, and where it came from.
type Plan<'t> = (Statement, Input<'t>, Origin);

/// The pipelined requests of one write, each with where it came from.
#[derive(Default)]
struct Requests<'a> {
    origins: Vec<Origin>,
    pending: Vec<Pending<'a>>,
}

impl<'a> Requests<'a> {
    fn push(&mut self, origin: Origin, request: Pending<'a>) {
        self.origins.push(origin);
        self.pending.push(request);
    }
}

/// Each plan's parameters as `query` takes them (none for a COPY: its rows go as data).
fn param_refs<'a>(
    plans: &'a [Plan<'_>],
) -> Vec<Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>> {
    plans
        .iter()
        .map(|(_, input, _)| match input {
            Input::Params(params) => params
                .iter()
                .map(|a| a.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect(),
            Input::Copy(_) => Vec::new(),
        })
        .collect()
}

/// The requests of one write, in pipeline order: BEGIN (with `begin`), the planned statements
/// with their `params`, then with `progress` (its statement and slot, end LSN, commit time)
/// the progress row and COMMIT. Created here, run when polled.
fn requests<'a>(
    client: &'a Client,
    begin: bool,
    plans: &'a [Plan<'_>],
    params: &'a [Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>],
    progress: Option<(&'a Statement, &'a (String, Lsn, i64))>,
    lsn: Lsn,
) -> Requests<'a> {
    let mut requests = Requests::default();
    let origin = |what, table: &str| Origin {
        what,
        table: table.into(),
        lsn,
    };
    if begin {
        requests.push(
            origin("BEGIN", ""),
            Box::pin(async move { client.batch_execute("BEGIN").await.map(|_| Vec::new()) }),
        );
    }
    for ((stmt, input, origin), p) in plans.iter().zip(params) {
        let request: Pending<'a> = match input {
            Input::Params(_) => Box::pin(client.query(stmt, p)),
            Input::Copy(data) => Box::pin(copy_in(client, stmt, data.clone())),
        };
        requests.push(origin.clone(), request);
    }
    if let Some((stmt, (slot, end, time))) = progress {
        requests.push(
            origin("the progress row", "shadowsync.progress"),
            Box::pin(async move {
                client
                    .execute(stmt, &[slot, end, time])
                    .await
                    .map(|_| Vec::new())
            }),
        );
        requests.push(
            origin("COMMIT", ""),
            Box::pin(async move { client.batch_execute("COMMIT").await.map(|_| Vec::new()) }),
        );
    }
    requests
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
            remaps: Remaps::default(),
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
        let plans = self.plan(tables, lsn).await?;
        let params = param_refs(&plans);
        let progress_params: Option<(String, Lsn, i64)> =
            commit.map(|(end, time)| (self.slot.clone(), end, time));
        let progress = progress_params
            .as_ref()
            .map(|p| (&self.progress_statement, p));
        let Requests { origins, pending } =
            requests(&self.client, !self.in_txn, &plans, &params, progress, lsn);
        self.in_txn = true;
        // join_all (not try_join_all) so that every response is read and the first error in
        // pipeline order is the one reported: later ones only say the transaction is aborted.
        let results = futures_util::future::join_all(pending).await;
        let conflicts = self
            .read_results(results, origins, commit.is_some())
            .await?;
        let mut written = Written {
            rows: Vec::new(),
            conflicts,
        };
        for ops in tables {
            self.note_written(&ops.map.label, ops.counts.iter().sum());
            written.rows.push((ops.map.label.clone(), ops.counts));
        }
        if commit.is_some() {
            self.in_txn = false;
        }
        Ok(written)
    }

    /// The statements writing `tables`, in pipeline order (see [`Self::plan_table`]).
    async fn plan<'t>(
        &mut self,
        tables: &'t [TableOps],
        lsn: Lsn,
    ) -> Result<Vec<Plan<'t>>, ApplyError> {
        let mut plans: Vec<Plan<'t>> = Vec::new();
        for ops in tables {
            self.plan_table(ops, lsn, &mut plans)
                .await
                .map_err(|source| {
                    statement_error("preparing a statement", &ops.map.label, lsn, source)
                })?;
            self.plan_remaps(ops, lsn, &mut plans)
                .await
                .map_err(|source| {
                    statement_error("preparing a re-derivation", &ops.map.label, lsn, source)
                })?;
        }
        Ok(plans)
    }

    /// Reads the pipelined responses in pipeline order: the conflicts the detecting statements
    /// recorded, or the first error (see [`Self::failed`]). `committing`: the requests ended
    /// with COMMIT.
    async fn read_results(
        &mut self,
        results: Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
        origins: Vec<Origin>,
        committing: bool,
    ) -> Result<Vec<crate::conflicts::Seen>, ApplyError> {
        let mut conflicts = Vec::new();
        for (result, origin) in results.into_iter().zip(origins) {
            let rows = match result {
                Ok(rows) => rows,
                Err(source) => return Err(self.failed(origin, source, committing).await),
            };
            // Only the conflict-detecting statements return rows: one per recorded conflict.
            for r in rows {
                conflicts.push(crate::conflicts::Seen {
                    table: origin.table.clone(),
                    kind: r.get(0),
                    resolution: r.get(1),
                    key: r.get(2),
                });
            }
        }
        Ok(conflicts)
    }

    /// The error of the failed request `origin`, once the aborted transaction is ended (rolled
    /// back unless `committing`), or left to the caller while bisecting.
    async fn failed(
        &mut self,
        origin: Origin,
        source: tokio_postgres::Error,
        committing: bool,
    ) -> ApplyError {
        if self.keep_failed_transaction {
            // Bisecting under a savepoint: the caller rolls back to it.
            return statement_error(origin.what, &origin.table, origin.lsn, source);
        }
        self.in_txn = false;
        // A pipelined COMMIT has already ended the aborted transaction.
        if !committing {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        statement_error(origin.what, &origin.table, origin.lsn, source)
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

    /// Ends the session on purpose: rolls back what is open and releases the slot's green
    /// session lock, so that a session started right after takes it at once. Bounded: green
    /// answered the statement that ended the session, but a release that does not return within
    /// `RELEASE_TIMEOUT` is left to the connection's close.
    pub async fn release(mut self) {
        let release = async {
            self.rollback().await?;
            self.client
                .execute(
                    "SELECT pg_advisory_unlock(hashtextextended('shadowsync.apply:' || $1, 0))",
                    &[&self.slot],
                )
                .await
                .map_err(green_err("releasing the per-slot session lock"))?;
            Ok::<(), ApplyError>(())
        };
        match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "could not release green's session lock; green releases it when the connection closes")
            }
            Err(_) => warn!(
                "green did not release its session lock in time; green releases it when the connection closes"
            ),
        }
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
