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
pub mod lww;
mod map;
pub mod remap;
pub mod rules;

use crate::decode::{Relation, ReplicaIdentity};
pub use lww::{ConflictPolicy, Lww};
pub use map::{build, identity};
use rules::Origin;

/// Whether a relation chain as written in SQL (`name` or `schema.name`) names `label`.
pub(crate) fn chain_names(chain: &[String], label: &str) -> bool {
    let (schema, name) = label.split_once('.').unwrap_or(("public", label));
    match chain {
        [n] => n == name,
        [s, n] => s == schema && n == name,
        _ => false,
    }
}

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

/// Quotes a string literal for the few statements that take no parameters (`SET TRANSACTION
/// SNAPSHOT`, DDL defaults); `standard_conforming_strings` is on in every supported release.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One column of the source row as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    /// SQL type the text value is cast to inside `src` (green's spelling). Without a type
    /// modifier: an explicit cast to `varchar(n)` or `char(n)` would silently truncate.
    pub sql_type: String,
    /// The column's type as blue spells it, for queries to blue (completing TOASTed rows).
    pub blue_type: String,
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
    /// Green's collation of a collatable column (`COLLATE ...`): values compared with stored
    /// ones take it, so that the column's own equality decides.
    pub collation: Option<String>,
    /// Whether green has `=` for the column's type (see `catalog::GreenColumn`).
    pub has_equality: bool,
    /// Declared NOT NULL on green.
    pub not_null: bool,
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
    /// Target key (indices into `columns`): green's primary key, else a unique index over
    /// columns computed from blue's replica identity (see `map::choose_key`); empty when none.
    pub key: Vec<usize>,
    /// Source columns that identify a row (inputs of the key columns).
    pub row_key: Vec<usize>,
    pub replica_identity: ReplicaIdentity,
    /// Blue describes the table with no replica identity at all (its primary key was dropped,
    /// or is not there yet: `pgbench -i` and `pg_restore` add keys after loading). Blue then
    /// refuses UPDATE and DELETE on the table itself, so only inserts and truncates can
    /// arrive; they are applied by green's key. An update or delete that does arrive (a
    /// publication publishing only some actions) stops the pipeline with the fix.
    pub awaits_identity: bool,
    /// Green's table is partitioned (its rows live in partitions).
    pub partitioned: bool,
    /// `schema.table` of the target, for metric labels and logs.
    pub label: String,
    /// Only source rows matching this condition over `src` exist in green.
    pub filter: Option<Filter>,
    /// Relations the expressions read (`[schema.]name` chains after FROM/JOIN): green tables
    /// whose pending changes must be written before this table's.
    pub reads: Vec<Vec<String>>,
    /// Where the rule was written; `None` for identity mappings.
    pub origin: Option<Origin>,
    /// Conflict detection and last-writer-wins for this table.
    pub conflicts: ConflictPolicy,
    /// Lookups that read only the rows of another table whose key equals a source column (see
    /// [`expr::keyed_lookup`]); a relation in `reads` without an entry here may be read whole.
    pub keyed_lookups: Vec<KeyedLookup>,
    /// The source column copied verbatim into the single key column, if the key is that simple
    /// (a change's key is then blue's text of that column).
    pub plain_key: Option<usize>,
    /// The names a violation of green's key carries (its index, and on a partitioned table
    /// each partition's), when keys blue inserted may be written with a plain INSERT (see
    /// `statement::insert_new`): every key column is a verbatim copy of one of blue's replica
    /// identity columns, together exactly that identity, of one type whose text form is
    /// canonical (integers, uuid). Then a key new on blue is new on green unless a writer on
    /// green inserted it, and a violation of this key means just that. `None`: always upsert.
    pub insert_new_keys: Option<Vec<String>>,
    /// With `insert_new_keys`, when every target column is a verbatim copy of a source column
    /// of the same type, there is no filter, and green's table takes `COPY`: the source column
    /// of each target column. New keys are then written with `COPY ... FROM STDIN` when they are
    /// the first statement of a write, which green runs for about three quarters of the plain
    /// INSERT's CPU (see `statement::copy_new`).
    pub copy_new_keys: Option<Vec<usize>>,
}

