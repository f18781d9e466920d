//! SQL text of the set-based apply statements, and the text-array parameter they take.
//!
//! Every statement reads its rows from `unnest($1::text[], $2::text[], ...)`: one text array per
//! source column, one element per row. Green casts each value to the column's type, so any type
//! with a text input function works (arrays, enums, composites, ranges, domains, extensions).
//! The rows form the relation `src`; target columns are `CAST((expr) AS type)` over it. The one
//! exception is [`copy_new`]: new keys of tables copied column for column go by `COPY`.
//!
//! Invariants: every identifier is quoted; values only ever travel as parameters or COPY data,
//! never in SQL text.

use crate::transform::{TableMap, quote_ident};

pub mod conflict;
pub mod keyless;
pub mod params;
pub mod remap;

pub use params::{TextArray, WordArray, copy_row};

/// `(SELECT u.c0::type AS "name", ... FROM (SELECT unnest($n::text[]) AS c0, ...) AS u) AS src`
/// over the given source columns, numbering parameters from `first_param`. `unnest` in a
/// select list streams the arrays in lockstep; `FROM unnest(a, b, ...)` would first copy every
/// row into a buffer (measured: 5 to 10% of a statement).
///
/// A table without columns still has rows: its statements take one array of NULLs, which only
/// says how many (see `apply::arrays`).
pub fn src_relation(map: &TableMap, cols: &[usize], first_param: usize) -> String {
    if cols.is_empty() {
        return format!("(SELECT FROM (SELECT unnest(${first_param}::text[]) AS c0) AS u) AS src");
    }
    let mut select = Vec::with_capacity(cols.len());
    let mut unnests = Vec::with_capacity(cols.len());
    for (n, &c) in cols.iter().enumerate() {
        let col = &map.source_columns[c];
        select.push(format!(
            "u.c{n}::{} AS {}",
            col.sql_type,
            quote_ident(&col.name)
        ));
        unnests.push(format!("unnest(${}::text[]) AS c{n}", first_param + n));
    }
    format!(
        "(SELECT {} FROM (SELECT {}) AS u) AS src",
        select.join(", "),
        unnests.join(", ")
    )
}

/// Target columns computable from the given source columns.
pub fn computable(map: &TableMap, cols: &[usize]) -> Vec<usize> {
    (0..map.columns.len())
        .filter(|&i| map.columns[i].inputs.iter().all(|c| cols.contains(c)))
        .collect()
}

/// How a target expression is cast.
#[derive(Clone, Copy)]
pub(crate) enum Cast {
    /// Values written to green: cast to the type without its modifier, so that the INSERT or
    /// UPDATE applies `varchar(n)`, `char(n)`, `bit(n)`, ... with assignment semantics and
    /// rejects a value that does not fit (an explicit cast would silently truncate it).
    Write,
    /// Values compared with green's rows (keys, old images): cast to the exact column type, as
    /// the stored values were.
    Match,
}

pub(super) fn target_expr(map: &TableMap, i: usize, cast: Cast) -> String {
    let c = &map.columns[i];
    let ty = match cast {
        Cast::Write => &c.base_type,
        Cast::Match => &c.sql_type,
    };
    format!("CAST(({}) AS {})", c.expr, ty)
}

