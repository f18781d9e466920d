//! Catch-up benchmark: the same blue backlog drained three ways, one after the other.
//!
//! 1. ceiling: `pg_recvlogical` (pgoutput, same publication) reading the backlog to /dev/null;
//! 2. native: a disabled subscription (PostgreSQL's own apply worker) enabled, timed until its
//!    slot confirms the end of the backlog;
//! 3. shadowsync: `shadowsync run --drain` over the same backlog (the release binary).
//!
//! Both greens are compared with blue. Run: `cargo bench --bench catchup -- [w1] [--txns N]`.
//! W1: an 11-column table (bigint key, text, jsonb, timestamps) with 200,000 preloaded rows;
//! N transactions (default 100,000) of one insert and one update each, from 4 clients.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shadowsync::cluster::Cluster;
use tokio_postgres::{Client, NoTls};

const DB: &str = "bench";
const PRELOAD: i64 = 200_000;
const CLIENTS: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE w1 (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    descr text,
    doc jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    n integer,
    status text,
    ratio double precision,
    flag boolean,
    tag text
);";

async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn lsn(client: &Client, sql: &str) -> u64 {
    let text: Option<String> = client.query_one(sql, &[]).await.expect("lsn query").get(0);
    text.as_deref()
        .and_then(shadowsync::progress::parse_lsn)
        .unwrap_or(0)
}

