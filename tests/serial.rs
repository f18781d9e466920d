//! Randomized serial-equivalence test: thousands of random blue transactions over several
//! tables (inserts, updates, deletes, key changes, truncates, NULLs, multi-row and multi-table
//! transactions, TOASTed values left unchanged or rewritten, a keyless table with REPLICA
//! IDENTITY FULL, a foreign key, and one transaction of 500,000 rows), then a drain: blue and
//! green must be identical, table by table. The seed is printed; rerun a failure with
//! `SHADOWSYNC_SEED=<seed> cargo test --release --test serial`.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

const SCHEMA: &str = "
CREATE TABLE parent (id int PRIMARY KEY, v text, n int, big text);
CREATE TABLE child (id bigint PRIMARY KEY, parent_id int REFERENCES parent (id) ON DELETE CASCADE, note text);
CREATE TABLE pairs (k1 int, k2 text, payload jsonb, tags text[], PRIMARY KEY (k1, k2));
CREATE TABLE bag (x int, y text);
ALTER TABLE bag REPLICA IDENTITY FULL;
CREATE TABLE scratch (id int PRIMARY KEY, v text);
CREATE TABLE bulk (id int PRIMARY KEY, v text);
";

const TABLES: [&str; 6] = ["parent", "child", "pairs", "bag", "scratch", "bulk"];

/// Rows in the one large blue transaction.
const HUGE_ROWS: i32 = 500_000;

