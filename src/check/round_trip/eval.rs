//! The SQL of the round trip: sampling blue's rows as text, the forward mapping evaluated by
//! green over them, the inverse mapping evaluated by blue over green's results, and the
//! per-column comparison with blue's originals, counted by blue.
//!
//! Rows travel as one text array per column (parameters, never SQL text), unnested `WITH
//! ORDINALITY` and cast to the source types under the source names in a lateral `src`, as the
//! apply statements build `src` (see `statement::src_relation`); the ordinality keeps each
//! result with its sampled row. The helper columns are named `"~c<i>"`, `"~o<i>"`, `"~n"` so
//! that they cannot capture a rule's bare column name.
//!
//! Invariants: every statement runs in a `READ ONLY` transaction that is always rolled back
//! (the server refuses any write, `nextval` included, so nothing is left behind); values are
//! held in memory for one table's sample only and never appear in a message; a failure that is
//! the rule's (any SQL error but a connection, resource or internal one) is narrowed to the
//! column or filter at fault and returned as [`EvalError::Rule`] with the server's message.

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::transform::rules::Rule;
use crate::transform::{QualifiedName, SourceColumn, TableMap, quote_ident};

/// One column's values over the sampled rows, as text (`None`: NULL).
pub(super) type Column = Vec<Option<String>>;

#[derive(Debug)]
pub(super) enum EvalError {
    /// The database failed (a lost connection, a restart): not the rules' fault.
    Db(tokio_postgres::Error),
    /// An expression or filter failed on sampled rows: where, and the server's message.
    Rule(Vec<String>),
}

impl From<tokio_postgres::Error> for EvalError {
    fn from(e: tokio_postgres::Error) -> Self {
        EvalError::Db(e)
    }
}

/// Whether a failed statement is the rule's (a syntax, type, data or read-only error) rather
/// than the database's.
fn rule_failure(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        !matches!(
            crate::failure::class_of(c),
            "08" | "53" | "57" | "58" | "XX"
        )
    })
}

/// The server's message, with any row value it quotes replaced (see `failure::DbFailure`):
/// these statements run on production rows.
fn redacted(e: &tokio_postgres::Error) -> String {
    crate::failure::DbFailure::from_pg(e).message
}

/// Runs `sql` with `params` in a read-only transaction, always rolled back.
async fn read_only(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    client.batch_execute("BEGIN READ ONLY").await?;
    let result = client.query(sql, params).await;
    let rollback = client.batch_execute("ROLLBACK").await;
    let rows = result?;
    rollback?;
    Ok(rows)
}

/// The sampled rows of blue's table: for each of `map`'s source columns, its values as text.
pub(super) struct Sample {
    pub rows: usize,
    pub columns: Vec<Column>,
}

/// A table is sampled through `TABLESAMPLE` when it holds more than this many times the rows
/// asked for (by `reltuples`): page sampling of a small table would return its few pages or none.
const LARGE: f64 = 100.0;
/// With `TABLESAMPLE`, the pages of about this many times the rows asked for are read.
const OVERSAMPLE: f64 = 10.0;

