//! `shadowsync demo`: the NovaCron migration on a laptop. Throwaway blue and green clusters with
//! the example schemas and rules (`transforms/novacron*`, embedded in the binary), existing rows
//! on blue copied from a snapshot, a write workload on blue from the start (during the copy and
//! while streaming), a live progress line, a drain, the report, and a per-mapping row-count
//! check of green against blue.
//!
//! Invariant: the demo's verdict compares every mapping's rows (blue, through the rule's
//! filter, against green); it fails loudly rather than report success on a mismatch.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::cluster::{Cluster, pipeline_config};
use crate::pipeline::{self, RunOptions};

/// NovaCron's blue schema and publication.
pub const BLUE_SCHEMA: &str = include_str!("../transforms/novacron-blue.sql");
/// NovaCron's green schema.
pub const GREEN_SCHEMA: &str = include_str!("../transforms/novacron-green.sql");
/// The NovaCron rules.
pub const RULES: &str = include_str!("../transforms/novacron.toml");

/// Per mapping: blue rows that must be in green (through the rule's filter), green table.
const MAPPINGS: [(&str, &str); 4] = [
    ("users", "users"),
    ("hypervisors", "compute_nodes"),
    ("virtual_machines WHERE status <> 'deleted'", "vms"),
    ("api_keys", "api_keys"),
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("writing the demo's rule file: {0}")]
    Io(#[from] std::io::Error),
    #[error("cutover failed: {0}")]
    Cutover(String),
    #[error("green differs from blue: {0}")]
    Mismatch(String),
}

/// Runs the demo: `workload` of writes, then the cutover and a comparison.
pub async fn run(workload: Duration) -> Result<(), DemoError> {
    eprintln!("starting throwaway blue and green clusters...");
    let (blue, green) = tokio::task::spawn_blocking(|| {
        Ok::<_, crate::cluster::ClusterError>((Cluster::start("blue")?, Cluster::start("green")?))
    })
    .await
    .expect("cluster start task")?;
    blue.create_database("novacron")?;
    blue.psql("novacron", BLUE_SCHEMA)?;
    green.create_database("novacron")?;
    green.psql("novacron", GREEN_SCHEMA)?;
    let rules = green.socket_dir().join("novacron-rules.toml");
    std::fs::write(&rules, RULES)?;
    let mut config = pipeline_config(&blue, &green, "novacron", "demo", "novacron_migration");
    config.transforms.files = vec![rules.display().to_string()];
    eprintln!(
        "writing {PRELOAD_ROWS} existing rows per table on blue (the years before the sync window)..."
    );
    blue.psql("novacron", &preload_sql(PRELOAD_ROWS))?;
    let handle = pipeline::start(config.clone(), RunOptions::default()).await?;
    // The cutover finds this sidecar through its admin endpoint, wherever it bound.
    config.metrics.listen = handle.addr.to_string();
    eprintln!(
        "copying blue's existing rows from a snapshot, then streaming, through transforms/novacron.toml; blue keeps writing meanwhile; metrics at http://{}/metrics",
        handle.addr
    );

    let (stop, stopped) = crate::shutdown::channel();
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for worker in 0..2u64 {
        let dsn = blue.dsn("novacron");
        let (stop, written) = (stopped.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            workload_client(&dsn, worker, stop, written).await
        }));
    }
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_rows = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < workload {
        tick.tick().await;
        let applied = handle.shared.applied();
        let rows: u64 = applied.rows.values().flat_map(|ops| ops.values()).sum();
        let line = format!(
            "{:>4.0}s  blue txns written {:>7}  green rows applied {:>8}  {:>7} rows/s  lag {:>9} bytes {:>5.2}s  [{}]",
            started.elapsed().as_secs_f64(),
            written.load(Ordering::Relaxed),
            rows,
            rows - last_rows,
            handle.shared.lag_bytes(),
            handle.shared.lag_seconds(),
            handle.shared.state().name(),
        );
        last_rows = rows;
        if tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
    stop.fire();
    for w in writers {
        w.await.expect("workload task")?;
    }
    eprintln!("workload stopped; cutting over: fence blue, drain to the fence, sequences, mark...");
    let opts = crate::cutover::Options {
        max_lag: Duration::from_secs(5),
        ..crate::cutover::Options::default()
    };
    let report = crate::cutover::run(&config, &opts)
        .await
        .map_err(|e| DemoError::Cutover(e.to_string()))?;
    handle.wait().await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report is JSON")
    );

    let (b, c1) = tokio_postgres::connect(&blue.dsn("novacron"), NoTls).await?;
    tokio::spawn(c1);
    let (g, c2) = tokio_postgres::connect(&green.dsn("novacron"), NoTls).await?;
    tokio::spawn(c2);
    let mut problems = Vec::new();
    eprintln!(
        "{:<50} {:>10} {:>10}",
        "mapping (blue -> green)", "blue rows", "green rows"
    );
    for (source, target) in MAPPINGS {
        let blue_rows: i64 = b
            .query_one(&format!("SELECT count(*) FROM {source}"), &[])
            .await?
            .get(0);
        let green_rows: i64 = g
            .query_one(&format!("SELECT count(*) FROM {target}"), &[])
            .await?
            .get(0);
        let verdict = if blue_rows == green_rows {
            ""
        } else {
            "  DIFFERENT"
        };
        eprintln!(
            "{:<50} {blue_rows:>10} {green_rows:>10}{verdict}",
            format!("{source} -> {target}")
        );
        if blue_rows != green_rows {
            problems.push(target);
        }
    }
    let skipped: i64 = b
        .query_one("SELECT count(*) FROM audit_log", &[])
        .await?
        .get(0);
    eprintln!(
        "{:<50} {skipped:>10} {:>10}",
        "audit_log (skip = true)", "-"
    );
    let _ = std::fs::remove_file(&rules);
    if !problems.is_empty() {
        return Err(DemoError::Mismatch(problems.join(", ")));
    }
    eprintln!("every mapping matches.");
    Ok(())
}

