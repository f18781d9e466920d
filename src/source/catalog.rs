//! Blue's side of the preflight: settings, the user's attribute and the publication, read
//! before anything is created.
//!
//! Every failure is a [`SourceError::Setup`] telling the operator what is wrong and what to run.
//! Invariant: nothing here writes to blue.

use tokio_postgres::Client;

use super::{SourceError, blue_err};
use crate::transform::QualifiedName;

/// Blue's settings, the user's REPLICATION attribute and the publication; returns the tables
/// in the publication. Writes nothing.
pub async fn check_blue(
    blue: &Client,
    publication: &str,
) -> Result<Vec<QualifiedName>, SourceError> {
    let wal_level: String = blue
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(blue_err("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup(format!(
            "blue's wal_level is '{wal_level}', logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; on blue and restart it"
        )));
    }
    let row = blue
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(blue_err("reading the user's attributes"))?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(SourceError::Setup(format!(
            "blue user {user} lacks the REPLICATION attribute: run ALTER ROLE \"{user}\" REPLICATION; on blue (or connect as a user that has it)"
        )));
    }
    let exists = blue
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(blue_err("looking up the publication"))?
        .is_some();
    if !exists {
        return Err(SourceError::Setup(format!(
            "publication {publication} does not exist on blue: create it with\n  CREATE PUBLICATION \"{publication}\" FOR TABLE <schema.table>, ...;\nor, to replicate every table,\n  CREATE PUBLICATION \"{publication}\" FOR ALL TABLES;"
        )));
    }
    let tables: Vec<QualifiedName> = blue
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(blue_err("listing the publication's tables"))?
        .into_iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(tables)
}

/// Blue's validated, not deferrable single-column foreign keys (see
/// `transform::remap::Remap::inserted_keys_unread`).
pub async fn foreign_keys(
    blue: &Client,
) -> Result<Vec<crate::transform::remap::ForeignKey>, SourceError> {
    let rows = blue
        .query(
            "SELECT n.nspname::text, r.relname::text, a.attname::text,
                    fn.nspname::text, fr.relname::text, fa.attname::text
               FROM pg_constraint c
               JOIN pg_class r ON r.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = r.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
               JOIN pg_class fr ON fr.oid = c.confrelid
               JOIN pg_namespace fn ON fn.oid = fr.relnamespace
               JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]
              WHERE c.contype = 'f' AND c.convalidated AND NOT c.condeferrable
                AND cardinality(c.conkey) = 1",
            &[],
        )
        .await
        .map_err(blue_err("reading blue's foreign keys"))?;
    Ok(rows
        .iter()
        .map(|r| crate::transform::remap::ForeignKey {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            column: r.get(2),
            references: QualifiedName::new(r.get::<_, String>(3), r.get::<_, String>(4)),
            key: r.get(5),
        })
        .collect())
}
