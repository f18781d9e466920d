//! Range planning for the initial copy: which blue relations hold a published table's rows,
//! how each is split into page ranges, and in which order tables are copied.
//!
//! A published table is read from the relations that store its rows: itself for a plain table,
//! its leaf partitions for a partitioned table (published through the root with
//! `publish_via_partition_root`; without it, PostgreSQL publishes each leaf as a table of its
//! own, and each is planned as a plain table). A partitioned table stores nothing itself, so
//! reading it `FROM ONLY` gives no rows.
//!
//! Invariants: every leaf that holds rows (`relkind = 'r'`: foreign partitions are never
//! published) is planned, each as one or more `ctid` ranges read `FROM ONLY leaf`; the last
//! range of a leaf is open-ended, so pages added after sizing are still read; range numbers
//! are unique within a table (they key `shadowsync.copy_ranges`); columns are always selected by
//! name, so a leaf whose column order differs from its root's (a table attached with `ATTACH
//! PARTITION`) gives the root's row layout.

use std::sync::Arc;

use tokio_postgres::Client;

use super::{SnapshotError, blue_err};
use crate::transform::{QualifiedName, TableMap};

/// One unit of copying: a page range of one blue relation of one table (`hi = None`: to the
/// end).
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub table: usize,
    /// Index into the table's `parts`.
    pub part: usize,
    pub range_no: i32,
    pub lo: u64,
    pub hi: Option<u64>,
}

/// A table's plan: the relations read, and the publication's row filter.
pub(super) struct TablePlan {
    /// Blue relations read `FROM ONLY`: the table itself, or its leaf partitions.
    pub parts: Vec<QualifiedName>,
    /// The publication's row filter on blue (PostgreSQL 15+), applied to the copy as to the
    /// stream. With `publish_via_partition_root` it is the root's (leaves' own filters are
    /// ignored, as by PostgreSQL's own initial sync); its column names are valid on every
    /// leaf, since partitions share their root's column names.
    pub row_filter: Option<String>,
    /// Row estimate from blue's statistics (sum over the parts).
    pub estimate: u64,
    pub jobs: Vec<Job>,
}

/// The relations holding `table`'s rows, with their size in pages and row estimates.
async fn parts(
    blue: &Client,
    table: &QualifiedName,
) -> Result<Vec<(QualifiedName, u64, u64)>, SnapshotError> {
    let rows = blue
        .query(
            "WITH root AS (SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass($1)),
                  parts AS (
                    SELECT p.relid AS oid FROM root, pg_partition_tree(root.oid) p
                     WHERE root.relkind = 'p' AND p.isleaf
                    UNION ALL
                    SELECT oid FROM root WHERE relkind <> 'p')
             SELECT n.nspname::text, c.relname::text,
                    (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint,
                    greatest(c.reltuples, 0)::bigint
               FROM parts JOIN pg_class c ON c.oid = parts.oid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r'
              ORDER BY 1, 2",
            &[&table.quoted()],
        )
        .await
        .map_err(blue_err(format!("listing the partitions of {table}")))?;
    let mut out: Vec<(QualifiedName, u64, u64)> = rows
        .iter()
        .map(|r| {
            let (pages, tuples): (i64, i64) = (r.get(2), r.get(3));
            (
                QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                pages.max(0) as u64,
                tuples.max(0) as u64,
            )
        })
        .collect();
    if out.is_empty() {
        // A partitioned table without any regular partition: it holds no rows. Reading it
        // `FROM ONLY` is valid and gives none, which still records one (empty) range, so the
        // table is marked done like any other.
        out.push((table.clone(), 0, 0));
    }
    Ok(out)
}

/// Plans `map`'s ranges: each part split into ranges of `step` pages, numbered from 0 across
/// the parts.
pub(super) async fn plan_table(
    blue: &Client,
    index: usize,
    map: &TableMap,
    publication: &str,
    step: u64,
) -> Result<TablePlan, SnapshotError> {
    let row_filter: Option<String> = blue
        .query_opt(
            "SELECT rowfilter FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &map.source.schema, &map.source.name],
        )
        .await
        .map_err(blue_err(format!(
            "reading the row filter of {}",
            map.source
        )))?
        .and_then(|r| r.get(0));
    let parts = parts(blue, &map.source).await?;
    let step = step.max(1);
    let mut jobs = Vec::new();
    let mut estimate = 0;
    for (part, (_, pages, tuples)) in parts.iter().enumerate() {
        estimate += tuples;
        let ranges = pages.div_ceil(step).max(1);
        for r in 0..ranges {
            jobs.push(Job {
                table: index,
                part,
                range_no: jobs.len() as i32,
                lo: r * step,
                hi: (r + 1 < ranges).then_some((r + 1) * step),
            });
        }
    }
    Ok(TablePlan {
        parts: parts.into_iter().map(|(name, _, _)| name).collect(),
        row_filter,
        estimate,
        jobs,
    })
}

/// The `WHERE` conditions reading one job's rows: its page range and the row filter.
pub(super) fn conditions(job: &Job, row_filter: Option<&str>) -> String {
    let mut conds = vec![format!("ctid >= '({},0)'::tid", job.lo)];
    if let Some(hi) = job.hi {
        conds.push(format!("ctid < '({hi},0)'::tid"));
    }
    if let Some(f) = row_filter {
        conds.push(format!("({f})"));
    }
    conds.join(" AND ")
}

/// Copy order: a table comes after every table (among those copied) its rules read.
pub(super) fn levels(maps: &[Arc<TableMap>]) -> Vec<usize> {
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

/// Identity mapping whose every column has the same type on both sides: blue's COPY text is
/// green's COPY input, no staging needed. Not for a table without columns: green's table may
/// have columns of its own (defaults), which `COPY` would expect values for; the staging
/// `INSERT` fills them.
pub(super) fn is_direct(map: &TableMap) -> bool {
    map.origin.is_none()
        && map.filter.is_none()
        && !map.source_columns.is_empty()
        && map.columns.len() == map.source_columns.len()
        && map
            .columns
            .iter()
            .zip(&map.source_columns)
            .all(|(t, s)| t.name == s.name && t.inputs.len() == 1 && s.blue_type == t.base_type)
}

/// Whether a direct copy may use the binary format: every type built in (user types carry
/// OIDs that differ between servers), and one encoding on both sides (binary COPY converts no
/// character set).
pub(super) fn is_binary(map: &TableMap, same_encoding: bool) -> bool {
    is_direct(map)
        && same_encoding
        && map
            .source_columns
            .iter()
            .all(|c| BINARY_SAFE.contains(&c.blue_type.as_str()))
}
