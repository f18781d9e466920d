//! `shadowsync cutover`: hands the application a green it can write to. Pre-checks, fence on
//! blue, drain to the fence, green's sequences and the cutover mark in one green transaction,
//! then the report. Works on the running sidecar of the same config (through its admin
//! endpoint) or, when none answers, streams in this process.
//!
//! Invariants:
//! - Nothing is fenced unless every pre-check passed; `--dry-run` runs only the pre-checks.
//! - Any failure after the fence and before green's commit removes the fence (blue's writes
//!   resume) and leaves green as it was (the mark and the sequences commit together or not at
//!   all); the error says which step failed.
//! - The sequences are read from blue after the fence, so no blue id can be handed out after
//!   the value green continues from.
//! - With `[reverse]`, the rollback stream's publication and slot are created on green after the
//!   drain and before green's commit (see `reverse`); an abort drops them with the fence. The
//!   fence then lets the reverse stream's origin through, so it can write into blue.
//! - A rollback is a cutover of the reverse config: its green (the old blue) carries the forward
//!   cutover's fence, which is lifted in the transaction that marks the cutover, so the old
//!   blue takes the application's writes exactly once it is ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::fence::{self, Fence};
use crate::lsn::Lsn;
use crate::streamer::Streamer;
use crate::transform::TableMap;

/// Options of `shadowsync cutover`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for each of: streaming to start, lag to fall under `max_lag`, the drain.
    pub timeout: Duration,
    /// Largest replication lag at which the fence is raised (keeps the write outage short).
    pub max_lag: Duration,
    /// Only the pre-checks; nothing is fenced or written.
    pub dry_run: bool,
    /// Cut over although `shadowsync.conflicts` holds unresolved conflicts.
    pub accept_conflicts: bool,
    /// Steps of each blue sequence's increment added to green's (0: continue where blue was).
    pub headroom: u64,
    /// Longest wait for the fence's table locks.
    pub fence_lock_timeout: Duration,
    /// Compare green with the transform of blue behind the fence, after the drain (see
    /// `verify`); a difference aborts the cutover unless `accept_differences`.
    pub verify: bool,
    pub accept_differences: bool,
    /// With `verify`: incremental, from the latest verify point at or before this LSN (see
    /// `verify::since`); checked before the fence.
    pub verify_since: Option<crate::lsn::Lsn>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(30),
            max_lag: Duration::from_secs(1),
            dry_run: false,
            accept_conflicts: false,
            headroom: 0,
            fence_lock_timeout: Duration::from_secs(5),
            verify: false,
            accept_differences: false,
            verify_since: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] crate::failure::Unreachable),
    #[error(transparent)]
    Db(#[from] crate::failure::OnSide),
    #[error("the mappings do not pass `shadowsync check`; nothing was fenced:\n{0}")]
    Mappings(String),
    #[error(
        "slot {slot} was already cut over at blue LSN {fence_lsn} ({at}); nothing was done. To rehearse again, run shadowsync reset --config F"
    )]
    AlreadyCutOver {
        slot: String,
        fence_lsn: Lsn,
        at: String,
    },
    #[error(
        "shadowsync.conflicts holds {count} unresolved conflicts of slot {slot}: review them (shadowsync conflicts --config F), replay or accept them, then run cutover again (or with --accept-conflicts); nothing was fenced"
    )]
    Conflicts { slot: String, count: i64 },
    #[error(transparent)]
    Fence(#[from] fence::FenceError),
    #[error(
        "the sidecar was not streaming within {0:?} (initial copy not done, or blue or green unreachable: see its log and /status); nothing was fenced"
    )]
    NotStreaming(Duration),
    #[error(
        "replication lag stayed at {lag_seconds:.1} s, over --max-lag {max_lag:?}, for {waited:?}: fencing now would block blue's writers for at least that long; wait for the sidecar to catch up (or raise --max-lag); nothing was fenced"
    )]
    Lag {
        lag_seconds: f64,
        max_lag: Duration,
        waited: Duration,
    },
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Streamer(#[from] crate::streamer::StreamerError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error(
        "green does not equal the transform of blue:\n{0}Run shadowsync verify --config F for the keys, fix them, and cut over again (or with --accept-differences)"
    )]
    Differences(String),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Sequence(#[from] crate::sequence::SequenceError),
    #[error(transparent)]
    Reverse(#[from] crate::reverse::ReverseError),
    #[error(
        "cutover aborted while {step}: {error}. The fence was removed from blue (writes resume) and green was left as it was; fix the cause and run cutover again"
    )]
    Aborted {
        step: &'static str,
        error: Box<CutoverError>,
    },
    #[error(
        "cutover aborted while {step}: {error}; removing the fence failed too ({removal}): run shadowsync cutover --config F --abort"
    )]
    FenceLeft {
        step: &'static str,
        error: Box<CutoverError>,
        removal: fence::FenceError,
    },
}

