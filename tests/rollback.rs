//! Rollback on real PostgreSQL (issue 19): the NovaCron migration cut over with a reverse
//! stream, the application writing on green, the reverse stream carrying it back through the
//! inverse rules, then the rollback (a cutover of the reverse config); the reverse slot is there
//! before green is reported ready; shadowsync's own writes never come back (replication
//! origins), including both streams running at once.

mod common;

use std::time::Duration;

use common::novacron::*;
use common::*;
use rand::SeedableRng;
use shadowsync::config::{Config, ReverseConfig, SnapshotMode};
use shadowsync::cutover::{self, Options};
use shadowsync::origin::Mark;

const REVERSE_SLOT: &str = "rollback_slot";
const REVERSE_PUB: &str = "rollback_pub";

/// The forward config with marking on and the reverse stream prepared by its cutover.
fn forward(mut config: Config) -> Config {
    config.origin.mark = Mark::On;
    config.reverse = Some(ReverseConfig {
        slot: REVERSE_SLOT.into(),
        publication: REVERSE_PUB.into(),
        tables: Vec::new(),
    });
    config
}

/// The reverse config: green -> blue, from the slot the forward cutover made, nothing copied.
fn reverse(pair: &Pair, rules: Option<&str>) -> Config {
    let mut config = shadowsync::cluster::pipeline_config(
        &pair.green,
        &pair.blue,
        DB,
        REVERSE_SLOT,
        REVERSE_PUB,
    );
    if let Some(rules) = rules {
        config.transforms.files = vec![example(rules).display().to_string()];
    }
    config.snapshot.mode = SnapshotMode::Never;
    config.origin.mark = Mark::On;
    config.conflicts.resolution = shadowsync::config::Resolution::Apply;
    config
}

fn opts() -> Options {
    Options {
        max_lag: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
        ..Options::default()
    }
}

/// Waits until the pipeline has applied `n` transactions in all.
async fn wait_applied(handle: &shadowsync::pipeline::Handle, what: &str, n: u64) {
    wait_for(what, Duration::from_secs(60), || async {
        handle.shared.applied().transactions >= n
    })
    .await;
}

/// Green's final state through the inverse rules (`transforms/novacron-reverse.toml`), as blue
/// should hold it, on the lossless columns only: statuses are compared by what they mean on
/// green (the forward rule's classes), everything else as is.
const GREEN_INVERSE: [(&str, &str); 4] = [
    (
        "users",
        "SELECT ROW(id, email, name, created_at, updated_at)::text FROM users ORDER BY id",
    ),
    (
        "hypervisors",
        "SELECT ROW(id, hostname,
                    CASE (CASE status WHEN 'online' THEN 'active' WHEN 'offline' THEN 'inactive' ELSE 'maintenance' END)
                      WHEN 'active' THEN 'online' WHEN 'inactive' THEN 'offline' ELSE 'maintenance' END,
                    hypervisor_type, jsonb_build_object('cpu_cores', cpu_cores, 'memory_mb', memory_total),
                    created_at, updated_at)::text
           FROM compute_nodes ORDER BY id",
    ),
    (
        "virtual_machines",
        "SELECT ROW(id, name,
                    CASE WHEN state::text IN ('creating', 'running', 'stopped', 'paused', 'migrating') THEN state::text ELSE 'error' END,
                    owner_id, node_id,
                    jsonb_build_object('cpu_cores', cpu_cores, 'memory_mb', memory_mb, 'disk_gb', disk_size_gb),
                    CASE WHEN ip_address IS NULL THEN NULL ELSE jsonb_build_object('ip_address', abbrev(ip_address)) END,
                    created_at, updated_at)::text
           FROM vms ORDER BY id",
    ),
    (
        "api_keys",
        "SELECT ROW(id, user_id, key_hash, created_at)::text FROM api_keys ORDER BY id",
    ),
];

/// Blue's rows on the same columns, statuses by the forward rule's classes; VMs the forward
/// filter keeps out of green (`deleted`) are left out.
const BLUE_LOSSLESS: [&str; 4] = [
    "SELECT ROW(id, email, name, created_at, updated_at)::text FROM users ORDER BY id",
    "SELECT ROW(id, hostname,
                CASE status WHEN 'active' THEN 'online' WHEN 'inactive' THEN 'offline' ELSE 'maintenance' END,
                type, capacity, created_at, updated_at)::text
       FROM hypervisors ORDER BY id",
    "SELECT ROW(id, name,
                CASE WHEN status IN ('creating', 'running', 'stopped', 'paused', 'migrating') THEN status ELSE 'error' END,
                owner_id, hypervisor_id, resources, network_config, created_at, updated_at)::text
       FROM virtual_machines WHERE status <> 'deleted' ORDER BY id",
    "SELECT ROW(id, user_id, key_hash, created_at)::text FROM api_keys ORDER BY id",
];

