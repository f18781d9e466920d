//! `verify`'s comparison speed (the issue's goals on a 2-core machine, 5,000,000 rows of 11
//! columns: an identity mapping compared at 1,000,000 rows/s or more when nothing differs,
//! through rules at 300,000 rows/s or more, and 10 differing rows among them adding less than
//! 2 s of bisection).
//!
//! Fresh clusters; blue gets `rows` rows of an 11-column table `w` (ints, text, numeric, jsonb,
//! timestamptz, bool), and green the same rows twice: `w` (an identity mapping) and `r`, the
//! result of a rule mapping (`publication` over blue's `w` and a second blue table `v`, a copy
//! of `w`, mapped to `r` by rules: a renamed column, a CASE, a JSON extraction, a cast). The
//! tables are written by SQL directly (no stream: the bench measures the comparison, not the
//! sync) and analyzed. Then, each inside one REPEATABLE READ snapshot per side:
//! 1. `w` equal, 2. `r` equal, 3. `w` with 10 rows changed on green: the time over the equal
//!    run is the bisection's cost; the 10 keys must be reported; 4. `w` incremental (`verify
//!    --since-lsn`): a point is taken (each side's snapshot xmin), 1,000 rows are then updated
//!    alike on both sides (as the stream would), and `w` is compared since the point: the
//!    keys as sets, the 1,000 rows in full.
//!
//! Run: `cargo bench --bench verify -- [--rows N] [--chunk-rows N]` (default 1,000,000 rows;
//! the README reports 5,000,000).

use std::sync::Arc;
use std::time::Instant;

use shadowsync::cluster::{Cluster, pipeline_config};
use shadowsync::transform::TableMap;
use shadowsync::verify::compare::{self, MappingDiff};
use tokio_postgres::{Client, NoTls};

const DB: &str = "bench";

const SCHEMA: &str = "
CREATE TABLE w (id bigint PRIMARY KEY, name text NOT NULL, descr text, n integer, big bigint,
                amount numeric(12,2), ratio double precision, flag boolean, doc jsonb,
                created_at timestamptz NOT NULL, status text NOT NULL);";

const RULES: &str = r#"
[[table]]
source = "public.v"
target = "public.r"
[table.columns]
label = "name"
state = "(CASE status WHEN 'active' THEN 'on' WHEN 'inactive' THEN 'off' ELSE 'other' END)"
cores = "(doc->>'cores')::integer"
amount = "amount::numeric(14,2)"
"#;

const GREEN_R: &str = "
CREATE TABLE r (id bigint PRIMARY KEY, label text NOT NULL, descr text, n integer, big bigint,
                amount numeric(14,2), ratio double precision, flag boolean, cores integer,
                created_at timestamptz NOT NULL, state text NOT NULL);";

fn fill(table: &str, rows: u64) -> String {
    format!(
        "INSERT INTO {table} SELECT g, 'name-' || g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'row number ' || g END,
                g % 100000, g::bigint * 7919, (g % 100000) / 7.0, g / 3.0, g % 2 = 0,
                jsonb_build_object('cores', g % 64, 'tag', 't' || (g % 10)),
                '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 second',
                (ARRAY['active','inactive','maintenance'])[g % 3 + 1]
           FROM generate_series(1, {rows}) g;
         ANALYZE {table};"
    )
}

const FILL_R: &str = "
INSERT INTO r SELECT id, name, descr, n, big, amount::numeric(14,2), ratio, flag, (doc->>'cores')::integer,
       created_at, CASE status WHEN 'active' THEN 'on' WHEN 'inactive' THEN 'off' ELSE 'other' END
  FROM w;
ANALYZE r;";

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.replace('_', "").parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows = arg(&args, "--rows", 1_000_000);
    let chunk_rows = arg(&args, "--chunk-rows", 10_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(rows, chunk_rows));
}

