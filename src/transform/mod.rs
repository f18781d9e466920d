//! Mapping of blue relations onto green tables: which target columns are written, with which SQL
//! expression over the source row, and which columns identify a row.
//!
//! Every mapping is data for the apply stage: a target column is `CAST((expr) AS type)` where
//! `expr` reads the relation `src` (the decoded source row, each column cast to `sql_type`).
//! Identity mapping (`expr = src."col"`) is one such mapping; rule files produce others.
//!
//! Invariants: a mapping's key columns are computable from the source columns in `row_key`,
//! which are the source's replica identity columns, so deletes (which carry only those) can
//! always be applied; a table with no key is only ever appended to, or matched on its full old
//! row (REPLICA IDENTITY FULL).

pub mod catalog;
pub mod expr;
pub mod rules;

use std::sync::Arc;

use crate::decode::{Relation, ReplicaIdentity};
use catalog::GreenTable;

/// `schema.table`, unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier (doubling embedded quotes), always.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One column of the source row as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    /// SQL type the text value is cast to inside `src` (green's spelling). Without a type
    /// modifier: an explicit cast to `varchar(n)` or `char(n)` would silently truncate.
    pub sql_type: String,
}

/// One written column of the target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// Green's type of the column (`format_type` spelling).
    pub sql_type: String,
    /// The same type without its modifier: written values are cast to it, and the INSERT or
    /// UPDATE applies the modifier with assignment semantics (an error, never a truncation).
    pub base_type: String,
    /// SQL expression over `src`.
    pub expr: String,
    /// Source columns (indices into `TableMap::source_columns`) that `expr` reads.
    pub inputs: Vec<usize>,
}

/// How one blue relation lands in green.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMap {
    pub source: QualifiedName,
    pub target: QualifiedName,
    /// Source row layout, in pgoutput column order.
    pub source_columns: Vec<SourceColumn>,
    /// Target columns written.
    pub columns: Vec<TargetColumn>,
    /// Target key (indices into `columns`); empty when the target has no primary key.
    pub key: Vec<usize>,
    /// Source columns that identify a row (inputs of the key columns).
    pub row_key: Vec<usize>,
    pub replica_identity: ReplicaIdentity,
    /// `schema.table` of the target, for metric labels and logs.
    pub label: String,
}

impl TableMap {
    pub fn is_keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// Source columns needed to compute every target column.
    pub fn used_source_columns(&self) -> Vec<usize> {
        let mut used: Vec<usize> = self
            .columns
            .iter()
            .flat_map(|c| c.inputs.iter().copied())
            .collect();
        used.sort_unstable();
        used.dedup();
        used
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error(
        "table {target} is missing on green; create it there (blue has {blue_table}) or remove {blue_table} from the publication"
    )]
    MissingTable { blue_table: String, target: String },
    #[error(
        "column {column} of blue table {blue_table} is missing on green table {target}; add it on green (ALTER TABLE {target} ADD COLUMN ...)"
    )]
    MissingColumn {
        blue_table: String,
        target: String,
        column: String,
    },
    #[error(
        "green table {target} has no primary key and blue table {blue_table} has REPLICA IDENTITY {identity:?}: updates and deletes cannot be matched; add a primary key on green or run ALTER TABLE {blue_table} REPLICA IDENTITY FULL on blue"
    )]
    NoKey {
        blue_table: String,
        target: String,
        identity: ReplicaIdentity,
    },
    #[error(
        "primary key column {column} of green table {target} is not a replica identity column of blue table {blue_table}: deletes from blue could not be matched; make the keys agree or set REPLICA IDENTITY FULL on blue"
    )]
    KeyNotInIdentity {
        blue_table: String,
        target: String,
        column: String,
    },
}

/// Identity mapping: every source column lands in the green column of the same name.
pub fn identity(relation: &Relation, green: &GreenTable) -> Result<Arc<TableMap>, MapError> {
    let source = QualifiedName::new(&relation.namespace, &relation.name);
    let target = green.name.clone();
    let mut source_columns = Vec::with_capacity(relation.columns.len());
    let mut columns = Vec::with_capacity(relation.columns.len());
    for (i, rc) in relation.columns.iter().enumerate() {
        let gc = green
            .columns
            .iter()
            .find(|c| c.name == rc.name)
            .ok_or_else(|| MapError::MissingColumn {
                blue_table: source.to_string(),
                target: target.to_string(),
                column: rc.name.clone(),
            })?;
        source_columns.push(SourceColumn {
            name: rc.name.clone(),
            sql_type: gc.base_type.clone(),
        });
        columns.push(TargetColumn {
            name: rc.name.clone(),
            sql_type: gc.sql_type.clone(),
            base_type: gc.base_type.clone(),
            expr: format!("src.{}", quote_ident(&rc.name)),
            inputs: vec![i],
        });
    }
    let mut key = Vec::with_capacity(green.primary_key.len());
    for k in &green.primary_key {
        let i =
            columns
                .iter()
                .position(|c| &c.name == k)
                .ok_or_else(|| MapError::MissingColumn {
                    blue_table: source.to_string(),
                    target: target.to_string(),
                    column: k.clone(),
                })?;
        key.push(i);
    }
    let full = relation.replica_identity == ReplicaIdentity::Full;
    // Keyless targets can only be matched on the full old row; with DEFAULT or INDEX identity
    // blue would send just the identity columns, which green cannot match reliably.
    if key.is_empty()
        && matches!(
            relation.replica_identity,
            ReplicaIdentity::Default | ReplicaIdentity::Index
        )
        && relation.columns.iter().any(|c| c.is_key)
    {
        return Err(MapError::NoKey {
            blue_table: source.to_string(),
            target: target.to_string(),
            identity: relation.replica_identity,
        });
    }
    let row_key: Vec<usize> = key.iter().map(|&k| columns[k].inputs[0]).collect();
    if !full {
        for &k in &key {
            if !relation.columns[columns[k].inputs[0]].is_key {
                return Err(MapError::KeyNotInIdentity {
                    blue_table: source.to_string(),
                    target: target.to_string(),
                    column: columns[k].name.clone(),
                });
            }
        }
    }
    Ok(Arc::new(TableMap {
        label: target.to_string(),
        source,
        target,
        source_columns,
        columns,
        key,
        row_key,
        replica_identity: relation.replica_identity,
    }))
}
