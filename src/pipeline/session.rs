//! One streaming session: connect both sides, check them, resume from the right LSN, run the
//! source and apply tasks until stopped or failed.
//!
//! Invariant: the session resumes at max(slot's confirmed position, green's progress): green's
//! progress is authoritative for data, the slot may be ahead only over WAL that held nothing
//! to apply (idle confirmations).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use super::PipelineError;
use super::preflight;
use crate::apply::stage::{ApplyStage, Limits};
use crate::apply::{Applier, ApplyError, Switch};
use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::{Shared, State};
use crate::shutdown::Shutdown;
use crate::source::{self, SourceError, SourceStage};

/// How often blue's WAL position is polled for the lag metric.
const WAL_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Runs a session until `stop` fires (clean end, `None`), a planned switch ends it
/// (`Some`: the next session writes differently), or an error. `on_start` receives the LSN
/// streaming resumed from.
pub async fn run(
    config: &Config,
    shared: &Arc<Shared>,
    stop: Shutdown,
    recovery: &crate::apply::Recovery,
    snapshot_truncate: bool,
    on_start: impl FnOnce(Lsn),
) -> Result<Option<Switch>, PipelineError> {
    let green_dsn = config.green_dsn()?;
    let rules = Arc::new(config.rules()?);
    let blue_dsn = config.blue_dsn()?;
    let mut applier = Applier::connect(&green_dsn, &config.blue.slot).await?;
    applier.upsert_only = recovery.upsert_only.clone();
    // Before anything else: after a cutover, green's rows are the application's.
    let cut_over = crate::progress::cut_over(applier.client(), &config.blue.slot)
        .await
        .map_err(|source| ApplyError::Green {
            context: "reading the cutover state",
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    if let Some(c) = cut_over {
        return Err(ApplyError::CutOver {
            slot: config.blue.slot.clone(),
            fence_lsn: c.fence_lsn,
            at: c.at,
        }
        .into());
    }
    shared.green_connected.store(true, Ordering::Relaxed);

    let (blue, blue_conn) =
        blue_dsn
            .connect("shadowsync")
            .await
            .map_err(|source| SourceError::Connect {
                dsn: blue_dsn.to_string(),
                failure: crate::failure::DbFailure::from_pg(&source),
            })?;
    let _abort_blue = AbortOnDrop(blue_conn);
    shared.blue_connected.store(true, Ordering::Relaxed);

    let progress = crate::progress::read(applier.client(), &config.blue.slot)
        .await
        .map_err(|source| ApplyError::Green {
            context: "reading progress",
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    let state = preflight::check(
        &blue,
        applier.client(),
        &config.blue.slot,
        &config.blue.publication,
        &rules,
        progress.map(|p| p.end_lsn),
    )
    .await?;
    if !applier.replica_role {
        check_foreign_keys(&applier, &state.tables).await?;
    }
    let mut stop_copy = stop.clone();
    let prepared = tokio::select! {
        biased;
        // A stop during the initial copy ends the session at once rather than after the copy:
        // the copy is left interrupted, and the next run copies the unfinished tables again
        // from a new snapshot (see `snapshot`).
        () = stop_copy.recv() => {
            info!("stopping during the initial copy; the next run finishes it from a new snapshot");
            return Ok(None);
        }
        prepared = crate::snapshot::prepare(
            config,
            &blue,
            applier.client(),
            &state.maps,
            state.slot_confirmed,
            snapshot_truncate,
            shared,
        ) => prepared?,
    };
    let green_lsn = progress.map(|p| p.end_lsn).unwrap_or_default();
    let start = prepared.slot_confirmed.max(green_lsn);
    info!(
        slot = %config.blue.slot,
        slot_confirmed = %prepared.slot_confirmed,
        green_progress = %green_lsn,
        start = %start,
        tables = state.tables.len(),
        "resuming"
    );

    let repl_cfg = source::replication_config(
        &blue_dsn,
        &config.blue.slot,
        &config.blue.publication,
        start,
        Duration::from_millis(config.blue.status_interval_ms),
    );
    let client = source::connect(repl_cfg, &blue_dsn).await?;
    shared.streaming.store(true, Ordering::Relaxed);
    shared.set_state(State::Streaming);
    on_start(start);

    let poll = tokio::spawn(poll_wal(blue, shared.clone()));
    let _abort_poll = AbortOnDrop(poll);

    let (tx, rx) = mpsc::channel(source::channel_runs(config.batch.channel_capacity));
    let (committed_tx, committed_rx) = watch::channel(start);
    let limits = Limits {
        max_rows: config.batch.max_rows,
        max_bytes: config.batch.max_bytes,
        max_delay: config.batch_max_delay(),
    };
    // A second blue connection completes TOASTed rows that rules need (rare, never per row).
    let (fetch, fetch_conn) = blue_dsn
        .connect("shadowsync-fetch")
        .await
        .map_err(|source| SourceError::Connect {
            dsn: blue_dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    let _abort_fetch = AbortOnDrop(fetch_conn);
    let apply = ApplyStage::new(
        applier,
        rules,
        Some(fetch),
        limits,
        start,
        recovery.serial_until,
        committed_tx,
        shared.clone(),
    )
    .with_copied_at(prepared.copied_at);
    let source = SourceStage::new(client, &blue_dsn, start, shared.clone());
    let apply_task = tokio::spawn(apply.run(rx).instrument(info_span!("apply")));
    let source_task = tokio::spawn(
        source
            .run(tx, committed_rx, stop)
            .instrument(info_span!("source")),
    );

    let source_result = source_task.await.map_err(PipelineError::task("source"))?;
    let apply_result = apply_task.await.map_err(PipelineError::task("apply"))?;
    shared.streaming.store(false, Ordering::Relaxed);
    shared.forget_unapplied();
    // The apply error is the root cause when both failed (the source stops because apply did).
    match apply_result {
        Err(ApplyError::Switch(switch)) => return Ok(Some(switch)),
        other => other?,
    }
    source_result?;
    Ok(None)
}

/// Without `session_replication_role = replica`, set-based statements could trip foreign keys
/// between replicated tables mid-batch: refuse, naming the constraint and the fix.
async fn check_foreign_keys(
    applier: &Applier,
    tables: &[crate::transform::QualifiedName],
) -> Result<(), PipelineError> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let row = applier
        .client()
        .query_opt(
            "SELECT c.conname::text, c.conrelid::regclass::text, current_user::text
               FROM pg_constraint c
              WHERE c.contype = 'f'
                AND c.conrelid IN (SELECT to_regclass(n) FROM unnest($1::text[]) AS n)
              LIMIT 1",
            &[&names],
        )
        .await
        .map_err(|source| ApplyError::Green {
            context: "listing foreign keys",
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    if let Some(row) = row {
        return Err(ApplyError::NeedsReplicaRole {
            constraint: row.get(0),
            table: row.get(1),
            user: row.get(2),
        }
        .into());
    }
    Ok(())
}

async fn poll_wal(blue: tokio_postgres::Client, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(WAL_POLL_INTERVAL);
    loop {
        tick.tick().await;
        match source::slot::current_wal_lsn(&blue).await {
            Ok(lsn) => {
                shared.set_blue_wal(lsn);
                shared.blue_connected.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                shared.blue_connected.store(false, Ordering::Relaxed);
                warn!(error = %e, "cannot read blue's WAL position");
                return;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
