//! shadowsync's schema on green is versioned: a green made before versioning existed (the
//! release before this one) upgrades in place and streaming resumes exactly once; a green
//! migrated by a newer release is refused with both versions named; concurrent migrators
//! apply each migration once.

mod common;

use common::*;
use shadowsync::store;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);";

/// shadowsync's tables and their columns on green, for comparing layouts.
async fn layout(green: &tokio_postgres::Client) -> Vec<String> {
    green
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
               FROM information_schema.columns WHERE table_schema = 'shadowsync'
                AND table_name <> 'schema_version'
              ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

async fn insert_items(pair: &Pair, ids: std::ops::Range<i64>) {
    let blue = pair.blue().await;
    for id in ids {
        blue.execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
}

async fn wait_for_items(pair: &Pair, n: i64) {
    let green = pair.green().await;
    wait_for(
        "green to hold the items",
        std::time::Duration::from_secs(60),
        || async { count(&green, "items").await == n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_green_from_before_versioning_upgrades_in_place_and_resumes() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    insert_items(&pair, 0..100).await;
    wait_for_items(&pair, 100).await;
    handle.shutdown();
    handle.wait().await.unwrap();

    // What the release before versioning left on green: version 1's tables, no version table
    // (and none of the later versions' tables).
    let green = pair.green().await;
    let before = layout(&green).await;
    assert!(
        before
            .iter()
            .any(|c| c.starts_with("verify_points.blue_xmin xid8")),
        "version 3 adds verify's points: {before:?}"
    );
    let progress = progress_lsn(&green, "test_slot").await.unwrap();
    green
        .batch_execute(
            "DROP TABLE shadowsync.schema_version, shadowsync.cutover, shadowsync.verify_points",
        )
        .await
        .unwrap();
    insert_items(&pair, 100..200).await;

    let handle = start_streaming(pair.config()).await;
    insert_items(&pair, 200..300).await;
    wait_for_items(&pair, 300).await;
    handle.shutdown();
    handle.wait().await.unwrap();

    assert_eq!(
        layout(&green).await,
        before,
        "the upgrade keeps every table as it was"
    );
    let versions: Vec<i32> = green
        .query(
            "SELECT version FROM shadowsync.schema_version ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=store::latest()).collect::<Vec<_>>());
    assert!(progress_lsn(&green, "test_slot").await.unwrap() > progress);
    assert_same(&pair, &["items"]).await;
    assert_eq!(store::migrate(&green).await.unwrap(), Vec::<i32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_green_migrated_by_a_newer_release_is_refused() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let green = pair.green().await;
    store::migrate(&green).await.unwrap();
    green
        .batch_execute(
            "INSERT INTO shadowsync.schema_version (version, name, release)
             VALUES (999, 'from the future', '9.0.0')",
        )
        .await
        .unwrap();
    let e = store::migrate(&green).await.unwrap_err();
    assert!(!e.is_retryable());
    let text = e.to_string();
    for part in ["999", "9.0.0", &store::latest().to_string()] {
        assert!(text.contains(part), "{text}");
    }

    // `run` stops at once with the same message, rather than retrying.
    let handle =
        shadowsync::pipeline::start(pair.config(), shadowsync::pipeline::RunOptions::default())
            .await
            .unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), handle.wait())
        .await
        .expect("run gives up at once");
    let text = result.unwrap_err().to_string();
    assert!(text.contains("version 999"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_apply_each_migration_once() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let green = pair.green().await;
        tasks.push(tokio::spawn(async move {
            store::migrate(&green).await.unwrap()
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.extend(t.await.unwrap());
    }
    applied.sort();
    assert_eq!(applied, (1..=store::latest()).collect::<Vec<_>>());
    let green = pair.green().await;
    assert_eq!(
        count(&green, "shadowsync.schema_version").await,
        i64::from(store::latest())
    );
}