/// Up to `n` random rows of blue's table `map.source`, as the stream reads it (`ONLY` unless
/// partitioned, the publication's row filter applied), by `ORDER BY random() LIMIT n`. A table
/// more than [`LARGE`] times the sample is read through `TABLESAMPLE SYSTEM` first (random
/// pages, [`OVERSAMPLE`] times the sample's worth), so that it is never scanned whole; rows of a
/// page come together, which a sample of many pages tolerates. A table never analyzed
/// (`reltuples` unknown) is scanned once.
pub(super) async fn sample(
    blue: &Client,
    map: &TableMap,
    publication: &str,
    n: u32,
) -> Result<Sample, tokio_postgres::Error> {
    let source = &map.source;
    let row = blue
        .query_one(
            "SELECT c.relkind::text, c.reltuples::float8, current_setting('server_version_num')::int
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&source.quoted()],
        )
        .await?;
    let (kind, reltuples, version): (String, f64, i32) = (row.get(0), row.get(1), row.get(2));
    let filter = if version >= 150000 {
        row_filter(blue, source, publication).await?
    } else {
        None
    };
    let only = if kind == "p" { "" } else { "ONLY " };
    let n = f64::from(n);
    let percent = 100.0 * OVERSAMPLE * n / reltuples;
    let tablesample = if reltuples > LARGE * n {
        " TABLESAMPLE SYSTEM ($2::float8)"
    } else {
        ""
    };
    let select: Vec<String> = map
        .source_columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(&c.name)))
        .collect();
    let sql = format!(
        "SELECT {} FROM {only}{} AS t{tablesample} WHERE {} ORDER BY random() LIMIT $1::float8::int8",
        select.join(", "),
        source.quoted(),
        filter.map(|f| format!("({f})")).unwrap_or("true".into())
    );
    let rows = if tablesample.is_empty() {
        read_only(blue, &sql, &[&n]).await?
    } else {
        read_only(blue, &sql, &[&n, &percent]).await?
    };
    let columns = (0..map.source_columns.len())
        .map(|i| rows.iter().map(|r| r.get(i)).collect())
        .collect();
    Ok(Sample {
        rows: rows.len(),
        columns,
    })
}

/// The publication's row filter of `source` (rows outside it never reach green).
async fn row_filter(
    blue: &Client,
    source: &QualifiedName,
    publication: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(blue
        .query_opt(
            "SELECT rowfilter FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &source.schema, &source.name],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// `FROM unnest(...) WITH ORDINALITY AS u(...) CROSS JOIN LATERAL (...) AS src`: the rows of
/// `cols` (parameters `$1..`), then `extra` more text arrays (`u."~o<i>"`), and `u."~n"`.
fn from_src(cols: &[SourceColumn], extra: usize) -> String {
    let arrays = cols.len() + extra;
    let unnest: Vec<String> = (1..=arrays).map(|p| format!("${p}::text[]")).collect();
    let mut names: Vec<String> = (0..cols.len()).map(|i| format!("\"~c{i}\"")).collect();
    names.extend((0..extra).map(|i| format!("\"~o{i}\"")));
    names.push("\"~n\"".into());
    let src: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.\"~c{i}\"::{} AS {}", c.sql_type, quote_ident(&c.name)))
        .collect();
    format!(
        "FROM unnest({}) WITH ORDINALITY AS u({}) CROSS JOIN LATERAL (SELECT {}) AS src",
        unnest.join(", "),
        names.join(", "),
        src.join(", ")
    )
}

/// The value column `c` would store of `expr`: cast to the base type as the apply statements
/// write it, then to the column's own type (its modifier: numeric scale, timestamp precision, a
/// domain's checks) as the INSERT's assignment applies it. One difference: a value too long for
/// a `varchar(n)` is truncated here where the INSERT would fail (`check` warns of narrower
/// columns).
fn stored(c: &crate::transform::TargetColumn, expr: &str) -> String {
    let base = format!("CAST(({expr}) AS {})", c.base_type);
    if c.sql_type == c.base_type {
        base
    } else {
        format!("CAST({base} AS {})", c.sql_type)
    }
}

fn as_params(columns: &[Column]) -> Vec<&(dyn ToSql + Sync)> {
    columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect()
}

/// Green's rows from the sample: which sampled rows the forward filter lets into green, and
/// each of the forward mapping's target columns over them, as text.
pub(super) struct Forward {
    /// Index (into the sample) of each row in green.
    pub rows: Vec<usize>,
    /// Per target column of the forward mapping, its values over `rows`.
    pub columns: Vec<Column>,
}

/// The forward mapping evaluated by green over the sample, each value as green would store it
/// (see [`stored`]), the filter in `WHERE` as in the apply statements.
pub(super) async fn forward(
    green: &Client,
    map: &TableMap,
    rule: Option<&Rule>,
    sample: &Sample,
) -> Result<Forward, EvalError> {
    let exprs: Vec<(String, String)> = map
        .columns
        .iter()
        .map(|c| (c.name.clone(), format!("{}::text", stored(c, &c.expr))))
        .collect();
    let filter = map.filter.as_ref().map(|f| f.expr.as_str());
    let sql = |exprs: &[&str], filter: Option<&str>| {
        let mut select = vec!["u.\"~n\"".to_string()];
        select.extend(exprs.iter().map(|e| e.to_string()));
        format!(
            "SELECT {} {} WHERE {} ORDER BY u.\"~n\"",
            select.join(", "),
            from_src(&map.source_columns, 0),
            filter.map(|f| format!("({f})")).unwrap_or("true".into())
        )
    };
    let all: Vec<&str> = exprs.iter().map(|(_, e)| e.as_str()).collect();
    let params = as_params(&sample.columns);
    match read_only(green, &sql(&all, filter), &params).await {
        Ok(rows) => Ok(Forward {
            rows: rows
                .iter()
                .map(|r| usize::try_from(r.get::<_, i64>(0) - 1).unwrap_or(0))
                .collect(),
            columns: (0..exprs.len())
                .map(|i| rows.iter().map(|r| r.get(i + 1)).collect())
                .collect(),
        }),
        Err(e) => Err(Narrowing {
            client: green,
            map,
            rule,
            direction: "forward",
            params: &params,
            exprs: &exprs,
            filter,
        }
        .failure(sql, e)
        .await),
    }
}

/// A failed statement of one direction, to be narrowed down: run again with each column alone,
/// then the filter alone.
struct Narrowing<'a> {
    client: &'a Client,
    map: &'a TableMap,
    rule: Option<&'a Rule>,
    direction: &'static str,
    params: &'a [&'a (dyn ToSql + Sync)],
    /// Each column's name and its part of the select list.
    exprs: &'a [(String, String)],
    filter: Option<&'a str>,
}

