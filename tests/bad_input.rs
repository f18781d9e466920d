//! Wrong setups and values green rejects: the pipeline must stop with a message naming what is
//! wrong and the fix, within a deadline, and must neither apply nor confirm anything it should
//! not have.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::config::Config;
use shadowsync::lsn::Lsn;
use shadowsync::pipeline::{self, RunOptions};
use tokio_postgres::Client;

const SLOT: &str = "test_slot";
/// How long a failing pipeline may take to give up (retryable errors give up after
/// `retry.startup_timeout_ms`, set to 2 s below).
const FAIL_DEADLINE: Duration = Duration::from_secs(45);
const DEADLINE: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE accounts (id integer PRIMARY KEY, owner text NOT NULL, ref uuid, v text);
CREATE TABLE ledger (id integer PRIMARY KEY, note text);
";

/// Runs the pipeline with `config` and returns its error message; panics when it succeeds or
/// does not stop within the deadline.
async fn run_to_error(config: Config) -> String {
    let handle = match pipeline::start(config, RunOptions::default()).await {
        Ok(handle) => handle,
        Err(e) => return e.to_string(),
    };
    match tokio::time::timeout(FAIL_DEADLINE, handle.wait()).await {
        Err(_) => panic!("the pipeline did not stop within {FAIL_DEADLINE:?}"),
        Ok(Ok(report)) => panic!("the pipeline should have failed, it reported {report:?}"),
        Ok(Err(e)) => e.to_string(),
    }
}

fn assert_mentions(message: &str, words: &[&str]) {
    for w in words {
        assert!(
            message.contains(w),
            "the error should mention {w:?}; it is: {message}"
        );
    }
}

/// Blue state that would reach green if the pipeline streamed: the slot exists before the
/// rows are written. Returns the slot's confirmed position.
async fn slot_and_rows(blue: &Client) -> Lsn {
    blue.query_one(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&SLOT],
    )
    .await
    .expect("create the slot");
    write_rows(blue).await;
    slot_confirmed(blue, SLOT)
        .await
        .expect("the slot exists")
        .expect("the slot has a confirmed position")
}

async fn write_rows(blue: &Client) {
    blue.batch_execute(
        "INSERT INTO accounts VALUES (1, 'alice', gen_random_uuid(), 'x'), (2, 'bob', NULL, NULL);
         INSERT INTO ledger VALUES (1, 'opened');",
    )
    .await
    .expect("write blue rows");
}

/// Nothing reached green: no rows in `tables`, no progress row.
async fn assert_green_untouched(green: &Client, tables: &[&str]) {
    for t in tables {
        assert_eq!(count(green, t).await, 0, "green table {t} must stay empty");
    }
    assert_eq!(
        progress_lsn(green, SLOT).await,
        None,
        "green must hold no progress row"
    );
}

/// The slot did not move: nothing was confirmed to blue.
async fn assert_slot_unmoved(blue: &Client, before: Lsn) {
    let now = slot_confirmed(blue, SLOT)
        .await
        .expect("the slot still exists");
    assert_eq!(
        now,
        Some(before),
        "the slot's confirmed_flush_lsn must not move (was {})",
        before
    );
}

