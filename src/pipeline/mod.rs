//! The pipeline supervisor: runs streaming sessions, retries lost connections with backoff,
//! serves drains and shutdowns, and builds the final report.
//!
//! Invariants:
//! - One shutdown signal: stop intake, let the apply stage commit every complete blue
//!   transaction it holds, confirm to blue, exit.
//! - A drain finishes only once everything committed on blue before it began (blue's WAL
//!   position at that moment) is applied in green *and* confirmed to blue.
//! - Retryable errors restart the session from green's progress; permanent errors stop the
//!   pipeline with the operator's next step. Before the first session ever streamed, retryable
//!   errors are retried only for `retry.startup_timeout_ms`, so a wrong DSN fails fast.

pub mod preflight;

pub use crate::drain::{DrainRequest, Report};
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::apply::ApplyError;
use crate::config::{Config, ConfigError};
use crate::lsn::Lsn;
use crate::metrics::{Shared, State};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::source::{SourceError, slot};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
    /// Not a `#[source]`: the message already holds it, and `main` prints the source chain too
    /// (it read "initial copy: X: X").
    #[error("initial copy: {0}")]
    Snapshot(crate::snapshot::SnapshotError),
    #[error("cannot listen on {addr} (metrics.listen): {source}; choose a free address")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the {stage} task failed: {message}")]
    Task {
        stage: &'static str,
        message: String,
    },
    #[error("the pipeline stopped before the drain finished")]
    Stopped,
    /// The monitor found a side stalled (see `monitor`): the session is dropped and retried.
    #[error("{side} stalled: {why}; dropped the session, reconnecting")]
    Stalled {
        side: &'static str,
        why: &'static str,
    },
    /// A permanent failure of a run that created blue's slot.
    #[error(
        "{error}\nThe replication slot {slot} that this run created on blue is left in place, and holds WAL on blue until it is dropped: fix the cause and run again to resume from it, or start over with shadowsync reset --config F --drop-slot"
    )]
    SlotLeft {
        slot: String,
        error: Box<PipelineError>,
    },
}

impl From<crate::snapshot::SnapshotError> for PipelineError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        PipelineError::Snapshot(e)
    }
}

impl PipelineError {
    /// The one place deciding whether the supervisor retries.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_retryable(),
            PipelineError::Apply(e) => e.is_retryable(),
            PipelineError::Origin(e) => e.is_retryable(),
            PipelineError::Snapshot(e) => e.is_retryable(),
            PipelineError::SlotLeft { error, .. } => error.is_retryable(),
            PipelineError::Stalled { .. } => true,
            PipelineError::Config(_)
            | PipelineError::Listen { .. }
            | PipelineError::Task { .. }
            | PipelineError::Stopped => false,
        }
    }

    /// Contention that clears by itself (a killed predecessor still holding the slot or its
    /// green session): retried even past the startup timeout.
    fn is_contention(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_slot_busy(),
            PipelineError::Apply(e) => matches!(e, ApplyError::SessionBusy { .. }),
            PipelineError::Origin(e) => matches!(e, crate::origin::OriginError::Busy { .. }),
            _ => false,
        }
    }

    fn stage(&self) -> &'static str {
        match self {
            PipelineError::Source(_) => "source",
            PipelineError::Apply(_) | PipelineError::Origin(_) => "apply",
            PipelineError::Snapshot(_) => "snapshot",
            PipelineError::SlotLeft { error, .. } => error.stage(),
            PipelineError::Stalled { side, .. } => side,
            _ => "pipeline",
        }
    }

    fn task(stage: &'static str) -> impl FnOnce(tokio::task::JoinError) -> PipelineError {
        move |e| PipelineError::Task {
            stage,
            message: e.to_string(),
        }
    }
}

/// A read of the drain's target from blue, in flight (see [`blue_wal_lsn`]).
type DrainTargetRead = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Lsn, PipelineError>> + Send + 'static>,
>;

/// Blue's WAL insert position for a drain, made reachable (see `source::slot::drain_target`), on
/// a connection of its own.
async fn blue_wal_lsn(config: Config) -> Result<Lsn, PipelineError> {
    let (client, conn) = drain_client(&config).await?;
    let lsn = slot::drain_target(&client).await;
    drop(client);
    let _ = conn.await;
    Ok(lsn?)
}

