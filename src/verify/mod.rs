//! `shadowsync verify`: proves green equals the transform of blue, online, key by key.
//!
//! One consistent point (see `point`): blue's snapshot at a temporary slot's consistent point,
//! green's with the stream held at exactly that blue commit; the stream then goes on while
//! every mapping is compared inside the two snapshots (see `compare`: chunk checksums computed
//! by the databases, rule mappings evaluated by green, differing chunks bisected down to keys).
//!
//! With `--since-lsn` the comparison is incremental: from the point of an earlier verify that
//! found the same targets equal, the keys are compared as sets and only rows written since in
//! full (see `since` and `compare::compare_since`).
//!
//! Invariants: nothing is written to either database but a temporary slot on blue (gone with
//! its session), the flush marker a drain also writes, and, once a comparison completed, its
//! point in green's `shadowsync.verify_points`; keys and column names are reported,
//! never other values; the report says `equal` only when every compared mapping matched; an
//! interrupted verify says how far it got and is never `equal`.

pub mod compare;
pub mod point;
pub mod since;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::streamer::Streamer;
use crate::transform::TableMap;

/// Options of `shadowsync verify`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Mappings to compare, by source or target (`schema.table` or `table`); empty: all.
    pub tables: Vec<String>,
    pub compare: compare::Options,
    /// Longest wait for a stream started here to be streaming.
    pub timeout: Duration,
    /// Incremental: only what may have changed since the latest point at or before this LSN
    /// at which an earlier verify found every selected target equal (see `since`).
    pub since_lsn: Option<crate::lsn::Lsn>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] crate::failure::Unreachable),
    #[error(transparent)]
    Db(#[from] crate::failure::OnSide),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("taking blue's snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Streamer(#[from] crate::streamer::StreamerError),
    #[error("comparing {target}: {error}")]
    Compare {
        target: String,
        error: compare::CompareError,
    },
    #[error("the mappings do not pass `shadowsync check`; nothing was compared:\n{0}")]
    Mappings(String),
    #[error(
        "no mapping matches --table {0}: give a published table or its target, as schema.table or table"
    )]
    NoSuchTable(String),
    #[error(
        "no verify recorded on green found {targets} equal at or before {since} (with the mappings as they are now): run a full shadowsync verify --config F first, then --since-lsn with the LSN it reports"
    )]
    NoBase {
        since: crate::lsn::Lsn,
        targets: String,
    },
    #[error(
        "the verify point at {lsn} is {age} transactions old on {side} (at most {max}, or the point is not of this {side}): run a full shadowsync verify --config F instead",
        max = since::MAX_AGE
    )]
    BaseTooOld {
        lsn: crate::lsn::Lsn,
        side: &'static str,
        age: i64,
    },
    #[error("recording the verify point: {0}")]
    Record(String),
    #[error(
        "the stream was not streaming within {0:?} (initial copy not done, or blue or green unreachable); nothing was compared"
    )]
    NotStreaming(Duration),
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True only when every compared mapping matched and nothing was interrupted.
    pub equal: bool,
    /// The blue commit both sides were compared at.
    pub lsn: crate::lsn::Lsn,
    /// Green's progress inside its snapshot.
    pub green_progress: Option<crate::lsn::Lsn>,
    /// Incremental (`--since-lsn`): the earlier point compared from (see [`since`]).
    pub incremental_since: Option<crate::lsn::Lsn>,
    /// How long the stream held for green's snapshot (seconds).
    pub hold_seconds: Option<f64>,
    /// Time to take both snapshots.
    pub point_seconds: f64,
    pub mappings: Vec<compare::MappingDiff>,
    /// Targets not compared because the run was interrupted.
    pub not_compared: Vec<String>,
    pub interrupted: bool,
    pub seconds: f64,
}

impl Report {
    /// A human-readable summary: one line per mapping, then the verdict.
    pub fn text(&self) -> String {
        let mut out = format!(
            "verified at blue LSN {} (green's progress {}; the stream held {} ms)\n",
            self.lsn,
            self.green_progress
                .map(|l| l.to_string())
                .unwrap_or("-".into()),
            self.hold_seconds
                .map(|s| format!("{:.0}", s * 1000.0))
                .unwrap_or("?".into()),
        );
        if let Some(since) = self.incremental_since {
            out.push_str(&format!(
                "incremental: keys compared as sets, in full only rows written since the verify at {since}\n"
            ));
        }
        for m in &self.mappings {
            out.push_str(&line(m));
            out.push('\n');
        }
        for t in &self.not_compared {
            out.push_str(&format!("----  {t}: not compared (interrupted)\n"));
        }
        out.push_str(if self.equal {
            "green equals the transform of blue.\n"
        } else if self.interrupted {
            "interrupted: not verified.\n"
        } else {
            "DIFFERENT: green does not equal the transform of blue (keys above).\n"
        });
        out
    }
}

