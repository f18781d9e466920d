//! The cutover's fence on blue: every published table refuses writes, reads go on.
//!
//! Mechanism: one statement-level trigger per table (`BEFORE INSERT OR UPDATE OR DELETE OR
//! TRUNCATE ... FOR EACH STATEMENT`) calling a function that raises `read_only_sql_transaction`
//! (SQLSTATE 25006) with a message saying the table is being migrated, enabled `ALWAYS` so that a
//! session cannot skip it with `SET session_replication_role = replica`. Why a trigger:
//! - it stops sessions already connected and statements yet to come, unlike revoking privileges
//!   (checked when a statement starts, and owners and superusers keep theirs) or
//!   `default_transaction_read_only` (a session can `SET` it back);
//! - `CREATE TRIGGER` takes a SHARE ROW EXCLUSIVE lock, which waits for every transaction that
//!   wrote the table to end: those commit before the fence (and are in the stream before its
//!   LSN) or fail; no write can slip in between the fence and its LSN;
//! - it blocks no reader, and it is a catalog change undone by one `DROP`.
//!
//! Invariants: the fence is raised one table per blue transaction, each under what is left of
//! one `lock_timeout` (a long-running writer makes the fence fail, not the application wait),
//! never holding one table's lock while waiting for another's (no deadlock with writers); its
//! LSN is after the last table's commit, and no write to a fenced table commits after it. A
//! fence that fails part way is removed. It is recorded in blue's catalog (the function's
//! schema `shadowsync_fence`), so `remove` finds and drops it from any process, including
//! after the one that raised it was killed.
//!
//! One exception, for a rollback stream: a fence raised with allowed origins (the cutover's
//! `[reverse]`) lets through the writes of a session whose `shadowsync.origin` names one of them
//! (the reverse stream's apply session, see `origin`), so the rollback stream can write into
//! blue while the application is kept out. No other session sets that variable.

use std::time::Duration;

use tokio_postgres::Client;

use crate::failure::DbFailure;
use crate::lsn::Lsn;
use crate::transform::QualifiedName;

/// Schema on blue holding the fence's function (and nothing else).
pub const SCHEMA: &str = "shadowsync_fence";
/// Name of the fence trigger on each table.
pub const TRIGGER: &str = "shadowsync_fence";

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("blue, {context}: {failure}")]
    Blue {
        context: &'static str,
        failure: DbFailure,
    },
    #[error("blue user {user} cannot fence the published tables: {missing}. Nothing was fenced")]
    Privileges { user: String, missing: String },
    #[error(
        "the fence could not lock {table} within what was left of --fence-timeout ({timeout_ms} ms; a long transaction writes it): {failure}. Nothing was fenced and blue's writers go on; run the cutover again once it ends, or raise --fence-timeout"
    )]
    LockTimeout {
        table: String,
        timeout_ms: u64,
        failure: DbFailure,
    },
}

