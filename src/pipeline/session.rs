//! One streaming session: connect both sides, check them, resume from the right LSN, run the
//! source and apply tasks until stopped or failed.
//!
//! Invariant: the session resumes at max(slot's confirmed position, green's progress): green's
//! progress is authoritative for data, the slot may be ahead only over WAL that held nothing
//! to apply (idle confirmations).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgwire_replication::ReplicationClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span};

use super::PipelineError;
use super::preflight::{self, BlueState};
use crate::apply::stage::{ApplyStage, Limits};
use crate::apply::{Applier, ApplyError, Switch};
use crate::config::{Config, Dsn};
use crate::lsn::Lsn;
use crate::metrics::{Shared, State};
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::snapshot::Prepared;
use crate::source::{self, SourceError, SourceStage};
use crate::transform::rules::RuleSet;

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
    let session = Session {
        config,
        shared,
        recovery,
        blue_dsn: &blue_dsn,
    };
    let mut applier = session.connect_green(&green_dsn).await?;
    let (blue, _abort_blue) = session.connect_blue().await?;
    let (progress, state) = session.preflight(&blue, &applier, &rules).await?;
    shared.known_tables(state.maps.iter().map(|m| m.label.as_str()));
    // Every mapping, before the stream describes any: a change of a looked-up table re-derives
    // its readers whether or not they have changed in this session.
    let fks = crate::source::catalog::foreign_keys(&blue).await?;
    applier.remaps = crate::apply::Remaps::new(state.maps.iter().cloned(), fks);
    let Some(prepared) = session
        .initial_copy(&stop, &blue, &applier, &state, snapshot_truncate)
        .await?
    else {
        return Ok(None);
    };
    let start = session.resume_at(&prepared, progress, state.tables.len());
    let client = session.connect_replication(start).await?;
    shared.streaming.store(true, Ordering::Relaxed);
    shared.set_state(State::Streaming);
    on_start(start);

    drop(blue); // blue's WAL position and the lag are the monitor's (see `monitor`)
    // A second blue connection completes TOASTed rows that rules need (rare, never per row).
    let (fetch, _abort_fetch) = session.blue_connection("shadowsync-fetch").await?;
    let parts = Parts {
        applier,
        rules,
        fetch,
        client,
        start,
        copied_at: prepared.copied_at,
    };
    session.spawn_stages(parts, stop).finish(shared).await
}

/// What the phases of one session share.
struct Session<'a> {
    config: &'a Config,
    shared: &'a Arc<Shared>,
    recovery: &'a crate::apply::Recovery,
    blue_dsn: &'a Dsn,
}

/// What the two stages are made of, once streaming has started.
struct Parts {
    applier: Applier,
    rules: Arc<RuleSet>,
    /// The blue connection completing TOASTed rows.
    fetch: tokio_postgres::Client,
    /// The replication connection.
    client: ReplicationClient,
    /// Where streaming resumed.
    start: Lsn,
    /// See [`crate::snapshot::Prepared::copied_at`].
    copied_at: HashMap<String, Lsn>,
}

