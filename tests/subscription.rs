//! Cases from PostgreSQL's own subscription TAP tests (`src/test/subscription/t/`) that
//! shadowsync must get right, each checked against blue and, where PostgreSQL's apply worker
//! defines the answer, against a native subscription fed by the same blue: a third database on
//! green (`native`) subscribes to a blue publication with its own slot (`native_sub`), and green
//! (shadowsync) must hold what native holds, which must be what we expect.
//!
//! Where each case comes from:
//! - `012_collation.pl`: a keyless `REPLICA IDENTITY FULL` table whose green column has a
//!   nondeterministic ICU collation, green pre-populated with a byte-wise different but
//!   collation-wise equal row (and the keyed `tab1` beside it); plus our numeric variant of the
//!   same idea (`1.00` on green, `1.0` on blue: equal as numeric, not as text).
//! - `013_partition.pl` ("subscriber handles cases where update/delete target tuple is
//!   missing"): on a keyless FULL table, an update or delete that matches no green row. Native
//!   skips it with a DEBUG1 line; shadowsync's contract is to apply it (the update as an insert)
//!   and record the conflict.
//! - `013_partition.pl`: a partitioned green table under conflict detection, with a green-side
//!   writer meeting blue's insert; and a `publish_via_partition_root` publication streaming into
//!   a green that holds only the root (unpartitioned, or partitioned differently: the TAP file's
//!   subscriber2), including its TRUNCATE rules.
//! - `100_bugs.pl` (`tab_replidentity_index`) and `013_partition.pl` (`tab5`): blue's
//!   `REPLICA IDENTITY USING INDEX`, green without a primary key.
//! - `031_column_list.pl` (`tab7`, "update/delete is not allowed for tables without RI"):
//!   blue's primary key dropped and recreated on other columns while streaming, with writes in
//!   between; and the same moment on a larger scale, `pgbench -i` run again on blue (drops and
//!   recreates its tables, loads them with TRUNCATE and COPY, adds the primary keys last).
//! - Not from a TAP file (the copies of `100_bugs.pl` read have no zero-column case; each was
//!   checked against native by hand, then here): a primary key with `INCLUDE` columns, and
//!   tables with no columns at all (`CREATE TABLE z ()`), streamed and in the initial copy.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shadowsync::config::{Config, SnapshotMode};
use shadowsync::lsn::Lsn;
use shadowsync::metrics::State;
use shadowsync::pipeline::{self, Handle, RunOptions};
use tokio_postgres::Client;

/// shadowsync's slot (see `common::Pair::config`).
const SLOT: &str = "test_slot";
/// The native subscription's database on green.
const NATIVE_DB: &str = "native";
/// The native subscription, and its slot on blue.
const NATIVE_SUB: &str = "native_sub";
/// Prefix of the logical message that marks a sync point on blue (not shadowsync's drain
/// prefix: shadowsync must treat it as any other blue transaction).
const MARKER: &str = "subscription-test";
/// Longest wait for either side to catch up (each test takes a few seconds when it passes).
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Harness: shadowsync and a native subscription, synced to the same point of blue's WAL.
// ---------------------------------------------------------------------------------------------

/// A running shadowsync pipeline; a failure surfaces as its own error, not as a timeout.
struct Shadow {
    handle: Option<Handle>,
}

