//! Initial copy: blue's existing rows reach green through the same rules, consistent with the
//! stream (writes during the copy), split into ranges or not, refusing non-empty targets, and
//! surviving a SIGKILL half-way.

mod common;

use std::time::Duration;

use common::novacron::*;
use common::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn existing_rows_are_copied_through_the_rules_while_blue_keeps_writing() {
    init_logging();
    let seed = seed("snapshot");
    let (pair, mut config) = novacron();
    // Small ranges: the larger tables are split and copied by two workers at once.
    config.snapshot.range_pages = 2;
    config.snapshot.workers = 2;
    let mut blue = pair.blue().await;
    let mut rng = StdRng::seed_from_u64(seed);
    novacron_workload(&mut blue, &mut rng, 1_500).await;

    // Blue keeps writing while the copy runs.
    let writer = {
        let dsn = pair.blue.dsn(DB);
        tokio::spawn(async move {
            let mut client = connect(&dsn).await;
            let mut rng = StdRng::seed_from_u64(seed + 1);
            novacron_workload_from(&mut client, &mut rng, 100_000, 600).await;
        })
    };
    let handle = start_streaming(config).await;
    writer.await.unwrap();
    let report = handle.drain().await.expect("drain");
    assert!(report.drained);
    handle.wait().await.expect("pipeline ends");
    assert_matches_plan(&pair).await;
    let green = pair.green().await;
    let ranges = count(
        &green,
        "shadowsync.copy_ranges WHERE source_table = 'public.virtual_machines'",
    )
    .await;
    assert!(
        ranges > 1,
        "virtual_machines was split into ranges ({ranges})"
    );
    assert_eq!(
        count(&green, "shadowsync.copy_state WHERE state <> 'done'").await,
        0
    );
}

const PLAIN: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, doc jsonb, n numeric(12,2));
CREATE TABLE events (at timestamptz NOT NULL, what text);
ALTER TABLE events REPLICA IDENTITY FULL;
CREATE PUBLICATION test_pub FOR TABLE items, events;
";

const PRELOAD: &str = "
INSERT INTO items SELECT g, 'item ' || g, jsonb_build_object('g', g), g / 3.0 FROM generate_series(1, 60000) g;
INSERT INTO events SELECT '2026-01-01'::timestamptz + g * interval '1 second', 'e' || (g % 10) FROM generate_series(1, 20000) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_and_unsplit_copies_agree_and_nonempty_targets_are_refused() {
    init_logging();
    let pair = Pair::start(PLAIN);
    pair.blue.psql(DB, PRELOAD).unwrap();
    pair.green.create_database("unsplit").unwrap();
    pair.green.psql("unsplit", PLAIN).unwrap();

    // A non-empty target is refused, naming it.
    pair.green
        .psql(
            DB,
            "INSERT INTO items VALUES (-1, 'green only', NULL, NULL)",
        )
        .unwrap();
    let dir = TestDir::new("snapshot");
    let cfg = write_config(
        &pair,
        &dir,
        free_addr(),
        "[snapshot]\nrange_pages = 8\nworkers = 3\n",
    );
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg],
        Duration::from_secs(60),
    )
    .await;
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("public.items") && err.contains("--snapshot-truncate"),
        "{err}"
    );
    // With --snapshot-truncate the copy empties it first.
    let (code, out, err) = run_bin(
        &["run", "--drain", "--snapshot-truncate", "--config", cfg],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_same(&pair, &["items", "events"]).await;
    let green = pair.green().await;
    assert!(
        count(
            &green,
            "shadowsync.copy_ranges WHERE source_table = 'public.items'"
        )
        .await
            > 1
    );

    // The same copy, unsplit, into another database, gives the same rows.
    let mut config = pair.config();
    config.blue.slot = "unsplit_slot".into();
    config.green.dsn = pair.green.dsn("unsplit");
    config.snapshot.range_pages = 1_000_000;
    let handle = start_streaming(config).await;
    handle.drain().await.expect("drain");
    handle.wait().await.expect("pipeline ends");
    let other = connect(&pair.green.dsn("unsplit")).await;
    assert_eq!(
        count(&other, "shadowsync.copy_ranges").await,
        2,
        "one range per table"
    );
    for t in ["items", "events"] {
        assert_eq!(rows(&green, t).await, rows(&other, t).await, "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_killed_half_way_is_finished_from_a_new_snapshot() {
    init_logging();
    let pair = Pair::start(PLAIN);
    pair.blue
        .psql(
            DB,
            "INSERT INTO items SELECT g, repeat('x', 200) || g, jsonb_build_object('g', g), g FROM generate_series(1, 400000) g;
             INSERT INTO events SELECT '2026-01-01'::timestamptz + g * interval '1 second', 'e' FROM generate_series(1, 50000) g;",
        )
        .unwrap();
    let dir = TestDir::new("snapshot-kill");
    let cfg = write_config(
        &pair,
        &dir,
        free_addr(),
        "[snapshot]\nrange_pages = 64\nworkers = 1\n",
    );
    let mut sidecar = Sidecar::run(&dir, "first", &cfg);
    let green = pair.green().await;
    wait_for("a few ranges copied", Duration::from_secs(60), || async {
        // The table appears when the copy starts.
        green
            .query_one("SELECT count(*) FROM shadowsync.copy_ranges", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= 3)
    })
    .await;
    let state: i64 = count(&green, "shadowsync.copy_state WHERE state = 'copying'").await;
    assert!(state >= 1, "killed while copying");
    sidecar.kill();
    sidecar.wait_exit(Duration::from_secs(10)).await;

    // Blue changes rows already copied and rows not yet copied.
    let blue = pair.blue().await;
    blue.batch_execute(
        "UPDATE items SET name = 'changed' WHERE id % 1000 = 0;
         DELETE FROM items WHERE id % 997 = 0;
         INSERT INTO events VALUES ('2030-01-01', 'after the kill');",
    )
    .await
    .unwrap();
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("interrupted"),
        "the restart explains itself:\n{err}"
    );
    assert_same(&pair, &["items", "events"]).await;
    assert_eq!(count(&green, "events").await, 50_001, "no duplicate rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_copy_honours_publication_row_filters_and_column_lists() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE t (id bigint PRIMARY KEY, a text, secret text);
             INSERT INTO t SELECT g, 'a' || g, 'do not copy' FROM generate_series(1, 20) g;
             CREATE PUBLICATION test_pub FOR TABLE t (id, a) WHERE (id > 10);",
        )
        .unwrap();
    pair.green
        .psql(DB, "CREATE TABLE t (id bigint PRIMARY KEY, a text)")
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO t SELECT g, 'a' || g, 'no' FROM generate_series(21, 25) g;
         INSERT INTO t VALUES (0, 'filtered out', 'no');",
    )
    .await
    .unwrap();
    handle.drain().await.expect("drain");
    handle.wait().await.expect("pipeline ends");
    let green = pair.green().await;
    blue.batch_execute("CREATE VIEW f AS SELECT id, a FROM t WHERE id > 10")
        .await
        .unwrap();
    let want = rows(&blue, "f").await;
    assert_eq!(rows(&green, "t").await, want);
    assert_eq!(want.len(), 15);
}

