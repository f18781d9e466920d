//! End-to-end streaming: blue writes, `run` with drain, green equals blue.

mod common;

use common::*;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, n integer, doc jsonb);
";

/// Three related tables (the shape of the old identity demo): users, hypervisors and VMs with
/// foreign keys, a UNIQUE email and jsonb and array columns.
const MULTI: &str = "
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_small_transactions_arrive_complete() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let client = pair.blue().await;
        writers.push(tokio::spawn(async move {
            for i in 0..2000i64 {
                let id = w * 1_000_000 + i;
                client
                    .execute(
                        "INSERT INTO items VALUES ($1, 'x', 1, '{\"a\": 1}')",
                        &[&id],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    eprintln!("{report:?}");
    assert_same(&pair, &["items"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_table_transactions_arrive_complete() {
    init_logging();
    let pair = Pair::start(MULTI);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE users, hypervisors, virtual_machines",
        )
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let mut client = pair.blue().await;
        writers.push(tokio::spawn(async move {
            for i in 1..1500i64 {
                let id = w * 1_000_000 + i;
                let tx = client.transaction().await.unwrap();
                tx.execute("INSERT INTO users (id, email) VALUES ($1, $2)", &[&id, &format!("u{id}")]).await.unwrap();
                tx.execute("INSERT INTO hypervisors (id, hostname, status) VALUES ($1, 'h', 'active')", &[&id]).await.unwrap();
                tx.execute("INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id, status) VALUES ($1, 'v', $1, $1, 'creating')", &[&id]).await.unwrap();
                if i > 2 {
                    tx.execute("UPDATE virtual_machines SET status = 'running' WHERE id = $1", &[&(id - 1)]).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    eprintln!("{report:?}");
    assert_same(&pair, &["users", "hypervisors", "virtual_machines"]).await;
}

/// WAL that holds nothing for green (writes to an unpublished table) is confirmed while idle,
/// so blue does not keep it; green's progress stays at the last applied commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_stream_confirms_wal_it_does_not_need() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE items; CREATE TABLE unpublished (x int)",
        )
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    blue.execute("INSERT INTO items VALUES (1, 'a', 1, NULL)", &[])
        .await
        .unwrap();
    wait_for(
        "the insert in green",
        std::time::Duration::from_secs(30),
        || async { rows(&green, "items").await.len() == 1 },
    )
    .await;
    let applied = progress_lsn(&green, "test_slot").await.unwrap();
    blue.execute(
        "INSERT INTO unpublished SELECT generate_series(1, 10000)",
        &[],
    )
    .await
    .unwrap();
    let wal: String = blue
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let wal = shadowsync::lsn::Lsn::parse(&wal).unwrap();
    wait_for(
        "the slot to confirm idle WAL",
        std::time::Duration::from_secs(30),
        || async {
            slot_confirmed(&blue, "test_slot")
                .await
                .flatten()
                .unwrap_or_default()
                >= wal
        },
    )
    .await;
    assert_eq!(
        progress_lsn(&green, "test_slot").await.unwrap(),
        applied,
        "no green write for idle WAL"
    );
    handle.shutdown();
    handle.wait().await.unwrap();
}

/// A drain's target is reachable at once on an idle blue: blue has flushed WAL past it, so the
/// walsender can get there without waiting for blue's next write (an async commit's unflushed
/// tail, an insert position at a page header).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_target_is_flushed_on_an_idle_blue() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let blue = pair.blue().await;
    for i in 0..20 {
        // An asynchronous commit returns before its WAL is flushed.
        blue.batch_execute(&format!(
            "SET synchronous_commit = off; INSERT INTO items VALUES ({i}, 'a', 1, NULL)"
        ))
        .await
        .unwrap();
        let target = shadowsync::source::slot::drain_target(&blue).await.unwrap();
        let flushed: String = blue
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let flushed = shadowsync::lsn::Lsn::parse(&flushed).unwrap();
        assert!(
            flushed > target,
            "round {i}: blue flushed {flushed}, the drain needs past {target}"
        );
    }
}

/// Killing blue's walsender and green's apply connection mid-stream: the pipeline reconnects
/// with backoff and resumes from green's progress; nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_connections_are_retried_and_resume_exactly_once() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    let writer = {
        let client = pair.blue().await;
        tokio::spawn(async move {
            for i in 0..3000i64 {
                client
                    .execute(
                        "INSERT INTO items VALUES ($1, 'x', 0, NULL) ON CONFLICT (id) DO UPDATE SET n = items.n + 1",
                        &[&(i % 1000)],
                    )
                    .await
                    .unwrap();
            }
        })
    };
    for round in 0..3 {
        wait_for(
            "rows in green",
            std::time::Duration::from_secs(30),
            || async { !rows(&green, "items").await.is_empty() },
        )
        .await;
        let sql = if round % 2 == 0 {
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = 'shadowsync'"
        } else {
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'shadowsync-apply'"
        };
        let target = if round % 2 == 0 { &blue } else { &green };
        let killed: i64 = target.query_one(sql, &[]).await.unwrap().get(0);
        assert_eq!(killed, 1, "round {round}: one connection terminated");
        wait_for(
            "the pipeline to notice",
            std::time::Duration::from_secs(60),
            || async { !handle.shared.ready() },
        )
        .await;
        wait_for(
            "the pipeline to stream again",
            std::time::Duration::from_secs(60),
            || async { handle.shared.ready() },
        )
        .await;
    }
    writer.await.unwrap();
    let report = handle.drain().await.unwrap();
    let shared = handle.shared.clone();
    handle.wait().await.unwrap();
    assert!(report.drained);
    assert_same(&pair, &["items"]).await;
    let metrics = shared.encode();
    assert!(
        ["source", "apply"].iter().all(|stage| {
            let series = format!("shadowsync_errors_total{{stage=\"{stage}\",retryable=\"true\"}}");
            errors_counted(&metrics)
                .iter()
                .any(|l| l.starts_with(&series))
        }),
        "retried errors are counted:\n{metrics}"
    );
}

/// Two users swap emails through a temporary value in one blue transaction, with a UNIQUE
/// email on green: coalesced, the upserts collide; shadowsync replays that stretch change by
/// change in blue's order and converges. A genuinely duplicate value would then be a poison row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unique_swaps_are_replayed_in_blue_order() {
    init_logging();
    let pair =
        Pair::start("CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int);");
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE users")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    blue.batch_execute("INSERT INTO users VALUES (1, 'a', 0), (2, 'b', 0)")
        .await
        .unwrap();
    wait_for("the users", std::time::Duration::from_secs(30), || async {
        rows(&green, "users").await.len() == 2
    })
    .await;
    blue.batch_execute(
        "BEGIN;
         UPDATE users SET email = 'tmp' WHERE id = 1;
         UPDATE users SET email = 'a' WHERE id = 2;
         UPDATE users SET email = 'b', n = n + 1 WHERE id = 1;
         INSERT INTO users VALUES (3, 'c', 0);
         COMMIT;",
    )
    .await
    .unwrap();
    let report = handle.drain().await.unwrap();
    let shared = handle.shared.clone();
    handle.wait().await.unwrap();
    assert!(report.drained);
    assert_same(&pair, &["users"]).await;
    let metrics = shared.encode();
    assert!(
        metrics.contains(
            "shadowsync_apply_switches_total{table=\"public.users\",switch=\"blue_order\"} 1"
        ) && errors_counted(&metrics).is_empty(),
        "one replay, and no error: {metrics}"
    );
}

/// A shutdown arriving while a large blue transaction is being received lets it finish: the
/// batch in flight commits whole instead of being rolled back and streamed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_transaction_commits_it_whole() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let mut config = pair.config();
    config.batch.max_rows = 5_000;
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    blue.batch_execute(
        "INSERT INTO items SELECT g, 'x', g, NULL FROM generate_series(1, 300000) g",
    )
    .await
    .unwrap();
    // Green is writing chunks of the transaction: it is being received.
    wait_for("a chunk being written", std::time::Duration::from_secs(60), || async {
        green
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shadowsync-apply' AND xact_start IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        report
            .rows
            .get("public.items")
            .and_then(|r| r.get("insert"))
            .copied(),
        Some(300_000),
        "{report:?}"
    );
    assert_eq!(count(&green, "items").await, 300_000);
}
