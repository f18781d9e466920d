//! Cutover write-outage benchmark: how long blue refuses writes when `cutover` runs under a
//! pgbench load (the goal: at most 1 s at 1,000 transactions/s or more, with the
//! steady-state lag at most 1 s).
//!
//! Each run starts fresh clusters (`track_commit_timestamp = on` on both, so that blue's last
//! write, blue's fence and green's cutover mark can be timed from their commit records, apart
//! from the report's own clock), runs `pgbench -i -s N` on blue (pgbench_history gets a
//! bigserial key on both sides: every table is keyed, and green gets a sequence to set), creates
//! the same tables empty on green, and starts the sidecar in this process; the cutover finds it
//! through its admin endpoint, as in production. Once the initial copy is done, pgbench runs on
//! blue (`-R rate -P 1`); once it has run `warm` seconds and the lag stayed at most 1 s over the
//! last 3, `cutover::run` fences blue under that load. pgbench's clients then fail with SQLSTATE
//! 25006 and abort, which is the point. Green is then verified equal to blue (rows and a hash of
//! every row, per table) and its history sequence past blue's ids.
//!
//! Run: `cargo bench --bench cutover -- [--repeat N] [--smoke] [--scale S] [--rate TPS]
//! [--clients C] [--warm SECONDS] [--reverse]` (`--rate 0`: unthrottled; `--reverse`: the
//! cutover also creates a rollback stream's publication and slot on green, see `reverse`).
//! Prints each run, then the median and range of every measure.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shadowsync::cluster::{Cluster, SUPERUSER, pipeline_config};
use shadowsync::cutover::{self, Report};
use shadowsync::pipeline::{self, RunOptions};
use tokio_postgres::{Client, NoTls};

const DB: &str = "bench";
const SLOT: &str = "cutover_bench";
const PUBLICATION: &str = "cutover_bench";
const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];
/// Window over which the load's rate and the lag are judged before the fence.
const STEADY_WINDOW: Duration = Duration::from_secs(3);
/// The lag bound for the steady state (also the cutover's `--max-lag`).
const MAX_LAG: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Params {
    scale: u32,
    clients: u32,
    /// pgbench `-R` (0: as fast as it goes).
    rate: u32,
    /// Least time under load before the fence.
    warm: Duration,
    /// The cutover prepares a reverse stream (`[reverse]`, writes marked with an origin).
    reverse: bool,
}

/// One run's measures (seconds unless named otherwise).
#[derive(Debug, Clone)]
struct Outcome {
    /// Mean of pgbench's per-second progress over the steady window.
    tps_pgbench: f64,
    /// Blue commits of pgbench (history rows) per second in the window before the fence.
    tps_commits: f64,
    /// Highest lag sampled over the steady window.
    lag_max: f64,
    report: Report,
    /// Fence's commit to green's mark commit (commit timestamps).
    fence_to_mark: f64,
    /// Green's mark commit to the report's return (the row counts).
    mark_to_report: f64,
    /// pgbench's last successful commit to green's mark: the outage its writers saw.
    last_write_to_mark: f64,
    /// Around `cutover::run`, pre-checks included.
    cutover_wall: f64,
    aborted_clients: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| -> Option<u64> {
        let i = args.iter().position(|a| a == name)?;
        let v = args
            .get(i + 1)
            .unwrap_or_else(|| panic!("{name} takes a number"));
        Some(
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v}")),
        )
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    let params = Params {
        scale: value("--scale").unwrap_or(if smoke { 1 } else { 10 }) as u32,
        clients: value("--clients").unwrap_or(4) as u32,
        rate: value("--rate").unwrap_or(if smoke { 300 } else { 1500 }) as u32,
        warm: Duration::from_secs(value("--warm").unwrap_or(if smoke { 3 } else { 15 })),
        reverse: args.iter().any(|a| a == "--reverse"),
    };
    let repeat = value("--repeat")
        .unwrap_or(if smoke { 1 } else { 3 })
        .max(1) as usize;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    println!("cutover under pgbench load: {params:?}, {repeat} run(s), fresh clusters each");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut outcomes = Vec::new();
    for rep in 1..=repeat {
        let outcome = runtime.block_on(run(params));
        println!("\nrun {rep}/{repeat}\n{}", outcome.table());
        outcomes.push(outcome);
    }
    println!("\n{}", summary(&outcomes));
}

