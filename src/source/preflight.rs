//! Checks of blue (and of green against blue) before streaming, and slot management.
//!
//! Every failure is a [`SourceError::Setup`] telling the operator what is wrong and what to run;
//! nothing here writes to either database except creating a missing slot.

use tokio_postgres::Client;

use super::SourceError;
use crate::lsn::Lsn;
use crate::transform::QualifiedName;
use crate::transform::rules::RuleSet;

/// What the preflight learned about blue.
#[derive(Debug, Clone)]
pub struct BlueState {
    /// The slot's `confirmed_flush_lsn`; `None` when the slot does not exist yet.
    pub slot_confirmed: Option<Lsn>,
    /// Tables in the publication.
    pub tables: Vec<QualifiedName>,
    /// Mappings of the replicated tables (not skipped), from blue's catalog.
    pub maps: Vec<std::sync::Arc<crate::transform::TableMap>>,
}

fn blue_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |e| SourceError::Blue {
        context,
        failure: crate::failure::DbFailure::from_pg(&e),
    }
}

/// Checks blue's settings, the user's privilege, the publication, the mapping of every
/// published table (see `check`) and the slot (see [`slot_state`]). Creates nothing.
pub async fn check(
    blue: &Client,
    green: &Client,
    slot: &str,
    publication: &str,
    rules: &RuleSet,
    green_progress: Option<Lsn>,
) -> Result<BlueState, SourceError> {
    let tables = check_blue(blue, publication).await?;
    let report = crate::check::check(blue, green, &tables, publication, rules)
        .await
        .map_err(blue_err("checking the mappings"))?;
    if !report.ok() {
        return Err(SourceError::Setup(report.problems_text()));
    }
    for m in &report.mappings {
        for w in &m.warnings {
            tracing::warn!(table = %m.source, warning = %w, "a green column may reject blue's values");
        }
    }
    let maps = report
        .mappings
        .iter()
        .filter_map(|m| m.map.clone())
        .collect();
    let slot_confirmed = slot_state(blue, slot, green_progress).await?;
    Ok(BlueState {
        slot_confirmed,
        tables,
        maps,
    })
}

/// Blue's settings, the user's REPLICATION attribute and the publication; returns the tables
/// in the publication. Writes nothing.
pub async fn check_blue(
    blue: &Client,
    publication: &str,
) -> Result<Vec<QualifiedName>, SourceError> {
    let wal_level: String = blue
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(blue_err("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup(format!(
            "blue's wal_level is '{wal_level}', logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; on blue and restart it"
        )));
    }
    let row = blue
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(blue_err("reading the user's attributes"))?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(SourceError::Setup(format!(
            "blue user {user} lacks the REPLICATION attribute: run ALTER ROLE \"{user}\" REPLICATION; on blue (or connect as a user that has it)"
        )));
    }
    let exists = blue
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(blue_err("looking up the publication"))?
        .is_some();
    if !exists {
        return Err(SourceError::Setup(format!(
            "publication {publication} does not exist on blue: create it with\n  CREATE PUBLICATION \"{publication}\" FOR TABLE <schema.table>, ...;\nor, to replicate every table,\n  CREATE PUBLICATION \"{publication}\" FOR ALL TABLES;"
        )));
    }
    let tables: Vec<QualifiedName> = blue
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(blue_err("listing the publication's tables"))?
        .into_iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(tables)
}

/// The slot's confirmed position; `None` when it does not exist. A missing slot that green has
/// progress for is refused: changes between that progress and a new slot's start would be lost
/// without a trace (a failover to a standby without the slot, a dropped slot).
async fn slot_state(
    blue: &Client,
    slot: &str,
    green_progress: Option<Lsn>,
) -> Result<Option<Lsn>, SourceError> {
    let row = blue
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn, current_database()::text
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
