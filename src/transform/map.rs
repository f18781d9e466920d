//! Building a mapping: a blue table, its rule (if any) and green's table in, a [`TableMap`] or
//! the reason there can be none out.
//!
//! Invariants: the phases run in a fixed order (columns, key, key checks, filter, conflicts,
//! lookups, new-key shortcuts), so the first of several problems is always the one reported;
//! nothing here touches a database.

use std::sync::Arc;

use super::catalog::{GreenColumn, GreenTable};
use super::lww::{self, ConflictsConfig};
use super::rules::{Origin, Rule};
use super::{
    Filter, KeyedLookup, MapError, SourceColumn, SourceTable, TableMap, TargetColumn, expr,
    quote_ident,
};
use crate::decode::{Relation, ReplicaIdentity};

/// Key types whose equality on green is equality of blue's text (no collation, no case folding).
const CANONICAL_KEY_TYPES: [&str; 4] = ["smallint", "integer", "bigint", "uuid"];

/// The columns of green's table that identify a row (empty: none). Green's primary key when
/// it has one (as for PostgreSQL's own apply worker). Otherwise, unless blue sends full old
/// rows, green's replica identity index or another unique index over exactly blue's replica
/// identity: each of its columns a NOT NULL copy, as is, of one identity column, together all
/// of them. Blue's identity (a primary key, or an index REPLICA IDENTITY accepts) holds each
/// key once and never NULL, so green's index then holds what blue's does. An index over part
/// of the identity would merge rows blue keeps apart; a computed column could be NULL, which
/// matches nothing. Under REPLICA IDENTITY FULL blue may hold equal rows twice (it has no key),
/// which no unique index of green can: such tables are matched on the full old row.
fn choose_key(
    source: &SourceTable,
    names: &[String],
    green: &GreenTable,
    columns: &[TargetColumn],
) -> Vec<String> {
    if !green.primary_key.is_empty() {
        return green.primary_key.clone();
    }
    if source.replica_identity == ReplicaIdentity::Full {
        return Vec::new();
    }
    let identity = identity_columns(source);
    // The identity column a target column copies as is, when it is NOT NULL on green.
    let copied = |name: &String| {
        let c = columns.iter().find(|c| &c.name == name)?;
        c.copied_from(names)
            .filter(|&i| c.not_null && source.columns[i].is_key)
    };
    green
        .unique_keys
        .iter()
        .find(|u| {
            let mut from: Vec<usize> = match u.columns.iter().map(copied).collect() {
                Some(from) => from,
                None => return false,
            };
            from.sort_unstable();
            from.dedup();
            !identity.is_empty() && from == identity && u.columns.len() == identity.len()
        })
        .map(|u| u.columns.clone())
        .unwrap_or_default()
}

/// Identity mapping: every source column lands in the green column of the same name.
pub fn identity(
    relation: &Relation,
    green: &GreenTable,
    conflicts: &ConflictsConfig,
) -> Result<Arc<TableMap>, MapError> {
    let types: Vec<String> = relation
        .columns
        .iter()
        .map(|c| {
            green
                .columns
                .iter()
                .find(|g| g.name == c.name)
                .map(|g| g.base_type.clone())
                .unwrap_or_else(|| "text".into())
        })
        .collect();
    let blue_types = types.clone();
    let source = SourceTable::from_relation(relation, types, blue_types);
    build(&source, None, green, conflicts).map(|m| m.expect("identity mappings are never skipped"))
}

