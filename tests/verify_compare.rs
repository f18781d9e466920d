//! The comparison engine of `verify` on real PostgreSQL: tables synced by the real pipeline
//! compare equal (identity mappings of many types, the NovaCron rules, a keyless table), and
//! every corruption made on green afterwards is found, exactly: the key, and the columns.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::novacron::{novacron, novacron_workload};
use common::*;
use rand::SeedableRng;
use shadowsync::config::Config;
use shadowsync::transform::TableMap;
use shadowsync::verify::compare::{MappingDiff, Options, compare};
use tokio_postgres::Client;

/// The published tables' mappings, as `check` obtains them, grouped by target.
async fn mappings(config: &Config) -> BTreeMap<String, Vec<Arc<TableMap>>> {
    let (blue, green) = sessions(config).await;
    let rules = config.rules().expect("rules");
    let publication = &config.blue.publication;
    let tables = shadowsync::source::catalog::check_blue(&blue, publication)
        .await
        .expect("blue's publication");
    let report = shadowsync::check::check(&blue, &green, &tables, publication, &rules)
        .await
        .expect("check");
    assert!(report.ok(), "check: {}", report.problems_text());
    let mut out: BTreeMap<String, Vec<Arc<TableMap>>> = BTreeMap::new();
    for m in report.mappings.iter().filter_map(|m| m.map.clone()) {
        out.entry(m.target.name.clone()).or_default().push(m);
    }
    out
}

/// Connections as shadowsync opens them (its session settings).
async fn sessions(config: &Config) -> (Client, Client) {
    let (blue, _) = config
        .blue_dsn()
        .unwrap()
        .connect("verify-test")
        .await
        .unwrap();
    let (green, _) = config
        .green_dsn()
        .unwrap()
        .connect("verify-test")
        .await
        .unwrap();
    (blue, green)
}

/// Compares every target in snapshots taken now (nothing streams meanwhile).
async fn compare_all(config: &Config, opts: &Options) -> BTreeMap<String, MappingDiff> {
    let maps = mappings(config).await;
    let (blue, green) = sessions(config).await;
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ";
    blue.batch_execute(begin).await.unwrap();
    green.batch_execute(begin).await.unwrap();
    let mut out = BTreeMap::new();
    for (target, maps) in maps {
        let diff = compare(&blue, &green, &maps, opts, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("compare {target}: {e}"));
        out.insert(target, diff);
    }
    blue.batch_execute("COMMIT").await.unwrap();
    green.batch_execute("COMMIT").await.unwrap();
    out
}

fn assert_equal(diffs: &BTreeMap<String, MappingDiff>) {
    for (t, d) in diffs {
        assert!(d.equal(), "{t} differs: {d:#?}");
        assert_eq!(d.rows_blue, d.rows_green, "{t}");
    }
}

fn keys(ids: &[i64]) -> Vec<String> {
    ids.iter().map(|i| format!("(id)=({i})")).collect()
}

/// `(key, columns)` of each differing key.
fn differing(d: &MappingDiff) -> Vec<(String, Vec<String>)> {
    d.differing
        .iter()
        .map(|x| (x.key.clone(), x.columns.clone()))
        .collect()
}

fn diff_of(key: &str, columns: &[&str]) -> (String, Vec<String>) {
    (
        key.to_string(),
        columns.iter().map(|c| c.to_string()).collect(),
    )
}

async fn sync(pair: &Pair, config: Config, writes: &str) {
    let handle = start_streaming(config).await;
    pair.blue.psql(DB, writes).unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
}

const KINDS: &str = "
CREATE TABLE kinds (
    id int PRIMARY KEY, big bigint, num numeric, txt text, arr int[], doc jsonb, ts timestamptz,
    span tstzrange, bin bytea, toast text, f8 float8, flag boolean, day date
);
CREATE TABLE widened (id int PRIMARY KEY, name text, amount numeric(10,2));";

