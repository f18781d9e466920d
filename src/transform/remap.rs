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
    /// Blue enforces a validated, not deferrable foreign key from the reader's column to the
    /// read table's key: a key blue inserted (it had no such row before) cannot be what an
    /// earlier reader row holds, so inserted keys re-derive nothing (see [`ForeignKey`]).
    pub inserted_keys_unread: bool,
}

/// A validated, not deferrable single-column foreign key on blue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    pub table: super::QualifiedName,
    pub column: String,
    pub references: super::QualifiedName,
    pub key: String,
}

impl Remap {
    /// Whether one of `fks` guards this remap of `reader` on `read` (see
    /// [`Remap::inserted_keys_unread`]).
    pub fn guarded_by(&self, reader: &TableMap, read: &TableMap, fks: &[ForeignKey]) -> bool {
        let Some(pk) = read.plain_key else {
            return false;
        };
        fks.iter().any(|fk| {
            fk.table == reader.source
                && fk.column == reader.source_columns[self.column].name
                && fk.references == read.source
                && fk.key == read.source_columns[pk].name
        })
    }
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
    let Some(via) = stored(reader, lookup.column) else {
        return once(format!(
            "green does not store src.{} as it is (copy it into a column of {})",
            reader.source_columns[lookup.column].name, reader.label
        ));
    };
    let inputs = match stored_inputs(reader, &derived) {
        Ok(inputs) => inputs,
        Err(why) => return once(why),
    };
    Some(Ok(Remap {
        read: read.label.clone(),
        via,
        column: lookup.column,
        derived,
        inputs,
        inserted_keys_unread: false,
    }))
}

/// The target columns of `map` whose expressions read another table (`remap --table`).
pub fn derived_columns(map: &TableMap) -> Vec<usize> {
    (0..map.columns.len())
        .filter(|&i| !super::expr::relations(&map.columns[i].expr).is_empty())
        .collect()
}

