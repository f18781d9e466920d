//! The operations kit against a running sidecar: its scrape passes `promtool check metrics`
//! in the Prometheus text format (OpenMetrics when asked for), every metric the alert rules
//! (docker/prometheus/alerts.yml) and the dashboard (docker/grafana/shadowsync.json) use is
//! exported, and `shadowsync status` describes it.
//!
//! promtool is optional locally: without it on PATH the promtool check is skipped with a
//! printed reason, unless SHADOWSYNC_REQUIRE_PROMTOOL is set (`.ci/run` installs promtool
//! and sets it, so CI never skips).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sidecar_exports_what_the_rules_and_dashboard_use_and_passes_promtool() {
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let dir = TestDir::new("ops");
    let config = write_config(&pair, &dir, free_addr(), "");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(Duration::from_secs(60)).await;
    let addr = sidecar.addr;

    // A few changes, so that histograms and rates have samples.
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO items SELECT g, 'x' FROM generate_series(1, 50) AS g;
         UPDATE items SET name = 'y' WHERE id <= 10;",
    )
    .await
    .unwrap();
    wait_for(
        "the changes to be applied",
        Duration::from_secs(30),
        || async {
            http_get(addr, "/metrics").await.is_ok_and(|(_, body)| {
                body.contains(
                    "shadowsync_rows_applied_total{table=\"public.items\",op=\"update\"} 10",
                )
            })
        },
    )
    .await;

    let (head, text) = get(addr, "/metrics", "text/plain").await;
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(!text.contains("# EOF"), "{text}");
    let (head, om) = get(
        addr,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )
    .await;
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.ends_with("# EOF\n"), "{om}");

    let exported = sample_names(&text);
    for required in [
        "shadowsync_build_info",
        "shadowsync_database_connected",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(exported.contains(required), "{required} missing in\n{text}");
    }
    for file in [
        "docker/prometheus/alerts.yml",
        "docker/prometheus/alerts.test.yml",
        "docker/grafana/shadowsync.json",
    ] {
        let used = used_names(&std::fs::read_to_string(repo(file)).expect("read file"));
        assert!(!used.is_empty(), "{file} names no metric");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the sidecar does not export: {missing:?}\n{text}"
        );
    }

    promtool_check_metrics(&text);

    // `shadowsync status` prints the same sidecar's /status for a person.
    let config = config.to_str().expect("utf-8 path");
    let (code, out, err) = run_bin(&["status", "--config", config], Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("state       streaming (ready)"), "{out}");
    assert!(
        out.contains("rows        public.items: 50 insert, 10 update"),
        "{out}"
    );
}

/// `promtool check metrics` on `text`: clean (no lint problem), or skipped without promtool.
fn promtool_check_metrics(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("SHADOWSYNC_REQUIRE_PROMTOOL").is_none() => {
            println!(
                "skipping promtool check metrics: cannot run promtool ({e}); apt-get install prometheus"
            );
            return;
        }
        Err(e) => panic!("SHADOWSYNC_REQUIRE_PROMTOOL is set but promtool cannot run: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ends");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}\n{text}"
    );
}

/// A GET with an `Accept` header: (response head, body).
async fn get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    // axum answers a body of known length without chunking.
    (head.to_ascii_lowercase(), body.to_string())
}

/// Names of the samples in a text exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("a sample name")
                .to_string()
        })
        .collect()
}

/// Every `shadowsync_*` and `process_*` metric name a rules or dashboard file mentions.
fn used_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["shadowsync_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // Not part of a longer identifier (such as a file name).
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/') {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}