/// SIGTERM during the copy stops at once (not after the copy), and the next run finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_the_copy_stops_promptly_and_the_next_run_finishes() {
    init_logging();
    let pair = Pair::start(PLAIN);
    pair.blue
        .psql(
            DB,
            "INSERT INTO items SELECT g, repeat('y', 200) || g, jsonb_build_object('g', g), g FROM generate_series(1, 400000) g;",
        )
        .unwrap();
    let dir = TestDir::new("snapshot-term");
    let cfg = write_config(
        &pair,
        &dir,
        free_addr(),
        "[snapshot]\nrange_pages = 64\nworkers = 1\n",
    );
    let mut sidecar = Sidecar::run(&dir, "first", &cfg);
    let green = pair.green().await;
    wait_for("a range copied", Duration::from_secs(60), || async {
        green
            .query_one("SELECT count(*) FROM shadowsync.copy_ranges", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= 1)
    })
    .await;
    sidecar.signal("TERM");
    let status = sidecar.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{}", sidecar.stderr_text());
    assert!(
        count(&green, "shadowsync.copy_state WHERE state = 'copying'").await >= 1,
        "stopped before the copy finished"
    );
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_same(&pair, &["items", "events"]).await;
}

/// `shadowsync_snapshot_rows_total` counts the rows written to green: for vms, what the rule's
/// filter kept of blue's virtual_machines (not blue's rows); for api_keys, copied as is in
/// binary, its rows (not one more for binary COPY's trailer). Every table's counter exists.
/// Then the drain report's duration counts from the drain's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_row_counters_count_the_rows_written_to_green() {
    init_logging();
    let (pair, config) = novacron();
    let mut blue = pair.blue().await;
    let mut rng = StdRng::seed_from_u64(seed("snapshot_counts"));
    novacron_workload(&mut blue, &mut rng, 600).await;
    let handle = start_streaming(config).await;
    let green = pair.green().await;
    let metrics = handle.shared.encode_text();
    for table in [
        "public.users",
        "public.compute_nodes",
        "public.vms",
        "public.api_keys",
    ] {
        let prefix = format!("shadowsync_snapshot_rows_total{{table=\"{table}\"}} ");
        let counted: i64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
            .parse()
            .expect("a count");
        assert_eq!(counted, count(&green, table).await, "{table}");
    }
    let (blue_vms, green_vms) = (
        count(&blue, "virtual_machines").await,
        count(&green, "public.vms").await,
    );
    assert!(
        blue_vms > green_vms,
        "the workload should leave deleted vms out of green ({blue_vms} on blue, {green_vms} on green)"
    );
    // The drain report's duration is the drain's, not the process's (which includes the copy).
    let asked = std::time::Instant::now();
    let report = handle.drain().await.expect("drain");
    assert!(
        report.duration_seconds <= asked.elapsed().as_secs_f64(),
        "the drain took {} s by its report, but was asked {:?} ago",
        report.duration_seconds,
        asked.elapsed()
    );
    handle.wait().await.expect("pipeline ends");
}
