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
    let aborted = cutover::abort(&pair.config()).await.unwrap();
    assert_eq!(aborted.fence_removed_from.len(), 2);
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

/// NovaCron under two concurrent writer sessions (ids from blue's sequences), cut over through
/// the running sidecar while they write: each writer's next write is refused by the fence,
/// green equals the migration plan's own SQL applied to blue's final state, and the
/// application's inserts on green without ids succeed on every table with a sequence,
/// renamed ones included, with ids past every blue id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn novacron_cutover_under_two_writers_matches_the_plan() {
    use shadowsync::demo::{Ended, preload_sql, workload_client};
    init_logging();
    let (pair, mut config) = common::novacron::novacron();
    pair.blue.psql(DB, &preload_sql(500)).unwrap();
    let handle = start_streaming(config.clone()).await;
    config.metrics.listen = handle.addr.to_string();
    let (_stop, stopped) = shadowsync::shutdown::channel();
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (dsn, stop, written) = (pair.blue.dsn(DB), stopped.clone(), written.clone());
            tokio::spawn(async move { workload_client(&dsn, w, stop, written).await.unwrap() })
        })
        .collect();
    let w = written.clone();
    wait_for("blue writes", Duration::from_secs(30), || async {
        w.load(Ordering::Relaxed) > 300
    })
    .await;

    let opts = Options {
        max_lag: Duration::from_secs(5),
        ..Options::default()
    };
    let report = cutover::run(&config, &opts).await.unwrap();
    assert!(report.cut_over, "{report:?}");
    for w in writers {
        match w.await.unwrap() {
            Ended::Fenced(message) => {
                assert!(
                    message.contains("being migrated by shadowsync"),
                    "{message}"
                )
            }
            Ended::Stopped => panic!("a writer ended before the fence"),
        }
    }
    handle.wait().await.unwrap();
    common::novacron::assert_matches_plan(&pair).await;

    let set: Vec<(String, String)> = report
        .sequences
        .iter()
        .filter(|s| s.action.starts_with("set to"))
        .map(|s| (s.blue.clone(), s.green.clone().unwrap_or_default()))
        .collect();
    for pair in [
        ("public.users_id_seq", "public.users_id_seq"),
        ("public.hypervisors_id_seq", "public.compute_nodes_id_seq"),
        ("public.virtual_machines_id_seq", "public.vms_id_seq"),
        ("public.api_keys_id_seq", "public.api_keys_id_seq"),
    ] {
        assert!(
            set.contains(&(pair.0.to_string(), pair.1.to_string())),
            "{:?}",
            report.sequences
        );
    }

    // The application's first inserts on green, without ids.
    let blue = pair.blue().await;
    let green = pair.green().await;
    let inserts = [
        (
            "users",
            "users",
            "INSERT INTO users (email, name, tenant_id, created_at, updated_at)
             VALUES ('app@acme.example', 'app', '00000000-0000-0000-0000-000000000002', now(), now()) RETURNING id",
        ),
        (
            "hypervisors",
            "compute_nodes",
            "INSERT INTO compute_nodes (name, hostname, created_at, updated_at)
             VALUES ('app-node', 'app-node', now(), now()) RETURNING id",
        ),
        (
            "virtual_machines",
            "vms",
            "INSERT INTO vms (name, state, tenant_id, created_at, updated_at)
             VALUES ('app-vm', 'creating', '00000000-0000-0000-0000-000000000001', now(), now()) RETURNING id",
        ),
        (
            "api_keys",
            "api_keys",
            "INSERT INTO api_keys (key_hash, created_at) VALUES ('app', now()) RETURNING id",
        ),
    ];
    for (source, target, sql) in inserts {
        let id: i64 = green
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("the application's insert into {target}: {e}"))
            .get(0);
        let blue_max: i64 = blue
            .query_one(&format!("SELECT max(id) FROM {source}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            id > blue_max,
            "{target}: green handed out {id}, blue had {blue_max}"
        );
    }
    shadowsync::fence::remove(&blue).await.unwrap();
}

/// `cutover --verify` compares behind the fence: a row changed on green behind shadowsync's
/// back aborts the cutover (fence lifted, green unmarked, the key named); with
/// `--accept-differences` it cuts over and the report keeps the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_verify_refuses_a_green_that_differs() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE users, vms;
             INSERT INTO users (email) SELECT 'u' || g || '@x' FROM generate_series(1, 500) g;",
        )
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    let green = pair.green().await;
    green
        .batch_execute("UPDATE users SET email = 'changed@green' WHERE id = 7")
        .await
        .unwrap();
    let opts = Options {
        max_lag: Duration::from_secs(10),
        verify: true,
        ..Options::default()
    };
    let e = cutover::run(&pair.config(), &opts).await.unwrap_err();
    let text = e.to_string();
    for part in [
        "verifying green behind the fence",
        "(id)=(7)",
        "email",
        "The fence was removed",
    ] {
        assert!(text.contains(part), "{text}");
    }
    assert!(!text.contains("changed@green"), "no values: {text}");
    let blue = pair.blue().await;
    assert!(
        shadowsync::fence::fenced_tables(&blue)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        shadowsync::progress::cut_over(&green, "test_slot")
            .await
            .unwrap(),
        None
    );

    let report = cutover::run(
        &pair.config(),
        &Options {
            accept_differences: true,
            ..opts
        },
    )
    .await
    .unwrap();
    assert!(report.cut_over);
    let verified = report.verify.expect("the comparison");
    assert!(!verified.equal);
    assert_eq!(
        verified
            .mappings
            .iter()
            .map(|m| m.differing_count)
            .sum::<u64>(),
        1
    );
    assert!(!report.warnings.is_empty());
    shadowsync::fence::remove(&blue).await.unwrap();
}
