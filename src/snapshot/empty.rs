//! Which tables a copy takes along, and which green tables it empties first.
//!
//! Tables copied again (an interrupted copy) hold rows from the old snapshot, and fresh tables
//! with `--snapshot-truncate` may hold rows: those are emptied, in one `TRUNCATE`. PostgreSQL
//! refuses to truncate a table that a foreign key of another table references, unless that
//! table is truncated in the same statement. So for every green foreign key from a table
//! outside the emptied set into it:
//! - a table being copied anyway (empty so far) is added to the statement (it loses nothing);
//! - a table shadowsync copied earlier for this slot is copied again with the others, from the
//!   same snapshot (its rows are shadowsync's: copied, then streamed), with a warning naming it;
//! - any other table (green-only, or replicated but never copied by shadowsync) is refused,
//!   before anything is written, naming the table and the constraint, with the fix.
//!
//! Tables linked by lookups (a rule of one reads the other) are copied again together too.
//!
//! Invariants: shadowsync only ever empties tables it was copying itself, or that the operator
//! asked it to (`--snapshot-truncate`); a table that holds no rows is not emptied unless the
//! statement needs it; every refusal happens before the first write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::warn;

use super::{SnapshotError, green_err};
use crate::lsn::Lsn;
use crate::transform::{QualifiedName, TableMap};

/// What the copy does before its first row.
pub(super) struct Plan {
    /// Tables to copy.
    pub todo: Vec<Arc<TableMap>>,
    /// Green tables to empty, in one statement.
    pub empty: Vec<QualifiedName>,
}

/// A green foreign key from a table outside the emptied set into it.
struct Reference {
    /// The constraint as declared (on a partitioned table: the parent's, not its clones).
    constraint: String,
    /// The table that declares it.
    table: QualifiedName,
    /// The referencing relation and its partition ancestors: a map targeting any of them
    /// owns the rows.
    owners: Vec<QualifiedName>,
    referenced: String,
    definition: String,
}

/// Decides what `todo` (tables whose copy did not finish, and fresh ones) takes along and what
/// it empties; `copied_at` loses the tables copied again.
pub(super) async fn plan(
    green: &Client,
    maps: &[Arc<TableMap>],
    mut todo: Vec<Arc<TableMap>>,
    copied_at: &mut HashMap<String, Lsn>,
) -> Result<Plan, SnapshotError> {
    let mut holds_rows: HashMap<String, bool> = HashMap::new();
    // Tables being copied, empty, that the TRUNCATE must name for a foreign key's sake.
    let mut along: BTreeSet<String> = BTreeSet::new();
    loop {
        link_lookups(maps, &mut todo, copied_at);
        for m in &todo {
            if !holds_rows.contains_key(&m.label) {
                holds_rows.insert(m.label.clone(), has_rows(green, m).await?);
            }
        }
        let empty = emptied(&todo, &holds_rows, &along);
        let mut changed = false;
        let mut refused: Vec<Reference> = Vec::new();
        for r in references(green, &empty).await? {
            if let Some(m) = todo.iter().find(|m| r.owners.contains(&m.target)) {
                changed |= along.insert(m.label.clone());
            } else if let Some(m) = maps
                .iter()
                .find(|m| r.owners.contains(&m.target) && copied_at.contains_key(&source(m)))
            {
                copied_at.remove(&source(m));
                warn!(
                    table = %m.label,
                    constraint = %r.constraint,
                    references = %r.referenced,
                    "copying again a table whose green foreign key references a table being emptied for the copy \
                     (TRUNCATE must empty both), so that both come from one snapshot"
                );
                todo.push(m.clone());
                changed = true;
            } else {
                refused.push(r);
            }
        }
        if !refused.is_empty() {
            return Err(refusal(&empty, &refused));
        }
        if !changed {
            return Ok(Plan { todo, empty });
        }
    }
}

fn source(m: &TableMap) -> String {
    m.source.to_string()
}

/// The targets emptied: those holding rows, and those the statement must name.
fn emptied(
    todo: &[Arc<TableMap>],
    holds_rows: &HashMap<String, bool>,
    along: &BTreeSet<String>,
) -> Vec<QualifiedName> {
    let mut out: Vec<QualifiedName> = Vec::new();
    for m in todo {
        if (holds_rows[&m.label] || along.contains(&m.label)) && !out.contains(&m.target) {
            out.push(m.target.clone());
        }
    }
    out
}

/// Tables linked by lookups must come from one snapshot: a reader copied from one and the table
/// it reads from another would miss (or repeat) the lookups between the two. Tables shadowsync
/// copied earlier that are linked to a table being copied are copied again with it (never a
/// table it did not copy: that could be the operator's backfill).
fn link_lookups(
    maps: &[Arc<TableMap>],
    todo: &mut Vec<Arc<TableMap>>,
    copied_at: &mut HashMap<String, Lsn>,
) {
    loop {
        let linked: Vec<Arc<TableMap>> = maps
            .iter()
            .filter(|m| !todo.iter().any(|t| t.source == m.source))
            .filter(|m| copied_at.contains_key(&source(m)))
            .filter(|m| {
                todo.iter()
                    .any(|t| m.reads_table(&t.label) || t.reads_table(&m.label))
            })
            .cloned()
            .collect();
        if linked.is_empty() {
            return;
        }
        for m in linked {
            if copied_at.remove(&source(&m)).is_some() {
                warn!(table = %m.label, "copying again a table linked by lookups to one being copied, so that both come from one snapshot");
            }
            todo.push(m);
        }
    }
}

