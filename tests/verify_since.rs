//! `verify --since-lsn` on real PostgreSQL: refused without an earlier point; after a full
//! verify, changes streamed from blue and corruptions made on green behind shadowsync's back
//! (an update of an old row, a delete of an old row, an insert) are found exactly, by an
//! incremental verify that compares in full only the rows written since, for an identity
//! mapping and a rule mapping with a filter; its own point then serves the next one.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::verify::{Options, Report, VerifyError, compare};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, n int NOT NULL, doc jsonb);";

const RULES: &str = r#"
[[table]]
source = "public.docs"
target = "public.live_docs"
filter = "status <> 'draft'"
[table.columns]
headline = "upper(title)"
"#;

async fn verify(
    config: &shadowsync::config::Config,
    since: Option<shadowsync::lsn::Lsn>,
) -> Result<Report, VerifyError> {
    let (_keep, stop) = shadowsync::shutdown::channel();
    let opts = Options {
        timeout: Duration::from_secs(60),
        compare: compare::Options {
            chunk_rows: 300,
            max_keys: 100,
        },
        since_lsn: since,
        ..Default::default()
    };
    shadowsync::verify::run(config, &opts, stop, &|_| {}).await
}

fn mapping<'a>(report: &'a Report, target: &str) -> &'a compare::MappingDiff {
    report
        .mappings
        .iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("no {target} in {report:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn since_lsn_compares_only_what_changed_and_finds_exactly_the_corruptions() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, status text NOT NULL);
             INSERT INTO items SELECT g, 'item ' || g, g % 7, jsonb_build_object('g', g)
               FROM generate_series(1, 2000) g;
             INSERT INTO docs SELECT g, 'title ' || g, CASE WHEN g % 4 = 0 THEN 'draft' ELSE 'live' END
               FROM generate_series(1, 1000) g;
             CREATE PUBLICATION test_pub FOR TABLE items, docs;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE live_docs (id int PRIMARY KEY, headline text NOT NULL, status text NOT NULL);",
        )
        .unwrap();
    let dir = TestDir::new("verify-since");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut config = pair.config();
    config.transforms.files = vec![rules.display().to_string()];
    let handle = start_streaming(config.clone()).await;
    config.metrics.listen = handle.addr.to_string();
    let green = pair.green().await;
    wait_for("the initial copy", Duration::from_secs(60), || async {
        count(&green, "items").await == 2000 && count(&green, "live_docs").await == 750
    })
    .await;

    // Nothing to start from yet.
    let any = shadowsync::lsn::Lsn::parse("FF/0").unwrap();
    let e = verify(&config, Some(any)).await.unwrap_err();
    assert!(matches!(e, VerifyError::NoBase { .. }), "{e}");
    assert!(
        e.to_string().contains("run a full shadowsync verify"),
        "{e}"
    );

    let full = verify(&config, None).await.unwrap();
    assert!(full.equal, "{}", full.text());
    assert_eq!(full.incremental_since, None);

    // Streamed from blue: updates, inserts and a delete; and on green behind shadowsync's back:
    // an old row updated, an old row deleted, a row inserted, a rule target's row changed.
    let blue = pair.blue().await;
    blue.batch_execute(
        "UPDATE items SET n = n + 1 WHERE id <= 10;
         INSERT INTO items SELECT g, 'new ' || g, 0, NULL FROM generate_series(2001, 2010) g;
         DELETE FROM items WHERE id = 20;
         UPDATE docs SET title = 'retitled' WHERE id = 5;
         UPDATE docs SET status = 'live' WHERE id = 8;",
    )
    .await
    .unwrap();
    wait_for("the changes in green", Duration::from_secs(30), || async {
        count(&green, "items").await == 2009 && count(&green, "live_docs").await == 751
    })
    .await;
    green
        .batch_execute(
            "UPDATE items SET doc = '{\"g\": 1000.0}' WHERE id = 1000;
             DELETE FROM items WHERE id = 1500;
             INSERT INTO items VALUES (999999, 'stray', 0, NULL);
             UPDATE live_docs SET headline = 'TITLE 99 ' WHERE id = 99;",
        )
        .await
        .unwrap();

    let inc = verify(&config, Some(full.lsn)).await.unwrap();
    assert!(!inc.equal, "{}", inc.text());
    assert_eq!(inc.incremental_since, Some(full.lsn), "{}", inc.text());
    assert!(inc.text().contains("incremental"), "{}", inc.text());
    let items = mapping(&inc, "public.items");
    assert!(items.incremental && items.in_full.is_none(), "{items:?}");
    // 10 updated and 10 inserted on blue, 2 written on green (the delete leaves no row).
    assert!(
        (20..=40).contains(&items.changed_rows),
        "only rows written since are compared in full: {items:?}"
    );
    assert_eq!((items.rows_blue, items.rows_green), (2009, 2009));
    let got: Vec<(String, Vec<String>)> = items
        .differing
        .iter()
        .map(|d| (d.key.clone(), d.columns.clone()))
        .collect();
    assert_eq!(
        got,
        vec![("(id)=(1000)".to_string(), vec!["doc".to_string()])],
        "{}",
        inc.text()
    );
    assert_eq!(items.missing_in_green, vec!["(id)=(1500)".to_string()]);
    assert_eq!(items.extra_in_green, vec!["(id)=(999999)".to_string()]);
    let docs = mapping(&inc, "public.live_docs");
    assert!(docs.incremental, "{docs:?}");
    assert_eq!(docs.differing.len(), 1, "{}", inc.text());
    assert_eq!(docs.differing[0].key, "(id)=(99)");
    assert_eq!(docs.differing[0].columns, vec!["headline".to_string()]);
    assert_eq!(docs.missing_count + docs.extra_count, 0, "{}", inc.text());
    assert!(!inc.text().contains("stray"), "no values in the report");

    // Repaired on green: the next incremental verify, from the full one's point still (the one
    // just taken did not match), finds green equal and records a point of its own.
    green
        .batch_execute(
            "UPDATE items SET doc = '{\"g\": 1000}' WHERE id = 1000;
             INSERT INTO items VALUES (1500, 'item 1500', 1500 % 7, '{\"g\": 1500}');
             DELETE FROM items WHERE id = 999999;
             UPDATE live_docs SET headline = 'TITLE 99' WHERE id = 99;",
        )
        .await
        .unwrap();
    let again = verify(&config, Some(inc.lsn)).await.unwrap();
    assert!(again.equal, "{}", again.text());
    assert_eq!(again.incremental_since, Some(full.lsn));
    let next = verify(&config, Some(again.lsn)).await.unwrap();
    assert!(next.equal, "{}", next.text());
    assert_eq!(next.incremental_since, Some(again.lsn));
    assert!(
        mapping(&next, "public.items").changed_rows < 20,
        "{}",
        next.text()
    );

    // A point before the first one is not a start.
    let early = shadowsync::lsn::Lsn::parse("0/1").unwrap();
    let e = verify(&config, Some(early)).await.unwrap_err();
    assert!(matches!(e, VerifyError::NoBase { .. }), "{e}");
    handle.shutdown();
    handle.wait().await.unwrap();
}