const KINDS_ROWS: &str = "
INSERT INTO kinds
SELECT g, g * 10000000000, g / 7.0, CASE WHEN g % 5 = 0 THEN NULL WHEN g % 5 = 1 THEN ''
       ELSE E'it''s \"q\"\\nline ' || g END,
       ARRAY[g, NULL, -g], jsonb_build_object('g', g, 'a', ARRAY['x', 'y'], 'n', NULL),
       '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 hour 0.123456 second',
       tstzrange('2026-01-01', '2026-01-01'::timestamptz + g * interval '1 day', '[)'),
       decode(md5(g::text), 'hex'),
       CASE WHEN g % 4 = 3 THEN (SELECT string_agg(md5((g * 10000 + i)::text), '') FROM generate_series(1, 3200) i) END,
       g / 3.0::float8, g % 2 = 0, DATE '2026-01-01' + g
  FROM generate_series(1, 60) g;
INSERT INTO widened SELECT g, 'name ' || g, g / 4.0 FROM generate_series(1, 40) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_of_many_types_compares_equal_and_finds_each_corruption() {
    init_logging();
    let pair = Pair::start(KINDS);
    // Green widens the types: the same text for ids and names (hashed on blue), another scale
    // for amounts (evaluated in green as the apply writes them).
    pair.green
        .psql(
            DB,
            "ALTER TABLE widened ALTER id TYPE bigint, ALTER name TYPE varchar(100),
             ALTER amount TYPE numeric(12,3)",
        )
        .unwrap();
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE kinds, widened")
        .unwrap();
    pair.blue.psql(DB, KINDS_ROWS).unwrap();
    // Streamed after the initial copy: more rows, and updates leaving TOASTed values unchanged.
    let writes = "INSERT INTO kinds (id, txt, toast) SELECT g, 'late', repeat(md5(g::text), 4000)
                    FROM generate_series(100, 110) g;
                  UPDATE kinds SET f8 = -f8 WHERE id IN (3, 7, 100);
                  UPDATE widened SET amount = amount * 2 WHERE id % 3 = 0;";
    sync(&pair, pair.config(), writes).await;
    let opts = Options {
        chunk_rows: 16,
        max_keys: 100,
    };
    let diffs = compare_all(&pair.config(), &opts).await;
    assert_equal(&diffs);
    assert_eq!(diffs["kinds"].rows_blue, 71);
    assert!(diffs["kinds"].chunks >= 4, "{:?}", diffs["kinds"]);
    assert_eq!(diffs["widened"].rows_green, 40);

    pair.green
        .psql(
            DB,
            "UPDATE kinds SET toast = overlay(toast PLACING 'Z' FROM 50000 FOR 1) WHERE id = 3;
             UPDATE kinds SET txt = '' WHERE id = 10;
             UPDATE kinds SET arr = ARRAY[8, NULL, -8], span = NULL WHERE id = 9;
             DELETE FROM kinds WHERE id = 5;
             INSERT INTO kinds (id) VALUES (1000);
             UPDATE widened SET amount = amount + 0.001 WHERE id = 2;",
        )
        .unwrap();
    let diffs = compare_all(&pair.config(), &opts).await;
    let k = &diffs["kinds"];
    assert_eq!(
        differing(k),
        vec![
            diff_of("(id)=(3)", &["toast"]),
            diff_of("(id)=(9)", &["arr", "span"]),
            diff_of("(id)=(10)", &["txt"]),
        ],
        "{k:#?}"
    );
    assert_eq!(k.missing_in_green, keys(&[5]));
    assert_eq!(k.extra_in_green, keys(&[1000]));
    assert_eq!(
        (k.missing_count, k.extra_count, k.differing_count),
        (1, 1, 3)
    );
    let w = &diffs["widened"];
    assert_eq!(
        differing(w),
        vec![diff_of("(id)=(2)", &["amount"])],
        "{w:#?}"
    );
    assert!(!w.equal() && !k.equal());
}

const VM_ROWS: &str = "
INSERT INTO users (id, email, name) VALUES (10001, 'fixed@acme.example', 'Fixed');
INSERT INTO hypervisors (id, hostname, status, type, capacity)
VALUES (10001, 'hv-fixed', 'active', 'kvm', '{\"cpu_cores\": 8, \"memory_mb\": 1024}');
INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
VALUES (10001, 'vm-a', 'running', 10001, 10001, '{\"cpu_cores\": 2}', '{\"ip_address\": \"10.1.1.1\"}'),
       (10002, 'vm-b', 'stopped', 10001, 10001, '{}', NULL),
       (10003, 'vm-gone', 'deleted', 10001, 10001, '{}', NULL);