pub(crate) fn select_list(map: &TableMap, targets: &[usize], cast: Cast) -> String {
    targets
        .iter()
        .map(|&i| {
            format!(
                "{} AS {}",
                target_expr(map, i, cast),
                quote_ident(&map.columns[i].name)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn column_list(map: &TableMap, targets: &[usize]) -> String {
    targets
        .iter()
        .map(|&i| quote_ident(&map.columns[i].name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(a, b, ...)` of an INSERT; nothing for no column (a table without columns, or whose
/// columns all keep their defaults), which `INSERT INTO t (...)` cannot spell.
fn insert_columns(map: &TableMap, targets: &[usize]) -> String {
    if targets.is_empty() {
        String::new()
    } else {
        format!("({})", column_list(map, targets))
    }
}

pub(crate) fn key_match(map: &TableMap, left: &str, right: &str) -> String {
    map.key
        .iter()
        .map(|&k| {
            let name = quote_ident(&map.columns[k].name);
            format!("{left}.{name} = {right}.{name}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `col = EXCLUDED.col` for every non-key target column: an upsert's update list.
pub(crate) fn excluded_sets(map: &TableMap, targets: &[usize]) -> Vec<String> {
    targets
        .iter()
        .filter(|i| !map.key.contains(i))
        .map(|&i| {
            let n = quote_ident(&map.columns[i].name);
            format!("{n} = EXCLUDED.{n}")
        })
        .collect()
}

/// Insert full rows as new rows: no `ON CONFLICT`, so an existing key is an error (unique
/// violation). For keys blue had no row for before the batch, which green then has no row for
/// either, unless a green-side writer inserted one (the caller falls back to [`upsert`]).
/// Why: `ON CONFLICT` makes every row a speculative insertion (an index probe first, then a
/// second WAL record to confirm the row); measured on 2M rows of 11 columns, the plain insert
/// takes 4.6 s where the upsert takes 6.5 s. With a rule filter only matching rows are written.
pub fn insert_new(map: &TableMap, cols: &[usize]) -> String {
    let targets = computable(map, cols);
    let mut sql = format!(
        "INSERT INTO {} AS t {} OVERRIDING SYSTEM VALUE SELECT {} FROM {}",
        map.target.quoted(),
        insert_columns(map, &targets),
        select_list(map, &targets, Cast::Write),
        src_relation(map, cols, 1)
    );
    if let Some(f) = &map.filter {
        sql.push_str(&format!(" WHERE ({})", f.expr));
    }
    sql
}

/// `COPY` of full rows as new rows, for tables with `TableMap::copy_new_keys` (every target
/// column a verbatim copy of a source column of the same type, no filter): what
/// [`insert_new`] does, with green parsing each value once with its column's input function
/// (the same conversion as the INSERT's cast, typmod checks included) and inserting in bulk.
/// Measured on 2M rows of 11 columns: 3.5 s of green's time, against 4.6 s for [`insert_new`].
/// An existing key is the same unique violation. Identity columns take the given values, as
/// with `OVERRIDING SYSTEM VALUE`.
pub fn copy_new(map: &TableMap) -> String {
    let targets: Vec<usize> = (0..map.columns.len()).collect();
    format!(
        "COPY {} ({}) FROM STDIN",
        map.target.quoted(),
        column_list(map, &targets)
    )
}

/// Insert full rows; existing keys are overwritten (keyed) or rows appended (keyless). With a
/// rule filter only matching rows are written ([`delete_unmatched`] removes the others).
pub fn upsert(map: &TableMap, cols: &[usize]) -> String {
    let targets = computable(map, cols);
    let mut sql = insert_new(map, cols);
    if map.is_keyed() {
        let keys = map
            .key
            .iter()
            .map(|&k| quote_ident(&map.columns[k].name))
            .collect::<Vec<_>>()
            .join(", ");
        let sets = excluded_sets(map, &targets);
        if sets.is_empty() {
            sql.push_str(&format!(" ON CONFLICT ({keys}) DO NOTHING"));
        } else {
            sql.push_str(&format!(
                " ON CONFLICT ({keys}) DO UPDATE SET {}",
                sets.join(", ")
            ));
        }
    }
    sql
}

/// Update existing rows from partial images: only target columns computable from the present
/// source columns are set; `None` when no column would change.
pub fn update(map: &TableMap, cols: &[usize]) -> Option<String> {
    let u = PartialUpdate::new(map, cols)?;
    Some(format!(
        "UPDATE {} AS t SET {} FROM (SELECT {} FROM {}) AS s WHERE {}",
        map.target.quoted(),
        u.assignments.join(", "),
        u.select,
        src_relation(map, cols, 1),
        key_match(map, "t", "s")
    ))
}

/// What an update from partial images sets, and from which rows `s`: shared by [`update`] and
/// its conflict-detecting form, which reads the rows differently and may set one more column.
pub(crate) struct PartialUpdate {
    /// The non-key target columns computable from the present source columns.
    pub sets: Vec<usize>,
    /// `col = s.col` for each of `sets`.
    pub assignments: Vec<String>,
    /// Select list of the rows `s`: the key as stored, then `sets` as written.
    pub select: String,
}

impl PartialUpdate {
    /// `None` when no column would change.
    pub fn new(map: &TableMap, cols: &[usize]) -> Option<PartialUpdate> {
        let sets: Vec<usize> = computable(map, cols)
            .into_iter()
            .filter(|i| !map.key.contains(i))
            .collect();
        if sets.is_empty() {
            return None;
        }
        let assignments = sets
            .iter()
            .map(|&i| {
                let n = quote_ident(&map.columns[i].name);
                format!("{n} = s.{n}")
            })
            .collect();
        let select = [
            select_list(map, &map.key, Cast::Match),
            select_list(map, &sets, Cast::Write),
        ]
        .join(", ");
        Some(PartialUpdate {
            sets,
            assignments,
            select,
        })
    }
}

/// With a rule filter: delete the rows of full images that do not match it (a row that stops
/// matching leaves green). Same parameters as [`upsert`].
pub fn delete_unmatched(map: &TableMap, cols: &[usize]) -> Option<String> {
    let f = map.filter.as_ref()?;
    Some(format!(
        "DELETE FROM {} AS t USING (SELECT {} FROM {} WHERE NOT coalesce(({}), false)) AS s WHERE {}",
        map.target.quoted(),
        select_list(map, &map.key, Cast::Match),
        src_relation(map, cols, 1),
        f.expr,
        key_match(map, "t", "s")
    ))
}

/// Delete rows by key; parameters are the `row_key` source columns.
pub fn delete(map: &TableMap) -> String {
    format!(
        "DELETE FROM {} AS t USING (SELECT {} FROM {}) AS s WHERE {}",
        map.target.quoted(),
        select_list(map, &map.key, Cast::Match),
        src_relation(map, &map.row_key, 1),
        key_match(map, "t", "s")
    )
}

/// Move one row to a new key, setting the columns present in the new image and keeping green's
/// values for the others. Parameters: old `row_key` columns, then the new image's `cols`.
pub fn move_row(map: &TableMap, cols: &[usize]) -> String {
    let sets = computable(map, cols);
    let old_src = src_relation(map, &map.row_key, 1);
    let new_src = src_relation(map, cols, 1 + map.row_key.len());
    format!(
        "UPDATE {} AS t SET {} FROM (SELECT {} FROM {}) AS o, (SELECT {} FROM {}) AS n WHERE {}",
        map.target.quoted(),
        sets.iter()
            .map(|&i| {
                let n = quote_ident(&map.columns[i].name);
                format!("{n} = n.{n}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        select_list(map, &map.key, Cast::Match),
        old_src,
        select_list(map, &sets, Cast::Write),
        new_src,
        key_match(map, "t", "o")
    )
}

/// TRUNCATE of target tables (never CASCADE), with blue's RESTART IDENTITY.
pub fn truncate(targets: &[String], restart_identity: bool) -> String {
    let mut sql = format!("TRUNCATE {}", targets.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    sql
}

/// An identity mapping of `cols` (name, type) into `target`, keyed on the first column: the
/// statements' unit tests build on it.
#[cfg(test)]
pub(crate) fn fixture(target: crate::transform::QualifiedName, cols: &[(&str, &str)]) -> TableMap {
    use crate::transform::{ConflictPolicy, QualifiedName, SourceColumn, TargetColumn};
    TableMap {
        source: QualifiedName::new("public", "t"),
        label: target.to_string(),
        target,
        source_columns: cols
            .iter()
            .map(|(c, ty)| SourceColumn {
                name: c.to_string(),
                sql_type: ty.to_string(),
                blue_type: ty.to_string(),
            })
            .collect(),
        columns: cols
            .iter()
            .enumerate()
            .map(|(i, (c, ty))| TargetColumn {
                name: c.to_string(),
                sql_type: ty.to_string(),
                base_type: ty.to_string(),
                expr: format!("src.{}", quote_ident(c)),
                inputs: vec![i],
                collation: None,
                has_equality: true,
                not_null: false,
            })
            .collect(),
        key: vec![0],
        row_key: vec![0],
        awaits_identity: false,
        partitioned: false,
        replica_identity: crate::decode::ReplicaIdentity::Default,
        filter: None,
        reads: vec![],
        origin: None,
        conflicts: ConflictPolicy::Off,
        keyed_lookups: vec![],
        plain_key: None,
        insert_new_keys: None,
        copy_new_keys: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::QualifiedName;

    fn map() -> TableMap {
        fixture(
            QualifiedName::new("public", "T x"),
            &[("id", "bigint"), ("na\"me", "text"), ("doc", "jsonb")],
        )
    }

    #[test]
    fn upsert_quotes_everything_and_updates_non_keys() {
        let sql = upsert(&map(), &[0, 1, 2]);
        assert!(
            sql.starts_with("INSERT INTO \"public\".\"T x\" AS t (\"id\", \"na\"\"me\", \"doc\")"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "unnest($1::text[]) AS c0, unnest($2::text[]) AS c1, unnest($3::text[]) AS c2"
            ),
            "{sql}"
        );
        assert!(sql.contains("ON CONFLICT (\"id\") DO UPDATE SET \"na\"\"me\" = EXCLUDED.\"na\"\"me\", \"doc\" = EXCLUDED.\"doc\""), "{sql}");
    }

    #[test]
    fn new_keys_are_inserted_without_on_conflict() {
        let sql = insert_new(&map(), &[0, 1, 2]);
        assert!(
            sql.starts_with("INSERT INTO \"public\".\"T x\" AS t ("),
            "{sql}"
        );
        assert!(!sql.contains("ON CONFLICT"), "{sql}");
        assert!(upsert(&map(), &[0, 1, 2]).starts_with(&sql));
    }

    #[test]
    fn copy_names_every_target_column_quoted() {
        assert_eq!(
            copy_new(&map()),
            r#"COPY "public"."T x" ("id", "na""me", "doc") FROM STDIN"#
        );
    }

    #[test]
    fn partial_update_sets_only_present_columns() {
        let sql = update(&map(), &[0, 1]).unwrap();
        assert!(
            sql.contains("SET \"na\"\"me\" = s.\"na\"\"me\" FROM"),
            "{sql}"
        );
        assert!(!sql.contains("\"doc\""), "{sql}");
        assert!(update(&map(), &[0]).is_none());
    }

    #[test]
    fn delete_joins_on_the_key() {
        let sql = delete(&map());
        assert!(sql.contains("WHERE t.\"id\" = s.\"id\""), "{sql}");
        assert!(sql.contains("unnest($1::text[])"), "{sql}");
    }

    #[test]
    fn move_row_numbers_parameters_after_the_old_key() {
        let sql = move_row(&map(), &[0, 1]);
        assert!(sql.contains("unnest($1::text[]) AS c0) AS u"), "{sql}");
        assert!(
            sql.contains("unnest($2::text[]) AS c0, unnest($3::text[]) AS c1"),
            "{sql}"
        );
    }
}
