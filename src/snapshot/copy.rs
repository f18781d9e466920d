//! Copy workers: each holds a blue connection inside the exported snapshot and a green
//! connection, and copies ranges (`COPY (SELECT ...) TO STDOUT` streamed into `COPY ... FROM
//! STDIN`) one green transaction per range.
//!
//! Invariants: every worker imports the snapshot before the exporting session is dropped; rows
//! stream through without being buffered (memory is a few COPY chunks per worker); a table
//! read by another mapping's rules (a lookup) is copied completely before that mapping's
//! tables start; a range's rows and its `copy_ranges` row commit together; a range green
//! rejects is narrowed to its row and column (see `narrow`) and stops the copy with a
//! permanent error.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{Client, CopyInSink};
use tracing::debug;

use super::display::Progress;
use super::plan::{self, Job};
use super::{SnapshotError, blue_err, green_err};
use crate::config::Config;
use crate::metrics::Shared;
use crate::statement::{Cast, select_list};
use crate::transform::{QualifiedName, TableMap, quote_ident};

/// Every green connection of a copy holds this per-slot lock, shared.
const COPY_LOCK_SHARED: &str =
    "SELECT pg_advisory_lock_shared(hashtextextended('shadowsync.copy:' || $1, 0))";

/// Taken (and let go at once) before a copy reads its state: waits until every connection of
/// an earlier copy for the slot has ended, its last transaction committed or not.
pub(super) const COPY_LOCK_BARRIER: &str =
    "SELECT pg_advisory_lock(hashtextextended('shadowsync.copy:' || $1, 0)),
        pg_advisory_unlock(hashtextextended('shadowsync.copy:' || $1, 0))";

/// Bytes of COPY data handed to green at once (memory per worker: about twice this).
const RELAY_BYTES: usize = 256 * 1024;

pub(super) struct Worker {
    pub blue: Client,
    pub green: Client,
    /// Staging tables created on this green connection, by table index.
    staged: Vec<usize>,
    _conns: Vec<tokio::task::JoinHandle<()>>,
}

/// A table being copied, with what every worker needs to copy its ranges.
pub(super) struct Table {
    pub map: Arc<TableMap>,
    /// Blue relations holding the rows (the table, or its leaf partitions), read `FROM ONLY`.
    pub parts: Vec<QualifiedName>,
    pub row_filter: Option<String>,
    /// Whether blue's text goes straight into the target (identity, same types).
    direct: bool,
    /// Whether the direct copy may use the binary format.
    binary: bool,
    ranges: i32,
}

impl Table {
    /// The blue columns read, quoted, in the source row's order (selected by name, so any
    /// leaf gives this layout).
    pub fn columns(&self) -> Vec<String> {
        self.map
            .source_columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect()
    }
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
    crate::session_role::set_replica(&client)
        .await
        .map_err(green_err("setting session_replication_role for the copy"))?;
    client
        .batch_execute("SET synchronous_commit = off")
        .await
        .map_err(green_err("setting synchronous_commit for the copy"))?;
    // Held for the connection's life: the next session waits for it (see `super::barrier`).
    client
        .execute(COPY_LOCK_SHARED, &[&config.blue.slot])
        .await
        .map_err(green_err("taking the copy's session lock"))?;
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
            crate::transform::quote_literal(snapshot)
        ))
        .await
        .map_err(blue_err("importing the exported snapshot"))?;
    Ok((client, handle))
}

/// Opens `n` workers inside the snapshot `snapshot_name`.
async fn connect_workers(
    config: &Config,
    n: usize,
    snapshot_name: &str,
) -> Result<Vec<Worker>, SnapshotError> {
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
    Ok(workers)
}