/// A connection to blue for the drain's own reads and its flush marker.
async fn drain_client(
    config: &Config,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), PipelineError> {
    let dsn = config.blue_dsn()?;
    Ok(dsn
        .connect("shadowsync-drain")
        .await
        .map_err(|source| SourceError::Connect {
            dsn: dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&source),
        })?)
}

/// Fixes the drain's target once blue told it (a failure is tried again at the next tick).
/// Fields, not `&mut Supervisor`: the session future borrows the supervisor's config.
fn drain_target_read(
    drain_lsn: &mut Option<Lsn>,
    shared: &Shared,
    read: Result<Lsn, PipelineError>,
) {
    match read {
        Ok(lsn) => {
            info!(drain_lsn = %lsn, "draining: waiting until everything before this LSN is in green and confirmed");
            *drain_lsn = Some(lsn);
            shared.set_state(State::Draining);
        }
        Err(e) => warn!(error = %e, "cannot read blue's WAL position for the drain; retrying"),
    }
}

/// Options of `run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Drain as soon as streaming starts, then exit (the cutover flag).
    pub drain: bool,
    /// Let the initial copy empty non-empty green tables it copies into.
    pub snapshot_truncate: bool,
}

/// A running pipeline.
pub struct Handle {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: Trigger,
    drain: mpsc::Sender<DrainRequest>,
    join: tokio::task::JoinHandle<Result<Report, PipelineError>>,
    http: tokio::task::JoinHandle<()>,
    http_stop: Trigger,
}

impl Handle {
    /// Asks for a graceful stop (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.fire();
    }

    /// Drains and waits for the report; the pipeline then exits.
    pub async fn drain(&self) -> Result<Report, String> {
        let (reply, rx) = oneshot::channel();
        self.drain
            .send(DrainRequest::Start { reply })
            .await
            .map_err(|_| "the pipeline has stopped".to_string())?;
        rx.await
            .map_err(|_| "the pipeline stopped before the drain finished".to_string())?
    }

    /// Asks the apply stage for a hold at `from` (see `hold`; `exact`: at that point itself).
    pub fn hold(&self, from: Lsn, exact: bool) -> crate::hold::HoldControl {
        let (req, control) = crate::hold::request(from, exact);
        self.shared.request_hold(req);
        control
    }

    /// Waits for the pipeline to end.
    pub async fn wait(self) -> Result<Report, PipelineError> {
        let result = self.join.await.map_err(PipelineError::task("pipeline"));
        // Responses already owed (a /drain waiting for this report) reach their clients before
        // the process exits.
        self.http_stop.fire();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.http).await;
        result?
    }
}

/// Validates the config, binds the HTTP listener and starts the supervisor.
pub async fn start(config: Config, opts: RunOptions) -> Result<Handle, PipelineError> {
    config.validate()?;
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| PipelineError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| PipelineError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let token = config.admin_token()?;
    let shared = Arc::new(Shared::new());
    let (shutdown, shutdown_rx) = shutdown::channel();
    let (drain, drain_rx) = mpsc::channel(8);
    let (http_stop, http_stop_rx) = shutdown::channel();
    let http = tokio::spawn(crate::admin::serve(
        listener,
        shared.clone(),
        drain.clone(),
        token,
        http_stop_rx,
    ));
    info!(%addr, "serving /metrics, /healthz, /readyz and /drain");
    let supervisor = Supervisor {
        config,
        shared: shared.clone(),
        started: Instant::now(),
        drain_started: None,
        start_lsn: None,
        drain_lsn: None,
        waiters: Vec::new(),
        recovery: Default::default(),
    };
    let join = tokio::spawn(supervisor.run(opts, shutdown_rx, drain_rx));
    Ok(Handle {
        addr,
        shared,
        shutdown,
        drain,
        join,
        http,
        http_stop,
    })
}

/// Runs until drained, shut down by `shutdown_signal` (SIGTERM/SIGINT in `main`), or failed.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown_signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Report, PipelineError> {
    let handle = start(config, opts).await?;
    // On a terminal, the live status line the demo shows (logs alone go quiet once streaming).
    let status_line = crate::status_line::spawn_if_terminal(handle.shared.clone());
    let shutdown = handle.shutdown.clone();
    let watcher = tokio::spawn(async move {
        shutdown_signal.await;
        info!("signal received: finishing the batch in flight");
        shutdown.fire();
    });
    let result = handle.wait().await;
    watcher.abort();
    if let Some(s) = status_line {
        s.abort();
        eprint!("\r\x1b[2K");
    }
    result
}