fn fast_failing(mut config: Config) -> Config {
    config.retry.startup_timeout_ms = 2_000;
    config.retry.initial_backoff_ms = 100;
    config.retry.max_backoff_ms = 500;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_blue_socket_dir() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    let mut config = fast_failing(pair.config());
    config.blue.dsn = format!(
        "host=/nonexistent/shadowsync-no-such-dir port={} user=postgres dbname={DB}",
        pair.blue.port()
    );
    let started = std::time::Instant::now();
    let message = run_to_error(config).await;
    assert_mentions(&message, &["cannot connect to blue", "blue.dsn"]);
    assert!(
        started.elapsed() >= Duration::from_millis(2_000),
        "a retryable error is retried for retry.startup_timeout_ms"
    );
    let (blue, green) = (pair.blue().await, pair.green().await);
    assert_green_untouched(&green, &["accounts", "ledger"]).await;
    assert_eq!(slot_confirmed(&blue, SLOT).await, None, "no slot on blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_blue() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    let config = fast_failing(pair.config());
    pair.blue.stop();
    let message = run_to_error(config).await;
    assert_mentions(&message, &["cannot connect to blue", "blue.dsn"]);
    let green = pair.green().await;
    assert_green_untouched(&green, &["accounts", "ledger"]).await;
    pair.blue.restart().unwrap();
    let blue = pair.blue().await;
    assert_eq!(slot_confirmed(&blue, SLOT).await, None, "no slot on blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_green() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let config = fast_failing(pair.config());
    // The clusters commit asynchronously: make green's schema durable before the crash stop.
    pair.green.psql(DB, "CHECKPOINT").unwrap();
    pair.green.stop();
    let message = run_to_error(config).await;
    assert_mentions(&message, &["cannot connect to green", "green.dsn"]);
    assert_slot_unmoved(&blue, confirmed).await;
    pair.green.restart().unwrap();
    let green = pair.green().await;
    assert_green_untouched(&green, &["accounts", "ledger"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn green_dsn_to_missing_socket_dir() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let mut config = fast_failing(pair.config());
    config.green.dsn = format!(
        "host=/nonexistent/shadowsync-no-such-dir port={} user=postgres dbname={DB}",
        pair.green.port()
    );
    let message = run_to_error(config).await;
    assert_mentions(&message, &["cannot connect to green", "green.dsn"]);
    assert_slot_unmoved(&blue, confirmed).await;
    let green = pair.green().await;
    assert_green_untouched(&green, &["accounts", "ledger"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_wal_level_replica() {
    init_logging();
    let mut pair = Pair::start(SCHEMA);
    // CHECKPOINT: the clusters commit asynchronously and restart() stops in immediate mode,
    // which would lose the schema.
    pair.blue
        .psql(DB, "ALTER SYSTEM SET wal_level = replica")
        .unwrap();
    pair.blue.psql(DB, "CHECKPOINT").unwrap();
    pair.blue.restart().unwrap();
    let blue = pair.blue().await;
    let level: String = blue.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(level, "replica");
    blue.batch_execute("CREATE PUBLICATION test_pub FOR ALL TABLES")
        .await
        .unwrap();
    write_rows(&blue).await;
    let message = run_to_error(pair.config()).await;
    assert_mentions(
        &message,
        &[
            "wal_level",
            "'replica'",
            "'logical'",
            "ALTER SYSTEM",
            "restart",
        ],
    );
    assert_green_untouched(&pair.green().await, &["accounts", "ledger"]).await;
    assert_eq!(slot_confirmed(&blue, SLOT).await, None, "no slot on blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_user_without_replication() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE ROLE app LOGIN;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO app;
             CREATE PUBLICATION test_pub FOR ALL TABLES;",
        )
        .unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let mut config = pair.config();
    config.blue.dsn = format!(
        "host={} port={} user=app dbname={DB}",
        pair.blue.socket_dir().display(),
        pair.blue.port()
    );
    let message = run_to_error(config).await;
    assert_mentions(&message, &["app", "REPLICATION", "ALTER ROLE"]);
    assert_green_untouched(&pair.green().await, &["accounts", "ledger"]).await;
    assert_slot_unmoved(&blue, confirmed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_publication() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let message = run_to_error(pair.config()).await;
    assert_mentions(&message, &["test_pub", "CREATE PUBLICATION"]);
    assert_green_untouched(&pair.green().await, &["accounts", "ledger"]).await;
    assert_slot_unmoved(&blue, confirmed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_table_missing_on_green() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger")
        .unwrap();
    pair.green.psql(DB, "DROP TABLE ledger").unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let message = run_to_error(pair.config()).await;
    assert_mentions(&message, &["ledger", "missing on green"]);
    assert_green_untouched(&pair.green().await, &["accounts"]).await;
    assert_slot_unmoved(&blue, confirmed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn column_missing_on_green() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger")
        .unwrap();
    pair.green
        .psql(DB, "ALTER TABLE accounts DROP COLUMN v")
        .unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let message = run_to_error(pair.config()).await;
    assert_mentions(
        &message,
        &["column v", "accounts", "ALTER TABLE", "ADD COLUMN"],
    );
    assert_green_untouched(&pair.green().await, &["accounts", "ledger"]).await;
    assert_slot_unmoved(&blue, confirmed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn column_of_incompatible_type() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger")
        .unwrap();
    pair.green
        .psql(
            DB,
            "ALTER TABLE accounts DROP COLUMN ref; ALTER TABLE accounts ADD COLUMN ref integer",
        )
        .unwrap();
    let blue = pair.blue().await;
    let confirmed = slot_and_rows(&blue).await;
    let message = run_to_error(pair.config()).await;
    assert_mentions(&message, &["ref", "accounts", "uuid", "integer"]);
    assert_green_untouched(&pair.green().await, &["accounts", "ledger"]).await;
    assert_slot_unmoved(&blue, confirmed).await;
}

/// The LSN an apply error names (`... (blue LSN 0/1A2B3C4) ...`).
fn lsn_in_message(message: &str) -> Lsn {
    let rest = message
        .split("LSN ")
        .nth(1)
        .unwrap_or_else(|| panic!("the error should name the blue LSN: {message}"));
    let end = rest
        .find(|c: char| !(c.is_ascii_hexdigit() || c == '/'))
        .unwrap_or(rest.len());
    Lsn::parse(&rest[..end])
        .ok()
        .unwrap_or_else(|| panic!("no LSN in {message}"))
}

/// End LSN of transaction `xid`'s flushed commit record on blue (read with pg_walinspect
/// from `from`): the LSN pgoutput reports as the commit's end.
async fn commit_end_lsn(blue: &Client, from: Lsn, xid: &str) -> Lsn {
    blue.query_opt(
        "SELECT end_lsn FROM pg_get_wal_records_info_till_end_of_wal($1)
          WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' AND xid::text = $2",
        &[&from, &xid],
    )
    .await
    .expect("read blue's WAL")
    .map(|r| r.get(0))
    .expect("the commit record of the bad transaction")
}

/// Streams good transactions, waits until green has them, then a transaction green must
/// reject (`bad_sql`); checks that the pipeline stops naming the table and the LSN, that the
/// bad transaction left no trace in green, and that neither green's progress nor the slot
/// passed it. `green_tweak` makes green stricter than blue (types still compatible); `names`
/// are words the error must contain besides the table and the LSN.
async fn rejected_value_stops_before_the_commit(green_tweak: &str, bad_sql: &str, names: &[&str]) {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger;
             CREATE EXTENSION pg_walinspect;",
        )
        .unwrap();
    pair.green.psql(DB, green_tweak).unwrap();
    let handle = start_streaming(pair.config()).await;
    let (mut blue, green) = (pair.blue().await, pair.green().await);

    // Good transactions first, applied and recorded in green's progress.
    blue.batch_execute(
        "INSERT INTO accounts (id, owner, v) VALUES (1, 'alice', 'ok'), (2, 'bob', 'abc');
         INSERT INTO ledger VALUES (1, 'first');",
    )
    .await
    .unwrap();
    blue.batch_execute("UPDATE accounts SET v = 'yes' WHERE id = 2")
        .await
        .unwrap();
    let good_end = wal_insert_lsn(&blue).await;
    let g = &green;
    wait_for("the good transactions in green", DEADLINE, || async move {
        progress_lsn(g, SLOT).await.is_some_and(|p| p <= good_end)
            && rows(g, "accounts").await.len() == 2
            && rows(g, "ledger").await.len() == 1
            && count(g, "accounts WHERE v = 'yes'").await == 1
    })
    .await;
    let good_rows = (rows(&green, "accounts").await, rows(&green, "ledger").await);
    let good_progress = progress_lsn(&green, SLOT).await.unwrap();

    // The bad transaction: good rows and the value green rejects, in one blue commit.
    let before = wal_insert_lsn(&blue).await;
    let tx = blue.transaction().await.unwrap();
    let xid: String = tx
        .query_one("SELECT txid_current()::text", &[])
        .await
        .unwrap()
        .get(0);
    // Flushed at commit, so that pg_walinspect can read the commit record right away.
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .unwrap();
    tx.batch_execute(bad_sql).await.unwrap();
    tx.commit().await.unwrap();
    let commit_end = commit_end_lsn(&blue, before, &xid).await;

    // Fail fast (rather than at the deadline) if green commits the rejected transaction.
    let g = &green;
    let committed_anyway = wait_for(
        "green to commit the rejected transaction (it should not)",
        FAIL_DEADLINE * 2,
        || async move { progress_lsn(g, SLOT).await.is_some_and(|p| p >= commit_end) },
    );
    let message = tokio::select! {
        result = tokio::time::timeout(FAIL_DEADLINE, handle.wait()) => match result {
            Err(_) => panic!(
                "the pipeline did not stop within {FAIL_DEADLINE:?}; green holds {:?}",
                rows(&green, "accounts").await
            ),
            Ok(Ok(report)) => panic!(
                "the pipeline should have failed, it reported {report:?}; green holds {:?}",
                rows(&green, "accounts").await
            ),
            Ok(Err(e)) => e.to_string(),
        },
        () = committed_anyway => panic!(
            "green committed the rejected transaction (progress reached {}); green holds {:?}",
            commit_end,
            rows(&green, "accounts").await
        ),
    };
    assert_mentions(&message, &["public.accounts", "LSN"]);
    assert_mentions(&message, names);
    assert!(
        !message.contains("toolong") && !message.contains("dave"),
        "row values must not leave green: {message}"
    );
    let named = lsn_in_message(&message);
    assert!(
        before < named && named <= commit_end,
        "the error names LSN {} which is not inside the bad transaction ({}, {}]: {message}",
        named,
        before,
        commit_end
    );

    // Nothing of the bad transaction in green, the earlier ones intact.
    assert_eq!(
        (rows(&green, "accounts").await, rows(&green, "ledger").await),
        good_rows,
        "green must hold exactly the good transactions"
    );
    let progress = progress_lsn(&green, SLOT).await.unwrap();
    assert_eq!(progress, good_progress, "green's progress must not advance");
    assert!(progress < commit_end);
    let confirmed = slot_confirmed(&blue, SLOT)
        .await
        .expect("the slot exists")
        .expect("the slot has a confirmed position");
    assert!(
        confirmed < commit_end,
        "blue's slot confirmed {} past the rejected commit ending at {}",
        confirmed,
        commit_end
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_constraint_only_on_green_stops_the_pipeline() {
    rejected_value_stops_before_the_commit(
        "ALTER TABLE accounts ADD CONSTRAINT v_short CHECK (length(v) <= 3)",
        "INSERT INTO ledger VALUES (2, 'second');
         UPDATE accounts SET v = 'no' WHERE id = 1;
         INSERT INTO accounts (id, owner, v) VALUES (3, 'carol', 'ok'), (4, 'dave', 'toolong');",
        &["v_short", "constraint"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn value_too_long_for_greens_varchar_stops_the_pipeline() {
    rejected_value_stops_before_the_commit(
        "ALTER TABLE accounts ALTER COLUMN v TYPE varchar(3)",
        "INSERT INTO ledger VALUES (2, 'second');
         UPDATE accounts SET v = 'no' WHERE id = 1;
         INSERT INTO accounts (id, owner, v) VALUES (3, 'carol', 'ok'), (4, 'dave', 'toolong');",
        &["too long", "character varying(3)"],
    )
    .await;
}

/// A domain over varchar(n) on green: the explicit cast to the domain would truncate too, so
/// written values are cast to the domain's base type and the column's own coercion errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn value_too_long_for_a_domain_over_varchar_stops_the_pipeline() {
    rejected_value_stops_before_the_commit(
        "CREATE DOMAIN short_text AS varchar(3); ALTER TABLE accounts ALTER COLUMN v TYPE short_text",
        "INSERT INTO ledger VALUES (2, 'second');
         UPDATE accounts SET v = 'no' WHERE id = 1;
         INSERT INTO accounts (id, owner, v) VALUES (3, 'carol', 'ok'), (4, 'dave', 'toolong');",
        &["too long", "character varying(3)"],
    )
    .await;
}

/// A green user that may not set session_replication_role, with a foreign key between
/// replicated tables on green: refused with the GRANT to run; after the grant, it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_keys_on_green_need_the_replica_role_grant() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.green
        .psql(
            DB,
            "ALTER TABLE ledger ADD CONSTRAINT ledger_account FOREIGN KEY (id) REFERENCES accounts (id);
             CREATE ROLE app LOGIN;
             GRANT CREATE ON DATABASE app TO app;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
        )
        .unwrap();
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger")
        .unwrap();
    let mut config = pair.config();
    config.green.dsn = config.green.dsn.replace("user=postgres", "user=app");
    let message = run_to_error(config.clone()).await;
    assert_mentions(
        &message,
        &[
            "ledger_account",
            "session_replication_role",
            "GRANT SET ON PARAMETER",
        ],
    );

    pair.green
        .psql(DB, "GRANT SET ON PARAMETER session_replication_role TO app")
        .unwrap();
    let handle = start_streaming(config).await;
    // Child before parent inside one transaction: fine on blue (no FK there), and green's FK is
    // not checked mid-batch under the replica role.
    let blue = pair.blue().await;
    blue.batch_execute(
        "BEGIN; INSERT INTO ledger VALUES (7, 'child first'); INSERT INTO accounts VALUES (7, 'g', NULL, NULL); COMMIT;",
    )
    .await
    .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert_same(&pair, &["accounts", "ledger"]).await;
}

/// The slot vanished (failover to a standby without it, or dropped) while green holds progress
/// from it: recreating it silently would skip every change in between, so `run` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_slot_with_green_progress_is_refused() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE accounts, ledger")
        .unwrap();
    let config = pair.config();
    let handle = start_streaming(config.clone()).await;
    let blue = pair.blue().await;
    write_rows(&blue).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    blue.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
        .await
        .unwrap();
    let message = run_to_error(config).await;
    assert_mentions(
        &message,
        &[
            "replication slot test_slot does not exist",
            "Re-seed green",
            "DELETE FROM shadowsync.progress",
        ],
    );
    assert_eq!(
        slot_confirmed(&blue, SLOT).await,
        None,
        "no slot was created"
    );
}

/// `check` warns of green columns narrower than blue's (the error would otherwise come hours
/// into the copy): a varchar under text or a wider varchar, fewer integer digits or decimal
/// places in a numeric, a smaller integer type. Warnings, not failures: `check` still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_warns_of_green_columns_narrower_than_blues() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE t (id bigint PRIMARY KEY, name text, code varchar(40), amount numeric(14,4),
                             n bigint, wide varchar(10), free numeric);
             CREATE PUBLICATION test_pub FOR TABLE t;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE t (id bigint PRIMARY KEY, name varchar(12), code varchar(10), amount numeric(10,2),
                             n integer, wide varchar(20), free numeric);",
        )
        .unwrap();
    let report = shadowsync::check::command(&pair.config()).await.unwrap();
    assert!(report.ok(), "{}", report.problems_text());
    let warnings = &report.mappings[0].warnings;
    for (column, words) in [
        ("name", &["character varying(12)", "longer than 12"][..]),
        (
            "code",
            &["character varying(10)", "character varying(40)"][..],
        ),
        (
            "amount",
            &[
                "more than 8 digits before the decimal point",
                "rounded to 2",
            ][..],
        ),
        ("n", &["integer", "bigint"][..]),
    ] {
        let w = warnings
            .iter()
            .find(|w| w.starts_with(&format!("column {column} of public.t ")))
            .unwrap_or_else(|| panic!("no warning for {column}: {warnings:#?}"));
        assert_mentions(w, words);
        assert_mentions(w, &["ALTER TABLE", "ALTER COLUMN"]);
    }
    assert_eq!(
        warnings.len(),
        4,
        "only the narrower columns: {warnings:#?}"
    );
}
