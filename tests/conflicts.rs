//! Conflicts with rows changed on green while blue streams: last-writer-wins on a column and on
//! blue's commit time, "apply" resolution, the `shadowsync.conflicts` record, the metric, the
//! drain report, and `shadowsync conflicts` (listing and replay).

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);
CREATE TABLE plain (id bigint PRIMARY KEY, v text);
CREATE PUBLICATION test_pub FOR TABLE items, notes, plain;
";

/// Green-only: notes keep blue's commit time; green's own writers stamp it with a trigger
/// (which the apply session, in replica role, does not fire).
const GREEN_NOTES: &str = "
ALTER TABLE notes ADD COLUMN shadowsync_commit_time timestamptz;
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.shadowsync_commit_time := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION stamp();
";

const RULES: &str = r#"
[[table]]
source = "public.notes"
lww_column = "commit_time"
"#;

async fn caught_up(pair: &Pair) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    let target = wal_insert_lsn(&blue).await;
    wait_for("green to catch up", Duration::from_secs(60), || async {
        progress_lsn(&green, "test_slot")
            .await
            .is_some_and(|l| l >= target)
    })
    .await;
}

/// Rows of `SELECT cols FROM table` as text, by id.
async fn by_id(green: &Client, cols: &str, table: &str) -> Vec<String> {
    green
        .query(
            &format!("SELECT ROW({cols})::text FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// (kind, resolution, key, incoming is null, existing is null) of every record, by id.
async fn records(green: &Client, table: &str) -> Vec<(String, String, String, bool, bool)> {
    green
        .query(
            "SELECT kind, resolution, key::text, incoming IS NULL, existing IS NULL
               FROM shadowsync.conflicts WHERE target_table = $1 ORDER BY id",
            &[&table],
        )
        .await
        .expect("read conflicts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

fn rec(
    kind: &str,
    resolution: &str,
    id: i64,
    no_incoming: bool,
    no_existing: bool,
) -> (String, String, String, bool, bool) {
    (
        kind.into(),
        resolution.into(),
        format!("{{\"id\": {id}}}"),
        no_incoming,
        no_existing,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_writes_meet_lww_apply_and_commit_time() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.green.psql(DB, GREEN_NOTES).unwrap();
    let dir = TestDir::new("conflicts");
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    let config_path = write_config(
        &pair,
        &dir,
        free_addr(),
        "[transforms]\nfiles = [\"rules.toml\"]\n",
    );
    let config = shadowsync::config::Config::load(&config_path).unwrap();
    let blue = pair.blue().await;
    let green = pair.green().await;

    let handle = start_streaming(config.clone()).await;
    blue.batch_execute(
        "INSERT INTO items SELECT g, 'blue-' || g, '2026-01-01' FROM generate_series(1, 6) g;
         INSERT INTO notes SELECT g, 'note-' || g FROM generate_series(1, 3) g;
         INSERT INTO plain SELECT g, 'v' || g FROM generate_series(1, 3) g;",
    )
    .await
    .unwrap();
    caught_up(&pair).await;
    assert_eq!(
        count(&green, "shadowsync.conflicts").await,
        0,
        "no interference, no conflicts"
    );

    // A second client writes to green.
    green
        .batch_execute(
            "UPDATE items SET name = 'green-newer', updated_at = '2030-01-01' WHERE id = 1;
             UPDATE items SET name = 'green-older', updated_at = '2026-06-01' WHERE id = 2;
             DELETE FROM items WHERE id = 3;
             UPDATE items SET updated_at = '2030-01-01' WHERE id = 4;
             DELETE FROM items WHERE id = 5;
             INSERT INTO items VALUES (10, 'green-first', '2026-01-01'), (11, 'green-newer', '2030-01-01'),
                                      (12, 'same', '2027-01-01');
             INSERT INTO plain VALUES (10, 'green');
             DELETE FROM plain WHERE id = 1;",
        )
        .await
        .unwrap();
    blue.batch_execute(
        "UPDATE items SET name = 'blue-2027', updated_at = '2027-01-01' WHERE id IN (1, 2, 3, 6);
         DELETE FROM items WHERE id IN (4, 5);
         INSERT INTO items VALUES (10, 'blue', '2027-01-01'), (11, 'blue', '2027-01-01'), (12, 'same', '2027-01-01');
         INSERT INTO plain VALUES (10, 'blue');
         UPDATE plain SET v = 'blue' WHERE id = 1;",
    )
    .await
    .unwrap();
    caught_up(&pair).await;

    assert_eq!(
        by_id(&green, "id, name, updated_at", "items").await,
        vec![
            "(1,green-newer,\"2030-01-01 00:00:00+00\")",
            "(2,blue-2027,\"2027-01-01 00:00:00+00\")",
            "(3,blue-2027,\"2027-01-01 00:00:00+00\")",
            "(4,blue-4,\"2030-01-01 00:00:00+00\")",
            "(6,blue-2027,\"2027-01-01 00:00:00+00\")",
            "(10,blue,\"2027-01-01 00:00:00+00\")",
            "(11,green-newer,\"2030-01-01 00:00:00+00\")",
            "(12,same,\"2027-01-01 00:00:00+00\")",
        ]
    );
    let mut items = records(&green, "public.items").await;
    items.sort();
    let mut expected = vec![
        rec("update_older", "keep", 1, false, false),
        rec("update_missing", "apply", 3, false, true),
        rec("delete_older", "keep", 4, true, false),
        rec("delete_missing", "apply", 5, true, true),
        rec("insert_exists", "apply", 10, false, false),
        rec("insert_older", "keep", 11, false, false),
    ];
    expected.sort();
    assert_eq!(items, expected);
    // No lww column on `plain`: blue wins, and both disagreements are recorded.
    assert_eq!(
        by_id(&green, "id, v", "plain").await,
        vec!["(1,blue)", "(2,v2)", "(3,v3)", "(10,blue)"]
    );
    let mut plain = records(&green, "public.plain").await;
    plain.sort();
    assert_eq!(
        plain,
        vec![
            rec("insert_exists", "apply", 10, false, false),
            rec("update_missing", "apply", 1, false, true),
        ]
    );
    // Both versions are kept in the record.
    let (incoming, existing): (String, String) = {
        let r = green
            .query_one(
                "SELECT incoming->>'name', existing->>'name' FROM shadowsync.conflicts
                  WHERE target_table = 'public.items' AND kind = 'update_older'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (incoming.as_str(), existing.as_str()),
        ("blue-2027", "green-newer")
    );
    let lsn_ok: bool = green
        .query_one(
            "SELECT bool_and(commit_lsn > '0/0' AND commit_time > '2026-01-01') FROM shadowsync.conflicts",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(lsn_ok, "records carry blue's commit LSN and time");

    let metrics = handle.shared.encode();
    for line in [
        "shadowsync_conflicts_total{table=\"public.items\",kind=\"update_older\",resolution=\"keep\"} 1",
        "shadowsync_conflicts_total{table=\"public.items\",kind=\"insert_exists\",resolution=\"apply\"} 1",
        "shadowsync_conflicts_total{table=\"public.items\",kind=\"delete_older\",resolution=\"keep\"} 1",
        "shadowsync_conflicts_total{table=\"public.plain\",kind=\"update_missing\",resolution=\"apply\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    // New keys are written with a plain INSERT; meeting green's rows 10 (items) and 10 (plain)
    // failed it once per table, the batch was written again with upserts, and those tables stay
    // on upserts: a third green-side key costs no further switch. A switch is not an error.
    for switch in [
        "shadowsync_apply_switches_total{table=\"public.items\",switch=\"upserts_only\"} 1",
        "shadowsync_apply_switches_total{table=\"public.plain\",switch=\"upserts_only\"} 1",
    ] {
        assert!(metrics.contains(switch), "missing {switch} in\n{metrics}");
    }
    assert!(errors_counted(&metrics).is_empty(), "{metrics}");
    green
        .batch_execute("INSERT INTO items VALUES (20, 'green', '2026-01-01')")
        .await
        .unwrap();
    blue.batch_execute("INSERT INTO items VALUES (20, 'blue', '2027-01-01')")
        .await
        .unwrap();
    caught_up(&pair).await;
    assert_eq!(
        by_id(&green, "id, name", "items WHERE id = 20").await,
        vec!["(20,blue)"]
    );
    let metrics = handle.shared.encode();
    let once = "shadowsync_apply_switches_total{table=\"public.items\",switch=\"upserts_only\"} 1";
    assert!(metrics.contains(once), "missing {once} in\n{metrics}");
    assert!(
        metrics.contains("shadowsync_conflicts_total{table=\"public.items\",kind=\"insert_exists\",resolution=\"apply\"} 2"),
        "{metrics}"
    );

    // Commit-time lww: blue changes note 1 while shadowsync is stopped, then green changes it
    // (stamped later by its trigger): green's version is newer and stays. Note 2 changes on
    // green first, then on blue: blue's commit is later and wins.
    green
        .batch_execute("UPDATE notes SET body = 'green-first' WHERE id = 2")
        .await
        .unwrap();
    let report = handle.drain().await.expect("drain");
    assert_eq!(report.conflicts["public.items"]["update_older"], 1);
    handle.wait().await.expect("pipeline ends");
    blue.batch_execute(
        "UPDATE notes SET body = 'blue-then-green' WHERE id = 1;
         UPDATE notes SET body = 'blue-later' WHERE id = 2;",
    )
    .await
    .unwrap();
    green
        .batch_execute("UPDATE notes SET body = 'green-later' WHERE id = 1")
        .await
        .unwrap();
    let handle = start_streaming(config.clone()).await;
    caught_up(&pair).await;
    assert_eq!(
        by_id(&green, "id, body", "notes").await,
        vec!["(1,green-later)", "(2,blue-later)", "(3,note-3)"]
    );
    assert_eq!(
        records(&green, "public.notes").await,
        vec![rec("update_older", "keep", 1, false, false)]
    );
    let stamped: bool = green
        .query_one(
            "SELECT bool_and(shadowsync_commit_time IS NOT NULL) FROM notes",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stamped, "every note carries a commit time");
    handle.shutdown();
    handle.wait().await.expect("pipeline ends");

    // The command lists them, and replays blue's version of the kept rows.
    let cfg = config_path.to_str().unwrap();
    let (code, out, err) = run_bin(&["conflicts", "--config", cfg], Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{err}");
    for word in [
        "update_older",
        "insert_exists",
        "delete_older",
        "public.items",
        "(10 conflicts)",
    ] {
        assert!(out.contains(word), "missing {word} in\n{out}");
    }
    let (code, out, _) = run_bin(
        &[
            "conflicts",
            "--config",
            cfg,
            "--table",
            "public.notes",
            "--since",
            "1h",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("(1 conflicts)"), "{out}");
    let id = |kind: &'static str, table: &'static str| {
        let green = &green;
        async move {
            green
                .query_one(
                    "SELECT id FROM shadowsync.conflicts WHERE kind = $1 AND target_table = $2",
                    &[&kind, &table],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (older, deleted, note) = (
        id("update_older", "public.items").await,
        id("delete_older", "public.items").await,
        id("update_older", "public.notes").await,
    );
    let ids = [older.to_string(), deleted.to_string(), note.to_string()];
    let (code, out, err) = run_bin(
        &[
            "conflicts",
            "--config",
            cfg,
            "--replay",
            &ids[0],
            &ids[1],
            &ids[2],
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&format!("conflict {older}: upsert")), "{out}");
    assert!(
        out.contains(&format!("conflict {deleted}: delete")),
        "{out}"
    );
    assert_eq!(
        by_id(&green, "id, name, updated_at", "items").await[..2],
        [
            "(1,blue-2027,\"2027-01-01 00:00:00+00\")",
            "(2,blue-2027,\"2027-01-01 00:00:00+00\")",
        ]
    );
    assert_eq!(count(&green, "items WHERE id = 4").await, 0);
    assert_eq!(
        by_id(&green, "id, body", "notes").await[0],
        "(1,blue-then-green)"
    );
    let resolved: i64 = green
        .query_one(
            "SELECT count(*) FROM shadowsync.conflicts WHERE resolved_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(resolved, 3);
    // Replaying again changes nothing.
    let (code, out, _) = run_bin(
        &["conflicts", "--config", cfg, "--replay", &ids[0]],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("already resolved"), "{out}");
}

/// Blue's own concurrency is not a conflict: a transaction that started earlier (older
/// `now()`) can commit a row's last version after a later-started one. Green must follow blue's
/// commit order, whatever the timestamps say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_timestamps_committed_later_on_blue_still_win() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let config = pair.config();
    let blue = pair.blue().await;
    let early = pair.blue().await;
    let green = pair.green().await;
    let handle = start_streaming(config).await;
    blue.batch_execute("INSERT INTO items VALUES (7, 'first', now())")
        .await
        .unwrap();
    caught_up(&pair).await;
    // `early` starts first: its now() is older than the update committed in between.
    early.batch_execute("BEGIN; SELECT 1").await.unwrap();
    blue.batch_execute("UPDATE items SET name = 'later-start', updated_at = now() WHERE id = 7")
        .await
        .unwrap();
    caught_up(&pair).await;
    early
        .batch_execute(
            "UPDATE items SET name = 'earlier-start', updated_at = now() WHERE id = 7; COMMIT",
        )
        .await
        .unwrap();
    caught_up(&pair).await;
    assert_same(&pair, &["items"]).await;
    assert_eq!(
        by_id(&green, "id, name", "items").await,
        vec!["(7,earlier-start)"]
    );
    handle.shutdown();
    handle.wait().await.expect("pipeline ends");
}

const EDGES: &str = "
CREATE TABLE vms (id bigint PRIMARY KEY, status text NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE docs (id bigint PRIMARY KEY, body text, version bigint NOT NULL);
CREATE TABLE prices (code numeric(10,2) PRIMARY KEY, v text);
CREATE PUBLICATION test_pub FOR TABLE vms, docs, prices;
";

const EDGE_RULES: &str = r#"
[[table]]
source = "public.vms"
filter = "status <> 'deleted'"

[[table]]
source = "public.docs"
lww_column = "version"
"#;

/// A filtered table still records update_older; a version counter as lww column compares
/// versions (deletes apply: blue wins); keys rounded by their column type are no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_version_counters_and_rounded_keys() {
    init_logging();
    let pair = Pair::start(EDGES);
    let dir = TestDir::new("conflict-edges");
    std::fs::write(dir.join("rules.toml"), EDGE_RULES).unwrap();
    let config_path = write_config(
        &pair,
        &dir,
        free_addr(),
        "[transforms]\nfiles = [\"rules.toml\"]\n",
    );
    let config = shadowsync::config::Config::load(&config_path).unwrap();
    let blue = pair.blue().await;
    let green = pair.green().await;
    let handle = start_streaming(config).await;
    blue.batch_execute(
        "INSERT INTO vms VALUES (1, 'running', '2026-01-01'), (2, 'running', '2026-01-01');
         INSERT INTO docs VALUES (1, 'v1', 1), (2, 'v1', 1);
         INSERT INTO prices VALUES (1.555, 'a'), (2.001, 'b');",
    )
    .await
    .unwrap();
    caught_up(&pair).await;
    blue.batch_execute("UPDATE prices SET v = 'a2' WHERE code = 1.56")
        .await
        .unwrap();
    caught_up(&pair).await;
    assert_no_conflicts(&green).await;

    green
        .batch_execute(
            "UPDATE vms SET status = 'green', updated_at = '2030-01-01' WHERE id = 1;
             UPDATE docs SET body = 'green', version = 5 WHERE id = 1;",
        )
        .await
        .unwrap();
    blue.batch_execute(
        "UPDATE vms SET status = 'stopped', updated_at = '2027-01-01' WHERE id = 1;
         UPDATE docs SET body = 'blue', version = 2 WHERE id IN (1, 2);
         DELETE FROM docs WHERE id = 1;",
    )
    .await
    .unwrap();
    caught_up(&pair).await;
    handle.shutdown();
    handle.wait().await.expect("pipeline ends");
    assert_eq!(
        by_id(&green, "id, status", "vms").await,
        vec!["(1,green)", "(2,running)"]
    );
    // No commit time to compare with a version: blue's delete applies.
    assert_eq!(
        by_id(&green, "id, body, version", "docs").await,
        vec!["(2,blue,2)"]
    );
    assert_eq!(
        records(&green, "public.vms").await,
        vec![rec("update_older", "keep", 1, false, false)]
    );
    assert!(records(&green, "public.prices").await.is_empty());
}
