//! `shadowsync demo`: the whole tool on a laptop. Throwaway blue and green clusters, an example
//! schema and publication, a write workload on blue while streaming, a live progress line, a
//! drain, the report, and a blue-versus-green comparison of every table.
//!
//! Invariant: the demo's verdict compares blue and green row by row (count and checksum); it
//! fails loudly rather than report success on a mismatch.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::cluster::{Cluster, pipeline_config};
use crate::pipeline::{self, RunOptions};

/// Example schema, the same on both sides (identity mapping).
pub const SCHEMA: &str = "
CREATE TABLE users (
    id         bigint PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE hypervisors (
    id         bigint PRIMARY KEY,
    hostname   text NOT NULL,
    status     text NOT NULL,
    capacity   jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE virtual_machines (
    id             bigint PRIMARY KEY,
    name           text NOT NULL,
    owner_id       bigint REFERENCES users (id),
    hypervisor_id  bigint REFERENCES hypervisors (id),
    status         text NOT NULL,
    network_config jsonb,
    tags           text[],
    updated_at     timestamptz NOT NULL DEFAULT now()
);
";

const TABLES: [&str; 3] = ["users", "hypervisors", "virtual_machines"];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("drain failed: {0}")]
    Drain(String),
    #[error("green differs from blue: {0}")]
    Mismatch(String),
}

/// Runs the demo: `seconds` of workload, then drain and compare.
pub async fn run(workload: Duration) -> Result<(), DemoError> {
    eprintln!("starting throwaway blue and green clusters...");
    let (blue, green) = tokio::task::spawn_blocking(|| {
        Ok::<_, crate::cluster::ClusterError>((Cluster::start("blue")?, Cluster::start("green")?))
    })
    .await
    .expect("cluster start task")?;
    for c in [&blue, &green] {
        c.create_database("novacron")?;
        c.psql("novacron", SCHEMA)?;
    }
    blue.psql(
        "novacron",
        "CREATE PUBLICATION demo FOR TABLE users, hypervisors, virtual_machines",
    )?;
    let config = pipeline_config(&blue, &green, "novacron", "demo", "demo");
    let handle = pipeline::start(config, RunOptions::default()).await?;
    // Writes committed before the slot exists are not in its stream (copying existing rows is
    // the initial snapshot's job), so the workload starts once the pipeline streams.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handle.shared.ready() {
        if Instant::now() > deadline {
            return Err(DemoError::Drain(
                "the pipeline did not start streaming within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("streaming; metrics at http://{}/metrics", handle.addr);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for worker in 0..2u64 {
        let dsn = blue.dsn("novacron");
        let (stop, written) = (stop.clone(), written.clone());
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
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("workload task")?;
    }
    eprintln!("workload stopped; draining...");
    let report = handle.drain().await.map_err(DemoError::Drain)?;
    handle.wait().await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report is JSON")
    );

    let mut problems = Vec::new();
    eprintln!(
        "{:<18} {:>10} {:>10}  checksum",
        "table", "blue rows", "green rows"
    );
    for table in TABLES {
        let b = table_summary(&blue.dsn("novacron"), table).await?;
        let g = table_summary(&green.dsn("novacron"), table).await?;
        let verdict = if b == g { "equal" } else { "DIFFERENT" };
        eprintln!("{table:<18} {:>10} {:>10}  {verdict}", b.0, g.0);
        if b != g {
            problems.push(table);
        }
    }
    if !problems.is_empty() {
        return Err(DemoError::Mismatch(problems.join(", ")));
    }
    eprintln!("green equals blue.");
    Ok(())
}

/// Row count and an order-independent checksum of a table's rows.
pub async fn table_summary(dsn: &str, table: &str) -> Result<(i64, String), tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    let conn = tokio::spawn(conn);
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '') FROM {} AS t",
        crate::transform::quote_ident(table)
    );
    let row = client.query_one(&sql, &[]).await?;
    drop(client);
    let _ = conn.await;
    Ok((row.get(0), row.get(1)))
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

/// One blue client writing small NovaCron-like transactions until stopped (also used by tests).
pub async fn workload_client(
    dsn: &str,
    worker: u64,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> Result<(), DemoError> {
    let (mut client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(conn);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (worker + 1));
    let base = (worker as i64) << 40;
    let statuses = ["creating", "running", "stopped", "paused", "migrating"];
    let mut next_id = 1i64;
    while !stop.load(Ordering::Relaxed) {
        let tx = client.transaction().await?;
        let id = base + next_id;
        next_id += 1;
        tx.execute(
            "INSERT INTO users (id, email) VALUES ($1, $2)",
            &[&id, &format!("user{id}@example.com")],
        )
        .await?;
        tx.execute(
            "INSERT INTO hypervisors (id, hostname, status, capacity) VALUES ($1, $2, 'active', jsonb_build_object('cpu_cores', $3::int, 'memory_mb', 65536))",
            &[&id, &format!("hv-{id}"), &((rng.below(64) + 8) as i32)],
        )
        .await?;
        tx.execute(
            "INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id, status, network_config, tags)
             VALUES ($1, $2, $1, $1, 'creating', jsonb_build_object('ip_address', '10.0.0.' || ($1::bigint % 250)), ARRAY['demo', $3])",
            &[&id, &format!("vm-{id}"), &format!("w{worker}")],
        )
        .await?;
        if next_id > 2 {
            let victim = base + 1 + rng.below(next_id as u64 - 1) as i64;
            let status = statuses[rng.below(statuses.len() as u64) as usize];
            tx.execute(
                "UPDATE virtual_machines SET status = $2, updated_at = now() WHERE id = $1",
                &[&victim, &status],
            )
            .await?;
            if rng.below(10) == 0 {
                tx.execute("DELETE FROM virtual_machines WHERE id = $1", &[&victim])
                    .await?;
            }
        }
        tx.commit().await?;
        written.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
