//! Initial-copy benchmark: a preloaded 11-column table (W1's) copied by PostgreSQL's own initial
//! table sync (`CREATE SUBSCRIPTION ... WITH (copy_data = true)`, timed until the table is
//! ready) and by shadowsync (`run --drain` creating its slot with a snapshot); then the NovaCron
//! tables copied through the example rules (no native equivalent: rows/s only). Every green is
//! verified against blue.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shadowsync::cluster::Cluster;

use super::harness::{DB, W1_SCHEMA, connect, digest, preload_sql, run_watched};

#[derive(Debug, Clone)]
pub struct CopyOutcome {
    pub rows: i64,
    pub native: Duration,
    pub ours: Duration,
    pub ours_rss_kib: u64,
    pub novacron_rows: i64,
    pub novacron: Duration,
    pub workers: usize,
}

impl CopyOutcome {
    pub fn table(&self) -> String {
        let rate = |rows: i64, d: Duration| rows as f64 / d.as_secs_f64();
        format!(
            "Initial copy: {} rows of an 11-column table; greens verified\n\n| method | seconds | rows/s | vs native |\n|---|---:|---:|---:|\n\
             | native initial sync (copy_data = true) | {:.2} | {:.0} | 1.00x |\n\
             | shadowsync (snapshot copy, {} workers) | {:.2} | {:.0} | {:.2}x |\n\
             | shadowsync, NovaCron rules ({} rows in 4 tables) | {:.2} | {:.0} | - |\n\
             \nshadowsync: peak RSS {} MiB\n",
            self.rows,
            self.native.as_secs_f64(),
            rate(self.rows, self.native),
            self.workers,
            self.ours.as_secs_f64(),
            rate(self.rows, self.ours),
            self.native.as_secs_f64() / self.ours.as_secs_f64(),
            self.novacron_rows,
            self.novacron.as_secs_f64(),
            rate(self.novacron_rows, self.novacron),
            self.ours_rss_kib / 1024,
        )
    }
}

fn run_drain(
    binary: &Path,
    blue_dsn: &str,
    green_dsn: &str,
    publication: &str,
    rules: Option<&Path>,
) -> (Duration, u64) {
    let dir = std::env::temp_dir().join(format!(
        "shadowsync-copybench-{}-{publication}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    let mut text = format!(
        "[blue]\ndsn = \"{blue_dsn}\"\nslot = \"shadowsync_{}\"\npublication = \"{publication}\"\n[green]\ndsn = \"{green_dsn}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        if rules.is_some() { "rules" } else { "identity" }
    );
    if let Some(r) = rules {
        text.push_str(&format!("[transforms]\nfiles = [\"{}\"]\n", r.display()));
    }
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(binary);
    cmd.args(["run", "--drain", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let (took, rss, _, ok) = run_watched(cmd);
    assert!(ok, "shadowsync run --drain failed");
    let _ = std::fs::remove_dir_all(&dir);
    (took, rss)
}

pub async fn run(rows: i64, novacron_rows_per_table: i64, binary: &Path) -> CopyOutcome {
    let blue = Cluster::start("copy-blue").expect("blue");
    let green = Cluster::start("copy-green").expect("green");
    for db in [DB, "nova"] {
        blue.create_database(db).unwrap();
    }
    for db in ["native", DB, "nova"] {
        green.create_database(db).unwrap();
    }
    blue.psql(DB, W1_SCHEMA).unwrap();
    blue.psql(DB, &preload_sql(rows)).unwrap();
    blue.psql(DB, "CREATE PUBLICATION bench_pub FOR TABLE w1")
        .unwrap();
    // Outside a transaction block (psql here runs its input as one transaction).
    let c = connect(&blue.dsn(DB)).await;
    c.batch_execute("VACUUM ANALYZE w1").await.unwrap();
    c.batch_execute("CHECKPOINT").await.unwrap();
    for db in ["native", DB] {
        green.psql(db, W1_SCHEMA).unwrap();
    }
    blue.psql("nova", shadowsync::demo::BLUE_SCHEMA).unwrap();
    blue.psql(
        "nova",
        &shadowsync::demo::preload_sql(novacron_rows_per_table),
    )
    .unwrap();
    let c = connect(&blue.dsn("nova")).await;
    c.batch_execute("VACUUM ANALYZE").await.unwrap();
    c.batch_execute("CHECKPOINT").await.unwrap();
    green.psql("nova", shadowsync::demo::GREEN_SCHEMA).unwrap();

    // 1. Native initial sync.
    let started = Instant::now();
    green
        .psql(
            "native",
            &format!(
                "CREATE SUBSCRIPTION native CONNECTION '{}' PUBLICATION bench_pub WITH (copy_data = true)",
                blue.dsn(DB)
            ),
        )
        .unwrap();
    let native_client = connect(&green.dsn("native")).await;
    loop {
        let ready: bool = native_client
            .query_one(
                "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let native = started.elapsed();
    green
        .psql("native", "ALTER SUBSCRIPTION native DISABLE")
        .unwrap();

    // 2. shadowsync, identity.
    let (ours, rss) = run_drain(binary, &blue.dsn(DB), &green.dsn(DB), "bench_pub", None);

    // 3. shadowsync through the NovaCron rules.
    let rules = std::env::temp_dir().join(format!(
        "shadowsync-copybench-{}-rules.toml",
        std::process::id()
    ));
    std::fs::write(&rules, shadowsync::demo::RULES).unwrap();
    let (novacron, _) = run_drain(
        binary,
        &blue.dsn("nova"),
        &green.dsn("nova"),
        "novacron_migration",
        Some(&rules),
    );
    let _ = std::fs::remove_file(&rules);

    let b = digest(&blue.dsn(DB), "w1").await;
    assert_eq!(
        b,
        digest(&green.dsn("native"), "w1").await,
        "native green differs"
    );
    assert_eq!(
        b,
        digest(&green.dsn(DB), "w1").await,
        "shadowsync green differs"
    );
    for (source, target) in [
        ("users", "users"),
        ("hypervisors", "compute_nodes"),
        (
            "(SELECT * FROM virtual_machines WHERE status <> 'deleted')",
            "vms",
        ),
        ("api_keys", "api_keys"),
    ] {
        assert_eq!(
            digest(&blue.dsn("nova"), source).await.0,
            digest(&green.dsn("nova"), target).await.0,
            "NovaCron {target}: row counts differ"
        );
    }
    let workers = shadowsync::config::SnapshotConfig::default().worker_count();
    CopyOutcome {
        rows,
        native,
        ours,
        ours_rss_kib: rss,
        novacron_rows: 4 * novacron_rows_per_table,
        novacron,
        workers,
    }
}
