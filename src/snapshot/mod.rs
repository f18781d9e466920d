//! Initial copy: blue's existing rows into green, through the same mappings as the stream, from a
//! snapshot that matches a slot's start point exactly.
//!
//! How: a replication session creates the slot with an exported snapshot
//! (`CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`) and stays idle until every copy worker
//! has imported that snapshot into its blue transaction; the workers then stream
//! `COPY (SELECT ...) TO STDOUT` of each table (or page range of a large table) into green, one
//! green transaction per range, together with the range's row in `shadowsync.copy_ranges`.
//! Streaming then starts at the slot's consistent point: every transaction committed before it
//! is in the snapshot, every later one is streamed. No gap, no overlap.
//!
//! Invariants:
//! - A table's rows in green all come from one snapshot, whose consistent point is recorded in
//!   `shadowsync.copy_state.snapshot_lsn`; the apply stage skips that table's changes from
//!   transactions committed before it (they are in the copy).
//! - A range's data and its `copy_ranges` row commit together (resumable within a snapshot).
//! - An exported snapshot lives only as long as the session that exported it. A copy
//!   interrupted with its process cannot finish from the same snapshot: its tables are emptied
//!   and copied again from a new one (a temporary slot's), and the stream skips their changes
//!   up to that snapshot's point. Tables already copied keep their rows; nothing is lost or
//!   applied twice.
//! - Green tables being copied must be empty, unless the operator asked for them to be
//!   truncated; shadowsync only ever empties tables it was copying itself.

mod copy;
mod display;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::{Config, SnapshotMode};
use crate::failure::DbFailure;
use crate::metrics::Shared;
use crate::progress::{format_lsn, parse_lsn};
use crate::source::{self, SourceError};
use crate::transform::TableMap;

/// Copy bookkeeping in green (created when missing).
pub const CREATE_SQL: &str = "
CREATE TABLE IF NOT EXISTS shadowsync.copy_state (
    slot         text NOT NULL,
    source_table text NOT NULL,
    target_table text NOT NULL,
    state        text NOT NULL CHECK (state IN ('copying', 'done')),
    snapshot_lsn pg_lsn NOT NULL,
    ranges       integer NOT NULL,
    rows         bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (slot, source_table)
);
CREATE TABLE IF NOT EXISTS shadowsync.copy_ranges (
    slot         text NOT NULL,
    source_table text NOT NULL,
    range_no     integer NOT NULL,
    rows         bigint NOT NULL,
    copied_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, source_table, range_no)
);
COMMENT ON TABLE shadowsync.copy_state IS
    'shadowsync: initial copy per table; snapshot_lsn is the consistent point of the snapshot its rows come from (changes committed before it are skipped)';
";

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
    #[error("the replication session exporting the snapshot: {0}")]
    Export(String),
    #[error("a copy worker stopped unexpectedly: {0}")]
    Worker(String),
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
            SnapshotError::NotEmpty { .. } | SnapshotError::SharedTarget { .. } => false,
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
    pub slot_confirmed: u64,
    /// Source table (`schema.table`) -> snapshot LSN: changes of that table committed before
    /// it are in green already.
    pub copied_at: HashMap<String, u64>,
}

/// Copy state of one table for this slot, as green records it.
#[derive(Debug, Clone)]
struct TableState {
    done: bool,
    snapshot_lsn: u64,
    ranges_done: Vec<i32>,
    ranges: i32,
}