async fn texts(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .expect("read rows")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

async fn assert_blue_is_inverse_of_green(pair: &Pair) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    for ((table, inverse), lossless) in GREEN_INVERSE.iter().zip(BLUE_LOSSLESS) {
        let want = texts(&green, inverse).await;
        let got = texts(&blue, lossless).await;
        if want != got {
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            panic!(
                "{table}: the inverse of green gives {} rows, blue has {}\nmissing on blue: {missing:?}\nunexpected on blue: {extra:?}",
                want.len(),
                got.len()
            );
        }
    }
}

/// The application on green after the cutover: one statement group per transaction; returns
/// how many transactions it committed.
async fn application_on_green(green: &tokio_postgres::Client) -> u64 {
    let acme = "00000000-0000-0000-0000-000000000002";
    let globex = "00000000-0000-0000-0000-000000000003";
    let txns = [
        // Inserts without ids, one of each table, in one transaction.
        format!(
            "INSERT INTO users (email, name, tenant_id, created_at, updated_at)
               VALUES ('new@acme.example', 'New', '{acme}', now(), now());
             INSERT INTO compute_nodes (name, hostname, status, cpu_cores, memory_total, hypervisor_type, created_at, updated_at)
               VALUES ('hv-new', 'hv-new', 'online', 32, 131072, 'kvm', now(), now());
             INSERT INTO vms (name, state, cpu_cores, memory_mb, disk_size_gb, node_id, tenant_id, owner_id, ip_address, created_at, updated_at)
               VALUES ('vm-new', 'running', 4, 8192, 80, currval('compute_nodes_id_seq'), '{acme}',
                       currval(pg_get_serial_sequence('users', 'id')), '192.168.7.9', now(), now());
             INSERT INTO api_keys (user_id, key_hash, created_at)
               VALUES (currval(pg_get_serial_sequence('users', 'id')), 'new-hash', now());"
        ),
        // A second VM without an IP address.
        format!(
            "INSERT INTO vms (name, state, cpu_cores, memory_mb, disk_size_gb, node_id, tenant_id, owner_id, created_at, updated_at)
               VALUES ('vm-new-2', 'creating', 1, 512, 10, (SELECT min(id) FROM compute_nodes), '{acme}', NULL, now(), now())"
        ),
        // Updates.
        "UPDATE vms SET state = 'stopped', cpu_cores = cpu_cores + 1, updated_at = now()
          WHERE id = (SELECT min(id) FROM vms)"
            .to_string(),
        "UPDATE compute_nodes SET status = 'offline', memory_total = 262144, updated_at = now()
          WHERE id = (SELECT max(id) FROM compute_nodes WHERE name <> 'hv-new')"
            .to_string(),
        "UPDATE vms SET ip_address = '10.9.9.9', updated_at = now() WHERE id = (SELECT max(id) FROM vms WHERE name = 'vm-new')"
            .to_string(),
        // Deletes.
        "DELETE FROM api_keys WHERE id = (SELECT min(id) FROM api_keys)".to_string(),
        "DELETE FROM vms WHERE id = (SELECT max(id) FROM vms WHERE name NOT LIKE 'vm-new%')"
            .to_string(),
        // A user moving tenant (blue has no tenants: only updated_at comes back).
        format!(
            "UPDATE users SET tenant_id = '{globex}', updated_at = now() WHERE id = (SELECT min(id) FROM users)"
        ),
    ];
    for sql in &txns {
        green
            .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
            .await
            .unwrap_or_else(|e| panic!("the application's write on green failed: {e:?}\n{sql}"));
    }
    txns.len() as u64
}