/// One green sequence set (or left) at the cutover.
#[derive(Debug, Clone, Serialize)]
pub struct SequenceSet {
    pub blue: String,
    pub green: Option<String>,
    pub blue_value: Option<i64>,
    /// `set to N`, or why it was left.
    pub action: String,
}

/// Rows of one mapping on both sides after the drain (a filter or rule makes them differ).
#[derive(Debug, Clone, Serialize)]
pub struct Rows {
    pub source: String,
    pub target: String,
    pub blue: i64,
    pub green: i64,
}

/// What `cutover` prints (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub slot: String,
    pub dry_run: bool,
    /// True once green is ready for the application.
    pub cut_over: bool,
    /// Pre-checks, in words.
    pub checks: Vec<String>,
    pub fence_lsn: Option<Lsn>,
    pub fence_acquire_seconds: Option<f64>,
    pub drain_seconds: Option<f64>,
    /// From the fence's commit to green's commit of the sequences and the mark: the
    /// application may switch from then on.
    pub green_ready_seconds: Option<f64>,
    /// From the fence's commit to the report (row counts included): how long blue refused
    /// writes before the operator could read this.
    pub writes_blocked_seconds: Option<f64>,
    pub sequences: Vec<SequenceSet>,
    pub rows: Vec<Rows>,
    /// With `--verify`: the comparison behind the fence.
    pub verify: Option<crate::verify::Report>,
    /// With `[reverse]`: the rollback stream's slot on green and its start LSN, created before
    /// green was marked.
    pub reverse: Option<crate::reverse::Prepared>,
    /// Tables of green whose fence (an earlier cutover's, green being the old blue of a
    /// rollback) was lifted in the transaction that marked this cutover.
    pub fence_lifted_on_green: Vec<String>,
    /// What the operator must know that did not stop the cutover.
    pub warnings: Vec<String>,
    pub next_steps: Vec<String>,
}

/// What `cutover --abort` did.
#[derive(Debug, Clone, Serialize)]
pub struct Aborted {
    pub aborted: bool,
    /// Tables the fence was removed from (empty: there was none).
    pub fence_removed_from: Vec<String>,
    /// The sidecar at `metrics.listen`: whether a drain left pending by the killed cutover
    /// was cancelled (else it would stop the sidecar once reached).
    pub sidecar: String,
    /// With `[reverse]`: the reverse slot a killed cutover left on green, dropped when the
    /// slot was not cut over.
    pub reverse: Option<String>,
}

