//! Initial copy: blue's existing rows into green, through the same mappings as the stream, from a
//! snapshot that matches a slot's start point exactly.
//!
//! How: a replication session creates the slot with an exported snapshot
//! (`CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`) and stays idle until every copy worker
//! has imported that snapshot into its blue transaction; the workers then stream
//! `COPY (SELECT ...) TO STDOUT` of each table (or page range of a large table, or of each leaf
//! partition of a partitioned one: see `plan`) into green, one green transaction per range,
//! together with the range's row in `shadowsync.copy_ranges`. Streaming then starts at the
//! slot's consistent point: every transaction committed before it is in the snapshot, every
//! later one is streamed. No gap, no overlap.
//!
//! Invariants:
//! - A table's rows in green all come from one snapshot, whose consistent point is recorded in
//!   `shadowsync.copy_state.snapshot_lsn`; the apply stage skips that table's changes from
//!   transactions committed before it (they are in the copy).
//! - A range's data and its `copy_ranges` row commit together (resumable within a snapshot).
//! - An exported snapshot lives only as long as the session that exported it. A copy
//!   interrupted with its process cannot finish from the same snapshot: its tables are emptied
//!   and copied again from a new one (a temporary slot's), and the stream skips their changes
//!   up to that snapshot's point. Tables already copied keep their rows, unless a lookup or a
//!   green foreign key links them to a table copied again (see `empty`); nothing is lost or
//!   applied twice.
//! - Green tables being copied must be empty, unless the operator asked for them to be
//!   truncated; shadowsync only ever empties tables it was copying itself. Every refusal comes
//!   before the first write.
//! - A range green rejects stops the copy with a permanent error naming the row's key and the
//!   column (see `narrow`), never other row values.

mod copy;
mod display;
mod empty;
mod narrow;
mod plan;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::{Config, SnapshotMode};
use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::metrics::Shared;
use crate::source::{self, SourceError};
use crate::transform::TableMap;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("blue, {context}: {failure}")]
    Blue { context: String, failure: DbFailure },
    #[error("green, {context}: {failure}")]
    Green { context: String, failure: DbFailure },
    #[error(
        "green tables {tables} are not empty, and the initial copy would add blue's rows to them; empty them, run with --snapshot-truncate to let shadowsync empty them, or set [snapshot] mode = \"never\" if green was backfilled by hand"
    )]
    NotEmpty { tables: String },
    #[error(
        "several source tables map to green table {target}; the initial copy cannot copy them again separately: copy that table by hand and set [snapshot] mode = \"never\""
    )]
    SharedTarget { target: String },
    #[error(
        "green tables {tables} must be emptied before the initial copy writes them again, but green foreign keys from tables shadowsync does not copy reference them: {references}. Nothing was changed: TRUNCATE would have to empty those tables too, and shadowsync empties only tables it copies. Drop those constraints for the copy and add them back once it has finished ({drop} then, after the copy, {add}), then run again"
    )]
    ForeignKeys {
        tables: String,
        references: String,
        drop: String,
        add: String,
    },
    #[error(transparent)]
    Rejected(Box<Rejected>),
    #[error("the replication session exporting the snapshot: {0}")]
    Export(String),
    #[error("a copy worker stopped unexpectedly: {0}")]
    Worker(String),
}

/// A row green rejects in the initial copy, narrowed down (see `narrow`).
#[derive(Debug, thiserror::Error)]
#[error(
    "green rejects the row of blue table {source_table} with key {key} for {target}{column} in the initial copy (page range {range} of {relation}): {failure}{hint}. Nothing of that range was written; once fixed, run again: tables whose copy did not finish are emptied and copied again from a new snapshot, tables already copied keep their rows"
)]
pub struct Rejected {
    pub source_table: String,
    pub target: String,
    /// `(id)=(5)`: key columns and values only, as the stream's poison errors print them.
    pub key: String,
    /// `, column x` when one column is to blame (empty otherwise).
    pub column: String,
    /// The blue relation read (the table, or its leaf partition).
    pub relation: String,
    pub range: i32,
    pub failure: DbFailure,
    pub hint: &'static str,
}