INSERT INTO api_keys (id, user_id, key_hash) VALUES (10001, 10001, 'h');";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn novacron_rules_compare_equal_and_each_corruption_is_found() {
    init_logging();
    let (pair, config) = novacron();
    pair.blue.psql(DB, VM_ROWS).unwrap();
    let handle = start_streaming(config.clone()).await;
    let mut blue = pair.blue().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("novacron_compare"));
    novacron_workload(&mut blue, &mut rng, 300).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let opts = Options {
        chunk_rows: 50,
        max_keys: 100,
    };
    let diffs = compare_all(&config, &opts).await;
    assert_eq!(
        diffs.keys().collect::<Vec<_>>(),
        ["api_keys", "compute_nodes", "users", "vms"]
    );
    assert_equal(&diffs);
    let blue_vms = count(&blue, "virtual_machines WHERE status <> 'deleted'").await;
    assert_eq!(diffs["vms"].rows_blue, blue_vms as u64);

    pair.green
        .psql(
            DB,
            "UPDATE users SET name = 'changed' WHERE id = 10001;
             DELETE FROM api_keys WHERE id = 10001;
             INSERT INTO compute_nodes (id, name, hostname, status, created_at, updated_at)
             VALUES (20000, 'x', 'x-host', 'online', now(), now());
             UPDATE vms SET state = 'paused' WHERE id = 10001;
             UPDATE vms SET tenant_id = '00000000-0000-0000-0000-000000000003' WHERE id = 10002;
             INSERT INTO vms (id, name, state, tenant_id, created_at, updated_at)
             VALUES (10003, 'vm-gone', 'error', '00000000-0000-0000-0000-000000000001', now(), now());",
        )
        .unwrap();
    let diffs = compare_all(&config, &opts).await;
    assert_eq!(
        differing(&diffs["users"]),
        vec![diff_of("(id)=(10001)", &["name"])]
    );
    assert_eq!(diffs["api_keys"].missing_in_green, keys(&[10001]));
    assert_eq!(diffs["compute_nodes"].extra_in_green, keys(&[20000]));
    let vms = &diffs["vms"];
    assert_eq!(
        differing(vms),
        vec![
            diff_of("(id)=(10001)", &["state"]),
            diff_of("(id)=(10002)", &["tenant_id"]),
        ],
        "{vms:#?}"
    );
    assert_eq!(
        vms.extra_in_green,
        keys(&[10003]),
        "a filtered-out VM in green"
    );
    for (t, d) in &diffs {
        let found = d.missing_count + d.extra_count + d.differing_count;
        let want = if t == "vms" { 3 } else { 1 };
        assert_eq!(found, want, "{t}: {d:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_tables_compare_as_multisets() {
    init_logging();
    let pair = Pair::start(
        "CREATE TABLE events (kind text, n int, at timestamptz);
         ALTER TABLE events REPLICA IDENTITY FULL;",
    );
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE events")
        .unwrap();
    pair.blue
        .psql(
            DB,
            "INSERT INTO events SELECT 'k' || (g % 3), g % 50, '2026-01-01' FROM generate_series(1, 200) g;",
        )
        .unwrap();
    sync(
        &pair,
        pair.config(),
        "INSERT INTO events VALUES ('late', 1, NULL), ('late', 1, NULL), ('', NULL, NULL);",
    )
    .await;
    let opts = Options::default();
    let diffs = compare_all(&pair.config(), &opts).await;
    assert_equal(&diffs);
    assert_eq!(diffs["events"].rows_blue, 203);

    pair.green
        .psql(
            DB,
            "INSERT INTO events VALUES ('late', 1, NULL);
             DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE n = 7 LIMIT 1);
             UPDATE events SET kind = NULL WHERE kind = '';",
        )
        .unwrap();
    let d = &compare_all(&pair.config(), &opts).await["events"];
    // The duplicate and the NULL for '' are rows green has in excess; the deleted row and ''
    // are missing.
    assert_eq!((d.extra_count, d.missing_count), (2, 2), "{d:#?}");
    assert_eq!((d.extra_in_green.len(), d.missing_in_green.len()), (2, 2));
    assert!(d.extra_in_green.iter().all(|h| h.starts_with("(row hash ")));
    assert_eq!(d.rows_green, 203);
}