/// `shadowsync cutover --abort`: removes a fence left by a killed cutover, and cancels the
/// drain it may have left pending in the sidecar.
pub async fn abort(config: &Config) -> Result<Aborted, CutoverError> {
    let (blue, conn) = config
        .blue_dsn()?
        .connect_to("blue", "shadowsync-cutover")
        .await?;
    let removed = fence::remove(&blue).await;
    conn.abort();
    let removed = removed?;
    let reverse = match &config.reverse {
        Some(r) => {
            let (green, conn) = config
                .green_dsn()?
                .connect_to("green", "shadowsync-cutover")
                .await?;
            let done = crate::reverse::abandon(&green, r, &config.blue.slot).await;
            conn.abort();
            done?
        }
        None => None,
    };
    let endpoint = crate::admin::Endpoint::of(config)?;
    let addr = endpoint.addr;
    let sidecar = match crate::admin::cancel_drain(&endpoint, Duration::from_secs(5)).await {
        Ok(()) => {
            format!("the sidecar at {addr} keeps streaming (any pending drain was cancelled)")
        }
        Err(crate::admin::AdminError::Connect { .. }) => format!("no sidecar answers at {addr}"),
        Err(e) => format!(
            "the sidecar at {addr} did not cancel its drain ({e}): if it stops once drained, start it again"
        ),
    };
    Ok(Aborted {
        aborted: true,
        fence_removed_from: removed,
        sidecar,
        reverse,
    })
}

/// `shadowsync cutover`: see the module doc.
pub async fn run(config: &Config, opts: &Options) -> Result<Report, CutoverError> {
    let (blue, blue_conn) = config
        .blue_dsn()?
        .connect_to("blue", "shadowsync-cutover")
        .await?;
    let (mut green, green_conn) = config
        .green_dsn()?
        .connect_to("green", "shadowsync-cutover")
        .await?;
    let result = cut_over(config, opts, &blue, &mut green).await;
    blue_conn.abort();
    green_conn.abort();
    result
}

async fn cut_over(
    config: &Config,
    opts: &Options,
    blue: &Client,
    green: &mut Client,
) -> Result<Report, CutoverError> {
    let mut report = Report::new(config, opts);
    let (tables, maps) = mappings(config, blue, green).await?;
    prechecks(config, opts, blue, green, (&tables, &maps), &mut report).await?;
    let streamer = Streamer::find(config).await?;
    if let Err(e) = wait_streaming(&streamer, opts, &mut report).await {
        streamer.stop().await;
        return Err(e);
    }
    if opts.dry_run {
        streamer.stop().await;
        report
            .next_steps
            .push("run cutover without --dry-run".into());
        return Ok(report);
    }
    // The reverse stream's apply session may write through the fence (see `fence`).
    let allow: Vec<String> = config
        .reverse
        .iter()
        .map(|r| crate::origin::name(&r.slot))
        .collect();
    let fence = match fence::raise_allowing(blue, &tables, opts.fence_lock_timeout, &allow).await {
        Ok(f) => f,
        Err(e) => {
            streamer.stop().await;
            return Err(e.into());
        }
    };
    report.fence_lsn = Some(fence.lsn);
    report.fence_acquire_seconds = Some(fence.acquire_seconds);
    let fenced_at = Instant::now();
    let step = fenced_steps(
        config,
        opts,
        blue,
        green,
        &maps,
        &fence,
        streamer,
        &mut report,
    )
    .await;
    if let Err((step, error)) = step {
        return Err(match fence::remove(blue).await {
            Ok(_) => CutoverError::Aborted {
                step,
                error: Box::new(error),
            },
            Err(removal) => CutoverError::FenceLeft {
                step,
                error: Box::new(error),
                removal,
            },
        });
    }
    report.green_ready_seconds = Some(fenced_at.elapsed().as_secs_f64());
    report.cut_over = true;
    // Green is marked: from here nothing may lift the fence, whatever fails.
    match row_counts(blue, green, &maps).await {
        Ok(rows) => report.rows = rows,
        Err(e) => report.warnings.push(format!(
            "counting rows after the cutover failed ({e}); the cutover itself is done"
        )),
    }
    report.writes_blocked_seconds = Some(fenced_at.elapsed().as_secs_f64());
    report.next_steps = next_steps(config, report.reverse.as_ref());
    Ok(report)
}

