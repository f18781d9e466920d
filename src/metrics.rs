//! Metrics and the state shared between stages: what `/metrics`, `/readyz` and the drain report
//! read.
//!
//! Names follow Prometheus conventions (`shadowsync_` prefix, base units, `_total` counters),
//! each with HELP (and UNIT where it has one); the process metrics keep the standard
//! unprefixed `process_` names. Labels carry table and operation names only, never row
//! values. Every counter of a known table exists at 0 from the start (see
//! [`Shared::known_tables`]), so `increase()` sees its first change.
//!
//! Invariants: lag in seconds is the age of the oldest blue commit received but not yet
//! committed in green (0 when caught up); lag in bytes is blue's current WAL position minus the
//! LSN confirmed to blue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::lsn::Lsn;

mod liveness;
mod process;
pub mod text;

/// Row operations counted per table.
pub const OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// The planned switches of how a table is written (`apply::Switch::kind`).
pub const SWITCHES: [&str; 2] = ["blue_order", "upserts_only"];

/// The (kind, resolution) pairs the apply statements record (src/statement/conflict.rs and
/// keyless.rs), created at 0 for every known table.
pub const CONFLICT_KINDS: [(&str, &str); 8] = [
    ("insert_exists", "apply"),
    ("insert_older", "keep"),
    ("update_missing", "apply"),
    ("update_missing", "skip"),
    ("update_older", "keep"),
    ("delete_missing", "apply"),
    ("delete_older", "keep"),
    (crate::statement::remap::REMAP_OLDER, "keep"),
];

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    pub table: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub table: String,
    pub kind: String,
    pub resolution: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub stage: String,
    pub retryable: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabaseLabels {
    pub database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SwitchLabels {
    pub table: String,
    pub switch: String,
}

/// Pipeline states, exported as `shadowsync_pipeline_state{state=...} 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Starting,
    Streaming,
    Reconnecting,
    Draining,
    Stopped,
    Failed,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Streaming,
        State::Reconnecting,
        State::Draining,
        State::Stopped,
        State::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Streaming => "streaming",
            State::Reconnecting => "reconnecting",
            State::Draining => "draining",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// Rows and transactions applied, for the drain report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Applied {
    pub transactions: u64,
    pub batches: u64,
    /// Transactions skipped because another shadowsync stream wrote them (see `origin`).
    pub echoes_skipped: u64,
    /// table -> operation -> rows.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    /// table -> conflict kind -> conflicts recorded.
    pub conflicts: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Everything the stages publish and the HTTP endpoints read.
pub struct Shared {
    registry: Registry,
    /// The unprefixed `process_*` metrics.
    process_registry: Registry,
    process: process::Process,
    connected: Family<DatabaseLabels, Gauge>,
    slot_retained: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    rows: Family<RowLabels, Counter>,
    conflicts: Family<ConflictLabels, Counter>,
    snapshot_rows: Family<TableLabels, Counter>,
    snapshot_remaining: Gauge,
    transactions: Counter,
    echoes: Counter,
    batches: Counter,
    batch_rows: Histogram,
    apply_seconds: Histogram,
    confirmed_lsn_gauge: Gauge,
    blue_wal_lsn_gauge: Gauge,
    state_gauge: Family<StateLabels, Gauge>,
    errors: Family<ErrorLabels, Counter>,
    switches: Family<SwitchLabels, Counter>,
    /// Blue's current WAL position (polled).
    blue_wal_lsn: AtomicU64,
    /// LSN confirmed to blue (flush position in the last standby status update).
    confirmed_lsn: AtomicU64,
    /// End LSN of the latest blue transaction with changes received (drain markers excluded).
    last_change_commit: AtomicU64,
    /// This process created blue's slot (a failed first run says it left it behind).
    slot_created: AtomicBool,
    /// A hold asked of the apply stage (see `hold`), until it takes it; the flag spares the
    /// stage a lock per transaction.
    hold: Mutex<Option<crate::hold::HoldRequest>>,
    hold_pending: AtomicBool,
    pub blue_connected: AtomicBool,
    pub green_connected: AtomicBool,
    pub streaming: AtomicBool,
    state: Mutex<State>,
    /// (LSN, commit time in µs since 2000-01-01) of blue transactions received (from their
    /// Begin, which carries the commit time), not yet applied.
    unapplied: Mutex<VecDeque<(Lsn, i64)>>,
    applied: Mutex<Applied>,
    /// Commit time (µs since 2000-01-01) of the last blue transaction applied; 0: none yet.
    last_applied_commit: AtomicI64,
    /// Blue's own count of the lag (`pg_current_wal_lsn() - confirmed_flush_lsn`) at the
    /// monitor's last reading; -1: never read.
    lag_seen: AtomicI64,
    slot_safe_wal_bytes: Gauge,
    stall_gauge: Family<SideLabels, Gauge>,
    /// A stalled side, as the monitor declared it (see `monitor`).
    stall: Mutex<Option<Stall>>,
    stall_flag: AtomicBool,
}

/// A side the monitor found stalled.
#[derive(Debug, Clone)]
pub struct Stall {
    pub side: &'static str,
    pub why: &'static str,
    pub since: std::time::Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: String,
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

impl Shared {
    pub fn new() -> Shared {
        let mut registry = Registry::with_prefix("shadowsync");
        registry.register(
            "build",
            "The running shadowsync's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let connected = Family::<DatabaseLabels, Gauge>::default();
        registry.register(
            "database_connected",
            "1 while the database (blue, green) answers the monitor's question of every second (between sessions too), 0 otherwise",
            connected.clone(),
        );
        let slot_retained = Gauge::default();
        registry.register_with_unit(
            "slot_wal_retained",
            "WAL blue keeps for the replication slot: blue's current WAL position minus the slot's restart_lsn, in bytes (read every second, also between sessions)",
            Unit::Bytes,
            slot_retained.clone(),
        );
        let lag_bytes = Gauge::default();
        registry.register_with_unit(
            "replication_lag",
            "Blue's WAL not yet confirmed by shadowsync, as blue counts it (pg_current_wal_lsn() - the slot's confirmed_flush_lsn, read every second, also during outages), in bytes",
            Unit::Bytes,
            lag_bytes.clone(),
        );
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "replication_lag",
            "Age of the oldest blue transaction received (from its Begin) but not yet applied in green, in seconds (0 when caught up); between sessions, the age of the last applied commit while blue has unconfirmed WAL",
            Unit::Seconds,
            lag_seconds.clone(),
        );
        let rows = Family::<RowLabels, Counter>::default();
        registry.register(
            "rows_applied",
            "Row changes committed in green, by target table and operation (insert, update, delete, truncate)",
            rows.clone(),
        );
        let conflicts = Family::<ConflictLabels, Counter>::default();
        registry.register(
            "conflicts",
            "Changes from blue that disagreed with green's row, committed in green with their record in shadowsync.conflicts, by target table, kind and resolution",
            conflicts.clone(),
        );
        let snapshot_rows = Family::<TableLabels, Counter>::default();
        registry.register(
            "snapshot_rows",
            "Rows written to green by the initial copy, by target table",
            snapshot_rows.clone(),
        );
        let snapshot_remaining = Gauge::default();
        registry.register(
            "snapshot_tables_remaining",
            "Tables the initial copy has not finished (0 when no copy runs)",
            snapshot_remaining.clone(),
        );
        let transactions = Counter::default();
        registry.register(
            "transactions_applied",
            "Blue transactions committed in green",
            transactions.clone(),
        );
        let echoes = Counter::default();
        registry.register(
            "echoes_skipped",
            "Source transactions not applied because another shadowsync stream wrote them (their replication origin is a shadowsync one)",
            echoes.clone(),
        );
        let batches = Counter::default();
        registry.register(
            "batches_applied",
            "Green transactions committed (each groups one or more blue transactions)",
            batches.clone(),
        );
        let batch_rows = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register(
            "batch_rows",
            "Row changes per green transaction",
            batch_rows.clone(),
        );
        let apply_seconds = Histogram::new(exponential_buckets(0.0005, 2.5, 12));
        registry.register_with_unit(
            "apply_duration",
            "Time to write and commit one batch in green, in seconds",
            Unit::Seconds,
            apply_seconds.clone(),
        );
        let slot_safe_wal_bytes = Gauge::default();
        registry.register_with_unit(
            "slot_safe_wal",
            "WAL blue can still write before it invalidates the slot (pg_replication_slots.safe_wal_size), in bytes; -1 when max_slot_wal_keep_size sets no limit",
            Unit::Bytes,
            slot_safe_wal_bytes.clone(),
        );
        let stall_gauge = Family::<SideLabels, Gauge>::default();
        registry.register(
            "stalled",
            "1 while a database (side) has not answered the monitor, or blue's walsender has not heard from us, for retry.stall_timeout_ms",
            stall_gauge.clone(),
        );
        let confirmed_lsn_gauge = Gauge::default();
        registry.register(
            "confirmed_lsn",
            "LSN confirmed to blue as flushed (as a byte position)",
            confirmed_lsn_gauge.clone(),
        );
        let blue_wal_lsn_gauge = Gauge::default();
        registry.register(
            "blue_wal_lsn",
            "Blue's current WAL position (as a byte position)",
            blue_wal_lsn_gauge.clone(),
        );
        let state_gauge = Family::<StateLabels, Gauge>::default();
        registry.register(
            "pipeline_state",
            "1 for the pipeline's current state, 0 for the others",
            state_gauge.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Errors by stage and whether they were retried",
            errors.clone(),
        );
        let switches = Family::<SwitchLabels, Counter>::default();
        registry.register(
            "apply_switches",
            "Planned changes of how a table is written (blue_order: a stretch replayed change by change for a secondary unique constraint; upserts_only: a writer on green inserted keys), each ending a session on purpose; not errors",
            switches.clone(),
        );
        let mut process_registry = Registry::default();
        let process = process::Process::register(&mut process_registry);
        let shared = Shared {
            registry,
            process_registry,
            process,
            connected,
            slot_retained,
            lag_bytes,
            lag_seconds,
            rows,
            conflicts,
            snapshot_rows,
            snapshot_remaining,
            transactions,
            echoes,
            batches,
            batch_rows,
            apply_seconds,
            confirmed_lsn_gauge,
            blue_wal_lsn_gauge,
            state_gauge,
            errors,
            switches,
            blue_wal_lsn: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            last_change_commit: AtomicU64::new(0),
            slot_created: AtomicBool::new(false),
            hold: Mutex::new(None),
            hold_pending: AtomicBool::new(false),
            blue_connected: AtomicBool::new(false),
            green_connected: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            state: Mutex::new(State::Starting),
            unapplied: Mutex::new(VecDeque::new()),
            applied: Mutex::new(Applied::default()),
            last_applied_commit: AtomicI64::new(0),
            lag_seen: AtomicI64::new(-1),
            slot_safe_wal_bytes,
            stall_gauge,
            stall: Mutex::new(None),
            stall_flag: AtomicBool::new(false),
        };
        for side in ["blue", "green"] {
            shared
                .stall_gauge
                .get_or_create(&SideLabels {
                    side: side.to_string(),
                })
                .set(0);
        }
        shared.set_state(State::Starting);
        for stage in ["source", "apply", "snapshot", "pipeline"] {
            for retryable in [false, true] {
                let _ = shared.errors.get_or_create(&ErrorLabels {
                    stage: stage.to_string(),
                    retryable: retryable.to_string(),
                });
            }
        }
        shared
    }

    /// Creates every counter of these target tables at 0 (rows per operation, conflicts per
    /// kind, initial-copy rows, switches): a series that first appears at 1 shows no `increase()`.
    pub fn known_tables<'a>(&self, tables: impl IntoIterator<Item = &'a str>) {
        for table in tables {
            for op in OPS {
                let _ = self.rows.get_or_create(&RowLabels {
                    table: table.to_string(),
                    op: op.to_string(),
                });
            }
            for (kind, resolution) in CONFLICT_KINDS {
                let _ = self.conflicts.get_or_create(&ConflictLabels {
                    table: table.to_string(),
                    kind: kind.to_string(),
                    resolution: resolution.to_string(),
                });
            }
            let _ = self.snapshot_rows.get_or_create(&TableLabels {
                table: table.to_string(),
            });
            for switch in SWITCHES {
                let _ = self.switches.get_or_create(&SwitchLabels {
                    table: table.to_string(),
                    switch: switch.to_string(),
                });
            }
        }
    }

    /// Blue keeps `bytes` of WAL for the slot.
    pub fn set_slot_retained(&self, bytes: i64) {
        self.slot_retained.set(bytes.max(0));
    }

    pub fn set_state(&self, state: State) {
        *self.state.lock().expect("state lock") = state;
        for s in State::ALL {
            self.state_gauge
                .get_or_create(&StateLabels {
                    state: s.name().to_string(),
                })
                .set(i64::from(s == state));
        }
    }

    pub fn state(&self) -> State {
        *self.state.lock().expect("state lock")
    }

    /// Ready: connected to both databases and streaming.
    pub fn ready(&self) -> bool {
        self.blue_connected.load(Ordering::Relaxed)
            && self.green_connected.load(Ordering::Relaxed)
            && self.streaming.load(Ordering::Relaxed)
            && !self.stall_flag.load(Ordering::Relaxed)
    }

    pub fn error(&self, stage: &str, retryable: bool) {
        self.errors
            .get_or_create(&ErrorLabels {
                stage: stage.to_string(),
                retryable: retryable.to_string(),
            })
            .inc();
    }

    /// A session ended on purpose to write `table` differently (see `apply::Switch`).
    pub fn switched(&self, table: &str, switch: &str) {
        self.switches
            .get_or_create(&SwitchLabels {
                table: table.to_string(),
                switch: switch.to_string(),
            })
            .inc();
    }

    /// The source began forwarding a blue transaction (its Begin carries the commit LSN and
    /// time): its age counts in the lag from now, however long it takes to receive.
    pub fn commit_received(&self, end_lsn: Lsn, commit_time: i64) {
        self.unapplied
            .lock()
            .expect("lag lock")
            .push_back((end_lsn, commit_time));
    }

    /// A session ended: what it had received but not applied will be streamed again.
    pub fn forget_unapplied(&self) {
        self.unapplied.lock().expect("lag lock").clear();
    }

    pub fn add_rows(&self, table: &str, op: &str, n: u64) {
        self.rows
            .get_or_create(&RowLabels {
                table: table.to_string(),
                op: op.to_string(),
            })
            .inc_by(n);
        let mut applied = self.applied.lock().expect("report lock");
        *applied
            .rows
            .entry(table.to_string())
            .or_default()
            .entry(op.to_string())
            .or_default() += n;
    }

    /// The initial copy committed `n` rows of target `table`.
    pub fn add_snapshot_rows(&self, table: &str, n: u64) {
        self.snapshot_rows
            .get_or_create(&TableLabels {
                table: table.to_string(),
            })
            .inc_by(n);
    }

    pub fn set_snapshot_remaining(&self, tables: i64) {
        self.snapshot_remaining.set(tables.max(0));
    }

    /// Green committed these conflicts' records.
    pub fn add_conflicts(&self, seen: &[crate::conflicts::Seen]) {
        let mut applied = self.applied.lock().expect("report lock");
        for c in seen {
            self.conflicts
                .get_or_create(&ConflictLabels {
                    table: c.table.clone(),
                    kind: c.kind.clone(),
                    resolution: c.resolution.clone(),
                })
                .inc();
            *applied
                .conflicts
                .entry(c.table.clone())
                .or_default()
                .entry(c.kind.clone())
                .or_default() += 1;
        }
    }

    /// Green committed a batch ending at blue commit `end_lsn`.
    pub fn batch_committed(&self, txns: u64, rows: u64, took: Duration, end_lsn: Lsn) {
        self.transactions.inc_by(txns);
        self.batches.inc();
        self.batch_rows.observe(rows as f64);
        self.apply_seconds.observe(took.as_secs_f64());
        {
            let mut applied = self.applied.lock().expect("report lock");
            applied.transactions += txns;
            applied.batches += 1;
        }
        let mut q = self.unapplied.lock().expect("lag lock");
        while let Some(&(lsn, t)) = q.front()
            && lsn <= end_lsn
        {
            self.last_applied_commit.fetch_max(t, Ordering::Relaxed);
            q.pop_front();
        }
    }

    /// A transaction carrying a shadowsync origin was skipped (see `origin`).
    pub fn echo_skipped(&self) {
        self.echoes.inc();
        self.applied.lock().expect("report lock").echoes_skipped += 1;
    }

    pub fn applied(&self) -> Applied {
        self.applied.lock().expect("report lock").clone()
    }

    /// Blue confirmed `lsn` (it only moves forward).
    pub fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed_lsn
            .fetch_max(lsn.as_u64(), Ordering::Relaxed);
        // Blue's WAL has reached anything confirmed: between two polls of its position,
        // `/status` would otherwise show the WAL position behind the confirmed one.
        self.blue_wal_lsn.fetch_max(lsn.as_u64(), Ordering::Relaxed);
    }

    /// Asks the apply stage for a hold (replacing one not taken yet, whose asker then hears
    /// that the stream ended).
    pub fn request_hold(&self, req: crate::hold::HoldRequest) {
        *self.hold.lock().expect("hold lock") = Some(req);
        self.hold_pending.store(true, Ordering::Release);
    }

    /// The hold asked for, if any (the apply stage takes it).
    pub fn take_hold(&self) -> Option<crate::hold::HoldRequest> {
        // A load first: this runs once per blue transaction, and a hold is rare.
        if !self.hold_pending.load(Ordering::Relaxed)
            || !self.hold_pending.swap(false, Ordering::Acquire)
        {
            return None;
        }
        self.hold.lock().expect("hold lock").take()
    }

    /// This process created blue's replication slot.
    pub fn set_slot_created(&self) {
        self.slot_created.store(true, Ordering::Relaxed);
    }

    pub fn slot_created(&self) -> bool {
        self.slot_created.load(Ordering::Relaxed)
    }

    /// The apply stage received a blue transaction with changes, committed at `end_lsn`.
    pub fn change_commit_received(&self, end_lsn: Lsn) {
        self.last_change_commit
            .fetch_max(end_lsn.as_u64(), Ordering::Relaxed);
    }

    /// End LSN of the latest blue transaction with changes received, if any.
    pub fn last_change_commit(&self) -> Option<Lsn> {
        Some(Lsn::from_u64(
            self.last_change_commit.load(Ordering::Relaxed),
        ))
        .filter(|l| *l > Lsn::ZERO)
    }

    /// Blue's WAL insert position was read as `lsn` (it only moves forward).
    pub fn set_blue_wal(&self, lsn: Lsn) {
        self.blue_wal_lsn.fetch_max(lsn.as_u64(), Ordering::Relaxed);
    }

    /// The LSN blue last confirmed to this process.
    pub fn confirmed_lsn(&self) -> Lsn {
        Lsn::from_u64(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// Blue's WAL insert position as last read.
    pub fn blue_wal_lsn(&self) -> Lsn {
        Lsn::from_u64(self.blue_wal_lsn.load(Ordering::Relaxed))
    }

    /// Age of the oldest unapplied blue commit, in seconds. Between sessions (an outage) nothing
    /// is being received: while blue has WAL we have not confirmed, the lag is the age of the
    /// last commit applied (an upper bound, the honest one: a lag of 0 during an outage is not).
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self
            .unapplied
            .lock()
            .expect("lag lock")
            .front()
            .map(|&(_, t)| t);
        let outage = !self.streaming.load(Ordering::Relaxed) && self.lag_bytes() > 0;
        let last = self.last_applied_commit.load(Ordering::Relaxed);
        let oldest = oldest.or((outage && last > 0).then_some(last));
        match oldest {
            None => 0.0,
            Some(commit_time) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as i64)
                    .unwrap_or(0)
                    - PG_EPOCH_OFFSET_MICROS;
                ((now - commit_time).max(0) as f64) / 1e6
            }
        }
    }

    /// Blue's WAL not yet confirmed, as blue counts it at the monitor's last reading (WAL
    /// position and confirmed position read in one statement: comparing a position read once a
    /// second with confirmations every 10 ms read about 0 under load). Before any reading, our
    /// own estimate.
    pub fn lag_bytes(&self) -> u64 {
        let seen = self.lag_seen.load(Ordering::Relaxed);
        if seen >= 0 {
            return seen as u64;
        }
        self.blue_wal_lsn
            .load(Ordering::Relaxed)
            .saturating_sub(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// OpenMetrics exposition, with gauges derived from state refreshed first.
    pub fn encode(&self) -> String {
        let confirmed = self.confirmed_lsn.load(Ordering::Relaxed);
        let wal = self.blue_wal_lsn.load(Ordering::Relaxed);
        self.confirmed_lsn_gauge.set(confirmed as i64);
        self.blue_wal_lsn_gauge.set(wal as i64);
        self.lag_bytes.set(self.lag_bytes() as i64);
        self.lag_seconds.set(self.lag_seconds());
        for (database, flag) in [
            ("blue", &self.blue_connected),
            ("green", &self.green_connected),
        ] {
            self.connected
                .get_or_create(&DatabaseLabels {
                    database: database.to_string(),
                })
                .set(i64::from(flag.load(Ordering::Relaxed)));
        }
        self.process.refresh();
        let mut out = String::new();
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.process_registry))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }

    /// The Prometheus text exposition (0.0.4), for scrapers that do not ask for OpenMetrics.
    pub fn encode_text(&self) -> String {
        text::to_text(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_the_core_metrics() {
        let s = Shared::new();
        s.add_rows("public.t", "insert", 3);
        s.batch_committed(2, 3, Duration::from_millis(5), Lsn::from_u64(100));
        s.set_state(State::Streaming);
        let text = s.encode();
        for name in [
            "shadowsync_replication_lag_bytes",
            "shadowsync_replication_lag_seconds",
            "shadowsync_rows_applied_total{table=\"public.t\",op=\"insert\"} 3",
            "shadowsync_transactions_applied_total 2",
            "shadowsync_batches_applied_total 1",
            "shadowsync_batch_rows_bucket",
            "shadowsync_apply_duration_seconds_bucket",
            "shadowsync_confirmed_lsn",
            "shadowsync_pipeline_state{state=\"streaming\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn known_tables_have_every_counter_at_zero() {
        let s = Shared::new();
        s.known_tables(["public.vms"]);
        let text = s.encode_text();
        for line in [
            "shadowsync_rows_applied_total{table=\"public.vms\",op=\"insert\"} 0",
            "shadowsync_rows_applied_total{table=\"public.vms\",op=\"truncate\"} 0",
            "shadowsync_conflicts_total{table=\"public.vms\",kind=\"update_older\",resolution=\"keep\"} 0",
            "shadowsync_snapshot_rows_total{table=\"public.vms\"} 0",
            "shadowsync_errors_total{stage=\"apply\",retryable=\"false\"} 0",
            "shadowsync_database_connected{database=\"blue\"} 0",
            "shadowsync_build_info{version=\"",
            "# TYPE shadowsync_build_info gauge",
            "# HELP shadowsync_conflicts_total ",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(s.encode().ends_with("# EOF\n"));
    }

    #[test]
    fn blue_wal_is_never_behind_confirmed() {
        let s = Shared::new();
        s.set_blue_wal(Lsn::from_u64(100));
        s.set_confirmed(Lsn::from_u64(150));
        assert_eq!(s.blue_wal_lsn(), Lsn::from_u64(150));
        assert_eq!(s.lag_bytes(), 0);
    }

    #[test]
    fn lag_seconds_is_zero_when_caught_up_and_counts_unapplied_commits() {
        let s = Shared::new();
        assert_eq!(s.lag_seconds(), 0.0);
        s.commit_received(Lsn::from_u64(10), 0); // committed at 2000-01-01: very old
        assert!(s.lag_seconds() > 1e8);
        s.batch_committed(1, 1, Duration::ZERO, Lsn::from_u64(10));
        assert_eq!(s.lag_seconds(), 0.0);
    }
}