const MANY: &str = "
CREATE TABLE wide (id bigint PRIMARY KEY, a text, b int, c timestamptz, d jsonb);
CREATE TABLE pairs (region text, n int, v text, PRIMARY KEY (region, n));
CREATE TABLE ruled (id bigint PRIMARY KEY, status text NOT NULL, v int);";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_chunks_are_bisected_to_every_scattered_corruption() {
    init_logging();
    let pair = Pair::start(MANY);
    // Green's `ruled_g` is written by a rule with a filter: evaluated in green, chunk by chunk.
    pair.green
        .psql(
            DB,
            "CREATE TABLE ruled_g (id bigint PRIMARY KEY, status text NOT NULL, v2 int);",
        )
        .unwrap();
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE wide, pairs, ruled",
        )
        .unwrap();
    pair.blue
        .psql(
            DB,
            "INSERT INTO wide SELECT g, 'a' || g, g % 1000, '2026-01-01'::timestamptz + g * interval '1 min',
                    jsonb_build_object('g', g) FROM generate_series(1, 50000) g;
             INSERT INTO pairs SELECT r, g, 'v' || g FROM unnest(ARRAY['eu', 'Us', 'ap', 'us-east']) r,
                    generate_series(1, 1500) g;
             INSERT INTO ruled SELECT g, CASE WHEN g % 10 = 0 THEN 'gone' ELSE 'live' END, g
               FROM generate_series(1, 20000) g;",
        )
        .unwrap();
    let dir = TestDir::new("verify-many");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[table]]\nsource = \"public.ruled\"\ntarget = \"public.ruled_g\"\nfilter = \"status <> 'gone'\"\n[table.columns]\nstatus = \"upper(status)\"\nv2 = \"v * 2\"\n",
    )
    .unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    sync(
        &pair,
        config.clone(),
        "UPDATE wide SET b = -b WHERE id % 997 = 0;",
    )
    .await;
    let opts = Options {
        chunk_rows: 1000,
        max_keys: 100,
    };
    let diffs = compare_all(&config, &opts).await;
    assert_equal(&diffs);
    assert!(diffs["wide"].chunks >= 50, "{:?}", diffs["wide"]);
    assert_eq!(diffs["ruled_g"].rows_blue, 18000);

    scattered_corruptions_are_found(&pair, &config).await;
}