/// One run on fresh clusters: setup, copy, load, steady state, cutover, checks.
async fn run(p: Params) -> Outcome {
    let (blue, green) = tokio::task::spawn_blocking(move || setup(p))
        .await
        .expect("setup task");
    let mut config = pipeline_config(&blue, &green, DB, SLOT, PUBLICATION);
    if p.reverse {
        config.origin.mark = shadowsync::origin::Mark::On;
        config.reverse = Some(shadowsync::config::ReverseConfig {
            slot: "bench_rollback".into(),
            publication: "bench_rollback".into(),
            tables: Vec::new(),
        });
    }
    let handle = pipeline::start(config.clone(), RunOptions::default())
        .await
        .expect("starting the sidecar");
    // The cutover finds this sidecar through its admin endpoint, wherever it bound.
    config.metrics.listen = handle.addr.to_string();
    let copy_started = Instant::now();
    while !handle.shared.ready() {
        assert!(
            copy_started.elapsed() < Duration::from_secs(300),
            "the sidecar was not streaming within 300 s (initial copy)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "initial copy done in {:.1} s; starting the load",
        copy_started.elapsed().as_secs_f64()
    );
    let mut load = Load::start(&blue, p);
    let lag_max = steady(&handle, &mut load, p).await;
    let tps_pgbench = load.recent_tps(STEADY_WINDOW.as_secs() as usize);

    let opts = cutover::Options {
        max_lag: MAX_LAG,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let started = Instant::now();
    let report = cutover::run(&config, &opts).await.expect("cutover");
    let cutover_wall = started.elapsed().as_secs_f64();
    let report_at = unix_now();
    handle
        .wait()
        .await
        .expect("the sidecar's end after the drain");
    let aborted_clients = load.finish(p.clients);

    let b = connect(&blue.dsn(DB)).await;
    let g = connect(&green.dsn(DB)).await;
    let t = commit_times(&b, &g).await;
    verify(&b, &g).await;
    Outcome {
        tps_pgbench,
        tps_commits: t.commits_in_window as f64 / STEADY_WINDOW.as_secs_f64(),
        lag_max,
        report,
        fence_to_mark: t.mark - t.fence,
        mark_to_report: report_at - t.mark,
        last_write_to_mark: t.mark - t.last_write,
        cutover_wall,
        aborted_clients,
    }
}

/// Fresh clusters: blue with pgbench's tables and rows and the publication, green with the
/// same tables, empty (the initial copy fills them).
fn setup(p: Params) -> (Cluster, Cluster) {
    let mut blue = Cluster::start("cutover-blue").expect("starting blue");
    let mut green = Cluster::start("cutover-green").expect("starting green");
    for c in [&mut blue, &mut green] {
        c.reconfigure("track_commit_timestamp = on")
            .expect("enabling commit timestamps");
        c.create_database(DB).expect("creating the database");
    }
    let scale = p.scale.to_string();
    eprintln!("pgbench -i -s {scale} on blue...");
    pgbench_run(&blue, &["-i", "-q", "-s", &scale]);
    // d: drop, t: create tables, p: primary keys; no rows.
    pgbench_run(&green, &["-i", "-q", "-s", &scale, "-I", "dtp"]);
    // pgbench's history has no key; pgbench names its columns when it inserts, so a key
    // column it does not know about takes the sequence's values.
    let key = "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY";
    blue.psql(DB, key).expect("keying blue's history");
    green.psql(DB, key).expect("keying green's history");
    blue.psql(
        DB,
        &format!(
            "CREATE PUBLICATION {PUBLICATION} FOR TABLE {}",
            TABLES.join(", ")
        ),
    )
    .expect("creating the publication");
    (blue, green)
}

fn pgbench(c: &Cluster, args: &[&str]) -> Command {
    let mut cmd = c.command("pgbench");
    cmd.arg("-h")
        .arg(c.socket_dir())
        .args(["-p", &c.port().to_string(), "-U", SUPERUSER])
        .args(args)
        .arg(DB);
    cmd
}

fn pgbench_run(c: &Cluster, args: &[&str]) {
    let out = pgbench(c, args).output().expect("running pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?} on {} failed: {}",
        c.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// pgbench running on blue, its output read as it comes.
struct Load {
    child: Child,
    /// Per-second tps from `-P 1`.
    progress: Arc<Mutex<Vec<f64>>>,
    /// Every other line (errors, aborts, the summary).
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(blue: &Cluster, p: Params) -> Load {
        let (clients, rate) = (p.clients.to_string(), p.rate.to_string());
        let mut args = vec![
            "-n",
            "-P",
            "1",
            "-T",
            "3600",
            "-c",
            clients.as_str(),
            "-j",
            "2",
        ];
        if p.rate > 0 {
            args.extend(["-R", rate.as_str()]);
        }
        let mut child = pgbench(blue, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pgbench");
        let progress = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("pgbench stdout")),
            Box::new(child.stderr.take().expect("pgbench stderr")),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let (progress, lines) = (progress.clone(), lines.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        match progress_tps(&line) {
                            Some(tps) => progress.lock().expect("progress").push(tps),
                            None => lines.lock().expect("lines").push(line),
                        }
                    }
                })
            })
            .collect();
        Load {
            child,
            progress,
            lines,
            readers,
        }
    }

    /// Mean tps of the last `n` progress reports.
    fn recent_tps(&self, n: usize) -> f64 {
        let progress = self.progress.lock().expect("progress");
        let recent = &progress[progress.len().saturating_sub(n)..];
        recent.iter().sum::<f64>() / recent.len().max(1) as f64
    }

    /// Panics with pgbench's output if it ended before the fence.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("polling pgbench") {
            panic!(
                "pgbench ended before the fence ({status}):\n{}",
                self.lines.lock().expect("lines").join("\n")
            );
        }
    }

    /// Waits for pgbench to end (its clients abort on the fence); returns the aborted clients.
    fn finish(mut self, clients: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("polling pgbench").is_none() {
            if Instant::now() > deadline {
                eprintln!("pgbench still running 30 s after the cutover; killing it");
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let lines = self.lines.lock().expect("lines");
        let aborted: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("aborted in command"))
            .collect();
        if let Some(first) = aborted.first() {
            eprintln!("pgbench, first of {} abort lines: {first}", aborted.len());
        }
        let refused = lines
            .iter()
            .any(|l| l.contains("being migrated by shadowsync"));
        assert!(
            refused,
            "pgbench saw no fence refusal:\n{}",
            lines.join("\n")
        );
        aborted.len().min(clients as usize)
    }
}

