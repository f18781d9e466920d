//! Crash safety of the real binary: `shadowsync run` is SIGKILLed at random moments while blue
//! takes a continuous multi-table workload, restarted each time, and finally drained by a fresh
//! `run --drain`. Green must then equal blue table by table: nothing lost (progress is only
//! written with the data it covers) and nothing applied twice (the keyless, REPLICA IDENTITY
//! FULL `ledger` table would show a duplicate as an extra row).
//!
//! Randomized: the seed is printed; rerun with `SHADOWSYNC_SEED=<seed>`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shadowsync::lsn::Lsn;

const SCHEMA: &str = "
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    owner   text NOT NULL,
    balance bigint NOT NULL,
    version integer NOT NULL DEFAULT 0
);
CREATE TABLE orders (
    id         bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    amount     integer NOT NULL,
    status     text NOT NULL,
    note       text
);
CREATE TABLE ledger (account_id bigint NOT NULL, delta bigint NOT NULL, kind text NOT NULL);
ALTER TABLE ledger REPLICA IDENTITY FULL;
";
const TABLES: [&str; 3] = ["accounts", "orders", "ledger"];

/// SIGKILLs (each followed by a restart, the last by the final `run --drain`).
const KILLS: usize = 8;
/// Blue transactions to write at least, overall.
const MIN_TRANSACTIONS: u64 = 5_000;
const WRITERS: u64 = 2;
/// Pace of each writer: at most one transaction per this interval, so the backlog the
/// sidecar must catch up on (and the test's duration) stays bounded.
const WRITER_PACE: Duration = Duration::from_millis(3);