/// Whether `m`'s target holds rows.
pub(super) async fn has_rows(green: &Client, m: &TableMap) -> Result<bool, SnapshotError> {
    Ok(green
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {})", m.target.quoted()),
            &[],
        )
        .await
        .map_err(green_err(format!("looking into {}", m.label)))?
        .get(0))
}

/// Green foreign keys from relations outside `tables` (with their partitions, which TRUNCATE
/// empties too) into them.
async fn references(
    green: &Client,
    tables: &[QualifiedName],
) -> Result<Vec<Reference>, SnapshotError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let rows = green
        .query(REFERENCES_SQL, &[&names])
        .await
        .map_err(green_err(
            "listing the foreign keys into the tables to empty",
        ))?;
    Ok(rows
        .iter()
        .map(|r| {
            let table = QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2));
            let schemas: Vec<String> = r.get(6);
            let names: Vec<String> = r.get(7);
            let mut owners = vec![QualifiedName::new(
                r.get::<_, String>(4),
                r.get::<_, String>(5),
            )];
            owners.extend(
                schemas
                    .into_iter()
                    .zip(names)
                    .map(|(s, n)| QualifiedName::new(s, n)),
            );
            owners.push(table.clone());
            Reference {
                constraint: r.get(0),
                table,
                owners,
                referenced: r.get(3),
                definition: r.get(8),
            }
        })
        .collect())
}

/// Foreign keys into `$1` (quoted names) from outside, each named by its top-level
/// constraint (partitions carry clones of their parent's): constraint, declaring table
/// (schema, name), referenced table, referencing relation (schema, name), its partition
/// ancestors (schemas, names), definition.
const REFERENCES_SQL: &str = "
WITH e AS (SELECT to_regclass(n) AS oid FROM unnest($1::text[]) AS n),
     rels AS (SELECT oid FROM e UNION SELECT p.relid FROM e, pg_partition_tree(e.oid) p),
     fk AS (
       SELECT c.conrelid,
              (WITH RECURSIVE up(oid, parent) AS (
                   SELECT c.oid, c.conparentid
                   UNION ALL
                   SELECT p.oid, p.conparentid FROM up JOIN pg_constraint p ON p.oid = up.parent)
               SELECT up.oid FROM up WHERE up.parent = 0) AS top
         FROM pg_constraint c
        WHERE c.contype = 'f' AND c.confrelid IN (SELECT oid FROM rels)
          AND c.conrelid NOT IN (SELECT oid FROM rels))
SELECT DISTINCT t.conname::text, tn.nspname::text, tr.relname::text,
       (SELECT pn.nspname || '.' || pc.relname FROM pg_class pc
          JOIN pg_namespace pn ON pn.oid = pc.relnamespace WHERE pc.oid = t.confrelid),
       fn.nspname::text, fr.relname::text,
       ARRAY(SELECT an.nspname::text FROM pg_partition_ancestors(fk.conrelid) WITH ORDINALITY AS a(oid, i)
               JOIN pg_class ac ON ac.oid = a.oid JOIN pg_namespace an ON an.oid = ac.relnamespace
              ORDER BY a.i),
       ARRAY(SELECT ac.relname::text FROM pg_partition_ancestors(fk.conrelid) WITH ORDINALITY AS a(oid, i)
               JOIN pg_class ac ON ac.oid = a.oid ORDER BY a.i),
       pg_get_constraintdef(t.oid)
  FROM fk
  JOIN pg_constraint t ON t.oid = fk.top
  JOIN pg_class tr ON tr.oid = t.conrelid JOIN pg_namespace tn ON tn.oid = tr.relnamespace
  JOIN pg_class fr ON fr.oid = fk.conrelid JOIN pg_namespace fn ON fn.oid = fr.relnamespace
 ORDER BY 2, 3, 1";

/// The refusal: which tables reference the ones to empty, through which constraints, and the
/// way out. (Emptying the tables by hand is not offered: TRUNCATE would need every
/// referencing table, tables shadowsync finished copying included, whose rows would then be
/// lost for good.)
fn refusal(empty: &[QualifiedName], refused: &[Reference]) -> SnapshotError {
    // One line per declared constraint (a partitioned table's clones collapse into it).
    let mut by_constraint: BTreeMap<(String, String), &Reference> = BTreeMap::new();
    for r in refused {
        by_constraint
            .entry((r.table.to_string(), r.constraint.clone()))
            .or_insert(r);
    }
    let references: Vec<String> = by_constraint
        .values()
        .map(|r| {
            format!(
                "{} (constraint {} references {})",
                r.table, r.constraint, r.referenced
            )
        })
        .collect();
    let drop: Vec<String> = by_constraint
        .values()
        .map(|r| {
            format!(
                "ALTER TABLE {} DROP CONSTRAINT {};",
                r.table.quoted(),
                crate::transform::quote_ident(&r.constraint)
            )
        })
        .collect();
    let add: Vec<String> = by_constraint
        .values()
        .map(|r| {
            format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {};",
                r.table.quoted(),
                crate::transform::quote_ident(&r.constraint),
                r.definition
            )
        })
        .collect();
    SnapshotError::ForeignKeys {
        tables: empty
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        references: references.join(", "),
        drop: drop.join(" "),
        add: add.join(" "),
    }
}