impl Narrowing<'_> {
    /// `e` (of the statement `sql` builds from all of `exprs`) as the rule's failures, narrowed
    /// to the columns and filter at fault; a failure of the database as it is.
    async fn failure(
        &self,
        sql: impl Fn(&[&str], Option<&str>) -> String,
        e: tokio_postgres::Error,
    ) -> EvalError {
        if !rule_failure(&e) {
            return EvalError::Db(e);
        }
        let mut tries: Vec<(&str, String)> = self
            .exprs
            .iter()
            .map(|(name, x)| (name.as_str(), sql(&[x], self.filter)))
            .collect();
        if let Some(f) = self.filter {
            tries.push(("", sql(&[], Some(f))));
        }
        let mut problems = Vec::new();
        for (column, text) in tries {
            let (map, rule, direction) = (self.map, self.rule, self.direction);
            match alone(
                self.client,
                &text,
                self.params,
                map,
                rule,
                column,
                direction,
            )
            .await
            {
                Ok(p) => problems.extend(p),
                Err(e) => return EvalError::Db(e),
            }
        }
        EvalError::Rule(whole_failed(problems, &e, self.map, self.direction))
    }
}

/// The failure of one column's expression (`column` empty: the filter), if it fails alone.
async fn alone(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    map: &TableMap,
    rule: Option<&Rule>,
    column: &str,
    direction: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    match read_only(client, sql, params).await {
        Ok(_) => Ok(None),
        Err(e) if rule_failure(&e) => {
            let origin = rule
                .and_then(|r| match column {
                    "" => r.filter.as_ref().map(|f| f.origin.to_string()),
                    c => r.columns.get(c).map(|l| l.origin.to_string()),
                })
                .or_else(|| rule.map(|r| r.origin.to_string()))
                .unwrap_or_else(|| "<identity>".into());
            let what = match column {
                "" => "filter".to_string(),
                c => format!("column {c}"),
            };
            Ok(Some(format!(
                "{origin}: {direction} {what} of {} -> {} fails on rows sampled from blue: {}",
                map.source,
                map.target,
                redacted(&e)
            )))
        }
        Err(e) => Err(e),
    }
}

/// The narrowed failures, or the whole statement's when no part fails alone.
fn whole_failed(
    problems: Vec<String>,
    e: &tokio_postgres::Error,
    map: &TableMap,
    direction: &str,
) -> Vec<String> {
    if !problems.is_empty() {
        return problems;
    }
    vec![format!(
        "the {direction} mapping {} -> {} fails on rows sampled from blue: {}",
        map.source,
        map.target,
        redacted(e)
    )]
}