impl Report {
    fn new(config: &Config, opts: &Options) -> Report {
        Report {
            slot: config.blue.slot.clone(),
            dry_run: opts.dry_run,
            cut_over: false,
            checks: Vec::new(),
            fence_lsn: None,
            fence_acquire_seconds: None,
            drain_seconds: None,
            green_ready_seconds: None,
            writes_blocked_seconds: None,
            sequences: Vec::new(),
            rows: Vec::new(),
            verify: None,
            reverse: None,
            fence_lifted_on_green: Vec::new(),
            warnings: Vec::new(),
            next_steps: Vec::new(),
        }
    }
}

/// Every pre-check that needs no stream: [`static_checks`], the reverse stream's, and an
/// incremental verify's point (refused here rather than behind the fence).
async fn prechecks(
    config: &Config,
    opts: &Options,
    blue: &Client,
    green: &Client,
    (tables, maps): (&[crate::transform::QualifiedName], &[Arc<TableMap>]),
    report: &mut Report,
) -> Result<(), CutoverError> {
    static_checks(config, opts, blue, green, tables, report).await?;
    if let Some(r) = &config.reverse {
        let reverse_tables = crate::reverse::tables(r, &targets(maps))?;
        report
            .checks
            .push(crate::reverse::precheck(green, r, &reverse_tables).await?);
    }
    if let (true, Some(since)) = (opts.verify, opts.verify_since) {
        // Refused here rather than behind the fence.
        let groups = crate::verify::by_target(maps.to_vec());
        let base = crate::verify::since::choose(green, &config.blue.slot, since, &groups).await?;
        report.checks.push(format!(
            "verify is incremental, from the verify point at {}",
            base.lsn
        ));
    }
    Ok(())
}

/// The published tables and their mappings, as `check` sees them (refused unless all pass).
async fn mappings(
    config: &Config,
    blue: &Client,
    green: &Client,
) -> Result<crate::pipeline::preflight::Mapped, CutoverError> {
    let rules = config.rules()?;
    crate::pipeline::preflight::mappings(blue, green, &config.blue.publication, &rules)
        .await?
        .map_err(CutoverError::Mappings)
}

/// The pre-checks that need no stream: not cut over yet, conflicts, the fence's privileges.
async fn static_checks(
    config: &Config,
    opts: &Options,
    blue: &Client,
    green: &Client,
    tables: &[crate::transform::QualifiedName],
    report: &mut Report,
) -> Result<(), CutoverError> {
    let slot = &config.blue.slot;
    crate::store::migrate(green).await?;
    if let Some(c) = crate::progress::cut_over(green, slot)
        .await
        .map_err(crate::failure::on("green", "reading the cutover state"))?
    {
        return Err(CutoverError::AlreadyCutOver {
            slot: slot.clone(),
            fence_lsn: c.fence_lsn,
            at: c.at,
        });
    }
    let count: i64 = green
        .query_one(
            "SELECT count(*) FROM shadowsync.conflicts WHERE slot = $1 AND resolved_at IS NULL",
            &[slot],
        )
        .await
        .map_err(crate::failure::on("green", "counting unresolved conflicts"))?
        .get(0);
    if count > 0 && !opts.accept_conflicts {
        return Err(CutoverError::Conflicts {
            slot: slot.clone(),
            count,
        });
    }
    report.checks.push(format!(
        "{count} unresolved conflicts (see shadowsync conflicts)"
    ));
    let missing = fence::missing_privileges(blue, tables).await?;
    if !missing.is_empty() {
        let user: String = blue
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(crate::failure::on("blue", "reading the user"))?
            .get(0);
        return Err(fence::FenceError::Privileges {
            user,
            missing: missing.join("; "),
        }
        .into());
    }
    report.checks.push(format!(
        "blue user may fence the {} published tables",
        tables.len()
    ));
    Ok(())
}