/// Ten corruptions across `wide`'s 50 chunks, two in `pairs` (a composite key with text), three
/// in `ruled_g` (a rule with a filter): each found, exactly.
async fn scattered_corruptions_are_found(pair: &Pair, config: &Config) {
    let opts = Options {
        chunk_rows: 1000,
        max_keys: 100,
    };
    pair.green
        .psql(
            DB,
            "UPDATE wide SET a = 'x' WHERE id = 17;
             UPDATE wide SET b = b + 1, d = '{}' WHERE id = 4003;
             UPDATE wide SET c = c + interval '1 microsecond' WHERE id = 31999;
             UPDATE wide SET a = NULL WHERE id = 49999;
             DELETE FROM wide WHERE id IN (1, 25000, 50000);
             INSERT INTO wide (id) VALUES (0), (70000), (-5);
             UPDATE pairs SET v = 'changed' WHERE region = 'Us' AND n = 700;
             DELETE FROM pairs WHERE region = 'us-east' AND n = 1500;
             UPDATE ruled_g SET v2 = 0 WHERE id = 12345;
             INSERT INTO ruled_g VALUES (20, 'GONE', 40);
             DELETE FROM ruled_g WHERE id = 19999;",
        )
        .unwrap();
    let diffs = compare_all(config, &opts).await;
    let w = &diffs["wide"];
    assert_eq!(
        differing(w),
        vec![
            diff_of("(id)=(17)", &["a"]),
            diff_of("(id)=(4003)", &["b", "d"]),
            diff_of("(id)=(31999)", &["c"]),
            diff_of("(id)=(49999)", &["a"]),
        ]
    );
    assert_eq!(w.missing_in_green, keys(&[1, 25000, 50000]));
    assert_eq!(w.extra_in_green, keys(&[-5, 0, 70000]));
    let p = &diffs["pairs"];
    assert_eq!(differing(p), vec![diff_of("(region, n)=(Us, 700)", &["v"])]);
    assert_eq!(p.missing_in_green, vec!["(region, n)=(us-east, 1500)"]);
    let r = &diffs["ruled_g"];
    assert_eq!(differing(r), vec![diff_of("(id)=(12345)", &["v2"])]);
    assert_eq!(r.extra_in_green, keys(&[20]), "filtered out on blue");
    assert_eq!(r.missing_in_green, keys(&[19999]));

    // Lists stop at max_keys; the counts go on.
    let few = Options {
        chunk_rows: 1000,
        max_keys: 1,
    };
    let w = &compare_all(config, &few).await["wide"];
    assert_eq!((w.differing.len(), w.differing_count), (1, 4));
    assert_eq!((w.missing_in_green.len(), w.missing_count), (1, 3));
}

/// Throughput on 1M rows of 11 columns, identity and through rules (release build):
/// `cargo test --release --test verify_compare -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput_on_a_million_rows() {
    init_logging();
    let rows: i64 = std::env::var("VERIFY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let schema = "CREATE TABLE w1 (
        id bigint PRIMARY KEY, name text NOT NULL, descr text, doc jsonb,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, n integer,
        status text, ratio double precision, flag boolean, tag text);";
    let pair = Pair::start(schema);
    let load = format!(
        "INSERT INTO w1 SELECT g, 'name-' || g, 'preloaded row', jsonb_build_object('g', g),
                '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00', g, 'active', g / 7.0,
                g % 2 = 0, 'tag-' || (g % 10)
           FROM generate_series(1, {rows}) g"
    );
    for c in [&pair.blue, &pair.green] {
        c.psql(DB, &load).unwrap();
        c.psql(DB, "VACUUM ANALYZE w1").unwrap();
    }
    // The rule's target, loaded with what the rule gives: three columns computed, a filter.
    pair.green
        .psql(
            DB,
            "CREATE TABLE w1r (LIKE w1 INCLUDING ALL);
             INSERT INTO w1r SELECT id, name, descr, doc, created_at, updated_at, n * 2,
                    upper(status), ratio, flag, tag || '!' FROM w1 WHERE n % 10 <> 0;",
        )
        .unwrap();
    pair.green.psql(DB, "VACUUM ANALYZE w1r").unwrap();
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE w1")
        .unwrap();
    let opts = Options::default();
    let identity = timed(&pair.config(), &opts).await;
    println!(
        "identity: {} rows in {:.2} s: {:.0} rows/s ({} chunks)",
        identity.rows_blue,
        identity.seconds,
        identity.rows_blue as f64 / identity.seconds,
        identity.chunks
    );
    let dir = TestDir::new("verify-throughput");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[table]]\nsource = \"public.w1\"\ntarget = \"public.w1r\"\nfilter = \"n % 10 <> 0\"\n[table.columns]\nn = \"n * 2\"\nstatus = \"upper(status)\"\ntag = \"tag || '!'\"\n",
    )
    .unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    let ruled = timed(&config, &opts).await;
    println!(
        "rules: {} blue rows in {:.2} s: {:.0} rows/s ({} chunks)",
        rows,
        ruled.seconds,
        rows as f64 / ruled.seconds,
        ruled.chunks
    );
    // A lookup per row, as NovaCron's tenants: an index probe into another green table.
    pair.green
        .psql(
            DB,
            "CREATE TABLE labels (id int PRIMARY KEY, label text NOT NULL);
             INSERT INTO labels SELECT g, 'label-' || g FROM generate_series(0, 99) g;
             CREATE TABLE w1l (LIKE w1 INCLUDING ALL);
             INSERT INTO w1l SELECT id, name, descr, doc, created_at, updated_at, n, status, ratio,
                    flag, 'label-' || (n % 100) FROM w1;",
        )
        .unwrap();
    pair.green.psql(DB, "VACUUM ANALYZE w1l").unwrap();
    std::fs::write(
        &rules,
        "[[table]]\nsource = \"public.w1\"\ntarget = \"public.w1l\"\n[table.columns]\ntag = \"(SELECT l.label FROM labels l WHERE l.id = src.n % 100)\"\n",
    )
    .unwrap();
    let looked_up = timed(&config, &opts).await;
    println!(
        "rule with a lookup: {} rows in {:.2} s: {:.0} rows/s",
        rows,
        looked_up.seconds,
        rows as f64 / looked_up.seconds
    );
}

