//! Liveness: a task beside the streaming sessions, for the whole run, that asks blue and green
//! a trivial question every second on connections of its own, so that health and lag stay true
//! when the sessions cannot tell (an outage between sessions, a connection that accepts bytes
//! but answers nothing, a walsender that no longer hears us).
//!
//! What it keeps current in [`Shared`]: blue's WAL position and the lag in bytes as blue itself
//! counts it (`pg_current_wal_lsn() - confirmed_flush_lsn`, read in one statement), the slot's
//! retained and still-safe WAL, and whether each side answers. What it decides: a side that has
//! not answered for `retry.stall_timeout_ms`, or a walsender that has heard nothing from us for
//! that long while we stream, is *stalled*: readiness turns false and the supervisor drops the
//! session (its tasks aborted; green rolls back what it had not committed, and nothing past
//! green's last commit was confirmed to blue) and reconnects. When both sides answer again after
//! a failure, the supervisor is woken rather than left to sleep out its backoff.
//!
//! Invariants: nothing here writes to either database; every wait is bounded by the stall
//! timeout, so the monitor itself never hangs on a dead connection; it never blocks shutdown
//! (it is aborted with the run).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::{Config, Dsn};
use crate::lsn::Lsn;
use crate::metrics::Shared;

/// How often both sides are asked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One side's connection and when it last answered.
struct Side {
    name: &'static str,
    dsn: Dsn,
    client: Option<(Client, tokio::task::JoinHandle<()>)>,
    last_answer: Instant,
    /// The stall being reported, so it is logged once, not every second.
    reported: bool,
}

impl Side {
    fn new(name: &'static str, dsn: Dsn) -> Side {
        Side {
            name,
            dsn,
            client: None,
            last_answer: Instant::now(),
            reported: false,
        }
    }

    /// The connection, opened if needed within `limit`.
    async fn client(&mut self, limit: Duration) -> Option<&Client> {
        if self.client.is_none() {
            let connect = self.dsn.connect("shadowsync-monitor");
            match tokio::time::timeout(limit, connect).await {
                Ok(Ok(c)) => self.client = Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(side = self.name, error = %crate::failure::DbFailure::from_pg(&e), "monitor cannot connect");
                    return None;
                }
                Err(_) => return None,
            }
        }
        self.client.as_ref().map(|(c, _)| c)
    }

    fn drop_client(&mut self) {
        if let Some((_, driver)) = self.client.take() {
            driver.abort();
        }
    }

    fn answered(&mut self) {
        self.last_answer = Instant::now();
    }
}

/// What blue said in one reading.
struct BlueReading {
    wal: Lsn,
    /// `wal - confirmed_flush_lsn`, when the slot exists and has confirmed anything.
    lag: Option<u64>,
    retained: Option<i64>,
    safe: Option<i64>,
    lost: bool,
    /// Seconds since the walsender of our slot last heard from us (`None`: no walsender).
    reply_age: Option<f64>,
}

const BLUE_READING: &str = "SELECT pg_current_wal_lsn(),
        (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
        (pg_current_wal_lsn() - s.restart_lsn)::int8,
        s.safe_wal_size,
        s.wal_status::text = 'lost',
        extract(epoch FROM now() - r.reply_time)::float8
   FROM (SELECT 1) AS one
   LEFT JOIN pg_replication_slots s ON s.slot_name = $1
   LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid";

async fn read_blue(client: &Client, slot: &str) -> Result<BlueReading, tokio_postgres::Error> {
    let row = client.query_one(BLUE_READING, &[&slot]).await?;
    Ok(BlueReading {
        wal: row.get(0),
        lag: row.get::<_, Option<i64>>(1).map(|l| l.max(0) as u64),
        retained: row.get(2),
        safe: row.get(3),
        lost: row.get::<_, Option<bool>>(4).unwrap_or(false),
        reply_age: row.get(5),
    })
}

/// Runs until aborted.
pub async fn run(config: Config, shared: Arc<Shared>) {
    let (Ok(blue_dsn), Ok(green_dsn)) = (config.blue_dsn(), config.green_dsn()) else {
        return; // validated at start; nothing to watch without DSNs
    };
    let stall_after = Duration::from_millis(config.retry.stall_timeout_ms);
    // One question never waits longer than this: a slow answer is not yet a stall.
    let limit = stall_after.min(Duration::from_secs(10));
    let mut blue = Side::new("blue", blue_dsn);
    let mut green = Side::new("green", green_dsn);
    let slot = config.blue.slot.clone();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (b, g) = tokio::join!(
            ask_blue(&mut blue, &slot, &shared, limit, stall_after),
            ask_green(&mut green, limit)
        );
        shared.blue_connected.store(b.is_some(), Ordering::Relaxed);
        shared.green_connected.store(g, Ordering::Relaxed);
        let deaf = b == Some(true);
        judge(&mut blue, &mut green, &shared, stall_after, deaf);
    }
}

