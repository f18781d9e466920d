//! `verify` on real PostgreSQL: the consistent point holds while blue keeps writing (blue's
//! snapshot and green's at one blue commit, row for row), through the running sidecar and
//! through a stream run by verify itself.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const SCHEMA: &str = "
CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE vms (id bigserial PRIMARY KEY, owner_id bigint NOT NULL, state text NOT NULL);
";

/// Multi-table transactions on blue until `stop`: a user and its VM, a change to an earlier
/// user, a VM deleted now and then.
fn writer(dsn: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let blue = connect(&dsn).await;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            blue.batch_execute(
                "BEGIN;
                 INSERT INTO users (email) VALUES ('u@x');
                 INSERT INTO vms (owner_id, state) VALUES (currval('users_id_seq'), 'creating');
                 UPDATE users SET n = n + 1 WHERE id = currval('users_id_seq') / 2;
                 DELETE FROM vms WHERE id = currval('vms_id_seq') / 3 AND currval('vms_id_seq') % 7 = 0;
                 COMMIT;",
            )
            .await
            .unwrap();
            n += 1;
        }
        n
    })
}

/// Points taken while blue writes: inside the two snapshots green holds exactly blue's rows.
async fn points_match(
    config: &shadowsync::config::Config,
    streamer: &shadowsync::streamer::Streamer,
) {
    for round in 0..5 {
        let sides = shadowsync::verify::point::connect(config).await.unwrap();
        let point = shadowsync::verify::point::take(config, streamer, sides)
            .await
            .unwrap();
        for t in ["users", "vms"] {
            let (b, g) = (rows(&point.blue, t).await, rows(&point.green, t).await);
            assert!(
                b == g,
                "round {round}, {t} at {}: blue has {} rows, green {}",
                point.lsn,
                b.len(),
                g.len()
            );
        }
        assert!(
            point.green_progress.is_some_and(|p| p <= point.lsn),
            "{:?} {}",
            point.green_progress,
            point.lsn
        );
        let held = point.hold_seconds.expect("the hold's length");
        assert!(held < 5.0, "held {held} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consistent_point_holds_while_blue_writes() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE users, vms")
        .unwrap();
    let mut config = pair.config();
    let handle = start_streaming(config.clone()).await;
    config.metrics.listen = handle.addr.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| writer(pair.blue.dsn(DB), stop.clone()))
        .collect();
    let blue = pair.blue().await;
    wait_for("blue writes", Duration::from_secs(30), || async {
        count(&blue, "users").await > 200
    })
    .await;

    // Through the sidecar's admin endpoint, as `shadowsync verify` does.
    let sidecar = shadowsync::streamer::Streamer::find(&config).await.unwrap();
    assert!(matches!(
        sidecar,
        shadowsync::streamer::Streamer::Sidecar(_)
    ));
    points_match(&config, &sidecar).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    handle.shutdown();
    handle.wait().await.unwrap();
}

async fn verify(config: &shadowsync::config::Config) -> shadowsync::verify::Report {
    let (_keep, stop) = shadowsync::shutdown::channel();
    let opts = shadowsync::verify::Options {
        timeout: Duration::from_secs(60),
        compare: shadowsync::verify::compare::Options {
            chunk_rows: 300,
            max_keys: 100,
        },
        ..Default::default()
    };
    shadowsync::verify::run(config, &opts, stop, &|_| {})
        .await
        .unwrap()
}

fn mapping<'a>(
    report: &'a shadowsync::verify::Report,
    target: &str,
) -> &'a shadowsync::verify::compare::MappingDiff {
    report
        .mappings
        .iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("no {target} in {report:#?}"))
}