/// Rows per table that exist on blue before shadowsync starts (copied from a snapshot).
const PRELOAD_ROWS: i64 = 50_000;

/// Existing rows (ids from 2^50, apart from the workload's), set-based.
pub fn preload_sql(rows: i64) -> String {
    format!(
        "INSERT INTO users (id, email, name)
           SELECT (1::bigint << 50) + g, 'seed' || g || '@' || (ARRAY['acme.example','globex.example','example.org'])[g % 3 + 1], 'Seed ' || g
             FROM generate_series(1, {rows}) g;
         INSERT INTO hypervisors (id, hostname, status, type, capacity)
           SELECT (1::bigint << 50) + g, 'seed-hv-' || g, (ARRAY['active','inactive','maintenance'])[g % 3 + 1], 'kvm',
                  jsonb_build_object('cpu_cores', 8 + g % 56, 'memory_mb', 65536)
             FROM generate_series(1, {rows}) g;
         INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
           SELECT (1::bigint << 50) + g, 'seed-vm-' || g, (ARRAY['creating','running','stopped','paused','migrating','deleted','crashed'])[g % 7 + 1],
                  (1::bigint << 50) + g, (1::bigint << 50) + g, jsonb_build_object('cpu_cores', 2, 'memory_mb', 4096, 'disk_gb', 40),
                  jsonb_build_object('ip_address', '10.1.' || (g % 250) || '.' || (g % 200 + 1))
             FROM generate_series(1, {rows}) g;
         INSERT INTO api_keys (id, user_id, key_hash)
           SELECT (1::bigint << 50) + g, (1::bigint << 50) + g, md5(g::text) FROM generate_series(1, {rows}) g;"
    )
}

/// A tiny deterministic generator: the demo needs variety, not statistics.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const DOMAINS: [&str; 3] = ["acme.example", "globex.example", "example.org"];
const VM_STATUSES: [&str; 7] = [
    "creating",
    "running",
    "stopped",
    "paused",
    "migrating",
    "deleted",
    "crashed",
];

/// One blue client writing NovaCron transactions until stopped: a user with a hypervisor, a VM
/// and an API key in one transaction (the VM's tenant comes from that new user), status changes
/// moving VMs in and out of the filter, audit entries (skipped), deletions.
pub async fn workload_client(
    dsn: &str,
    worker: u64,
    stop: crate::shutdown::Shutdown,
    written: Arc<AtomicU64>,
) -> Result<(), DemoError> {
    let (mut client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(conn);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (worker + 1));
    let base = (worker as i64) << 40;
    let mut next_id = 1i64;
    while !stop.is_shutdown() {
        let tx = client.transaction().await?;
        let id = base + next_id;
        next_id += 1;
        let domain = DOMAINS[rng.below(DOMAINS.len() as u64) as usize];
        tx.execute(
            "INSERT INTO users (id, email, name) VALUES ($1, $2, $3)",
            &[&id, &format!("user{id}@{domain}"), &format!("User {id}")],
        )
        .await?;
        tx.execute(
            "INSERT INTO hypervisors (id, hostname, status, type, capacity)
             VALUES ($1, $2, $3, 'kvm', jsonb_build_object('cpu_cores', $4::int, 'memory_mb', 65536))",
            &[
                &id,
                &format!("hv-{id}"),
                &["active", "inactive", "maintenance"][rng.below(3) as usize],
                &((rng.below(64) + 8) as i32),
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
             VALUES ($1, $2, 'creating', $1, $1, jsonb_build_object('cpu_cores', 2, 'memory_mb', 4096, 'disk_gb', 40),
                     jsonb_build_object('ip_address', '10.0.' || ($1::bigint % 250) || '.' || ($1::bigint % 200 + 1)))",
            &[&id, &format!("vm-{id}")],
        )
        .await?;
        tx.execute(
            "INSERT INTO api_keys (id, user_id, key_hash) VALUES ($1, $1, $2)",
            &[&id, &format!("{:016x}", rng.next())],
        )
        .await?;
        if next_id > 2 {
            let victim = base + 1 + rng.below(next_id as u64 - 1) as i64;
            let status = VM_STATUSES[rng.below(VM_STATUSES.len() as u64) as usize];
            tx.execute(
                "UPDATE virtual_machines SET status = $2, updated_at = now() WHERE id = $1",
                &[&victim, &status],
            )
            .await?;
            tx.execute(
                "INSERT INTO audit_log (action, details) VALUES ('vm.status', jsonb_build_object('vm', $1::bigint))",
                &[&victim],
            )
            .await?;
            if rng.below(20) == 0 {
                tx.execute("DELETE FROM virtual_machines WHERE id = $1", &[&victim])
                    .await?;
            }
        }
        tx.commit().await?;
        written.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