impl Shadow {
    /// Starts the pipeline and waits until it streams (blue's writes from then on are in the
    /// slot); panics with the pipeline's error if it stops first.
    async fn start(config: Config) -> Shadow {
        let handle = pipeline::start(config, RunOptions::default())
            .await
            .expect("start the pipeline");
        let mut shadow = Shadow {
            handle: Some(handle),
        };
        let started = Instant::now();
        while !shadow.handle().shared.ready() {
            shadow.fail_if_stopped().await;
            assert!(
                started.elapsed() < DEADLINE,
                "shadowsync is not streaming after {DEADLINE:?}{}",
                shadow.errors()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shadow
    }

    fn handle(&self) -> &Handle {
        self.handle.as_ref().expect("the pipeline is running")
    }

    /// Panics with the pipeline's error when it has stopped for good.
    async fn fail_if_stopped(&mut self) {
        if self.handle().shared.state() == State::Failed {
            let handle = self.handle.take().expect("the pipeline is running");
            match handle.wait().await {
                Err(e) => panic!("shadowsync stopped: {e}"),
                Ok(report) => panic!("shadowsync stopped without an error: {report:?}"),
            }
        }
    }

    /// The error counters so far (retryable errors keep the pipeline reconnecting, so a
    /// timeout says what it kept meeting; the log above the panic has the messages).
    fn errors(&self) -> String {
        let metrics = self.handle().shared.encode();
        let lines: Vec<&str> = errors_counted(&metrics);
        if lines.is_empty() {
            String::new()
        } else {
            format!("; errors so far:\n{}", lines.join("\n"))
        }
    }

    /// Waits until blue's slot records `target` as confirmed: shadowsync confirms only what
    /// green has committed, so green then holds every blue transaction before it.
    async fn reach(&mut self, blue: &Client, target: Lsn) {
        let started = Instant::now();
        loop {
            self.fail_if_stopped().await;
            if slot_confirmed(blue, SLOT)
                .await
                .flatten()
                .is_some_and(|lsn| lsn >= target)
            {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "shadowsync did not confirm {} within {DEADLINE:?} (state {}){}",
                target,
                self.handle().shared.state().name(),
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn metrics(&self) -> String {
        self.handle().shared.encode()
    }

    /// Drains and waits for the pipeline to end.
    async fn finish(mut self) {
        let handle = self.handle.take().expect("the pipeline is running");
        handle.drain().await.expect("drain");
        handle.wait().await.expect("the pipeline ends");
    }
}

/// A native subscription on green (database `native`) to a blue publication.
struct Native {
    client: Client,
}

impl Native {
    /// Creates the database with `schema`, then the subscription (which creates its slot on
    /// blue at once: blue's changes from here on reach it).
    async fn start(pair: &Pair, schema: &str, publication: &str, copy_data: bool) -> Native {
        pair.green
            .create_database(NATIVE_DB)
            .expect("create the native database");
        if !schema.is_empty() {
            pair.green.psql(NATIVE_DB, schema).expect("native schema");
        }
        // Alone in its psql call: CREATE SUBSCRIPTION cannot create its slot in a transaction.
        pair.green
            .psql(
                NATIVE_DB,
                &format!(
                    "CREATE SUBSCRIPTION {NATIVE_SUB} CONNECTION '{}' PUBLICATION {publication} \
                     WITH (copy_data = {copy_data})",
                    pair.blue.dsn(DB)
                ),
            )
            .expect("create the native subscription");
        Native {
            client: connect(&pair.green.dsn(NATIVE_DB)).await,
        }
    }

    /// Waits until every table is synchronized and blue's slot for the subscription records
    /// `target` as confirmed (what TAP's wait_for_subscription_sync and wait_for_catchup do).
    async fn reach(&self, pair: &Pair, blue: &Client, target: Lsn) {
        let started = Instant::now();
        loop {
            let unsynced: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')",
                    &[],
                )
                .await
                .expect("read pg_subscription_rel")
                .get(0);
            if unsynced == 0
                && slot_confirmed(blue, NATIVE_SUB)
                    .await
                    .flatten()
                    .is_some_and(|lsn| lsn >= target)
            {
                return;
            }
            if started.elapsed() >= DEADLINE {
                let log = pair.green.server_log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "the native subscription did not reach {} within {DEADLINE:?}; green's log ends:\n{}",
                    target,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Blue's WAL insert position, made reachable: a transaction holding one logical message is
/// committed after reading it, with a local synchronous commit, so its commit record lies past
/// the position and is flushed (the clusters commit asynchronously, and an idle WAL tail, or an
/// insert position just past a page header, would otherwise never be confirmed).
async fn mark(blue: &Client) -> Lsn {
    let lsn = wal_insert_lsn(blue).await;
    blue.batch_execute("BEGIN; SET LOCAL synchronous_commit = local")
        .await
        .expect("begin the marker");
    blue.execute("SELECT pg_logical_emit_message(true, $1, '')", &[&MARKER])
        .await
        .expect("emit the marker");
    blue.batch_execute("COMMIT")
        .await
        .expect("commit the marker");
    lsn
}

/// Everything blue committed so far is in green and, with a native subscription, in native.
async fn sync(pair: &Pair, blue: &Client, shadow: &mut Shadow, native: Option<&Native>) {
    let target = mark(blue).await;
    shadow.reach(blue, target).await;
    if let Some(native) = native {
        native.reach(pair, blue, target).await;
    }
}

fn assert_rows(what: &str, got: &[String], want: &[String]) {
    if got != want {
        let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(5).collect();
        let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(5).collect();
        panic!(
            "{what}: {} rows, expected {}\nmissing: {missing:?}\nunexpected: {extra:?}\nall: {got:?}",
            got.len(),
            want.len()
        );
    }
}

/// Green (shadowsync) and native hold exactly `want` in `table`.
async fn assert_both(green: &Client, native: &Native, table: &str, want: &[String]) {
    assert_rows(
        &format!("green (shadowsync) {table}"),
        &rows(green, table).await,
        want,
    );
    assert_rows(
        &format!("native {table}"),
        &rows(&native.client, table).await,
        want,
    );
}

/// Green, native and blue hold the same rows in each table, and shadowsync recorded no
/// conflict (nobody else wrote to green).
async fn assert_three_way(pair: &Pair, native: &Native, tables: &[&str]) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    for t in tables {
        assert_both(&green, native, t, &rows(&blue, t).await).await;
    }
    assert_no_conflicts(&green).await;
}

fn strings(rows: &[&str]) -> Vec<String> {
    rows.iter().map(|r| r.to_string()).collect()
}

/// (kind, resolution) of each conflict recorded for `table`, sorted.
async fn conflicts_of(green: &Client, table: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = green
        .query(
            "SELECT kind, resolution FROM shadowsync.conflicts WHERE target_table = $1",
            &[&table],
        )
        .await
        .expect("read shadowsync.conflicts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    found.sort();
    found
}

fn assert_metric(metrics: &str, line: &str) {
    assert!(
        metrics.lines().any(|l| l == line),
        "missing metric line {line} in\n{metrics}"
    );
}

fn never_copy(mut config: Config) -> Config {
    config.snapshot.mode = SnapshotMode::Never;
    config
}

// ---------------------------------------------------------------------------------------------
// 012_collation.pl, and the same question for numeric values.
// ---------------------------------------------------------------------------------------------

const COLLATION_BLUE: &str = r"
CREATE TABLE tab1 (a text PRIMARY KEY, b text);
INSERT INTO tab1 VALUES (U&'\00E4bc', 'foo');
CREATE TABLE tab2 (a text, b text);
ALTER TABLE tab2 REPLICA IDENTITY FULL;
INSERT INTO tab2 VALUES (U&'\00E4bc', 'foo');
CREATE PUBLICATION test_pub FOR TABLE tab1, tab2;
";

/// Green (and native): the nondeterministic collation on `a`, and each row pre-populated in
/// the other normal form (a + combining diaeresis: equal under the collation, not byte-wise).
const COLLATION_GREEN: &str = r"
CREATE COLLATION ctest_nondet (provider = icu, locale = 'und', deterministic = false);
CREATE TABLE tab1 (a text COLLATE ctest_nondet PRIMARY KEY, b text);
INSERT INTO tab1 VALUES (U&'\0061\0308bc', 'foo');
CREATE TABLE tab2 (a text COLLATE ctest_nondet, b text);
ALTER TABLE tab2 REPLICA IDENTITY FULL;
INSERT INTO tab2 VALUES (U&'\0061\0308bc', 'foo');
";

/// Blue's update and delete of a keyless FULL row must find green's row as green compares it:
/// by the column's collation. Comparing the rows' text, as bytes, finds nothing: the update
/// then leaves green with two rows and the delete with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_full_rows_match_under_green_nondeterministic_collation() {
    init_logging();
    let pair = Pair::start("");
    let icu: i64 = pair
        .green()
        .await
        .query_one(
            "SELECT count(*) FROM pg_collation WHERE collprovider = 'i'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if icu == 0 {
        eprintln!("skipped: this PostgreSQL build has no ICU collations (built without ICU)");
        return;
    }
    pair.blue.psql(DB, COLLATION_BLUE).unwrap();
    pair.green.psql(DB, COLLATION_GREEN).unwrap();
    let native = Native::start(&pair, COLLATION_GREEN, "test_pub", false).await;
    // Green was populated by hand: no initial copy.
    let mut shadow = Shadow::start(never_copy(pair.config())).await;
    let (blue, green) = (pair.blue().await, pair.green().await);

    blue.batch_execute("UPDATE tab1 SET b = 'bar' WHERE b = 'foo'")
        .await
        .unwrap();
    blue.batch_execute("UPDATE tab2 SET b = 'bar' WHERE b = 'foo'")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    // The keyed table, as the TAP file checks it: the one row has the new b. (Native rewrites
    // the key with blue's bytes, an upsert may keep green's: both are the same key on green.)
    for (side, client) in [("green (shadowsync)", &green), ("native", &native.client)] {
        let b: Vec<String> = client
            .query("SELECT b FROM tab1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            b,
            ["bar"],
            "{side}: update with a primary key under a nondeterministic collation"
        );
    }
    // The keyless row: one row, blue's whole new image (a in blue's normal form).
    assert_both(&green, &native, "tab2", &rows(&blue, "tab2").await).await;
    assert_eq!(
        rows(&blue, "tab2").await,
        ["(\u{e4}bc,bar)"],
        "blue's row after the update"
    );

    blue.batch_execute("DELETE FROM tab2").await.unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(&green, &native, "tab2", &[]).await;
    assert_no_conflicts(&green).await;
    shadow.finish().await;
}

const NUMERIC_SCHEMA: &str = "
CREATE TABLE tabn (n numeric, note text);
ALTER TABLE tabn REPLICA IDENTITY FULL;
";

/// The same as the collation case with numeric values, and no ICU needed: green holds `1.00`,
/// blue `1.0`. Equal as numeric (native's apply worker compares with the type's equality),
/// different as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_full_rows_match_numerically_equal_values() {
    init_logging();
    let pair = Pair::start(NUMERIC_SCHEMA);
    pair.blue
        .psql(
            DB,
            "INSERT INTO tabn VALUES (1.0, 'foo'), (2.50, 'two'); CREATE PUBLICATION test_pub FOR TABLE tabn",
        )
        .unwrap();
    let green_rows = "INSERT INTO tabn VALUES (1.00, 'foo'), (2.5, 'two')";
    pair.green.psql(DB, green_rows).unwrap();
    let native = Native::start(
        &pair,
        &format!("{NUMERIC_SCHEMA}{green_rows}"),
        "test_pub",
        false,
    )
    .await;
    let mut shadow = Shadow::start(never_copy(pair.config())).await;
    let (blue, green) = (pair.blue().await, pair.green().await);

    blue.batch_execute("UPDATE tabn SET note = 'bar' WHERE n = 1")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(
        &green,
        &native,
        "tabn",
        &strings(&["(1.0,bar)", "(2.5,two)"]),
    )
    .await;

    blue.batch_execute("DELETE FROM tabn").await.unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(&green, &native, "tabn", &[]).await;
    assert_no_conflicts(&green).await;
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 013_partition.pl: a change whose target row is missing, on a keyless FULL table.
// ---------------------------------------------------------------------------------------------

const BAG: &str = "
CREATE TABLE bag (a int, b text);
ALTER TABLE bag REPLICA IDENTITY FULL;
";

/// An update or delete of a keyless FULL table that finds no equal row on green (a writer on
/// green removed it) is a conflict like on keyed tables: recorded as `update_missing` /
/// `delete_missing`, resolution `apply` (no lww column), and counted in the metric. The
/// update is applied as an insert of the new row. (Native skips both silently, so there is no
/// native comparison here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_full_change_without_green_row_is_a_conflict() {
    init_logging();
    let pair = Pair::start(BAG);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE bag")
        .unwrap();
    let mut shadow = Shadow::start(pair.config()).await;
    let (blue, green) = (pair.blue().await, pair.green().await);
    blue.batch_execute("INSERT INTO bag VALUES (1, 'x'), (2, 'y'), (3, 'z')")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, None).await;
    assert_same(&pair, &["bag"]).await;

    green
        .batch_execute("DELETE FROM bag WHERE a IN (1, 2)")
        .await
        .unwrap();
    blue.batch_execute("UPDATE bag SET b = 'x2' WHERE a = 1")
        .await
        .unwrap();
    blue.batch_execute("DELETE FROM bag WHERE a = 2")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, None).await;

    assert_rows(
        "green bag",
        &rows(&green, "bag").await,
        &strings(&["(1,x2)", "(3,z)"]),
    );
    assert_eq!(
        conflicts_of(&green, "public.bag").await,
        [
            ("delete_missing".to_string(), "apply".to_string()),
            ("update_missing".to_string(), "apply".to_string()),
        ]
    );
    let existing: Vec<bool> = green
        .query(
            "SELECT existing IS NULL FROM shadowsync.conflicts WHERE target_table = 'public.bag'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(existing, [true, true], "no green row existed for either");
    let metrics = shadow.metrics();
    for kind in ["update_missing", "delete_missing"] {
        assert_metric(
            &metrics,
            &format!(
                "shadowsync_conflicts_total{{table=\"public.bag\",kind=\"{kind}\",resolution=\"apply\"}} 1"
            ),
        );
    }
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 013_partition.pl: partitioned tables.
// ---------------------------------------------------------------------------------------------

const PARTITIONED: &str = "
CREATE TABLE t (a int PRIMARY KEY, b text) PARTITION BY RANGE (a);
CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (10);
CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (10) TO (20);
";

/// Green partitioned like blue, conflict detection on (the default): plain changes, a change
/// of a row's partition, then a writer on green inserting a key blue inserts later. Green's
/// unique violation then names the partition's index (`t_1_pkey`), not the parent's
/// constraint: it must still be recognised as `insert_exists` (blue's row applied), and the
/// stream must go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_green_table_applies_and_records_insert_exists() {
    init_logging();
    let pair = Pair::start(PARTITIONED);
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE t WITH (publish_via_partition_root = true)",
        )
        .unwrap();
    let native = Native::start(&pair, PARTITIONED, "test_pub", false).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let (blue, green) = (pair.blue().await, pair.green().await);

    blue.batch_execute("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c'), (11, 'k'), (12, 'l')")
        .await
        .unwrap();
    blue.batch_execute("UPDATE t SET b = 'z' WHERE a = 1")
        .await
        .unwrap();
    blue.batch_execute("DELETE FROM t WHERE a IN (3, 12)")
        .await
        .unwrap();
    // From t_1 to t_2.
    blue.batch_execute("UPDATE t SET a = 13 WHERE a = 2")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["t"]).await;
    assert_eq!(
        rows(&blue, "t").await,
        ["(1,z)", "(11,k)", "(13,b)"],
        "blue's rows"
    );

    green
        .batch_execute("INSERT INTO t VALUES (5, 'green')")
        .await
        .unwrap();
    blue.batch_execute("INSERT INTO t VALUES (5, 'blue'), (15, 'blue')")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    let want = rows(&blue, "t").await;
    assert_both(&green, &native, "t", &want).await;
    assert_eq!(
        conflicts_of(&green, "public.t").await,
        [("insert_exists".to_string(), "apply".to_string())]
    );
    let key: String = green
        .query_one(
            "SELECT key::text FROM shadowsync.conflicts WHERE target_table = 'public.t'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "{\"a\": 5}");
    assert_metric(
        &shadow.metrics(),
        "shadowsync_conflicts_total{table=\"public.t\",kind=\"insert_exists\",resolution=\"apply\"} 1",
    );

    // The stream goes on.
    blue.batch_execute(
        "UPDATE t SET b = 'after' WHERE a IN (5, 15); INSERT INTO t VALUES (7, 'new')",
    )
    .await
    .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(&green, &native, "t", &rows(&blue, "t").await).await;
    shadow.finish().await;
}

const VIA_ROOT_BLUE: &str = "
CREATE TABLE t (a int PRIMARY KEY, b text) PARTITION BY RANGE (a);
CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (10);
CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (10) TO (20);
CREATE TABLE u (a int PRIMARY KEY, b text) PARTITION BY RANGE (a);
CREATE TABLE u_1 PARTITION OF u FOR VALUES FROM (0) TO (10);
CREATE TABLE u_2 PARTITION OF u FOR VALUES FROM (10) TO (20);
CREATE PUBLICATION test_pub FOR TABLE t, u WITH (publish_via_partition_root = true);
";

/// Green (and native) hold only the roots: `t` unpartitioned, `u` partitioned by hash into
/// partitions of other names (as the TAP file's subscriber2 does with tab1).
const VIA_ROOT_GREEN: &str = "
CREATE TABLE t (a int PRIMARY KEY, b text);
CREATE TABLE u (a int PRIMARY KEY, b text) PARTITION BY HASH (a);
CREATE TABLE u_h0 PARTITION OF u FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE u_h1 PARTITION OF u FOR VALUES WITH (MODULUS 2, REMAINDER 1);
";

/// A `publish_via_partition_root` publication streaming into a green that has no table of
/// blue's partitions. What sends the leaf's Relation message: nothing special, the plain
/// via-root publication above. pgoutput's `maybe_send_schema` sends, before a partition's
/// first change in a session, the root's Relation message *and then the partition's own*
/// ("XXX - maybe sending only the former suffices?"), while the change itself names the root.
/// Native keeps the leaf's description and never looks its table up, since no change refers
/// to it; shadowsync must do the same rather than stop with "table public.t_1 is missing on
/// green". TRUNCATE follows `pgoutput_truncate`: a partition truncated alone is not published
/// under via-root (the TAP file: "these will NOT be replicated"), so green keeps those rows as
/// native does; truncating the root is published as the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn via_root_publication_into_green_that_holds_only_the_root() {
    init_logging();
    let pair = Pair::start("");
    pair.blue.psql(DB, VIA_ROOT_BLUE).unwrap();
    pair.green.psql(DB, VIA_ROOT_GREEN).unwrap();
    let native = Native::start(&pair, VIA_ROOT_GREEN, "test_pub", false).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let (blue, green) = (pair.blue().await, pair.green().await);

    for table in ["t", "u"] {
        blue.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (3, 'c'), (11, 'k'), (12, 'l');
             UPDATE {table} SET b = 'z' WHERE a = 11;"
        ))
        .await
        .unwrap();
        blue.batch_execute(&format!("UPDATE {table} SET a = 14 WHERE a = 2"))
            .await
            .unwrap();
        blue.batch_execute(&format!("DELETE FROM {table} WHERE a = 3"))
            .await
            .unwrap();
    }
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["t", "u"]).await;
    assert_eq!(
        rows(&blue, "t").await,
        ["(1,a)", "(11,z)", "(12,l)", "(14,b)"],
        "blue's rows"
    );