async fn timed(config: &Config, opts: &Options) -> MappingDiff {
    let started = Instant::now();
    let diffs = compare_all(config, opts).await;
    let (_, d) = diffs.into_iter().next().expect("one target");
    assert!(d.equal(), "{d:#?}");
    eprintln!(
        "(with the snapshots: {:.2} s)",
        started.elapsed().as_secs_f64()
    );
    d
}

const PATHS_BLUE: &str = "
CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (500);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (500) TO (1000);
CREATE TABLE shifted (id bigint PRIMARY KEY, v int);
CREATE TABLE logs (kind text, n int);
ALTER TABLE logs REPLICA IDENTITY FULL;
CREATE TABLE only_some (id int PRIMARY KEY, keep bool NOT NULL);
ALTER TABLE only_some REPLICA IDENTITY FULL;
-- Without publish_via_partition_root each leaf is published as a table of its own.
CREATE PUBLICATION test_pub FOR TABLE parted, shifted, logs, only_some WHERE (keep);";

const PATHS_GREEN: &str = "
CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY HASH (id);
CREATE TABLE parted_h0 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE parted_h1 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE shifted_g (id bigint PRIMARY KEY, v int);
CREATE TABLE logs_g (kind text, n int);
CREATE TABLE only_some (id int PRIMARY KEY, keep bool NOT NULL);";

const PATHS_RULES: &str = "
[[table]]
source = \"public.parted_1\"
target = \"public.parted\"
[[table]]
source = \"public.parted_2\"
target = \"public.parted\"
[[table]]
source = \"public.shifted\"
target = \"public.shifted_g\"
[table.columns]
id = \"id + 1000000\"
[[table]]
source = \"public.logs\"
target = \"public.logs_g\"
[table.columns]
n = \"n * 10\"
";