/// The mapping of `source` onto `green` under `rule` (identity without one); `None` when the
/// rule skips the table.
pub fn build(
    source: &SourceTable,
    rule: Option<&Rule>,
    green: &GreenTable,
    conflicts: &ConflictsConfig,
) -> Result<Option<Arc<TableMap>>, MapError> {
    if rule.is_some_and(|r| r.skip) {
        return Ok(None);
    }
    let b = Builder::new(source, rule, green);
    let columns = b.columns()?;
    let key_columns = choose_key(source, &b.names, green, &columns);
    let key = b.key(&columns, &key_columns)?;
    let row_key = row_key(&columns, &key);
    b.check_key(&columns, &key, &row_key)?;
    let filter = b.filter();
    let reads = reads(&columns, filter.as_ref());
    let conflicts = lww::policy(conflicts, rule, green, &columns)?;
    let keyed_lookups = keyed_lookups(&columns, filter.as_ref(), &reads, &b.names);
    let plain_key = match key.as_slice() {
        [k] => columns[*k].copied_from(&b.names),
        _ => None,
    };
    let insert_new_keys = b.insert_new_keys(&columns, &key, &key_columns, &row_key);
    let copy_new_keys = b.copy_new_keys(&columns, insert_new_keys.is_some(), filter.is_some());
    let target = green.name.clone();
    Ok(Some(Arc::new(TableMap {
        awaits_identity: !b.has_identity && !key.is_empty(),
        label: target.to_string(),
        source: source.name.clone(),
        target,
        source_columns: b.source_columns(),
        columns,
        key,
        row_key,
        replica_identity: source.replica_identity,
        partitioned: green.partitioned,
        filter,
        reads,
        origin: rule.map(|r| r.origin.clone()),
        conflicts,
        keyed_lookups,
        plain_key,
        insert_new_keys,
        copy_new_keys,
    })))
}

/// What the phases of [`build`] share: its inputs, and facts about the source they all ask.
struct Builder<'a> {
    source: &'a SourceTable,
    rule: Option<&'a Rule>,
    green: &'a GreenTable,
    /// The source columns' names, in the source row's order.
    names: Vec<String>,
    /// `schema.table` of the source, for messages.
    source_name: String,
    /// Blue sends full old rows (REPLICA IDENTITY FULL).
    full: bool,
    /// Blue describes the table with some replica identity (see `TableMap::awaits_identity`).
    has_identity: bool,
}

impl<'a> Builder<'a> {
    fn new(source: &'a SourceTable, rule: Option<&'a Rule>, green: &'a GreenTable) -> Self {
        let full = source.replica_identity == ReplicaIdentity::Full;
        Builder {
            source,
            rule,
            green,
            names: source.columns.iter().map(|c| c.name.clone()).collect(),
            source_name: source.name.to_string(),
            full,
            has_identity: full || source.columns.iter().any(|c| c.is_key),
        }
    }

    /// An error of the rule, or of the identity mapping when there is none.
    fn rule_error(&self, message: String) -> MapError {
        let origin = match self.rule {
            Some(r) => r.origin.clone(),
            None => Origin {
                file: "<identity>".into(),
                line: 0,
            },
        };
        MapError::Rule { origin, message }
    }

    fn source_columns(&self) -> Vec<SourceColumn> {
        self.source
            .columns
            .iter()
            .map(|c| SourceColumn {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
                blue_type: c.blue_type.clone(),
            })
            .collect()
    }

    /// The target columns written, in green's order: those the rule maps, and those blue has
    /// under the same name.
    fn columns(&self) -> Result<Vec<TargetColumn>, MapError> {
        self.check_listed()?;
        let columns: Vec<TargetColumn> = self
            .green
            .columns
            .iter()
            .filter_map(|g| self.column(g))
            .collect();
        let target = &self.green.name;
        if self.rule.is_none()
            && let Some(c) = self
                .source
                .columns
                .iter()
                .find(|c| !self.green.columns.iter().any(|g| g.name == c.name))
        {
            return Err(MapError::MissingColumn {
                blue_table: self.source_name.clone(),
                target: target.to_string(),
                column: c.name.clone(),
            });
        }
        // A rule that writes nothing of a table with columns is a mistake; a table without
        // columns (on both sides) is replicated as it is: rows of no columns.
        if columns.is_empty() && self.rule.is_some() && !self.source.columns.is_empty() {
            return Err(self.rule_error(format!(
                "no column of green table {target} is written: map at least one in [table.columns]"
            )));
        }
        Ok(columns)
    }

