//! Transform rules end to end: the NovaCron example (renames, value mapping, JSON extraction,
//! filters moving rows in and out, tenant lookups inside one transaction, a skipped table),
//! unchanged TOAST values that a rule needs, and `check`'s verdicts.

mod common;

use common::novacron::*;
use common::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn novacron_rules_give_what_the_plan_sql_gives() {
    init_logging();
    let seed = seed("novacron_rules_give_what_the_plan_sql_gives");
    let (pair, config) = novacron();
    let handle = start_streaming(config).await;
    let mut client = pair.blue().await;
    let mut rng = StdRng::seed_from_u64(seed);
    novacron_workload(&mut client, &mut rng, 1500).await;
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert!(
        report.rows.contains_key("public.compute_nodes"),
        "{report:?}"
    );
    assert!(!report.rows.contains_key("public.audit_log"), "{report:?}");
    assert_matches_plan(&pair).await;
}

/// Lookups stay true: a VM created while its owner was in one tenant follows the owner when
/// the owner moves later in the same batch (it is re-derived with the move), as do the VMs
/// created after the move; VMs of other users are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_looked_up_row_changing_later_in_the_batch_re_derives_its_readers() {
    init_logging();
    let (pair, config) = novacron();
    let handle = start_streaming(config.clone()).await;
    handle.shutdown();
    handle.wait().await.unwrap();
    // Written while shadowsync is stopped: one backlog, applied in one batch.
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO users (id, email, name) VALUES (1, 'a@acme.example', 'a'), (2, 'b@acme.example', 'b');
         INSERT INTO hypervisors (id, hostname) VALUES (1, 'hv1');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES (10, 'vm10', 1, 1);
         UPDATE users SET email = 'a@globex.example' WHERE id = 1;
         INSERT INTO users (id, email, name) VALUES (3, 'c@globex.example', 'c');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES (11, 'vm11', 3, 1);
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES (12, 'vm12', 1, 1);",
    )
    .await
    .unwrap();
    let handle = start_streaming(config).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let green = pair.green().await;
    let tenants: Vec<(i64, String)> = green
        .query(
            "SELECT v.id, t.slug FROM vms v JOIN tenants t ON t.id = v.tenant_id ORDER BY v.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        tenants,
        vec![
            (10, "globex.example".to_string()),
            (11, "globex.example".to_string()),
            (12, "globex.example".to_string()),
        ]
    );
    assert_matches_plan(&pair).await;
}

/// A row moving into green through the filter, whose TOASTed column the update left unchanged,
/// is written whole; a target column mixing changed and unchanged inputs is recomputed; a
/// column computed only from unchanged values keeps green's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filter_move_in_with_unchanged_toast_is_written_whole() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE docs (id int PRIMARY KEY, status text NOT NULL, body text, title text);
             CREATE PUBLICATION test_pub FOR TABLE docs;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE live_docs (id int PRIMARY KEY, body text, body_len int, headline text);",
        )
        .unwrap();
    let dir = TestDir::new("rules");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[table]]