/// The other ways a target's rows are compared: blue's leaves into green's partitioned
/// table (two mappings, one target), a key the rule computes (every row evaluated in green
/// first), a keyless rule, and the publication's row filter; progress and errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaves_computed_keys_keyless_rules_and_row_filters() {
    init_logging();
    let pair = Pair::start("");
    pair.blue.psql(DB, PATHS_BLUE).unwrap();
    pair.green.psql(DB, PATHS_GREEN).unwrap();
    let dir = TestDir::new("verify-paths");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, PATHS_RULES).unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    // Two blue tables write `parted`, which the initial copy refuses: everything is streamed.
    config.snapshot.mode = shadowsync::config::SnapshotMode::Never;
    sync(
        &pair,
        config.clone(),
        "INSERT INTO parted SELECT g, 'v' || g FROM generate_series(1, 999) g;
         INSERT INTO shifted SELECT g, g FROM generate_series(1, 3000) g;
         INSERT INTO logs SELECT 'k' || (g % 4), g % 30 FROM generate_series(1, 300) g;
         INSERT INTO only_some SELECT g, g % 2 = 0 FROM generate_series(1, 100) g;
         UPDATE parted SET v = 'late' WHERE id IN (3, 600); INSERT INTO logs VALUES ('k1', 1);
         UPDATE shifted SET v = -v WHERE id % 100 = 0;",
    )
    .await;
    let opts = Options {
        chunk_rows: 300,
        max_keys: 10,
    };
    let diffs = compare_all(&config, &opts).await;
    assert_equal(&diffs);
    assert_eq!(diffs["parted"].source, "public.parted_1, public.parted_2");
    let rows: Vec<u64> = ["parted", "shifted_g", "logs_g", "only_some"]
        .iter()
        .map(|t| diffs[*t].rows_blue)
        .collect();
    assert_eq!(rows, [999, 3000, 301, 50]);

    progress_hears_every_row(&config, &opts).await;
    pair.green
        .psql(
            DB,
            "UPDATE parted SET v = 'x' WHERE id = 700;
             DELETE FROM shifted_g WHERE id = 1000005;
             UPDATE shifted_g SET v = 0 WHERE id = 1002000;
             INSERT INTO logs_g VALUES ('k1', 10);
             INSERT INTO only_some VALUES (1, false);",
        )
        .unwrap();
    let diffs = compare_all(&config, &opts).await;
    assert_eq!(
        differing(&diffs["parted"]),
        vec![diff_of("(id)=(700)", &["v"])]
    );
    let s = &diffs["shifted_g"];
    assert_eq!(s.missing_in_green, keys(&[1000005]));
    assert_eq!(differing(s), vec![diff_of("(id)=(1002000)", &["v"])]);
    assert_eq!(
        (diffs["logs_g"].extra_count, diffs["logs_g"].missing_count),
        (1, 0)
    );
    assert_eq!(
        diffs["only_some"].extra_in_green,
        keys(&[1]),
        "filtered out by the publication"
    );

    null_computed_keys_are_missing(&config, &opts).await;
    failures_name_side_and_table(&pair, &config, &opts).await;
}

/// Progress hears every row compared, chunk by chunk.
async fn progress_hears_every_row(config: &Config, opts: &Options) {
    let maps = mappings(config).await;
    let (blue, green) = sessions(config).await;
    for c in [&blue, &green] {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
    }
    let heard = std::sync::atomic::AtomicU64::new(0);
    let tick = |n: u64| {
        heard.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    };
    let d = compare(&blue, &green, &maps["shifted_g"], opts, &tick)
        .await
        .unwrap();
    assert_eq!(heard.into_inner(), 3000);
    assert!(d.chunks >= 10, "{d:?}");
    for c in [&blue, &green] {
        c.batch_execute("COMMIT").await.unwrap();
    }
}

/// Failures name the side, the table and what the server said; a connection outside a
/// snapshot is refused.
async fn failures_name_side_and_table(pair: &Pair, config: &Config, opts: &Options) {
    let maps = mappings(config).await;
    let (blue, green) = sessions(config).await;
    let err = compare(&blue, &green, &maps["only_some"], opts, &|_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("blue's connection is not inside a REPEATABLE READ"),
        "{err}"
    );
    pair.green
        .psql(DB, "ALTER TABLE only_some RENAME TO only_some_gone")
        .unwrap();
    for c in [&blue, &green] {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
    }
    let err = compare(&blue, &green, &maps["only_some"], opts, &|_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("green, public.only_some, ") && err.contains("does not exist"),
        "{err}"
    );
}

/// A rule whose key comes out NULL for a blue row: the row cannot be in green, it is missing
/// under a NULL key.
async fn null_computed_keys_are_missing(config: &Config, opts: &Options) {
    let dir = TestDir::new("verify-null-keys");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        PATHS_RULES.replace("id + 1000000", "nullif(id, 5) + 1000000"),
    )
    .unwrap();
    let mut config = config.clone();
    config.transforms.files = vec![rules.display().to_string()];
    let d = &compare_all(&config, opts).await["shifted_g"];
    assert_eq!(d.missing_in_green, ["(id)=(NULL)"], "{d:#?}");
    // Green's row 1000005, which the NULL stands for, was deleted above: nothing is extra.
    assert_eq!((d.missing_count, d.extra_count), (1, 0));
    assert_eq!(differing(d), vec![diff_of("(id)=(1002000)", &["v"])]);
    assert_eq!(d.rows_blue, 3000);
}
