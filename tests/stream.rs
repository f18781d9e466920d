//! End-to-end streaming: blue writes, `run` with drain, green equals blue.

mod common;

use common::*;
use shadowsync::pipeline::{self, RunOptions};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, n integer, doc jsonb);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_small_transactions_arrive_complete() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let handle = pipeline::start(pair.config(), RunOptions::default())
        .await
        .unwrap();
    wait_for("streaming", std::time::Duration::from_secs(30), || async {
        handle.shared.ready()
    })
    .await;
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
    let pair = Pair::start(shadowsync::demo::SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE users, hypervisors, virtual_machines",
        )
        .unwrap();
    let handle = pipeline::start(pair.config(), RunOptions::default())
        .await
        .unwrap();
    wait_for("streaming", std::time::Duration::from_secs(30), || async {
        handle.shared.ready()
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_workload_arrives_complete() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    init_logging();
    let pair = Pair::start(shadowsync::demo::SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE users, hypervisors, virtual_machines",
        )
        .unwrap();
    let handle = pipeline::start(pair.config(), RunOptions::default())
        .await
        .unwrap();
    wait_for("streaming", std::time::Duration::from_secs(30), || async {
        handle.shared.ready()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let dsn = pair.blue.dsn(DB);
        let (stop, written) = (stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            shadowsync::demo::workload_client(&dsn, w, stop, written).await
        }));
    }
    wait_for("writes", std::time::Duration::from_secs(60), || async {
        written.load(Ordering::Relaxed) > 20000
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    eprintln!("{report:?}");
    assert_same(&pair, &["users", "hypervisors", "virtual_machines"]).await;
}