/// NovaCron through its rules with two writers running: `verify` finds green equal at several
/// moments of the stream (the consistent point at work), then exactly the corruptions made
/// behind shadowsync's back on green: an updated row, a deleted one, an inserted one, a rule
/// target's column and a lookup-derived column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn novacron_verifies_while_streaming_and_finds_exactly_the_corruptions() {
    use shadowsync::demo::{preload_sql, workload_client};
    init_logging();
    let (pair, mut config) = common::novacron::novacron();
    pair.blue.psql(DB, &preload_sql(2000)).unwrap();
    let handle = start_streaming(config.clone()).await;
    config.metrics.listen = handle.addr.to_string();
    let (stop_writers, stopped) = shadowsync::shutdown::channel();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (dsn, stop, written) = (pair.blue.dsn(DB), stopped.clone(), written.clone());
            tokio::spawn(async move { workload_client(&dsn, w, stop, written).await.unwrap() })
        })
        .collect();
    for round in 0..3 {
        let w = written.clone();
        let at_least = 100 * (round + 1);
        wait_for("blue writes", Duration::from_secs(30), || async {
            w.load(Ordering::Relaxed) > at_least
        })
        .await;
        let report = verify(&config).await;
        assert!(report.equal, "round {round}:\n{}", report.text());
        assert_eq!(report.mappings.len(), 4, "{}", report.text());
    }

    // Behind shadowsync's back, on rows the workload never touches (the preloaded ones).
    let green = pair.green().await;
    green
        .batch_execute(
            "UPDATE users SET name = 'changed on green' WHERE id = 1;
             DELETE FROM api_keys WHERE id = 2;
             INSERT INTO api_keys (id, user_id, key_hash, created_at) VALUES (999999, 3, 'x', now());
             UPDATE vms SET state = 'error' WHERE id = 3;
             UPDATE vms SET tenant_id = '00000000-0000-0000-0000-000000000003' WHERE id = 4 AND tenant_id <> '00000000-0000-0000-0000-000000000003';
             UPDATE vms SET tenant_id = '00000000-0000-0000-0000-000000000002' WHERE id = 4 AND tenant_id = '00000000-0000-0000-0000-000000000003';",
        )
        .await
        .unwrap();
    let report = verify(&config).await;
    assert!(!report.equal, "{}", report.text());
    let users = mapping(&report, "public.users");
    assert_eq!(users.differing.len(), 1, "{}", report.text());
    assert_eq!(users.differing[0].key, "(id)=(1)");
    assert_eq!(users.differing[0].columns, vec!["name".to_string()]);
    let keys = mapping(&report, "public.api_keys");
    assert_eq!(
        keys.missing_in_green,
        vec!["(id)=(2)".to_string()],
        "{}",
        report.text()
    );
    assert_eq!(
        keys.extra_in_green,
        vec!["(id)=(999999)".to_string()],
        "{}",
        report.text()
    );
    let vms = mapping(&report, "public.vms");
    let got: Vec<(String, Vec<String>)> = vms
        .differing
        .iter()
        .map(|d| (d.key.clone(), d.columns.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("(id)=(3)".to_string(), vec!["state".to_string()]),
            ("(id)=(4)".to_string(), vec!["tenant_id".to_string()]),
        ],
        "{}",
        report.text()
    );
    assert!(mapping(&report, "public.compute_nodes").equal());
    assert!(
        !report.text().contains("changed on green"),
        "no values in the report"
    );

    stop_writers.fire();
    for w in writers {
        w.await.unwrap();
    }
    handle.shutdown();
    handle.wait().await.unwrap();
}

/// A partitioned table (blue's published through its root, green's partitioned differently)
/// and a keyless one (compared as multisets): equal after the sync, then a row deleted from a
/// green partition and a keyless row duplicated on green are found; standalone (no sidecar:
/// verify runs the stream itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_and_keyless_tables_verify_standalone() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (500);
             CREATE TABLE m_high PARTITION OF m FOR VALUES FROM (500) TO (MAXVALUE);
             CREATE TABLE log (a int, b text);
             ALTER TABLE log REPLICA IDENTITY FULL;
             INSERT INTO m SELECT g, 'v' || g FROM generate_series(1, 1000) g;
             INSERT INTO log SELECT g % 10, 'same' FROM generate_series(1, 100) g;
             CREATE PUBLICATION test_pub FOR TABLE m, log WITH (publish_via_partition_root = true);",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY HASH (id);
             CREATE TABLE m_0 PARTITION OF m FOR VALUES WITH (MODULUS 2, REMAINDER 0);
             CREATE TABLE m_1 PARTITION OF m FOR VALUES WITH (MODULUS 2, REMAINDER 1);
             CREATE TABLE log (a int, b text);",
        )
        .unwrap();
    let handle = start_streaming(pair.config()).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "UPDATE m SET v = 'moved' WHERE id = 10; INSERT INTO log VALUES (1, 'same'), (2, 'other');",
    )
    .await
    .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();

    // No sidecar runs: verify streams itself to its point.
    let report = verify(&pair.config()).await;
    assert!(report.equal, "{}", report.text());
    let green = pair.green().await;
    green
        .batch_execute("DELETE FROM m WHERE id = 700; INSERT INTO log VALUES (2, 'other');")
        .await
        .unwrap();
    let report = verify(&pair.config()).await;
    assert!(!report.equal, "{}", report.text());
    let m = mapping(&report, "public.m");
    assert_eq!(
        m.missing_in_green,
        vec!["(id)=(700)".to_string()],
        "{}",
        report.text()
    );
    assert_eq!(m.differing_count + m.extra_count, 0, "{}", report.text());
    let log = mapping(&report, "public.log");
    assert_eq!(
        (log.missing_count, log.extra_count),
        (0, 1),
        "{}",
        report.text()
    );
}