/// Aborts a task when dropped (the monitor, with the run).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A drain was cancelled: streaming goes on; returns how many waiters were told.
fn drain_cancelled(drain_lsn: &mut Option<Lsn>, waiters: &mut Vec<ReportWaiter>) -> usize {
    *drain_lsn = None;
    let n = waiters.len();
    for w in waiters.drain(..) {
        let _ = w.send(Err(
            "the drain was cancelled (DELETE /drain); the sidecar keeps streaming".into(),
        ));
    }
    info!(waiters = n, "drain cancelled; streaming goes on");
    n
}

/// Where a drain's report goes.
type ReportWaiter = oneshot::Sender<Result<Report, String>>;

struct Supervisor {
    config: Config,
    shared: Arc<Shared>,
    started: Instant,
    /// When the current drain began (its target was asked of blue): the report's duration.
    drain_started: Option<Instant>,
    start_lsn: Option<Lsn>,
    drain_lsn: Option<Lsn>,
    waiters: Vec<ReportWaiter>,
    /// What failed sessions taught about green (replay some changes one by one, write some
    /// tables with upserts only).
    recovery: crate::apply::Recovery,
}

enum Outcome {
    Shutdown,
    Drained,
    /// The session ended on purpose to write green differently (see `apply::Switch`).
    Switched(crate::apply::Switch),
}

/// What the supervisor does after a session.
enum Next {
    /// Start the next session now.
    Resume,
    /// Start the next session after the backoff.
    Retry,
    /// The run is over.
    Done(Result<Report, PipelineError>),
}