source = "public.docs"
target = "public.live_docs"
filter = "status = 'published'"
[table.columns]
body_len = "length(body)"
headline = "title || ' (' || left(body, 5) || ')'"
"#,
    )
    .unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    blue.execute(
        "INSERT INTO docs VALUES (1, 'draft', $1, 'one'), (2, 'published', $1, 'two'),
                                 (3, 'draft', $1, 'three'), (4, 'published', $1, 'four')",
        &[&big],
    )
    .await
    .unwrap();
    // Move-in of 1 with body unchanged (TOAST); 2 only changes its title (headline mixes).
    blue.batch_execute(
        "UPDATE docs SET status = 'published' WHERE id = 1;
         UPDATE docs SET title = 'TWO' WHERE id = 2;",
    )
    .await
    .unwrap();
    // Key changes leaving the TOASTed body unchanged: one moves in, one moves out.
    blue.batch_execute(
        "UPDATE docs SET id = 30, status = 'published' WHERE id = 3;
         UPDATE docs SET id = 40, status = 'draft' WHERE id = 4;",
    )
    .await
    .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let green = pair.green().await;
    let got = rows(
        &green,
        "(SELECT id, md5(body), body_len, headline FROM live_docs)",
    )
    .await;
    let want = rows(
        &blue,
        "(SELECT id, md5(body), length(body) AS body_len, title || ' (' || left(body, 5) || ')' AS headline
            FROM docs WHERE status = 'published')",
    )
    .await;
    assert_eq!(got, want);
    assert_eq!(got.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_accepts_the_example_and_names_each_mistake() {
    init_logging();
    let (pair, config) = novacron();
    let report = shadowsync::check::command(&config).await.unwrap();
    let lines: Vec<String> = report.mappings.iter().map(|m| m.line()).collect();
    assert!(report.ok(), "{lines:#?}\n{}", report.problems_text());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok   public.hypervisors -> public.compute_nodes (rule ")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("skip public.audit_log")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "ok   public.api_keys -> public.api_keys (identity)"),
        "{lines:#?}"
    );
    let vms = report
        .mappings
        .iter()
        .find(|m| m.source.name == "virtual_machines")
        .unwrap();
    assert!(
        vms.notes
            .iter()
            .any(|n| n.contains("reading the row from blue by key")),
        "check says the filtered table completes TOAST from blue: {:?}",
        vms.notes
    );
    // Nothing was written: no slot, no shadowsync schema.
    let blue = pair.blue().await;
    assert_eq!(count(&blue, "pg_replication_slots").await, 0);
    let green = pair.green().await;
    assert_eq!(
        count(&green, "pg_namespace WHERE nspname = 'shadowsync'").await,
        0
    );

    let dir = TestDir::new("check");
    let cases: [(&str, &[&str]); 5] = [
        (
            "[[table]]\nsource = \"public.hypervisors\"\ntarget = \"public.compute_nodes\"\n[table.columns]\nname = \"hostnme\"\n",
            &[
                "rules.toml:5",
                "column name of public.compute_nodes",
                "hostnme",
            ],
        ),
        (
            "[[table]]\nsource = \"public.hypervisors\"\ntarget = \"public.compute_nodes\"\n[table.columns]\nname = \"hostname\"\nstatus = \"(CASE status WHEN 'active' THEN 'online' END::node_status\"\n",
            &["rules.toml:6", "column status"],
        ),
        (
            "[[table]]\nsource = \"public.hypervisors\"\ntarget = \"public.nodes\"\n",
            &["rules.toml:1", "public.nodes does not exist on green"],
        ),
        (
            "[[table]]\nsource = \"public.hypervisors\"\ntarget = \"public.compute_nodes\"\n[table.columns]\nname = \"hostname\"\nid = \"hashtext(hostname)\"\n",
            &[
                "rules.toml:1",
                "key column id",
                "hostname",
                "REPLICA IDENTITY FULL",
            ],
        ),
        (
            "[[table]]\nsource = \"public.hypervisors\"\ntarget = \"public.compute_nodes\"\nfilter = \"statuss = 'x'\"\n[table.columns]\nname = \"hostname\"\n",
            &["rules.toml:4", "filter of public.compute_nodes", "statuss"],
        ),
    ];
    for (text, words) in cases {
        let file = dir.join("rules.toml");
        std::fs::write(&file, text).unwrap();
        let mut bad = config.clone();
        bad.transforms.files = vec![file.display().to_string()];
        let report = shadowsync::check::command(&bad).await.unwrap();
        assert!(!report.ok(), "{text}");
        let problems = report.problems_text();
        for w in words {
            assert!(
                problems.contains(w),
                "for rules\n{text}\nexpected {w:?} in:\n{problems}"
            );
        }
    }
}

/// A value green rejects (here through a rule casting text to integer) stops the pipeline with
/// the table, LSN and SQLSTATE, but never the value itself (it could be personal data).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_values_never_appear_in_errors() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION test_pub FOR TABLE t;",
        )
        .unwrap();
    pair.green
        .psql(DB, "CREATE TABLE t (id int PRIMARY KEY, n integer);")
        .unwrap();
    let dir = TestDir::new("redact");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[table]]\nsource = \"public.t\"\n[table.columns]\nn = \"v::integer\"\n",
    )
    .unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    blue.execute("INSERT INTO t VALUES (1, '42')", &[])
        .await
        .unwrap();
    let green = pair.green().await;
    wait_for(
        "the good row",
        std::time::Duration::from_secs(30),
        || async { count(&green, "t").await == 1 },
    )
    .await;
    blue.execute("INSERT INTO t VALUES (2, 'jane.doe@example.com')", &[])
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), handle.wait())
        .await
        .expect("the pipeline stops")
        .expect_err("the bad value stops the pipeline");
    let text = format!("{err} / {err:?}");
    assert!(
        text.contains("public.t") && text.contains("22P02"),
        "{text}"
    );
    assert!(!text.contains("jane.doe"), "a row value leaked: {text}");

    assert_eq!(rows(&green, "t").await, vec!["(1,42)".to_string()]);
}

