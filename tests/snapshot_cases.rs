//! Initial copy, harder cases (issue 12): partitioned tables in both publication modes (row
//! filters, column lists, rules, multi-level, leaves with another column order); interrupted
//! copies finished when green foreign keys reference the tables copied again (taken along, or
//! refused before anything is touched); and rows green rejects, named by key and column.

mod common;

use std::time::{Duration, Instant};

use common::novacron::*;
use common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

/// Every row a query returns, as text, sorted.
async fn query_rows(client: &Client, sql: &str) -> Vec<String> {
    rows(client, &format!("({sql})")).await
}

/// Asserts that blue's `want` (a query) and green's `got` (a query) give the same rows.
async fn assert_rows(blue: &Client, want: &str, green: &Client, got: &str) {
    let (w, g) = (query_rows(blue, want).await, query_rows(green, got).await);
    if w != g {
        let missing: Vec<_> = w.iter().filter(|r| !g.contains(r)).take(5).collect();
        let extra: Vec<_> = g.iter().filter(|r| !w.contains(r)).take(5).collect();
        panic!(
            "blue {want:?}: {} rows, green {got:?}: {} rows\nmissing in green: {missing:?}\nunexpected in green: {extra:?}",
            w.len(),
            g.len()
        );
    }
}

/// A config file for `pair` with publication `publication`, `extra` appended.
fn config_file(pair: &Pair, dir: &TestDir, publication: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "{}{extra}\n",
        shadowsync::cluster::pipeline_config_toml(
            &pair.blue,
            &pair.green,
            DB,
            "test_slot",
            publication,
            &free_addr().to_string()
        )
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    shadowsync::config::Config::load(&path).expect("the written config is valid");
    path
}