    // A partition truncated alone: not published, green and native keep its rows.
    let before = rows(&blue, "t").await;
    blue.batch_execute("TRUNCATE t_2").await.unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(&green, &native, "t", &before).await;
    assert_eq!(rows(&blue, "t").await, ["(1,a)"], "blue's rows");

    // The roots truncated: published as the roots.
    blue.batch_execute("TRUNCATE t, u").await.unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_both(&green, &native, "t", &[]).await;
    assert_both(&green, &native, "u", &[]).await;

    blue.batch_execute(
        "INSERT INTO t VALUES (4, 'again'), (16, 'again'); INSERT INTO u VALUES (5, 'again')",
    )
    .await
    .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["t", "u"]).await;
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Keys: INCLUDE columns, REPLICA IDENTITY USING INDEX (100_bugs.pl, 013_partition.pl).
// ---------------------------------------------------------------------------------------------

const INCLUDE: &str = "
CREATE TABLE inc (a int, b text, c int, PRIMARY KEY (a) INCLUDE (b));
";

/// A primary key with INCLUDE columns: the key is `a` alone (blue's replica identity marks only
/// `a`), `b` merely rides along in the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_key_with_include_columns() {
    init_logging();
    let pair = Pair::start(INCLUDE);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE inc")
        .unwrap();
    let native = Native::start(&pair, INCLUDE, "test_pub", false).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let blue = pair.blue().await;

    blue.batch_execute("INSERT INTO inc VALUES (1, 'x', 1), (2, 'y', 2), (3, 'z', 3)")
        .await
        .unwrap();
    blue.batch_execute("UPDATE inc SET b = 'x2', c = 10 WHERE a = 1")
        .await
        .unwrap();
    blue.batch_execute("UPDATE inc SET a = 4 WHERE a = 2")
        .await
        .unwrap();
    blue.batch_execute("DELETE FROM inc WHERE a = 3")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["inc"]).await;
    assert_eq!(
        rows(&blue, "inc").await,
        ["(1,x2,10)", "(4,y,2)"],
        "blue's rows"
    );
    shadow.finish().await;
}

