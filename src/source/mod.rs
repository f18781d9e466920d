//! Source stage: the replication connection to blue, decoded into [`SourceEvent`]s for the apply
//! stage, and acknowledgements back to blue.
//!
//! `pgwire-replication` is the transport: it hands over Begin, Commit and logical Message as
//! parsed events and every other pgoutput message as raw bytes, which `decode` parses.
//!
//! Invariants:
//! - The LSN confirmed to blue is either the end of a blue commit green has committed (as
//!   published by the apply stage), or, when nothing received is unapplied and no transaction
//!   is open, the WAL end of a keepalive: blue never keeps WAL for nothing, and never forgets
//!   WAL green still needs. A keepalive position may fall inside a blue transaction that has
//!   not committed yet (the walsender decodes its WAL but sends nothing before the commit):
//!   confirming it is safe, because blue skips only transactions that *commit* before the
//!   confirmed position, as with PostgreSQL's own apply worker.
//! - A stop (shutdown, drain) ends intake at a transaction boundary: a transaction being
//!   received is read to its Commit (within `STOP_GRACE`) so the batch in flight commits whole.
//! - Events are forwarded in stream order through a bounded channel (backpressure reaches blue
//!   through TCP), in runs of at most [`EVENTS_PER_SEND`]: what the transport already holds
//!   goes in one send, so a busy stream costs one wakeup of the apply stage per run, not per
//!   row. A run never waits for more input, so it adds no latency.

pub mod catalog;
pub mod slot;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::Dsn;
use crate::decode::{self, Begin, Commit, DecodeError, Message};
use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::metrics::Shared;
use crate::shutdown::Shutdown;
use crate::tls::Attempt;

/// Most events forwarded in one channel message.
pub const EVENTS_PER_SEND: usize = 256;

/// Capacity, in runs of events, of a channel that buffers about `events` events.
pub fn channel_runs(events: usize) -> usize {
    events.div_ceil(EVENTS_PER_SEND).max(2)
}

/// One decoded message and the WAL position it was sent at.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    pub lsn: Lsn,
    pub msg: Message,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("blue replication connection ({dsn}): {source}")]
    Replication { dsn: String, source: PgWireError },
    /// The replication connection's TLS failed (the transport reports it as text only).
    #[error(
        "blue replication connection ({dsn}): TLS failed: {message}; check blue.dsn's sslmode, sslrootcert (the CA that signed blue's certificate), sslcert and sslkey"
    )]
    Tls { dsn: String, message: String },
    #[error(
        "cannot decode blue's change at LSN {lsn}: {source}; this is a bug in shadowsync or an unsupported server: report it with the LSN (nothing past it was confirmed)"
    )]
    Decode { lsn: Lsn, source: DecodeError },
    #[error(
        "cannot connect to blue ({dsn}): {failure}; check blue.dsn, that blue is up, and the password (SHADOWSYNC_BLUE_PASSWORD or pgpass)"
    )]
    Connect { dsn: String, failure: DbFailure },
    #[error("blue: {context}: {failure}")]
    Blue {
        context: &'static str,
        failure: DbFailure,
    },
    #[error("blue ended the replication stream without being asked to; reconnecting")]
    StreamEnded,
    /// A problem with blue's setup that the operator must fix; the message says how.
    #[error("{0}")]
    Setup(String),
}

