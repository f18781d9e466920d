//! Green's catalog as the mapping needs it: a table's columns, their types, collations and
//! equality, and the unique keys a mapping may match rows on.
//!
//! Read once per relation (when blue first describes it in a session), never on the hot path.
//! Invariant: every key listed here can serve as `ON CONFLICT (columns)`: a valid, immediate,
//! non-partial unique index on plain columns (INCLUDE columns are not key columns).

use tokio_postgres::Client;

use super::QualifiedName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreenColumn {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`: a spelling green parses back.
    pub sql_type: String,
    /// The type without its modifier (length, precision), and for a domain its base type, spelled
    /// so that green reads no default modifier into it (`bpchar`, `"bit"`). Written values are
    /// cast to this: an explicit cast to `varchar(3)` (or a domain over it) would silently
    /// truncate, while the INSERT's assignment cast to the column raises an error instead.
    pub base_type: String,
    /// `COLLATE "schema"."name"` of a collatable column (a nondeterministic one, `"C"` of a
    /// `name`, `"default"` of a text): values compared with the column's take it, so that the
    /// comparison is the column's own. A cast does not give it: text cast to `name` keeps the
    /// text's collation, and a record comparison of fields with two collations has none.
    pub collation: Option<String>,
    /// Whether green can compare the column's values with `=` (json, xml, point cannot): rows
    /// of keyless tables are matched by each column's own equality, or by text where there is
    /// none. Only probed on tables without a primary key (`true` elsewhere).
    pub has_equality: bool,
    /// Declared NOT NULL: equal values of it can be joined by `=` (hashable), not by
    /// `IS NOT DISTINCT FROM`.
    pub not_null: bool,
}

/// A unique index of green's table that rows may be matched on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    /// The index's name (what a unique violation of it names as its constraint).
    pub name: String,
    /// Key columns in index order (INCLUDE columns left out).
    pub columns: Vec<String>,
    pub primary: bool,
    /// The table's `REPLICA IDENTITY USING INDEX`.
    pub replica_identity: bool,
    /// Names a violation of this key may carry: the index and, on a partitioned table, each
    /// partition's index attached to it (a violation names the partition's).
    pub violation_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreenTable {
    pub name: QualifiedName,
    /// Writable columns (generated columns are left out: green computes them).
    pub columns: Vec<GreenColumn>,
    /// Primary key column names, in key order; empty without a primary key.
    pub primary_key: Vec<String>,
    /// Keys rows may be matched on: the primary key first, then the replica identity index,
    /// then other unique indexes by name.
    pub unique_keys: Vec<UniqueKey>,
    /// A partitioned table (rows live in its partitions).
    pub partitioned: bool,
    /// A plain or partitioned table without rewrite rules or row-level security: `COPY FROM`
    /// writes rows into it as an INSERT would (COPY ignores rules, and refuses tables with row
    /// security).
    pub accepts_copy: bool,
}

/// Reads a table's description from green; `None` when it does not exist.
pub async fn green_table(
    client: &Client,
    name: &QualifiedName,
) -> Result<Option<GreenTable>, tokio_postgres::Error> {
    let quoted = name.quoted();
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])
        .await?
        .get::<_, bool>(0);
    if !exists {
        return Ok(None);
    }
    let mut columns: Vec<GreenColumn> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, -1),
                    CASE WHEN a.attcollation <> 0
                         THEN format('COLLATE %I.%I', cn.nspname, co.collname) END,
                    a.attnotnull
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_collation co ON co.oid = a.attcollation
               LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&quoted],
        )
        .await?
        .into_iter()
        .map(|r| GreenColumn {
            name: r.get(0),
            sql_type: r.get(1),
            base_type: r.get(2),
            collation: r.get(3),
            has_equality: true,
            not_null: r.get(4),
        })
        .collect();
    let unique_keys: Vec<UniqueKey> = client
        .query(UNIQUE_KEYS_SQL, &[&quoted])
        .await?
        .into_iter()
        .map(|r| UniqueKey {
            name: r.get(0),
            primary: r.get(1),
            replica_identity: r.get(2),
            columns: r.get(3),
            violation_names: r.get(4),
        })
        .collect();
    let primary_key = unique_keys
        .iter()
        .find(|k| k.primary)
        .map(|k| k.columns.clone())
        .unwrap_or_default();
    let row = client
        .query_one(
            "SELECT relkind IN ('r', 'p') AND NOT relhasrules AND NOT relrowsecurity, relkind = 'p'
               FROM pg_class WHERE oid = to_regclass($1)",
            &[&quoted],
        )
        .await?;
    let (accepts_copy, partitioned) = (row.get(0), row.get(1));
    if primary_key.is_empty() {
        probe_equality(client, &mut columns).await?;
    }
    Ok(Some(GreenTable {
        name: name.clone(),
        columns,
        primary_key,
        unique_keys,
        partitioned,
        accepts_copy,
    }))
}

/// Unique keys of a table (`$1`, quoted name): name, primary, replica identity, key columns,
/// and the names a violation may carry (the index and its partitions' indexes).
const UNIQUE_KEYS_SQL: &str = "
SELECT ic.relname::text, i.indisprimary, i.indisreplident,
       ARRAY(SELECT a.attname::text
               FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE k.ord <= i.indnkeyatts
              ORDER BY k.ord),
       ARRAY[ic.relname::text] || ARRAY(SELECT pc.relname::text
                                          FROM pg_partition_tree(i.indexrelid) AS p
                                          JOIN pg_class pc ON pc.oid = p.relid
                                         WHERE p.level > 0 ORDER BY 1)
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indimmediate AND i.indisvalid
   AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT (0 = ANY (i.indkey))
 ORDER BY NOT i.indisprimary, NOT i.indisreplident, ic.relname";

/// Sets `has_equality` of each column: whether green has a default equality for its type, the
/// one `GROUP BY` and PostgreSQL's own apply worker use (a btree or hash operator class: `box`
/// has an `=` operator, comparing areas, but no such class), and for an array, for its element
/// type too (`array_eq` looks that up only when comparing). PostgreSQL decides, as it will for
/// the statements: one prepare per distinct type.
pub(crate) async fn probe_equality(
    client: &Client,
    columns: &mut [GreenColumn],
) -> Result<(), tokio_postgres::Error> {
    let mut known: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for c in columns.iter_mut() {
        if let Some(&eq) = known.get(&c.base_type) {
            c.has_equality = eq;
            continue;
        }
        let mut eq = true;
        let mut ty = c.base_type.as_str();
        loop {
            match client
                .prepare(&format!(
                    "SELECT 1 FROM (SELECT NULL::{ty} AS x) AS s GROUP BY s.x"
                ))
                .await
            {
                Ok(_) => {}
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) =>
                {
                    eq = false;
                    break;
                }
                Err(e) => return Err(e),
            }
            match ty.strip_suffix("[]") {
                Some(element) => ty = element,
                None => break,
            }
        }
        known.insert(c.base_type.clone(), eq);
        c.has_equality = eq;
    }
    Ok(())
}

/// Green's spelling of each source column type: builtin OIDs are the same on every server;
/// user types are named by pgoutput's Type messages (`user_types[i]`, quoted `schema.name`)
/// and fall back to `text` when green has no such type.
pub async fn resolve_types(
    client: &Client,
    oids: &[u32],
    user_types: &[Option<String>],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let oids: Vec<i64> = oids.iter().map(|&o| i64::from(o)).collect();
    let rows = client
        .query(
            "SELECT CASE WHEN o < 16384 THEN format_type(o::oid, -1)
                         ELSE coalesce(format_type(to_regtype(n), -1), 'text') END
               FROM unnest($1::int8[], $2::text[]) WITH ORDINALITY AS u(o, n, i)
              ORDER BY i",
            &[&oids, &user_types],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
