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
async fn points_match(config: &shadowsync::config::Config, streamer: &shadowsync::streamer::Streamer) {
    for round in 0..5 {
        let point = shadowsync::verify::point::take(config, streamer)
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
        assert!(point.green_progress.is_some_and(|p| p <= point.lsn), "{:?} {}", point.green_progress, point.lsn);
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
    let writers: Vec<_> = (0..2).map(|_| writer(pair.blue.dsn(DB), stop.clone())).collect();
    let blue = pair.blue().await;
    wait_for("blue writes", Duration::from_secs(30), || async {
        count(&blue, "users").await > 200
    })
    .await;

    // Through the sidecar's admin endpoint, as `shadowsync verify` does.
    let sidecar = shadowsync::streamer::Streamer::find(&config).await.unwrap();
    assert!(matches!(sidecar, shadowsync::streamer::Streamer::Sidecar(_)));
    points_match(&config, &sidecar).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    handle.shutdown();
    handle.wait().await.unwrap();
}