/// Waits until the stream runs (initial copy done) and its lag is under `max_lag`.
async fn wait_streaming(
    streamer: &Streamer,
    opts: &Options,
    report: &mut Report,
) -> Result<(), CutoverError> {
    let started = Instant::now();
    let mut lag = f64::INFINITY;
    loop {
        let (ready, now) = streamer.status().await?;
        lag = if ready { now } else { lag };
        if ready && lag <= opts.max_lag.as_secs_f64() {
            report.checks.push(format!(
                "streaming, initial copy done, lag {lag:.2} s (at most {:?})",
                opts.max_lag
            ));
            return Ok(());
        }
        if started.elapsed() >= opts.timeout {
            return Err(if ready {
                CutoverError::Lag {
                    lag_seconds: lag,
                    max_lag: opts.max_lag,
                    waited: opts.timeout,
                }
            } else {
                CutoverError::NotStreaming(opts.timeout)
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Behind the fence: drain, then sequences and the mark in one green transaction, then the
/// row counts. A failure names its step (the caller removes the fence).
#[allow(clippy::too_many_arguments)]
async fn fenced_steps(
    config: &Config,
    opts: &Options,
    blue: &Client,
    green: &mut Client,
    maps: &[Arc<TableMap>],
    fence: &Fence,
    streamer: Streamer,
    report: &mut Report,
) -> Result<(), (&'static str, CutoverError)> {
    let drain_started = Instant::now();
    streamer
        .drain(opts.timeout)
        .await
        .map_err(|e| ("draining to the fence", e.into()))?;
    report.drain_seconds = Some(drain_started.elapsed().as_secs_f64());
    if opts.verify {
        verify_fenced(config, opts, maps, fence, report)
            .await
            .map_err(|e| ("verifying green behind the fence", e))?;
    }
    if let Some(r) = &config.reverse {
        let step = "creating the reverse stream's slot on green";
        let tables = crate::reverse::tables(r, &targets(maps)).map_err(|e| (step, e.into()))?;
        let prepared = crate::reverse::prepare(&*green, r, &tables, opts.timeout)
            .await
            .map_err(|e| (step, e.into()))?;
        report.reverse = Some(prepared);
    }
    let marked = mark(config, opts, blue, green, maps, fence, report).await;
    if marked.is_err()
        && let Some(prepared) = report.reverse.take()
    {
        crate::reverse::undo(&*green, &prepared, true).await;
    }
    marked
}

/// Green's sequences, the cutover mark and (on a rollback) the lifting of green's own fence,
/// in one green transaction.
async fn mark(
    config: &Config,
    opts: &Options,
    blue: &Client,
    green: &mut Client,
    maps: &[Arc<TableMap>],
    fence: &Fence,
    report: &mut Report,
) -> Result<(), (&'static str, CutoverError)> {
    let step = "setting green's sequences and marking the cutover";
    let rules = config.rules().map_err(|e| (step, e.into()))?;
    let plans = crate::sequence::plan(blue, &*green, maps, &rules, opts.headroom)
        .await
        .map_err(|e| (step, e.into()))?;
    let tx = green.transaction().await.map_err(|e| {
        (
            step,
            crate::failure::on("green", "starting the cutover transaction")(e).into(),
        )
    })?;
    let done = crate::sequence::apply(&tx, &plans)
        .await
        .map_err(|e| (step, e.into()))?;
    report.sequences = plans
        .iter()
        .zip(&done)
        .map(|(p, d)| SequenceSet {
            blue: p.blue.to_string(),
            green: p.green.as_ref().map(|g| g.name.to_string()),
            blue_value: p.blue_value,
            action: match d {
                crate::sequence::Decision::Set { value } => format!("set to {value}"),
                crate::sequence::Decision::Leave(why) => format!("left: {why}"),
            },
        })
        .collect();
    // Green the old blue of a rollback: its fence comes off as green becomes the application's.
    report.fence_lifted_on_green = fence::lift_in(&tx).await.map_err(|e| {
        (
            step,
            crate::failure::on("green", "lifting green's fence")(e).into(),
        )
    })?;
    let json = serde_json::to_value(&*report).unwrap_or_default();
    crate::progress::mark_cut_over(&tx, &config.blue.slot, fence.lsn, &json)
        .await
        .map_err(|e| {
            (
                step,
                crate::failure::on("green", "marking the cutover")(e).into(),
            )
        })?;
    tx.commit().await.map_err(|e| {
        (
            step,
            crate::failure::on("green", "committing the cutover")(e).into(),
        )
    })?;
    Ok(())
}

/// The green tables the mappings write.
fn targets(maps: &[Arc<TableMap>]) -> Vec<crate::transform::QualifiedName> {
    maps.iter().map(|m| m.target.clone()).collect()
}

/// `--verify`: green compared with the transform of blue, both still (fenced and drained).
async fn verify_fenced(
    config: &Config,
    opts: &Options,
    maps: &[Arc<TableMap>],
    fence: &Fence,
    report: &mut Report,
) -> Result<(), CutoverError> {
    let verified = crate::verify::fenced(
        config,
        maps,
        fence.lsn,
        &Default::default(),
        opts.verify_since,
    )
    .await?;
    let equal = verified.equal;
    let text = verified.text();
    report.verify = Some(verified);
    if !equal {
        if !opts.accept_differences {
            return Err(CutoverError::Differences(text));
        }
        report
            .warnings
            .push("green differs from the transform of blue (accepted with --accept-differences): see verify".into());
    }
    Ok(())
}

/// Rows of each mapping on both sides, blue's and green's counted at the same time.
async fn row_counts(
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
) -> Result<Vec<Rows>, CutoverError> {
    let source: Vec<String> = maps.iter().map(|m| m.source.quoted()).collect();
    let target: Vec<String> = maps.iter().map(|m| m.target.quoted()).collect();
    let (b, g) = tokio::try_join!(
        counts(blue, &source, "blue"),
        counts(green, &target, "green")
    )?;
    Ok(maps
        .iter()
        .zip(b.into_iter().zip(g))
        .map(|(m, (blue, green))| Rows {
            source: m.source.to_string(),
            target: m.target.to_string(),
            blue,
            green,
        })
        .collect())
}

async fn counts(
    client: &Client,
    tables: &[String],
    side: &'static str,
) -> Result<Vec<i64>, CutoverError> {
    let mut counts = Vec::with_capacity(tables.len());
    for t in tables {
        counts.push(count(client, t, side).await?);
    }
    Ok(counts)
}

async fn count(client: &Client, table: &str, side: &'static str) -> Result<i64, CutoverError> {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| crate::failure::on(side, "counting rows")(e).into())
}

fn next_steps(config: &Config, reverse: Option<&crate::reverse::Prepared>) -> Vec<String> {
    let slot = &config.blue.slot;
    let mut steps = Vec::new();
    if let Some(r) = reverse {
        steps.push(format!(
            "start the rollback stream now (shadowsync run --config <reverse config>, blue.slot = \"{}\", [snapshot] mode = \"never\"): green's writes from {} on are held in slot {} on green until it reads them",
            r.slot, r.start_lsn, r.slot
        ));
    }
    steps.extend([
        "switch the application's traffic to green now: blue refuses writes to the published tables".into(),
        format!(
            "once a rollback to blue is off the table, on blue: SELECT pg_drop_replication_slot('{slot}'); DROP SCHEMA {} CASCADE; (the slot holds WAL on blue until dropped)",
            fence::SCHEMA
        ),
        "to go back to blue before that: shadowsync cutover --config F --abort removes the fence (writes made on green since are not on blue: with a rollback stream, follow the README's rollback runbook instead)".into(),
    ]);
    steps
}