fn seed() -> u64 {
    std::env::var("SHADOWSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// A value that pglz cannot compress, so a few of them force out-of-line TOAST storage.
fn incompressible(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn maybe_null(rng: &mut StdRng, s: String) -> Option<String> {
    (!rng.random_ratio(1, 8)).then_some(s)
}

/// One random blue transaction of 1 to 6 operations; unique violations are avoided by design
/// (fresh keys come from `next_key`), so every transaction commits.
async fn random_transaction(
    client: &mut Client,
    rng: &mut StdRng,
    next_key: &mut i64,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let ops = rng.random_range(1..=6);
    for _ in 0..ops {
        let id: i32 = rng.random_range(0..400);
        match rng.random_range(0..100) {
            0..=14 => {
                let big = rng.random_ratio(1, 4).then(|| incompressible(rng, 6000));
                let text = format!("v{}", rng.random::<u32>());
                let v = maybe_null(rng, text);
                tx.execute(
                    "INSERT INTO parent (id, v, n, big) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                    &[&id, &v, &rng.random::<i32>(), &big],
                )
                .await?;
            }
            15..=29 => {
                // Update leaving the TOASTed column unchanged.
                let text = format!("u{}", rng.random::<u32>());
                let v = maybe_null(rng, text);
                tx.execute(
                    "UPDATE parent SET v = $2, n = n + 1 WHERE id = $1",
                    &[&id, &v],
                )
                .await?;
            }
            30..=34 => {
                let text = incompressible(rng, 7000);
                let big = maybe_null(rng, text);
                tx.execute("UPDATE parent SET big = $2 WHERE id = $1", &[&id, &big])
                    .await?;
            }
            35..=38 => {
                tx.execute("DELETE FROM parent WHERE id = $1", &[&id])
                    .await?;
            }
            39..=41 => {
                // Primary key change (the row moves), big value unchanged-TOAST.
                *next_key += 1;
                let new_id = 1_000_000 + *next_key as i32;
                tx.execute(
                    "UPDATE parent SET id = $2 WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM child WHERE parent_id = $1)",
                    &[&id, &new_id],
                )
                .await?;
            }
            42..=51 => {
                *next_key += 1;
                let cid = *next_key;
                tx.execute(
                    "INSERT INTO child (id, parent_id, note) SELECT $1, id, $3 FROM parent WHERE id = $2",
                    &[&cid, &id, &maybe_null(rng, "note".into())],
                )
                .await?;
            }
            52..=55 => {
                tx.execute(
                    "UPDATE child SET note = $2 WHERE id % 50 = $1",
                    &[&(id as i64 % 50), &format!("n{}", rng.random::<u16>())],
                )
                .await?;
            }
            56..=67 => {
                let k2 = format!("k{}", rng.random_range(0..5));
                let tags: Vec<Option<String>> =
                    vec![Some("a,b".into()), None, Some("\"q\"".into())];
                tx.execute(
                    "INSERT INTO pairs VALUES ($1, $2, jsonb_build_object('r', $3::int), $4)
                     ON CONFLICT (k1, k2) DO UPDATE SET payload = EXCLUDED.payload, tags = EXCLUDED.tags",
                    &[&id, &k2, &rng.random::<i32>(), &tags],
                )
                .await?;
            }
            68..=71 => {
                // Composite key change, possibly several rows at once.
                *next_key += 1;
                let new_k1 = 2_000_000 + *next_key as i32;
                tx.execute("UPDATE pairs SET k1 = $2 WHERE k1 = $1", &[&id, &new_k1])
                    .await?;
            }
            72..=74 => {
                tx.execute("DELETE FROM pairs WHERE k1 % 40 = $1", &[&(id % 40)])
                    .await?;
            }
            75..=82 => {
                // Keyless table: duplicates on purpose.
                let x: i32 = rng.random_range(0..20);
                let n: i32 = rng.random_range(1..4);
                tx.execute(
                    "INSERT INTO bag SELECT $1::int, 'y' || ($1::int % 3) FROM generate_series(1, $2::int)",
                    &[&x, &n],
                )
                .await?;
            }
            83..=86 => {
                let x: i32 = rng.random_range(0..20);
                tx.execute(
                    "UPDATE bag SET y = y || '.' WHERE ctid = (SELECT ctid FROM bag WHERE x = $1 LIMIT 1)",
                    &[&x],
                )
                .await?;
            }
            87..=89 => {
                let x: i32 = rng.random_range(0..20);
                tx.execute(
                    "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE x = $1 LIMIT 1)",
                    &[&x],
                )
                .await?;
            }
            90..=96 => {
                let n: i32 = rng.random_range(1..30);
                tx.execute(
                    "INSERT INTO scratch SELECT g, md5(g::text) FROM generate_series($1::int, $1::int + $2::int) g ON CONFLICT (id) DO UPDATE SET v = 'again'",
                    &[&id, &n],
                )
                .await?;
            }
            97 => {
                tx.execute("TRUNCATE scratch", &[]).await?;
            }
            _ => {
                tx.execute("UPDATE scratch SET v = NULL WHERE id % 3 = 0", &[])
                    .await?;
            }
        }
    }
    tx.commit().await
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_transactions_are_applied_serially_equivalent() {
    init_logging();
    let seed = seed();
    eprintln!("serial-equivalence seed: {seed} (rerun with SHADOWSYNC_SEED={seed})");
    let transactions: usize = std::env::var("SHADOWSYNC_SERIAL_TXNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);

    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    let mut config = pair.config();
    // Small batches: many group commits, and the huge transaction is written in chunks.
    config.batch.max_rows = 5_000;
    config.batch.max_bytes = 4 * 1024 * 1024;
    let handle = start_streaming(config).await;

    // Three concurrent clients, each with its own deterministic stream of transactions.
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let mut client = pair.blue().await;
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
        writers.push(tokio::spawn(async move {
            let mut next_key = (w as i64) * 100_000;
            for _ in 0..transactions / 3 {
                // Concurrent clients can trip blue's own constraints or deadlock (a key moved
                // under a new child row): blue rolls back, as it would for an application.
                if let Err(e) = random_transaction(&mut client, &mut rng, &mut next_key).await {
                    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                    assert!(
                        code.starts_with("23") || code.starts_with("40"),
                        "blue: {e}"
                    );
                }
            }
        }));
    }

    // Meanwhile, one blue transaction of HUGE_ROWS rows touching several tables.
    let rss_before = peak_rss_kib();
    let mut huge = pair.blue().await;
    let tx = huge.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO bulk SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, $1) g",
        &[&HUGE_ROWS],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE bulk SET v = 'even' WHERE id % 2 = 0 AND id <= 100000",
        &[],
    )
    .await
    .unwrap();
    tx.execute("DELETE FROM bulk WHERE id % 10 = 3 AND id <= 100000", &[])
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO scratch VALUES (-1, 'from the huge transaction') ON CONFLICT (id) DO NOTHING",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    for w in writers {
        w.await.unwrap();
    }
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let rss_after = peak_rss_kib();
    eprintln!(
        "report: {} transactions in {} batches; peak RSS of the test process {} MiB -> {} MiB",
        report.transactions,
        report.batches,
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(report.drained);
    // PostgreSQL 15 does not send transactions that changed no published row.
    assert!(
        report.transactions > 0 && report.transactions as usize <= transactions / 3 * 3 + 1,
        "transactions counted: {report:?}"
    );
    assert_same(&pair, &TABLES).await;
    // The huge transaction was written in chunks of at most 5,000 rows: holding it whole would
    // take hundreds of MiB (500,000 decoded rows); the bound leaves room for the test's own
    // clients and the clusters' output buffering.
    assert!(
        rss_after.saturating_sub(rss_before) < 150 * 1024,
        "peak RSS grew by {} MiB while applying a {HUGE_ROWS}-row transaction",
        (rss_after - rss_before) / 1024
    );
}
