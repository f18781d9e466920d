//! `cutover` end to end on real PostgreSQL: under concurrent writers on blue, the fence stops
//! them, the drain reaches it, green's sequences continue blue's (the application's inserts
//! without ids succeed), the slot is marked cut over; a user without the fence's rights is told
//! which on a dry run and nothing is fenced; `--abort` removes a fence left behind.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use shadowsync::cutover::{self, Options};

const SCHEMA: &str = "
CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL);
CREATE TABLE vms (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, owner_id bigint NOT NULL);
";

/// Writes users and VMs on blue until the fence refuses; returns the refusal's SQLSTATE and
/// message.
async fn writer(dsn: String, written: Arc<AtomicU64>) -> (String, String) {
    let client = connect(&dsn).await;
    loop {
        let r = client
            .batch_execute(
                "BEGIN;
                 INSERT INTO users (email) VALUES ('u@x');
                 INSERT INTO vms (owner_id) VALUES (currval('users_id_seq'));
                 COMMIT;",
            )
            .await;
        match r {
            Ok(()) => {
                written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                let db = e.as_db_error().expect("a server error");
                return (db.code().code().to_string(), db.message().to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_under_writers_hands_green_to_the_application() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE users, vms")
        .unwrap();
    // A first run copies and streams; the cutover then takes over the stream in-process.
    let handle = start_streaming(pair.config()).await;
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(writer(pair.blue.dsn(DB), written.clone())))
        .collect();
    let w = written.clone();
    wait_for("blue writes", Duration::from_secs(30), || async {
        w.load(Ordering::Relaxed) > 200
    })
    .await;
    handle.shutdown();
    handle.wait().await.unwrap();

    let report = cutover::run(
        &pair.config(),
        &Options {
            max_lag: Duration::from_secs(5),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    assert!(report.cut_over, "{report:?}");
    assert!(report.fence_lsn.is_some());
    for w in writers {
        let (code, message) = w.await.unwrap();
        assert_eq!(code, "25006", "{message}");
        assert!(
            message.contains("being migrated by shadowsync"),
            "{message}"
        );
    }
    assert_same(&pair, &["users", "vms"]).await;
    let sets = report
        .sequences
        .iter()
        .filter(|s| s.action.starts_with("set to"))
        .count();
    assert_eq!(sets, 2, "{:?}", report.sequences);

    // The application's first inserts on green, without ids.
    let green = pair.green().await;
    green
        .batch_execute(
            "INSERT INTO users (email) VALUES ('app@x');
             INSERT INTO vms (owner_id) VALUES (currval('users_id_seq'));",
        )
        .await
        .expect("green's sequences continue blue's");

    // A stray sidecar refuses, and the report's fence is in green's bookkeeping.
    let handle =
        shadowsync::pipeline::start(pair.config(), shadowsync::pipeline::RunOptions::default())
            .await
            .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), handle.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("cut over"), "{e}");
    let again = cutover::run(&pair.config(), &Options::default()).await;
    assert!(again.unwrap_err().to_string().contains("already cut over"));

    // Rollback off the table: the next steps name the SQL.
    let text = report.next_steps.join("\n");
    assert!(
        text.contains("pg_drop_replication_slot('test_slot')"),
        "{text}"
    );
    shadowsync::fence::remove(&pair.blue().await).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_without_the_fences_rights_says_which_and_fences_nothing() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE users, vms;
             CREATE ROLE cutter LOGIN REPLICATION; GRANT SELECT ON users, vms TO cutter;
             REVOKE CREATE ON DATABASE app FROM PUBLIC;",
        )
        .unwrap();
    let mut config = pair.config();
    config.blue.dsn = format!("{} user=cutter", pair.blue.dsn(DB));
    let e = cutover::run(
        &config,
        &Options {
            dry_run: true,
            ..Options::default()
        },
    )
    .await
    .unwrap_err();
    let text = e.to_string();
    for part in [
        "cutter",
        "owner rights on users",
        "owner rights on vms",
        "GRANT CREATE ON DATABASE \"app\" TO \"cutter\"",
        "Nothing was fenced",
    ] {
        assert!(text.contains(part), "{text}");
    }
    let blue = pair.blue().await;
    assert!(
        shadowsync::fence::fenced_tables(&blue)
            .await
            .unwrap()
            .is_empty()
    );
    blue.batch_execute("INSERT INTO users (email) VALUES ('still@x')")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_removes_a_fence_left_by_a_killed_cutover() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE users, vms")
        .unwrap();
    let blue = pair.blue().await;
    let tables = [
        shadowsync::transform::QualifiedName::new("public", "users"),
        shadowsync::transform::QualifiedName::new("public", "vms"),
    ];
    shadowsync::fence::raise(&blue, &tables, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        blue.batch_execute("INSERT INTO users (email) VALUES ('x')")
            .await
            .is_err()
    );
    let removed = cutover::abort(&pair.config()).await.unwrap();
    assert_eq!(removed.len(), 2);
    blue.batch_execute("INSERT INTO users (email) VALUES ('x')")
        .await
        .expect("writes resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_that_times_out_lifts_the_fence_and_leaves_green_as_it_was() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE users, vms")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // Green's users table is locked by someone else: the change behind the fence cannot apply.
    let mut green_locker = pair.green().await;
    let lock = green_locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO users (email) VALUES ('behind@x')")
        .await
        .unwrap();
    let e = cutover::run(
        &pair.config(),
        &Options {
            timeout: Duration::from_secs(3),
            max_lag: Duration::from_secs(60),
            ..Options::default()
        },
    )
    .await
    .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("while draining to the fence"), "{text}");
    assert!(text.contains("The fence was removed"), "{text}");
    lock.rollback().await.unwrap();
    assert!(
        shadowsync::fence::fenced_tables(&blue)
            .await
            .unwrap()
            .is_empty()
    );
    blue.batch_execute("INSERT INTO users (email) VALUES ('after@x')")
        .await
        .expect("writes resume");
    let green = pair.green().await;
    assert_eq!(
        shadowsync::progress::cut_over(&green, "test_slot")
            .await
            .unwrap(),
        None,
        "green is not marked cut over"
    );
    // And the next cutover succeeds.
    let report = cutover::run(
        &pair.config(),
        &Options {
            max_lag: Duration::from_secs(10),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    assert!(report.cut_over);
    assert_same(&pair, &["users", "vms"]).await;
    shadowsync::fence::remove(&blue).await.unwrap();
}
