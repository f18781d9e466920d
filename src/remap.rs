//! `shadowsync remap --table T`: re-derives a green table's lookup columns (those whose rule
//! reads another table) from the rows green holds, set-based, one key range per transaction.
//! For what the stream cannot see: a change of a green-only table (`tenants`), a rule fixed
//! after rows were written, a lookup `check` reports as evaluated once.
//!
//! Invariants: only derived columns are written, and only where their value changes; every
//! input is read from the column green stores it in (refused, naming it, when green does not
//! store it as is); one statement per chunk, its size bounded by `--chunk-rows`; chunks commit
//! one by one, so an interrupted remap leaves every row either re-derived or as it was, and
//! running it again finishes the job; writes run with `session_replication_role = replica`, as
//! the stream's do (green's triggers do not fire).

use tokio_postgres::Client;

use crate::check::MappingCheck;
use crate::config::Config;
use crate::transform::remap::{derived_columns, stored_inputs};

/// Default `--chunk-rows`.
pub const DEFAULT_CHUNK_ROWS: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "table {table} is not written by this config's mappings (targets: {targets}); name a green table a rule or the publication writes"
    )]
    UnknownTable { table: String, targets: String },
    #[error(
        "table {table} cannot be mapped now: {problems}; run `shadowsync check` and fix that first"
    )]
    Unmapped { table: String, problems: String },
    #[error("table {table}: {why}; remap cannot rebuild the rule's input from green's row")]
    Inputs { table: String, why: String },
    #[error(
        "table {table} has no single-column key to walk in chunks; re-derive it with an UPDATE of your own"
    )]
    NoKey { table: String },
    #[error("cannot connect to green ({dsn}): {failure}")]
    Connect {
        dsn: String,
        failure: Box<crate::failure::DbFailure>,
    },
    #[error("table {table}: {context} failed on green after {done} rows re-derived: {failure}")]
    Green {
        table: String,
        context: &'static str,
        done: u64,
        failure: Box<crate::failure::DbFailure>,
    },
}

/// What `remap` did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remapped {
    pub table: String,
    pub columns: Vec<String>,
    pub rows: u64,
    /// Tables whose rules read this one: re-derive them next if the change matters to them.
    pub readers: Vec<String>,
}

impl std::fmt::Display for Remapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = if self.rows == 1 { "row" } else { "rows" };
        write!(
            f,
            "{}: {} {rows} re-derived ({})",
            self.table,
            self.rows,
            if self.columns.is_empty() {
                "no column reads another table".to_string()
            } else {
                self.columns.join(", ")
            }
        )?;
        for r in &self.readers {
            write!(
                f,
                "\n  {r} reads {}: run `shadowsync remap --table {r}` if their values depend on what changed",
                self.table
            )?;
        }
        Ok(())
    }
}

/// Re-derives the lookup columns of each of `tables` (green tables, `public` by default).
pub async fn command(
    config: &Config,
    tables: &[String],
    chunk_rows: i64,
) -> Result<Vec<Remapped>, RemapError> {
    let report = crate::check::command(config).await?;
    let green_dsn = config.green_dsn()?;
    let (green, connection) = green_dsn
        .connect("shadowsync-remap")
        .await
        .map_err(|source| RemapError::Connect {
            dsn: green_dsn.to_string(),
            failure: Box::new(crate::failure::DbFailure::from_pg(&source)),
        })?;
    let result = async {
        let _ = crate::session_role::set_replica(&green).await;
        let mut done = Vec::new();
        for t in tables {
            let m = find(&report.mappings, t)?;
            done.push(remap_table(&green, m, &report.mappings, chunk_rows.max(1)).await?);
        }
        Ok(done)
    }
    .await;
    connection.abort();
    result
}

/// The mapping writing green table `table` (`schema.table`, `public` without a schema).
fn find<'m>(mappings: &'m [MappingCheck], table: &str) -> Result<&'m MappingCheck, RemapError> {
    let label = if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    };
    mappings
        .iter()
        .find(|m| m.target.as_ref().is_some_and(|t| t.to_string() == label))
        .ok_or_else(|| RemapError::UnknownTable {
            table: label,
            targets: mappings
                .iter()
                .filter_map(|m| m.target.as_ref().map(|t| t.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

async fn remap_table(
    green: &Client,
    m: &MappingCheck,
    all: &[MappingCheck],
    chunk_rows: i64,
) -> Result<Remapped, RemapError> {
    let label = m.target.as_ref().map(|t| t.to_string()).unwrap_or_default();
    let Some(map) = m.map.as_ref().filter(|_| m.problems.is_empty()) else {
        return Err(RemapError::Unmapped {
            table: label,
            problems: m.problems.join("; "),
        });
    };
    let derived = derived_columns(map);
    let readers = all
        .iter()
        .filter_map(|r| r.map.as_ref())
        .filter(|r| r.label != map.label && r.reads_table(&map.label))
        .map(|r| r.label.clone())
        .collect();
    let mut done = Remapped {
        table: label.clone(),
        columns: derived
            .iter()
            .map(|&d| map.columns[d].name.clone())
            .collect(),
        rows: 0,
        readers,
    };
    if derived.is_empty() {
        return Ok(done);
    }
    let inputs = stored_inputs(map, &derived).map_err(|why| RemapError::Inputs {
        table: label.clone(),
        why,
    })?;
    if map.key.len() != 1 {
        return Err(RemapError::NoKey { table: label });
    }
    let text = crate::statement::remap::chunk(map, &derived, &inputs);
    let failed = |context, done: u64| {
        let table = label.clone();
        move |source: tokio_postgres::Error| RemapError::Green {
            table,
            context,
            done,
            failure: Box::new(crate::failure::DbFailure::from_pg(&source)),
        }
    };
    let statement = green
        .prepare(&text)
        .await
        .map_err(failed("preparing the re-derivation", 0))?;
    let mut after: Option<String> = None;
    loop {
        let row = green
            .query_one(&statement, &[&after, &chunk_rows])
            .await
            .map_err(failed("re-deriving a chunk", done.rows))?;
        let last: Option<String> = row.get(0);
        done.rows += row.get::<_, i64>(1) as u64;
        match last {
            Some(last) => after = Some(last),
            None => return Ok(done),
        }
    }
}