    /// Every column the rule maps exists on green.
    fn check_listed(&self) -> Result<(), MapError> {
        let Some(rule) = self.rule else {
            return Ok(());
        };
        let target = &self.green.name;
        for (column, expr) in &rule.columns {
            if !self.green.columns.iter().any(|g| &g.name == column) {
                return Err(MapError::Rule {
                    origin: expr.origin.clone(),
                    message: format!(
                        "target column {column} does not exist on green table {target} (or is generated)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Green's column `g` as written: the rule's expression, else blue's column of its name.
    fn column(&self, g: &GreenColumn) -> Option<TargetColumn> {
        let (expr, inputs) = match self.rule.and_then(|r| r.columns.get(&g.name)) {
            Some(e) => (e.value.clone(), expr::inputs(&e.value, &self.names)),
            None => {
                // Neither mapped nor in the source: default on insert, untouched on update.
                let i = self.names.iter().position(|n| n == &g.name)?;
                (format!("src.{}", quote_ident(&g.name)), vec![i])
            }
        };
        Some(TargetColumn {
            name: g.name.clone(),
            sql_type: g.sql_type.clone(),
            base_type: g.base_type.clone(),
            expr,
            inputs,
            collation: g.collation.clone(),
            has_equality: g.has_equality,
            not_null: g.not_null,
        })
    }

    /// The key (indices into `columns`) of green's key columns `key_columns` (see
    /// [`choose_key`]), each of which the mapping must write.
    fn key(
        &self,
        columns: &[TargetColumn],
        key_columns: &[String],
    ) -> Result<Vec<usize>, MapError> {
        let key = key_columns
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| &c.name == k)
                    .ok_or_else(|| self.unwritten_key(k))
            })
            .collect::<Result<Vec<usize>, MapError>>()?;
        // Keyless targets can only be matched on the full old row; with DEFAULT or INDEX identity
        // blue sends just the identity columns, and green has no unique index over them.
        if key.is_empty() && !self.full && self.has_identity {
            return Err(MapError::NoKey {
                blue_table: self.source_name.clone(),
                target: self.green.name.to_string(),
                identity_columns: self
                    .source
                    .columns
                    .iter()
                    .filter(|c| c.is_key)
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(key)
    }

    /// Green's key column `k` is not written by the mapping.
    fn unwritten_key(&self, k: &String) -> MapError {
        let target = &self.green.name;
        let source_name = &self.source_name;
        if self.rule.is_some() {
            self.rule_error(format!(
                "primary key column {k} of green table {target} is neither mapped by the rule nor a column of {source_name}: add {k} = \"<expression>\" to [table.columns]"
            ))
        } else {
            MapError::MissingColumn {
                blue_table: source_name.clone(),
                target: target.to_string(),
                column: k.clone(),
            }
        }
    }

    /// Whether every change can be matched to its row by `key` (read from `row_key`).
    fn check_key(
        &self,
        columns: &[TargetColumn],
        key: &[usize],
        row_key: &[usize],
    ) -> Result<(), MapError> {
        let target = &self.green.name;
        let source_name = &self.source_name;
        // Without any identity, no old row arrives: nothing to check the key against (see
        // `TableMap::awaits_identity`).
        if !self.full && self.has_identity {
            self.check_key_in_identity(columns, key)?;
        }
        // A key computed through a lookup would be recomputed against green's later state when a
        // delete arrives, and could miss the row.
        if let Some(&k) = key
            .iter()
            .find(|&&k| !expr::relations(&columns[k].expr).is_empty())
        {
            return Err(self.rule_error(format!(
                "primary key column {} of green table {target} is computed by reading another table: deletes could miss the row; compute the key from {source_name}'s own columns",
                columns[k].name
            )));
        }
        if !key.is_empty() && row_key.is_empty() {
            return Err(self.rule_error(format!(
                "the primary key of green table {target} is computed from no column of {source_name}: changes could not be matched to rows; compute it from the source's key columns"
            )));
        }
        if key.is_empty() && self.rule.is_some_and(|r| r.filter.is_some()) {
            return Err(self.rule_error(format!(
                "green table {target} has no primary key, so rows leaving the filter could not be found: add a primary key on green, or drop the filter"
            )));
        }
        Ok(())
    }

    /// On DELETE pgoutput sends only the replica identity: the key must come from it.
    fn check_key_in_identity(
        &self,
        columns: &[TargetColumn],
        key: &[usize],
    ) -> Result<(), MapError> {
        let target = &self.green.name;
        let source_name = &self.source_name;
        for &k in key {
            let Some(&c) = columns[k]
                .inputs
                .iter()
                .find(|&&c| !self.source.columns[c].is_key)
            else {
                continue;
            };
            if self.rule.is_none() {
                return Err(MapError::KeyNotInIdentity {
                    blue_table: source_name.clone(),
                    target: target.to_string(),
                    column: columns[k].name.clone(),
                });
            }
            return Err(self.rule_error(format!(
                "key column {} of green table {target} is computed from {}, which is not in the replica identity of blue table {source_name}: deletes could not be applied; map the key from identity columns or run ALTER TABLE {} REPLICA IDENTITY FULL on blue",
                columns[k].name,
                self.source.columns[c].name,
                self.source.name.quoted()
            )));
        }
        Ok(())
    }

    fn filter(&self) -> Option<Filter> {
        self.rule.and_then(|r| r.filter.as_ref()).map(|f| Filter {
            inputs: expr::inputs(&f.value, &self.names),
            expr: f.value.clone(),
        })
    }

    /// See `TableMap::insert_new_keys`.
    fn insert_new_keys(
        &self,
        columns: &[TargetColumn],
        key: &[usize],
        key_columns: &[String],
        row_key: &[usize],
    ) -> Option<Vec<String>> {
        let verbatim = |k: usize| {
            let ty = columns[k].base_type.as_str();
            columns[k]
                .copied_from(&self.names)
                .is_some_and(|i| ty == self.source.columns[i].sql_type)
                && CANONICAL_KEY_TYPES.contains(&ty)
        };
        let key_names = self
            .green
            .unique_keys
            .iter()
            .find(|u| u.columns == key_columns)
            .map(|u| u.violation_names.clone());
        (!key.is_empty()
            && !self.full
            && key.iter().all(|&k| verbatim(k))
            && row_key == identity_columns(self.source))
        .then_some(key_names)
        .flatten()
    }

    /// See `TableMap::copy_new_keys`; `inserts_new`: the mapping has `insert_new_keys`.
    fn copy_new_keys(
        &self,
        columns: &[TargetColumn],
        inserts_new: bool,
        filtered: bool,
    ) -> Option<Vec<usize>> {
        if !inserts_new || filtered || !self.green.accepts_copy {
            return None;
        }
        columns
            .iter()
            .map(|c| {
                c.copied_from(&self.names)
                    .filter(|&i| c.base_type == self.source.columns[i].sql_type)
            })
            .collect()
    }
}

/// Indices of the source's replica identity columns.
fn identity_columns(source: &SourceTable) -> Vec<usize> {
    (0..source.columns.len())
        .filter(|&i| source.columns[i].is_key)
        .collect()
}

/// The source columns the key columns read (see `TableMap::row_key`), sorted, each once.
fn row_key(columns: &[TargetColumn], key: &[usize]) -> Vec<usize> {
    let mut row_key: Vec<usize> = key
        .iter()
        .flat_map(|&k| columns[k].inputs.clone())
        .collect();
    row_key.sort_unstable();
    row_key.dedup();
    row_key
}

/// The relations the columns' and the filter's expressions read, sorted, each once.
fn reads(columns: &[TargetColumn], filter: Option<&Filter>) -> Vec<Vec<String>> {
    let mut reads: Vec<Vec<String>> = columns
        .iter()
        .flat_map(|c| expr::relations(&c.expr))
        .chain(filter.iter().flat_map(|f| expr::relations(&f.expr)))
        .collect();
    reads.sort();
    reads.dedup();
    reads
}

/// The keyed lookups of the mapping's expressions, over the relations in `reads`.
fn keyed_lookups(
    columns: &[TargetColumn],
    filter: Option<&Filter>,
    reads: &[Vec<String>],
    names: &[String],
) -> Vec<KeyedLookup> {
    let exprs: Vec<&str> = columns
        .iter()
        .map(|c| c.expr.as_str())
        .chain(filter.iter().map(|f| f.expr.as_str()))
        .collect();
    reads
        .iter()
        .filter_map(|relation| lookups_of(&exprs, relation, names))
        .flatten()
        .collect()
}

/// The keyed lookups of `relation` in `exprs`; `None` unless every expression that reads it
/// reads it keyed (a relation is keyed only if all of them do).
fn lookups_of(exprs: &[&str], relation: &[String], names: &[String]) -> Option<Vec<KeyedLookup>> {
    exprs
        .iter()
        .filter(|e| expr::relations(e).iter().any(|r| r == relation))
        .map(|e| {
            let (key, column) = expr::keyed_lookup(e, relation, names)?;
            Some(KeyedLookup {
                relation: relation.to_vec(),
                key,
                column,
            })
        })
        .collect()
}
