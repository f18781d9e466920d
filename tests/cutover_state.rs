//! After a cutover green belongs to the application: `run` on that slot refuses, writes
//! nothing and says what to do; `reset` clears the mark (and, with its options, the slot and
//! the target tables), after which a fresh run copies and streams again.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::reset::{ResetOptions, reset};

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);";

async fn insert(pair: &Pair, ids: std::ops::Range<i64>) {
    let blue = pair.blue().await;
    for id in ids {
        blue.execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_after_cutover_refuses_and_reset_allows_a_fresh_start() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    insert(&pair, 0..10).await;
    let handle = start_streaming(pair.config()).await;
    insert(&pair, 10..20).await;
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let green = pair.green().await;
    assert_eq!(count(&green, "items").await, 20);

    // The cutover's mark, as `cutover` writes it with the sequences.
    shadowsync::progress::mark_cut_over(
        &green,
        "test_slot",
        report.final_lsn,
        &serde_json::json!({"test": true}),
    )
    .await
    .unwrap();
    // The application writes on green; a late blue write must not reach it.
    let progress_before = progress_lsn(&green, "test_slot").await;
    green
        .batch_execute("INSERT INTO items VALUES (100, 'app')")
        .await
        .unwrap();
    insert(&pair, 20..30).await;
    let handle =
        shadowsync::pipeline::start(pair.config(), shadowsync::pipeline::RunOptions::default())
            .await
            .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), handle.wait())
        .await
        .expect("run gives up at once");
    let text = result.unwrap_err().to_string();
    for part in [
        "cut over",
        &report.final_lsn.to_string(),
        "shadowsync reset",
    ] {
        assert!(text.contains(part), "{text}");
    }
    assert_eq!(
        count(&green, "items").await,
        21,
        "nothing written after the cutover"
    );
    // (The drain's final_lsn is what blue confirmed, which may lie past green's progress when
    // the last stretch held nothing to apply: compare with green's own progress.)
    assert_eq!(
        progress_lsn(&green, "test_slot").await,
        progress_before,
        "green's progress must not move after the cutover"
    );

    // Reset while nothing runs: green's bookkeeping and tables emptied, the slot dropped.
    let steps = reset(
        &pair.config(),
        ResetOptions {
            drop_slot: true,
            truncate: true,
        },
    )
    .await
    .unwrap();
    let text = steps.join("\n");
    for part in ["cutover mark", "emptied", "slot test_slot dropped"] {
        assert!(text.contains(part), "{text}");
    }
    assert_eq!(count(&green, "items").await, 0);
    assert_eq!(slot_confirmed(&pair.blue().await, "test_slot").await, None);

    // A fresh run copies blue's rows again and streams.
    let handle = start_streaming(pair.config()).await;
    insert(&pair, 30..40).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert_same(&pair, &["items"]).await;
    assert_eq!(count(&green, "items").await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_is_refused_while_a_sidecar_runs() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let e = reset(&pair.config(), ResetOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stop that sidecar first"), "{e}");
    insert(&pair, 0..5).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert_eq!(
        count(&pair.green().await, "items").await,
        5,
        "the sidecar was not disturbed"
    );
}
