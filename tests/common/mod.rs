//! Shared test harness: throwaway blue and green clusters with the same schema, a pipeline
//! config between them, and table comparison. Real PostgreSQL, no mocks.
#![allow(dead_code)]

use shadowsync::lsn::Lsn;
use std::time::{Duration, Instant};

use shadowsync::cluster::{Cluster, pipeline_config};
use shadowsync::config::Config;
use tokio_postgres::{Client, NoTls};

pub mod novacron;
pub mod proxy;

pub const DB: &str = "app";

pub struct Pair {
    pub blue: Cluster,
    pub green: Cluster,
}

impl Pair {
    /// Starts both clusters, creates `DB` on each and runs `schema` on both.
    pub fn start(schema: &str) -> Pair {
        let blue = Cluster::start("blue").expect("blue cluster");
        let green = Cluster::start("green").expect("green cluster");
        for c in [&blue, &green] {
            c.create_database(DB).expect("create database");
            if !schema.is_empty() {
                c.psql(DB, schema).expect("schema");
            }
        }
        Pair { blue, green }
    }

    pub fn config(&self) -> Config {
        pipeline_config(&self.blue, &self.green, DB, "test_slot", "test_pub")
    }

    pub async fn blue(&self) -> Client {
        connect(&self.blue.dsn(DB)).await
    }

    pub async fn green(&self) -> Client {
        connect(&self.green.dsn(DB)).await
    }
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Every row of a table as text, sorted: equal vectors mean equal tables.
pub async fn rows(client: &Client, table: &str) -> Vec<String> {
    let sql = format!("SELECT t::text FROM {table} AS t ORDER BY 1");
    client
        .query(&sql, &[])
        .await
        .expect("select rows")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts blue and green hold the same rows in each table, with a readable diff.
pub async fn assert_same(pair: &Pair, tables: &[&str]) {
    let (b, g) = (pair.blue().await, pair.green().await);
    for t in tables {
        let (br, gr) = (rows(&b, t).await, rows(&g, t).await);
        if br != gr {
            let only_blue: Vec<_> = br.iter().filter(|r| !gr.contains(r)).take(5).collect();
            let only_green: Vec<_> = gr.iter().filter(|r| !br.contains(r)).take(5).collect();
            panic!(
                "table {t} differs: blue {} rows, green {} rows\nonly in blue: {only_blue:?}\nonly in green: {only_green:?}",
                br.len(),
                gr.len()
            );
        }
    }
    assert_no_conflicts(&g).await;
}

/// Nobody else wrote to green: shadowsync must not have recorded a conflict.
pub async fn assert_no_conflicts(green: &Client) {
    let found: Vec<String> = green
        .query(
            "SELECT c::text FROM shadowsync.conflicts AS c WHERE to_regclass('shadowsync.conflicts') IS NOT NULL LIMIT 5",
            &[],
        )
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        found.is_empty(),
        "conflicts recorded without interference: {found:?}"
    );
}

/// Waits for a condition with a deadline (never a bare sleep).
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn init_logging() {
    shadowsync::logging::init(false);
}

// ---------------------------------------------------------------------------------------------
// The real binary: config files, child processes, HTTP probes.
// ---------------------------------------------------------------------------------------------

/// Path of the `shadowsync` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_shadowsync");

/// A private temporary directory, removed on drop unless the test is failing (then kept, and
/// its path printed, for inspection).
pub struct TestDir {
    pub path: std::path::PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "shadowsync-test-{label}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A local address nobody listens on right now: bind port 0, note the port, let it go.
pub fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// The TOML config `cluster::pipeline_config` builds (slot `test_slot`, publication `test_pub`),
/// with `[metrics] listen` at `listen` and `extra` appended; written to `dir/config.toml`.
pub fn write_config(
    pair: &Pair,
    dir: &TestDir,
    listen: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        "{}{extra}\n",
        shadowsync::cluster::pipeline_config_toml(
            &pair.blue,
            &pair.green,
            DB,
            "test_slot",
            "test_pub",
            &listen.to_string()
        )
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    Config::load(&path).expect("the written config is valid");
    path
}

/// Runs the binary to completion with `RUST_LOG=info`; returns (exit code, stdout, stderr).
/// Gives up (and kills it) after `deadline`.
pub async fn run_bin(args: &[&str], deadline: Duration) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(deadline, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("shadowsync {args:?} did not finish within {deadline:?}"))
        .expect("spawn shadowsync");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `shadowsync` child process whose stdout and stderr go to files in a test dir. Killed on
/// drop; its log is printed when the test is failing.
pub struct Sidecar {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub stdout: std::path::PathBuf,
    pub stderr: std::path::PathBuf,
}

impl Sidecar {
    /// Starts `shadowsync <args>` with `RUST_LOG=info`; `name` names its output files
    /// (`name.stdout`, `name.stderr`) in `dir`.
    pub fn spawn(dir: &TestDir, name: &str, args: &[&str], addr: std::net::SocketAddr) -> Sidecar {
        let stdout = dir.join(&format!("{name}.stdout"));
        let stderr = dir.join(&format!("{name}.stderr"));
        let child = std::process::Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("create stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .expect("spawn shadowsync");
        Sidecar {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    /// `shadowsync run --config <config>`.
    pub fn run(dir: &TestDir, name: &str, config: &std::path::Path) -> Sidecar {
        let config = config.to_str().expect("utf-8 path");
        let addr = Config::load(config.as_ref())
            .expect("config")
            .listen_addr()
            .expect("listen addr");
        Sidecar::spawn(dir, name, &["run", "--config", config], addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until `GET /readyz` answers 200; fails early (with the log) if the process exits.
    pub async fn wait_ready(&mut self, deadline: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "shadowsync exited ({status}) before becoming ready; stderr:\n{}",
                    self.stderr_text()
                );
            }
            if let Ok((200, _)) = http_get(self.addr, "/readyz").await {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "shadowsync not ready within {deadline:?}; stderr:\n{}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit on its own, with a deadline; returns its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "shadowsync still running after {deadline:?}; stderr:\n{}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`TERM`, `INT`, ...) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- shadowsync (pid {}) stderr, {} ---\n{}\n--- end ---",
                self.child.id(),
                self.stderr.display(),
                self.stderr_text()
            );
        }
        self.kill();
    }
}

/// The `shadowsync_errors_total` series of an exposition that counted an error (every series
/// exists at 0 from the start).
pub fn errors_counted(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("shadowsync_errors_total{") && !l.ends_with(" 0"))
        .collect()
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    shadowsync::admin::http_call(addr, "GET", path, Duration::from_secs(10))
        .await
        .map_err(std::io::Error::other)
}

/// Seed for a randomized test: `SHADOWSYNC_SEED` if set, else the clock; always printed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("SHADOWSYNC_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    eprintln!("{test}: seed {seed} (rerun with SHADOWSYNC_SEED={seed})");
    seed
}

/// Row count of a table.
pub async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count rows")
        .get(0)
}

