//! Honest health: a stalled connection to either side is noticed and recovered from, lag stays
//! true while green is down, reconnection follows an outage's end at once, and a slot blue
//! invalidated is explained. Nothing is lost or doubled across any of it.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);";

fn proxied(cluster: &shadowsync::cluster::Cluster, proxy: &Proxy) -> String {
    // The cluster's socket is what the proxy forwards to; connect to the proxy instead.
    let _ = cluster;
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB} sslmode=disable",
        proxy.port
    )
}

async fn insert(blue: &tokio_postgres::Client, from: i64, to: i64) {
    blue.execute(
        "INSERT INTO items SELECT g, 'n' || g FROM generate_series($1::int8, $2::int8) g",
        &[&from, &to],
    )
    .await
    .unwrap();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

/// Streams through a proxy in front of `side`, stalls the proxy, and checks the stall is
/// noticed (readiness false, `shadowsync_stalled`), then that everything arrives exactly once
/// after the proxy passes again.
async fn stall_and_recover(side: &str) {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let target = if side == "blue" {
        &pair.blue
    } else {
        &pair.green
    };
    let proxy = Proxy::start(target.socket_dir(), target.port()).await;
    let mut config = pair.config();
    config.retry.stall_timeout_ms = 3_000;
    if side == "blue" {
        config.blue.dsn = proxied(&pair.blue, &proxy);
    } else {
        config.green.dsn = proxied(&pair.green, &proxy);
    }
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    insert(&blue, 1, 100).await;
    wait_for("the first rows", Duration::from_secs(30), || async {
        count(&green, "items").await == 100
    })
    .await;

    proxy.stall();
    let stalled_at = Instant::now();
    insert(&blue, 101, 200).await;
    wait_for(
        "readiness to turn false",
        Duration::from_secs(15),
        || async { !handle.shared.ready() },
    )
    .await;
    let noticed = stalled_at.elapsed();
    let scrape = handle.shared.encode();
    assert_eq!(
        metric(&scrape, &format!("shadowsync_stalled{{side=\"{side}\"}}")),
        1.0,
        "{scrape}"
    );
    if side == "green" {
        // Blue is reachable: the lag is read from it, and is not 0 while green is stalled.
        wait_for("lag bytes above 0", Duration::from_secs(10), || async {
            handle.shared.lag_bytes() > 0
        })
        .await;
    }
    eprintln!("{side} stall noticed after {noticed:?}");

    proxy.pass();
    wait_for("streaming again", Duration::from_secs(60), || async {
        handle.shared.ready()
    })
    .await;
    insert(&blue, 201, 300).await;
    wait_for("every row on green", Duration::from_secs(60), || async {
        count(&green, "items").await == 300
    })
    .await;
    assert_same(&pair, &["items"]).await;
    handle.shutdown();
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_blue_connection_is_noticed_and_recovered() {
    stall_and_recover("blue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_green_connection_is_noticed_and_recovered() {
    stall_and_recover("green").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_stays_true_while_green_is_down_and_reconnection_follows_its_return() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let mut config = pair.config();
    // A long backoff, as in production: the return must not wait it out.
    config.retry.initial_backoff_ms = 1_000;
    config.retry.max_backoff_ms = 30_000;
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    insert(&blue, 1, 100).await;
    {
        let green = pair.green().await;
        wait_for("the first rows", Duration::from_secs(30), || async {
            count(&green, "items").await == 100
        })
        .await;
    }
    // Test clusters run with fsync off: a checkpoint first, so the stop loses nothing green
    // committed (as a real server's crash would not).
    pair.green.psql(DB, "CHECKPOINT").unwrap();
    pair.green.stop();
    insert(&blue, 101, 5_000).await;
    wait_for(
        "lag bytes and seconds above 0",
        Duration::from_secs(15),
        || async { handle.shared.lag_bytes() > 0 && handle.shared.lag_seconds() > 0.0 },
    )
    .await;
    // Down long enough for the backoff to grow past the time reconnection may take.
    let down = Instant::now();
    wait_for("a long outage", Duration::from_secs(30), || async {
        down.elapsed() > Duration::from_secs(12)
    })
    .await;
    let scrape = handle.shared.encode();
    assert!(
        metric(&scrape, "shadowsync_replication_lag_bytes") > 0.0,
        "{scrape}"
    );
    pair.green.restart().unwrap();
    let back = Instant::now();
    wait_for("streaming again", Duration::from_secs(40), || async {
        handle.shared.ready()
    })
    .await;
    let took = back.elapsed();
    eprintln!("streaming again {took:?} after green came back");
    assert!(
        took < Duration::from_secs(8),
        "reconnection waited out the backoff: {took:?}"
    );
    let green = pair.green().await;
    wait_for("every row", Duration::from_secs(60), || async {
        count(&green, "items").await == 5_000
    })
    .await;
    assert_same(&pair, &["items"]).await;
    handle.shutdown();
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_blue_invalidated_is_explained_by_check_and_run() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    pair.blue.reconfigure("max_slot_wal_keep_size = 1").unwrap();
    let dir = TestDir::new("liveness-lost-slot");
    let path = write_config(&pair, &dir, free_addr(), "");
    let config = shadowsync::config::Config::load(&path).unwrap();
    let handle = start_streaming(config).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // With the sidecar stopped, blue writes more WAL than the slot may hold.
    let blue = pair.blue().await;
    wait_for(
        "the slot to be invalidated",
        Duration::from_secs(60),
        || async {
            blue.batch_execute(
                "INSERT INTO items SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g
               ON CONFLICT (id) DO UPDATE SET name = excluded.name || 'y';
             SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
            let status: Option<String> = blue
            .query_one(
                "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = 'test_slot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
            status.as_deref() == Some("lost")
        },
    )
    .await;
    for command in ["check", "run"] {
        let (code, out, err) = run_bin(
            &[command, "--config", path.to_str().unwrap()],
            Duration::from_secs(60),
        )
        .await;
        let text = format!("{out}{err}");
        assert_ne!(code, Some(0), "{command}: {text}");
        assert!(
            text.contains("invalidated")
                && text.contains("max_slot_wal_keep_size")
                && text.contains("--drop-slot"),
            "{command}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn complete_transactions_do_not_wait_for_a_large_one_behind_them() {
    init_logging();
    let pair = Pair::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);
         CREATE TABLE bulk (id bigint PRIMARY KEY, batch int NOT NULL, pad text);",
    );
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items, bulk")
        .unwrap();
    let mut config = pair.config();
    config.batch.max_delay_ms = 50;
    let handle = start_streaming(config.clone()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // Every green commit takes a second (a trigger on the progress row each commit writes), so
    // that the stream queues up behind the commit in flight: the small transaction and the
    // second job's first rows arrive while the first job commits.
    pair.green
        .psql(
            DB,
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql
                AS $$BEGIN PERFORM pg_sleep(1); RETURN NULL; END$$;
             CREATE TRIGGER slow AFTER INSERT OR UPDATE ON shadowsync.progress
                FOR EACH ROW EXECUTE FUNCTION slow();
             ALTER TABLE shadowsync.progress ENABLE ALWAYS TRIGGER slow;",
        )
        .unwrap();
    let blue = pair.blue().await;
    let green = pair.green().await;
    // A bulk job's large transactions, with a small one between them, written while the
    // sidecar is stopped: they reach it back to back, as in a catch-up or a busy stream.
    let bulk = |n: i32| {
        format!(
            "INSERT INTO bulk SELECT g + {n} * 1000000, {n}, repeat('p', 100)
               FROM generate_series(1, 200000) g"
        )
    };
    // A first row of items, so that the session knows the table (a Relation message makes the
    // stage wait for green) before the small transaction arrives.
    blue.batch_execute("INSERT INTO items VALUES (0, 'first')")
        .await
        .unwrap();
    blue.batch_execute(&bulk(1)).await.unwrap();
    // The second job writes its rows before the small transaction commits and commits right
    // after it: blue's walsender has decoded the job by then, so its Begin follows the small
    // transaction's Commit at once (a job committed later would leave a pause in the stream,
    // and the small one would commit alone in it).
    let job = pair.blue().await;
    job.batch_execute(&format!("BEGIN; {}", bulk(2)))
        .await
        .unwrap();
    blue.batch_execute("INSERT INTO items VALUES (1, 'small')")
        .await
        .unwrap();
    job.batch_execute("COMMIT").await.unwrap();
    let handle = start_streaming(config).await;
    // Before, the small transaction (and at times the first job) became visible only with the
    // second job, committed in the same green transaction: the lag of everything grew with the
    // job. Both must be visible while the second is still being applied.
    let small_before_second = std::sync::atomic::AtomicBool::new(false);
    wait_for(
        "both bulk transactions",
        Duration::from_secs(120),
        || async {
            // One snapshot for the three counts.
            let row = green
                .query_one(
                    "SELECT count(*) FILTER (WHERE batch = 1), count(*) FILTER (WHERE batch = 2),
                            (SELECT count(*) FROM items)
                   FROM bulk",
                    &[],
                )
                .await
                .unwrap();
            let (first, second, small): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            if first == 200_000 && small == 2 && second == 0 {
                small_before_second.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            second == 200_000
        },
    )
    .await;
    assert!(
        small_before_second.load(std::sync::atomic::Ordering::Relaxed),
        "the small transaction became visible only with the large one behind it"
    );
    assert_eq!(count(&green, "items").await, 2);
    assert_same(&pair, &["items", "bulk"]).await;
    handle.shutdown();
    handle.wait().await.unwrap();
}