const RI_BLUE: &str = "
CREATE TABLE ri_same (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX ri_same_ab ON ri_same (a, b);
ALTER TABLE ri_same REPLICA IDENTITY USING INDEX ri_same_ab;
CREATE TABLE ri_unique (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX ri_unique_ab ON ri_unique (a, b);
ALTER TABLE ri_unique REPLICA IDENTITY USING INDEX ri_unique_ab;
CREATE TABLE tab_replidentity_index (a int NOT NULL, b int NOT NULL);
CREATE UNIQUE INDEX idx_replidentity_index_a ON tab_replidentity_index (a);
CREATE UNIQUE INDEX idx_replidentity_index_b ON tab_replidentity_index (b);
ALTER TABLE tab_replidentity_index REPLICA IDENTITY USING INDEX idx_replidentity_index_a;
CREATE PUBLICATION test_pub FOR TABLE ri_same, ri_unique, tab_replidentity_index;
CREATE PUBLICATION native_pub FOR TABLE ri_same, tab_replidentity_index;
";

/// Green, no primary key anywhere: `ri_same` has blue's unique index as its replica identity
/// too; `ri_unique` only a unique index over the same NOT NULL columns (native refuses
/// updates there: its target needs a replica identity index or a primary key, so native's
/// publication leaves it out); `tab_replidentity_index` as 100_bugs.pl sets it up, green's
/// identity on the index blue switches to later.
const RI_GREEN: &str = "
CREATE TABLE ri_same (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX ri_same_ab ON ri_same (a, b);
ALTER TABLE ri_same REPLICA IDENTITY USING INDEX ri_same_ab;
CREATE TABLE ri_unique (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX ri_unique_ab ON ri_unique (a, b);
CREATE TABLE tab_replidentity_index (a int NOT NULL, b int NOT NULL);
CREATE UNIQUE INDEX idx_replidentity_index_a ON tab_replidentity_index (a);
CREATE UNIQUE INDEX idx_replidentity_index_b ON tab_replidentity_index (b);
ALTER TABLE tab_replidentity_index REPLICA IDENTITY USING INDEX idx_replidentity_index_b;
";

/// Blue identifies rows by a unique index (`REPLICA IDENTITY USING INDEX`), green has no
/// primary key but a unique index over the same NOT NULL columns: updates (of other columns
/// and of the key) and deletes are applied by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_identity_index_without_green_primary_key() {
    init_logging();
    let pair = Pair::start("");
    pair.blue.psql(DB, RI_BLUE).unwrap();
    pair.green.psql(DB, RI_GREEN).unwrap();
    let native = Native::start(&pair, RI_GREEN, "native_pub", false).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let (blue, green) = (pair.blue().await, pair.green().await);

    for table in ["ri_same", "ri_unique"] {
        blue.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 1, 'x'), (2, 2, 'y'), (3, 3, 'z')"
        ))
        .await
        .unwrap();
        blue.batch_execute(&format!("UPDATE {table} SET c = 'x2' WHERE a = 1"))
            .await
            .unwrap();
        blue.batch_execute(&format!("UPDATE {table} SET a = -a WHERE a = 2"))
            .await
            .unwrap();
        blue.batch_execute(&format!("DELETE FROM {table} WHERE a = 3"))
            .await
            .unwrap();
    }
    blue.batch_execute("INSERT INTO tab_replidentity_index VALUES (1, 1), (2, 2)")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    // 100_bugs.pl: blue moves its identity to the other index, then updates and deletes.
    blue.batch_execute(
        "ALTER TABLE tab_replidentity_index REPLICA IDENTITY USING INDEX idx_replidentity_index_b",
    )
    .await
    .unwrap();
    blue.batch_execute("UPDATE tab_replidentity_index SET a = -a WHERE a = 1")
        .await
        .unwrap();
    blue.batch_execute("DELETE FROM tab_replidentity_index WHERE a = 2")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;

    let want = strings(&["(-2,2,y)", "(1,1,x2)"]);
    assert_eq!(rows(&blue, "ri_same").await, want, "blue's rows");
    assert_both(&green, &native, "ri_same", &want).await;
    assert_rows("green ri_unique", &rows(&green, "ri_unique").await, &want);
    assert_both(
        &green,
        &native,
        "tab_replidentity_index",
        &strings(&["(-1,1)"]),
    )
    .await;
    assert_no_conflicts(&green).await;
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Tables without columns.
// ---------------------------------------------------------------------------------------------

/// `z0`: no identity (blue refuses its deletes and updates, inserts and TRUNCATE go);
/// `zf`: REPLICA IDENTITY FULL, so blue deletes too, and an empty old image matches any row.
const ZERO: &str = "
CREATE TABLE z0 ();
CREATE TABLE zf ();
ALTER TABLE zf REPLICA IDENTITY FULL;
";

async fn counts(client: &Client) -> (i64, i64) {
    (count(client, "z0").await, count(client, "zf").await)
}

async fn assert_counts(pair: &Pair, native: &Native, want: (i64, i64)) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    assert_eq!(counts(&blue).await, want, "blue's (z0, zf) row counts");
    assert_eq!(counts(&native.client).await, want, "native (z0, zf)");
    assert_eq!(counts(&green).await, want, "green (shadowsync) (z0, zf)");
}