/// One writer: a random mix of multi-row, multi-table transactions over its own id range.
async fn writer(
    dsn: String,
    w: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> Result<(), tokio_postgres::Error> {
    let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut client = connect(&dsn).await;
    let base = w as i64 * 1_000_000_000;
    let (mut accounts, mut orders) = (0i64, 0i64);
    let mut pace = tokio::time::interval(WRITER_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        // A random account of this writer (it may have been closed: then nothing matches).
        let any_account = |rng: &mut StdRng| base + rng.random_range(0..accounts.max(1));
        let kind = if accounts < 10 {
            0
        } else {
            rng.random_range(0..100)
        };
        match kind {
            // Open an account with a few orders and a ledger entry (sometimes twice the same
            // entry: identical rows in the keyless table).
            0..=24 => {
                let id = base + accounts;
                accounts += 1;
                let n_orders = rng.random_range(1..=5i64);
                let first_order = base + orders;
                orders += n_orders;
                let twice = rng.random_bool(0.2);
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO accounts (id, owner, balance) VALUES ($1::bigint, 'owner ' || $1::bigint, 100)",
                    &[&id],
                )
                .await?;
                tx.execute(
                    "INSERT INTO orders (id, account_id, amount, status)
                     SELECT g, $1, (g % 97)::int, 'new' FROM generate_series($2::bigint, $3::bigint) AS g",
                    &[&id, &first_order, &(first_order + n_orders - 1)],
                )
                .await?;
                tx.execute(
                    "INSERT INTO ledger SELECT $1, 100, 'open' FROM generate_series(1, $2::int)",
                    &[&id, &(1 + i32::from(twice))],
                )
                .await?;
                tx.commit().await?;
            }
            // Transfer between two accounts: two keyed updates, two keyless inserts.
            25..=49 => {
                let (a, b) = (any_account(&mut rng), any_account(&mut rng));
                let amount = rng.random_range(1..50i64);
                let tx = client.transaction().await?;
                tx.execute(
                    "UPDATE accounts SET balance = balance - $2, version = version + 1 WHERE id = $1",
                    &[&a, &amount],
                )
                .await?;
                tx.execute(
                    "UPDATE accounts SET balance = balance + $2, version = version + 1 WHERE id = $1",
                    &[&b, &amount],
                )
                .await?;
                tx.execute(
                    "INSERT INTO ledger VALUES ($1, -$3::bigint, 'transfer'), ($2, $3::bigint, 'transfer')",
                    &[&a, &b, &amount],
                )
                .await?;
                tx.commit().await?;
            }
            // Ship an account's orders (multi-row update), drop one order, note another.
            50..=69 => {
                let a = any_account(&mut rng);
                let o = base + rng.random_range(0..orders.max(1));
                let tx = client.transaction().await?;
                tx.execute(
                    "UPDATE orders SET status = 'shipped', amount = amount + 1 WHERE account_id = $1",
                    &[&a],
                )
                .await?;
                tx.execute("DELETE FROM orders WHERE id = $1", &[&o])
                    .await?;
                tx.execute(
                    "UPDATE orders SET note = repeat('n', (id % 50)::int) WHERE id = $1",
                    &[&(o + 1)],
                )
                .await?;
                tx.commit().await?;
            }
            // Close an account: multi-row deletes in all three tables (keyless included).
            70..=77 => {
                let a = any_account(&mut rng);
                let tx = client.transaction().await?;
                tx.execute("DELETE FROM orders WHERE account_id = $1", &[&a])
                    .await?;
                tx.execute("DELETE FROM ledger WHERE account_id = $1", &[&a])
                    .await?;
                tx.execute("DELETE FROM accounts WHERE id = $1", &[&a])
                    .await?;
                tx.commit().await?;
            }
            // Keyless multi-row update (possibly over identical rows).
            78..=87 => {
                let a = any_account(&mut rng);
                client
                    .execute(
                        "UPDATE ledger SET delta = delta + 1 WHERE account_id = $1 AND kind = 'open'",
                        &[&a],
                    )
                    .await?;
            }
            // Single-statement autocommit changes.
            88..=97 => {
                let a = any_account(&mut rng);
                client
                    .execute(
                        "UPDATE accounts SET owner = owner || '+', version = version + 1 WHERE id = $1",
                        &[&a],
                    )
                    .await?;
            }
            // A larger transaction: a few hundred rows across tables, then rewritten.
            _ => {
                let id = base + accounts;
                accounts += 1;
                let n = rng.random_range(100..400i64);
                let first_order = base + orders;
                orders += n;
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO accounts (id, owner, balance) VALUES ($1, 'bulk', 0)",
                    &[&id],
                )
                .await?;
                tx.execute(
                    "INSERT INTO orders (id, account_id, amount, status)
                     SELECT g, $1, 1, 'bulk' FROM generate_series($2::bigint, $3::bigint) AS g",
                    &[&id, &first_order, &(first_order + n - 1)],
                )
                .await?;
                tx.execute(
                    "UPDATE orders SET amount = amount + 1 WHERE account_id = $1 AND id % 3 = 0",
                    &[&id],
                )
                .await?;
                tx.execute(
                    "INSERT INTO ledger SELECT $1, g, 'bulk' FROM generate_series(1, 50) AS g",
                    &[&id],
                )
                .await?;
                tx.commit().await?;
            }
        }
        written.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let seed = seed("sigkill_at_random_moments_loses_and_duplicates_nothing");
    let mut rng = StdRng::seed_from_u64(seed);
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE accounts, orders, ledger",
        )
        .unwrap();
    let dir = TestDir::new("crash");
    let config = write_config(&pair, &dir, free_addr(), "");
    let ready = Duration::from_secs(60);

    // The first run creates the slot: blue's writes count from then on.
    let mut sidecar = Sidecar::run(&dir, "run-0", &config);
    sidecar.wait_ready(ready).await;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (dsn, stop, written) = (pair.blue.dsn(DB), stop.clone(), written.clone());
            tokio::spawn(writer(dsn, w, seed, stop, written))
        })
        .collect();

    for kill in 1..=KILLS {
        // A random moment, not a synchronisation: the workload runs throughout.
        let delay = Duration::from_millis(rng.random_range(200..=2000));
        tokio::time::sleep(delay).await;
        sidecar.kill();
        eprintln!(
            "kill {kill}/{KILLS} after {delay:?} ({} blue transactions so far, {:.1?} elapsed)",
            written.load(Ordering::Relaxed),
            started.elapsed()
        );
        if kill < KILLS {
            sidecar = Sidecar::run(&dir, &format!("run-{kill}"), &config);
            sidecar.wait_ready(ready).await;
            eprintln!("restart {kill} ready at {:.1?}", started.elapsed());
        }
    }
    wait_for(
        "the workload to reach its minimum",
        Duration::from_secs(60),
        // A writer that stopped early failed: its error is reported below.
        || async {
            written.load(Ordering::Relaxed) >= MIN_TRANSACTIONS
                || writers.iter().any(|w| w.is_finished())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer task").expect("blue workload");
    }
    let total = written.load(Ordering::Relaxed);
    eprintln!(
        "workload done: {total} blue transactions at {:.1?}",
        started.elapsed()
    );

    // A fresh process drains everything and exits 0 with its report.
    let drain_start = Instant::now();
    let (code, stdout, stderr) = run_bin(
        &["run", "--config", config.to_str().unwrap(), "--drain"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        code,
        Some(0),
        "run --drain failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}):\n{stdout}\nstderr:\n{stderr}"));
    eprintln!("drained in {:.1?}: {report}", drain_start.elapsed());
    assert_eq!(report["drained"], true, "{report}");
    let drain_lsn = report["drain_lsn"]
        .as_str()
        .and_then(|t| Lsn::parse(t).ok())
        .unwrap_or_else(|| panic!("no drain_lsn in {report}"));

    assert_same(&pair, &TABLES).await;

    // The drain's promise: blue's slot is confirmed at least up to the drain's LSN, and green's
    // progress names a commit.
    let blue = pair.blue().await;
    let confirmed: String = blue
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'test_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let confirmed = Lsn::parse(&confirmed).expect("slot LSN");
    assert!(
        confirmed >= drain_lsn,
        "slot confirmed {confirmed} < drain_lsn {drain_lsn}; {report}"
    );
    let green = pair.green().await;
    let progress: String = green
        .query_one(
            "SELECT end_lsn::text FROM shadowsync.progress WHERE slot = 'test_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        Lsn::parse(&progress).ok().is_some_and(|p| p > Lsn::ZERO),
        "{progress}"
    );
    let counts = [
        count(&green, "accounts").await,
        count(&green, "orders").await,
        count(&green, "ledger").await,
    ];
    eprintln!(
        "green rows (accounts, orders, ledger): {counts:?}; whole test {:.1?}",
        started.elapsed()
    );
}
