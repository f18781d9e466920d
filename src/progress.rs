//! Exactly-once bookkeeping in green: one progress row per slot in `shadowsync.progress`
//! (created by `store`).
//!
//! Invariant: the progress row is written in the same green transaction as the data it covers,
//! so after any crash green's progress names exactly the last blue commit whose changes are in
//! green. `end_lsn` is the end LSN of that blue commit record: every transaction whose commit
//! record starts before it is already applied.

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// Upsert of the progress row; parameters: slot, end LSN, commit time (µs since 2000-01-01).
pub const WRITE_SQL: &str = "
INSERT INTO shadowsync.progress AS p (slot, end_lsn, commit_time, applied_at)
VALUES ($1, $2::pg_lsn, '2000-01-01 00:00:00+00'::timestamptz + $3::bigint * interval '1 microsecond', now())
ON CONFLICT (slot) DO UPDATE
   SET end_lsn = EXCLUDED.end_lsn, commit_time = EXCLUDED.commit_time, applied_at = EXCLUDED.applied_at";

/// Last applied blue commit for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// End LSN of the last applied commit.
    pub end_lsn: Lsn,
}

/// Reads the progress row of `slot`, if any.
pub async fn read(client: &Client, slot: &str) -> Result<Option<Progress>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT end_lsn FROM shadowsync.progress WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| Progress { end_lsn: r.get(0) }))
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC) as a `SystemTime`.
pub fn pg_time(micros: i64) -> std::time::SystemTime {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if micros >= 0 {
        epoch + std::time::Duration::from_micros(micros as u64)
    } else {
        epoch - std::time::Duration::from_micros(micros.unsigned_abs())
    }
}

/// A slot's cutover, as green records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOver {
    /// Blue's fence: everything blue committed before it is in green.
    pub fence_lsn: Lsn,
    /// When, as green's clock printed it.
    pub at: String,
}

/// The cutover of `slot`, if it was cut over.
pub async fn cut_over(
    client: &Client,
    slot: &str,
) -> Result<Option<CutOver>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT fence_lsn, cut_over_at::text FROM shadowsync.cutover WHERE slot = $1",
            &[&slot],
        )
        .await?
        .map(|r| CutOver {
            fence_lsn: r.get(0),
            at: r.get(1),
        }))
}

/// Records the cutover of `slot` (in the caller's transaction, with the sequences it sets).
pub async fn mark_cut_over(
    client: &impl tokio_postgres::GenericClient,
    slot: &str,
    fence_lsn: Lsn,
    report: &serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO shadowsync.cutover (slot, fence_lsn, report) VALUES ($1, $2, $3::text::jsonb)",
            &[&slot, &fence_lsn, &report.to_string()],
        )
        .await
        .map(|_| ())
}