/// Waits for `cond` with a deadline; fails at once, with its log, if the sidecar exits.
async fn wait_while_running<F, Fut>(sidecar: &mut Sidecar, what: &str, deadline: Duration, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if let Some(status) = sidecar.exited() {
            panic!(
                "shadowsync exited ({status}) while waiting for {what}:\n{}",
                sidecar.stderr_text()
            );
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Partitioned tables.
// ---------------------------------------------------------------------------------------------

/// Blue: a partitioned table with a plain leaf, a leaf created separately with another column
/// order and attached, and a partition that is itself partitioned (only its leaves hold rows).
/// Keys divisible by 10 are left free for the writes of each case.
const BLUE_PARTITIONED: &str = "
CREATE TABLE t (a int PRIMARY KEY, b text, c text) PARTITION BY RANGE (a);
CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (1000);
CREATE TABLE t_2 (c text, b text, a int NOT NULL);
ALTER TABLE t ATTACH PARTITION t_2 FOR VALUES FROM (1000) TO (2000);
CREATE TABLE t_3 PARTITION OF t FOR VALUES FROM (2000) TO (4000) PARTITION BY RANGE (a);
CREATE TABLE t_3a PARTITION OF t_3 FOR VALUES FROM (2000) TO (3000);
CREATE TABLE t_3b PARTITION OF t_3 FOR VALUES FROM (3000) TO (4000);
INSERT INTO t SELECT g, 'b' || g, repeat('c', 100) || g FROM generate_series(1, 3999) g WHERE g % 10 <> 0;
CREATE PUBLICATION via_root FOR TABLE t WITH (publish_via_partition_root);
-- The leaf's own filter is ignored through the root, as by PostgreSQL's own initial sync.
CREATE PUBLICATION via_root_filtered FOR TABLE t (a, b) WHERE (a % 3 <> 0), t_1 WHERE (a > 500)
    WITH (publish_via_partition_root);
CREATE PUBLICATION via_root_rule FOR TABLE t WITH (publish_via_partition_root);
-- Without publish_via_partition_root each leaf is a published table (t_1 with its filter).
CREATE PUBLICATION leaves FOR TABLE t, t_1 WHERE (a > 500);
";

/// One case: the publication, the green database and its schema, the rule (if any), and what
/// green must hold (blue query, green query) after the copy and some streamed writes.
struct Case {
    publication: &'static str,
    database: &'static str,
    schema: &'static str,
    rule: Option<&'static str>,
    expect: &'static [(&'static str, &'static str)],
}

const CASES: [Case; 4] = [
    Case {
        publication: "via_root",
        database: "via_root",
        // Green partitions the table its own way.
        schema: "CREATE TABLE t (a int PRIMARY KEY, b text, c text) PARTITION BY RANGE (a);
                 CREATE TABLE t_lo PARTITION OF t FOR VALUES FROM (MINVALUE) TO (2500);
                 CREATE TABLE t_hi PARTITION OF t FOR VALUES FROM (2500) TO (MAXVALUE);",
        rule: None,
        expect: &[("SELECT * FROM t", "SELECT * FROM t")],
    },
    Case {
        publication: "via_root_filtered",
        database: "filtered",
        schema: "CREATE TABLE t (a int PRIMARY KEY, b text);",
        rule: None,
        expect: &[("SELECT a, b FROM t WHERE a % 3 <> 0", "SELECT * FROM t")],
    },
    Case {
        publication: "via_root_rule",
        database: "rule",
        schema: "CREATE TABLE t_green (a int PRIMARY KEY, b text, b_upper text, c text);",
        rule: Some(
            "[[table]]\nsource = \"public.t\"\ntarget = \"public.t_green\"\n[table.columns]\nb_upper = \"upper(src.b)\"\n",
        ),
        expect: &[("SELECT a, b, upper(b), c FROM t", "SELECT * FROM t_green")],
    },
    Case {
        publication: "leaves",
        database: "leaves",
        schema: "CREATE TABLE t (a int PRIMARY KEY, b text, c text) PARTITION BY RANGE (a);
                 CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (1000);
                 CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (1000) TO (2000);
                 CREATE TABLE t_3 PARTITION OF t FOR VALUES FROM (2000) TO (4000) PARTITION BY RANGE (a);
                 CREATE TABLE t_3a PARTITION OF t_3 FOR VALUES FROM (2000) TO (3000);
                 CREATE TABLE t_3b PARTITION OF t_3 FOR VALUES FROM (3000) TO (4000);",
        rule: None,
        expect: &[
            (
                "SELECT a, b, c FROM t_1 WHERE a > 500",
                "SELECT a, b, c FROM t_1",
            ),
            ("SELECT a, b, c FROM t_2", "SELECT a, b, c FROM t_2"),
            ("SELECT a, b, c FROM t_3a", "SELECT a, b, c FROM t_3a"),
            ("SELECT a, b, c FROM t_3b", "SELECT a, b, c FROM t_3b"),
        ],
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_tables_are_copied_from_their_leaves_in_both_publication_modes() {
    init_logging();
    let pair = Pair::start("");
    pair.blue.psql(DB, BLUE_PARTITIONED).unwrap();
    let blue = pair.blue().await;
    // What PostgreSQL 15 lists: the root alone through the root, with the root's filter and
    // column list; the leaves alone otherwise, each with its own.
    let listed: Vec<String> = blue
        .query(
        "SELECT pubname || ' ' || tablename || ' ' || attnames::text || ' ' || coalesce(rowfilter, '-')
           FROM pg_publication_tables WHERE pubname IN ('via_root_filtered', 'leaves') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        listed,
        [
            "leaves t_1 {a,b,c} (a > 500)",
            "leaves t_2 {c,b,a} -",
            "leaves t_3a {a,b,c} -",
            "leaves t_3b {a,b,c} -",
            "via_root_filtered t {a,b} ((a % 3) <> 0)",
        ]
    );
    let dir = TestDir::new("partitions");
    for (i, case) in CASES.iter().enumerate() {
        pair.green.create_database(case.database).unwrap();
        pair.green.psql(case.database, case.schema).unwrap();
        let mut config = pair.config();
        config.blue.publication = case.publication.into();
        config.blue.slot = format!("slot_{}", case.database);
        config.green.dsn = pair.green.dsn(case.database);
        // Small ranges: every leaf is split, ranges of different leaves copied at once.
        config.snapshot.range_pages = 2;
        config.snapshot.workers = 2;
        if let Some(rule) = case.rule {
            let path = dir.join(&format!("{}.toml", case.database));
            std::fs::write(&path, rule).unwrap();
            config.transforms.files = vec![path.display().to_string()];
        }
        let handle = start_streaming(config).await;
        let green = connect(&pair.green.dsn(case.database)).await;
        // The copy alone holds every row (streaming starts after it).
        for (want, got) in case.expect {
            assert_rows(&blue, want, &green, got).await;
        }
        // The stream goes on from the copy: new rows in every leaf, updates, deletes.
        blue.batch_execute(&format!(
            "INSERT INTO t SELECT g, 'new' || g, 'c' FROM generate_series(1, 3999) g WHERE g % 40 = {i} * 10;
             UPDATE t SET b = 'case {i}' WHERE a % 97 = {i};
             DELETE FROM t WHERE a % 101 = {i};"
        ))
        .await
        .unwrap();
        handle.drain().await.expect("drain");
        handle.wait().await.expect("pipeline ends");
        for (want, got) in case.expect {
            assert_rows(&blue, want, &green, got).await;
        }
        let ranges = count(&green, "shadowsync.copy_ranges").await;
        assert!(
            ranges > 4,
            "{}: leaves split into ranges ({ranges})",
            case.publication
        );
        assert_eq!(
            count(&green, "shadowsync.copy_state WHERE state <> 'done'").await,
            0
        );
        assert_no_conflicts(&green).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Interrupted copies and green foreign keys.
// ---------------------------------------------------------------------------------------------

/// Enough NovaCron rows that one worker with small ranges takes a while over `users`.
const NOVACRON_ROWS: &str = "
INSERT INTO users (id, email, name)
    SELECT g, 'u' || g || CASE g % 3 WHEN 0 THEN '@acme.example' WHEN 1 THEN '@globex.example' ELSE '@x.example' END,
           repeat('n', 120)
      FROM generate_series(1, 150000) g;
INSERT INTO hypervisors (id, hostname, status, type, capacity)
    SELECT g, 'hv' || g, 'active', 'kvm', '{\"cpu_cores\": 8, \"memory_mb\": 1024}' FROM generate_series(1, 100) g;
INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
    SELECT g, 'vm' || g, CASE WHEN g % 7 = 0 THEN 'deleted' ELSE 'running' END, g, 1 + g % 100,
           '{\"cpu_cores\": 2, \"memory_mb\": 2048, \"disk_gb\": 20}', '{\"ip_address\": \"10.0.0.1\"}'
      FROM generate_series(1, 20000) g;
INSERT INTO api_keys (id, user_id, key_hash) SELECT g, g, 'h' || g FROM generate_series(1, 3000) g;
";

/// The NovaCron pair with [`NOVACRON_ROWS`] on blue, `green_extra` run on green, and a config
/// file copying with one worker in small ranges (tables in the publication's order:
/// api_keys, hypervisors, users, then virtual_machines, whose rule reads users).
fn novacron_interruptible(green_extra: &str, dir: &TestDir) -> (Pair, std::path::PathBuf) {
    let (pair, _) = novacron();
    pair.blue.psql(DB, NOVACRON_ROWS).unwrap();
    if !green_extra.is_empty() {
        pair.green.psql(DB, green_extra).unwrap();
    }
    let rules = example("transforms/novacron.toml");
    let cfg = config_file(
        &pair,
        dir,
        "novacron_migration",
        &format!(
            "[transforms]\nfiles = [\"{}\"]\n[snapshot]\nrange_pages = 16\nworkers = 1\n",
            rules.display()
        ),
    );
    (pair, cfg)
}

/// Starts a copy and kills it (SIGKILL) once api_keys is copied and users partly.
async fn kill_while_users_are_copied(pair: &Pair, dir: &TestDir, cfg: &std::path::Path) {
    let mut sidecar = Sidecar::run(dir, "first", cfg);
    let green = pair.green().await;
    let partly = "SELECT (SELECT state FROM shadowsync.copy_state WHERE source_table = 'public.api_keys') = 'done'
                      AND (SELECT count(*) FROM shadowsync.copy_ranges WHERE source_table = 'public.users') >= 2";
    wait_while_running(
        &mut sidecar,
        "api_keys copied and users partly",
        Duration::from_secs(90),
        || async {
            green
                .query_one(partly, &[])
                .await
                .is_ok_and(|r| r.get::<_, Option<bool>>(0) == Some(true))
        },
    )
    .await;
    sidecar.kill();
    sidecar.wait_exit(Duration::from_secs(10)).await;
    // A COMMIT sent just before the kill may still land: wait until green has ended every
    // session of the killed process.
    wait_for("the killed sidecar's sessions to end", Duration::from_secs(30), || async {
        count(
            &green,
            "pg_stat_activity WHERE application_name LIKE 'shadowsync%' AND pid <> pg_backend_pid()",
        )
        .await
            == 0
    })
    .await;
    let users: String = green
        .query_one(
            "SELECT state FROM shadowsync.copy_state WHERE source_table = 'public.users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, "copying", "killed while users was being copied");
    assert!(
        count(&green, "users").await > 0,
        "users holds rows of the interrupted copy"
    );
}

/// Blue changes rows of every table after the kill: rows already copied and not yet copied.
const AFTER_KILL: &str = "
UPDATE users SET name = 'changed' WHERE id % 1000 = 0;
UPDATE api_keys SET key_hash = 'rotated' WHERE id % 10 = 0;
DELETE FROM api_keys WHERE id % 77 = 0;
INSERT INTO api_keys (id, user_id, key_hash) VALUES (100001, 140000, 'after the kill');
UPDATE virtual_machines SET status = 'deleted' WHERE id % 50 = 0;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_copy_takes_along_the_copied_tables_whose_foreign_keys_reference_it() {
    init_logging();
    let dir = TestDir::new("snapshot-fk");
    let (pair, cfg) = novacron_interruptible("", &dir);
    kill_while_users_are_copied(&pair, &dir, &cfg).await;
    pair.blue.psql(DB, AFTER_KILL).unwrap();

    // users and vms are copied again; api_keys (copied, and its key references users) comes
    // along, from the same snapshot.
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("interrupted"), "{err}");
    let dragged = err
        .lines()
        .find(|l| l.contains("foreign key") && l.contains("public.api_keys"))
        .unwrap_or_else(|| panic!("a warning names api_keys:\n{err}"));
    assert!(dragged.contains("api_keys_user_id_fkey"), "{dragged}");
    assert_matches_plan(&pair).await;
    let green = pair.green().await;
    assert_eq!(
        count(&green, "shadowsync.copy_state WHERE state <> 'done'").await,
        0
    );
    let lsns = count(
        &green,
        "(SELECT DISTINCT snapshot_lsn FROM shadowsync.copy_state
           WHERE source_table IN ('public.users', 'public.virtual_machines', 'public.api_keys')) s",
    )
    .await;
    assert_eq!(lsns, 1, "the re-copied tables come from one snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_green_only_table_referencing_a_table_to_empty_is_refused_before_anything_is_touched() {
    init_logging();
    let dir = TestDir::new("snapshot-fk-refused");
    // A green-only table: shadowsync never copies it, so it never empties it.
    let (pair, cfg) = novacron_interruptible(
        "CREATE TABLE user_notes (id bigint PRIMARY KEY, user_id bigint REFERENCES users (id), note text);",
        &dir,
    );
    // A fresh copy empties nothing (every target is empty), so the key is no obstacle.
    kill_while_users_are_copied(&pair, &dir, &cfg).await;
    let green = pair.green().await;
    let state = "SELECT string_agg(source_table || ' ' || state || ' ' || snapshot_lsn || ' ' || started_at, ', ' ORDER BY source_table) FROM shadowsync.copy_state";
    let before: String = green.query_one(state, &[]).await.unwrap().get(0);
    let users_before = count(&green, "users").await;

    let started = Instant::now();
    let (code, out, err) = run_bin(
        &[
            "run",
            "--drain",
            "--snapshot-truncate",
            "--config",
            cfg.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a permanent refusal, not retried"
    );
    for want in [
        "public.user_notes",
        "user_notes_user_id_fkey",
        "public.users",
        "Nothing was changed",
        "DROP CONSTRAINT",
        "ADD CONSTRAINT \"user_notes_user_id_fkey\" FOREIGN KEY (user_id) REFERENCES users(id)",
    ] {
        assert!(err.contains(want), "the refusal says {want:?}:\n{err}");
    }
    let after: String = green.query_one(state, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "copy state untouched");
    assert_eq!(
        count(&green, "users").await,
        users_before,
        "users untouched"
    );
    let blue = pair.blue().await;
    assert_eq!(
        count(&blue, "pg_replication_slots").await,
        1,
        "no snapshot slot was created"
    );

    // The operator's way out, as the message says: drop the key for the copy, add it back after.
    green
        .batch_execute("ALTER TABLE public.user_notes DROP CONSTRAINT user_notes_user_id_fkey")
        .await
        .unwrap();
    pair.blue.psql(DB, AFTER_KILL).unwrap();
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_matches_plan(&pair).await;
    green
        .batch_execute(
            "ALTER TABLE public.user_notes ADD CONSTRAINT user_notes_user_id_fkey FOREIGN KEY (user_id) REFERENCES users(id)",
        )
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Rows green rejects.
// ---------------------------------------------------------------------------------------------

const REJECTS_BLUE: &str = "
CREATE TABLE wide (id bigint PRIMARY KEY, code varchar(40), note text);
CREATE TABLE staged (id int, k int, n numeric, PRIMARY KEY (id, k));
CREATE TABLE loose (at timestamptz, code varchar(40));
ALTER TABLE loose REPLICA IDENTITY FULL;
CREATE PUBLICATION test_pub FOR TABLE wide, staged, loose;
INSERT INTO wide SELECT g, 'c' || g, repeat('w', 50) FROM generate_series(1, 4000) g;
INSERT INTO staged SELECT g / 4, g % 4, g FROM generate_series(1, 4000) g;
INSERT INTO loose SELECT '2026-01-01'::timestamptz + g * interval '1 minute', 'l' || g FROM generate_series(1, 4000) g;
";

/// Green: narrower columns than blue's (wide and loose copy directly, staged through staging).
const REJECTS_GREEN: &str = "
CREATE TABLE wide (id bigint PRIMARY KEY, code varchar(12), note text);
CREATE TABLE staged (id int, k int, n integer, PRIMARY KEY (id, k));
CREATE TABLE loose (at timestamptz, code varchar(12));
";

const SECRET: &str = "SECRET-VALUE-NEVER-PRINTED";
const SECRET_NUMBER: &str = "98765432109";

/// Plants one bad row per table, at random; returns what each table's error must say and the
/// fix on green that lets the next run go on.
async fn plant_bad_rows(
    blue: &Client,
    rng: &mut StdRng,
) -> Vec<(&'static str, Vec<String>, &'static str)> {
    let bad_wide: i64 = rng.random_range(1..=4000);
    let bad_staged: i32 = rng.random_range(1..=4000);
    let bad_loose: i32 = rng.random_range(1..=4000);
    blue.execute(
        "UPDATE wide SET code = $2 WHERE id = $1",
        &[&bad_wide, &SECRET],
    )
    .await
    .unwrap();
    blue.execute(
        &format!("UPDATE staged SET n = {SECRET_NUMBER} WHERE id = $1 / 4 AND k = $1 % 4"),
        &[&bad_staged],
    )
    .await
    .unwrap();
    let loose_ctid: String = blue
        .query_one(
            "UPDATE loose SET code = $2 WHERE code = 'l' || $1 RETURNING ctid::text",
            &[&bad_loose.to_string(), &SECRET],
        )
        .await
        .unwrap()
        .get(0);
    let too_long = "value too long for type character varying(12)";
    vec![
        (
            "public.wide",
            vec![
                format!("key (id)=({bad_wide})"),
                "column code".into(),
                too_long.into(),
                "22001".into(),
            ],
            "ALTER TABLE wide ALTER COLUMN code TYPE varchar(40)",
        ),
        (
            "public.staged",
            vec![
                format!("key (id, k)=({}, {})", bad_staged / 4, bad_staged % 4),
                "column n".into(),
                "integer out of range".into(),
                "22003".into(),
            ],
            "ALTER TABLE staged ALTER COLUMN n TYPE bigint",
        ),
        (
            "public.loose",
            // No key on green: located by its ctid on blue.
            vec![
                format!("ctid {loose_ctid} of blue table public.loose"),
                "column code".into(),
                too_long.into(),
            ],
            "ALTER TABLE loose ALTER COLUMN code TYPE varchar(40)",
        ),
    ]
}

/// A run that must stop at once on a rejected row; returns the error's line.
async fn rejected_run(cfg: &std::path::Path) -> String {
    let started = Instant::now();
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a permanent error, not retried:\n{err}"
    );
    assert!(
        !err.contains(SECRET) && !err.contains(SECRET_NUMBER),
        "row values leak:\n{err}"
    );
    let line = err
        .lines()
        .rev()
        .find(|l| l.contains("green rejects the row"))
        .unwrap_or_else(|| panic!("the error names the row:\n{err}"))
        .to_string();
    assert!(line.contains("run again"), "the next step:\n{line}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_green_rejects_is_named_by_key_and_column_and_stops_the_copy() {
    init_logging();
    let seed = seed("snapshot_rejects");
    let mut rng = StdRng::seed_from_u64(seed);
    let pair = Pair::start("");
    pair.blue.psql(DB, REJECTS_BLUE).unwrap();
    pair.green.psql(DB, REJECTS_GREEN).unwrap();
    let expected = plant_bad_rows(&pair.blue().await, &mut rng).await;
    let dir = TestDir::new("snapshot-rejects");
    // Small ranges: the bad row is somewhere inside one of many.
    let cfg = config_file(
        &pair,
        &dir,
        "test_pub",
        "[snapshot]\nrange_pages = 4\nworkers = 1\n",
    );
    let green = pair.green().await;
    let mut seen = Vec::new();
    // Each run stops at one table's bad row; fixing green's column lets the next run go on.
    for _ in 0..expected.len() {
        let line = rejected_run(&cfg).await;
        let (table, wants, fix) = expected
            .iter()
            .find(|(t, ..)| line.contains(&format!("blue table {t} with key")))
            .unwrap_or_else(|| panic!("which table? {line}"));
        for want in wants {
            assert!(line.contains(want.as_str()), "{want:?}: {line}");
        }
        assert!(!seen.contains(table), "{table} reported twice");
        seen.push(*table);
        green.batch_execute(fix).await.unwrap();
    }
    let (code, out, err) = run_bin(
        &["run", "--drain", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_same(&pair, &["wide", "staged", "loose"]).await;
}
