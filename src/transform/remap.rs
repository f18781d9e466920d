//! Which green rows a change of a looked-up table re-derives, and how: the dependency of a
//! reader's derived columns on another mapping's rows.
//!
//! A rule like `tenant_id = (SELECT u.tenant_id FROM users u WHERE u.id = src.owner_id)` reads
//! green's `users` when the reader's row is written. When a `users` row changes later, every
//! reader row whose `owner_id` equals its key must be computed again, or green stops being the
//! transform of blue. A [`Remap`] says that this can be done in green alone: the reader stores
//! `src.owner_id` as is (the `via` column), and every input of the derived columns is stored as
//! is too, so `src` can be rebuilt from green's row.
//!
//! Invariants: a remap is only planned where it is exact: a keyed lookup by the read table's
//! plain key, with the same source type on both sides, from a keyed reader whose derived
//! columns are not key columns and are computable from columns green stores verbatim. Every
//! other dependency is a [`Once`]: evaluated when the reader's row is written, never again,
//! and `check` says so with the rule's place.

use super::{TableMap, chain_names};

/// How a reader's rows are re-derived when rows of a table its rules read change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remap {
    /// The read table (`schema.table` of its target).
    pub read: String,
    /// Target column of the reader that holds the looked-up key (a copy of `src.<column>`).
    pub via: usize,
    /// Source column of the reader compared with the read table's key.
    pub column: usize,
    /// Target columns recomputed: those whose expressions read the table.
    pub derived: Vec<usize>,
    /// For every source column the derived columns read: the target column storing it.
    pub inputs: Vec<(usize, usize)>,
}

/// A dependency that cannot be re-derived in green: the reader's columns are evaluated once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    pub read: String,
    pub why: String,
}

/// The dependencies of `reader` on the mapping `read` (the table it writes), if its rules read
/// that table at all.
pub fn plan(reader: &TableMap, read: &TableMap) -> Option<Result<Remap, Once>> {
    if reader.label == read.label || !reader.reads_table(&read.label) {
        return None;
    }
    let once = |why: String| {
        Some(Err(Once {
            read: read.label.clone(),
            why,
        }))
    };
    let derived: Vec<usize> = (0..reader.columns.len())
        .filter(|&i| reads(&reader.columns[i].expr, &read.label))
        .collect();
    if reader
        .filter
        .as_ref()
        .is_some_and(|f| reads(&f.expr, &read.label))
    {
        return once(format!(
            "the filter reads {}: a change there could add or remove rows",
            read.label
        ));
    }
    let Some(lookups) = reader.keyed_lookups_of(&read.label) else {
        return once(format!(
            "an expression reads {} other than by its key (`FROM {} x WHERE x.key = src.col`)",
            read.label, read.label
        ));
    };
    let (Some(pk), [lookup]) = (read.plain_key, lookups.as_slice()) else {
        return once(format!(
            "{} is looked up more than once, or has no single-column key copied from blue",
            read.label
        ));
    };
    if lookup.key != read.columns[read.key[0]].name {
        return once(format!(
            "the lookup compares {}.{}, not its key",
            read.label, lookup.key
        ));
    }
    if reader.source_columns[lookup.column].sql_type != read.source_columns[pk].sql_type {
        return once(format!(
            "src.{} and {}'s key have different types",
            reader.source_columns[lookup.column].name, read.label
        ));
    }
    if !reader.is_keyed() || derived.iter().any(|d| reader.key.contains(d)) {
        return once("the reader has no key, or its key is derived from the lookup".into());
    }
    let stored = |source: usize| {
        (0..reader.columns.len()).find(|&t| {
            reader.columns[t].copied_from(&source_names(reader)) == Some(source)
                && reader.columns[t].sql_type == reader.source_columns[source].sql_type
        })
    };
    let Some(via) = stored(lookup.column) else {
        return once(format!(
            "green does not store src.{} as it is (copy it into a column of {})",
            reader.source_columns[lookup.column].name, reader.label
        ));
    };
    let mut inputs = Vec::new();
    for &d in &derived {
        for &i in &reader.columns[d].inputs {
            match stored(i) {
                Some(t) => inputs.push((i, t)),
                None => {
                    return once(format!(
                        "{} also reads src.{}, which green does not store as it is",
                        reader.columns[d].name, reader.source_columns[i].name
                    ));
                }
            }
        }
    }
    inputs.sort_unstable();
    inputs.dedup();
    Some(Ok(Remap {
        read: read.label.clone(),
        via,
        column: lookup.column,
        derived,
        inputs,
    }))
}

/// The target columns of `map` whose expressions read another table (`remap --table`).
pub fn derived_columns(map: &TableMap) -> Vec<usize> {
    (0..map.columns.len())
        .filter(|&i| !super::expr::relations(&map.columns[i].expr).is_empty())
        .collect()
}

/// For `remap --table`: each source column `derived` reads, with the target column storing it
/// verbatim; `Err` names the first one green does not store.
pub fn stored_inputs(map: &TableMap, derived: &[usize]) -> Result<Vec<(usize, usize)>, String> {
    let names = source_names(map);
    let mut inputs = Vec::new();
    for &d in derived {
        for &i in &map.columns[d].inputs {
            let t = (0..map.columns.len()).find(|&t| {
                map.columns[t].copied_from(&names) == Some(i)
                    && map.columns[t].sql_type == map.source_columns[i].sql_type
            });
            match t {
                Some(t) => inputs.push((i, t)),
                None => {
                    return Err(format!(
                        "{} reads src.{}, which green does not store as it is",
                        map.columns[d].name, map.source_columns[i].name
                    ));
                }
            }
        }
    }
    inputs.sort_unstable();
    inputs.dedup();
    Ok(inputs)
}

fn source_names(map: &TableMap) -> Vec<&str> {
    map.source_columns.iter().map(|c| c.name.as_str()).collect()
}

/// Whether `expr` reads the table `label` (after FROM or JOIN).
fn reads(expr: &str, label: &str) -> bool {
    super::expr::relations(expr)
        .iter()
        .any(|chain| chain_names(chain, label))
}
