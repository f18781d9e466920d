//! Command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shadowsync",
    version,
    about = "Keeps a green PostgreSQL database in sync with blue during a blue-green migration"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream blue into green until stopped (SIGTERM/SIGINT) or, with --drain, until caught up.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Apply everything committed on blue before now, confirm it, print the report, exit 0.
        #[arg(long)]
        drain: bool,
        /// Let the initial copy empty green tables that already hold rows (otherwise refused).
        #[arg(long)]
        snapshot_truncate: bool,
    },
    /// Check the config and every mapping against the live blue and green schemas; writes nothing.
    /// Exit code 0 only when all is well.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Also the round trip through the inverse rules of this (reverse stream's) config: which
        /// blue columns survive forward then inverse unchanged, which are lossy, which green
        /// columns the inverse ignores, on rows sampled from blue (no values shown, nothing
        /// written). Fails when a key column is lossy or an expression fails.
        #[arg(long, value_name = "REVERSE_CONFIG")]
        round_trip: Option<PathBuf>,
        /// With --round-trip: rows sampled per blue table, at most.
        #[arg(long, requires = "round_trip", default_value_t = shadowsync::check::round_trip::DEFAULT_SAMPLE,
              value_parser = clap::value_parser!(u32).range(1..))]
        sample: u32,
        /// With --round-trip: print the JSON report (the check and the round trip) instead of text.
        #[arg(long, requires = "round_trip")]
        json: bool,
    },
    /// Print the running sidecar's (same config) /status for a person.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask a running sidecar (same config) to drain, wait for it, print its report.
    Drain {
        #[arg(long, short)]
        config: PathBuf,
        /// Give up after this long (e.g. 30s, 5m); the sidecar keeps draining.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// List the conflicts recorded in green (shadowsync.conflicts), or replay some of them.
    Conflicts {
        #[arg(long, short)]
        config: PathBuf,
        /// Only conflicts detected since then: a duration back from now (30m, 2h, 1d) or a
        /// timestamp (2026-11-21 14:00).
        #[arg(long)]
        since: Option<String>,
        /// Only conflicts of this table (schema.table, target or source).
        #[arg(long)]
        table: Option<String>,
        /// Show at most this many, the newest.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Re-apply the incoming (blue) row of these conflicts and mark them resolved, in one
        /// transaction.
        #[arg(long, num_args = 1..)]
        replay: Vec<i64>,
    },
    /// Re-derive a green table's lookup columns (those whose rule reads another table) from
    /// the rows green holds: after a change of a green-only table (tenants) the stream cannot
    /// see, or of a rule. One key range per transaction; only changed values are written.
    Remap {
        #[arg(long, short)]
        config: PathBuf,
        /// Green table (schema.table; public by default); repeat for several, in order.
        #[arg(long, required = true)]
        table: Vec<String>,
        /// Rows per chunk (one transaction each).
        #[arg(long, default_value_t = shadowsync::remap::DEFAULT_CHUNK_ROWS)]
        chunk_rows: i64,
    },
    /// Set green's sequences from blue's (cutover): those behind every copied column, and
    /// those [[sequence]] entries name. Without --apply, only shows what it would set.
    Sequences {
        #[arg(long, short)]
        config: PathBuf,
        /// Set them, in one green transaction (a sequence is never moved backwards).
        #[arg(long)]
        apply: bool,
        /// Steps of blue's increment past blue's last value.
        #[arg(long, default_value_t = 0)]
        headroom: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hand green to the application: pre-checks, fence writes on blue, drain to the fence,
    /// set green's sequences and mark the slot cut over; prints a JSON report, exit 0 only when
    /// green is ready. Uses the running sidecar of this config, or streams in this process.
    Cutover {
        #[arg(long, short)]
        config: PathBuf,
        /// Longest wait for each of: streaming, lag under --max-lag, the drain (e.g. 30s).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Largest replication lag at which the fence is raised.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        max_lag: Duration,
        /// Longest wait for the fence's table locks on blue.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        fence_timeout: Duration,
        /// Only the pre-checks (privileges included); nothing is fenced or written.
        #[arg(long)]
        dry_run: bool,
        /// Cut over although shadowsync.conflicts holds unresolved conflicts.
        #[arg(long)]
        accept_conflicts: bool,
        /// Steps of each blue sequence's increment added when setting green's.
        #[arg(long, default_value_t = 0)]
        headroom: u64,
        /// Compare green with the transform of blue behind the fence, after the drain (as
        /// verify does); a difference aborts the cutover.
        #[arg(long)]
        verify: bool,
        /// With --verify: cut over even though green differs (the report lists the keys).
        #[arg(long, requires = "verify")]
        accept_differences: bool,
        /// With --verify: incremental, as `verify --since-lsn` (checked before the fence).
        #[arg(long, requires = "verify", value_parser = parse_lsn)]
        since_lsn: Option<shadowsync::lsn::Lsn>,
        /// Remove a fence left on blue by a killed cutover (blue's writes resume).
        #[arg(long)]
        abort: bool,
        /// The rollback stream's config: its blue.slot and blue.publication are created on
        /// green inside the fence, as `[reverse]` does (overrides it).
        #[arg(long)]
        reverse_config: Option<PathBuf>,
    },
    /// Start over after a failed or rehearsal run: clears shadowsync's bookkeeping for the slot
    /// on green (progress, copy state, cutover mark); conflicts are kept.
    Reset {
        #[arg(long, short)]
        config: PathBuf,
        /// Also drop the slot on blue (the next run starts with a fresh initial copy).
        #[arg(long)]
        drop_slot: bool,
        /// Also empty the green tables the mappings write.
        #[arg(long)]
        truncate: bool,
    },
    /// Prove green equals the transform of blue: both compared at one blue commit (the running
    /// sidecar holds for a moment, or a stream runs here), key by key. Exit 0 only when equal.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only these mappings (source or target, schema.table or table); repeatable.
        #[arg(long)]
        table: Vec<String>,
        /// Print the JSON report instead of text.
        #[arg(long)]
        json: bool,
        /// Rows per checksummed chunk.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: u64,
        /// Differences listed per mapping (all are counted).
        #[arg(long, default_value_t = 100)]
        max_keys: usize,
        /// Longest wait for a stream started here to be streaming.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// Incremental: from the latest point at or before this LSN at which a verify found
        /// the selected targets equal, compare the keys as sets and in full only the rows
        /// written since on either side.
        #[arg(long, value_parser = parse_lsn)]
        since_lsn: Option<shadowsync::lsn::Lsn>,
    },
    /// Throwaway blue and green clusters, a workload, live progress, drain and a report.
    Demo {
        /// Seconds of workload before draining.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn parse_lsn(text: &str) -> Result<shadowsync::lsn::Lsn, String> {
    shadowsync::lsn::Lsn::parse(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {text}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit in {text}: use ms, s, m or h")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shadowsync::logging::init(cli.log_json);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", shadowsync::failure::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            drain,
            snapshot_truncate,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let opts = shadowsync::pipeline::RunOptions {
                drain,
                snapshot_truncate,
            };
            let report =
                shadowsync::pipeline::run(cfg, opts, shadowsync::logging::shutdown_signal())
                    .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Check {
            config,
            round_trip,
            sample,
            json,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let (report, trip) = match round_trip {
                Some(path) => {
                    let inverse = shadowsync::config::Config::load(&path)?;
                    let (report, trip) =
                        shadowsync::check::round_trip::command(&cfg, &inverse, sample).await?;
                    (report, Some(trip))
                }
                None => (shadowsync::check::command(&cfg).await?, None),
            };
            if let (true, Some(trip)) = (json, &trip) {
                println!("{}", serde_json::to_string_pretty(&trip.json(&report))?);
                anyhow::ensure!(
                    report.ok() && trip.ok(),
                    "the check or the round trip fails"
                );
                return Ok(());
            }
            for m in &report.mappings {
                println!("{}", m.line());
                for p in &m.problems {
                    println!("     {p}");
                }
                for w in &m.warnings {
                    println!("     warning: {w}");
                }
                for n in &m.notes {
                    println!("     note: {n}");
                }
            }
            if let Some(trip) = &trip {
                print!("{}", trip.text());
            }
            for p in &report.problems {
                println!("FAIL {p}");
            }
            for n in &report.notes {
                println!("note: {n}");
            }
            anyhow::ensure!(report.ok(), "the configuration has problems (listed above)");
            anyhow::ensure!(
                trip.is_none_or(|t| t.ok()),
                "the round trip fails: a key column is lossy or an expression fails (listed above)"
            );
        }
        Command::Status { config } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let text = shadowsync::status_line::command(cfg.listen_addr()?).await?;
            println!("{text}");
        }
        Command::Drain { config, timeout } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let report = match shadowsync::admin::request_drain(
                &shadowsync::admin::Endpoint::of(&cfg)?,
                timeout,
            )
            .await
            {
                Err(e @ shadowsync::admin::AdminError::DrainTimeout(_)) => anyhow::bail!(
                    "drain: {e}; the sidecar keeps draining: check /status and lag, then call drain again (or cancel it: curl -X DELETE http://{}/drain)",
                    cfg.listen_addr()?
                ),
                r => r.context("drain")?,
            };
            println!("{report}");
        }
        Command::Conflicts {
            config,
            since,
            table,
            limit,
            replay,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let opts = shadowsync::conflicts::ListOptions {
                since,
                table,
                limit,
            };
            print!(
                "{}",
                shadowsync::conflicts::command(&cfg, &opts, &replay).await?
            );
        }
        Command::Remap {
            config,
            table,
            chunk_rows,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            for done in shadowsync::remap::command(&cfg, &table, chunk_rows).await? {
                println!("{done}");
            }
        }
        Command::Sequences {
            config,
            apply,
            headroom,
            json,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let opts = shadowsync::sequence::Options { apply, headroom };
            let report = shadowsync::sequence::command(&cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.json())?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Cutover {
            config,
            timeout,
            max_lag,
            fence_timeout,
            dry_run,
            accept_conflicts,
            headroom,
            verify,
            accept_differences,
            since_lsn,
            abort,
            reverse_config,
        } => {
            let mut cfg = shadowsync::config::Config::load(&config)?;
            if let Some(path) = reverse_config {
                let back = shadowsync::config::Config::load(&path)?;
                cfg.reverse = Some(shadowsync::reverse::of_config(&back, &cfg)?);
            }
            if abort {
                let report = shadowsync::cutover::abort(&cfg).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            let opts = shadowsync::cutover::Options {
                timeout,
                max_lag,
                dry_run,
                accept_conflicts,
                headroom,
                fence_lock_timeout: fence_timeout,
                verify,
                accept_differences,
                verify_since: since_lsn,
            };
            let report = shadowsync::cutover::run(&cfg, &opts).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Reset {
            config,
            drop_slot,
            truncate,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let opts = shadowsync::reset::ResetOptions {
                drop_slot,
                truncate,
            };
            for step in shadowsync::reset::reset(&cfg, opts).await? {
                println!("{step}");
            }
        }
        Command::Verify {
            config,
            table,
            json,
            chunk_rows,
            max_keys,
            timeout,
            since_lsn,
        } => {
            let cfg = shadowsync::config::Config::load(&config)?;
            let opts = shadowsync::verify::Options {
                tables: table,
                compare: shadowsync::verify::compare::Options {
                    chunk_rows,
                    max_keys,
                },
                timeout,
                since_lsn,
            };
            let report = shadowsync::verify::command(&cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            anyhow::ensure!(
                report.equal,
                "not verified: {}",
                if report.interrupted {
                    "interrupted"
                } else {
                    "green differs from the transform of blue"
                }
            );
        }
        Command::Demo { seconds } => {
            shadowsync::demo::run(Duration::from_secs(seconds)).await?;
        }
    }
    Ok(())
}
