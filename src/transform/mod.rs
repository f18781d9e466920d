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
pub mod rules;

use std::sync::Arc;

use crate::decode::{Relation, ReplicaIdentity};
use catalog::GreenTable;
use lww::ConflictsConfig;
pub use lww::{ConflictPolicy, Lww};
use rules::{Origin, Rule};

/// Whether a relation chain as written in SQL (`name` or `schema.name`) names `label`.
fn chain_names(chain: &[String], label: &str) -> bool {
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
    /// columns computed from blue's replica identity (see [`choose_key`]); empty when none.
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

/// Key types whose equality on green is equality of blue's text (no collation, no case folding).
const CANONICAL_KEY_TYPES: [&str; 4] = ["smallint", "integer", "bigint", "uuid"];

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
    let identity: Vec<usize> = (0..source.columns.len())
        .filter(|&i| source.columns[i].is_key)
        .collect();
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
    let rule_error = |message: String| match rule {
        Some(r) => MapError::Rule {
            origin: r.origin.clone(),
            message,
        },
        None => MapError::Rule {
            origin: Origin {
                file: "<identity>".into(),
                line: 0,
            },
            message,
        },
    };
    let source_name = source.name.to_string();
    let target = green.name.clone();
    let names: Vec<String> = source.columns.iter().map(|c| c.name.clone()).collect();
    let source_columns: Vec<SourceColumn> = source
        .columns
        .iter()
        .map(|c| SourceColumn {
            name: c.name.clone(),
            sql_type: c.sql_type.clone(),
            blue_type: c.blue_type.clone(),
        })
        .collect();
    let listed = rule.map(|r| &r.columns);
    if let Some(listed) = listed {
        for (column, expr) in listed {
            if !green.columns.iter().any(|g| &g.name == column) {
                return Err(MapError::Rule {
                    origin: expr.origin.clone(),
                    message: format!(
                        "target column {column} does not exist on green table {target} (or is generated)"
                    ),
                });
            }
        }
    }
    let mut columns = Vec::new();
    for g in &green.columns {
        let (expr, inputs) = match listed.and_then(|l| l.get(&g.name)) {
            Some(e) => (e.value.clone(), expr::inputs(&e.value, &names)),
            None => match names.iter().position(|n| n == &g.name) {
                Some(i) => (format!("src.{}", quote_ident(&g.name)), vec![i]),
                // Neither mapped nor in the source: default on insert, untouched on update.
                None => continue,
            },
        };
        columns.push(TargetColumn {
            name: g.name.clone(),
            sql_type: g.sql_type.clone(),
            base_type: g.base_type.clone(),
            expr,
            inputs,
            collation: g.collation.clone(),
            has_equality: g.has_equality,
            not_null: g.not_null,
        });
    }
    if rule.is_none()
        && let Some(c) = source
            .columns
            .iter()
            .find(|c| !green.columns.iter().any(|g| g.name == c.name))
    {
        return Err(MapError::MissingColumn {
            blue_table: source_name,
            target: target.to_string(),
            column: c.name.clone(),
        });
    }
    // A rule that writes nothing of a table with columns is a mistake; a table without
    // columns (on both sides) is replicated as it is: rows of no columns.
    if columns.is_empty() && rule.is_some() && !source.columns.is_empty() {
        return Err(rule_error(format!(
            "no column of green table {target} is written: map at least one in [table.columns]"
        )));
    }
    let full = source.replica_identity == ReplicaIdentity::Full;
    let has_identity = full || source.columns.iter().any(|c| c.is_key);
    let key_columns = choose_key(source, &names, green, &columns);
    let mut key = Vec::with_capacity(key_columns.len());
    for k in &key_columns {
        let i = columns.iter().position(|c| &c.name == k).ok_or_else(|| {
            if rule.is_some() {
                rule_error(format!(
                    "primary key column {k} of green table {target} is neither mapped by the rule nor a column of {source_name}: add {k} = \"<expression>\" to [table.columns]"
                ))
            } else {
                MapError::MissingColumn {
                    blue_table: source_name.clone(),
                    target: target.to_string(),
                    column: k.clone(),
                }
            }
        })?;
        key.push(i);
    }
    // Keyless targets can only be matched on the full old row; with DEFAULT or INDEX identity
    // blue sends just the identity columns, and green has no unique index over them.
    if key.is_empty() && !full && has_identity {
        return Err(MapError::NoKey {
            blue_table: source_name,
            target: target.to_string(),
            identity_columns: source
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let mut row_key: Vec<usize> = key
        .iter()
        .flat_map(|&k| columns[k].inputs.clone())
        .collect();
    row_key.sort_unstable();
    row_key.dedup();
    // Without any identity, no old row arrives: nothing to check the key against (see
    // `TableMap::awaits_identity`).
    if !full && has_identity {
        // On DELETE pgoutput sends only the replica identity: the key must come from it.
        for &k in &key {
            if let Some(&c) = columns[k]
                .inputs
                .iter()
                .find(|&&c| !source.columns[c].is_key)
            {
                if rule.is_none() {
                    return Err(MapError::KeyNotInIdentity {
                        blue_table: source_name,
                        target: target.to_string(),
                        column: columns[k].name.clone(),
                    });
                }
                return Err(rule_error(format!(
                    "key column {} of green table {target} is computed from {}, which is not in the replica identity of blue table {source_name}: deletes could not be applied; map the key from identity columns or run ALTER TABLE {} REPLICA IDENTITY FULL on blue",
                    columns[k].name,
                    source.columns[c].name,
                    source.name.quoted()
                )));
            }
        }
    }
    // A key computed through a lookup would be recomputed against green's later state when a
    // delete arrives, and could miss the row.
    if let Some(&k) = key
        .iter()
        .find(|&&k| !expr::relations(&columns[k].expr).is_empty())
    {
        return Err(rule_error(format!(
            "primary key column {} of green table {target} is computed by reading another table: deletes could miss the row; compute the key from {source_name}'s own columns",
            columns[k].name
        )));
    }
    if !key.is_empty() && row_key.is_empty() {
        return Err(rule_error(format!(
            "the primary key of green table {target} is computed from no column of {source_name}: changes could not be matched to rows; compute it from the source's key columns"
        )));
    }
    if key.is_empty() && rule.is_some_and(|r| r.filter.is_some()) {
        return Err(rule_error(format!(
            "green table {target} has no primary key, so rows leaving the filter could not be found: add a primary key on green, or drop the filter"
        )));
    }
    let filter = rule.and_then(|r| r.filter.as_ref()).map(|f| Filter {
        inputs: expr::inputs(&f.value, &names),
        expr: f.value.clone(),
    });
    let mut reads: Vec<Vec<String>> = columns
        .iter()
        .flat_map(|c| expr::relations(&c.expr))
        .chain(filter.iter().flat_map(|f| expr::relations(&f.expr)))
        .collect();
    reads.sort();
    reads.dedup();
    let conflicts = lww::policy(conflicts, rule, green, &columns)?;
    // A relation is keyed only if every expression that reads it reads it keyed.
    let exprs: Vec<&str> = columns
        .iter()
        .map(|c| c.expr.as_str())
        .chain(filter.iter().map(|f| f.expr.as_str()))
        .collect();
    let mut keyed_lookups = Vec::new();
    for relation in &reads {
        let mut found = Vec::new();
        let mut all_keyed = true;
        for e in exprs
            .iter()
            .filter(|e| expr::relations(e).iter().any(|r| r == relation))
        {
            match expr::keyed_lookup(e, relation, &names) {
                Some((key, column)) => found.push(KeyedLookup {
                    relation: relation.clone(),
                    key,
                    column,
                }),
                None => all_keyed = false,
            }
        }
        if all_keyed {
            keyed_lookups.extend(found);
        }
    }
    // The source column a target column copies as is, if it does.
    let copied = |k: usize| columns[k].copied_from(&names);
    let plain_key = match key.as_slice() {
        [k] => copied(*k),
        _ => None,
    };
    let verbatim = |k: usize| {
        let ty = columns[k].base_type.as_str();
        copied(k).is_some_and(|i| ty == source_columns[i].sql_type)
            && CANONICAL_KEY_TYPES.contains(&ty)
    };
    let identity: Vec<usize> = (0..source.columns.len())
        .filter(|&i| source.columns[i].is_key)
        .collect();
    let key_names = green
        .unique_keys
        .iter()
        .find(|u| u.columns == key_columns)
        .map(|u| u.violation_names.clone());
    let insert_new_keys =
        (!key.is_empty() && !full && key.iter().all(|&k| verbatim(k)) && row_key == identity)
            .then_some(key_names)
            .flatten();
    let copy_new_keys = (insert_new_keys.is_some() && filter.is_none() && green.accepts_copy)
        .then(|| {
            (0..columns.len())
                .map(|k| copied(k).filter(|&i| columns[k].base_type == source_columns[i].sql_type))
                .collect::<Option<Vec<usize>>>()
        })
        .flatten();
    let awaits_identity = !has_identity && !key.is_empty();
    Ok(Some(Arc::new(TableMap {
        awaits_identity,
        label: target.to_string(),
        source: source.name.clone(),
        target,
        source_columns,
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
