//! The rollback stream's start, made by `cutover` on green (`[reverse]` or `--reverse-config`):
//! the publication the reverse stream reads and its logical slot (pgoutput), created inside the
//! fence, after the drain, before green is marked and reported ready.
//!
//! Invariants:
//! - The slot's consistent point precedes green's cutover mark: every write the application
//!   makes on green once told it is ready is after it, so the reverse stream misses none.
//! - Creating a logical slot waits for every transaction running on green to end; shadowsync's
//!   own sessions on green are idle here (the drain ended the stream), and the wait is bounded
//!   by the cutover's `--timeout` (`statement_timeout`).
//! - What this created is dropped again when the cutover aborts ([`undo`]): a fence removed
//!   leaves nothing of the reverse stream behind. A publication that existed before is kept.
//! - The publication lists tables by name (never `FOR ALL TABLES`), so shadowsync's own schema
//!   on green (`shadowsync.progress`, the cutover mark) is never streamed back.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::ReverseConfig;
use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::transform::QualifiedName;

#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    #[error("green, {context}: {failure}")]
    Green {
        context: &'static str,
        failure: DbFailure,
    },
    #[error(
        "[reverse] cannot be prepared on green: {missing}. Nothing was fenced; grant it, or remove [reverse] to cut over without a rollback stream"
    )]
    Privileges { missing: String },
    #[error(
        "the reverse slot {slot} exists on green already (a rehearsal, or an earlier cutover): its start would not be this cutover's. Drop it on green (SELECT pg_drop_replication_slot('{slot}')) and cut over again; nothing was fenced"
    )]
    SlotExists { slot: String },
    #[error(
        "[reverse] names no table: set reverse.tables, or map at least one table in this config"
    )]
    NoTables,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn green_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ReverseError {
    move |e| ReverseError::Green {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// What the report says of the reverse stream (JSON `reverse`).
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    /// The reverse config's `blue.slot`.
    pub slot: String,
    /// The reverse config's `blue.publication`.
    pub publication: String,
    /// The slot's consistent point: the reverse stream starts here; green's mark is after it.
    pub start_lsn: Lsn,
    /// Whether the publication was created by this cutover (else it existed).
    pub publication_created: bool,
    /// Time to create the publication and the slot (part of the write outage), in seconds.
    pub create_seconds: f64,
    pub tables: Vec<String>,
}

/// `--reverse-config F`: the `[reverse]` that F streams from (its `blue.slot` and
/// `blue.publication`), checked against the forward config.
pub fn of_config(
    back: &crate::config::Config,
    forward: &crate::config::Config,
) -> Result<ReverseConfig, crate::config::ConfigError> {
    let reverse = ReverseConfig {
        slot: back.blue.slot.clone(),
        publication: back.blue.publication.clone(),
        tables: forward
            .reverse
            .as_ref()
            .map(|r| r.tables.clone())
            .unwrap_or_default(),
    };
    reverse.validate(&forward.blue.slot)?;
    Ok(reverse)
}

/// The publication's tables: `reverse.tables`, else every target of the mappings.
pub fn tables(
    reverse: &ReverseConfig,
    targets: &[QualifiedName],
) -> Result<Vec<QualifiedName>, ReverseError> {
    let mut tables: Vec<QualifiedName> = if reverse.tables.is_empty() {
        targets.to_vec()
    } else {
        reverse
            .tables
            .iter()
            .filter_map(|t| crate::transform::rules::qualified(t))
            .collect()
    };
    tables.sort_by_key(|t| t.to_string());
    tables.dedup();
    if tables.is_empty() {
        return Err(ReverseError::NoTables);
    }
    Ok(tables)
}

/// Before the fence: the slot must not exist, and green's user must be able to create it (and
/// the publication, when missing). Writes nothing; returns the checks passed, in words.
pub async fn precheck(
    green: &Client,
    reverse: &ReverseConfig,
    tables: &[QualifiedName],
) -> Result<String, ReverseError> {
    let slot_exists: bool = green
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&reverse.slot],
        )
        .await
        .map_err(green_err("looking for the reverse slot"))?
        .get(0);
    if slot_exists {
        return Err(ReverseError::SlotExists {
            slot: reverse.slot.clone(),
        });
    }
    let row = green
        .query_one(
            "SELECT r.rolsuper OR r.rolreplication, current_user::text,
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
                    has_database_privilege(current_database(), 'CREATE'),
                    current_setting('wal_level'),
                    current_setting('max_replication_slots')::int
                      - (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int
               FROM pg_roles r WHERE r.rolname = current_user",
            &[&reverse.publication],
        )
        .await
        .map_err(green_err("reading the green user's attributes"))?;
    let (may_replicate, user, pub_exists, may_create, wal_level): (
        bool,
        String,
        bool,
        bool,
        String,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let (free_slots, wal_senders): (i32, i32) = (row.get(5), row.get(6));
    let mut missing = Vec::new();
    if free_slots < 1 {
        missing.push(
            "a free replication slot (max_replication_slots is reached: raise it, restart)".into(),
        );
    }
    if wal_senders < 1 {
        missing.push(
            "a WAL sender for the reverse stream (max_wal_senders = 0: raise it, restart)".into(),
        );
    }
    if wal_level != "logical" {
        missing.push(format!(
            "green's wal_level is {wal_level}: set wal_level = logical (restart) for the reverse slot"
        ));
    }
    if !may_replicate {
        missing.push(format!(
            "the REPLICATION attribute, to create the reverse slot (ALTER ROLE \"{user}\" REPLICATION)"
        ));
    }
    if !pub_exists {
        missing.extend(publication_missing(green, reverse, tables, may_create).await?);
    }
    if !missing.is_empty() {
        return Err(ReverseError::Privileges {
            missing: missing.join("; "),
        });
    }
    Ok(format!(
        "green user may create the reverse slot {} and {} publication {}",
        reverse.slot,
        if pub_exists { "read" } else { "create" },
        reverse.publication
    ))
}

/// What green's user lacks to create the reverse publication over `tables`.
async fn publication_missing(
    green: &Client,
    reverse: &ReverseConfig,
    tables: &[QualifiedName],
    may_create: bool,
) -> Result<Vec<String>, ReverseError> {
    let mut missing = Vec::new();
    if !may_create {
        missing.push(format!(
            "CREATE on the database, to create publication {} (or create it beforehand)",
            reverse.publication
        ));
    }
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let not_owned: Vec<String> = green
        .query(
            "SELECT t.name FROM unnest($1::text[]) AS t(name)
              WHERE to_regclass(t.name) IS NULL
                 OR NOT pg_has_role(current_user,
                          (SELECT relowner FROM pg_class WHERE oid = to_regclass(t.name)), 'USAGE')",
            &[&names],
        )
        .await
        .map_err(green_err("reading the reverse tables' owners"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if !not_owned.is_empty() {
        missing.push(format!(
            "ownership of {} (missing, or owned by another role), to publish them",
            not_owned.join(", ")
        ));
    }
    Ok(missing)
}

/// Inside the fence, after the drain: the publication (when missing), then the slot. On a
/// failure, what was created is dropped again.
pub async fn prepare(
    green: &Client,
    reverse: &ReverseConfig,
    tables: &[QualifiedName],
    timeout: Duration,
) -> Result<Prepared, ReverseError> {
    let started = std::time::Instant::now();
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let exists: bool = green
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&reverse.publication],
        )
        .await
        .map_err(green_err("looking for the reverse publication"))?
        .get(0);
    if !exists {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            crate::transform::quote_ident(&reverse.publication),
            names.join(", ")
        );
        green
            .batch_execute(&sql)
            .await
            .map_err(green_err("creating the reverse publication"))?;
    }
    let mut prepared = Prepared {
        slot: reverse.slot.clone(),
        publication: reverse.publication.clone(),
        start_lsn: Lsn::ZERO,
        publication_created: !exists,
        create_seconds: 0.0,
        tables: tables.iter().map(|t| t.to_string()).collect(),
    };
    match create_slot(green, &reverse.slot, timeout).await {
        Ok(lsn) => {
            prepared.start_lsn = lsn;
            prepared.create_seconds = started.elapsed().as_secs_f64();
        }
        Err(e) => {
            undo(green, &prepared, false).await;
            return Err(e);
        }
    }
    tracing::info!(slot = %prepared.slot, start_lsn = %prepared.start_lsn, publication = %prepared.publication, "reverse stream ready on green: its slot holds every write from here on");
    Ok(prepared)
}