/// Blue's current WAL insert position.
pub async fn wal_insert_lsn(client: &Client) -> Lsn {
    client
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .expect("read the WAL position")
        .get(0)
}

/// Green's progress `end_lsn` for `slot`; `None` when the table or the row is absent.
pub async fn progress_lsn(green: &Client, slot: &str) -> Option<Lsn> {
    let exists: bool = green
        .query_one("SELECT to_regclass('shadowsync.progress') IS NOT NULL", &[])
        .await
        .expect("look up shadowsync.progress")
        .get(0);
    if !exists {
        return None;
    }
    green
        .query_opt(
            "SELECT end_lsn FROM shadowsync.progress WHERE slot = $1",
            &[&slot],
        )
        .await
        .expect("read shadowsync.progress")
        .map(|r| r.get(0))
}

/// A replication slot on blue: `None` when it does not exist, else its `confirmed_flush_lsn`.
pub async fn slot_confirmed(blue: &Client, slot: &str) -> Option<Option<Lsn>> {
    blue.query_opt(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .expect("read pg_replication_slots")
    .map(|r| r.get(0))
}

// (`count` is defined above; shared by several test files.)

/// Starts the pipeline and waits until it streams (writes before that are not in the slot).
pub async fn start_streaming(config: Config) -> shadowsync::pipeline::Handle {
    let handle = shadowsync::pipeline::start(config, shadowsync::pipeline::RunOptions::default())
        .await
        .expect("start the pipeline");
    wait_for("streaming", Duration::from_secs(60), || async {
        handle.shared.ready()
    })
    .await;
    handle
}