async fn read_state(
    green: &Client,
    slot: &str,
) -> Result<BTreeMap<String, TableState>, SnapshotError> {
    let rows = green
        .query(
            "SELECT s.source_table, s.state = 'done', s.snapshot_lsn::text, s.ranges,
                    coalesce((SELECT array_agg(r.range_no) FROM shadowsync.copy_ranges r
                               WHERE r.slot = s.slot AND r.source_table = s.source_table), '{}')
               FROM shadowsync.copy_state s WHERE s.slot = $1",
            &[&slot],
        )
        .await
        .map_err(green_err("reading shadowsync.copy_state"))?;
    rows.iter()
        .map(|r| {
            let lsn: String = r.get(2);
            let snapshot_lsn = parse_lsn(&lsn).ok_or_else(|| {
                SnapshotError::Export(format!(
                    "shadowsync.copy_state holds an unreadable snapshot LSN {lsn:?}"
                ))
            })?;
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
    slot_confirmed: Option<u64>,
    truncate: bool,
    shared: &Arc<Shared>,
) -> Result<Prepared, SnapshotError> {
    let slot = &config.blue.slot;
    green
        .batch_execute(CREATE_SQL)
        .await
        .map_err(green_err("creating the copy bookkeeping tables"))?;
    if slot_confirmed.is_none() {
        // A new slot: any copy state left from an earlier slot of that name is meaningless.
        green
            .execute(
                "DELETE FROM shadowsync.copy_ranges WHERE slot = $1",
                &[slot],
            )
            .await
            .map_err(green_err("clearing old copy state"))?;
        green
            .execute("DELETE FROM shadowsync.copy_state WHERE slot = $1", &[slot])
            .await
            .map_err(green_err("clearing old copy state"))?;
    }
    let state = read_state(green, slot).await?;
    let mode = config.snapshot.mode;
    let label = |m: &Arc<TableMap>| m.source.to_string();
    let interrupted: Vec<Arc<TableMap>> = maps
        .iter()
        .filter(|m| state.get(&label(m)).is_some_and(|s| !s.done))
        .cloned()
        .collect();
    let fresh: Vec<Arc<TableMap>> = match (mode, slot_confirmed) {
        (SnapshotMode::Never, _) => Vec::new(),
        (_, None) => maps.to_vec(),
        (SnapshotMode::Always, Some(_)) => maps
            .iter()
            .filter(|m| !state.contains_key(&label(m)))
            .cloned()
            .collect(),
        (SnapshotMode::Auto, Some(_)) => Vec::new(),
    };
    let mut copied_at: HashMap<String, u64> = state
        .iter()
        .filter(|(_, s)| s.done)
        .map(|(t, s)| (t.clone(), s.snapshot_lsn))
        .collect();

    // Interrupted tables whose every range made it need no new copy.
    let mut interrupted_todo = Vec::new();
    for m in interrupted {
        let s = &state[&label(&m)];
        // `ranges` is 0 until the copy planned them: nothing is known to be complete then.
        if s.ranges > 0 && s.ranges_done.len() as i32 >= s.ranges {
            mark_done(green, slot, &label(&m)).await?;
            copied_at.insert(label(&m), s.snapshot_lsn);
        } else {
            interrupted_todo.push(m);
        }
    }
    if fresh.is_empty() && interrupted_todo.is_empty() {
        let slot_confirmed = match slot_confirmed {
            Some(l) => l,
            None => source::preflight::create_slot(blue, slot).await?,
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
    if !interrupted_todo.is_empty() {
        let names: Vec<String> = interrupted_todo.iter().map(|m| m.label.clone()).collect();
        let kept: Vec<&String> = copied_at.keys().collect();
        warn!(
            interrupted = %names.join(", "),
            already_copied = ?kept,
            "an earlier initial copy was interrupted, and its snapshot ended with the process that exported it: \
             emptying the interrupted tables and copying them again from a new snapshot; \
             tables already copied keep their rows, and changes to the re-copied tables are skipped up to the new snapshot's point"
        );
    }
    let mut todo: Vec<Arc<TableMap>> = interrupted_todo.into_iter().chain(fresh).collect();
    // Tables linked by lookups must come from one snapshot: a reader copied from one and the
    // table it reads from another would miss (or repeat) the lookups between the two. Tables
    // shadowsync copied earlier that are linked to a table being copied are copied again with
    // it (never a table it did not copy: that could be the operator's backfill).
    loop {
        let linked: Vec<Arc<TableMap>> = maps
            .iter()
            .filter(|m| !todo.iter().any(|t| t.source == m.source))
            .filter(|m| copied_at.contains_key(&label(m)))
            .filter(|m| {
                todo.iter()
                    .any(|t| m.reads_table(&t.label) || t.reads_table(&m.label))
            })
            .cloned()
            .collect();
        if linked.is_empty() {
            break;
        }
        for m in linked {
            if copied_at.remove(&label(&m)).is_some() {
                warn!(table = %m.label, "copying again a table linked by lookups to one being copied, so that both come from one snapshot");
            }
            todo.push(m);
        }
    }
    let mut targets_seen = std::collections::HashSet::new();
    if let Some(m) = todo.iter().find(|m| !targets_seen.insert(m.label.clone())) {
        return Err(SnapshotError::SharedTarget {
            target: m.label.clone(),
        });
    }
    // Recorded before the slot exists: a slot found later without copy state never means
    // "nothing to copy" by accident (if the slot is never created, the state is cleared).
    record_copying(green, slot, &todo).await?;

    // The exporting session: the real slot when it is new, else a temporary one.
    let blue_dsn = config
        .blue_dsn()
        .map_err(|e| SnapshotError::Export(e.to_string()))?;
    let (export_slot, temporary) = match slot_confirmed {
        None => (slot.clone(), false),
        Some(_) => (format!("{slot}_copy_{}", std::process::id()), true),
    };
    let repl_cfg = source::replication_config(
        &blue_dsn,
        &export_slot,
        &config.blue.publication,
        0,
        std::time::Duration::from_millis(config.blue.status_interval_ms),
    );
    let mut exporter = pgwire_replication::ReplicationClient::connect_gated(repl_cfg)
        .await
        .map_err(|e| SnapshotError::Export(e.to_string()))?;
    let rows = exporter
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT 'export')",
            crate::transform::quote_ident(&export_slot),
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
    let consistent = parse_lsn(&text(1)).ok_or_else(|| {
        SnapshotError::Export(format!(
            "CREATE_REPLICATION_SLOT returned an unreadable consistent point {:?}",
            text(1)
        ))
    })?;
    let snapshot_name = text(2);
    info!(
        slot = %export_slot,
        temporary,
        consistent_point = %format_lsn(consistent),
        snapshot = %snapshot_name,
        tables = todo.len(),
        "initial copy: snapshot exported"
    );

    // Empty the tables (ours, or the operator said so) and record what is being copied, before
    // any row arrives: a crash from here on is an interrupted copy.
    let targets: Vec<String> = todo.iter().map(|m| m.target.quoted()).collect();
    let mut tx_green = copy::green_connect(config).await?;
    {
        let tx = tx_green
            .transaction()
            .await
            .map_err(green_err("starting the copy setup"))?;
        tx.batch_execute(&format!("TRUNCATE {}", targets.join(", ")))
            .await
            .map_err(green_err(format!("emptying {}", targets.join(", "))))?;
        let sources: Vec<String> = todo.iter().map(label).collect();
        tx.execute(
            "UPDATE shadowsync.copy_state SET snapshot_lsn = $3::text::pg_lsn
              WHERE slot = $1 AND source_table = ANY ($2)",
            &[slot, &sources, &format_lsn(consistent)],
        )
        .await
        .map_err(green_err("recording the copy's snapshot"))?;
        tx.commit()
            .await
            .map_err(green_err("committing the copy setup"))?;
    }
    drop(tx_green);

    let copied = copy::run(config, &todo, &snapshot_name, exporter, shared).await?;
    for (table, rows) in &copied {
        copied_at.insert(table.clone(), consistent);
        info!(table = %table, rows, "initial copy: table done");
    }
    Ok(Prepared {
        slot_confirmed: slot_confirmed.unwrap_or(consistent),
        copied_at,
    })
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
        let has_rows: bool = green
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", m.target.quoted()),
                &[],
            )
            .await
            .map_err(green_err(format!("looking into {}", m.label)))?
            .get(0);
        if has_rows {
            out.push(m.label.clone());
        }
    }
    Ok(out)
}