/// Zero-column tables, streamed: native inserts their (empty) rows and, with FULL identity,
/// deletes one row per deleted row; TRUNCATE empties them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_column_tables_stream_like_native() {
    init_logging();
    let pair = Pair::start(ZERO);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE z0, zf")
        .unwrap();
    let native = Native::start(&pair, ZERO, "test_pub", false).await;
    // Streaming alone (the initial copy has its own test below).
    let mut shadow = Shadow::start(never_copy(pair.config())).await;
    let blue = pair.blue().await;

    blue.batch_execute(
        "INSERT INTO z0 SELECT FROM generate_series(1, 5);
         INSERT INTO zf SELECT FROM generate_series(1, 5);",
    )
    .await
    .unwrap();
    blue.batch_execute("DELETE FROM zf WHERE ctid IN (SELECT ctid FROM zf LIMIT 2)")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_counts(&pair, &native, (5, 3)).await;

    blue.batch_execute("TRUNCATE z0").await.unwrap();
    blue.batch_execute("INSERT INTO zf SELECT FROM generate_series(1, 2)")
        .await
        .unwrap();
    blue.batch_execute("DELETE FROM zf WHERE ctid IN (SELECT ctid FROM zf LIMIT 1)")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_counts(&pair, &native, (0, 4)).await;
    assert_no_conflicts(&pair.green().await).await;
    shadow.finish().await;
}

