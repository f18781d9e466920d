//! Shared test harness: throwaway blue and green clusters with the same schema, a pipeline
//! config between them, and table comparison. Real PostgreSQL, no mocks.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use shadowsync::cluster::{Cluster, pipeline_config};
use shadowsync::config::Config;
use tokio_postgres::{Client, NoTls};

pub const DB: &str = "app";

pub struct Pair {
    pub blue: Cluster,
    pub green: Cluster,
}

impl Pair {
    /// Starts both clusters, creates `DB` on each and runs `schema` on both.
    pub fn start(schema: &str) -> Pair {
        let blue = Cluster::start("blue").expect("blue cluster");
        let green = Cluster::start("green").expect("green cluster");
        for c in [&blue, &green] {
            c.create_database(DB).expect("create database");
            if !schema.is_empty() {
                c.psql(DB, schema).expect("schema");
            }
        }
        Pair { blue, green }
    }

    pub fn config(&self) -> Config {
        pipeline_config(&self.blue, &self.green, DB, "test_slot", "test_pub")
    }

    pub async fn blue(&self) -> Client {
        connect(&self.blue.dsn(DB)).await
    }

    pub async fn green(&self) -> Client {
        connect(&self.green.dsn(DB)).await
    }
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Every row of a table as text, sorted: equal vectors mean equal tables.
pub async fn rows(client: &Client, table: &str) -> Vec<String> {
    let sql = format!("SELECT t::text FROM {table} AS t ORDER BY 1");
    client
        .query(&sql, &[])
        .await
        .expect("select rows")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts blue and green hold the same rows in each table, with a readable diff.
pub async fn assert_same(pair: &Pair, tables: &[&str]) {
    let (b, g) = (pair.blue().await, pair.green().await);
    for t in tables {
        let (br, gr) = (rows(&b, t).await, rows(&g, t).await);
        if br != gr {
            let only_blue: Vec<_> = br.iter().filter(|r| !gr.contains(r)).take(5).collect();
            let only_green: Vec<_> = gr.iter().filter(|r| !br.contains(r)).take(5).collect();
            panic!(
                "table {t} differs: blue {} rows, green {} rows\nonly in blue: {only_blue:?}\nonly in green: {only_green:?}",
                br.len(),
                gr.len()
            );
        }
    }
}

/// Waits for a condition with a deadline (never a bare sleep).
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn init_logging() {
    shadowsync::logging::init(false);
}
