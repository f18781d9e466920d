//! The conflict record in green: `shadowsync.conflicts`, one row per disagreement between a
//! change from blue and green's row, written in the same transaction as the batch that met it;
//! and the `conflicts` command that lists and replays them.
//!
//! Invariants: a row is recorded only if its batch commits; rows hold values (incoming and
//! existing rows, as jsonb) for the operator, and nothing here logs them; a replay applies the
//! recorded incoming row (blue's version) and marks the record resolved in one transaction.

use std::fmt::Write as _;

use tokio_postgres::{Client, Transaction};

use crate::config::Config;
use crate::failure::DbFailure;
use crate::transform::{QualifiedName, catalog, quote_ident};

/// One conflict met by a write, for metrics and logs (the values stay in green).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Target table label.
    pub table: String,
    pub kind: String,
    pub resolution: String,
    /// The key as jsonb text.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConflictsError {
    #[error("cannot connect to green: {0}")]
    Connect(DbFailure),
    #[error("green: {context}: {failure}")]
    Green { context: String, failure: DbFailure },
    #[error(
        "there is no conflict with id {id} in shadowsync.conflicts; list them with `shadowsync conflicts --config F`"
    )]
    NoSuchConflict { id: i64 },
    #[error(
        "conflict {id}: target table {table} no longer exists on green (or no longer has the key the record names); nothing was replayed"
    )]
    NoTarget { id: i64, table: String },
    #[error("--since {0:?}: expected a duration such as 30m, 2h or 1d, or a timestamp")]
    Since(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn green_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ConflictsError {
    let context = context.into();
    move |e| ConflictsError::Green {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// Filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// A duration back from now (`30m`, `2h`, `1d`) or a timestamp PostgreSQL understands.
    pub since: Option<String>,
    /// Target or source table (`schema.table`).
    pub table: Option<String>,
    /// Most rows shown, newest first.
    pub limit: i64,
}

/// `--since` as an interval (`30m`) or a timestamp: the SQL expression and its parameter.
fn since_clause(since: &str) -> Result<(&'static str, String), ConflictsError> {
    let s = since.trim();
    let unit = s.chars().last().unwrap_or(' ');
    let digits = &s[..s.len().saturating_sub(1)];
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        let word = match unit {
            's' => "seconds",
            'm' => "minutes",
            'h' => "hours",
            'd' => "days",
            _ => return Err(ConflictsError::Since(since.into())),
        };
        return Ok(("now() - $1::text::interval", format!("{digits} {word}")));
    }
    if s.is_empty() {
        return Err(ConflictsError::Since(since.into()));
    }
    Ok(("$1::text::timestamptz", s.to_string()))
}

/// Recorded conflicts as a readable table (newest last).
pub async fn list(client: &Client, opts: &ListOptions) -> Result<String, ConflictsError> {
    let (since_expr, since) = match &opts.since {
        Some(s) => {
            let (e, v) = since_clause(s)?;
            (e, Some(v))
        }
        // A NULL parameter casts to NULL: the condition below is then true.
        None => ("$1::text::timestamptz", None),
    };
    let sql = format!(
        "SELECT * FROM (
           SELECT id, to_char(detected_at, 'YYYY-MM-DD HH24:MI:SS') AS at, target_table, source_table,
                  kind, resolution, key::text AS key, commit_lsn::text AS lsn,
                  coalesce(to_char(resolved_at, 'YYYY-MM-DD HH24:MI:SS'), '') AS resolved
             FROM shadowsync.conflicts
            WHERE ($1::text IS NULL OR detected_at >= {since_expr})
              AND ($2::text IS NULL OR target_table = $2 OR source_table = $2)
            ORDER BY id DESC LIMIT $3) AS newest
         ORDER BY id"
    );
    let table = opts.table.as_deref().map(qualified);
    let rows = client
        .query(&sql, &[&since, &table, &opts.limit])
        .await
        .map_err(green_err("listing shadowsync.conflicts"))?;
    let header = [
        "id",
        "detected (UTC)",
        "target",
        "source",
        "kind",
        "resolution",
        "key",
        "blue commit LSN",
        "resolved",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let mut v = vec![id.to_string()];
            v.extend((1..9).map(|i| r.get::<_, String>(i)));
            v
        })
        .collect();
    Ok(render(&header, &cells))
}

