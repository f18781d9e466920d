//! Copy workers: each holds a blue connection inside the exported snapshot and a green
//! connection, and copies ranges (`COPY (SELECT ...) TO STDOUT` streamed into `COPY ... FROM
//! STDIN`) one green transaction per range.
//!
//! Invariants: every worker imports the snapshot before the exporting session is dropped; rows
//! stream through without being buffered (memory is a few COPY chunks per worker); a table
//! read by another mapping's rules (a lookup) is copied completely before that mapping's
//! tables start; a range's rows and its `copy_ranges` row commit together.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;
use tracing::debug;

use super::display::Progress;
use super::{SnapshotError, blue_err, green_err};
use crate::apply::sql::{Cast, select_list};
use crate::config::Config;
use crate::metrics::Shared;
use crate::transform::{TableMap, quote_ident};

/// Bytes of COPY data handed to green at once (memory per worker: about twice this).
const RELAY_BYTES: usize = 256 * 1024;

/// One unit of copying: a page range of one table (`hi = None`: to the end).
#[derive(Debug, Clone)]
struct Job {
    table: usize,
    range_no: i32,
    lo: u64,
    hi: Option<u64>,
}

struct Worker {
    blue: Client,
    green: Client,
    /// Staging tables created on this green connection, by table index.
    staged: Vec<usize>,
    _conns: Vec<tokio::task::JoinHandle<()>>,
}

/// A table being copied, with what every worker needs to copy its ranges.
struct Table {
    map: Arc<TableMap>,
    /// The publication's row filter on blue (PostgreSQL 15+), applied to the copy as to the
    /// stream.
    row_filter: Option<String>,
    /// Whether blue's text goes straight into the target (identity, same types).
    direct: bool,
    /// Whether the direct copy may use the binary format (every type built in, so that both
    /// sides agree on its binary form; user types carry OIDs that differ between servers).
    binary: bool,
    ranges: i32,
}

/// Connects to green for copying: replica role (no triggers or foreign keys firing, as for the
/// stream), and asynchronous commit: a range lost to a green crash is lost with its bookkeeping
/// row, and simply copied again.
pub(crate) async fn green_connect(config: &Config) -> Result<Client, SnapshotError> {
    let (client, _) = green_connect_owned(config).await?;
    Ok(client)
}

async fn green_connect_owned(
    config: &Config,
) -> Result<(Client, tokio::task::JoinHandle<()>), SnapshotError> {
    let dsn = config
        .green_dsn()
        .map_err(|e| SnapshotError::Worker(e.to_string()))?;
    let (client, conn) = dsn
        .connect("shadowsync-copy")
        .await
        .map_err(green_err("connecting for the initial copy"))?;
    let handle = tokio::spawn(async move {
        let _ = conn.await;
    });
    // Not every user may set the role; triggers and foreign keys then stay active, which the
    // copy's table order (lookups first) tolerates.
    let _ = client
        .batch_execute("SET session_replication_role = replica")
        .await;
    client
        .batch_execute("SET synchronous_commit = off")
        .await
        .map_err(green_err("setting synchronous_commit for the copy"))?;
    Ok((client, handle))
}