/// tps of a `-P` line: `progress: 5.0 s, 1499.8 tps, lat 1.1 ms stddev 0.4, 0 failed, ...`.
fn progress_tps(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("progress: ")?;
    rest.split(", ").nth(1)?.strip_suffix(" tps")?.parse().ok()
}

/// Waits until the load has run `warm` and the lag stayed at most [`MAX_LAG`] over the last
/// [`STEADY_WINDOW`]; returns the window's highest lag.
async fn steady(handle: &pipeline::Handle, load: &mut Load, p: Params) -> f64 {
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let window = (STEADY_WINDOW.as_millis() / tick.as_millis()) as usize;
    let mut lags = VecDeque::with_capacity(window + 1);
    loop {
        load.assert_running();
        lags.push_back(handle.shared.lag_seconds());
        if lags.len() > window {
            lags.pop_front();
        }
        let lag_max = lags.iter().copied().fold(0.0, f64::max);
        if started.elapsed() >= p.warm && lags.len() == window && lag_max <= MAX_LAG.as_secs_f64() {
            return lag_max;
        }
        assert!(
            started.elapsed() < p.warm + Duration::from_secs(120),
            "no steady state: lag up to {lag_max:.2} s over the last {STEADY_WINDOW:?} at {:.0} tps",
            load.recent_tps(3)
        );
        tokio::time::sleep(tick).await;
    }
}

/// Commit times (Unix seconds, both clusters on this machine's clock).
struct CommitTimes {
    fence: f64,
    last_write: f64,
    mark: f64,
    /// pgbench commits in the [`STEADY_WINDOW`] before the fence.
    commits_in_window: i64,
}

async fn commit_times(blue: &Client, green: &Client) -> CommitTimes {
    let ts = "extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8";
    // The last table's trigger commits last, whether the fence is one transaction or one per
    // table: its commit is the fence's.
    let fence_sql = format!("SELECT max({ts}) FROM pg_trigger WHERE tgname = 'shadowsync_fence'");
    let fence: f64 = blue
        .query_one(&fence_sql, &[])
        .await
        .expect("reading the fence's commit time")
        .get(0);
    // Every pgbench transaction inserts one history row.
    let writes_sql = format!(
        "SELECT max({ts}), count(*) FILTER (WHERE {ts} > $1::float8 - $2::float8) FROM pgbench_history"
    );
    let row = blue
        .query_one(&writes_sql, &[&fence, &STEADY_WINDOW.as_secs_f64()])
        .await
        .expect("reading pgbench's commit times");
    let mark_sql = format!("SELECT {ts} FROM shadowsync.cutover WHERE slot = $1");
    let mark: f64 = green
        .query_one(&mark_sql, &[&SLOT])
        .await
        .expect("reading the cutover mark's commit time")
        .get(0);
    CommitTimes {
        fence,
        last_write: row.get(0),
        mark,
        commits_in_window: row.get(1),
    }
}

