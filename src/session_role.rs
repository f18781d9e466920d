//! `session_replication_role = replica` on a green session, as PostgreSQL's own apply worker
//! runs: green's triggers and foreign keys do not fire for blue's changes, which arrive
//! consistent at each blue commit boundary.
//!
//! Invariant: only green's refusal of the setting itself (a user who may not set it) leaves
//! the session at `origin`; a lost connection or any other failure is an error, never
//! swallowed.

use tokio_postgres::Client;

use crate::failure::DbFailure;

/// Sets the role; `Ok(false)` when green refuses this user the setting.
pub async fn set_replica(client: &Client) -> Result<bool, tokio_postgres::Error> {
    match client
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code().is_some() && !DbFailure::from_pg(&e).is_retryable() => {
            tracing::info!(
                error = %DbFailure::from_pg(&e),
                "green: session_replication_role stays origin (foreign keys and triggers on green stay active)"
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
