//! The real `shadowsync` binary: signals, the `drain` command, the HTTP endpoints and startup
//! errors, each against throwaway blue and green clusters.

mod common;

use std::time::Duration;

use common::*;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, n integer);
CREATE TABLE notes (id bigint PRIMARY KEY, item_id bigint NOT NULL, body text);
";
const TABLES: [&str; 2] = ["items", "notes"];
const READY: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(30);

/// Clusters with `SCHEMA`, the publication, a config at a free port and a dir for logs.
fn setup(label: &str) -> (Pair, TestDir, std::path::PathBuf) {
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items, notes")
        .unwrap();
    let dir = TestDir::new(label);
    let config = write_config(&pair, &dir, free_addr(), "");
    (pair, dir, config)
}

/// `n` blue transactions, each inserting one item and two notes, updating the previous item
/// and deleting one of its notes; ids start at `first`.
async fn write_transactions(pair: &Pair, first: i64, n: i64) {
    let mut blue = pair.blue().await;
    for id in first..first + n {
        let tx = blue.transaction().await.unwrap();
        tx.execute("INSERT INTO items VALUES ($1, 'item', 0)", &[&id])
            .await
            .unwrap();
        tx.execute(
            "INSERT INTO notes VALUES ($1::bigint * 2, $1, 'a'), ($1::bigint * 2 + 1, $1, 'b')",
            &[&id],
        )
        .await
        .unwrap();
        tx.execute("UPDATE items SET n = n + 1 WHERE id = $1", &[&(id - 1)])
            .await
            .unwrap();
        tx.execute("DELETE FROM notes WHERE id = $1", &[&((id - 1) * 2)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

/// Waits until green holds exactly blue's rows (blue is not written meanwhile).
async fn wait_green_caught_up(pair: &Pair) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    let mut expected = Vec::new();
    for t in TABLES {
        expected.push(rows(&blue, t).await);
    }
    wait_for("green to catch up", Duration::from_secs(30), || async {
        for (t, want) in TABLES.iter().zip(&expected) {
            if rows(&green, t).await != *want {
                return false;
            }
        }
        true
    })
    .await;
}

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not a JSON report ({e}):\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_cleanly_with_exit_0() {
    let (pair, dir, config) = setup("sigterm");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;
    write_transactions(&pair, 1, 200).await;
    wait_green_caught_up(&pair).await;

    sidecar.signal("TERM");
    let status = sidecar.wait_exit(EXIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; stderr:\n{}",
        sidecar.stderr_text()
    );
    let report = report(&sidecar.stdout_text());
    assert_eq!(report["drained"], false, "{report}");
    assert_eq!(report["slot"], "test_slot", "{report}");
    assert_same(&pair, &TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_command_drains_the_running_sidecar_which_then_exits_0() {
    let (pair, dir, config) = setup("drain");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;
    write_transactions(&pair, 1, 300).await;

    let config_arg = config.to_str().unwrap();
    let (code, stdout, stderr) = run_bin(
        &["drain", "--config", config_arg, "--timeout", "30s"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        code,
        Some(0),
        "drain failed; stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    let report = report(&stdout);
    assert_eq!(report["drained"], true, "{report}");
    assert!(report["drain_lsn"].is_string(), "{report}");
    // 300 transactions: 300 item inserts, 299 item updates (the first updates nothing),
    // 600 note inserts, 299 note deletes.
    assert_eq!(report["transactions"], 300, "{report}");
    assert_eq!(report["rows"]["public.items"]["insert"], 300, "{report}");
    assert_eq!(report["rows"]["public.items"]["update"], 299, "{report}");
    assert_eq!(report["rows"]["public.notes"]["insert"], 600, "{report}");
    assert_eq!(report["rows"]["public.notes"]["delete"], 299, "{report}");

    let status = sidecar.wait_exit(EXIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "run exited with {status}; stderr:\n{}",
        sidecar.stderr_text()
    );
    let run_report = self::report(&sidecar.stdout_text());
    assert_eq!(run_report["drained"], true, "{run_report}");
    assert_same(&pair, &TABLES).await;
}

/// `cutover` against the running sidecar of the same config (through its admin endpoint): the
/// sidecar drains to past the fence and exits 0, blue refuses writes, green is marked cut over,
/// `run` then refuses, `cutover --abort` lifts the fence and `reset` allows a fresh start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_command_uses_the_running_sidecar_then_abort_and_reset() {
    let (pair, dir, config) = setup("cutover");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;
    write_transactions(&pair, 1, 100).await;
    let config_arg = config.to_str().unwrap();
    let (code, stdout, stderr) = run_bin(
        &["cutover", "--config", config_arg, "--max-lag", "5s"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        code,
        Some(0),
        "cutover failed; stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    let report = report(&stdout);
    assert_eq!(report["cut_over"], true, "{report}");
    assert!(report["fence_lsn"].is_string(), "{report}");
    assert!(
        report["writes_blocked_seconds"].as_f64().is_some(),
        "{report}"
    );
    let status = sidecar.wait_exit(EXIT).await;
    assert_eq!(status.code(), Some(0), "{}", sidecar.stderr_text());
    assert_same(&pair, &TABLES).await;
    let blue = pair.blue().await;
    let e = blue
        .batch_execute("DELETE FROM items")
        .await
        .expect_err("blue is fenced");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("being migrated by shadowsync"), "{e:?}");

    let (code, _, stderr) =
        run_bin(&["run", "--config", config_arg], Duration::from_secs(60)).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("cut over"), "{stderr}");

    let (code, stdout, stderr) = run_bin(
        &["cutover", "--config", config_arg, "--abort"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("fence_removed_from"), "{stdout}");
    blue.batch_execute("DELETE FROM notes")
        .await
        .expect("writes resume");

    let (code, stdout, stderr) = run_bin(
        &["reset", "--config", config_arg, "--drop-slot", "--truncate"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("cutover mark"), "{stdout}");
    assert!(stdout.contains("dropped"), "{stdout}");
}

/// `verify` against the running sidecar: exit 0 and an `ok` line per target while it streams;
/// after a row changed on green behind its back, exit 1 naming the key and the column (text and
/// JSON), never the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_command_through_the_running_sidecar() {
    let (pair, dir, config) = setup("verify");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;
    write_transactions(&pair, 1, 50).await;
    let config_arg = config.to_str().unwrap();
    let (code, stdout, stderr) =
        run_bin(&["verify", "--config", config_arg], Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}\nstdout:\n{stdout}");
    assert_eq!(stdout.matches("\nok  ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("green equals the transform of blue"),
        "{stdout}"
    );

    let green = pair.green().await;
    green
        .batch_execute("UPDATE items SET name = 'secret value' WHERE id = 5")
        .await
        .unwrap();
    let (code, stdout, _) =
        run_bin(&["verify", "--config", config_arg], Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("differs:          (id)=(5) in name"),
        "{stdout}"
    );
    assert!(!stdout.contains("secret value"), "{stdout}");
    let (code, stdout, _) = run_bin(
        &[
            "verify", "--config", config_arg, "--json", "--table", "items",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(1));
    let report = report(&stdout);
    assert_eq!(report["equal"], false, "{report}");
    assert_eq!(report["mappings"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(
        report["mappings"][0]["differing"][0]["key"], "(id)=(5)",
        "{report}"
    );
    assert!(sidecar.exited().is_none(), "the sidecar keeps streaming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_without_a_sidecar_says_it_cannot_reach_it() {
    let dir = TestDir::new("drain-nothing");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[blue]
dsn = "host=/nonexistent port=5432 user=postgres dbname=app"
slot = "test_slot"
publication = "test_pub"
[green]
dsn = "host=/nonexistent port=5432 user=postgres dbname=app"
[metrics]
listen = "{}"
"#,
            free_addr()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_bin(
        &[
            "drain",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "5s",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stdout:\n{stdout}"
    );
    assert!(
        stderr.contains("cannot reach the sidecar"),
        "stderr:\n{stderr}"
    );
}

/// Deterministic timeout: green's table is locked, so the applier blocks and the drain cannot
/// finish; `drain --timeout 1s` must fail saying so. Once the lock is released the sidecar, as
/// promised, keeps draining and exits 0 on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_timeout_fails_and_the_sidecar_keeps_draining() {
    let (pair, dir, config) = setup("drain-timeout");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;

    let mut locker = pair.green().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    write_transactions(&pair, 1, 20).await;
    // The applier is stuck behind the lock: wait until its statement is waiting on it.
    let observer = pair.green().await;
    wait_for(
        "the applier to wait on the lock",
        Duration::from_secs(30),
        || async {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        },
    )
    .await;

    let config_arg = config.to_str().unwrap();
    let (code, stdout, stderr) = run_bin(
        &["drain", "--config", config_arg, "--timeout", "1s"],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        code.is_some_and(|c| c != 0),
        "drain succeeded while green was locked; stdout:\n{stdout}"
    );
    assert!(
        stderr.contains("did not finish within"),
        "stderr:\n{stderr}"
    );
    assert!(sidecar.exited().is_none(), "the sidecar stopped");

    lock.rollback().await.unwrap();
    let status = sidecar.wait_exit(EXIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "run exited with {status}; stderr:\n{}",
        sidecar.stderr_text()
    );
    let report = report(&sidecar.stdout_text());
    assert_eq!(report["drained"], true, "{report}");
    assert_same(&pair, &TABLES).await;
}

/// Value of the first exposition line starting with `series` (name plus labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_endpoints_report_health_readiness_and_metrics() {
    let (pair, dir, config) = setup("http");
    let mut sidecar = Sidecar::run(&dir, "run", &config);
    sidecar.wait_ready(READY).await;
    let addr = sidecar.addr;

    let (code, _) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    let (code, body) = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["streaming"], true, "{body}");
    assert_eq!(ready["ready"], true, "{body}");

    // 40 transactions of 5 item inserts each, nothing else.
    let mut blue = pair.blue().await;
    for t in 0..40i64 {
        let tx = blue.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO items SELECT g, 'x', 1 FROM generate_series($1::bigint, $1::bigint + 4) AS g",
            &[&(t * 5)],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let inserts = "shadowsync_rows_applied_total{table=\"public.items\",op=\"insert\"}";
    wait_for(
        "metrics to count 200 inserts",
        Duration::from_secs(30),
        || async {
            match http_get(addr, "/metrics").await {
                // Rows are counted just before the batch's transactions: wait for both.
                Ok((200, body)) => {
                    metric(&body, inserts) == Some(200.0)
                        && metric(&body, "shadowsync_transactions_applied_total")
                            .is_some_and(|n| n >= 40.0)
                }
                _ => false,
            }
        },
    )
    .await;
    // Nothing else is written: the exposition is now stable.
    let (code, text) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        metric(&text, "shadowsync_transactions_applied_total"),
        Some(40.0),
        "{text}"
    );
    let batches = metric(&text, "shadowsync_batches_applied_total").expect("batches metric");
    assert!((1.0..=40.0).contains(&batches), "{text}");
    assert_eq!(
        metric(&text, "shadowsync_pipeline_state{state=\"streaming\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shadowsync_pipeline_state{state=\"stopped\"}"),
        Some(0.0),
        "{text}"
    );
    for name in [
        "shadowsync_replication_lag_bytes",
        "shadowsync_replication_lag_seconds",
        "shadowsync_confirmed_lsn",
        "shadowsync_batch_rows_bucket",
        "shadowsync_apply_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Everything received is applied: the age of the oldest unapplied commit is 0, and the
    // LSN confirmed to blue moves past the start.
    assert_eq!(
        metric(&text, "shadowsync_replication_lag_seconds"),
        Some(0.0),
        "{text}"
    );
    wait_for("a confirmed LSN", Duration::from_secs(10), || async {
        let (_, body) = http_get(addr, "/metrics").await.unwrap();
        metric(&body, "shadowsync_confirmed_lsn").is_some_and(|v| v > 0.0)
    })
    .await;
    let (code, body) = http_get(addr, "/status").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(status["state"], "streaming", "{body}");
    assert_eq!(status["applied"]["transactions"], 40, "{body}");

    sidecar.signal("TERM");
    let exit = sidecar.wait_exit(EXIT).await;
    assert_eq!(exit.code(), Some(0), "{}", sidecar.stderr_text());
    assert_same(&pair, &TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_config_key_is_named() {
    let dir = TestDir::new("unknown-key");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[blue]
dsn = "host=/nonexistent port=5432 user=postgres dbname=app"
slot = "test_slot"
publication = "test_pub"
[green]
dsn = "host=/nonexistent port=5432 user=postgres dbname=app"
[metrics]
listen = "{}"
[batch]
max_rowz = 5
"#,
            free_addr()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_bin(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stdout:\n{stdout}"
    );
    assert!(stderr.contains("max_rowz"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_publication_says_how_to_create_it() {
    let pair = Pair::start(SCHEMA);
    let dir = TestDir::new("no-publication");
    let config = write_config(&pair, &dir, free_addr(), "");
    let (code, stdout, stderr) = run_bin(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stdout:\n{stdout}"
    );
    assert!(stderr.contains("CREATE PUBLICATION"), "stderr:\n{stderr}");
}