impl Supervisor {
    async fn run(
        mut self,
        opts: RunOptions,
        mut shutdown: Shutdown,
        mut drains: mpsc::Receiver<DrainRequest>,
    ) -> Result<Report, PipelineError> {
        let mut backoff = Duration::from_millis(self.config.retry.initial_backoff_ms);
        let max_backoff = Duration::from_millis(self.config.retry.max_backoff_ms);
        let stall_after = Duration::from_millis(self.config.retry.stall_timeout_ms);
        let mut drain_requested = opts.drain;
        // For the whole run, across sessions and outages (see `monitor`).
        let _monitor = AbortOnDrop(tokio::spawn(crate::monitor::run(
            self.config.clone(),
            self.shared.clone(),
        )));
        loop {
            let (stop_tx, stop_rx) = shutdown::channel();
            let session_began = Instant::now();
            let mut stall_check = tokio::time::interval(Duration::from_millis(250));
            let mut session_start = None;
            let outcome = {
                let session = session::run(
                    &self.config,
                    &self.shared,
                    stop_rx,
                    &self.recovery,
                    opts.snapshot_truncate,
                    |lsn| {
                        session_start = Some(lsn);
                    },
                );
                tokio::pin!(session);
                // A drain ends at most one tick after blue confirmed it: this is cutover time.
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut stopping: Option<Outcome> = None;
                // The drain's target, being read from blue: polled in its own branch, so that a
                // slow or unreachable blue never holds up a shutdown or the session's end.
                let mut target_read: Option<DrainTargetRead> = None;
                loop {
                    tokio::select! {
                        biased;
                        // 1. The session ending (cleanly after a stop, or with an error).
                        result = &mut session => break result.map(|switch| match switch {
                            Some(switch) => Outcome::Switched(switch),
                            None => stopping.take().unwrap_or(Outcome::Shutdown),
                        }),
                        // 2. A stalled side: the session is dropped (its tasks aborted) rather than
                        //    awaited, even while stopping, since it may be waiting on the stalled
                        //    connection forever. Green rolls back what it had not committed.
                        _ = stall_check.tick() => {
                            if let Some(stall) = self.shared.stall()
                                && (stall.since >= session_began || session_began.elapsed() > stall_after)
                            {
                                break Err(PipelineError::Stalled { side: stall.side, why: stall.why });
                            }
                        }
                        // 3. Shutdown: stop intake, commit what is complete, confirm.
                        () = shutdown.recv(), if stopping.is_none() => {
                            self.shared.set_state(State::Stopped);
                            stopping = Some(Outcome::Shutdown);
                            stop_tx.fire();
                        }
                        // 4. Drain requests: remember the waiter (the target is fixed once), or
                        //    forget the drain.
                        Some(req) = drains.recv() => match req {
                            DrainRequest::Start { reply } => {
                                self.waiters.push(reply);
                                drain_requested = true;
                            }
                            DrainRequest::Cancel { reply } => {
                                let cancelled = if matches!(stopping, Some(Outcome::Drained)) {
                                    Err("the drain already finished: the sidecar is stopping".to_string())
                                } else {
                                    drain_requested = false;
                                    target_read = None;
                                    self.drain_started = None;
                                    Ok(drain_cancelled(&mut self.drain_lsn, &mut self.waiters))
                                };
                                let _ = reply.send(cancelled);
                            }
                        },
                        // 5. The drain's target arrived from blue.
                        read = async { target_read.as_mut().expect("armed").await }, if target_read.is_some() => {
                            target_read = None;
                            drain_target_read(&mut self.drain_lsn, &self.shared, read);
                        }
                        // 6. Progress checks: start a pending drain, finish a reached one.
                        _ = tick.tick(), if stopping.is_none() => {
                            if drain_requested && self.drain_lsn.is_none() && target_read.is_none()
                                && self.shared.streaming.load(Ordering::Relaxed) {
                                target_read = Some(Box::pin(blue_wal_lsn(self.config.clone())));
                                self.drain_started.get_or_insert_with(Instant::now);
                            }
                            if let Some(target) = self.drain_lsn
                                && self.shared.confirmed_lsn() >= target {
                                stopping = Some(Outcome::Drained);
                                stop_tx.fire();
                            }
                        }
                    }
                }
            };
            let streamed = session_start.is_some();
            if let Some(lsn) = session_start {
                self.start_lsn.get_or_insert(lsn);
            }
            let next = match outcome {
                Ok(Outcome::Drained) => Next::Done(Ok(self.drained().await)),
                Ok(Outcome::Shutdown) => Next::Done(Ok(self.stopped())),
                Ok(Outcome::Switched(switch)) => self.switched(switch, &shutdown),
                Err(e) => self.failed(e, &shutdown, streamed),
            };
            match next {
                Next::Done(result) => return result,
                Next::Resume => {
                    backoff = Duration::from_millis(self.config.retry.initial_backoff_ms);
                }
                Next::Retry => {
                    if streamed {
                        backoff = Duration::from_millis(self.config.retry.initial_backoff_ms);
                    }
                    info!(
                        retry_in_ms = backoff.as_millis() as u64,
                        "resuming from green's progress after the backoff"
                    );
                    if self.back_off(backoff, &mut shutdown).await {
                        return Ok(self.stopped());
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }

    /// Waits out `backoff`, or less: when a side was not answering the monitor and both answer
    /// again, the next session starts at once (an outage's end is not worth waiting out the
    /// backoff's cap). `true` when shut down meanwhile.
    async fn back_off(&self, backoff: Duration, shutdown: &mut Shutdown) -> bool {
        let down = !self.shared.both_answer();
        let until = tokio::time::Instant::now() + backoff;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                biased;
                // A dropped handle counts as a shutdown request.
                () = shutdown.recv() => return true,
                () = tokio::time::sleep_until(until) => return false,
                _ = poll.tick() => {
                    if down && self.shared.both_answer() && self.shared.stall().is_none() {
                        info!("both databases answer again: resuming now");
                        return false;
                    }
                }
            }
        }
    }

    /// The drain finished: the report, to every waiter too.
    async fn drained(&mut self) -> Report {
        let confirmed = self.confirm_drained().await;
        let mut report = self.report(true);
        report.confirmed_by_blue = confirmed;
        self.writes_after_drain(&mut report).await;
        self.shared.set_state(State::Stopped);
        info!(final_lsn = %report.final_lsn, "drained");
        for w in self.waiters.drain(..) {
            let _ = w.send(Ok(report.clone()));
        }
        report
    }

    /// Shut down before any drain finished.
    fn stopped(&mut self) -> Report {
        self.shared.set_state(State::Stopped);
        let report = self.report(false);
        for w in self.waiters.drain(..) {
            let _ = w.send(Err("shut down before the drain finished".into()));
        }
        info!(final_lsn = %report.final_lsn, "stopped");
        report
    }

    /// A planned switch: not an error; the next session starts at once with it, unless the
    /// run is shutting down.
    fn switched(&mut self, switch: crate::apply::Switch, shutdown: &Shutdown) -> Next {
        self.shared.streaming.store(false, Ordering::Relaxed);
        self.shared.switched(switch.table(), switch.kind());
        info!(table = %switch.table(), switch = switch.kind(), reason = %switch, "changing how green is written; resuming from green's progress");
        self.recovery.learn(&switch);
        if shutdown.is_shutdown() {
            return Next::Done(Ok(self.stopped()));
        }
        self.shared.set_state(State::Reconnecting);
        Next::Resume
    }

    /// A failed session: retried (after the backoff) when the error allows it, else the end.
    fn failed(&mut self, e: PipelineError, shutdown: &Shutdown, streamed: bool) -> Next {
        let startup_timeout = Duration::from_millis(self.config.retry.startup_timeout_ms);
        let retry = e.is_retryable()
            && (self.start_lsn.is_some()
                || self.started.elapsed() < startup_timeout
                || e.is_contention());
        self.shared.error(e.stage(), retry);
        self.shared.streaming.store(false, Ordering::Relaxed);
        if !retry || shutdown.is_shutdown() {
            error!(error = %e, "stopping");
            self.shared.set_state(State::Failed);
            let e = if self.shared.slot_created() {
                PipelineError::SlotLeft {
                    slot: self.config.blue.slot.clone(),
                    error: Box::new(e),
                }
            } else {
                e
            };
            for w in self.waiters.drain(..) {
                let _ = w.send(Err(e.to_string()));
            }
            return Next::Done(Err(e));
        }
        if e.is_contention() {
            warn!(error = %e, "another session holds the slot or green's apply lock (a killed predecessor until its database notices, or a second sidecar of this slot): retrying until it lets go");
        } else if streamed {
            warn!(error = %e, "session lost; resuming from green's progress");
        } else {
            warn!(error = %e, "cannot start a session; retrying");
        }
        self.shared.set_state(State::Reconnecting);
        Next::Retry
    }

    /// Waits until blue's slot records the drained position (the standby status update has
    /// been processed), so the report's final LSN is blue's own word.
    async fn confirm_drained(&self) -> bool {
        let Some(target) = self.drain_lsn else {
            return false;
        };
        let Ok((client, conn)) = drain_client(&self.config).await else {
            return false;
        };
        let mut confirmed = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match slot::slot_confirmed(&client, &self.config.blue.slot).await {
                Ok(lsn) if lsn >= target => {
                    self.shared.set_confirmed(lsn);
                    confirmed = true;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => break,
            }
        }
        drop(client);
        let _ = conn.await;
        confirmed
    }

    /// Says in the report whether blue changed a published table after the drain's target:
    /// seen in the stream, else peeked at in the slot (the stream has ended).
    async fn writes_after_drain(&self, report: &mut Report) {
        let Some(target) = self.drain_lsn else {
            return;
        };
        let mut after = self.shared.last_change_commit().filter(|l| *l > target);
        if after.is_none() {
            match self.peek_after_confirmed().await {
                Ok(lsn) => after = lsn,
                Err(e) => report.warnings.push(format!(
                    "cannot tell whether blue changed published tables after the drain ({e})"
                )),
            }
        }
        if let Some(lsn) = after {
            warn!(drain_lsn = %target, changed_lsn = %lsn, "blue changed published tables after the drain's target: writers are still running");
            report.changed_after_drain = Some(lsn);
            report.warnings.push(format!(
                "blue committed changes to published tables after the drain point {target} (at {lsn}): writers were still running, and what they wrote after the drain may not be in green. Use shadowsync cutover, which fences blue's writes before draining"
            ));
        }
    }

    async fn peek_after_confirmed(&self) -> Result<Option<Lsn>, PipelineError> {
        let (client, conn) = drain_client(&self.config).await?;
        let after = slot::first_change_after_confirmed(
            &client,
            &self.config.blue.slot,
            &self.config.blue.publication,
        )
        .await;
        drop(client);
        let _ = conn.await;
        Ok(after?)
    }

    fn report(&self, drained: bool) -> Report {
        let applied = self.shared.applied();
        Report {
            slot: self.config.blue.slot.clone(),
            start_lsn: self.start_lsn.unwrap_or_default(),
            final_lsn: self.shared.confirmed_lsn(),
            drain_lsn: self.drain_lsn,
            drained,
            changed_after_drain: None,
            warnings: Vec::new(),
            confirmed_by_blue: false,
            // The drain's own time (not the process's, which includes the initial copy and
            // every hour streamed before the drain); the run's when no drain ran.
            duration_seconds: self
                .drain_started
                .unwrap_or(self.started)
                .elapsed()
                .as_secs_f64(),
            transactions: applied.transactions,
            batches: applied.batches,
            echoes_skipped: applied.echoes_skipped,
            rows: applied.rows,
            conflicts: applied.conflicts,
        }
    }
}
