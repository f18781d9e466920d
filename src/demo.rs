//! `shadowsync demo`: the NovaCron migration on a laptop. Throwaway blue and green clusters with
//! the example schemas and rules (`transforms/novacron*`, embedded in the binary), existing rows
//! on blue copied from a snapshot, a write workload on blue from the start (during the copy and
//! while streaming), a live progress line, a cutover while blue's writers keep writing (they
//! end on the fence's refusal), the report, the application's first inserts on green without
//! ids, and a per-mapping row-count check of green against blue.
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
        // Under 100 columns: a wider line wraps on a 120-column terminal, and `\r` then
        // redraws only its last part, leaving a stray line behind.
        let line = format!(
            "{:>4.0}s  blue {:>6} txns  green {:>8} rows  {:>6} rows/s  lag {:>9} {:>5.2}s  [{}]",
            started.elapsed().as_secs_f64(),
            written.load(Ordering::Relaxed),
            rows,
            rows - last_rows,
            crate::status_line::bytes(handle.shared.lag_bytes()),
            handle.shared.lag_seconds(),
            handle.shared.state().name(),
        );
        last_rows = rows;
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
    eprintln!(
        "cutting over while blue's writers keep writing: fence blue, drain to the fence, verify green key by key, sequences, mark..."
    );
    let opts = crate::cutover::Options {
        max_lag: Duration::from_secs(5),
        verify: true,
        ..crate::cutover::Options::default()
    };
    let cutover = crate::cutover::run(&config, &opts).await;
    if cutover.is_err() {
        stop.fire();
    }
    let ended = writers_ended(writers, &stop).await?;
    let shared = handle.shared.clone();
    let report = cutover.map_err(|e| DemoError::Cutover(e.to_string()))?;
    handle.wait().await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report is JSON")
    );
    eprintln!(
        "{}",
        counted(
            written.load(Ordering::Relaxed),
            shared.applied().transactions
        )
    );
    for (worker, end) in ended.iter().enumerate() {
        match end {
            Ended::Fenced(message) => {
                eprintln!("blue writer {worker}: its next write was refused: {message}")
            }
            Ended::Stopped => eprintln!("blue writer {worker}: stopped before the fence"),
        }
    }
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
    application_writes(&green).await
}

/// Why blue's writers committed more transactions than the stream applied: those
/// committed before the initial copy's snapshot reached green with the copy, not the stream.
fn counted(written: u64, streamed: u64) -> String {
    if written >= streamed {
        format!(
            "blue's writers committed {written} transactions: {streamed} were streamed to green (shadowsync_transactions_applied_total), the other {} committed before the initial copy's snapshot and reached green with the copy",
            written - streamed
        )
    } else {
        format!(
            "blue's writers committed {written} transactions; {streamed} were streamed to green"
        )
    }
}

/// Waits for the writers: each ends on the fence's refusal (asked to stop after a while, so a
/// failed cutover cannot hang the demo).
async fn writers_ended(
    writers: Vec<tokio::task::JoinHandle<Result<Ended, DemoError>>>,
    stop: &crate::shutdown::Trigger,
) -> Result<Vec<Ended>, DemoError> {
    let mut ended = Vec::with_capacity(writers.len());
    for mut w in writers {
        let result = match tokio::time::timeout(Duration::from_secs(10), &mut w).await {
            Ok(r) => r,
            Err(_) => {
                stop.fire();
                w.await
            }
        };
        ended.push(result.expect("workload task")?);
    }
    Ok(ended)
}

/// The application's first writes on green, as it would make them: no ids given, so green's
/// sequences (set by the cutover to continue blue's) hand them out.
async fn application_writes(green: &Cluster) -> Result<(), DemoError> {
    let (g, conn) = tokio_postgres::connect(&green.dsn("novacron"), NoTls).await?;
    tokio::spawn(conn);
    let row = g
        .query_one(
            "WITH u AS (
               INSERT INTO users (email, name, tenant_id, created_at, updated_at)
               VALUES ('first-on-green@acme.example', 'First on green',
                       '00000000-0000-0000-0000-000000000002', now(), now())
               RETURNING id, tenant_id),
             n AS (
               INSERT INTO compute_nodes (name, hostname, status, created_at, updated_at)
               VALUES ('green-node-1', 'green-node-1', 'online', now(), now())
               RETURNING id)
             INSERT INTO vms (name, state, node_id, tenant_id, owner_id, created_at, updated_at)
             SELECT 'first-vm-on-green', 'creating', n.id, u.tenant_id, u.id, now(), now() FROM u, n
             RETURNING owner_id, node_id, id",
            &[],
        )
        .await?;
    let (user, node, vm): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    eprintln!(
        "the application's first writes on green, without ids: user {user}, compute node {node}, vm {vm} (ids continue blue's sequences)"
    );
    Ok(())
}

/// Rows per table that exist on blue before shadowsync starts (copied from a snapshot).
const PRELOAD_ROWS: i64 = 50_000;