fn blue_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> FenceError {
    move |e| FenceError::Blue {
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// What a raised fence is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fence {
    /// Blue's WAL insert position after the fence committed: every write to the fenced
    /// tables committed before it; none can commit after it.
    pub lsn: Lsn,
    /// Time to acquire the tables' locks and commit, in seconds.
    pub acquire_seconds: f64,
    pub tables: Vec<String>,
}

/// What the blue user lacks to raise the fence, in words naming each GRANT or ownership; empty
/// when nothing is missing. Writes nothing.
pub async fn missing_privileges(
    blue: &Client,
    tables: &[QualifiedName],
) -> Result<Vec<String>, FenceError> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let rows = blue
        .query(
            "SELECT c.oid::regclass::text,
                    pg_has_role(current_user, c.relowner, 'USAGE'),
                    c.relowner::regrole::text, current_user::text, current_database()::text
               FROM unnest($1::text[]) AS t(name)
               JOIN pg_class c ON c.oid = t.name::regclass
              ORDER BY 1",
            &[&names],
        )
        .await
        .map_err(blue_err("reading the published tables' owners"))?;
    let mut missing: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .map(|r| {
            let (table, owner, user): (String, String, String) = (r.get(0), r.get(2), r.get(3));
            format!("owner rights on {table}, which the fence's ALTER TABLE ... ENABLE ALWAYS TRIGGER needs (GRANT {owner} TO {user}; or connect as {owner})")
        })
        .collect();
    let schema_ok: bool = blue
        .query_one(
            "SELECT to_regnamespace($1) IS NOT NULL
                    OR has_database_privilege(current_database(), 'CREATE')",
            &[&SCHEMA],
        )
        .await
        .map_err(blue_err("reading the user's database privileges"))?
        .get(0);
    if !schema_ok {
        let user_db = blue
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .map_err(blue_err("reading the user's name"))?;
        let (user, db): (String, String) = (user_db.get(0), user_db.get(1));
        missing.push(format!(
            "CREATE on the database, for the fence's schema {SCHEMA} (GRANT CREATE ON DATABASE \"{db}\" TO \"{user}\"; or create the schema beforehand: CREATE SCHEMA {SCHEMA} AUTHORIZATION \"{user}\")"
        ));
    }
    Ok(missing)
}

/// The fence's function and schema (no table lock).
fn function_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         CREATE OR REPLACE FUNCTION {SCHEMA}.refuse() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           -- The trigger's arguments: the origins let through (a rollback stream's apply).
           IF current_setting('{}', true) = ANY (TG_ARGV) THEN
             RETURN NULL;
           END IF;
           RAISE EXCEPTION 'table %.% is being migrated by shadowsync: writes are fenced on blue for the cutover; write to the new database, or ask the operator to run shadowsync cutover --abort', TG_TABLE_SCHEMA, TG_TABLE_NAME
             USING ERRCODE = 'read_only_sql_transaction';
         END $f$;
         COMMENT ON SCHEMA {SCHEMA} IS 'shadowsync: the cutover fence; removed by shadowsync cutover --abort, or by hand with DROP SCHEMA {SCHEMA} CASCADE';",
        crate::origin::SESSION_VARIABLE
    )
}

/// The fence's trigger on one table.
fn trigger_sql(table: &QualifiedName, allow: &[String]) -> String {
    let table = table.quoted();
    // Trigger arguments are literals of the DDL: origin names (a prefix and a slot name of
    // lower-case letters, digits and underscores), quoted all the same.
    let args: Vec<String> = allow
        .iter()
        .map(|o| crate::transform::quote_literal(o))
        .collect();
    let args = args.join(", ");
    format!(
        "CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
           FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.refuse({args});
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {TRIGGER};"
    )
}

/// Raises the fence on `tables`, waiting at most `lock_timeout` in all for their locks; then
/// reads the fence's LSN. On failure nothing is fenced (what was raised is removed).
///
/// One transaction per table: the fence never holds one table's lock while it waits for
/// another's, so it cannot deadlock with a writer that holds one and wants the other (taking
/// them all in one transaction did, under the demo's writers, in any order). A writer that
/// wrote a table before its trigger committed ends before it (the trigger's lock waits for
/// it), or is refused when it then writes a table fenced earlier: so once the last table's
/// trigger committed, nothing more can commit on any of them, and the fence's LSN is after it.
pub async fn raise(
    blue: &Client,
    tables: &[QualifiedName],
    lock_timeout: Duration,
) -> Result<Fence, FenceError> {
    raise_allowing(blue, tables, lock_timeout, &[]).await
}