/// Green equals blue: per table, the row count and a sum of row hashes; green's history
/// sequence continues past blue's ids.
async fn verify(blue: &Client, green: &Client) {
    for table in TABLES {
        let sql = format!(
            "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {table} t"
        );
        let b = blue.query_one(&sql, &[]).await.expect("hashing blue");
        let g = green.query_one(&sql, &[]).await.expect("hashing green");
        let (bn, gn): (i64, i64) = (b.get(0), g.get(0));
        let (bh, gh): (String, String) = (b.get(1), g.get(1));
        assert!(
            bn == gn && bh == gh,
            "{table}: green differs from blue ({gn} rows against {bn})"
        );
    }
    let max_id: i64 = blue
        .query_one("SELECT coalesce(max(id), 0) FROM pgbench_history", &[])
        .await
        .expect("reading blue's history ids")
        .get(0);
    let next: i64 = green
        .query_one("SELECT nextval('pgbench_history_id_seq')", &[])
        .await
        .expect("drawing green's next history id")
        .get(0);
    assert!(
        next > max_id,
        "green's next history id {next} <= blue's {max_id}"
    );
}

async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .expect("connecting to a cluster");
    tokio::spawn(conn);
    client
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The measures shown per run and summarized: (name, value).
fn measures(o: &Outcome) -> Vec<(&'static str, f64)> {
    let r = &o.report;
    vec![
        ("load before the fence, pgbench -P (tx/s)", o.tps_pgbench),
        ("load before the fence, blue commits (tx/s)", o.tps_commits),
        ("highest lag over the last 3 s before the fence", o.lag_max),
        (
            "fence_acquire_seconds",
            r.fence_acquire_seconds.unwrap_or(f64::NAN),
        ),
        ("drain_seconds", r.drain_seconds.unwrap_or(f64::NAN)),
        (
            "writes_blocked_seconds (report)",
            r.writes_blocked_seconds.unwrap_or(f64::NAN),
        ),
        ("fence commit -> green's mark commit", o.fence_to_mark),
        (
            "  of which after the drain (sequences, mark)",
            o.fence_to_mark - r.drain_seconds.unwrap_or(f64::NAN),
        ),
        (
            "  of which the reverse publication and slot (--reverse)",
            r.reverse.as_ref().map_or(f64::NAN, |r| r.create_seconds),
        ),
        (
            "green's mark commit -> report (row counts)",
            o.mark_to_report,
        ),
        (
            "pgbench's last commit -> green's mark commit",
            o.last_write_to_mark,
        ),
        ("cutover::run, pre-checks included", o.cutover_wall),
    ]
}

impl Outcome {
    fn table(&self) -> String {
        let mut out = String::from("| measure | seconds (tx/s for the load) |\n|---|---:|\n");
        for (name, v) in measures(self) {
            out.push_str(&format!("| {name} | {v:.3} |\n"));
        }
        let seqs: Vec<String> = self
            .report
            .sequences
            .iter()
            .map(|s| format!("{}: {}", s.blue, s.action))
            .collect();
        out.push_str(&format!(
            "\nfence LSN {}, cut over: {}, pgbench clients aborted by the fence: {}, sequences: {}; green verified equal to blue",
            self.report.fence_lsn.map(|l| l.to_string()).unwrap_or_default(),
            self.report.cut_over,
            self.aborted_clients,
            seqs.join("; ")
        ));
        out
    }
}

/// Median and range of every measure over the runs.
fn summary(runs: &[Outcome]) -> String {
    let mut out = format!(
        "{} run(s): median (range)\n\n| measure | median | range |\n|---|---:|---|\n",
        runs.len()
    );
    let per_run: Vec<Vec<(&str, f64)>> = runs.iter().map(measures).collect();
    for (i, (name, _)) in per_run[0].iter().enumerate() {
        let mut v: Vec<f64> = per_run.iter().map(|m| m[i].1).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        out.push_str(&format!(
            "| {name} | {median:.3} | {:.3} to {:.3} |\n",
            v[0],
            v[v.len() - 1]
        ));
    }
    out
}
