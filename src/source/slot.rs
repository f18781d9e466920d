//! Blue's replication slot and WAL positions: the slot's state and confirmed position, its
//! creation, and the drain's target (a position made reachable at once).
//!
//! Invariant: the only writes to blue are creating a missing slot and the drain's empty
//! logical message; positions are read as `pg_lsn` values.

use tokio_postgres::Client;

use super::{SourceError, blue_err};
use crate::lsn::Lsn;

/// The slot's confirmed position; `None` when it does not exist. A missing slot that green has
/// progress for is refused: changes between that progress and a new slot's start would be lost
/// without a trace (a failover to a standby without the slot, a dropped slot).
pub async fn slot_state(
    blue: &Client,
    slot: &str,
    green_progress: Option<Lsn>,
) -> Result<Option<Lsn>, SourceError> {
    let row = blue
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn, current_database()::text,
                    wal_status::text, current_setting('max_slot_wal_keep_size')
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(blue_err("looking up the replication slot"))?;
    if let Some(row) = row {
        let plugin: Option<String> = row.get(0);
        let database: Option<String> = row.get(1);
        let confirmed: Option<Lsn> = row.get(2);
        let current: String = row.get(3);
        if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
            return Err(SourceError::Setup(format!(
                "replication slot {slot} exists on blue but is not a pgoutput slot of database {current} (plugin {plugin:?}, database {database:?}): choose another blue.slot, or drop it with SELECT pg_drop_replication_slot('{slot}'); if it is unused"
            )));
        }
        let wal_status: Option<String> = row.get(4);
        if wal_status.as_deref() == Some("lost") {
            let keep: String = row.get(5);
            return Err(SourceError::Setup(lost_slot(slot, &keep, green_progress)));
        }
        // A logical slot being created has no confirmed position yet: streaming then starts
        // at green's progress, or where blue's slot begins.
        return Ok(Some(confirmed.unwrap_or(Lsn::ZERO)));
    }
    if let Some(progress) = green_progress {
        return Err(SourceError::Setup(format!(
            "replication slot {slot} does not exist on blue, but green has applied its changes up to LSN {}: changes committed on blue since then may be gone (a failover to a standby without the slot, or a dropped slot). Re-seed green from a fresh copy; or, if you know nothing was committed on blue since, run DELETE FROM shadowsync.progress WHERE slot = '{slot}'; on green to start from a new slot",
            progress
        )));
    }
    Ok(None)
}

