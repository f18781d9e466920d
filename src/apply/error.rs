//! The apply stage's errors: what green refused, what the stream could not map, and the
//! planned switches that end a session on purpose.
//!
//! Invariants: every error names the table and the blue LSN it stopped at, keeps green's own
//! message (SQLSTATE, constraint), and a permanent one says what to fix; retry or not is decided
//! in one place, [`ApplyError::is_retryable`], from the SQLSTATE (see `failure`).

use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::transform::MapError;

use super::batch::BatchError;
use super::recovery::Switch;

/// " for table T", or nothing for a statement of no table (BEGIN, COMMIT).
fn for_table(table: &str) -> String {
    if table.is_empty() {
        String::new()
    } else {
        format!(" for table {table}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "cannot connect to green ({dsn}): {failure}; check green.dsn, that green is up, and the password (SHADOWSYNC_GREEN_PASSWORD or pgpass)"
    )]
    Connect { dsn: String, failure: DbFailure },
    #[error(
        "green rejected {what}{} (blue LSN {}): {failure}{hint}",
        for_table(table),
        *.lsn
    )]
    Statement {
        what: &'static str,
        table: String,
        lsn: Lsn,
        failure: Box<DbFailure>,
        hint: &'static str,
    },
    #[error("green: {context}: {failure}")]
    Green {
        context: &'static str,
        failure: DbFailure,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("a change at blue LSN {lsn} for a table that cannot be mapped: {error}")]
    Unmapped { lsn: Lsn, error: MapError },
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(
        "blue sent a change for relation OID {oid} at LSN {lsn} before describing it; this is a protocol error, restart shadowsync"
    )]
    UnknownRelation { oid: u32, lsn: Lsn },
    #[error(
        "table {table}: an update left out TOASTed values its rule needs, and there is no connection to blue to read them; this is a bug, report it"
    )]
    NeedsBlue { table: String },
    #[error(
        "blue table {table} no longer has the columns (or no longer exists) needed to complete unchanged TOAST values of a change still in the stream: {failure}; re-seed green for this table (or, before such schema changes, set REPLICA IDENTITY FULL on blue so the old row carries the values)"
    )]
    ToastGone { table: String, failure: DbFailure },
    #[error("reading unchanged TOAST values of blue table {table}: {failure}")]
    Blue { table: String, failure: DbFailure },
    #[error(
        "green has foreign key {constraint} on {table}, but user {user} may not set session_replication_role; grant it (GRANT SET ON PARAMETER session_replication_role TO {user}) or run as a superuser, as PostgreSQL's own subscriptions do"
    )]
    NeedsReplicaRole {
        constraint: String,
        table: String,
        user: String,
    },
    #[error(
        "green rejects the row of blue table {source_table} with key {key} (blue LSN {}) for {target}: {failure}{hint}; nothing from that transaction on was applied or confirmed: fix the rule, green's constraint or column type, then restart: the stream resumes at that transaction",
        *.lsn
    )]
    Poison {
        source_table: String,
        target: String,
        key: String,
        lsn: Lsn,
        failure: Box<DbFailure>,
        hint: &'static str,
    },
    /// A planned change of how green is written (not a failure): ends the session, which
    /// the supervisor resumes at once with it (see [`Switch`]).
    #[error(transparent)]
    Switch(#[from] Switch),
    #[error("the background write of a chunk failed: {0}; this is a bug, report it")]
    WriteTask(String),
    #[error(
        "another shadowsync session for slot {slot} is connected to green (or a killed one's transaction is still open there); waiting for it to end"
    )]
    SessionBusy { slot: String },
    #[error(
        "slot {slot} was cut over to green at blue LSN {fence_lsn} ({at}): green belongs to the application now, and shadowsync writes nothing to it for this slot. To start over after a rehearsal or a failed cutover, run shadowsync reset --config F (add --truncate to empty the target tables); to go back to blue, follow the README's rollback runbook"
    )]
    CutOver {
        slot: String,
        fence_lsn: Lsn,
        at: String,
    },
}

impl ApplyError {
    /// The one place deciding whether a failure is worth a reconnect and retry.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Statement { failure, .. } => failure.is_retryable(),
            ApplyError::Store(e) => e.is_retryable(),
            ApplyError::Connect { failure, .. }
            | ApplyError::Green { failure, .. }
            | ApplyError::Blue { failure, .. } => failure.is_retryable(),
            ApplyError::SessionBusy { .. } | ApplyError::Switch(_) => true,
            ApplyError::Map(_)
            | ApplyError::Unmapped { .. }
            | ApplyError::Batch(_)
            | ApplyError::UnknownRelation { .. }
            | ApplyError::NeedsBlue { .. }
            | ApplyError::ToastGone { .. }
            | ApplyError::Poison { .. }
            | ApplyError::WriteTask(_)
            | ApplyError::CutOver { .. }
            | ApplyError::NeedsReplicaRole { .. } => false,
        }
    }
}

/// `what` of the plain insert of new keys in errors (see `statement::insert_new`).
pub(crate) const NEW_KEYS: &str = "an insert of new keys";

/// Retry decision for a raw driver error (see [`DbFailure::is_retryable`]).
pub fn retryable_pg(e: &tokio_postgres::Error) -> bool {
    DbFailure::from_pg(e).is_retryable()
}

pub(super) fn green_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    move |e| ApplyError::Green {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// What a statement failure most likely means for the operator.
pub(super) fn hint_for(failure: &DbFailure) -> &'static str {
    match failure {
        f if f.is_data_exception() => {
            "; a blue value does not fit green's column type: align the column types (or add a transform rule), then restart"
        }
        f if f.is_integrity_violation() => {
            "; green's constraints reject the row: fix the row or the constraint on green, then restart"
        }
        f if f.is_schema_mismatch() => {
            "; green's table does not match blue's: align the schemas, then restart"
        }
        _ => "",
    }
}

pub(super) fn statement_error(
    what: &'static str,
    table: &str,
    lsn: Lsn,
    source: tokio_postgres::Error,
) -> ApplyError {
    let failure = DbFailure::from_pg(&source);
    ApplyError::Statement {
        what,
        table: table.to_string(),
        lsn,
        hint: hint_for(&failure),
        failure: Box::new(failure),
    }
}
