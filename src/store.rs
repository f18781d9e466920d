//! shadowsync's own schema on green (`shadowsync`), created and upgraded by numbered
//! migrations in one place, with every applied version recorded in `shadowsync.schema_version`.
//!
//! Invariants:
//! - Migrations only ever add: a green made by any earlier release upgrades in place, with its
//!   progress, conflicts and copy state kept. Version 1 is the schema releases made before
//!   versioning existed, so it creates only what is missing.
//! - One migrator at a time (a transaction-scoped advisory lock), each migration and its
//!   version row in that one transaction: a crash leaves green at a recorded version.
//! - A green already at the latest version is read, not written: no DDL, no lock, no privilege
//!   beyond reading the version table.
//! - A green migrated by a newer release is refused, not downgraded.

use tokio_postgres::Client;

use crate::failure::DbFailure;

/// Schema holding shadowsync's own tables in green.
pub const SCHEMA: &str = "shadowsync";

/// One step of the schema's history.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    /// What it adds, recorded with it.
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first; versions are consecutive from 1. Never edit a released one:
/// add the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "progress, conflicts and initial-copy state",
        sql: V1,
    },
    Migration {
        version: 2,
        name: "cutover state per slot",
        sql: V2,
    },
    Migration {
        version: 3,
        name: "verify points per slot and target",
        sql: V3,
    },
];

/// The schema of the releases before versioning, verbatim (hence `IF NOT EXISTS`).
const V1: &str = "
CREATE TABLE IF NOT EXISTS shadowsync.progress (
    slot        text PRIMARY KEY,
    end_lsn     pg_lsn NOT NULL,
    commit_time timestamptz,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE shadowsync.progress IS
    'shadowsync: end LSN and commit time of the last blue transaction applied, per slot; written in the same transaction as the data';
CREATE TABLE IF NOT EXISTS shadowsync.conflicts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    detected_at  timestamptz NOT NULL DEFAULT now(),
    slot         text NOT NULL,
    source_table text NOT NULL,
    target_table text NOT NULL,
    key          jsonb NOT NULL,
    kind         text NOT NULL,
    resolution   text NOT NULL,
    incoming     jsonb,
    existing     jsonb,
    commit_lsn   pg_lsn NOT NULL,
    commit_time  timestamptz NOT NULL,
    resolved_at  timestamptz
);
CREATE INDEX IF NOT EXISTS conflicts_detected_at ON shadowsync.conflicts (detected_at);
COMMENT ON TABLE shadowsync.conflicts IS
    'shadowsync: changes from blue that disagreed with green''s row (kind), what was done (resolution: apply = blue''s version written, keep = green''s row kept, skip = nothing could be written), both versions, and the blue commit; resolved_at is set by shadowsync conflicts --replay';
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

/// A slot cut over: from then on green belongs to the application and `run` refuses to write.
const V2: &str = "
CREATE TABLE shadowsync.cutover (
    slot        text PRIMARY KEY,
    fence_lsn   pg_lsn NOT NULL,
    cut_over_at timestamptz NOT NULL DEFAULT now(),
    report      jsonb
);
COMMENT ON TABLE shadowsync.cutover IS
    'shadowsync: slots cut over to green (blue fenced at fence_lsn, everything before it applied, sequences set); shadowsync run refuses to write for them; shadowsync reset clears the row';
";

/// Each target a completed `verify` compared, at its consistent point: what `verify
/// --since-lsn` starts from (only rows written after the point need comparing in full).
const V3: &str = "
CREATE TABLE shadowsync.verify_points (
    slot        text NOT NULL,
    lsn         pg_lsn NOT NULL,
    target      text NOT NULL,
    mapping     text NOT NULL,
    blue_xmin   xid8 NOT NULL,
    green_xmin  xid8 NOT NULL,
    matched     boolean NOT NULL,
    since_lsn   pg_lsn,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, lsn, target)
);
COMMENT ON TABLE shadowsync.verify_points IS
    'shadowsync: targets compared by a completed verify at blue LSN lsn (matched: green equalled the transform of blue); mapping fingerprints the rule compared; blue_xmin and green_xmin are the oldest transactions still running in each side''s snapshot (a row version with an older xmin existed at the point); since_lsn is the point an incremental verify started from';