async fn slot_confirmed(blue: &Client, slot: &str) -> u64 {
    lsn(
        blue,
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await
}

async fn checksum(dsn: &str) -> (i64, String) {
    let c = connect(dsn).await;
    let row = c
        .query_one(
            "SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY t.id)) FROM w1 AS t",
            &[],
        )
        .await
        .expect("checksum");
    (row.get(0), row.get(1))
}

/// Peak resident set of a running process, in KiB (VmHWM), polled until it exits.
fn run_and_watch_rss(mut cmd: Command) -> (Duration, u64, bool) {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (started.elapsed(), peak, status.success())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let txns: i64 = args
        .iter()
        .position(|a| a == "--txns")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(100_000);
    if args.iter().any(|a| a == "--list") {
        println!("w1: bench");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(w1(txns));
}

async fn w1(txns: i64) {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("shadowsync")))
        .filter(|p| p.is_file())
        .expect("build the release binary first: cargo build --release");
    eprintln!(
        "W1: {PRELOAD} preloaded rows, {txns} transactions (insert + update) from {CLIENTS} clients"
    );
    let blue = Cluster::start("bench-blue").expect("blue");
    let green = Cluster::start("bench-green").expect("green");
    blue.create_database(DB).unwrap();
    blue.psql(DB, SCHEMA).unwrap();
    for db in ["native", DB] {
        green.create_database(db).unwrap();
        green.psql(db, SCHEMA).unwrap();
    }
    let preload = format!(
        "INSERT INTO w1 (id, name, descr, doc, created_at, updated_at, n, status, ratio, flag, tag)
         SELECT g, 'name-' || g, 'preloaded row', jsonb_build_object('g', g), '2026-01-01 00:00:00+00',
                '2026-01-01 00:00:00+00', g, 'active', g / 7.0, g % 2 = 0, 'tag-' || (g % 10)
         FROM generate_series(1, {PRELOAD}) g"
    );
    blue.psql(DB, &preload).unwrap();
    // The preloaded rows are already on both greens (what an initial copy would have done).
    for db in ["native", DB] {
        green.psql(db, &preload).unwrap();
    }
    blue.psql(DB, "CREATE PUBLICATION bench_pub FOR TABLE w1")
        .unwrap();
    // Slots first: the backlog is what they must catch up on.
    for slot in ["ceiling", "native", "shadowsync"] {
        blue.psql(
            DB,
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        )
        .unwrap();
    }
    let native_conn = blue.dsn(DB);
    green
        .psql(
            "native",
            &format!(
                "CREATE SUBSCRIPTION native CONNECTION '{native_conn}' PUBLICATION bench_pub
                 WITH (create_slot = false, slot_name = 'native', enabled = false, copy_data = false)"
            ),
        )
        .unwrap();

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..CLIENTS {
        let client = connect(&blue.dsn(DB)).await;
        writers.push(tokio::spawn(async move {
            let insert = client
                .prepare(
                    "INSERT INTO w1 (id, name, descr, doc, n, status, ratio, flag, tag)
                     VALUES ($1, 'new', 'backlog row', '{\"k\": 1}', 1, 'creating', 0.5, true, 'tag')",
                )
                .await
                .unwrap();
            let update = client
                .prepare("UPDATE w1 SET status = 'running', n = n + 1, updated_at = now() WHERE id = $1")
                .await
                .unwrap();
            let mut i = w;
            while i < txns {
                let id = PRELOAD + 1 + i;
                client.batch_execute("BEGIN").await.unwrap();
                client.execute(&insert, &[&id]).await.unwrap();
                client.execute(&update, &[&((id * 7919) % (PRELOAD + i) + 1)]).await.unwrap();
                client.batch_execute("COMMIT").await.unwrap();
                i += CLIENTS;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let blue_client = connect(&blue.dsn(DB)).await;
    let end = lsn(&blue_client, "SELECT pg_current_wal_insert_lsn()::text").await;
    blue.psql(DB, "CHECKPOINT").unwrap();
    eprintln!(
        "backlog written in {:.1}s, {} MiB of WAL",
        started.elapsed().as_secs_f64(),
        (end - slot_confirmed(&blue_client, "ceiling").await) >> 20
    );
    let rows = 2 * txns;

    // 1. Ceiling: the walsender decoding the backlog, nothing applied.
    let mut cmd = Command::new(blue.bin_dir().join("pg_recvlogical"));
    cmd.args([
        "-d",
        &blue.dsn(DB),
        "-S",
        "ceiling",
        "--start",
        "-f",
        "/dev/null",
    ])
    .args(["-o", "proto_version=1", "-o", "publication_names=bench_pub"])
    .args(["-E", &shadowsync::progress::format_lsn(end)])
    .stdout(Stdio::null());
    let (ceiling, _, ok) = run_and_watch_rss(cmd);
    assert!(ok, "pg_recvlogical failed");

    // 2. Native logical replication.
    let t = Instant::now();
    green
        .psql("native", "ALTER SUBSCRIPTION native ENABLE")
        .unwrap();
    while slot_confirmed(&blue_client, "native").await < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let native = t.elapsed();
    green
        .psql("native", "ALTER SUBSCRIPTION native DISABLE")
        .unwrap();

    // 3. shadowsync.
    let dir = std::env::temp_dir().join(format!("shadowsync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[blue]\ndsn = \"{}\"\nslot = \"shadowsync\"\npublication = \"bench_pub\"\n[green]\ndsn = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            blue.dsn(DB),
            green.dsn(DB)
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&binary);
    cmd.args(["run", "--drain", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let (ours, rss_kib, ok) = run_and_watch_rss(cmd);
    assert!(ok, "shadowsync run --drain failed");
    let _ = std::fs::remove_dir_all(&dir);

    let b = checksum(&blue.dsn(DB)).await;
    let n = checksum(&green.dsn("native")).await;
    let s = checksum(&green.dsn(DB)).await;
    assert_eq!(b, n, "native green differs from blue");
    assert_eq!(b, s, "shadowsync green differs from blue");

    let secs = |d: Duration| d.as_secs_f64();
    println!("\nW1 ({txns} transactions, {rows} row changes); greens verified equal to blue\n");
    println!("| method | seconds | rows/s | vs native | vs ceiling |");
    println!("|---|---:|---:|---:|---:|");
    for (name, d) in [
        ("ceiling (pg_recvlogical)", ceiling),
        ("native subscription", native),
        ("shadowsync", ours),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} | {:.2}x | {:.2}x |",
            secs(d),
            rows as f64 / secs(d),
            secs(native) / secs(d),
            secs(ceiling) / secs(d),
        );
    }
    println!("\nshadowsync peak RSS: {} MiB", rss_kib / 1024);
}