/// A row green rejects, among many in one batch, is named by key and LSN (found by bisection,
/// not row by row); nothing of its transaction is applied; after the rule is fixed, a restart
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_row_is_named_and_the_stream_converges_after_the_fix() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION test_pub FOR TABLE t;",
        )
        .unwrap();
    pair.green
        .psql(DB, "CREATE TABLE t (id int PRIMARY KEY, n integer);")
        .unwrap();
    let dir = TestDir::new("poison");
    let rules = dir.join("rules.toml");
    let write_rule = |expr: &str| {
        std::fs::write(
            &rules,
            format!("[[table]]\nsource = \"public.t\"\n[table.columns]\nn = \"{expr}\"\n"),
        )
        .unwrap()
    };
    write_rule("v::integer");
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    // Chunks of 300 rows: the bad row is in a chunk written in the background, mid-transaction.
    config.batch.max_rows = 300;
    let handle = start_streaming(config.clone()).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, g::text FROM generate_series(1, 1000) g WHERE g <> 637;
         INSERT INTO t VALUES (637, 'not-a-number');
         COMMIT;",
    )
    .await
    .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), handle.wait())
        .await
        .expect("the pipeline stops")
        .expect_err("the bad value stops the pipeline")
        .to_string();
    assert!(
        err.contains("(id)=(637)") && err.contains("public.t") && err.contains("22P02"),
        "{err}"
    );
    assert!(!err.contains("not-a-number"), "a row value leaked: {err}");
    let green = pair.green().await;
    assert_eq!(count(&green, "t").await, 0, "nothing of the transaction");

    write_rule("CASE WHEN v ~ '^[0-9]+$' THEN v::integer END");
    let handle = start_streaming(config).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert_eq!(count(&green, "t").await, 1000);
    assert_eq!(count(&green, "t WHERE n IS NULL").await, 1);
    assert_eq!(count(&green, "t WHERE n = id").await, 999);
}

/// Blue changes shape while streaming: an added column no rule needs (and one green already
/// has, on an identity table) is taken in stride; dropping a column a rule uses stops with the
/// column and the rule's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_changes_on_blue_are_followed_or_refused_clearly() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE t (id int PRIMARY KEY, v text, w text);
             CREATE TABLE plain (id int PRIMARY KEY, a text);
             CREATE PUBLICATION test_pub FOR TABLE t, plain;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE t (id int PRIMARY KEY, n integer, w text);
             CREATE TABLE plain (id int PRIMARY KEY, a text, b text);",
        )
        .unwrap();
    let dir = TestDir::new("schema");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[table]]\nsource = \"public.t\"\n[table.columns]\nn = \"length(v)\"\n",
    )
    .unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO t VALUES (1, 'abc', 'x'); INSERT INTO plain VALUES (1, 'a');
         ALTER TABLE t ADD COLUMN extra text;
         ALTER TABLE plain ADD COLUMN b text;
         INSERT INTO t VALUES (2, 'abcd', 'y', 'unused'); INSERT INTO plain VALUES (2, 'a', 'b');",
    )
    .await
    .unwrap();
    let green = pair.green().await;
    wait_for(
        "rows after the added columns",
        std::time::Duration::from_secs(30),
        || async { count(&green, "t").await == 2 && count(&green, "plain").await == 2 },
    )
    .await;
    assert_eq!(rows(&green, "plain").await, vec!["(1,a,)", "(2,a,b)"]);
    assert_eq!(rows(&green, "t").await, vec!["(1,3,x)", "(2,4,y)"]);

    blue.batch_execute("ALTER TABLE t DROP COLUMN v; INSERT INTO t VALUES (3, 'z', 'e');")
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), handle.wait())
        .await
        .expect("the pipeline stops")
        .expect_err("a rule uses the dropped column")
        .to_string();
    assert!(
        err.contains("dropped column v") && err.contains("rules.toml:4"),
        "{err}"
    );
    assert_eq!(count(&green, "t").await, 2, "nothing past the change");
}

/// `shadowsync demo` end to end (NovaCron rules, workload, drain, per-mapping check).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_runs_and_every_mapping_matches() {
    init_logging();
    shadowsync::demo::run(std::time::Duration::from_secs(3))
        .await
        .expect("the demo succeeds");
}
