//! Green's catalog as the mapping needs it: a table's columns, their types and its primary key.
//!
//! Read once per relation (when blue first describes it in a session), never on the hot path.

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreenTable {
    pub name: QualifiedName,
    /// Writable columns (generated columns are left out: green computes them).
    pub columns: Vec<GreenColumn>,
    /// Primary key column names, in key order; empty without a primary key.
    pub primary_key: Vec<String>,
    /// Name of the primary key constraint (what a unique violation of it names).
    pub primary_key_name: Option<String>,
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
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, -1)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
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
        })
        .collect();
    let primary_key = client
        .query(
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = to_regclass($1) AND i.indisprimary
              ORDER BY k.ord",
            &[&quoted],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let primary_key_name = client
        .query_opt(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'",
            &[&quoted],
        )
        .await?
        .map(|r| r.get(0));
    let accepts_copy = client
        .query_one(
            "SELECT relkind IN ('r', 'p') AND NOT relhasrules AND NOT relrowsecurity
               FROM pg_class WHERE oid = to_regclass($1)",
            &[&quoted],
        )
        .await?
        .get(0);
    Ok(Some(GreenTable {
        name: name.clone(),
        columns,
        primary_key,
        primary_key_name,
        accepts_copy,
    }))
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
