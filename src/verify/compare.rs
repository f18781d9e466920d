//! The comparison engine of `verify`: given a blue and a green connection inside snapshots of
//! one consistent point, compares the rows the mappings of one target table should have put in
//! green with the rows green has, key by key, and says what differs.
//!
//! Every row is reduced to hashes by the databases: one per compared column (by green's type:
//! integers as bigint, text as bytes, timestamps as the instant, anything else by its text
//! form, NULL as a per-column constant), the row's hash being their XOR. A mapping that only copies columns blue can hash
//! alike is hashed on blue (see `plan`); any other has blue's rows staged into green and
//! evaluated there by the rule's expressions, filter and lookups, as the initial copy does.
//! Keyed targets are compared in chunks of green's key, and a chunk whose sums differ is
//! bisected down to keys (see `keyed`); keyless ones as multisets (see `keyless`).
//!
//! Invariants:
//! - Nothing is written but temporary tables in green's transaction (dropped before returning,
//!   at the latest with the transaction).
//! - Memory is bounded by the chunk size whatever the table size: ranges are bisected until
//!   small before rows are read, one chunk of blue's rows to stage is read ahead (a whole table
//!   is streamed), keyless differences are streamed, lists stop at `max_keys`.
//! - Keys and column names are reported, never other values; no value is spliced into SQL.
//! - Text forms are those of shadowsync's sessions (ISO dates, UTC, exact floats, hex bytea),
//!   set for the transaction on both connections, so that equal values hash equal.

mod changed;
mod keyed;
mod keyless;
mod plan;
mod sql;
mod stage;

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::failure::DbFailure;
use crate::transform::TableMap;
use plan::Source;
use sql::{Shape, Side};

/// An earlier point at which the mappings compared matched: the oldest transaction still
/// running in each side's snapshot then (`xid8` text). A row version whose `xmin` is older
/// existed at the point (its transaction had ended; had it aborted, the version would not be
/// seen), so a key whose versions on both sides are older still matches.
#[derive(Debug, Clone)]
pub struct Since {
    pub blue_xmin: String,
    pub green_xmin: String,
}

/// How to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows per chunk (on every side): the unit of a checksum, and what memory is bounded by.
    pub chunk_rows: u64,
    /// Differences listed per mapping (and per kind); the counts go on past it.
    pub max_keys: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_rows: 10_000,
            max_keys: 100,
        }
    }
}

/// A key green holds with other values than expected.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Differing {
    /// `(id)=(5)`: key column names and values as PostgreSQL prints them.
    pub key: String,
    /// Target columns that differ.
    pub columns: Vec<String>,
}

/// What one target table's comparison found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MappingDiff {
    /// Blue tables compared (comma-separated when several write the target).
    pub source: String,
    pub target: String,
    /// Blue rows expected in green (after the rule's filter and the publication's row filter).
    pub rows_blue: u64,
    pub rows_green: u64,
    /// Keys (keyless targets: row hashes) expected but absent in green, up to `max_keys`.
    pub missing_in_green: Vec<String>,
    /// Keys (keyless targets: row hashes) green has that blue does not explain.
    pub extra_in_green: Vec<String>,
    pub differing: Vec<Differing>,
    /// Totals, also past `max_keys` (rows, for keyless targets).
    pub missing_count: u64,
    pub extra_count: u64,
    pub differing_count: u64,
    pub chunks: u64,
    pub seconds: f64,
    /// Compared incrementally (see [`compare_since`]): the keys as sets, in full only the rows
    /// written since the earlier point.
    pub incremental: bool,
    /// Incremental only: the keys whose rows were compared in full (written since the point
    /// on either side).
    pub changed_rows: u64,
    /// Asked to compare incrementally but compared in full, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_full: Option<String>,
}