/// [`raise`], letting through the sessions marked with one of the origins `allow` (see the
/// module doc).
pub async fn raise_allowing(
    blue: &Client,
    tables: &[QualifiedName],
    lock_timeout: Duration,
    allow: &[String],
) -> Result<Fence, FenceError> {
    let started = std::time::Instant::now();
    blue.batch_execute(&format!("BEGIN; {}; COMMIT", function_sql()))
        .await
        .map_err(blue_err("creating the fence's function"))?;
    for table in tables {
        let left = lock_timeout.saturating_sub(started.elapsed());
        if let Err(e) = fence_table(blue, table, left.max(Duration::from_millis(1)), allow).await {
            // Best effort: a failure here leaves the fence for `cutover --abort`, and says so.
            if let Err(removal) = remove(blue).await {
                tracing::error!(error = %removal, "removing a partly raised fence failed: run shadowsync cutover --abort");
            }
            return Err(e);
        }
    }
    let acquire_seconds = started.elapsed().as_secs_f64();
    let lsn: Lsn = blue
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .map_err(blue_err("reading the fence's LSN"))?
        .get(0);
    tracing::info!(fence_lsn = %lsn, tables = tables.len(), acquire_seconds, "blue fenced: writes to the published tables are refused");
    Ok(Fence {
        lsn,
        acquire_seconds,
        tables: tables.iter().map(|t| t.to_string()).collect(),
    })
}

/// One table's trigger in its own transaction, under `lock_timeout`.
async fn fence_table(
    blue: &Client,
    table: &QualifiedName,
    lock_timeout: Duration,
    allow: &[String],
) -> Result<(), FenceError> {
    let timeout_ms = lock_timeout.as_millis() as u64;
    let sql = format!(
        "BEGIN READ WRITE; SET LOCAL lock_timeout = {timeout_ms}; SET LOCAL synchronous_commit = local;
         {}",
        trigger_sql(table, allow)
    );
    if let Err(e) = blue.batch_execute(&sql).await {
        let _ = blue.batch_execute("ROLLBACK").await;
        let failure = DbFailure::from_pg(&e);
        if failure.is(&crate::failure::SqlState::LOCK_NOT_AVAILABLE) {
            return Err(FenceError::LockTimeout {
                table: table.to_string(),
                timeout_ms,
                failure,
            });
        }
        return Err(FenceError::Blue {
            context: "raising the fence",
            failure,
        });
    }
    blue.batch_execute("COMMIT")
        .await
        .map_err(blue_err("committing the fence"))
}

/// Tables of blue that carry the fence now.
pub async fn fenced_tables(blue: &Client) -> Result<Vec<String>, FenceError> {
    Ok(blue
        .query(
            "SELECT t.tgrelid::regclass::text FROM pg_trigger t
              WHERE t.tgname = $1 AND NOT t.tgisinternal ORDER BY 1",
            &[&TRIGGER],
        )
        .await
        .map_err(blue_err("looking for the fence"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

/// Removes the fence wherever it is (blue's writes resume); returns the tables it was on.
/// Idempotent: without a fence it changes nothing.
pub async fn remove(blue: &Client) -> Result<Vec<String>, FenceError> {
    let tables = fenced_tables(blue).await?;
    let mut sql = String::from("BEGIN;\n");
    for t in &tables {
        // `t` is regclass output: already quoted as needed.
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {t};\n"));
    }
    sql.push_str(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;\nCOMMIT;"));
    if let Err(e) = blue.batch_execute(&sql).await {
        let _ = blue.batch_execute("ROLLBACK").await;
        return Err(blue_err("removing the fence")(e));
    }
    if !tables.is_empty() {
        tracing::info!(
            tables = tables.len(),
            "fence removed from blue: writes resume"
        );
    }
    Ok(tables)
}

/// Inside the caller's transaction on a database that carries a fence (the old blue, at a
/// rollback's cutover): drops it, so the application may write there once the transaction
/// commits. Returns the tables it was on (empty: there was none; nothing done).
pub async fn lift_in(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables: Vec<String> = tx
        .query(
            "SELECT t.tgrelid::regclass::text FROM pg_trigger t
              WHERE t.tgname = $1 AND NOT t.tgisinternal ORDER BY 1",
            &[&TRIGGER],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if tables.is_empty() {
        return Ok(tables);
    }
    let mut sql = String::new();
    for t in &tables {
        // `t` is regclass output: already quoted as needed.
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {t};\n"));
    }
    sql.push_str(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;"));
    tx.batch_execute(&sql).await?;
    Ok(tables)
}