/// Each source column `derived` reads, with the target column storing it verbatim; `Err`
/// names the first one green does not store.
pub fn stored_inputs(map: &TableMap, derived: &[usize]) -> Result<Vec<(usize, usize)>, String> {
    let mut inputs = Vec::new();
    for &d in derived {
        for &i in &map.columns[d].inputs {
            match stored(map, i) {
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

/// The target column of `map` that stores source column `source` as it is, of its type.
fn stored(map: &TableMap, source: usize) -> Option<usize> {
    let names: Vec<&str> = map.source_columns.iter().map(|c| c.name.as_str()).collect();
    (0..map.columns.len()).find(|&t| {
        map.columns[t].copied_from(&names) == Some(source)
            && map.columns[t].sql_type == map.source_columns[source].sql_type
    })
}

/// Whether `expr` reads the table `label` (after FROM or JOIN).
fn reads(expr: &str, label: &str) -> bool {
    super::expr::relations(expr)
        .iter()
        .any(|chain| chain_names(chain, label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ReplicaIdentity;
    use crate::transform::{
        ConflictPolicy, KeyedLookup, QualifiedName, SourceColumn, TargetColumn,
    };

    /// A keyed mapping of `name` whose target columns copy the source columns, except those in
    /// `exprs` (name, expression, inputs).
    fn map(name: &str, cols: &[&str], exprs: &[(&str, &str, Vec<usize>)]) -> TableMap {
        let mut columns: Vec<TargetColumn> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| TargetColumn {
                name: c.to_string(),
                sql_type: "bigint".into(),
                base_type: "bigint".into(),
                expr: format!("src.\"{c}\""),
                inputs: vec![i],
                collation: None,
                has_equality: true,
                not_null: false,
            })
            .collect();
        for (n, e, inputs) in exprs {
            columns.push(TargetColumn {
                name: n.to_string(),
                sql_type: "uuid".into(),
                base_type: "uuid".into(),
                expr: e.to_string(),
                inputs: inputs.clone(),
                collation: None,
                has_equality: true,
                not_null: false,
            });
        }
        let reads: Vec<Vec<String>> = exprs
            .iter()
            .flat_map(|(_, e, _)| crate::transform::expr::relations(e))
            .collect();
        let names: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let keyed_lookups = reads
            .iter()
            .filter_map(|r| {
                let e = exprs
                    .iter()
                    .find(|(_, e, _)| crate::transform::expr::relations(e).contains(r))?;
                let (key, column) = crate::transform::expr::keyed_lookup(e.1, r, &names)?;
                Some(KeyedLookup {
                    relation: r.clone(),
                    key,
                    column,
                })
            })
            .collect();
        TableMap {
            source: QualifiedName::new("public", name),
            target: QualifiedName::new("public", name),
            source_columns: cols
                .iter()
                .map(|c| SourceColumn {
                    name: c.to_string(),
                    sql_type: "bigint".into(),
                    blue_type: "bigint".into(),
                })
                .collect(),
            columns,
            key: vec![0],
            row_key: vec![0],
            awaits_identity: false,
            partitioned: false,
            replica_identity: ReplicaIdentity::Default,
            label: format!("public.{name}"),
            filter: None,
            reads,
            origin: None,
            conflicts: ConflictPolicy::Off,
            keyed_lookups,
            plain_key: Some(0),
            insert_new_keys: None,
            copy_new_keys: None,
        }
    }

    const TENANT: &str = "(SELECT u.tenant_id FROM users u WHERE u.id = src.owner_id)";

    #[test]
    fn a_keyed_lookup_through_a_stored_column_is_re_derived() {
        let users = map("users", &["id"], &[]);
        let vms = map(
            "vms",
            &["id", "owner_id"],
            &[("tenant_id", TENANT, vec![1])],
        );
        let planned = plan(&vms, &users).unwrap().unwrap();
        assert_eq!(
            planned,
            Remap {
                read: "public.users".into(),
                via: 1,
                column: 1,
                derived: vec![2],
                inputs: vec![(1, 1)],
                inserted_keys_unread: false,
            }
        );
        assert_eq!(plan(&users, &vms), None, "users reads nothing");
    }

    #[test]
    fn other_dependencies_are_evaluated_once_with_the_reason() {
        let users = map("users", &["id"], &[]);
        let why = |vms: &TableMap| plan(vms, &users).unwrap().unwrap_err().why;
        // The owner is not stored in green.
        let mut vms = map(
            "vms",
            &["id", "owner_id"],
            &[("tenant_id", TENANT, vec![1])],
        );
        vms.columns.remove(1);
        vms.columns[1].inputs = vec![1];
        assert!(
            why(&vms).contains("does not store src.owner_id"),
            "{}",
            why(&vms)
        );
        // Read whole, not by key.
        let whole = map(
            "vms",
            &["id", "owner_id"],
            &[("n", "(SELECT count(*) FROM users)", vec![])],
        );
        assert!(
            why(&whole).contains("other than by its key"),
            "{}",
            why(&whole)
        );
        // A filter reading the table.
        let mut filtered = map(
            "vms",
            &["id", "owner_id"],
            &[("tenant_id", TENANT, vec![1])],
        );
        filtered.filter = Some(crate::transform::Filter {
            expr: "EXISTS (SELECT 1 FROM users u WHERE u.id = src.owner_id)".into(),
            inputs: vec![1],
        });
        assert!(
            why(&filtered).contains("the filter reads"),
            "{}",
            why(&filtered)
        );
        // A key of another type.
        let mut typed = map(
            "vms",
            &["id", "owner_id"],
            &[("tenant_id", TENANT, vec![1])],
        );
        typed.source_columns[1].sql_type = "text".into();
        assert!(why(&typed).contains("different types"), "{}", why(&typed));
        // A looked-up table without a plain key.
        let mut composite = users.clone();
        composite.plain_key = None;
        let vms = map(
            "vms",
            &["id", "owner_id"],
            &[("tenant_id", TENANT, vec![1])],
        );
        assert!(plan(&vms, &composite).unwrap().is_err());
        // A self-lookup is not a remap.
        assert_eq!(plan(&vms, &vms), None);
    }
}
