//! A drain: the request the admin endpoint hands the supervisor, and the report a run ends
//! with (printed as JSON by `run --drain` and `drain`).
//!
//! Invariant: a report says `drained` only when everything blue wrote before the drain's target
//! is committed in green and confirmed (see `pipeline`).

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::lsn::Lsn;

/// A drain request from the admin endpoint.
pub struct DrainRequest {
    pub reply: oneshot::Sender<Result<Report, String>>,
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
    /// Whether blue's slot was seen recording `final_lsn` (false: green has everything, but
    /// blue could not be asked; it will learn the position on the next start).
    pub confirmed_by_blue: bool,
    pub duration_seconds: f64,
    pub transactions: u64,
    pub batches: u64,
    /// target table -> operation -> rows.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    /// target table -> conflict kind -> conflicts recorded in `shadowsync.conflicts`.
    pub conflicts: BTreeMap<String, BTreeMap<String, u64>>,
}