/// Plans every table's ranges (recording their number in `copy_state`); returns the tables
/// and the jobs of each level of the copy order.
async fn plan_tables(
    config: &Config,
    w: &Worker,
    maps: &[Arc<TableMap>],
    progress: &Progress,
) -> Result<(Vec<Table>, Vec<Vec<Job>>), SnapshotError> {
    let encoding = "SELECT current_setting('server_encoding')";
    let blue_encoding: String = w
        .blue
        .query_one(encoding, &[])
        .await
        .map_err(blue_err("reading the server encoding"))?
        .get(0);
    let green_encoding: String = w
        .green
        .query_one(encoding, &[])
        .await
        .map_err(green_err("reading the server encoding"))?
        .get(0);
    let levels = plan::levels(maps);
    let mut tables = Vec::with_capacity(maps.len());
    let mut jobs_by_level: Vec<Vec<Job>> = Vec::new();
    for (i, map) in maps.iter().enumerate() {
        let step = config.snapshot.range_pages;
        let p = plan::plan_table(&w.blue, i, map, &config.blue.publication, step).await?;
        progress.set_estimate(i, p.estimate);
        let ranges = p.jobs.len() as i32;
        jobs_by_level.resize_with(jobs_by_level.len().max(levels[i] + 1), Vec::new);
        jobs_by_level[levels[i]].extend(p.jobs);
        tables.push(Table {
            map: map.clone(),
            parts: p.parts,
            row_filter: p.row_filter,
            direct: plan::is_direct(map),
            binary: plan::is_binary(map, blue_encoding == green_encoding),
            ranges,
        });
        w.green
            .execute(
                "UPDATE shadowsync.copy_state SET ranges = $3 WHERE slot = $1 AND source_table = $2",
                &[&config.blue.slot, &map.source.to_string(), &ranges],
            )
            .await
            .map_err(green_err("recording the copy's ranges"))?;
    }
    Ok((tables, jobs_by_level))
}

/// One table's initial copy.
pub(crate) struct Copied {
    /// Blue's table.
    pub source: String,
    /// Rows read from blue.
    pub read: u64,
    /// Rows written to green (a rule's filter leaves some out).
    pub written: u64,
}

/// What one level's workers share.
struct Shareds {
    tables: Arc<Vec<Table>>,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
    /// Ranges done per table index.
    done: Arc<Mutex<HashMap<usize, i32>>>,
    slot: String,
}

/// Copies `maps` under the snapshot `snapshot_name` (exported by `exporter`, dropped once every
/// worker imported it). Returns what was copied of each table.
pub(crate) async fn run(
    config: &Config,
    maps: &[Arc<TableMap>],
    snapshot_name: &str,
    exporter: pgwire_replication::ReplicationClient,
    shared: &Arc<Shared>,
) -> Result<Vec<Copied>, SnapshotError> {
    let n = config.snapshot.worker_count().max(1);
    let mut workers = connect_workers(config, n, snapshot_name).await?;
    // Every worker holds the snapshot now: the exporting session may end (a permanent slot
    // stays; a temporary one goes with its session, as intended).
    drop(exporter);

    let progress = Arc::new(Progress::new(
        maps.iter().map(|m| m.source.to_string()).collect(),
    ));
    let (tables, jobs_by_level) = plan_tables(config, &workers[0], maps, &progress).await?;
    let s = Shareds {
        tables: Arc::new(tables),
        progress: progress.clone(),
        shared: shared.clone(),
        done: Arc::new(Mutex::new(HashMap::new())),
        slot: config.blue.slot.clone(),
    };
    shared.set_snapshot_remaining(s.tables.len() as i64);
    let reporter = tokio::spawn(super::display::report(progress.clone()));
    // Dropping this future (a stop during the copy) must stop the workers too: they would
    // otherwise keep writing ranges of a copy the next session starts over.
    let mut tasks = AbortOnDrop(vec![reporter.abort_handle()]);
    let mut finished = Vec::new();
    let mut result = Ok(());
    for jobs in jobs_by_level {
        result = run_level(&s, &mut workers, jobs, &mut tasks, &mut finished).await;
        if result.is_err() {
            break;
        }
    }
    reporter.abort();
    progress.print_final();
    result?;
    Ok(finished
        .into_iter()
        .map(|i| Copied {
            source: s.tables[i].map.source.to_string(),
            read: progress.rows(i),
            written: progress.written(i),
        })
        .collect())
}

