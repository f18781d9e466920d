//! Replication origins on real PostgreSQL 15: what marking needs (superuser, or EXECUTE on the
//! origin functions), as `check` says it and `run` requires it with `[origin] mark = "on"`;
//! a marked session's transactions carry the origin.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::origin::Mark;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL);";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn marking_needs_the_origin_privilege_and_check_names_the_grant() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE ROLE writer LOGIN; GRANT CREATE ON DATABASE app TO writer;
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items TO writer;",
        )
        .unwrap();
    let mut config = pair.config();
    config.green.dsn = format!("{} user=writer", pair.green.dsn(DB));

    // auto: a note naming the GRANT; the stream runs unmarked.
    let report = shadowsync::check::command(&config).await.unwrap();
    assert!(report.ok(), "{}", report.problems_text());
    let note = report.notes.join("\n");
    assert!(
        note.contains("may not set up replication origins")
            && note.contains("GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text)")
            && note.contains("TO \"writer\""),
        "{note}"
    );

    // on: check fails, and run refuses with the same fix.
    config.origin.mark = Mark::On;
    let report = shadowsync::check::command(&config).await.unwrap();
    assert!(!report.ok());
    assert!(
        report.problems_text().contains("GRANT EXECUTE"),
        "{}",
        report.problems_text()
    );
    let handle = shadowsync::pipeline::start(config.clone(), Default::default())
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), handle.wait())
        .await
        .expect("run gives up")
        .expect_err("run refuses to write unmarked");
    let text = format!("{e:#}");
    assert!(
        text.contains("GRANT EXECUTE") && text.contains("mark"),
        "{text}"
    );

    // Granted: marked, and green's transactions carry the origin.
    pair.green
        .psql(
            DB,
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
               pg_replication_origin_oid(text), pg_replication_origin_session_setup(text) TO writer;",
        )
        .unwrap();
    let report = shadowsync::check::command(&config).await.unwrap();
    assert!(report.ok(), "{}", report.problems_text());
    assert!(
        report
            .notes
            .join("\n")
            .contains("marked with replication origin shadowsync_test_slot"),
        "{:?}",
        report.notes
    );
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    blue.execute("INSERT INTO items VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let green = pair.green().await;
    wait_for("the row on green", Duration::from_secs(30), || async {
        count(&green, "items").await == 1
    })
    .await;
    let origin: String = green
        .query_one(
            "SELECT external_id FROM pg_replication_origin_status
              WHERE external_id = 'shadowsync_test_slot' AND local_lsn <> '0/0'",
            &[],
        )
        .await
        .expect("the origin advanced with green's commits")
        .get(0);
    assert_eq!(origin, "shadowsync_test_slot");
    handle.shutdown();
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_green_without_replication_slots_cannot_mark() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    pair.green
        .reconfigure("max_replication_slots = 0\nmax_wal_senders = 0\nwal_level = replica")
        .unwrap();
    let mut config = pair.config();
    // auto: a note, and the stream runs unmarked.
    let report = shadowsync::check::command(&config).await.unwrap();
    assert!(report.ok(), "{}", report.problems_text());
    assert!(
        report
            .notes
            .join("\n")
            .contains("max_replication_slots = 0"),
        "{:?}",
        report.notes
    );
    let handle = start_streaming(config.clone()).await;
    pair.blue()
        .await
        .execute("INSERT INTO items VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let green = pair.green().await;
    wait_for("the row on green", Duration::from_secs(30), || async {
        count(&green, "items").await == 1
    })
    .await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // on: refused, saying what to set.
    config.origin.mark = Mark::On;
    let report = shadowsync::check::command(&config).await.unwrap();
    assert!(
        report.problems_text().contains("max_replication_slots = 0"),
        "{}",
        report.problems_text()
    );
}
