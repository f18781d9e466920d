//! Keyless tables (no primary key or usable unique index on green, REPLICA IDENTITY FULL on
//! blue): the statement that removes one green row per full old image, as PostgreSQL's own
//! apply worker does, matching each column with its own equality, and records the images that
//! found no row.
//!
//! Why not compare text (`ROW(...)::text`): equality of a type is not equality of its text.
//! Under a nondeterministic collation `'äbc'` equals `'a\u0308bc'`; numeric `1.0` equals
//! `1.00`. Each column is therefore compared with `=` (under its own collation), except for
//! types green has no `=` for (json, xml, point), which are compared as text, as stored.
//!
//! How, set-based: the incoming images are grouped by those same equalities (`GROUP BY` uses
//! the column's equality and collation), each group counting how many rows it must delete;
//! green's equal rows are numbered per group and the first `count` of each are deleted, by
//! `(tableoid, ctid)` (a partitioned table's partitions each have their own ctids). Columns
//! declared NOT NULL are joined with `=`, which green can hash; nullable ones together as one
//! record value, whose equality also matches NULL with NULL (see [`join`]).
//!
//! Invariants: values travel as parameters, identifiers are quoted; with detection, every
//! image that found no row is recorded in `shadowsync.conflicts` (`update_missing` or
//! `delete_missing`, resolution `apply`: the update's new row is appended all the same) in the
//! same statement; no row values reach the log (the statement returns no key, only the
//! record's id). The record's image (jsonb) is built only for the images that found no row: a
//! json value with `\u0000` has no jsonb form, and must not fail every batch of its table.

use super::{Cast, computable, select_list, src_relation};
use crate::transform::{TableMap, quote_ident};

/// Grouping expression of target column `i` of the images `v` (as `"~g<n>"` in `d`).
fn group_expr(map: &TableMap, i: usize) -> String {
    let c = &map.columns[i];
    let v = format!("v.{}", quote_ident(&c.name));
    match (c.has_equality, &c.collation) {
        (false, _) => format!("{v}::text"),
        (true, Some(collation)) => format!("{v} {collation}"),
        (true, None) => v,
    }
}

/// The join of green's rows `t2` with the groups `d` (over `targets`, in order): a NOT NULL
/// column with an equality by `=` (which green can hash), the others together as one record
/// value (`"~r"` in `d`): comparing two record values treats NULL as equal to NULL, uses each
/// field's equality and collation, and can be merge-joined, where a chain of
/// `IS NOT DISTINCT FROM` could only be a nested loop over green's whole table.
fn join(map: &TableMap, targets: &[usize]) -> (String, Option<String>) {
    let mut conditions = Vec::new();
    let (mut record_t2, mut record_d) = (Vec::new(), Vec::new());
    for (n, &i) in targets.iter().enumerate() {
        let c = &map.columns[i];
        let t = format!("t2.{}", quote_ident(&c.name));
        match (c.has_equality, c.not_null) {
            (true, true) => conditions.push(format!("{t} = d.\"~g{n}\"")),
            (true, false) => {
                record_t2.push(t);
                record_d.push(group_expr(map, i));
            }
            (false, _) => {
                record_t2.push(format!("{t}::text"));
                record_d.push(group_expr(map, i));
            }
        }
    }
    let record = (!record_t2.is_empty()).then(|| {
        conditions.push(format!("ROW({}) = d.\"~r\"", record_t2.join(", ")));
        format!("ROW({}) AS \"~r\", ", record_d.join(", "))
    });
    if conditions.is_empty() {
        conditions.push("true".to_string());
    }
    (conditions.join(" AND "), record)
}

/// The incoming images as `v`: the written target columns, cast as stored, and with detection
/// the metadata arrays after the source columns' (`~update bool[]`, `~commit_lsn pg_lsn[]`,
/// `~commit_time timestamptz[]`), beside `src` (not in it: a rule may read `src` whole).
fn images(map: &TableMap, cols: &[usize], targets: &[usize], detect: bool) -> String {
    let selected = select_list(map, targets, Cast::Match);
    if !detect {
        return format!("SELECT {selected} FROM {}", src_relation(map, cols, 1));
    }
    let mut unnests = Vec::with_capacity(cols.len() + 3);
    let mut typed = Vec::with_capacity(cols.len());
    for (n, &c) in cols.iter().enumerate() {
        let col = &map.source_columns[c];
        unnests.push(format!("unnest(${}::text[]) AS \"~c{n}\"", n + 1));
        typed.push(format!(
            "\"~u\".\"~c{n}\"::{} AS {}",
            col.sql_type,
            quote_ident(&col.name)
        ));
    }
    if cols.is_empty() {
        unnests.push("unnest($1::text[]) AS \"~c0\"".to_string());
    }
    let first = cols.len().max(1) + 1;
    for (m, ty) in ["~update", "~commit_lsn", "~commit_time"]
        .iter()
        .zip(["bool", "pg_lsn", "timestamptz"])
        .enumerate()
    {
        unnests.push(format!(
            "unnest(${}::{}[]) AS \"{}\"",
            first + m,
            ty.1,
            ty.0
        ));
    }
    let comma = if selected.is_empty() { "" } else { ", " };
    format!(
        "SELECT {selected}{comma}\"~u\".\"~update\", \"~u\".\"~commit_lsn\", \"~u\".\"~commit_time\", \
                row_number() OVER () AS \"~i\" \
           FROM (SELECT {}) AS \"~u\" CROSS JOIN LATERAL (SELECT {}) AS src",
        unnests.join(", "),
        typed.join(", ")
    )
}