";

/// The version table itself, outside the numbered history (it records it).
const VERSION_TABLE: &str = "
CREATE SCHEMA IF NOT EXISTS shadowsync;
CREATE TABLE IF NOT EXISTS shadowsync.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    release    text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE shadowsync.schema_version IS
    'shadowsync: migrations of this schema applied to this database, and the release that applied each';
";

/// The latest version this release knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("green, {context}: {failure}")]
    Green {
        context: &'static str,
        failure: DbFailure,
    },
    #[error(
        "green's shadowsync schema is at version {found}, written by shadowsync {release}; this release ({ours}) knows versions up to {known} and will not downgrade it: run shadowsync {release} or later"
    )]
    Newer {
        found: i32,
        known: i32,
        release: String,
        ours: &'static str,
    },
}

impl StoreError {
    /// Worth a retry: only a failure of the database itself (a restart, a lock timeout).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Green { failure, .. } => failure.is_retryable(),
            StoreError::Newer { .. } => false,
        }
    }
}

fn green_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Green {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// Green's recorded version and the release that wrote it; 0 when nothing is recorded.
pub async fn version(client: &Client) -> Result<(i32, String), StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shadowsync.schema_version') IS NOT NULL",
            &[],
        )
        .await
        .map_err(green_err("looking up shadowsync.schema_version"))?
        .get(0);
    if !exists {
        return Ok((0, String::new()));
    }
    let row = client
        .query_opt(
            "SELECT version, release FROM shadowsync.schema_version ORDER BY version DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(green_err("reading shadowsync.schema_version"))?;
    Ok(row.map_or((0, String::new()), |r| (r.get(0), r.get(1))))
}

/// Brings green's shadowsync schema to [`latest`]; returns the versions applied (empty when
/// green was up to date).
pub async fn migrate(client: &Client) -> Result<Vec<i32>, StoreError> {
    let (found, release) = version(client).await?;
    refuse_newer(found, release)?;
    if found == latest() {
        return Ok(Vec::new());
    }
    client
        .batch_execute("BEGIN")
        .await
        .map_err(green_err("starting the schema migration"))?;
    let result = migrate_locked(client).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = client.batch_execute(end).await;
    let applied = result?;
    ended.map_err(green_err("committing the schema migration"))?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, latest = latest(), "migrated shadowsync's schema on green");
    }
    Ok(applied)
}

/// Inside the migration's transaction: waits for any other migrator, then applies what is
/// still missing (another process may have done it meanwhile).
async fn migrate_locked(client: &Client) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute("SELECT pg_advisory_xact_lock(hashtextextended('shadowsync.schema', 0))")
        .await
        .map_err(green_err("waiting for another schema migration"))?;
    client
        .batch_execute(VERSION_TABLE)
        .await
        .map_err(green_err("creating shadowsync.schema_version"))?;
    let (found, release) = version(client).await?;
    refuse_newer(found, release)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        client
            .batch_execute(m.sql)
            .await
            .map_err(green_err("applying a migration of the shadowsync schema"))?;
        client
            .execute(
                "INSERT INTO shadowsync.schema_version (version, name, release) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &env!("CARGO_PKG_VERSION")],
            )
            .await
            .map_err(green_err("recording a migration of the shadowsync schema"))?;
        applied.push(m.version);
    }
    Ok(applied)
}

fn refuse_newer(found: i32, release: String) -> Result<(), StoreError> {
    if found > latest() {
        return Err(StoreError::Newer {
            found,
            known: latest(),
            release,
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
    }
}