impl SnapshotError {
    /// The one place deciding whether a copy failure is worth a retry (from a new snapshot).
    pub fn is_retryable(&self) -> bool {
        match self {
            SnapshotError::Source(e) => e.is_retryable(),
            SnapshotError::Blue { failure, .. } | SnapshotError::Green { failure, .. } => {
                failure.is_retryable()
            }
            SnapshotError::Export(_) | SnapshotError::Worker(_) => true,
            SnapshotError::NotEmpty { .. }
            | SnapshotError::SharedTarget { .. }
            | SnapshotError::ForeignKeys { .. }
            | SnapshotError::Rejected(_) => false,
        }
    }
}

pub(crate) fn blue_err(
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let context = context.into();
    move |e| SnapshotError::Blue {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

pub(crate) fn green_err(
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let context = context.into();
    move |e| SnapshotError::Green {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// Where streaming starts, and which tables' early changes the copy already holds.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The slot's confirmed position (its consistent point when just created).
    pub slot_confirmed: Lsn,
    /// Source table (`schema.table`) -> snapshot LSN: changes of that table committed before
    /// it are in green already.
    pub copied_at: HashMap<String, Lsn>,
}

/// Copy state of one table for this slot, as green records it.
#[derive(Debug, Clone)]
struct TableState {
    done: bool,
    snapshot_lsn: Lsn,
    ranges_done: Vec<i32>,
    ranges: i32,
}

async fn read_state(
    green: &Client,
    slot: &str,
) -> Result<BTreeMap<String, TableState>, SnapshotError> {
    let rows = green
        .query(
            "SELECT s.source_table, s.state = 'done', s.snapshot_lsn, s.ranges,
                    coalesce((SELECT array_agg(r.range_no) FROM shadowsync.copy_ranges r
                               WHERE r.slot = s.slot AND r.source_table = s.source_table), '{}')
               FROM shadowsync.copy_state s WHERE s.slot = $1",
            &[&slot],
        )
        .await
        .map_err(green_err("reading shadowsync.copy_state"))?;
    rows.iter()
        .map(|r| {
            let snapshot_lsn: Lsn = r.get(2);
            Ok((
                r.get::<_, String>(0),
                TableState {
                    done: r.get(1),
                    snapshot_lsn,
                    ranges: r.get(3),
                    ranges_done: r.get(4),
                },
            ))
        })
        .collect()
}

/// Before streaming: creates the slot when missing and copies what must be copied (see the
/// module doc). `maps` are the replicated tables' mappings.
pub async fn prepare(
    config: &Config,
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    slot_confirmed: Option<Lsn>,
    truncate: bool,
    shared: &Arc<Shared>,
) -> Result<Prepared, SnapshotError> {
    let slot = &config.blue.slot;
    barrier(green, slot).await?;
    init_bookkeeping(green, slot, slot_confirmed.is_none()).await?;
    let state = read_state(green, slot).await?;
    let mut copied_at: HashMap<String, Lsn> = state
        .iter()
        .filter(|(_, s)| s.done)
        .map(|(t, s)| (t.clone(), s.snapshot_lsn))
        .collect();
    let interrupted = unfinished(green, slot, maps, &state, &mut copied_at).await?;
    let fresh = fresh(config.snapshot.mode, slot_confirmed, maps, &state);
    if fresh.is_empty() && interrupted.is_empty() {
        let slot_confirmed = match slot_confirmed {
            Some(l) => l,
            None => {
                let lsn = source::slot::create_slot(blue, slot).await?;
                shared.set_slot_created();
                lsn
            }
        };
        return Ok(Prepared {
            slot_confirmed,
            copied_at,
        });
    }

    let not_empty = non_empty_targets(green, &fresh).await?;
    if !not_empty.is_empty() && !truncate {
        return Err(SnapshotError::NotEmpty {
            tables: not_empty.join(", "),
        });
    }
    if !interrupted.is_empty() {
        let names: Vec<String> = interrupted.iter().map(|m| m.label.clone()).collect();
        let kept: Vec<&String> = copied_at.keys().collect();
        warn!(
            interrupted = %names.join(", "),
            already_copied = ?kept,
            "an earlier initial copy was interrupted, and its snapshot ended with the process that exported it: \
             emptying the interrupted tables and copying them again from a new snapshot; \
             tables already copied keep their rows, and changes to the re-copied tables are skipped up to the new snapshot's point"
        );
    }
    let todo = interrupted.into_iter().chain(fresh).collect();
    // Every refusal (foreign keys, shared targets) comes before the first write.
    let plan = empty::plan(green, maps, todo, &mut copied_at).await?;
    let mut targets_seen = std::collections::HashSet::new();
    if let Some(m) = plan
        .todo
        .iter()
        .find(|m| !targets_seen.insert(m.label.clone()))
    {
        return Err(SnapshotError::SharedTarget {
            target: m.label.clone(),
        });
    }
    // Recorded before the slot exists: a slot found later without copy state never means
    // "nothing to copy" by accident (if the slot is never created, the state is cleared).
    record_copying(green, slot, &plan.todo).await?;
    let (exporter, consistent, snapshot_name) =
        export(config, slot_confirmed, plan.todo.len()).await?;
    if slot_confirmed.is_none() {
        shared.set_slot_created();
    }
    start_copy(config, &plan, consistent).await?;
    let copied = copy::run(config, &plan.todo, &snapshot_name, exporter, shared).await?;
    for c in copied {
        info!(table = %c.source, rows = c.written, blue_rows = c.read, "initial copy: table done");
        copied_at.insert(c.source, consistent);
    }
    Ok(Prepared {
        slot_confirmed: slot_confirmed.unwrap_or(consistent),
        copied_at,
    })
}

/// For a new slot, forgets any copy state left from an earlier slot of that name (it is
/// meaningless now). The bookkeeping tables exist: `store::migrate` ran when the applier whose
/// connection this is connected.
async fn init_bookkeeping(green: &Client, slot: &str, new_slot: bool) -> Result<(), SnapshotError> {
    if new_slot {
        for sql in [
            "DELETE FROM shadowsync.copy_ranges WHERE slot = $1",
            "DELETE FROM shadowsync.copy_state WHERE slot = $1",
        ] {
            green
                .execute(sql, &[&slot])
                .await
                .map_err(green_err("clearing old copy state"))?;
        }
    }
    Ok(())
}

/// Waits until every green connection of an earlier copy for this slot has ended. A process
/// killed just after sending a range's COMMIT may still see it land: its range would otherwise
/// appear after this copy read (and reset) the state.
async fn barrier(green: &Client, slot: &str) -> Result<(), SnapshotError> {
    green
        .execute(copy::COPY_LOCK_BARRIER, &[&slot])
        .await
        .map_err(green_err("waiting for an earlier copy's sessions to end"))?;
    Ok(())
}

/// Tables whose copy did not finish and must be copied again. One all of whose ranges
/// committed is simply marked done (and added to `copied_at`).
async fn unfinished(
    green: &Client,
    slot: &str,
    maps: &[Arc<TableMap>],
    state: &BTreeMap<String, TableState>,
    copied_at: &mut HashMap<String, Lsn>,
) -> Result<Vec<Arc<TableMap>>, SnapshotError> {
    let mut out = Vec::new();
    for m in maps {
        let label = m.source.to_string();
        let Some(s) = state.get(&label).filter(|s| !s.done) else {
            continue;
        };
        // `ranges` is 0 until the copy planned them: nothing is known to be complete then.
        if s.ranges > 0 && s.ranges_done.len() as i32 >= s.ranges {
            mark_done(green, slot, &label).await?;
            copied_at.insert(label, s.snapshot_lsn);
        } else {
            out.push(m.clone());
        }
    }
    Ok(out)
}

/// Tables to copy that were never copied for this slot, by `mode`.
fn fresh(
    mode: SnapshotMode,
    slot_confirmed: Option<Lsn>,
    maps: &[Arc<TableMap>],
    state: &BTreeMap<String, TableState>,
) -> Vec<Arc<TableMap>> {
    match (mode, slot_confirmed) {
        (SnapshotMode::Never, _) => Vec::new(),
        (_, None) => maps.to_vec(),
        (SnapshotMode::Always, Some(_)) => maps
            .iter()
            .filter(|m| !state.contains_key(&m.source.to_string()))
            .cloned()
            .collect(),
        (SnapshotMode::Auto, Some(_)) => Vec::new(),
    }
}

/// Exports the copy's snapshot from a replication session: the real slot's when it is new,
/// else a temporary slot's. Returns the session (to be kept until every worker imported the
/// snapshot), the consistent point and the snapshot's name.
async fn export(
    config: &Config,
    slot_confirmed: Option<Lsn>,
    tables: usize,
) -> Result<(pgwire_replication::ReplicationClient, Lsn, String), SnapshotError> {
    let slot = &config.blue.slot;
    let (export_slot, temporary) = match slot_confirmed {
        None => (slot.clone(), false),
        Some(_) => (
            temporary_slot_name(slot, &format!("copy_{}", std::process::id())),
            true,
        ),
    };
    let exported = create_exported(config, &export_slot, temporary).await?;
    info!(
        slot = %export_slot,
        temporary,
        consistent_point = %exported.1,
        snapshot = %exported.2,
        tables,
        "initial copy: snapshot exported"
    );
    Ok(exported)
}

/// A temporary slot `<slot>_<purpose>_<pid>_<n>` exporting a snapshot of blue (`verify`'s
/// consistent point): the session (the snapshot and the slot live as long as it does), the
/// consistent point and the snapshot's name.
pub(crate) async fn export_temporary(
    config: &Config,
    purpose: &str,
) -> Result<(pgwire_replication::ReplicationClient, Lsn, String), SnapshotError> {
    // A slot of an earlier call may not be gone yet: the server drops it when it notices the
    // end of its session.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let suffix = format!("{purpose}_{}_{n}", std::process::id());
    let name = temporary_slot_name(&config.blue.slot, &suffix);
    create_exported(config, &name, true).await
}

/// PostgreSQL's longest slot name (NAMEDATALEN - 1).
const SLOT_NAME_MAX: usize = 63;

/// `<slot>_<suffix>`, the slot's part shortened so that the name fits [`SLOT_NAME_MAX`] (a
/// longer one is refused by blue). Slot names are ASCII (see `config`), so bytes are chars.
fn temporary_slot_name(slot: &str, suffix: &str) -> String {
    let room = SLOT_NAME_MAX.saturating_sub(suffix.len() + 1);
    format!("{}_{suffix}", &slot[..slot.len().min(room)])
}

/// `CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')` on a new replication session.
async fn create_exported(
    config: &Config,
    export_slot: &str,
    temporary: bool,
) -> Result<(pgwire_replication::ReplicationClient, Lsn, String), SnapshotError> {
    let blue_dsn = config
        .blue_dsn()
        .map_err(|e| SnapshotError::Export(e.to_string()))?;
    let repl_cfg = source::replication_config(
        &blue_dsn,
        export_slot,
        &config.blue.publication,
        Lsn::ZERO,
        std::time::Duration::from_millis(config.blue.status_interval_ms),
    );
    let mut exporter = source::each_attempt(&repl_cfg, &blue_dsn, |cfg| {
        pgwire_replication::ReplicationClient::connect_gated(cfg)
    })
    .await
    .map_err(|e| SnapshotError::Export(e.to_string()))?;
    let rows = exporter
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT 'export')",
            crate::transform::quote_ident(export_slot),
            if temporary { " TEMPORARY" } else { "" }
        ))
        .await
        .map_err(|e| SnapshotError::Export(format!("creating slot {export_slot}: {e}")))?;
    let text = |i: usize| -> String {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let consistent = Lsn::parse(&text(1)).map_err(|e| {
        SnapshotError::Export(format!("CREATE_REPLICATION_SLOT's consistent point: {e}"))
    })?;
    let snapshot_name = text(2);
    Ok((exporter, consistent, snapshot_name))
}

/// Empties the plan's tables (ours, or the operator said so) in one statement and records the
/// snapshot the copy's rows come from, in one transaction, before any row arrives: a crash from
/// here on is an interrupted copy.
async fn start_copy(
    config: &Config,
    plan: &empty::Plan,
    consistent: Lsn,
) -> Result<(), SnapshotError> {
    let mut tx_green = copy::green_connect(config).await?;
    let tx = tx_green
        .transaction()
        .await
        .map_err(green_err("starting the copy setup"))?;
    if !plan.empty.is_empty() {
        let targets: Vec<String> = plan.empty.iter().map(|t| t.quoted()).collect();
        tx.batch_execute(&format!("TRUNCATE {}", targets.join(", ")))
            .await
            .map_err(green_err(format!("emptying {}", targets.join(", "))))?;
    }
    let sources: Vec<String> = plan.todo.iter().map(|m| m.source.to_string()).collect();
    tx.execute(
        "UPDATE shadowsync.copy_state SET snapshot_lsn = $3::pg_lsn
          WHERE slot = $1 AND source_table = ANY ($2)",
        &[&config.blue.slot, &sources, &consistent],
    )
    .await
    .map_err(green_err("recording the copy's snapshot"))?;
    tx.commit()
        .await
        .map_err(green_err("committing the copy setup"))
}

/// Records `todo` as being copied (no snapshot yet: LSN 0/0, no ranges) and forgets their
/// earlier ranges.
async fn record_copying(
    green: &Client,
    slot: &str,
    todo: &[Arc<TableMap>],
) -> Result<(), SnapshotError> {
    for m in todo {
        let source = m.source.to_string();
        green
            .execute(
                "DELETE FROM shadowsync.copy_ranges WHERE slot = $1 AND source_table = $2",
                &[&slot, &source],
            )
            .await
            .map_err(green_err("resetting copy state"))?;
        green
            .execute(
                "INSERT INTO shadowsync.copy_state (slot, source_table, target_table, state, snapshot_lsn, ranges)
                 VALUES ($1, $2, $3, 'copying', '0/0', 0)
                 ON CONFLICT (slot, source_table) DO UPDATE
                    SET target_table = EXCLUDED.target_table, state = 'copying', snapshot_lsn = '0/0',
                        ranges = 0, rows = 0, started_at = now(), finished_at = NULL",
                &[&slot, &source, &m.label],
            )
            .await
            .map_err(green_err("recording copy state"))?;
    }
    Ok(())
}

/// Marks a table's copy done.
pub(crate) async fn mark_done(
    green: &Client,
    slot: &str,
    source: &str,
) -> Result<(), SnapshotError> {
    green
        .execute(
            "UPDATE shadowsync.copy_state
                SET state = 'done', finished_at = now(),
                    rows = (SELECT coalesce(sum(rows), 0) FROM shadowsync.copy_ranges
                             WHERE slot = $1 AND source_table = $2)
              WHERE slot = $1 AND source_table = $2",
            &[&slot, &source],
        )
        .await
        .map_err(green_err("marking a table's copy done"))?;
    Ok(())
}

/// Target tables (of `maps`) that already hold rows.
async fn non_empty_targets(
    green: &Client,
    maps: &[Arc<TableMap>],
) -> Result<Vec<String>, SnapshotError> {
    let mut out = Vec::new();
    for m in maps {
        if empty::has_rows(green, m).await? {
            out.push(m.label.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::temporary_slot_name;

    #[test]
    fn temporary_slot_names_fit_postgres_limit() {
        assert_eq!(temporary_slot_name("app", "verify_12_0"), "app_verify_12_0");
        let long = "s".repeat(63);
        let name = temporary_slot_name(&long, "verify_4194304_18446744073709551615");
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_verify_4194304_18446744073709551615"));
    }
}