/// Zero-column tables in the initial copy: native's table sync copies their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_column_tables_initial_copy() {
    init_logging();
    let pair = Pair::start(ZERO);
    pair.blue
        .psql(
            DB,
            "INSERT INTO z0 SELECT FROM generate_series(1, 3);
             INSERT INTO zf SELECT FROM generate_series(1, 4);
             CREATE PUBLICATION test_pub FOR TABLE z0, zf;",
        )
        .unwrap();
    let native = Native::start(&pair, ZERO, "test_pub", true).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO zf SELECT FROM generate_series(1, 2)")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_counts(&pair, &native, (3, 6)).await;
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 031_column_list.pl (tab7): a moment without replica identity; pgbench -i run again.
// ---------------------------------------------------------------------------------------------

const TAB7: &str = "
CREATE TABLE tab7 (a int PRIMARY KEY, b int, c int, d int);
";

/// Blue replaces its primary key while streaming, once with writes between dropping the old
/// key and adding the new one (blue then has no replica identity: inserts go, updates and
/// deletes would be refused by blue itself). Green keeps its own key on `a`, which every later
/// identity of blue contains. Each step as its own transaction (as the TAP file runs it), then
/// the same moment inside one transaction (as a migration tool would run it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_key_dropped_and_recreated_while_streaming() {
    init_logging();
    let pair = Pair::start(TAB7);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE tab7")
        .unwrap();
    let native = Native::start(&pair, TAB7, "test_pub", false).await;
    let mut shadow = Shadow::start(pair.config()).await;
    let blue = pair.blue().await;
    let steps = |sql: &'static str| {
        let blue = &blue;
        async move {
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                blue.batch_execute(statement)
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: {e}"));
            }
        }
    };

    steps(
        "INSERT INTO tab7 VALUES (1, 22, 333, 4444), (2, 33, 444, 5555);
         UPDATE tab7 SET b = b * 2, c = c * 3, d = d * 4",
    )
    .await;
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["tab7"]).await;

    // The key moves to (a, b).
    steps(
        "ALTER TABLE tab7 DROP CONSTRAINT tab7_pkey;
         ALTER TABLE tab7 ADD PRIMARY KEY (a, b);
         INSERT INTO tab7 VALUES (3, 55, 666, 7777);
         UPDATE tab7 SET b = b * 2, c = c * 3, d = d * 4",
    )
    .await;
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["tab7"]).await;

    // Writes while blue has no key at all, then the key on (b, a).
    steps(
        "ALTER TABLE tab7 DROP CONSTRAINT tab7_pkey;
         INSERT INTO tab7 VALUES (4, 77, 888, 9999);
         ALTER TABLE tab7 ADD PRIMARY KEY (b, a);
         UPDATE tab7 SET b = b * 2, c = c * 3, d = d * 4;
         DELETE FROM tab7 WHERE a = 1",
    )
    .await;
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["tab7"]).await;
    assert_eq!(
        rows(&blue, "tab7").await,
        [
            "(2,264,11988,355520)",
            "(3,220,5994,124432)",
            "(4,154,2664,39996)"
        ],
        "blue's rows"
    );

    // The same moment inside one blue transaction.
    blue.batch_execute(
        "BEGIN;
         ALTER TABLE tab7 DROP CONSTRAINT tab7_pkey;
         INSERT INTO tab7 VALUES (5, 10, 20, 30);
         ALTER TABLE tab7 ADD PRIMARY KEY (a);
         UPDATE tab7 SET c = -c WHERE a IN (2, 5);
         DELETE FROM tab7 WHERE a = 4;
         COMMIT;",
    )
    .await
    .unwrap();
    steps("UPDATE tab7 SET d = 0 WHERE a = 3").await;
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_three_way(&pair, &native, &["tab7"]).await;
    shadow.finish().await;
}