/// Runs one level's jobs on every worker; the workers come back into `workers`, the tables
/// they finished into `finished`.
async fn run_level(
    s: &Shareds,
    workers: &mut Vec<Worker>,
    jobs: Vec<Job>,
    tasks: &mut AbortOnDrop,
    finished: &mut Vec<usize>,
) -> Result<(), SnapshotError> {
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let mut handles = Vec::with_capacity(workers.len());
    for w in workers.drain(..) {
        let s = Shareds {
            tables: s.tables.clone(),
            progress: s.progress.clone(),
            shared: s.shared.clone(),
            done: s.done.clone(),
            slot: s.slot.clone(),
        };
        handles.push(tokio::spawn(work(w, queue.clone(), s)));
    }
    tasks.0.extend(handles.iter().map(|h| h.abort_handle()));
    let mut result = Ok(());
    for h in handles {
        match h.await {
            Ok((w, r, completed)) => {
                workers.push(w);
                for t in completed {
                    finished.push(t);
                    s.shared
                        .set_snapshot_remaining(s.tables.len() as i64 - finished.len() as i64);
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
    result
}

/// A worker: copies ranges from `queue` until none is left; returns the tables it finished.
async fn work(
    mut w: Worker,
    queue: Arc<Mutex<VecDeque<Job>>>,
    s: Shareds,
) -> (Worker, Result<(), SnapshotError>, Vec<usize>) {
    let mut completed = Vec::new();
    loop {
        let job = queue.lock().expect("job queue").pop_front();
        let Some(job) = job else { break };
        let t = &s.tables[job.table];
        let rows = match copy_range(&mut w, &s.tables, &job, &s.slot, &s.progress).await {
            Ok(rows) => rows,
            Err(e) => return (w, Err(e), completed),
        };
        s.shared.add_snapshot_rows(&t.map.label, rows);
        s.progress.wrote(job.table, rows);
        debug!(table = %t.map.source, part = %t.parts[job.part], range = job.range_no, rows, "range copied");
        let all_done = {
            let mut d = s.done.lock().expect("done ranges");
            let n = d.entry(job.table).or_default();
            *n += 1;
            *n == t.ranges
        };
        if all_done {
            let source = t.map.source.to_string();
            if let Err(e) = super::mark_done(&w.green, &s.slot, &source).await {
                return (w, Err(e), completed);
            }
            completed.push(job.table);
        }
    }
    (w, Ok(()), completed)
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

/// Whether green refused the data itself (a value, a constraint), as opposed to a lost
/// connection or a missing privilege: only then is the range narrowed to its row.
fn is_rejection(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Green { failure, .. }
        if failure.is_rejected_data())
}

/// Copies one range in one green transaction; a range green rejects is narrowed to the row.
async fn copy_range(
    w: &mut Worker,
    tables: &[Table],
    job: &Job,
    slot: &str,
    progress: &Progress,
) -> Result<u64, SnapshotError> {
    let t = &tables[job.table];
    match write_range(w, t, job, slot, progress).await {
        Ok(rows) => Ok(rows),
        Err(e) if is_rejection(&e) => Err(super::narrow::narrow(w, t, job, e).await),
        Err(e) => Err(e),
    }
}

async fn write_range(
    w: &mut Worker,
    t: &Table,
    job: &Job,
    slot: &str,
    progress: &Progress,
) -> Result<u64, SnapshotError> {
    let map = &t.map;
    let cols = t.columns();
    let format = if t.binary { " (FORMAT binary)" } else { "" };
    let select = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT{format}",
        cols.join(", "),
        t.parts[job.part].quoted(),
        plan::conditions(job, t.row_filter.as_deref())
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
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&copy_in)
        .await
        .map_err(green_err(format!("writing {}", map.label)))?;
    let rows = relay(&w.blue, &select, sink, (t, job), |rows, bytes| {
        progress.add(job.table, rows, bytes)
    })
    .await?;
    let source = map.source.to_string();
    // Rows written to green: those of the COPY into the target, or those the rules' INSERT
    // wrote from the staging table (its filter leaves some of blue's rows out).
    let mut written = rows;
    if !t.direct {
        w.staged.push(job.table);
        written = tx
            .execute(&insert_from_staging(map, &staging, None), &[])
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
    Ok(written)
}

/// Streams blue's `COPY ... TO STDOUT` (`select`) into green's `sink` without buffering more
/// than a block; `counted(rows, bytes)` is told after each block. Returns green's row count.
pub(super) async fn relay(
    blue: &Client,
    select: &str,
    sink: CopyInSink<bytes::Bytes>,
    (t, job): (&Table, &Job),
    mut counted: impl FnMut(u64, u64),
) -> Result<u64, SnapshotError> {
    let part = &t.parts[job.part];
    let source = &t.map.source;
    let reading = if part == source {
        format!("reading {source}")
    } else {
        format!("reading {source} (partition {part})")
    };
    let out = blue
        .copy_out(select)
        .await
        .map_err(blue_err(reading.clone()))?;
    let writing = || green_err(format!("writing {}", t.map.label));
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    // Text COPY sends one row per message; rows are passed on in blocks of RELAY_BYTES, so
    // that the hand-over to green costs once per block, not per row.
    let mut block = bytes::BytesMut::with_capacity(RELAY_BYTES + 4096);
    let mut block_rows = 0u64;
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(blue_err(reading.clone()))?;
        block.extend_from_slice(&chunk);
        block_rows += copy_message_rows(&chunk, t.binary);
        if block.len() >= RELAY_BYTES {
            counted(block_rows, block.len() as u64);
            block_rows = 0;
            sink.send(block.split().freeze()).await.map_err(writing())?;
        }
    }
    if !block.is_empty() {
        counted(block_rows, block.len() as u64);
        sink.send(block.split().freeze()).await.map_err(writing())?;
    }
    sink.as_mut().finish().await.map_err(writing())
}

/// Rows in one message of blue's `COPY ... TO STDOUT`: one, except binary COPY's trailer (a
/// field count of -1, sent as a message of its own), which is none (it made a table of 3,000
/// rows count 3,001).
pub(super) fn copy_message_rows(message: &[u8], binary: bool) -> u64 {
    u64::from(!(binary && message == [0xff, 0xff]))
}

/// `INSERT INTO target (...) SELECT <rule expressions> FROM (<staging cast to source types>)
/// AS src [WHERE filter]`: the stream's upsert, over a staging table instead of arrays.
/// `rows`, a condition on the staging table `s`, limits the rows read.
pub(super) fn insert_from_staging(map: &TableMap, staging: &str, rows: Option<&str>) -> String {
    let all: Vec<usize> = (0..map.source_columns.len()).collect();
    let targets = crate::statement::computable(map, &all);
    let src = staging_source(map, &all);
    let rows = rows.map(|r| format!(" WHERE {r}")).unwrap_or_default();
    // No column list at all for a table without columns (`()` is not valid SQL): the
    // empty select list then inserts rows of defaults.
    let names: Vec<String> = targets
        .iter()
        .map(|&i| quote_ident(&map.columns[i].name))
        .collect();
    let names = if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    };
    let mut sql = format!(
        "INSERT INTO {}{names} OVERRIDING SYSTEM VALUE SELECT {} FROM (SELECT {src} FROM {staging} AS s{rows}) AS src",
        map.target.quoted(),
        select_list(map, &targets, Cast::Write),
    );
    if let Some(f) = &map.filter {
        sql.push_str(&format!(" WHERE ({})", f.expr));
    }
    sql
}

/// `s.c<i>::<type> AS "<name>"` for the source columns `cols`: staging text cast to the source
/// row's types, under the source's column names (the names rule expressions use).
pub(super) fn staging_source(map: &TableMap, cols: &[usize]) -> String {
    cols.iter()
        .map(|&i| {
            let c = &map.source_columns[i];
            format!("s.c{i}::{} AS {}", c.sql_type, quote_ident(&c.name))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::copy_message_rows;

    #[test]
    fn binary_trailer_is_not_a_row() {
        // A binary row of one field (count 1, length 4, value) and the trailer (count -1).
        let row = [0u8, 1, 0, 0, 0, 4, 0, 0, 0, 7];
        assert_eq!(copy_message_rows(&row, true), 1);
        assert_eq!(copy_message_rows(&[0xff, 0xff], true), 0);
        // A row of no columns is a field count of 0, still a row.
        assert_eq!(copy_message_rows(&[0, 0], true), 1);
        // Text COPY has no trailer message: every message is a row.
        assert_eq!(copy_message_rows(b"1\tx\n", false), 1);
    }
}