/// A plain text table, columns padded to their widest cell.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    line(
        &mut out,
        &mut widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    let _ = writeln!(out, "({} conflicts)", rows.len());
    out
}

/// What a replay did to one conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub id: i64,
    /// `upsert`, `delete`, `already resolved`, or nothing to replay for a keyless row.
    pub action: &'static str,
}

/// Re-applies the incoming row of each conflict (blue's version wins) and marks it resolved,
/// all in one transaction: any failure leaves green and the records as they were.
pub async fn replay(client: &mut Client, ids: &[i64]) -> Result<Vec<Replayed>, ConflictsError> {
    // As the apply session: green-side triggers (e.g. one stamping a commit-time column) do not
    // fire for blue's version. Not allowed for this user: triggers fire, which is also sound.
    crate::session_role::set_replica(client)
        .await
        .map_err(green_err("setting session_replication_role"))?;
    let tx = client
        .transaction()
        .await
        .map_err(green_err("starting the replay transaction"))?;
    let mut done = Vec::with_capacity(ids.len());
    for &id in ids {
        let action = replay_one(&tx, id).await?;
        done.push(Replayed { id, action });
    }
    tx.commit()
        .await
        .map_err(green_err("committing the replay"))?;
    Ok(done)
}

/// Replays conflict `id` in `tx` and marks it resolved (unless it was already): what it did.
async fn replay_one(tx: &Transaction<'_>, id: i64) -> Result<&'static str, ConflictsError> {
    let row = tx
        .query_opt(
            "SELECT target_table, incoming IS NULL, resolved_at IS NOT NULL, key::text, coalesce(incoming::text, '{}')
                   FROM shadowsync.conflicts WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(green_err("reading shadowsync.conflicts"))?
        .ok_or(ConflictsError::NoSuchConflict { id })?;
    let (target, is_delete, resolved): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if resolved {
        return Ok("already resolved");
    }
    let (key, incoming): (String, String) = (row.get(3), row.get(4));
    let (name, table) = target_table(tx, id, &target).await?;
    let recorded = recorded_columns(tx, &key).await?;
    let Some(unique) = table.unique_keys.iter().find(|u| {
        u.columns.len() == recorded.len() && u.columns.iter().all(|c| recorded.contains(c))
    }) else {
        // A keyless table's record (its key is the whole old row): blue's change, the
        // only version there is, was applied when it was met.
        if table.primary_key.is_empty() {
            mark_resolved(tx, id).await?;
            return Ok("nothing to replay (keyless row; blue's change was applied)");
        }
        return Err(ConflictsError::NoTarget {
            id,
            table: target.clone(),
        });
    };
    let key_cols: Vec<String> = unique.columns.iter().map(|k| quote_ident(k)).collect();
    let context = format!("replaying conflict {id} on {target}");
    let action = if is_delete {
        replay_delete(tx, &name, &key_cols, &key, context).await?
    } else {
        replay_upsert(tx, &name, &table, &key_cols, &incoming, context).await?
    };
    mark_resolved(tx, id).await?;
    Ok(action)
}

/// `--table` as records name tables: `schema.table`, `public` without a schema (as rules and
/// the config resolve names), so `--table vms` lists public.vms's conflicts.
fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// The recorded target table (`schema.table`, `public` without a schema) as green has it now.
async fn target_table(
    tx: &Transaction<'_>,
    id: i64,
    target: &str,
) -> Result<(QualifiedName, catalog::GreenTable), ConflictsError> {
    let name = match target.split_once('.') {
        Some((s, n)) => QualifiedName::new(s, n),
        None => QualifiedName::new("public", target),
    };
    let table = catalog::green_table(tx.client(), &name)
        .await
        .map_err(green_err("reading the catalog"))?
        .ok_or_else(|| ConflictsError::NoTarget {
            id,
            table: target.to_string(),
        })?;
    Ok((name, table))
}

/// The columns of a record's key (jsonb text).
async fn recorded_columns(tx: &Transaction<'_>, key: &str) -> Result<Vec<String>, ConflictsError> {
    // The record's key names the columns the row was matched on: the primary key, or the
    // unique index the mapping used.
    let recorded: Vec<String> = tx
        .query("SELECT jsonb_object_keys($1::text::jsonb)", &[&key])
        .await
        .map_err(green_err("reading a conflict's key"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok(recorded)
}

/// Deletes green's row of the recorded `key` (blue deleted it): `"delete"`.
async fn replay_delete(
    tx: &Transaction<'_>,
    name: &QualifiedName,
    key_cols: &[String],
    key: &str,
    context: String,
) -> Result<&'static str, ConflictsError> {
    let quoted = name.quoted();
    let key_match = key_cols
        .iter()
        .map(|k| format!("t.{k} = r.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    tx.execute(
        &format!(
            "DELETE FROM {quoted} AS t USING jsonb_populate_record(NULL::{quoted}, $1::text::jsonb) AS r WHERE {key_match}"
        ),
        &[&key],
    )
    .await
    .map_err(green_err(context))?;
    Ok("delete")
}

/// Writes the recorded `incoming` row (blue's version) over green's, matched on `key_cols`:
/// `"upsert"`.
async fn replay_upsert(
    tx: &Transaction<'_>,
    name: &QualifiedName,
    table: &catalog::GreenTable,
    key_cols: &[String],
    incoming: &str,
    context: String,
) -> Result<&'static str, ConflictsError> {
    let quoted = name.quoted();
    // The columns the record carries (the mapping's written columns).
    let present: Vec<String> = tx
        .query("SELECT jsonb_object_keys($1::text::jsonb)", &[&incoming])
        .await
        .map_err(green_err(context.clone()))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|c| table.columns.iter().any(|g| &g.name == c))
        .collect();
    let cols: Vec<String> = present.iter().map(|c| quote_ident(c)).collect();
    let sets: Vec<String> = cols
        .iter()
        .filter(|c| !key_cols.contains(c))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let on_conflict = if sets.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    tx.execute(
        &format!(
            "INSERT INTO {quoted} AS t ({cols}) OVERRIDING SYSTEM VALUE SELECT {rcols} FROM jsonb_populate_record(NULL::{quoted}, $1::text::jsonb) AS r ON CONFLICT ({keys}) {on_conflict}",
            cols = cols.join(", "),
            rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
            keys = key_cols.join(", "),
        ),
        &[&incoming],
    )
    .await
    .map_err(green_err(context))?;
    Ok("upsert")
}

async fn mark_resolved(tx: &Transaction<'_>, id: i64) -> Result<(), ConflictsError> {
    tx.execute(
        "UPDATE shadowsync.conflicts SET resolved_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .map_err(green_err("marking a conflict resolved"))?;
    Ok(())
}

/// `shadowsync conflicts`: lists, or replays `ids` and lists them.
pub async fn command(
    config: &Config,
    opts: &ListOptions,
    ids: &[i64],
) -> Result<String, ConflictsError> {
    let dsn = config
        .green_dsn()
        .map_err(|e| ConflictsError::Config(e.to_string()))?;
    let (mut client, connection) = dsn
        .connect("shadowsync-conflicts")
        .await
        .map_err(|e| ConflictsError::Connect(DbFailure::from_pg(&e)))?;
    let conn = tokio::spawn(connection);
    crate::store::migrate(&client).await?;
    let mut out = String::new();
    if !ids.is_empty() {
        for r in replay(&mut client, ids).await? {
            let _ = writeln!(out, "conflict {}: {}", r.id, r.action);
        }
    }
    out.push_str(&list(&client, opts).await?);
    drop(client);
    let _ = conn.await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_table_without_schema_is_in_public() {
        assert_eq!(super::qualified("vms"), "public.vms");
        assert_eq!(super::qualified("ops.vms"), "ops.vms");
    }
}