/// Refuses a slot that blue invalidated (for `check`, which reads no progress).
pub async fn refuse_lost(blue: &Client, slot: &str) -> Result<(), SourceError> {
    let row = blue
        .query_opt(
            "SELECT wal_status::text, current_setting('max_slot_wal_keep_size')
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(blue_err("looking up the replication slot"))?;
    match row {
        Some(row) if row.get::<_, Option<String>>(0).as_deref() == Some("lost") => Err(
            SourceError::Setup(lost_slot(slot, &row.get::<_, String>(1), None)),
        ),
        _ => Ok(()),
    }
}

/// What to tell the operator about a slot blue invalidated (`wal_status = lost`).
pub fn lost_slot(slot: &str, max_slot_wal_keep_size: &str, green_progress: Option<Lsn>) -> String {
    let since = green_progress
        .map(|p| format!(" since green's progress at LSN {p}"))
        .unwrap_or_default();
    format!(
        "replication slot {slot} was invalidated by blue (wal_status = lost): it held back more \
         WAL than max_slot_wal_keep_size ({max_slot_wal_keep_size}) allows while shadowsync was \
         stopped or behind, so blue removed WAL green still needed, and the changes{since} \
         cannot be streamed. Green must be copied again: `shadowsync reset --config F \
         --drop-slot --truncate`, then `shadowsync run` (a new slot, and a new initial copy). To \
         keep it from happening, raise max_slot_wal_keep_size (or -1), and alert on \
         shadowsync_slot_safe_wal_bytes"
    )
}

/// Creates the slot without a snapshot (nothing to copy); returns its creation point.
pub async fn create_slot(blue: &Client, slot: &str) -> Result<Lsn, SourceError> {
    let lsn: Lsn = blue
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(blue_err("creating the replication slot"))?
        .get(0);
    tracing::info!(slot, lsn = %lsn, "created replication slot on blue; streaming starts at its creation point");
    Ok(lsn)
}

/// Blue's current WAL insert position: it covers every commit that has returned to its client,
/// even with synchronous_commit = off (the write position may trail those).
pub async fn current_wal_lsn(blue: &Client) -> Result<Lsn, SourceError> {
    Ok(blue
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .map_err(blue_err("reading the current WAL position"))?
        .get(0))
}

/// Prefix of the logical message a drain commits on blue (see [`drain_target`]); the apply
/// stage does not count its transaction as a blue transaction applied.
pub const DRAIN_MESSAGE_PREFIX: &str = "shadowsync-drain";

/// Longest wait for the drain's flush marker (it is only an accelerator).
const DRAIN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a drain must reach: blue's current WAL insert position, made reachable at once.
///
/// An idle blue (writers stopped for the cutover) may keep the tail of its WAL unflushed while
/// its WAL writer hibernates, and an insert position at the start of a page counts the page
/// header, where no record ends: either way the walsender would send nothing that reaches the
/// position until blue's next write, seconds or minutes later. So a transaction holding one
/// empty logical message (prefix `shadowsync-drain`; no row, no table) is committed with a
/// local synchronous commit after reading the position: its commit record lies beyond the
/// position and flushes everything before it. Should it fail (a refused read-write
/// transaction) or take over `DRAIN_FLUSH_TIMEOUT`, the drain still ends once blue writes again.
pub async fn drain_target(blue: &Client) -> Result<Lsn, SourceError> {
    let lsn = current_wal_lsn(blue).await?;
    // `local`: blue's own flush is all its walsender needs; a synchronous standby that is slow
    // or down must not hold the cutover.
    let flush = async {
        blue.batch_execute("BEGIN READ WRITE; SET LOCAL synchronous_commit = local")
            .await?;
        blue.execute(
            "SELECT pg_logical_emit_message(true, $1, '')",
            &[&DRAIN_MESSAGE_PREFIX],
        )
        .await?;
        blue.batch_execute("COMMIT").await
    };
    match tokio::time::timeout(DRAIN_FLUSH_TIMEOUT, flush).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = blue.batch_execute("ROLLBACK").await;
            tracing::warn!(
                error = %crate::failure::DbFailure::from_pg(&e),
                "cannot make blue flush its WAL for the drain; it ends once blue writes again"
            );
        }
        // The caller drops this connection, which ends the transaction.
        Err(_) => tracing::warn!(
            "blue did not commit the drain's flush marker in time; the drain ends once blue writes again"
        ),
    }
    Ok(lsn)
}

/// The slot's confirmed position as blue records it.
pub async fn slot_confirmed(blue: &Client, slot: &str) -> Result<Lsn, SourceError> {
    let confirmed: Option<Lsn> = blue
        .query_opt(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(blue_err("reading the slot's confirmed position"))?
        .and_then(|r| r.get(0));
    // No slot (dropped under us) or no position yet: nothing is confirmed, which never ends
    // a drain early (the stream then fails on the missing slot, and says so).
    Ok(confirmed.unwrap_or(Lsn::ZERO))
}

/// Longest a drain's report waits for blue to release the slot and decode what follows it.
const PEEK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The end LSN of the first blue transaction that changed a published table after the slot's
/// confirmed position (up to blue's flushed WAL), without consuming it; `None` when blue wrote
/// nothing there. Needs the slot released (the stream ended): blue may take a moment to notice
/// the end of its walsender, so an active slot is tried again until [`PEEK_TIMEOUT`].
pub async fn first_change_after_confirmed(
    blue: &Client,
    slot: &str,
    publication: &str,
) -> Result<Option<Lsn>, SourceError> {
    // Decoding reads WAL from the slot's restart point: bounded, so a report is never held
    // long by a busy blue.
    blue.batch_execute(&format!(
        "SET statement_timeout = {}",
        PEEK_TIMEOUT.as_millis()
    ))
    .await
    .map_err(blue_err("limiting the slot's peek"))?;
    let deadline = std::time::Instant::now() + PEEK_TIMEOUT;
    loop {
        // One transaction at most (the first producing output); pgoutput sends no empty one.
        let peek = blue
            .query_one(
                "SELECT max(lsn) FROM pg_logical_slot_peek_binary_changes($1, NULL, 1,
                        'proto_version', '1', 'publication_names', $2)",
                &[&slot, &crate::transform::quote_ident(publication)],
            )
            .await;
        match peek {
            Ok(row) => return Ok(row.get(0)),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(blue_err("peeking at the slot after the drain")(e)),
        }
    }
}