impl Session<'_> {
    /// Connects to green (see [`Applier::connect`]), refusing a slot that was cut over.
    async fn connect_green(&self, green_dsn: &Dsn) -> Result<Applier, PipelineError> {
        let config = self.config;
        let mut applier = Applier::connect(green_dsn, &config.blue.slot).await?;
        applier.upsert_only = self.recovery.upsert_only.clone();
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
        // Under the slot's session lock (taken by `connect`): one session holds the origin.
        let marked = crate::origin::mark_session(
            applier.client(),
            "green",
            &config.blue.slot,
            config.origin.mark,
        )
        .await?;
        // Green the old blue of a rollback: its fence must let this stream through.
        crate::origin::check_fence(
            applier.client(),
            "green",
            crate::fence::TRIGGER,
            marked.as_deref(),
        )
        .await?;
        self.shared.green_connected.store(true, Ordering::Relaxed);
        Ok(applier)
    }

    /// The ordinary blue connection (catalog, initial copy, WAL position).
    async fn connect_blue(&self) -> Result<(tokio_postgres::Client, AbortOnDrop), PipelineError> {
        let (blue, abort_blue) = self.blue_connection("shadowsync").await?;
        self.shared.blue_connected.store(true, Ordering::Relaxed);
        Ok((blue, abort_blue))
    }

    /// A blue connection named `application_name`, closed when the guard drops.
    async fn blue_connection(
        &self,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, AbortOnDrop), SourceError> {
        let blue_dsn = self.blue_dsn;
        let (client, conn) =
            blue_dsn
                .connect(application_name)
                .await
                .map_err(|source| SourceError::Connect {
                    dsn: blue_dsn.to_string(),
                    failure: crate::failure::DbFailure::from_pg(&source),
                })?;
        Ok((client, AbortOnDrop(conn)))
    }

    /// Green's progress, and blue checked against the mappings (see `preflight::check`);
    /// without the replica role, replicated tables must not reference each other.
    async fn preflight(
        &self,
        blue: &tokio_postgres::Client,
        applier: &Applier,
        rules: &RuleSet,
    ) -> Result<(Option<Progress>, BlueState), PipelineError> {
        let config = self.config;
        let progress = crate::progress::read(applier.client(), &config.blue.slot)
            .await
            .map_err(|source| ApplyError::Green {
                context: "reading progress",
                failure: crate::failure::DbFailure::from_pg(&source),
            })?;
        let state = preflight::check(
            blue,
            applier.client(),
            &config.blue.slot,
            &config.blue.publication,
            rules,
            progress.map(|p| p.end_lsn),
        )
        .await?;
        if !applier.replica_role {
            check_foreign_keys(applier, &state.tables).await?;
        }
        Ok((progress, state))
    }

    /// The initial copy of the tables green lacks (see `snapshot::prepare`); `None` when `stop`
    /// fires first.
    async fn initial_copy(
        &self,
        stop: &Shutdown,
        blue: &tokio_postgres::Client,
        applier: &Applier,
        state: &BlueState,
        snapshot_truncate: bool,
    ) -> Result<Option<Prepared>, PipelineError> {
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
                self.config,
                blue,
                applier.client(),
                &state.maps,
                state.slot_confirmed,
                snapshot_truncate,
                self.shared,
            ) => prepared?,
        };
        Ok(Some(prepared))
    }

    /// Where streaming resumes: the later of the slot's confirmed position and green's progress
    /// (see the module's invariant).
    fn resume_at(&self, prepared: &Prepared, progress: Option<Progress>, tables: usize) -> Lsn {
        let green_lsn = progress.map(|p| p.end_lsn).unwrap_or_default();
        let start = prepared.slot_confirmed.max(green_lsn);
        info!(
            slot = %self.config.blue.slot,
            slot_confirmed = %prepared.slot_confirmed,
            green_progress = %green_lsn,
            start = %start,
            tables,
            "resuming"
        );
        start
    }

    /// The replication connection, streaming from `start`.
    async fn connect_replication(&self, start: Lsn) -> Result<ReplicationClient, PipelineError> {
        let config = self.config;
        let repl_cfg = source::replication_config(
            self.blue_dsn,
            &config.blue.slot,
            &config.blue.publication,
            start,
            Duration::from_millis(config.blue.status_interval_ms),
        );
        Ok(source::connect(repl_cfg, self.blue_dsn).await?)
    }

    /// Starts the apply and source stages, linked by the change channel and the committed LSN.
    fn spawn_stages(&self, parts: Parts, stop: Shutdown) -> Stages {
        let config = self.config;
        let (tx, rx) = mpsc::channel(source::channel_runs(config.batch.channel_capacity));
        let (committed_tx, committed_rx) = watch::channel(parts.start);
        let limits = Limits {
            max_rows: config.batch.max_rows,
            max_bytes: config.batch.max_bytes,
            max_delay: config.batch_max_delay(),
        };
        let apply = ApplyStage::new(
            parts.applier,
            parts.rules,
            Some(parts.fetch),
            limits,
            parts.start,
            self.recovery.serial_until,
            committed_tx,
            self.shared.clone(),
        )
        .with_copied_at(parts.copied_at)
        .with_origins(crate::origin::Filter::of(&config.origin));
        let source = SourceStage::new(
            parts.client,
            self.blue_dsn,
            parts.start,
            self.shared.clone(),
        );
        let apply = tokio::spawn(apply.run(rx).instrument(info_span!("apply")));
        let source = tokio::spawn(
            source
                .run(tx, committed_rx, stop)
                .instrument(info_span!("source")),
        );
        Stages { apply, source }
    }
}

/// The running stages of a session; dropped unfinished (a stalled session the supervisor gave
/// up on), it aborts them, which closes their connections: green rolls back the transaction in
/// flight, and blue was told nothing past green's last commit.
struct Stages {
    apply: JoinHandle<Result<(), ApplyError>>,
    source: JoinHandle<Result<(), SourceError>>,
}

impl Drop for Stages {
    fn drop(&mut self) {
        self.apply.abort();
        self.source.abort();
    }
}

impl Stages {
    /// Waits for both stages: `Some` for a planned switch, else the first error.
    async fn finish(mut self, shared: &Shared) -> Result<Option<Switch>, PipelineError> {
        let source_result = (&mut self.source)
            .await
            .map_err(PipelineError::task("source"))?;
        let apply_result = (&mut self.apply)
            .await
            .map_err(PipelineError::task("apply"))?;
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

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