/// Existing rows, set-based. Ids come from blue's sequences (fresh, so row `g` of each table
/// has id `g` and the references line up).
pub fn preload_sql(rows: i64) -> String {
    format!(
        "INSERT INTO users (email, name)
           SELECT 'seed' || g || '@' || (ARRAY['acme.example','globex.example','example.org'])[g % 3 + 1], 'Seed ' || g
             FROM generate_series(1, {rows}) g;
         INSERT INTO hypervisors (hostname, status, type, capacity)
           SELECT 'seed-hv-' || g, (ARRAY['active','inactive','maintenance'])[g % 3 + 1], 'kvm',
                  jsonb_build_object('cpu_cores', 8 + g % 56, 'memory_mb', 65536)
             FROM generate_series(1, {rows}) g;
         INSERT INTO virtual_machines (name, status, owner_id, hypervisor_id, resources, network_config)
           SELECT 'seed-vm-' || g, (ARRAY['creating','running','stopped','paused','migrating','deleted','crashed'])[g % 7 + 1],
                  g, g, jsonb_build_object('cpu_cores', 2, 'memory_mb', 4096, 'disk_gb', 40),
                  jsonb_build_object('ip_address', '10.1.' || (g % 250) || '.' || (g % 200 + 1))
             FROM generate_series(1, {rows}) g;
         INSERT INTO api_keys (user_id, key_hash)
           SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;"
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

/// How a workload client ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Told to stop.
    Stopped,
    /// Blue refused a write with the cutover's fence (SQLSTATE 25006): its message.
    Fenced(String),
}

/// One blue client writing NovaCron transactions until stopped or fenced: a user with a
/// hypervisor, a VM and an API key in one transaction (ids from blue's sequences; the VM's
/// tenant comes from that new user), status changes moving VMs in and out of the filter, audit
/// entries (skipped), deletions.
pub async fn workload_client(
    dsn: &str,
    worker: u64,
    stop: crate::shutdown::Shutdown,
    written: Arc<AtomicU64>,
) -> Result<Ended, DemoError> {
    workload_client_moving(dsn, worker, stop, written, 0).await
}

/// [`workload_client`], where `moves_percent` of the transactions also move the owner of an
/// earlier VM to another email domain (another tenant: green re-derives the owner's VMs).
pub async fn workload_client_moving(
    dsn: &str,
    worker: u64,
    stop: crate::shutdown::Shutdown,
    written: Arc<AtomicU64>,
    moves_percent: u64,
) -> Result<Ended, DemoError> {
    let (mut client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(conn);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (worker + 1));
    let mut vms: Vec<i64> = Vec::new();
    while !stop.is_shutdown() {
        match workload_txn(&mut client, worker, &mut rng, &mut vms, moves_percent).await {
            Ok(()) => {
                written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) =>
            {
                let message = e.as_db_error().map(|d| d.message().to_string());
                return Ok(Ended::Fenced(message.unwrap_or_default()));
            }
            // As an application would: a deadlock's victim tries again.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ended::Stopped)
}

async fn workload_txn(
    client: &mut tokio_postgres::Client,
    worker: u64,
    rng: &mut XorShift,
    vms: &mut Vec<i64>,
    moves_percent: u64,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if !vms.is_empty() && rng.below(100) < moves_percent {
        let vm = vms[rng.below(vms.len() as u64) as usize];
        let domain = DOMAINS[rng.below(DOMAINS.len() as u64) as usize];
        tx.execute(
            "UPDATE users SET email = split_part(email, '@', 1) || '@' || $2, updated_at = now()
              WHERE id = (SELECT owner_id FROM virtual_machines WHERE id = $1)",
            &[&vm, &domain],
        )
        .await?;
    }
    let n = vms.len();
    let domain = DOMAINS[rng.below(DOMAINS.len() as u64) as usize];
    let user: i64 = tx
        .query_one(
            "INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id",
            &[
                &format!("user-{worker}-{n}@{domain}"),
                &format!("User {worker}-{n}"),
            ],
        )
        .await?
        .get(0);
    let hypervisor: i64 = tx
        .query_one(
            "INSERT INTO hypervisors (hostname, status, type, capacity)
             VALUES ($1, $2, 'kvm', jsonb_build_object('cpu_cores', $3::int, 'memory_mb', 65536))
             RETURNING id",
            &[
                &format!("hv-{worker}-{n}"),
                &["active", "inactive", "maintenance"][rng.below(3) as usize],
                &((rng.below(64) + 8) as i32),
            ],
        )
        .await?
        .get(0);
    let vm: i64 = tx
        .query_one(
            "INSERT INTO virtual_machines (name, status, owner_id, hypervisor_id, resources, network_config)
             VALUES ($1, 'creating', $2, $3, jsonb_build_object('cpu_cores', 2, 'memory_mb', 4096, 'disk_gb', 40),
                     jsonb_build_object('ip_address', '10.0.' || ($2::bigint % 250) || '.' || ($2::bigint % 200 + 1)))
             RETURNING id",
            &[&format!("vm-{worker}-{n}"), &user, &hypervisor],
        )
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO api_keys (user_id, key_hash) VALUES ($1, $2)",
        &[&user, &format!("{:016x}", rng.next())],
    )
    .await?;
    if !vms.is_empty() {
        let victim = vms[rng.below(vms.len() as u64) as usize];
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
    vms.push(vm);
    Ok(())
}