/// The columns of the record's image of row `r`: json values as their text, which jsonb
/// cannot hold when it has `\u0000` (the record must never fail the batch).
fn image_columns(map: &TableMap, targets: &[usize]) -> String {
    targets
        .iter()
        .map(|&i| {
            let c = &map.columns[i];
            let n = quote_ident(&c.name);
            if c.base_type == "json" {
                format!("r.{n}::text AS {n}")
            } else {
                format!("r.{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deletes one green row equal to each old image (parameters: the source columns' arrays,
/// and with `detect` the metadata arrays and the slot, source and target labels).
pub fn delete_matching(map: &TableMap, cols: &[usize], detect: bool) -> String {
    // A column computed from no source column (a constant, `now()`) tells nothing of the row.
    let targets: Vec<usize> = computable(map, cols)
        .into_iter()
        .filter(|&i| !map.columns[i].inputs.is_empty())
        .collect();
    let groups: Vec<String> = targets.iter().map(|&i| group_expr(map, i)).collect();
    let named: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(n, g)| format!("{g} AS \"~g{n}\", "))
        .collect();
    let group_by = if groups.is_empty() {
        "()".to_string()
    } else {
        groups.join(", ")
    };
    let (join, record) = join(map, &targets);
    let meta = if detect {
        ", (array_agg(v.\"~update\" ORDER BY v.\"~commit_lsn\" DESC))[1] AS \"~update\", \
         max(v.\"~commit_lsn\") AS \"~commit_lsn\", max(v.\"~commit_time\") AS \"~commit_time\", \
         min(v.\"~i\") AS \"~rep\""
    } else {
        ""
    };
    let tbl = map.target.quoted();
    let matched = format!(
        "WITH v AS MATERIALIZED ({images}), \
         d AS MATERIALIZED (SELECT {named}{record}count(*) AS \"~n\", row_number() OVER () AS \"~cls\"{meta} \
                              FROM v GROUP BY {group_by}), \
         m AS MATERIALIZED (SELECT c.rel, c.tid, c.cls FROM ( \
              SELECT t2.tableoid AS rel, t2.ctid AS tid, d.\"~cls\" AS cls, d.\"~n\" AS n, \
                     row_number() OVER (PARTITION BY d.\"~cls\") AS rn \
                FROM {tbl} AS t2 JOIN d ON {join}) AS c WHERE c.rn <= c.n)",
        images = images(map, cols, &targets, detect),
        named = named.concat(),
        record = record.unwrap_or_default(),
    );
    let delete =
        format!("DELETE FROM {tbl} AS t USING m WHERE t.tableoid = m.rel AND t.ctid = m.tid");
    // Images count as matched by the rows actually deleted: a row a concurrent green writer
    // changed or deleted meanwhile is skipped by the delete's recheck, and its image is then
    // recorded as not found.
    if !detect {
        return format!("{matched} {delete}");
    }
    let labels = cols.len().max(1) + 4;
    format!(
        "{matched}, x AS ({delete} RETURNING m.cls) \
         INSERT INTO shadowsync.conflicts (slot, source_table, target_table, key, kind, resolution, incoming, existing, commit_lsn, commit_time) \
         SELECT ${labels}, ${}, ${}, to_jsonb(i.*), \
                CASE WHEN d.\"~update\" THEN 'update_missing' ELSE 'delete_missing' END, 'apply', NULL, NULL, \
                d.\"~commit_lsn\", d.\"~commit_time\" \
           FROM d JOIN v AS r ON r.\"~i\" = d.\"~rep\" CROSS JOIN LATERAL (SELECT {image}) AS i \
           LEFT JOIN (SELECT cls, count(*) AS hits FROM x GROUP BY cls) AS h ON h.cls = d.\"~cls\" \
           CROSS JOIN LATERAL generate_series(1, d.\"~n\" - coalesce(h.hits, 0)) AS g \
         RETURNING kind, resolution, 'keyless row, see shadowsync.conflicts id ' || id",
        labels + 1,
        labels + 2,
        image = image_columns(map, &targets),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ReplicaIdentity;
    use crate::transform::QualifiedName;

    /// `(a text COLLATE nd, n numeric NOT NULL, doc json)`, keyless.
    fn map() -> TableMap {
        let mut map = crate::statement::fixture(
            QualifiedName::new("public", "t"),
            &[("a", "text"), ("n", "numeric"), ("doc", "json")],
        );
        map.key.clear();
        map.row_key.clear();
        map.replica_identity = ReplicaIdentity::Full;
        map.columns[0].collation = Some("COLLATE \"public\".\"nd\"".to_string());
        map.columns[1].not_null = true;
        map.columns[2].has_equality = false;
        map
    }

    #[test]
    fn each_column_is_matched_by_its_own_equality() {
        let sql = delete_matching(&map(), &[0, 1, 2], false);
        assert!(
            sql.contains("v.\"a\" COLLATE \"public\".\"nd\" AS \"~g0\""),
            "{sql}"
        );
        assert!(sql.contains("t2.\"n\" = d.\"~g1\""), "{sql}");
        assert!(
            sql.contains("ROW(t2.\"a\", t2.\"doc\"::text) = d.\"~r\""),
            "{sql}"
        );
        assert!(
            sql.contains("ROW(v.\"a\" COLLATE \"public\".\"nd\", v.\"doc\"::text) AS \"~r\""),
            "{sql}"
        );
        assert!(!sql.contains("IS NOT DISTINCT FROM"), "{sql}");
        if std::env::var_os("SHOW_SQL").is_some() {
            println!("{sql};\n{};", delete_matching(&map(), &[0, 1, 2], true));
        }
    }
}