impl SourceError {
    /// The one place deciding whether a failure is worth a reconnect and retry.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Replication { source, .. } => match source {
                PgWireError::Io(_) | PgWireError::Task(_) => true,
                PgWireError::Server(m) => match crate::failure::sqlstate_in(m) {
                    Some(code) => {
                        crate::failure::policy(Some(&code)) == crate::failure::Policy::Retry
                    }
                    // No SQLSTATE: the slot stays "active" until blue notices a dead
                    // predecessor (wal_sender_timeout); shutdowns and restarts pass too.
                    None => {
                        m.contains("is active for PID")
                            || m.contains("terminating connection")
                            || m.contains("shutting down")
                            || m.contains("starting up")
                    }
                },
                _ => false,
            },
            SourceError::Connect { failure, .. } | SourceError::Blue { failure, .. } => {
                failure.is_retryable()
            }
            SourceError::StreamEnded => true,
            SourceError::Decode { .. } | SourceError::Setup(_) | SourceError::Tls { .. } => false,
        }
    }

    /// Another session holds the slot (a killed predecessor, until blue notices it is gone).
    pub fn is_slot_busy(&self) -> bool {
        match self {
            SourceError::Replication {
                source: PgWireError::Server(m),
                ..
            } => {
                crate::failure::sqlstate_in(m) == Some(crate::failure::SqlState::OBJECT_IN_USE)
                    || m.contains("is active for PID")
            }
            _ => false,
        }
    }
}

/// Replication settings for a blue DSN.
pub fn replication_config(
    dsn: &Dsn,
    slot: &str,
    publication: &str,
    start: Lsn,
    status_interval: Duration,
) -> ReplicationConfig {
    let password = dsn.password.clone().unwrap_or_default();
    let base = if dsn.host.starts_with('/') {
        ReplicationConfig::unix(
            dsn.host.clone(),
            dsn.port,
            dsn.user.clone(),
            password,
            dsn.dbname.clone(),
            slot,
            publication,
        )
    } else {
        // TLS is set per attempt by `connect` (sslmode's fallbacks).
        ReplicationConfig::new(
            dsn.hostaddr.clone().unwrap_or_else(|| dsn.host.clone()),
            dsn.user.clone(),
            password,
            dsn.dbname.clone(),
            slot,
            publication,
        )
        .with_port(dsn.port)
    };
    base.with_start_lsn(start.into())
        .with_status_interval(status_interval)
        // Idle confirmations need no hurry (blue's keepalive requests are answered at once).
        .with_wakeup_interval(status_interval.max(IDLE_CONFIRM_INTERVAL))
        .with_options(format!("{} -c client_encoding=UTF8", dsn.session_options()))
        .with_application_name("shadowsync")
        .with_buffer_size(1024)
}

/// Connects the replication stream at `start` and waits until blue accepted it, trying what
/// `sslmode` allows in libpq's order (as [`Dsn::connect`] does for SQL connections).
pub async fn connect(cfg: ReplicationConfig, dsn: &Dsn) -> Result<ReplicationClient, SourceError> {
    each_attempt(&cfg, dsn, connect_once)
        .await
        .map_err(|source| match source {
            PgWireError::Tls(message) => SourceError::Tls {
                dsn: dsn.to_string(),
                message,
            },
            source => SourceError::Replication {
                dsn: dsn.to_string(),
                source,
            },
        })
}

/// Runs `connect` with `cfg` under each TLS attempt `dsn`'s sslmode allows, until one works;
/// otherwise the failure of the attempt that got furthest (the server's refusal of a TLS
/// attempt, then any server refusal, then the first).
pub async fn each_attempt<T, F, Fut>(
    cfg: &ReplicationConfig,
    dsn: &Dsn,
    mut connect: F,
) -> Result<T, PgWireError>
where
    F: FnMut(ReplicationConfig) -> Fut,
    Fut: std::future::Future<Output = Result<T, PgWireError>>,
{
    let mut failures: Vec<(Attempt, PgWireError)> = Vec::new();
    for &attempt in dsn.tls.attempts() {
        let cfg = if dsn.is_unix() {
            cfg.clone()
        } else {
            cfg.clone()
                .with_tls(dsn.tls.replication(attempt, &dsn.host))
        };
        match connect(cfg).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                // The network refused: no other mode would fare better.
                let unreachable = matches!(e, PgWireError::Io(_));
                failures.push((attempt, e));
                if unreachable {
                    break;
                }
            }
        }
    }
    let server = |e: &PgWireError| matches!(e, PgWireError::Server(_) | PgWireError::Auth(_));
    let pick = failures
        .iter()
        .position(|(a, e)| *a == Attempt::Tls && server(e))
        .or_else(|| failures.iter().position(|(_, e)| server(e)))
        .unwrap_or(0);
    Err(failures.swap_remove(pick).1)
}