async fn blue_connect(
    config: &Config,
    snapshot: &str,
) -> Result<(Client, tokio::task::JoinHandle<()>), SnapshotError> {
    let dsn = config
        .blue_dsn()
        .map_err(|e| SnapshotError::Worker(e.to_string()))?;
    let (client, conn) = dsn
        .connect("shadowsync-copy")
        .await
        .map_err(blue_err("connecting for the initial copy"))?;
    let handle = tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(blue_err("importing the exported snapshot"))?;
    Ok((client, handle))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Copies `maps` under the snapshot `snapshot_name` (exported by `exporter`, dropped once every
/// worker imported it). Returns (source table, rows) per table copied.
pub(crate) async fn run(
    config: &Config,
    maps: &[Arc<TableMap>],
    snapshot_name: &str,
    exporter: pgwire_replication::ReplicationClient,
    shared: &Arc<Shared>,
) -> Result<Vec<(String, u64)>, SnapshotError> {
    let n = config.snapshot.worker_count().max(1);
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        let (blue, b) = blue_connect(config, snapshot_name).await?;
        let (green, g) = green_connect_owned(config).await?;
        workers.push(Worker {
            blue,
            green,
            staged: Vec::new(),
            _conns: vec![b, g],
        });
    }
    // Every worker holds the snapshot now: the exporting session may end (a permanent slot
    // stays; a temporary one goes with its session, as intended).
    drop(exporter);

    let slot = config.blue.slot.clone();
    let planner = &workers[0].blue;
    // Binary COPY converts no character set: only between databases of one encoding.
    let encoding = "SELECT current_setting('server_encoding')";
    let blue_encoding: String = planner
        .query_one(encoding, &[])
        .await
        .map_err(blue_err("reading the server encoding"))?
        .get(0);
    let green_encoding: String = workers[0]
        .green
        .query_one(encoding, &[])
        .await
        .map_err(green_err("reading the server encoding"))?
        .get(0);
    let same_encoding = blue_encoding == green_encoding;
    let mut tables = Vec::with_capacity(maps.len());
    let mut jobs_by_level: Vec<Vec<Job>> = Vec::new();
    let levels = levels(maps);
    let progress = Arc::new(Progress::new(
        maps.iter().map(|m| m.source.to_string()).collect(),
    ));
    for (i, map) in maps.iter().enumerate() {
        let row = planner
            .query_one(
                "SELECT (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint,
                        greatest(c.reltuples, 0)::bigint,
                        (SELECT t.rowfilter FROM pg_publication_tables t
                          WHERE t.pubname = $2 AND t.schemaname = n.nspname AND t.tablename = c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass($1)",
                &[&map.source.quoted(), &config.blue.publication],
            )
            .await
            .map_err(blue_err(format!("sizing {}", map.source)))?;
        let (pages, estimate, row_filter): (i64, i64, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let step = config.snapshot.range_pages;
        let ranges = (pages.max(0) as u64).div_ceil(step).max(1);
        progress.set_estimate(i, estimate.max(0) as u64);
        let jobs = jobs_by_level.len().max(levels[i] + 1);
        jobs_by_level.resize_with(jobs, Vec::new);
        for r in 0..ranges {
            jobs_by_level[levels[i]].push(Job {
                table: i,
                range_no: r as i32,
                lo: r * step,
                hi: (r + 1 < ranges).then_some((r + 1) * step),
            });
        }
        let direct = is_direct(map);
        let binary = direct
            && same_encoding
            && map
                .source_columns
                .iter()
                .all(|c| BINARY_SAFE.contains(&c.blue_type.as_str()));
        tables.push(Table {
            map: map.clone(),
            row_filter,
            direct,
            binary,
            ranges: ranges as i32,
        });
        workers[0]
            .green
            .execute(
                "UPDATE shadowsync.copy_state SET ranges = $3 WHERE slot = $1 AND source_table = $2",
                &[&slot, &map.source.to_string(), &(ranges as i32)],
            )
            .await
            .map_err(green_err("recording the copy's ranges"))?;
    }
    let tables = Arc::new(tables);
    shared.set_snapshot_remaining(tables.len() as i64);
    let reporter = tokio::spawn(super::display::report(progress.clone()));
    // Dropping this future (a stop during the copy) must stop the workers too: they would
    // otherwise keep writing ranges of a copy the next session starts over.
    let mut tasks = AbortOnDrop(vec![reporter.abort_handle()]);
    let done: Arc<Mutex<HashMap<usize, i32>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut finished = Vec::new();
    let mut result = Ok(());
    'levels: for jobs in jobs_by_level {
        let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
        let mut handles = Vec::with_capacity(workers.len());
        for mut w in workers.drain(..) {
            let (queue, tables, progress, shared, done, slot) = (
                queue.clone(),
                tables.clone(),
                progress.clone(),
                shared.clone(),
                done.clone(),
                slot.clone(),
            );
            handles.push(tokio::spawn(async move {
                // (a worker: copies ranges of this level until none is left)
                let mut completed = Vec::new();
                loop {
                    let job = queue.lock().expect("job queue").pop_front();
                    let Some(job) = job else { break };
                    let t = &tables[job.table];
                    let rows =
                        match copy_range(&mut w, &tables, &job, &slot, &progress, &shared).await {
                            Ok(rows) => rows,
                            Err(e) => return (w, Err(e), completed),
                        };
                    debug!(table = %t.map.source, range = job.range_no, rows, "range copied");
                    let all_done = {
                        let mut d = done.lock().expect("done ranges");
                        let n = d.entry(job.table).or_default();
                        *n += 1;
                        *n == t.ranges
                    };
                    if all_done {
                        let source = t.map.source.to_string();
                        if let Err(e) = super::mark_done(&w.green, &slot, &source).await {
                            return (w, Err(e), completed);
                        }
                        completed.push(job.table);
                    }
                }
                (w, Ok(()), completed)
            }));
        }
        tasks.0.extend(handles.iter().map(|h| h.abort_handle()));
        for h in handles {
            match h.await {
                Ok((w, r, completed)) => {
                    workers.push(w);
                    for t in completed {
                        shared.set_snapshot_remaining(
                            tables.len() as i64 - finished.len() as i64 - 1,
                        );
                        finished.push(t);
                    }
                    if let Err(e) = r
                        && result.is_ok()
                    {
                        result = Err(e);
                    }
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(SnapshotError::Worker(e.to_string()));
                    }
                }
            }
        }
        if result.is_err() {
            break 'levels;
        }
    }
    reporter.abort();
    progress.print_final();
    result?;
    Ok(finished
        .into_iter()
        .map(|i| (tables[i].map.source.to_string(), progress.rows(i)))
        .collect())
}

/// Aborts tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Copy order: a table comes after every table (among those copied) its rules read.
fn levels(maps: &[Arc<TableMap>]) -> Vec<usize> {
    let mut level = vec![0usize; maps.len()];
    // A cycle of lookups cannot be ordered; its tables stop rising after `len` rounds.
    for _ in 0..maps.len() {
        let mut changed = false;
        for i in 0..maps.len() {
            for j in 0..maps.len() {
                if i != j && maps[i].reads_table(&maps[j].label) && level[i] <= level[j] {
                    level[i] = level[j] + 1;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    level
}

/// Identity mapping whose every column has the same type on both sides: blue's COPY text is
/// green's COPY input, no staging needed.
/// Built-in types whose binary COPY form is the same on any two PostgreSQL servers of one
/// major version line (no OIDs inside, unlike arrays or composites of user types).
const BINARY_SAFE: [&str; 18] = [
    "smallint",
    "integer",
    "bigint",
    "boolean",
    "text",
    "character varying",
    "character",
    "numeric",
    "real",
    "double precision",
    "timestamp with time zone",
    "timestamp without time zone",
    "date",
    "time without time zone",
    "uuid",
    "jsonb",
    "json",
    "bytea",
];

fn is_direct(map: &TableMap) -> bool {
    map.origin.is_none()
        && map.filter.is_none()
        && map.columns.len() == map.source_columns.len()
        && map
            .columns
            .iter()
            .zip(&map.source_columns)
            .all(|(t, s)| t.name == s.name && t.inputs.len() == 1 && s.blue_type == t.base_type)
}

async fn copy_range(
    w: &mut Worker,
    tables: &[Table],
    job: &Job,
    slot: &str,
    progress: &Progress,
    shared: &Shared,
) -> Result<u64, SnapshotError> {
    let t = &tables[job.table];
    let map = &t.map;
    let cols: Vec<String> = map
        .source_columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut conds = vec![format!("ctid >= '({},0)'::tid", job.lo)];
    if let Some(hi) = job.hi {
        conds.push(format!("ctid < '({hi},0)'::tid"));
    }
    if let Some(f) = &t.row_filter {
        conds.push(format!("({f})"));
    }
    let format = if t.binary { " (FORMAT binary)" } else { "" };
    let select = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT{format}",
        cols.join(", "),
        map.source.quoted(),
        conds.join(" AND ")
    );
    let staging = format!("\"~copy_{}\"", job.table);
    let tx = w
        .green
        .transaction()
        .await
        .map_err(green_err("starting a copy transaction"))?;
    let copy_in = if t.direct {
        format!(
            "COPY {} ({}) FROM STDIN{format}",
            map.target.quoted(),
            cols.join(", ")
        )
    } else {
        if !w.staged.contains(&job.table) {
            let defs: Vec<String> = (0..cols.len()).map(|i| format!("c{i} text")).collect();
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} ({}) ON COMMIT DELETE ROWS",
                defs.join(", ")
            ))
            .await
            .map_err(green_err("creating a staging table"))?;
        }
        format!("COPY {staging} FROM STDIN")
    };
    let source = map.source.to_string();
    let out = w
        .blue
        .copy_out(&select)
        .await
        .map_err(blue_err(format!("reading {source}")))?;
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&copy_in)
        .await
        .map_err(green_err(format!("writing {}", map.label)))?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    // Text COPY sends one row per message; rows are passed on in blocks of RELAY_BYTES, so
    // that the hand-over to green costs once per block, not per row.
    let mut block = bytes::BytesMut::with_capacity(RELAY_BYTES + 4096);
    let mut block_rows = 0u64;
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(blue_err(format!("reading {source}")))?;
        block.extend_from_slice(&chunk);
        block_rows += 1;
        if block.len() >= RELAY_BYTES {
            progress.add(job.table, block_rows, block.len() as u64);
            block_rows = 0;
            sink.send(block.split().freeze())
                .await
                .map_err(green_err(format!("writing {}", map.label)))?;
        }
    }
    if !block.is_empty() {
        progress.add(job.table, block_rows, block.len() as u64);
        sink.send(block.split().freeze())
            .await
            .map_err(green_err(format!("writing {}", map.label)))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(green_err(format!("writing {}", map.label)))?;
    if !t.direct {
        w.staged.push(job.table);
        tx.execute(&insert_from_staging(map, &staging), &[])
            .await
            .map_err(green_err(format!(
                "transforming the copied rows of {source} into {}",
                map.label
            )))?;
    }
    tx.execute(
        "INSERT INTO shadowsync.copy_ranges (slot, source_table, range_no, rows) VALUES ($1, $2, $3, $4)",
        &[&slot, &source, &job.range_no, &(rows as i64)],
    )
    .await
    .map_err(green_err("recording a copied range"))?;
    tx.commit()
        .await
        .map_err(green_err(format!("committing a range of {}", map.label)))?;
    shared.add_snapshot_rows(&map.label, rows);
    Ok(rows)
}

/// `INSERT INTO target (...) SELECT <rule expressions> FROM (<staging cast to source types>)
/// AS src [WHERE filter]`: the stream's upsert, over a staging table instead of arrays.
fn insert_from_staging(map: &TableMap, staging: &str) -> String {
    let all: Vec<usize> = (0..map.source_columns.len()).collect();
    let targets = crate::apply::sql::computable(map, &all);
    let src = map
        .source_columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("s.c{i}::{} AS {}", c.sql_type, quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM (SELECT {src} FROM {staging} AS s) AS src",
        map.target.quoted(),
        targets
            .iter()
            .map(|&i| quote_ident(&map.columns[i].name))
            .collect::<Vec<_>>()
            .join(", "),
        select_list(map, &targets, Cast::Write),
    );
    if let Some(f) = &map.filter {
        sql.push_str(&format!(" WHERE ({})", f.expr));
    }
    sql
}
