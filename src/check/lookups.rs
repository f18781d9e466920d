//! `check`'s account of every lookup: which reader columns are re-derived when the looked-up
//! rows change (and through which stored column), which are evaluated once and why, and which
//! read green-only tables that only `shadowsync remap` re-derives.
//!
//! Invariant: every relation a rule reads gets exactly one of those three verdicts, with the
//! rule's place, so no lookup is silently evaluated once.

use tokio_postgres::Client;

use super::MappingCheck;
use crate::transform::remap::{self, Remap};
use crate::transform::{QualifiedName, TableMap};

/// Adds the lookup verdicts of every mapping to its notes and warnings.
pub async fn annotate(
    green: &Client,
    mappings: &mut [MappingCheck],
) -> Result<(), tokio_postgres::Error> {
    let maps: Vec<std::sync::Arc<TableMap>> =
        mappings.iter().filter_map(|m| m.map.clone()).collect();
    for m in mappings.iter_mut() {
        let Some(reader) = m.map.clone() else {
            continue;
        };
        let at = m
            .rule
            .as_ref()
            .map(|o| format!("{o}: "))
            .unwrap_or_default();
        for chain in &reader.reads {
            let read = maps
                .iter()
                .find(|r| crate::transform::chain_names(chain, &r.label));
            match read.and_then(|r| remap::plan(&reader, r)) {
                Some(Ok(plan)) => {
                    m.notes.push(remapped(&reader, &plan));
                    if !indexed(green, &reader, plan.via).await? {
                        m.warnings.push(format!(
                            "{at}no index on green's {}.{} leads with that column: each batch that changes {} scans {} to re-derive it; CREATE INDEX ON {} ({})",
                            reader.label,
                            reader.columns[plan.via].name,
                            plan.read,
                            reader.label,
                            reader.target.quoted(),
                            crate::transform::quote_ident(&reader.columns[plan.via].name)
                        ));
                    }
                }
                Some(Err(once)) => m.warnings.push(format!(
                    "{at}columns reading {} are evaluated once, when the {} row is written, and not re-derived when {} changes: {}",
                    once.read, reader.label, once.read, once.why
                )),
                // The reader itself (a self-lookup) or a green-only table.
                None if read.is_some() => m.warnings.push(format!(
                    "{at}{} reads itself: such columns are evaluated once, when the row is written",
                    reader.label
                )),
                None => m.notes.push(format!(
                    "{at}{} is not streamed from blue (green-only): a change there re-derives nothing; after changing it, run `shadowsync remap --config <file> --table {}`",
                    chain.join("."),
                    reader.label
                )),
            }
        }
    }
    Ok(())
}

/// "re-derived on change of users (tenant_id) via vms.owner_id".
fn remapped(reader: &TableMap, plan: &Remap) -> String {
    let derived: Vec<&str> = plan
        .derived
        .iter()
        .map(|&d| reader.columns[d].name.as_str())
        .collect();
    format!(
        "{} ({}) re-derived on change of {} via {}.{}",
        reader.label,
        derived.join(", "),
        plan.read,
        reader.label,
        reader.columns[plan.via].name
    )
}

/// Whether an index of green's reader table leads with column `via`.
async fn indexed(
    green: &Client,
    reader: &TableMap,
    via: usize,
) -> Result<bool, tokio_postgres::Error> {
    let QualifiedName { schema, name } = &reader.target;
    let row = green
        .query_one(
            "SELECT EXISTS (
                 SELECT 1 FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                  WHERE i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                    AND a.attname = $3)",
            &[schema, name, &reader.columns[via].name],
        )
        .await?;
    Ok(row.get(0))
}
