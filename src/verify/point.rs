//! `verify`'s consistent point: blue's snapshot at a temporary slot's consistent point `C`, and
//! green's with the stream held at exactly `C` (see `hold`), so that green must equal the
//! transform of blue's snapshot, row for row, while the stream goes on around them.
//!
//! Invariants: green's snapshot is taken only while the stream holds with every blue
//! transaction committing before `C` committed in green and none after; the hold is released
//! however this ends (at once after green's snapshot, or by dropping it on an error); blue's
//! snapshot is imported before the session exporting it (and its temporary slot) goes.

use std::time::Instant;

use tokio_postgres::Client;

use super::VerifyError;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::streamer::{Hold, Streamer};

/// Both sides inside their snapshots (REPEATABLE READ transactions), at one blue commit.
pub struct Point {
    pub blue: Client,
    pub green: Client,
    /// Blue's snapshot sees every transaction committing before it, green holds their changes.
    pub lsn: Lsn,
    /// Green's progress inside its snapshot (the last blue commit applied).
    pub green_progress: Option<Lsn>,
    /// How long the stream held (seconds), when known.
    pub hold_seconds: Option<f64>,
    /// Time to take both snapshots.
    pub seconds: f64,
    _drivers: [tokio::task::JoinHandle<()>; 2],
}

/// Exact holds tried before the two-phase one (see `held`).
const EXACT_ATTEMPTS: usize = 3;

/// Blue's snapshot at a new temporary slot's consistent point `C`, and the stream held at `C`.
///
/// First tried with exact holds asked after the slot exists: the stream only stops once it
/// reaches `C` (the slot's creation, which waits for blue's running transactions, takes 0.1
/// to 0.6 s under load, and the stream goes on meanwhile); refused when the stream got past
/// `C` before the request, then tried with a new slot. After [`EXACT_ATTEMPTS`] refusals, a
/// two-phase hold that cannot be passed: asked at blue's position before the slot is made, it
/// stops the stream there for the slot's creation.
async fn held(
    config: &Config,
    streamer: &Streamer,
    blue: &Client,
) -> Result<(pgwire_replication::ReplicationClient, Lsn, String, Hold), VerifyError> {
    for attempt in 0..=EXACT_ATTEMPTS {
        let two_phase = attempt == EXACT_ATTEMPTS;
        let mut hold = if two_phase {
            let from = crate::source::slot::current_wal_lsn(blue).await?;
            Some(streamer.hold(from, false).await?)
        } else {
            None
        };
        let (exporter, lsn, snapshot) = crate::snapshot::export_temporary(config, "verify").await?;
        let mut hold = match hold.take() {
            Some(h) => h,
            None => streamer.hold(lsn, true).await?,
        };
        // A transaction committing after `C`, so that an idle stream reaches the point at once.
        crate::source::slot::drain_target(blue).await?;
        match hold.at(lsn).await {
            Ok(()) => return Ok((exporter, lsn, snapshot, hold)),
            Err(crate::streamer::StreamerError::HoldPassed) if !two_phase => {
                tracing::debug!(lsn = %lsn, attempt, "the stream passed the point before the hold; taking a new one");
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the last attempt is two-phase, which is never passed")
}

/// Verify's connections to blue and green, with their drivers.
pub struct Sides {
    pub blue: Client,
    pub green: Client,
    drivers: [tokio::task::JoinHandle<()>; 2],
}

impl Sides {
    /// Closes both connections and waits for their drivers to end.
    pub async fn close(self) {
        let Sides {
            blue,
            green,
            drivers,
        } = self;
        drop((blue, green));
        for d in drivers {
            let _ = d.await;
        }
    }
}

/// Connects to both sides.
pub async fn connect(config: &Config) -> Result<Sides, VerifyError> {
    let (blue, blue_driver) = config
        .blue_dsn()?
        .connect_to("blue", "shadowsync-verify")
        .await?;
    let (green, green_driver) = config
        .green_dsn()?
        .connect_to("green", "shadowsync-verify")
        .await?;
    Ok(Sides {
        blue,
        green,
        drivers: [blue_driver, green_driver],
    })
}

/// Takes the point through `streamer` (the sidecar's stream, or one run here), on `sides`
/// (outside any transaction).
pub async fn take(
    config: &Config,
    streamer: &Streamer,
    sides: Sides,
) -> Result<Point, VerifyError> {
    let started = Instant::now();
    let Sides {
        blue,
        green,
        drivers,
    } = sides;
    let (exporter, lsn, snapshot, hold) = held(config, streamer, &blue).await?;
    green
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(crate::failure::on("green", "starting green's snapshot"))?;
    // The first query fixes the snapshot: green's progress, as of it.
    let progress = crate::progress::read(&green, &config.blue.slot).await;
    let hold_seconds = hold.release().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "releasing the hold failed; the stream goes on by itself within its limit");
        None
    });
    let green_progress = progress
        .map_err(crate::failure::on("green", "reading green's progress"))?
        .map(|p| p.end_lsn);
    blue.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        crate::transform::quote_literal(&snapshot)
    ))
    .await
    .map_err(crate::failure::on("blue", "importing blue's snapshot"))?;
    drop(exporter);
    tracing::info!(lsn = %lsn, green_progress = ?green_progress.map(|l| l.to_string()), hold_seconds, "verify: consistent point taken");
    Ok(Point {
        blue,
        green,
        lsn,
        green_progress,
        hold_seconds,
        seconds: started.elapsed().as_secs_f64(),
        _drivers: drivers,
    })
}