async fn connect_once(cfg: ReplicationConfig) -> Result<ReplicationClient, PgWireError> {
    let mut client = ReplicationClient::connect(cfg).await?;
    client.wait_started().await?;
    Ok(client)
}

/// How often an idle stream confirms its position to blue.
const IDLE_CONFIRM_INTERVAL: Duration = Duration::from_secs(1);

/// How long a stop waits for the transaction being received to reach its Commit.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct SourceStage {
    client: ReplicationClient,
    dsn: String,
    /// Commits ending at or before this are in green already.
    skip_before: Lsn,
    shared: Arc<Shared>,
    in_txn: bool,
    /// End LSN of the last blue commit forwarded to the apply stage.
    last_forwarded: Lsn,
    /// End LSN of the last commit green committed.
    committed: Lsn,
}

impl SourceStage {
    pub fn new(client: ReplicationClient, dsn: &Dsn, start: Lsn, shared: Arc<Shared>) -> Self {
        shared.set_confirmed(start);
        SourceStage {
            client,
            dsn: dsn.to_string(),
            skip_before: start,
            shared,
            in_txn: false,
            last_forwarded: start,
            committed: start,
        }
    }

    /// Streams until `stop` turns true (then stops intake, closes `tx`, keeps confirming what
    /// the apply stage commits until it finishes) or an error.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Vec<SourceEvent>>,
        mut committed: watch::Receiver<Lsn>,
        mut stop: Shutdown,
    ) -> Result<(), SourceError> {
        let mut tx = Some(tx);
        let mut stop_by: Option<tokio::time::Instant> = None;
        // Publishes what blue has been told: a drain ends once it covers the drain LSN, so this
        // period adds to every drain (and to short benchmarks); an atomic read is all it costs.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let metrics = self.client.metrics();
        loop {
            tokio::select! {
                biased;
                // 1. Acknowledge what green committed: frees blue's WAL, never waits on input.
                changed = committed.changed() => {
                    if changed.is_err() {
                        break; // the apply stage is done
                    }
                    let lsn = *committed.borrow_and_update();
                    self.committed = self.committed.max(lsn);
                    self.client.update_applied_lsn(self.committed.into());
                }
                // 2. Stop intake on shutdown or drain, at a transaction boundary: a transaction
                //    being received is read to its Commit (within STOP_GRACE), so the batch in
                //    flight commits whole; the apply stage finishes what it holds.
                () = stop.recv(), if tx.is_some() && stop_by.is_none() => {
                    stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                    if !self.in_txn {
                        info!("stopping intake from blue");
                        tx = None;
                    } else {
                        info!("stopping intake from blue after the transaction being received");
                    }
                }
                _ = crate::shutdown::sleep_until(stop_by), if tx.is_some() => {
                    warn!("the transaction being received did not end in time; it will be streamed again");
                    tx = None;
                }
                // 3. Publish what blue has been told, for metrics and drains.
                _ = tick.tick() => {
                    self.shared.set_confirmed(Lsn::from(metrics.last_applied_lsn()));
                }
                // 4. The stream itself, with whatever else the transport holds already.
                event = self.client.recv(), if tx.is_some() => {
                    let sender = tx.as_ref().expect("guarded by the branch condition");
                    let mut events = Vec::new();
                    let mut next = Some(event);
                    let mut result = Ok(());
                    while let Some(event) = next.take() {
                        result = match event {
                            Ok(Some(ev)) => self.forward(ev, &mut events),
                            Ok(None) => Err(SourceError::StreamEnded),
                            Err(source) => Err(self.transport_error(source)),
                        };
                        // A stop ends intake at this transaction boundary.
                        let stopping = stop_by.is_some() && !self.in_txn;
                        if result.is_err() || stopping || events.len() >= EVENTS_PER_SEND {
                            break;
                        }
                        next = self.ready();
                    }
                    // Complete transactions before an error still reach green.
                    if !events.is_empty() && sender.send(events).await.is_err() {
                        // The apply stage ended (its error is reported by the pipeline).
                        debug!("apply stage gone; dropping events");
                    }
                    result?;
                    if stop_by.is_some() && !self.in_txn {
                        info!("stopping intake from blue");
                        tx = None;
                    }
                }
            }
        }
        self.confirm_sent().await;
        self.client.stop();
        Ok(())
    }

    /// Waits (briefly) until blue has been told about the last commit.
    async fn confirm_sent(&self) {
        let metrics = self.client.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Lsn::from(metrics.last_applied_lsn()) < self.committed
            && tokio::time::Instant::now() < deadline
            && self.client.is_running()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shared
            .set_confirmed(Lsn::from(metrics.last_applied_lsn()));
    }

    /// The next event if the transport holds one already; never waits.
    fn ready(&mut self) -> Option<Result<Option<ReplicationEvent>, PgWireError>> {
        // Only while the transport runs: once it ends, `recv` waits for its task, and a wait
        // cut short here would lose the task's result.
        if !self.client.is_running() {
            return None;
        }
        self.client.recv().now_or_never()
    }

    fn transport_error(&self, source: PgWireError) -> SourceError {
        match source {
            // The transport's task ended while a `recv` that was waiting for it was dropped
            // (the task logged its error): the stream ended, reconnect.
            PgWireError::Internal(m) if m.contains("already joined") => SourceError::StreamEnded,
            source => SourceError::Replication {
                dsn: self.dsn.clone(),
                source,
            },
        }
    }

    /// Decodes one transport event into `out` (keepalives only move the acknowledgement).
    fn forward(
        &mut self,
        ev: ReplicationEvent,
        out: &mut Vec<SourceEvent>,
    ) -> Result<(), SourceError> {
        let event = match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.in_txn = true;
                // The lag counts this transaction from its Begin (which carries its commit
                // time), not from its Commit: a large one is lag all the while it is received.
                if Lsn::from(final_lsn) >= self.skip_before {
                    self.shared
                        .commit_received(Lsn::from(final_lsn), commit_time_micros);
                }
                SourceEvent {
                    lsn: Lsn::from(final_lsn),
                    msg: Message::Begin(Begin {
                        final_lsn: Lsn::from(final_lsn),
                        commit_time: commit_time_micros,
                        xid,
                    }),
                }
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                self.in_txn = false;
                let end = Lsn::from(end_lsn);
                self.last_forwarded = self.last_forwarded.max(end);
                SourceEvent {
                    lsn: end,
                    msg: Message::Commit(Commit {
                        flags: 0,
                        commit_lsn: lsn.into(),
                        end_lsn: end,
                        commit_time: commit_time_micros,
                    }),
                }
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let msg = decode::decode(&data).map_err(|source| SourceError::Decode {
                    lsn: wal_start.into(),
                    source,
                })?;
                SourceEvent {
                    lsn: Lsn::from(wal_start),
                    msg,
                }
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                debug!(%prefix, transactional, "logical message");
                SourceEvent {
                    lsn: lsn.into(),
                    msg: Message::Message {
                        transactional,
                        lsn: lsn.into(),
                        prefix: prefix.into_bytes().into(),
                        content,
                    },
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Idle: nothing received is unapplied, so blue may forget WAL up to here.
                if !self.in_txn && self.committed >= self.last_forwarded {
                    let lsn = Lsn::from(wal_end).max(self.committed);
                    self.client.update_applied_lsn(lsn.into());
                }
                return Ok(());
            }
            ReplicationEvent::StoppedAt { reached } => {
                warn!(lsn = %reached, "replication stopped at a stop LSN");
                return Ok(());
            }
        };
        out.push(event);
        Ok(())
    }
}

/// Maps a failed query on blue to [`SourceError::Blue`] with what was being done.
pub(crate) fn blue_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |e| SourceError::Blue {
        context,
        failure: DbFailure::from_pg(&e),
    }
}
