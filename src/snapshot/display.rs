//! Live progress of the initial copy: rows, bytes, rate and ETA per table; a redrawn bar on a
//! terminal, a log line per table every few seconds otherwise.
//!
//! Invariant: counters only grow; estimates come from blue's statistics (`reltuples`) and may be
//! off (0 when the table was never analyzed: no ETA then).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

/// How often a terminal bar is redrawn.
const BAR_INTERVAL: Duration = Duration::from_millis(500);
/// How often log lines are written when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

pub struct Progress {
    tables: Vec<String>,
    /// Rows read from blue (what the bar and its ETA count, against blue's estimate).
    rows: Vec<AtomicU64>,
    /// Rows written to green (fewer than read where a rule's filter leaves rows out).
    written: Vec<AtomicU64>,
    bytes: Vec<AtomicU64>,
    estimate: Vec<AtomicU64>,
    started: Instant,
}

impl Progress {
    pub fn new(tables: Vec<String>) -> Progress {
        let n = tables.len();
        let zeros = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Progress {
            tables,
            rows: zeros(),
            written: zeros(),
            bytes: zeros(),
            estimate: zeros(),
            started: Instant::now(),
        }
    }

    pub fn set_estimate(&self, table: usize, rows: u64) {
        self.estimate[table].store(rows, Ordering::Relaxed);
    }

    pub fn add(&self, table: usize, rows: u64, bytes: u64) {
        self.rows[table].fetch_add(rows, Ordering::Relaxed);
        self.bytes[table].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn rows(&self, table: usize) -> u64 {
        self.rows[table].load(Ordering::Relaxed)
    }

    /// Green committed `rows` more rows of `table`.
    pub fn wrote(&self, table: usize, rows: u64) {
        self.written[table].fetch_add(rows, Ordering::Relaxed);
    }

    pub fn written(&self, table: usize) -> u64 {
        self.written[table].load(Ordering::Relaxed)
    }

    /// One line per table: `table  rows/estimate  MiB  rows/s  ETA`.
    fn lines(&self) -> Vec<(String, String)> {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        (0..self.tables.len())
            .map(|i| {
                let rows = self.rows(i);
                let est = self.estimate[i].load(Ordering::Relaxed).max(rows);
                let mib = self.bytes[i].load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
                let rate = rows as f64 / secs;
                let eta = if est > rows && rate > 0.0 {
                    format!("{:.0}s", (est - rows) as f64 / rate)
                } else {
                    "-".into()
                };
                let pct = if est > 0 {
                    rows as f64 * 100.0 / est as f64
                } else {
                    0.0
                };
                (
                    self.tables[i].clone(),
                    format!(
                        "{rows}/{est} rows ({pct:.0}%), {mib:.1} MiB, {rate:.0} rows/s, ETA {eta}"
                    ),
                )
            })
            .collect()
    }

    fn draw(&self) {
        let mut err = std::io::stderr().lock();
        for (table, line) in self.lines() {
            let _ = writeln!(err, "\x1b[2K{table:<32} {line}");
        }
        // Back to the first line, to redraw in place.
        let _ = write!(err, "\x1b[{}A", self.tables.len());
        let _ = err.flush();
    }

    /// The final state: a bar's last frame, or one log line per table.
    pub fn print_final(&self) {
        if std::io::stderr().is_terminal() {
            let mut err = std::io::stderr().lock();
            for (table, line) in self.lines() {
                let _ = writeln!(err, "\x1b[2K{table:<32} {line}");
            }
        }
    }
}

/// Reports progress until aborted.
pub async fn report(progress: Arc<Progress>) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(if terminal { BAR_INTERVAL } else { LOG_INTERVAL });
    tick.tick().await;
    loop {
        tick.tick().await;
        if terminal {
            progress.draw();
        } else {
            for (table, line) in progress.lines() {
                info!(table = %table, progress = %line, "initial copy");
            }
        }
    }
}
