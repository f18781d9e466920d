//! A drain: the request the admin endpoint hands the supervisor, and the report a run ends
//! with (printed as JSON by `run --drain` and `drain`).
//!
//! Invariant: a report says `drained` only when everything blue wrote before the drain's target
//! is committed in green and confirmed (see `pipeline`).

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::lsn::Lsn;

/// A request from the admin endpoint (or the pipeline's handle) to the supervisor.
pub enum DrainRequest {
    /// Drain, then stop; the report (or why not) goes to `reply`.
    Start {
        reply: oneshot::Sender<Result<Report, String>>,
    },
    /// Forget a pending drain and keep streaming (a cutover that gave up on it lifted its
    /// fence): every waiter is told; `reply` gets how many there were, or why it is too late.
    Cancel {
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

/// What a run did; printed as JSON by `run --drain` and `drain`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub slot: String,
    /// LSN streaming started from.
    pub start_lsn: Lsn,
    /// LSN confirmed to blue at the end.
    pub final_lsn: Lsn,
    /// Blue's WAL position when the drain began (everything before it is in green).
    pub drain_lsn: Option<Lsn>,
    pub drained: bool,
    /// The end LSN of a blue transaction that changed a published table after `drain_lsn`
    /// (writers were still running: what they wrote after it may not be in green). `None`
    /// when blue wrote nothing there, or it could not be told (see `warnings`).
    pub changed_after_drain: Option<Lsn>,
    /// What the operator must know about this drain.
    pub warnings: Vec<String>,
    /// Whether blue's slot was seen recording `final_lsn` (false: green has everything, but
    /// blue could not be asked; it will learn the position on the next start).
    pub confirmed_by_blue: bool,
    /// Seconds from the drain's start (its target asked of blue) to the report; the run's
    /// seconds when no drain ran (a stop).
    pub duration_seconds: f64,
    pub transactions: u64,
    pub batches: u64,
    /// Source transactions skipped because another shadowsync stream wrote them (see
    /// `origin`): not in `transactions`.
    pub echoes_skipped: u64,
    /// target table -> operation -> rows.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    /// target table -> conflict kind -> conflicts recorded in `shadowsync.conflicts`.
    pub conflicts: BTreeMap<String, BTreeMap<String, u64>>,
}