/// The logical slot, waiting at most `timeout` for green's running transactions.
async fn create_slot(green: &Client, slot: &str, timeout: Duration) -> Result<Lsn, ReverseError> {
    let ms = timeout.as_millis().max(1) as i64;
    green
        .execute(
            "SELECT set_config('statement_timeout', $1, false)",
            &[&ms.to_string()],
        )
        .await
        .map_err(green_err("bounding the reverse slot's creation"))?;
    let created = green
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(green_err(
            "creating the reverse slot (it waits for every transaction running on green to end)",
        ));
    let reset = green
        .batch_execute("RESET statement_timeout")
        .await
        .map_err(green_err("resetting statement_timeout"));
    let lsn = created?.get(0);
    reset?;
    Ok(lsn)
}

/// Drops what [`prepare`] created (the slot when `slot` says it exists, the publication when
/// it created it). Best effort: a failure is logged with the statement to run by hand.
pub async fn undo(green: &Client, prepared: &Prepared, slot: bool) {
    if slot
        && let Err(e) = green
            .execute("SELECT pg_drop_replication_slot($1)", &[&prepared.slot])
            .await
    {
        tracing::error!(error = %DbFailure::from_pg(&e), slot = %prepared.slot, "could not drop the reverse slot: drop it on green by hand (SELECT pg_drop_replication_slot(...))");
    }
    if prepared.publication_created {
        let sql = format!(
            "DROP PUBLICATION IF EXISTS {}",
            crate::transform::quote_ident(&prepared.publication)
        );
        if let Err(e) = green.batch_execute(&sql).await {
            tracing::error!(error = %DbFailure::from_pg(&e), publication = %prepared.publication, "could not drop the reverse publication: drop it on green by hand");
        }
    }
}

/// `cutover --abort` of a cutover killed between the reverse slot's creation and green's mark:
/// drops the reverse slot when the forward slot `forward_slot` is not cut over (the slot's start
/// would be no cutover's) and nothing reads it. Returns what was done, in words; `None` when
/// there was nothing to drop. The publication is kept (it holds no WAL).
pub async fn abandon(
    green: &Client,
    reverse: &ReverseConfig,
    forward_slot: &str,
) -> Result<Option<String>, ReverseError> {
    crate::store::migrate(green).await?;
    if crate::progress::cut_over(green, forward_slot)
        .await
        .map_err(green_err("reading the cutover state"))?
        .is_some()
    {
        return Ok(None);
    }
    let dropped = green
        .query_opt(
            "SELECT pg_drop_replication_slot(slot_name)::text FROM pg_replication_slots
              WHERE slot_name = $1 AND NOT active",
            &[&reverse.slot],
        )
        .await
        .map_err(green_err("dropping the reverse slot"))?;
    Ok(dropped.map(|_| {
        format!(
            "reverse slot {} dropped from green (slot {forward_slot} was not cut over)",
            reverse.slot
        )
    }))
}
