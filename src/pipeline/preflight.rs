//! The checks `run` makes before it streams: blue's settings and publication, every mapping
//! against both schemas (see `check`), and the slot against green's progress.
//!
//! Invariant: creates nothing; every failure tells the operator what is wrong and what to run.

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::{SourceError, blue_err, catalog, slot};
use crate::transform::QualifiedName;
use crate::transform::rules::RuleSet;

/// What the preflight learned about blue.
#[derive(Debug, Clone)]
pub struct BlueState {
    /// The slot's `confirmed_flush_lsn`; `None` when the slot does not exist yet.
    pub slot_confirmed: Option<Lsn>,
    /// Tables in the publication.
    pub tables: Vec<QualifiedName>,
    /// Mappings of the replicated tables (not skipped), from blue's catalog.
    pub maps: Vec<std::sync::Arc<crate::transform::TableMap>>,
}

/// The published tables and the mappings of those replicated (not skipped), as `check` sees
/// them; the inner error is `check`'s list of problems (none is mapped when any fails). Warnings
/// are logged. Shared by `run`, `cutover` and `verify`, which all refuse mappings `check` fails.
pub async fn mappings(
    blue: &Client,
    green: &Client,
    publication: &str,
    rules: &RuleSet,
) -> Result<Result<Mapped, String>, SourceError> {
    let tables = catalog::check_blue(blue, publication).await?;
    let report = crate::check::check(blue, green, &tables, publication, rules)
        .await
        .map_err(blue_err("checking the mappings"))?;
    if !report.ok() {
        return Ok(Err(report.problems_text()));
    }
    for m in &report.mappings {
        for w in &m.warnings {
            tracing::warn!(table = %m.source, warning = %w, "check warns about this mapping");
        }
    }
    let maps = report
        .mappings
        .iter()
        .filter_map(|m| m.map.clone())
        .collect();
    Ok(Ok((tables, maps)))
}

/// Published tables, and the mappings of the replicated ones.
pub type Mapped = (
    Vec<QualifiedName>,
    Vec<std::sync::Arc<crate::transform::TableMap>>,
);

/// Checks blue's settings, the user's privilege, the publication, the mapping of every
/// published table (see `check`) and the slot (see `source::slot::slot_state`). Creates nothing.
pub async fn check(
    blue: &Client,
    green: &Client,
    slot: &str,
    publication: &str,
    rules: &RuleSet,
    green_progress: Option<Lsn>,
) -> Result<BlueState, SourceError> {
    let (tables, maps) = mappings(blue, green, publication, rules)
        .await?
        .map_err(SourceError::Setup)?;
    let slot_confirmed = slot::slot_state(blue, slot, green_progress).await?;
    Ok(BlueState {
        slot_confirmed,
        tables,
        maps,
    })
}