async fn run(rows: u64, chunk_rows: u64) {
    let (blue, green) = (
        Cluster::start("blue").unwrap(),
        Cluster::start("green").unwrap(),
    );
    blue.create_database(DB).unwrap();
    green.create_database(DB).unwrap();
    let load = Instant::now();
    blue.psql(
        DB,
        &format!(
            "{SCHEMA} {} CREATE TABLE v (LIKE w INCLUDING ALL); INSERT INTO v SELECT * FROM w; ANALYZE v;
             CREATE PUBLICATION bench_pub FOR TABLE w, v;",
            fill("w", rows)
        ),
    )
    .unwrap();
    green
        .psql(
            DB,
            &format!("{SCHEMA} {} {GREEN_R} {FILL_R}", fill("w", rows)),
        )
        .unwrap();
    eprintln!(
        "loaded {rows} rows of 11 columns into blue's w and v, green's w and r in {:.0} s",
        load.elapsed().as_secs_f64()
    );
    let rules = green.socket_dir().join("verify-bench-rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut config = pipeline_config(&blue, &green, DB, "verify_bench", "bench_pub");
    config.transforms.files = vec![rules.display().to_string()];
    let maps = mappings(&config).await;
    let opts = compare::Options {
        chunk_rows,
        max_keys: 100,
    };
    let (b, g) = (connect(&blue.dsn(DB)).await, connect(&green.dsn(DB)).await);
    let w = timed(
        "identity (w), equal",
        &b,
        &g,
        &maps["public.w"],
        &opts,
        rows,
    )
    .await;
    assert!(w.equal(), "{w:?}");
    let r = timed(
        "rules (v -> r), equal",
        &b,
        &g,
        &maps["public.r"],
        &opts,
        rows,
    )
    .await;
    assert!(r.equal(), "{r:?}");
    let step = rows / 10;
    g.batch_execute(&format!(
        "UPDATE w SET descr = 'changed' WHERE id IN (SELECT g * {step} FROM generate_series(1, 10) g)"
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let d = timed(
        "identity (w), 10 rows differ",
        &b,
        &g,
        &maps["public.w"],
        &opts,
        rows,
    )
    .await;
    assert_eq!(d.differing_count, 10, "{d:?}");
    println!(
        "bisection of 10 differing rows added {:.2} s",
        started.elapsed().as_secs_f64() - w.seconds
    );
    g.batch_execute(&format!(
        "UPDATE w SET descr = CASE WHEN id % 5 = 0 THEN NULL ELSE 'row number ' || id END WHERE id IN (SELECT g * {step} FROM generate_series(1, 10) g)"
    ))
    .await
    .unwrap();
    let since = point(&b, &g).await;
    let step = (rows / 1000).max(1);
    let change = format!("UPDATE w SET n = n + 1 WHERE id % {step} = 0 AND id <= {step} * 1000");
    b.batch_execute(&change).await.unwrap();
    g.batch_execute(&change).await.unwrap();
    let i = timed_since(
        "identity (w), since a point",
        &b,
        &g,
        &maps["public.w"],
        &opts,
        rows,
        &since,
    )
    .await;
    assert!(i.equal() && i.incremental, "{i:?}");
    println!(
        "  {} rows written since the point compared in full",
        i.changed_rows
    );
    let _ = std::fs::remove_file(&rules);
}

/// The mappings by target, as `verify` gets them.
async fn mappings(
    config: &shadowsync::config::Config,
) -> std::collections::HashMap<String, Vec<Arc<TableMap>>> {
    let (b, g) = (
        connect(&config.blue.dsn).await,
        connect(&config.green.dsn).await,
    );
    let rules = config.rules().unwrap();
    let (_, maps) = shadowsync::pipeline::preflight::mappings(&b, &g, "bench_pub", &rules)
        .await
        .unwrap()
        .unwrap();
    let mut by_target = std::collections::HashMap::new();
    for m in maps {
        by_target
            .entry(m.target.to_string())
            .or_insert_with(Vec::new)
            .push(m);
    }
    by_target
}

/// A point, as `verify` records it: each side's oldest running transaction in a snapshot.
async fn point(blue: &Client, green: &Client) -> compare::Since {
    let q = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text";
    compare::Since {
        blue_xmin: blue.query_one(q, &[]).await.unwrap().get(0),
        green_xmin: green.query_one(q, &[]).await.unwrap().get(0),
    }
}

/// One comparison in fresh snapshots; prints rows/s.
async fn timed(
    what: &str,
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &compare::Options,
    rows: u64,
) -> MappingDiff {
    timed_scoped(what, blue, green, maps, opts, rows, None).await
}

async fn timed_since(
    what: &str,
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &compare::Options,
    rows: u64,
    since: &compare::Since,
) -> MappingDiff {
    timed_scoped(what, blue, green, maps, opts, rows, Some(since)).await
}

async fn timed_scoped(
    what: &str,
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &compare::Options,
    rows: u64,
    since: Option<&compare::Since>,
) -> MappingDiff {
    blue.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    green
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let started = Instant::now();
    let diff = match since {
        Some(s) => compare::compare_since(blue, green, maps, opts, s, &|_| {}).await,
        None => compare::compare(blue, green, maps, opts, &|_| {}).await,
    }
    .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    blue.batch_execute("COMMIT").await.unwrap();
    green.batch_execute("COMMIT").await.unwrap();
    println!(
        "{what:<32} {rows} rows in {seconds:.2} s: {:.0} rows/s ({} chunks)",
        rows as f64 / seconds,
        diff.chunks
    );
    diff
}

async fn connect(dsn: &str) -> Client {
    // shadowsync's pinned session settings, as verify's own connections have them.
    let (client, conn) = tokio_postgres::connect(
        &format!("{dsn} options='-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex'"),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
}