/// One reading of blue: `None` when blue did not answer, else whether its walsender is deaf to
/// us (blue answers, but the walsender of our slot has not heard from us for the stall timeout
/// while we stream: the replication connection itself is stuck).
async fn ask_blue(
    side: &mut Side,
    slot: &str,
    shared: &Shared,
    limit: Duration,
    stall_after: Duration,
) -> Option<bool> {
    let client = side.client(limit).await?;
    match tokio::time::timeout(limit, read_blue(client, slot)).await {
        Ok(Ok(r)) => {
            side.answered();
            shared.set_blue_wal(r.wal);
            shared.slot_observed(r.lag, r.retained, r.safe);
            if r.lost && !side.reported {
                warn!(
                    slot,
                    "blue invalidated the replication slot (wal_status = lost): the next session explains what to do"
                );
            }
            let deaf = shared.streaming.load(Ordering::Relaxed)
                && r.reply_age.is_some_and(|a| a > stall_after.as_secs_f64());
            if deaf {
                if !side.reported {
                    warn!(
                        slot,
                        reply_age_seconds = r.reply_age.unwrap_or_default() as u64,
                        "blue's walsender has not heard from shadowsync within retry.stall_timeout_ms: dropping the session and reconnecting"
                    );
                }
                shared.stalled(
                    "blue",
                    "blue's walsender has not heard from shadowsync within retry.stall_timeout_ms",
                );
            }
            Some(deaf)
        }
        Ok(Err(e)) => {
            tracing::debug!(side = side.name, error = %crate::failure::DbFailure::from_pg(&e), "monitor query failed");
            side.drop_client();
            None
        }
        Err(_) => {
            side.drop_client();
            None
        }
    }
}

/// A trivial question to green; `true` when green answered.
async fn ask_green(side: &mut Side, limit: Duration) -> bool {
    let Some(client) = side.client(limit).await else {
        return false;
    };
    match tokio::time::timeout(limit, client.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => {
            side.answered();
            true
        }
        _ => {
            side.drop_client();
            false
        }
    }
}

/// Declares stalls and recoveries from how long each side has been silent.
fn judge(blue: &mut Side, green: &mut Side, shared: &Shared, stall_after: Duration, deaf: bool) {
    for side in [&mut *blue, &mut *green] {
        let silent = side.last_answer.elapsed();
        if silent > stall_after {
            if !side.reported {
                warn!(
                    side = side.name,
                    silent_seconds = silent.as_secs(),
                    "no answer from the database within retry.stall_timeout_ms: dropping the session and reconnecting"
                );
                side.reported = true;
            }
            shared.stalled(
                side.name,
                "no answer to a trivial query within retry.stall_timeout_ms",
            );
        } else if side.reported && silent < INTERVAL * 2 && !(deaf && side.name == "blue") {
            info!(side = side.name, "the database answers again");
            side.reported = false;
        }
    }
    if deaf {
        blue.reported = true;
    } else if !blue.reported && !green.reported {
        shared.answering();
    }
}