/// Blue's next id of each table is past green's greatest (the sequences were carried back).
async fn assert_blue_sequences_past_green(pair: &Pair) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    for (b, g) in [
        ("users", "users"),
        ("hypervisors", "compute_nodes"),
        ("virtual_machines", "vms"),
        ("api_keys", "api_keys"),
    ] {
        let green_max: i64 = green
            .query_one(&format!("SELECT coalesce(max(id), 0) FROM {g}"), &[])
            .await
            .unwrap()
            .get(0);
        let green_seq: i64 = green
            .query_one(
                &format!("SELECT last_value FROM {}", green_sequence(&green, g).await),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let next: i64 = blue
            .query_one(
                &format!("SELECT nextval(pg_get_serial_sequence('{b}', 'id'))"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            next > green_max && next > green_seq,
            "{b}: blue's next id {next} is not past green's {g} (max id {green_max}, sequence {green_seq})"
        );
    }
}

async fn green_sequence(green: &tokio_postgres::Client, table: &str) -> String {
    green
        .query_one(
            &format!("SELECT pg_get_serial_sequence('{table}', 'id')"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn novacron_rolls_back_with_every_green_write_and_no_echo() {
    init_logging();
    let (pair, config) = novacron();
    let config = forward(config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("rollback"));
    let mut blue = pair.blue().await;
    novacron_workload(&mut blue, &mut rng, 60).await;

    // Forward: initial copy, then the stream, then the cutover with the reverse stream.
    let handle = start_streaming(config.clone()).await;
    novacron_workload_from(&mut blue, &mut rng, 60, 60).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // The workload gives explicit ids; an application's sequences would be past them.
    blue.batch_execute(
        "SELECT setval(pg_get_serial_sequence(t, 'id'), (SELECT max(id) FROM users) + 1000)
           FROM unnest(ARRAY['users', 'hypervisors', 'virtual_machines', 'api_keys']) AS t",
    )
    .await
    .unwrap();
    let report = cutover::run(&config, &opts()).await.unwrap();
    assert!(report.cut_over, "{report:?}");
    let prepared = report
        .reverse
        .clone()
        .expect("the report names the reverse slot");
    assert_eq!(prepared.slot, REVERSE_SLOT);
    assert!(prepared.publication_created);
    assert!(prepared.start_lsn > shadowsync::lsn::Lsn::ZERO);
    assert!(
        report.next_steps.iter().any(|s| s.contains(REVERSE_SLOT)),
        "{:?}",
        report.next_steps
    );
    assert_matches_plan(&pair).await;

    // The application on green, then the reverse stream carries it to blue.
    let green = pair.green().await;
    let app_txns = application_on_green(&green).await;
    let reverse_config = reverse(&pair, Some("transforms/novacron-reverse.toml"));
    // The inverse rules pass `check` against the live schemas, and say how writes are marked.
    let checked = shadowsync::check::command(&reverse_config).await.unwrap();
    assert!(checked.ok(), "{}", checked.problems_text());
    assert_eq!(checked.mappings.len(), 4);
    assert!(
        checked
            .notes
            .join("\n")
            .contains("marked with replication origin shadowsync_rollback_slot"),
        "{:?}",
        checked.notes
    );
    let back = start_streaming(reverse_config.clone()).await;
    wait_applied(&back, "the reverse stream", app_txns).await;
    let applied = back.shared.applied();
    assert_eq!(
        applied.transactions, app_txns,
        "each green transaction applied once on blue: {applied:?}"
    );
    assert_eq!(
        applied.echoes_skipped, 0,
        "the forward stream wrote nothing after the reverse slot"
    );
    back.shutdown();
    back.wait().await.unwrap();

    // Rollback: the cutover of the reverse config.
    let rollback = cutover::run(&reverse_config, &opts()).await.unwrap();
    assert!(rollback.cut_over, "{rollback:?}");
    assert_eq!(
        rollback.fence_lifted_on_green.len(),
        5,
        "blue's forward fence is lifted as blue becomes the application's: {rollback:?}"
    );
    assert_blue_is_inverse_of_green(&pair).await;
    assert_blue_sequences_past_green(&pair).await;
    let refused = green
        .batch_execute("DELETE FROM api_keys")
        .await
        .expect_err("green is fenced after the rollback");
    assert_eq!(refused.code().map(|c| c.code()), Some("25006"));
    blue.batch_execute("INSERT INTO users (email, name) VALUES ('back@acme.example', 'Back')")
        .await
        .expect("blue takes the application's writes again, without ids");

    // The forward sidecar started again (reset, green's fence lifted): the reverse stream's
    // writes into blue carry its origin and are skipped; only the new blue write goes forward.
    let before: Vec<Vec<String>> = {
        let mut all = Vec::new();
        for t in ["users", "compute_nodes", "vms", "api_keys"] {
            all.push(rows(&green, t).await);
        }
        all
    };
    shadowsync::reset::reset(&config, Default::default())
        .await
        .unwrap();
    shadowsync::fence::remove(&green).await.unwrap();
    let again = start_streaming(config.clone()).await;
    wait_applied(&again, "the forward stream, again", 1).await;
    wait_for(
        "the reverse stream's writes skipped",
        Duration::from_secs(30),
        || async { again.shared.applied().echoes_skipped > 0 },
    )
    .await;
    let applied = again.shared.applied();
    assert_eq!(
        applied.transactions, 1,
        "only blue's new write went forward: {applied:?}"
    );
    let users = rows(&green, "users").await;
    assert_eq!(users.len(), before[0].len() + 1);
    assert!(users.iter().any(|u| u.contains("back@acme.example")));
    for (i, t) in ["compute_nodes", "vms", "api_keys"].iter().enumerate() {
        assert_eq!(
            rows(&green, t).await,
            before[i + 1],
            "{t} unchanged on green: no echo"
        );
    }
    again.shutdown();
    again.wait().await.unwrap();
}

const SIMPLE: &str = "
CREATE TABLE items (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text NOT NULL);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reverse_slot_exists_before_green_is_reported_ready() {
    init_logging();
    let pair = Pair::start(SIMPLE);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE items;
             INSERT INTO items (v) SELECT 'blue' FROM generate_series(1, 100);",
        )
        .unwrap();
    let config = forward(pair.config());
    let handle = start_streaming(config.clone()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    let report = cutover::run(&config, &opts()).await.unwrap();
    // The instant the report arrives, the application writes on green.
    let green = pair.green().await;
    let first: shadowsync::lsn::Lsn = green
        .query_one(
            "INSERT INTO items (v) VALUES ('first green write') RETURNING pg_current_wal_insert_lsn()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let prepared = report.reverse.expect("the report names the reverse slot");
    eprintln!(
        "reverse slot created in {:.3} s; fence to green's mark {:.3} s, fence acquired in {:.3} s, drain {:.3} s",
        prepared.create_seconds,
        report.green_ready_seconds.unwrap_or_default(),
        report.fence_acquire_seconds.unwrap_or_default(),
        report.drain_seconds.unwrap_or_default()
    );
    let confirmed = slot_confirmed(&green, REVERSE_SLOT)
        .await
        .expect("the reverse slot exists on green")
        .expect("a logical slot has a confirmed position");
    assert_eq!(confirmed, prepared.start_lsn);
    assert!(prepared.start_lsn < first);

    // Unmarked, the reverse stream would meet blue's fence on every write: run refuses.
    let mut unmarked = reverse(&pair, None);
    unmarked.origin.mark = Mark::Off;
    let refused = shadowsync::pipeline::start(unmarked, Default::default())
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), refused.wait())
        .await
        .expect("run gives up")
        .expect_err("run refuses to write into the fence unmarked");
    let e = format!("{e:#}");
    assert!(
        e.contains("carries the fence") && e.contains("shadowsync_rollback_slot"),
        "{e}"
    );

    let back = start_streaming(reverse(&pair, None)).await;
    let blue = pair.blue().await;
    wait_for(
        "the first green write on blue",
        Duration::from_secs(30),
        || async { count(&blue, "items WHERE v = 'first green write'").await == 1 },
    )
    .await;
    assert_eq!(count(&blue, "items").await, 101);
    back.shutdown();
    back.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_cutover_leaves_no_reverse_stream_behind() {
    init_logging();
    let pair = Pair::start(SIMPLE);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let config = forward(pair.config());
    let handle = start_streaming(config.clone()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // Green refuses the cutover mark: the cutover fails after the reverse slot was created.
    pair.green
        .psql(
            DB,
            "CREATE FUNCTION no_mark() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'no cutover today'; END $$;
             CREATE TRIGGER no_mark BEFORE INSERT OR UPDATE ON shadowsync.cutover
               FOR EACH ROW EXECUTE FUNCTION no_mark();",
        )
        .unwrap();
    let e = cutover::run(&config, &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("fence was removed"), "{e}");
    let green = pair.green().await;
    assert_eq!(slot_confirmed(&green, REVERSE_SLOT).await, None, "{e}");
    assert_eq!(
        count(
            &green,
            &format!("pg_publication WHERE pubname = '{REVERSE_PUB}'")
        )
        .await,
        0
    );
    assert!(
        shadowsync::fence::fenced_tables(&pair.blue().await)
            .await
            .unwrap()
            .is_empty()
    );

    // A killed cutover's slot: `--abort` drops it (the forward slot is not cut over).
    green
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&REVERSE_SLOT],
        )
        .await
        .unwrap();
    let refused = cutover::run(&config, &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("exists on green already"), "{refused}");
    let aborted = cutover::abort(&config).await.unwrap();
    assert!(aborted.reverse.is_some(), "{aborted:?}");
    assert_eq!(slot_confirmed(&green, REVERSE_SLOT).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_streams_at_once_do_not_loop() {
    init_logging();
    let pair = Pair::start(SIMPLE);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    pair.green
        .psql(
            DB,
            &format!("CREATE PUBLICATION {REVERSE_PUB} FOR TABLE items"),
        )
        .unwrap();
    let mut config = pair.config();
    config.origin.mark = Mark::On;
    let there = start_streaming(config).await;
    let back = start_streaming(reverse(&pair, None)).await;
    let (blue, green) = (pair.blue().await, pair.green().await);
    // Disjoint keys: blue's writers take 1..1000, green's 1001..
    for i in 0..20i64 {
        blue.execute(
            "INSERT INTO items (id, v) VALUES ($1, 'from blue')",
            &[&(i + 1)],
        )
        .await
        .unwrap();
        green
            .execute(
                "INSERT INTO items (id, v) VALUES ($1, 'from green')",
                &[&(i + 1001)],
            )
            .await
            .unwrap();
    }
    blue.execute("UPDATE items SET v = 'blue again' WHERE id <= 5", &[])
        .await
        .unwrap();
    green
        .execute("DELETE FROM items WHERE id > 1015", &[])
        .await
        .unwrap();
    let (blue_txns, green_txns) = (21, 21);
    wait_applied(&there, "blue -> green", blue_txns).await;
    wait_applied(&back, "green -> blue", green_txns).await;
    // Both slots move past the echoes (every write of the other stream committed before `end`):
    // nothing is left in flight, and nothing loops.
    for (client, slot) in [(&blue, "test_slot"), (&green, REVERSE_SLOT)] {
        let end = wal_insert_lsn(client).await;
        wait_for(
            "the slot past every echo",
            Duration::from_secs(30),
            || async {
                slot_confirmed(client, slot)
                    .await
                    .flatten()
                    .is_some_and(|c| c >= end)
            },
        )
        .await;
    }
    let (there_applied, back_applied) = (there.shared.applied(), back.shared.applied());
    assert_eq!(
        there_applied.transactions, blue_txns,
        "blue -> green applied blue's transactions once, none of its own: {there_applied:?}"
    );
    assert_eq!(
        back_applied.transactions, green_txns,
        "green -> blue applied green's transactions once, none of its own: {back_applied:?}"
    );
    assert!(
        there.shared.applied().echoes_skipped > 0 && back.shared.applied().echoes_skipped > 0,
        "each stream met the other's writes and skipped them"
    );
    assert_same(&pair, &["items"]).await;
    assert_eq!(count(&blue, "items").await, 35);
    there.shutdown();
    back.shutdown();
    there.wait().await.unwrap();
    back.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_with_reverse_config_runs_the_reverse_prechecks() {
    init_logging();
    let pair = Pair::start(SIMPLE);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let dir = TestDir::new("reverse-dry-run");
    let forward_path = write_config(&pair, &dir, free_addr(), "");
    let back = shadowsync::cluster::pipeline_config_toml(
        &pair.green,
        &pair.blue,
        DB,
        REVERSE_SLOT,
        REVERSE_PUB,
        &free_addr().to_string(),
    );
    let back_path = dir.join("reverse.toml");
    std::fs::write(
        &back_path,
        format!("{back}[snapshot]\nmode = \"never\"\n[origin]\nmark = \"on\"\n"),
    )
    .unwrap();
    let args = [
        "cutover",
        "--config",
        forward_path.to_str().unwrap(),
        "--dry-run",
        "--reverse-config",
        back_path.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = run_bin(&args, Duration::from_secs(120)).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "green user may create the reverse slot {REVERSE_SLOT} and create publication {REVERSE_PUB}"
        )),
        "{stdout}"
    );
    let green = pair.green().await;
    green
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&REVERSE_SLOT],
        )
        .await
        .unwrap();
    let (code, stdout, stderr) = run_bin(&args, Duration::from_secs(120)).await;
    assert_ne!(code, Some(0), "{stdout}");
    assert!(stderr.contains("exists on green already"), "{stderr}");
    assert!(
        shadowsync::fence::fenced_tables(&pair.blue().await)
            .await
            .unwrap()
            .is_empty(),
        "a dry run fences nothing"
    );
}