/// One keyed lookup of a mapping: `relation` rows whose column `key` equals source column
/// `column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedLookup {
    pub relation: Vec<String>,
    pub key: String,
    pub column: usize,
}

/// A rule's row filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub expr: String,
    /// Source columns the condition reads.
    pub inputs: Vec<usize>,
}

impl TargetColumn {
    /// The source column (an index into `names`, the source columns' names) this column
    /// copies as it is (`src."col"`), if it does.
    pub fn copied_from(&self, names: &[impl AsRef<str>]) -> Option<usize> {
        match self.inputs.as_slice() {
            [i] if self.expr == format!("src.{}", quote_ident(names[*i].as_ref())) => Some(*i),
            _ => None,
        }
    }
}

impl TableMap {
    /// Whether a partial image (unchanged TOAST) may need the full row: a filter can move the
    /// row in, a column with several inputs can mix changed and unchanged values.
    pub fn completes_partial_rows(&self) -> bool {
        self.filter.is_some() || self.columns.iter().any(|c| c.inputs.len() > 1)
    }

    /// Whether this mapping's expressions read the target table `label` (`schema.table`).
    pub fn reads_table(&self, label: &str) -> bool {
        self.reads.iter().any(|chain| chain_names(chain, label))
    }

    /// The keyed lookups of table `label`, or `None` when some expression may read it whole.
    pub fn keyed_lookups_of(&self, label: &str) -> Option<Vec<&KeyedLookup>> {
        let unkeyed = self
            .reads
            .iter()
            .filter(|c| chain_names(c, label))
            .any(|c| !self.keyed_lookups.iter().any(|k| &k.relation == c));
        if unkeyed {
            return None;
        }
        Some(
            self.keyed_lookups
                .iter()
                .filter(|k| chain_names(&k.relation, label))
                .collect(),
        )
    }

    pub fn is_keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// Whether a unique violation naming `constraint` is one of green's key (see
    /// `insert_new_keys`).
    pub fn is_new_key_violation(&self, constraint: Option<&str>) -> bool {
        match (&self.insert_new_keys, constraint) {
            (Some(names), Some(c)) => names.iter().any(|n| n == c),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("{origin}: {message}")]
    Rule { origin: Origin, message: String },
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
        "green table {target} has no primary key, and no unique index over the columns of blue table {blue_table}'s replica identity ({identity_columns}), which is all that blue sends of an updated or deleted row: add a primary key (or a unique index) over ({identity_columns}) on green, or run ALTER TABLE {blue_table} REPLICA IDENTITY FULL on blue"
    )]
    NoKey {
        blue_table: String,
        target: String,
        identity_columns: String,
    },
    #[error(
        "primary key column {column} of green table {target} is not a replica identity column of blue table {blue_table}: deletes from blue could not be matched; make the keys agree or set REPLICA IDENTITY FULL on blue"
    )]
    KeyNotInIdentity {
        blue_table: String,
        target: String,
        column: String,
    },
    #[error("[conflicts]: {message}")]
    Conflicts { message: String },
}

/// A blue table as a mapping needs it, from a Relation message or from blue's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub name: QualifiedName,
    pub columns: Vec<SourceTableColumn>,
    pub replica_identity: ReplicaIdentity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTableColumn {
    pub name: String,
    /// The column's type as green spells it (`text` when green lacks blue's type).
    pub sql_type: String,
    /// The column's type as blue spells it.
    pub blue_type: String,
    /// Part of the replica identity.
    pub is_key: bool,
}

impl SourceTable {
    /// From a Relation message, with each column's type spelled for green and for blue.
    pub fn from_relation(
        relation: &Relation,
        types: Vec<String>,
        blue_types: Vec<String>,
    ) -> SourceTable {
        SourceTable {
            name: QualifiedName::new(&relation.namespace, &relation.name),
            columns: relation
                .columns
                .iter()
                .zip(types.into_iter().zip(blue_types))
                .map(|(c, (sql_type, blue_type))| SourceTableColumn {
                    name: c.name.clone(),
                    sql_type,
                    blue_type,
                    is_key: c.is_key,
                })
                .collect(),
            replica_identity: relation.replica_identity,
        }
    }
}