/// What blue counts of the inverse over green's rows.
pub(super) struct Compared {
    /// Rows the inverse filter keeps (the others would not exist on blue).
    pub kept: u64,
    /// Per compared column (see [`inverse`]), the kept rows whose value changed.
    pub changed: Vec<u64>,
}

/// One blue column compared: the inverse's target column `target` (an index into
/// `inverse.columns`) against the sampled originals `original`.
pub(super) struct Comparison<'a> {
    pub target: usize,
    pub original: &'a Column,
    /// Blue has a default equality for the column's type; else the text forms are compared.
    pub equality: bool,
}

/// The inverse mapping evaluated by blue over green's rows (`green`: one column per source
/// column of `inverse`, over the rows in green), each compared column counted where its value
/// is distinct from blue's original (`IS NOT DISTINCT FROM`, both in blue's type).
pub(super) async fn inverse(
    blue: &Client,
    inverse: &TableMap,
    rule: Option<&Rule>,
    green: &[Column],
    compared: &[Comparison<'_>],
) -> Result<Compared, EvalError> {
    let exprs: Vec<(String, String)> = compared
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let t = &inverse.columns[c.target];
            let text = if c.equality { "" } else { "::text" };
            let e = format!(
                "count(*) FILTER (WHERE NOT (CAST(u.\"~o{i}\" AS {}){text} IS NOT DISTINCT FROM {}{text}))",
                t.sql_type,
                stored(t, &t.expr)
            );
            (t.name.clone(), e)
        })
        .collect();
    let filter = inverse.filter.as_ref().map(|f| f.expr.as_str());
    let sql = |exprs: &[&str], filter: Option<&str>| {
        let mut select = vec!["count(*)".to_string()];
        select.extend(exprs.iter().map(|e| e.to_string()));
        format!(
            "SELECT {} {} WHERE {}",
            select.join(", "),
            from_src(&inverse.source_columns, compared.len()),
            filter.map(|f| format!("({f})")).unwrap_or("true".into())
        )
    };
    let mut arrays: Vec<Column> = green.to_vec();
    arrays.extend(compared.iter().map(|c| c.original.clone()));
    let params = as_params(&arrays);
    let all: Vec<&str> = exprs.iter().map(|(_, e)| e.as_str()).collect();
    match read_only(blue, &sql(&all, filter), &params).await {
        Ok(rows) => {
            let row = &rows[0];
            let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
            Ok(Compared {
                kept: count(0),
                changed: (0..exprs.len()).map(|i| count(i + 1)).collect(),
            })
        }
        Err(e) => Err(Narrowing {
            client: blue,
            map: inverse,
            rule,
            direction: "inverse",
            params: &params,
            exprs: &exprs,
            filter,
        }
        .failure(sql, e)
        .await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::QualifiedName;

    #[test]
    fn src_is_built_from_numbered_text_arrays_with_helper_names_rules_cannot_capture() {
        let map = crate::statement::fixture(
            QualifiedName::new("public", "t"),
            &[("id", "bigint"), ("na\"me", "text")],
        );
        let sql = from_src(&map.source_columns, 2);
        assert_eq!(
            sql,
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(\"~c0\", \"~c1\", \"~o0\", \"~o1\", \"~n\") CROSS JOIN LATERAL (SELECT u.\"~c0\"::bigint AS \"id\", u.\"~c1\"::text AS \"na\"\"me\") AS src"
        );
    }

    #[test]
    fn stored_values_take_the_column_modifier_after_the_base_type() {
        let mut map =
            crate::statement::fixture(QualifiedName::new("public", "t"), &[("p", "numeric")]);
        let c = &mut map.columns[0];
        assert_eq!(stored(c, "src.p"), "CAST((src.p) AS numeric)");
        c.sql_type = "numeric(10,2)".into();
        assert_eq!(
            stored(c, "src.p"),
            "CAST(CAST((src.p) AS numeric) AS numeric(10,2))"
        );
    }
}