const PGBENCH_TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// Runs pgbench (from the server's bin directory) against `db` of `cluster`.
fn pgbench(cluster: &shadowsync::cluster::Cluster, db: &str, args: &[&str]) {
    let out = tokio::task::block_in_place(|| {
        cluster
            .command("pgbench")
            .args(args)
            .arg("-h")
            .arg(cluster.socket_dir())
            .args(["-p", &cluster.port().to_string()])
            .args(["-U", shadowsync::cluster::SUPERUSER, db])
            .output()
            .expect("run pgbench")
    });
    assert!(
        out.status.success(),
        "pgbench {args:?} on {}/{db} failed: {}",
        cluster.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pgbench -i` run again on blue while streaming, under a FOR ALL TABLES publication: it drops
/// its tables and creates them anew (new OIDs, no primary keys yet), loads them (TRUNCATE, then
/// rows) and only then adds the primary keys. Green's tables keep their keys throughout, so
/// for a while blue's relations have no replica identity while green's have keys: inserts and
/// the TRUNCATE must go, and the updates of the workload that follows match by the new keys.
/// `pgbench_history` has no key on either side (compared as a multiset: `rows` sorts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbench_reinitialized_while_streaming() {
    init_logging();
    let pair = Pair::start("");
    if !pair.blue.bin_dir().join("pgbench").is_file() {
        eprintln!(
            "skipped: no pgbench in {} (PostgreSQL's client programs)",
            pair.blue.bin_dir().display()
        );
        return;
    }
    let init = ["-i", "-q", "-s", "1"];
    // The same deterministic data on all three, the way pgbench creates it.
    pgbench(&pair.blue, DB, &init);
    pgbench(&pair.green, DB, &init);
    pair.green.create_database(NATIVE_DB).unwrap();
    pgbench(&pair.green, NATIVE_DB, &init);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR ALL TABLES")
        .unwrap();
    pair.green
        .psql(
            NATIVE_DB,
            &format!(
                "CREATE SUBSCRIPTION {NATIVE_SUB} CONNECTION '{}' PUBLICATION test_pub WITH (copy_data = false)",
                pair.blue.dsn(DB)
            ),
        )
        .unwrap();
    let native = Native {
        client: connect(&pair.green.dsn(NATIVE_DB)).await,
    };
    // Green already holds blue's rows.
    let mut shadow = Shadow::start(never_copy(pair.config())).await;
    let blue = pair.blue().await;

    pgbench(&pair.blue, DB, &init);
    pgbench(&pair.blue, DB, &["-n", "-c", "2", "-t", "150"]);
    sync(&pair, &blue, &mut shadow, Some(&native)).await;
    assert_eq!(
        count(&blue, "pgbench_history").await,
        300,
        "blue's history rows"
    );
    assert_three_way(&pair, &native, &PGBENCH_TABLES).await;
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Not from a TAP file: columns named like the aliases of shadowsync's own statements.
// ---------------------------------------------------------------------------------------------

/// Columns named as the statements' relations (`s`, `e`, `c`, `k`, `w` in the conflict-
/// detecting upsert; `v`, `d`, `m`, `t2` in the keyless delete) must not capture their
/// whole-row references: `to_jsonb(s)` reads a column `s` when there is one (or is ambiguous).
/// A green writer's rows make both statements write conflict records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn columns_named_like_statement_aliases() {
    init_logging();
    let pair = Pair::start(
        "CREATE TABLE clash (id int PRIMARY KEY, s text, e text, c text, k text, w text, src text);
         CREATE TABLE clash_full (v text, d text, m text, t2 text, e text, s text);
         ALTER TABLE clash_full REPLICA IDENTITY FULL;",
    );
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE clash, clash_full",
        )
        .unwrap();
    let mut shadow = Shadow::start(pair.config()).await;
    let (blue, green) = (pair.blue().await, pair.green().await);
    blue.batch_execute(
        "INSERT INTO clash VALUES (1, 's', 'e', 'c', 'k', 'w', 'src'), (2, 's', 'e', 'c', 'k', 'w', 'src');
         INSERT INTO clash_full VALUES ('v', 'd', 'm', 't2', 'e', 's'), ('v2', 'd', 'm', 't2', 'e', 's');",
    )
    .await
    .unwrap();
    sync(&pair, &blue, &mut shadow, None).await;
    assert_same(&pair, &["clash", "clash_full"]).await;

    // Green writes first: blue's insert meets a row, blue's update and delete meet none.
    green
        .batch_execute(
            "INSERT INTO clash VALUES (3, 'green', 'e', 'c', 'k', 'w', 'src');
             DELETE FROM clash_full WHERE v = 'v2';",
        )
        .await
        .unwrap();
    blue.batch_execute(
        "INSERT INTO clash VALUES (3, 'blue', 'e', 'c', 'k', 'w', 'src');
         UPDATE clash SET s = 's2', e = 'e2' WHERE id = 1;
         DELETE FROM clash WHERE id = 2;
         UPDATE clash_full SET v = 'v1', e = 'e1' WHERE v = 'v';
         DELETE FROM clash_full WHERE v = 'v2';",
    )
    .await
    .unwrap();
    sync(&pair, &blue, &mut shadow, None).await;
    for t in ["clash", "clash_full"] {
        assert_rows(
            &format!("green {t}"),
            &rows(&green, t).await,
            &rows(&blue, t).await,
        );
    }
    assert_eq!(
        conflicts_of(&green, "public.clash").await,
        [("insert_exists".to_string(), "apply".to_string())]
    );
    assert_eq!(
        conflicts_of(&green, "public.clash_full").await,
        [("delete_missing".to_string(), "apply".to_string())]
    );
    // The records hold the rows, not a column's value.
    let record = green
        .query_one(
            "SELECT incoming->>'s', existing->>'s' FROM shadowsync.conflicts WHERE target_table = 'public.clash'",
            &[],
        )
        .await
        .unwrap();
    let (incoming, existing): (String, String) = (record.get(0), record.get(1));
    assert_eq!((incoming.as_str(), existing.as_str()), ("blue", "green"));
    let image: String = green
        .query_one(
            "SELECT key->>'v' FROM shadowsync.conflicts WHERE target_table = 'public.clash_full'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(image, "v2");
    shadow.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Setups that must be refused, not merged (found in review).
// ---------------------------------------------------------------------------------------------

/// A green unique index over part of blue's key, or one whose columns may be NULL, is no key
/// for blue's rows: two blue rows would merge into one green row without a trace. `check`
/// (and so `run`) refuses, naming blue's identity columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn green_unique_index_over_part_of_blues_key_is_refused() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE su (a int, b int, v text, PRIMARY KEY (a, b));
             CREATE TABLE sn (a int, b int, v text, PRIMARY KEY (a, b));
             CREATE PUBLICATION test_pub FOR TABLE su, sn;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE su (a int NOT NULL, b int, v text, UNIQUE (a));
             CREATE TABLE sn (a int, b int, v text, UNIQUE (a, b));",
        )
        .unwrap();
    let report = shadowsync::check::command(&pair.config()).await.unwrap();
    assert!(!report.ok());
    for table in ["su", "sn"] {
        let m = report
            .mappings
            .iter()
            .find(|m| m.source.name == table)
            .unwrap();
        assert!(
            m.problems.iter().any(|p| p
                .contains(&format!("green table public.{table} has no primary key"))
                && p.contains("(a, b)")),
            "{table}: {:?}",
            m.problems
        );
    }
}

/// While blue describes a table without replica identity, it may hold a key twice; green's
/// key cannot. The pipeline stops naming the table and the key (as PostgreSQL's apply worker
/// stops on the unique violation), instead of merging the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_inserted_twice_while_blue_has_no_identity_stops_the_pipeline() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE nd (id int, v text);
             CREATE PUBLICATION test_pub FOR TABLE nd WITH (publish = 'insert, truncate');",
        )
        .unwrap();
    pair.green
        .psql(DB, "CREATE TABLE nd (id int PRIMARY KEY, v text);")
        .unwrap();
    let mut shadow = Shadow::start(pair.config()).await;
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO nd VALUES (7, 'once')")
        .await
        .unwrap();
    sync(&pair, &blue, &mut shadow, None).await;
    blue.batch_execute("BEGIN; INSERT INTO nd VALUES (1, 'a'), (1, 'b'); COMMIT")
        .await
        .unwrap();
    let handle = shadow.handle.take().unwrap();
    let error = match tokio::time::timeout(DEADLINE, handle.wait()).await {
        Err(_) => panic!("the pipeline did not stop within {DEADLINE:?}"),
        Ok(Ok(report)) => panic!("the pipeline should have stopped; it reported {report:?}"),
        Ok(Err(e)) => e.to_string(),
    };
    for words in ["public.nd", "(id)=(1)", "a second time", "primary key"] {
        assert!(error.contains(words), "{words:?} missing from: {error}");
    }
    let green = pair.green().await;
    assert_rows(
        "green nd",
        &rows(&green, "nd").await,
        &strings(&["(7,once)"]),
    );
}

/// A partitioned table published through its root is described with the root's identity,
/// while each partition logs old rows by its own: a FULL root over a partition that is not
/// FULL sends "full" old rows of NULLs, and a root without a key of its own (its partitions
/// have theirs) is described without identity while blue accepts its updates. Both are
/// refused by `check`, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_identities_the_root_does_not_describe_are_refused() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TABLE pr (id int, v text) PARTITION BY RANGE (id);
             ALTER TABLE pr REPLICA IDENTITY FULL;
             CREATE TABLE pr1 PARTITION OF pr FOR VALUES FROM (0) TO (100);
             ALTER TABLE pr1 ADD PRIMARY KEY (id);
             CREATE TABLE qr (id int, v text) PARTITION BY RANGE (id);
             CREATE TABLE qr1 PARTITION OF qr FOR VALUES FROM (0) TO (100);
             ALTER TABLE qr1 ADD PRIMARY KEY (id);
             CREATE PUBLICATION test_pub FOR TABLE pr, qr WITH (publish_via_partition_root);",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TABLE pr (id int, v text); CREATE TABLE qr (id int PRIMARY KEY, v text);",
        )
        .unwrap();
    let report = shadowsync::check::command(&pair.config()).await.unwrap();
    let problems = |table: &str| {
        report
            .mappings
            .iter()
            .find(|m| m.source.name == table)
            .unwrap()
            .problems
            .join("\n")
    };
    let pr = problems("pr");
    assert!(
        pr.contains("public.pr1") && pr.contains("REPLICA IDENTITY FULL"),
        "{pr}"
    );
    let qr = problems("qr");
    assert!(
        qr.contains("no primary key") && qr.contains("\"public\".\"qr\" itself"),
        "{qr}"
    );
}