impl MappingDiff {
    pub fn equal(&self) -> bool {
        self.missing_count == 0
            && self.extra_count == 0
            && self.differing_count == 0
            && self.rows_blue == self.rows_green
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{side}, {table}, {context}: {failure}")]
    Db {
        side: &'static str,
        table: String,
        context: &'static str,
        failure: DbFailure,
    },
    #[error("{side} has no table {table}")]
    Missing { side: &'static str, table: String },
    #[error("cannot compare: {0}")]
    Mappings(String),
    #[error(
        "{side}'s connection is not inside a REPEATABLE READ transaction: compare reads both sides inside snapshots of one point"
    )]
    NoSnapshot { side: &'static str },
}

/// Maps a database error to [`CompareError::Db`].
fn db(
    side: Side,
    table: &str,
    context: &'static str,
) -> impl Fn(tokio_postgres::Error) -> CompareError {
    let table = table.to_string();
    move |e| CompareError::Db {
        side: side.name(),
        table: table.clone(),
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// Differences as found: counted always, listed up to `max`.
pub(super) struct Tally<'a> {
    diff: &'a mut MappingDiff,
    max: usize,
}

impl Tally<'_> {
    fn missing(&mut self, key: String) {
        self.missing_rows(key, 1);
    }

    fn extra(&mut self, key: String) {
        self.extra_rows(key, 1);
    }

    fn missing_rows(&mut self, what: String, rows: u64) {
        self.diff.missing_count += rows;
        if self.diff.missing_in_green.len() < self.max {
            self.diff.missing_in_green.push(what);
        }
    }

    fn extra_rows(&mut self, what: String, rows: u64) {
        self.diff.extra_count += rows;
        if self.diff.extra_in_green.len() < self.max {
            self.diff.extra_in_green.push(what);
        }
    }

    /// Room left in the list of missing (or extra) keys.
    fn room(&self, missing: bool) -> usize {
        let listed = if missing {
            self.diff.missing_in_green.len()
        } else {
            self.diff.extra_in_green.len()
        };
        self.max.saturating_sub(listed)
    }

    /// `rows` missing (or extra) rows, of which the keys `listed` (at most the room left).
    fn bulk(&mut self, missing: bool, rows: u64, listed: Vec<String>) {
        let (count, list) = if missing {
            (
                &mut self.diff.missing_count,
                &mut self.diff.missing_in_green,
            )
        } else {
            (&mut self.diff.extra_count, &mut self.diff.extra_in_green)
        };
        *count += rows;
        let room = self.max.saturating_sub(list.len());
        list.extend(listed.into_iter().take(room));
    }

    fn differing(&mut self, key: String, columns: Vec<String>) {
        self.diff.differing_count += 1;
        if self.diff.differing.len() < self.max {
            self.diff.differing.push(Differing { key, columns });
        }
    }
}

/// The settings of shadowsync's sessions that decide text forms (see `config::SESSION_OPTIONS`),
/// for this transaction: the hashes of equal values must not depend on who connected.
const TEXT_SETTINGS: &str = "SET LOCAL datestyle = 'ISO, MDY'; SET LOCAL intervalstyle = postgres;
     SET LOCAL extra_float_digits = 3; SET LOCAL timezone = 'UTC'; SET LOCAL bytea_output = hex;
     SET LOCAL lc_monetary = 'C'; SET LOCAL xmloption = content";

/// Sets the text forms for the transaction, after checking there is one: the snapshot, and the
/// temporary tables and settings that last as long as it.
async fn in_snapshot(side: Side, client: &Client, label: &str) -> Result<(), CompareError> {
    let isolation: String = client
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .map_err(db(side, label, "reading the transaction's isolation"))?
        .get(0);
    if !matches!(isolation.as_str(), "repeatable read" | "serializable") {
        return Err(CompareError::NoSnapshot { side: side.name() });
    }
    client
        .batch_execute(TEXT_SETTINGS)
        .await
        .map_err(db(side, label, "setting the text forms"))
}

/// Compares the rows that `maps` (the mappings writing one target table) should have put in
/// green with green's; `blue` and `green` are each inside a `REPEATABLE READ` transaction that
/// imported the snapshot of one consistent point (green's read-write when a mapping has to be
/// evaluated there: its rows are staged in temporary tables). `progress` hears the rows
/// compared, as increments, chunk by chunk.
pub async fn compare(
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MappingDiff, CompareError> {
    compare_scoped(blue, green, maps, opts, None, progress).await
}

/// [`compare`] after an earlier point at which the same mappings matched (see [`Since`]): the
/// keys as sets, and in full only the rows written on either side since that point. Mappings
/// that cannot be narrowed that way are compared in full (see `changed::unsupported`); the
/// diff says which ([`MappingDiff::in_full`]).
pub async fn compare_since(
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &Options,
    since: &Since,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MappingDiff, CompareError> {
    compare_scoped(blue, green, maps, opts, Some(since), progress).await
}

async fn compare_scoped(
    blue: &Client,
    green: &Client,
    maps: &[Arc<TableMap>],
    opts: &Options,
    since: Option<&Since>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MappingDiff, CompareError> {
    let started = Instant::now();
    let first = maps
        .first()
        .ok_or_else(|| CompareError::Mappings("no mapping given".into()))?;
    if let Some(other) = maps.iter().find(|m| m.target != first.target) {
        return Err(CompareError::Mappings(format!(
            "the mappings write different tables ({} and {}): compare one target at a time",
            first.target, other.target
        )));
    }
    for (side, client) in [(Side::Blue, blue), (Side::Green, green)] {
        in_snapshot(side, client, &first.label).await?;
    }
    let (shape, mapped) = plan::shape(maps).map_err(CompareError::Mappings)?;
    let mut diff = MappingDiff {
        source: maps
            .iter()
            .map(|m| m.source.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        target: first.target.to_string(),
        ..MappingDiff::default()
    };
    let sides = Sides { blue, green };
    let unique = maps.len() == 1 && plan::unique_on_blue(first);
    let reason = since.and_then(|_| changed::unsupported(&shape, maps));
    match since {
        Some(since) if reason.is_none() => {
            diff.incremental = true;
            changed::run(
                &sides, &shape, &mapped, unique, opts, since, &mut diff, progress,
            )
            .await?;
        }
        _ => {
            diff.in_full = reason;
            full(&sides, &shape, &mapped, unique, opts, &mut diff, progress).await?;
        }
    }
    diff.seconds = started.elapsed().as_secs_f64();
    Ok(diff)
}

/// Both connections, inside their snapshots.
struct Sides<'a> {
    blue: &'a Client,
    green: &'a Client,
}

/// Builds each mapping's source (see `plan::source`); also returns the temporary tables made.
async fn sources(
    cx: &plan::Ctx<'_>,
    mapped: &[plan::Mapped<'_>],
) -> Result<(Vec<Source>, Vec<String>), CompareError> {
    let mut sources = Vec::with_capacity(mapped.len());
    let mut temp = Vec::new();
    for m in mapped {
        let s = plan::source(cx, m).await?;
        if !matches!(s, Source::Blue(_)) {
            temp.push(plan::staging_name(m.n));
            temp.push(plan::expected_name(m.n));
        }
        sources.push(s);
    }
    Ok((sources, temp))
}

/// Compares every row of `shape`'s columns, adding what it finds to `diff`.
async fn full(
    sides: &Sides<'_>,
    shape: &Shape,
    mapped: &[plan::Mapped<'_>],
    unique: bool,
    opts: &Options,
    diff: &mut MappingDiff,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), CompareError> {
    let first = mapped[0].map;
    let cx = plan::Ctx {
        blue: sides.blue,
        green: sides.green,
        shape,
        statements: Default::default(),
    };
    let (sources, temp) = sources(&cx, mapped).await?;
    let target = plan::target(shape, first);
    let mut tally = Tally {
        diff,
        max: opts.max_keys,
    };
    for s in &sources {
        if let Source::Green(_, rows @ 1..) = s {
            let key: Vec<&str> = shape.key.iter().map(|&k| shape.names[k].as_str()).collect();
            let nulls = vec!["NULL"; key.len()];
            let label = format!("({})=({})", key.join(", "), nulls.join(", "));
            tally.bulk(true, *rows, vec![label]);
            tally.diff.rows_blue += rows;
        }
    }
    if shape.key.is_empty() {
        keyless::run(&cx, &sources, &target, &mut tally, progress).await?;
    } else {
        keyed::Keyed::new(&cx, &sources, &target, unique)
            .run(opts.chunk_rows, &mut tally, progress)
            .await?;
    }
    stage::drop_all(sides.green, &temp, &first.label).await
}