/// `shadowsync verify`: the consistent point through the running sidecar (or a stream run
/// here), then every selected mapping compared; `stop` interrupts between chunks' answers.
pub async fn run(
    config: &Config,
    opts: &Options,
    stop: Shutdown,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let sides = point::connect(config).await?;
    let groups = selected(&sides, config, opts).await?;
    // Refused before any point is taken when there is nothing to start from.
    let base = base(&sides.green, config, opts.since_lsn, &groups).await?;
    let streamer = Streamer::find(config).await?;
    let point = match wait_streaming(&streamer, opts.timeout).await {
        Ok(()) => point::take(config, &streamer, sides).await,
        Err(e) => Err(e),
    };
    // A stream started here has served its purpose once green's snapshot exists.
    streamer.stop().await;
    let point = point?;
    let xmins = snapshot_xmins(&point.blue, &point.green, base.as_ref()).await?;
    let compared = compare_all(
        &point.blue,
        &point.green,
        &groups,
        &opts.compare,
        base.as_ref().map(|b| &b.since),
        stop,
        progress,
    )
    .await?;
    finish(
        &point.green,
        config,
        point.lsn,
        &xmins,
        base.as_ref(),
        &groups,
        &compared,
    )
    .await;
    Ok(Report {
        equal: compared.equal(),
        lsn: point.lsn,
        green_progress: point.green_progress,
        incremental_since: base.map(|b| b.lsn),
        hold_seconds: point.hold_seconds,
        point_seconds: point.seconds,
        mappings: compared.mappings,
        not_compared: compared.not_compared,
        interrupted: compared.interrupted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `cutover --verify`: behind the fence, after the drain, nothing moves on either side, so a
/// plain snapshot of each is one consistent point (`fence_lsn`). Compares `maps`, incrementally
/// with `since_lsn` (see [`Options::since_lsn`]).
pub async fn fenced(
    config: &Config,
    maps: &[Arc<TableMap>],
    fence_lsn: crate::lsn::Lsn,
    opts: &compare::Options,
    since_lsn: Option<crate::lsn::Lsn>,
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let sides = point::connect(config).await?;
    let groups = by_target(maps.to_vec());
    let base = base(&sides.green, config, since_lsn, &groups).await?;
    let (blue, green) = (&sides.blue, &sides.green);
    blue.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(crate::failure::on("blue", "starting blue's snapshot"))?;
    green
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(crate::failure::on("green", "starting green's snapshot"))?;
    let green_progress = crate::progress::read(green, &config.blue.slot)
        .await
        .map_err(crate::failure::on("green", "reading green's progress"))?
        .map(|p| p.end_lsn);
    let xmins = snapshot_xmins(blue, green, base.as_ref()).await?;
    let (_never, stop) = crate::shutdown::channel();
    let since = base.as_ref().map(|b| &b.since);
    let compared = compare_all(blue, green, &groups, opts, since, stop, &|_| {}).await;
    if let Ok(c) = &compared {
        finish(green, config, fence_lsn, &xmins, base.as_ref(), &groups, c).await;
    }
    sides.close().await;
    let compared = compared?;
    Ok(Report {
        equal: compared.equal(),
        lsn: fence_lsn,
        green_progress,
        incremental_since: base.map(|b| b.lsn),
        hold_seconds: None,
        point_seconds: 0.0,
        mappings: compared.mappings,
        not_compared: compared.not_compared,
        interrupted: compared.interrupted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The point `--since-lsn` starts from (`green` outside any transaction), when asked.
async fn base(
    green: &tokio_postgres::Client,
    config: &Config,
    since_lsn: Option<crate::lsn::Lsn>,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
) -> Result<Option<since::Base>, VerifyError> {
    match since_lsn {
        Some(l) => Ok(Some(
            since::choose(green, &config.blue.slot, l, groups).await?,
        )),
        None => Ok(None),
    }
}

/// Each side's oldest running transaction in its snapshot (recorded with the point), after
/// checking that `base`'s are not too old on either side.
async fn snapshot_xmins(
    blue: &tokio_postgres::Client,
    green: &tokio_postgres::Client,
    base: Option<&since::Base>,
) -> Result<(String, String), VerifyError> {
    if let Some(b) = base {
        since::check_age(blue, "blue", b, &b.since.blue_xmin).await?;
        since::check_age(green, "green", b, &b.since.green_xmin).await?;
    }
    Ok((
        since::snapshot_xmin(blue, "blue").await?,
        since::snapshot_xmin(green, "green").await?,
    ))
}

/// Ends green's snapshot and records the point of a completed comparison (see `since`).
async fn finish(
    green: &tokio_postgres::Client,
    config: &Config,
    lsn: crate::lsn::Lsn,
    (blue_xmin, green_xmin): &(String, String),
    base: Option<&since::Base>,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
    compared: &Compared,
) {
    if compared.interrupted {
        return;
    }
    // The comparison's temporary tables go with its transaction.
    if let Err(e) = green.batch_execute("ROLLBACK").await {
        tracing::warn!(error = %e, "verify: ending green's snapshot failed; the point is not recorded");
        return;
    }
    let point = since::Recorded {
        slot: &config.blue.slot,
        lsn,
        blue_xmin,
        green_xmin,
        since: base.map(|b| b.lsn),
    };
    since::record(green, &point, groups, &compared.mappings).await;
}

/// Where a comparison is, for the progress line.
pub struct Progress<'a> {
    pub target: &'a str,
    /// Rows compared in this target so far.
    pub rows: u64,
    /// Green's estimate of the target's rows (`reltuples`), for the ETA.
    pub estimate: u64,
    /// This target is the `nth` of `of`.
    pub nth: usize,
    pub of: usize,
}

/// Green's estimate of a table's rows (0 when unknown: never analyzed).
async fn estimate(green: &tokio_postgres::Client, table: &str) -> u64 {
    green
        .query_one(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass",
            &[&table],
        )
        .await
        .map(|r| r.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

/// What comparing the groups gave.
struct Compared {
    mappings: Vec<compare::MappingDiff>,
    not_compared: Vec<String>,
    interrupted: bool,
}

impl Compared {
    fn equal(&self) -> bool {
        !self.interrupted && self.mappings.iter().all(|m| m.equal())
    }
}

/// Compares each target's group inside the snapshots `blue` and `green` hold; `stop` ends it
/// early (what is left is listed as not compared).
async fn compare_all(
    blue: &tokio_postgres::Client,
    green: &tokio_postgres::Client,
    groups: &BTreeMap<String, Vec<Arc<TableMap>>>,
    opts: &compare::Options,
    since: Option<&compare::Since>,
    mut stop: Shutdown,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Compared, VerifyError> {
    let mut out = Compared {
        mappings: Vec::new(),
        not_compared: Vec::new(),
        interrupted: false,
    };
    let total = groups.len();
    for (i, (target, maps)) in groups.iter().enumerate() {
        let target = target.clone();
        if out.interrupted {
            out.not_compared.push(target);
            continue;
        }
        let estimate = estimate(green, &maps[0].target.quoted()).await;
        let rows = AtomicU64::new(0);
        let tick = |n: u64| {
            progress(&Progress {
                target: &target,
                rows: rows.fetch_add(n, Ordering::Relaxed) + n,
                estimate,
                nth: i + 1,
                of: total,
            })
        };
        let compared = tokio::select! {
            biased;
            // An interrupt first: the run ends with what it has.
            () = stop.recv() => None,
            diff = async {
                match since {
                    Some(s) => compare::compare_since(blue, green, maps, opts, s, &tick).await,
                    None => compare::compare(blue, green, maps, opts, &tick).await,
                }
            } => Some(diff),
        };
        match compared {
            Some(diff) => out
                .mappings
                .push(diff.map_err(|error| VerifyError::Compare {
                    target: target.clone(),
                    error,
                })?),
            None => {
                out.interrupted = true;
                out.not_compared.push(target);
            }
        }
    }
    Ok(out)
}

/// The mappings to compare, grouped by target (several blue tables may write one), in
/// target order, narrowed to `--table`.
async fn selected(
    sides: &point::Sides,
    config: &Config,
    opts: &Options,
) -> Result<BTreeMap<String, Vec<Arc<TableMap>>>, VerifyError> {
    let rules = config.rules()?;
    let (_, maps) = crate::pipeline::preflight::mappings(
        &sides.blue,
        &sides.green,
        &config.blue.publication,
        &rules,
    )
    .await?
    .map_err(VerifyError::Mappings)?;
    let mut groups = by_target(maps);
    if let Some(w) = opts
        .tables
        .iter()
        .find(|w| !groups.values().flatten().any(|m| named(m, w)))
    {
        return Err(VerifyError::NoSuchTable(w.clone()));
    }
    if !opts.tables.is_empty() {
        groups.retain(|_, maps| maps.iter().any(|m| opts.tables.iter().any(|w| named(m, w))));
    }
    Ok(groups)
}

/// `shadowsync verify` on a terminal or in a log: [`run`], stopped by SIGINT/SIGTERM (the
/// report then says how far it got), with a live progress line on a terminal (rows compared
/// and rows/s; log lines otherwise, every 10 s).
pub async fn command(config: &Config, opts: &Options) -> Result<Report, VerifyError> {
    let (trigger, stop) = crate::shutdown::channel();
    let watcher = tokio::spawn(async move {
        crate::logging::shutdown_signal().await;
        tracing::info!("signal received: verify stops after the answers in flight");
        trigger.fire();
    });
    let line = ProgressLine::new();
    let report = run(config, opts, stop, &|p| line.show(p)).await;
    line.done();
    watcher.abort();
    report
}

/// The live progress line (see [`command`]).
struct ProgressLine {
    tty: bool,
    /// The target being compared (its number) and since when.
    target_started: std::sync::Mutex<(usize, Instant)>,
    last: std::sync::Mutex<Instant>,
    shown: std::sync::atomic::AtomicBool,
}

impl ProgressLine {
    fn new() -> ProgressLine {
        use std::io::IsTerminal;
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            target_started: std::sync::Mutex::new((0, Instant::now())),
            last: std::sync::Mutex::new(Instant::now()),
            shown: Default::default(),
        }
    }

    fn show(&self, p: &Progress) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        let mut last = self.last.lock().expect("progress lock");
        if last.elapsed() < every {
            return;
        }
        *last = Instant::now();
        let mut since = self.target_started.lock().expect("progress lock");
        if since.0 != p.nth {
            *since = (p.nth, Instant::now());
        }
        let rate = p.rows as f64 / since.1.elapsed().as_secs_f64().max(0.001);
        let eta = p.estimate.saturating_sub(p.rows) as f64 / rate.max(1.0);
        if self.tty {
            eprint!(
                "\r\x1b[Kverify {} ({} of {}): {} rows compared, {rate:.0} rows/s, ETA {eta:.0} s",
                p.target, p.nth, p.of, p.rows
            );
            self.shown.store(true, Ordering::Relaxed);
        } else {
            tracing::info!(target = %p.target, nth = p.nth, of = p.of, rows = p.rows, rows_per_second = rate as u64, eta_seconds = eta as u64, "verify: comparing");
        }
    }

    fn done(&self) {
        if self.shown.load(Ordering::Relaxed) {
            eprintln!();
        }
    }
}

/// Mappings grouped by target (several blue tables may write one), in target order.
pub fn by_target(maps: Vec<Arc<TableMap>>) -> BTreeMap<String, Vec<Arc<TableMap>>> {
    let mut groups: BTreeMap<String, Vec<Arc<TableMap>>> = BTreeMap::new();
    for m in maps {
        groups.entry(m.target.to_string()).or_default().push(m);
    }
    groups
}

/// Whether `--table wanted` names the mapping's source or target (`schema.table` or `table`).
fn named(m: &TableMap, wanted: &str) -> bool {
    [&m.source, &m.target]
        .iter()
        .any(|n| n.to_string() == wanted || n.name == wanted)
}

/// One mapping's line of the text report.
fn line(m: &compare::MappingDiff) -> String {
    let verdict = if m.equal() { "ok  " } else { "DIFF" };
    let mut out = format!(
        "{verdict}  {} -> {}: {} blue rows, {} green rows, {} chunks, {:.1} s",
        m.source, m.target, m.rows_blue, m.rows_green, m.chunks, m.seconds
    );
    if m.incremental {
        out.push_str(&format!(
            "; incremental, {} rows written since compared in full",
            m.changed_rows
        ));
    }
    if let Some(why) = &m.in_full {
        out.push_str(&format!("; compared in full: {why}"));
    }
    if !m.equal() {
        out.push_str(&format!(
            "; missing in green {}, extra in green {}, differing {}",
            m.missing_count, m.extra_count, m.differing_count
        ));
        for k in &m.missing_in_green {
            out.push_str(&format!("\n      missing in green: {k}"));
        }
        for k in &m.extra_in_green {
            out.push_str(&format!("\n      extra in green:   {k}"));
        }
        for d in &m.differing {
            out.push_str(&format!(
                "\n      differs:          {} in {}",
                d.key,
                d.columns.join(", ")
            ));
        }
    }
    out
}

/// Waits until the stream is streaming (a hold acts on the apply stage of a live stream).
async fn wait_streaming(streamer: &Streamer, timeout: Duration) -> Result<(), VerifyError> {
    let deadline = Instant::now() + timeout;
    loop {
        if streamer.status().await?.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(VerifyError::NotStreaming(timeout));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
