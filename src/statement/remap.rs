//! Re-deriving a reader's lookup columns in green, set-based: after a batch changes rows of a
//! looked-up table, one statement per reader recomputes the derived columns of every reader row
//! whose stored key (`via`) equals a changed key (see `transform::remap`); `remap --table`
//! recomputes a whole table's derived columns, one key range at a time.
//!
//! `src` is rebuilt from green's row: each input source column from the target column that
//! stores it, through text to the source type, exactly as the apply statements build `src` from
//! blue's text. Rows whose derived values do not change are not written.
//!
//! Invariants: one statement per reader and write, whatever the number of keys or rows; under
//! last-writer-wins a row green changed after the triggering blue commit is kept and recorded
//! (`remap_older`, resolution `keep`) with the whole row as it would have been written;
//! values travel as parameters; identifiers are quoted.
//!
//! Parameters of [`by_keys`]: `$1 text[]` the changed keys (blue's text), `$2 pg_lsn[]` and
//! `$3 timestamptz[]` the commit of each key's last change, then (detecting) the slot, the
//! source table and the target table (text).

use super::{Cast, key_match, target_expr};
use crate::transform::remap::Remap;
use crate::transform::{Lww, TableMap, quote_ident, quote_literal};

/// The reader row's alias (quoted: never a name a rule uses).
const R: &str = "\"~r\"";

/// The conflict kind of a re-derived row green kept (it changed after blue's commit).
pub const REMAP_OLDER: &str = "remap_older";

/// `(SELECT CAST(r."stored"::text AS type) AS "input", ...) AS src` over reader row `r`.
fn src_from(map: &TableMap, inputs: &[(usize, usize)], row: &str) -> String {
    if inputs.is_empty() {
        return "(SELECT) AS src".to_string();
    }
    let cols: Vec<String> = inputs
        .iter()
        .map(|&(source, stored)| {
            format!(
                "CAST({row}.{}::text AS {}) AS {}",
                quote_ident(&map.columns[stored].name),
                map.source_columns[source].sql_type,
                quote_ident(&map.source_columns[source].name)
            )
        })
        .collect();
    format!("(SELECT {}) AS src", cols.join(", "))
}

/// `ROW(a.x, a.y)::text`: compared as text, so types without equality (json) compare too.
fn row_text(map: &TableMap, cols: &[usize], alias: &str) -> String {
    let parts: Vec<String> = cols
        .iter()
        .map(|&c| format!("{alias}.{}", quote_ident(&map.columns[c].name)))
        .collect();
    format!("ROW({})::text", parts.join(", "))
}

fn names(map: &TableMap, cols: &[usize], alias: &str) -> Vec<String> {
    cols.iter()
        .map(|&c| format!("{alias}.{}", quote_ident(&map.columns[c].name)))
        .collect()
}

/// `CAST((expr) AS type) AS "col"` for each derived column, over `src`.
fn derived_exprs(map: &TableMap, derived: &[usize]) -> Vec<String> {
    derived
        .iter()
        .map(|&d| {
            format!(
                "{} AS {}",
                target_expr(map, d, Cast::Write),
                quote_ident(&map.columns[d].name)
            )
        })
        .collect()
}

/// `"col" = n."col"` for each derived column.
fn derived_sets(map: &TableMap, derived: &[usize]) -> Vec<String> {
    derived
        .iter()
        .map(|&d| {
            let c = quote_ident(&map.columns[d].name);
            format!("{c} = n.{c}")
        })
        .collect()
}

/// The last-writer-wins guard of a re-derived row and the assignment that goes with it: a
/// re-derivation carries only blue's commit time, so only a time decides (as for a delete).
fn lww(map: &TableMap) -> (Option<String>, Option<String>) {
    match map.conflicts.lww() {
        Some(Lww::Column(i)) if super::conflict::is_time(&map.columns[*i].base_type) => {
            let n = quote_ident(&map.columns[*i].name);
            (
                Some(format!("(t.{n} > n.\"~commit_time\") IS NOT TRUE")),
                None,
            )
        }
        Some(Lww::CommitTime(c)) => {
            let n = quote_ident(c);
            (
                Some(format!("(t.{n} > n.\"~commit_time\") IS NOT TRUE")),
                Some(format!("{n} = n.\"~commit_time\"")),
            )
        }
        _ => (None, None),
    }
}

/// The statement re-deriving `remap.derived` of `map`'s rows whose `via` column equals one of
/// the keys in `$1`, and whether it takes the labels (`$4..$6`: only when it records conflicts).
/// The statement returns one row per conflict recorded (kind, resolution, key text).
pub fn by_keys(map: &TableMap, remap: &Remap) -> (String, bool) {
    let target = map.target.quoted();
    let derived = &remap.derived;
    // Every scan of the reader goes through its stored key, as one array computed once (an
    // InitPlan): the statements run with generic plans, made once, often while the table was
    // small, which otherwise join the keys to the whole table by hash, a sequential scan of it
    // per batch (measured: 20 ms a batch at 300k VMs). `check` asks for the index.
    let any = |alias: &str| {
        format!(
            "{alias}.{} = ANY(ARRAY(SELECT CAST(\"~x\" AS {}) FROM unnest($1::text[]) AS \"~x\"))",
            quote_ident(&map.columns[remap.via].name),
            map.columns[remap.via].sql_type
        )
    };
    let exprs = derived_exprs(map, derived);
    let n = format!(
        "SELECT {keys}, \"~d\".*, \"~k\".\"~commit_lsn\", \"~k\".\"~commit_time\" \
         FROM unnest($1::text[], $2::pg_lsn[], $3::timestamptz[]) AS \"~k\"(v, \"~commit_lsn\", \"~commit_time\") \
         JOIN {target} AS \"~r\" ON \"~r\".{via} = CAST(\"~k\".v AS {via_type}) \
         CROSS JOIN LATERAL (SELECT {exprs} FROM {src}) AS \"~d\" \
         WHERE {any_r}",
        keys = names(map, &map.key, R).join(", "),
        exprs = exprs.join(", "),
        via = quote_ident(&map.columns[remap.via].name),
        via_type = map.columns[remap.via].sql_type,
        src = src_from(map, &remap.inputs, R),
        any_r = any(R),
    );
    let detect = map.conflicts.detects();
    let (guard, stamp) = if detect { lww(map) } else { (None, None) };
    let mut sets = derived_sets(map, derived);
    sets.extend(stamp);
    let changed = format!(
        "{} IS DISTINCT FROM {}",
        row_text(map, derived, "t"),
        row_text(map, derived, "n")
    );
    let update = format!(
        "UPDATE {target} AS t SET {sets} FROM \"~n\" AS n WHERE {any_t} AND {key} AND {changed}{guard}",
        sets = sets.join(", "),
        key = key_match(map, "t", "n"),
        any_t = any("t"),
        guard = guard
            .as_ref()
            .map(|g| format!(" AND {g}"))
            .unwrap_or_default(),
    );
    if guard.is_none() {
        return (format!("WITH \"~n\" AS ({n}) {update}"), false);
    }
    // Rows left out by the guard (green changed them after the commit) and still different:
    // recorded, with the row as it would have been written.
    let key_json: Vec<String> = map
        .key
        .iter()
        .map(|&k| {
            let c = &map.columns[k].name;
            format!("{}, c.{}", quote_literal(c), quote_ident(c))
        })
        .collect();
    let derived_json: Vec<String> = derived
        .iter()
        .map(|&d| {
            let c = &map.columns[d].name;
            format!("{}, c.{}", quote_literal(c), quote_ident(c))
        })
        .collect();
    let differs = format!(
        "{} IS DISTINCT FROM {}",
        row_text(map, derived, "e"),
        row_text(map, derived, "n")
    );
    let text = format!(
        "WITH \"~n\" AS MATERIALIZED ({n}), \
         \"~w\" AS ({update} RETURNING {ret}), \
         \"~c\" AS MATERIALIZED (SELECT n.* FROM \"~n\" AS n JOIN {target} AS e ON {ne} \
             WHERE {any_e} AND {differs} AND NOT EXISTS (SELECT 1 FROM \"~w\" AS w WHERE {wn})) \
         INSERT INTO shadowsync.conflicts (slot, source_table, target_table, key, kind, resolution, incoming, existing, commit_lsn, commit_time) \
         SELECT $4, $5, $6, jsonb_build_object({key_json}), {kind}, 'keep', \
                to_jsonb(e.*) || jsonb_build_object({derived_json}), to_jsonb(e.*), c.\"~commit_lsn\", c.\"~commit_time\" \
         FROM \"~c\" AS c JOIN {target} AS e ON {ce} AND {any_e} \
         RETURNING kind, resolution, key::text",
        ret = names(map, &map.key, "t").join(", "),
        ne = key_match(map, "n", "e"),
        wn = key_match(map, "w", "n"),
        key_json = key_json.join(", "),
        kind = quote_literal(REMAP_OLDER),
        derived_json = derived_json.join(", "),
        ce = key_match(map, "c", "e"),
        any_e = any("e"),
    );
    (text, true)
}

/// `remap --table`: re-derives `derived` of the rows of `map` with keys in the range after the
/// previous chunk (`$1`: the last key of the previous chunk as text, NULL for the first),
/// `$2` rows at most, in key order. Returns the chunk's last key (text) and the rows changed.
pub fn chunk(map: &TableMap, derived: &[usize], inputs: &[(usize, usize)]) -> String {
    let target = map.target.quoted();
    let key = quote_ident(&map.columns[map.key[0]].name);
    let key_type = &map.columns[map.key[0]].sql_type;
    let exprs = derived_exprs(map, derived);
    let sets = derived_sets(map, derived);
    let changed = format!(
        "{} IS DISTINCT FROM {}",
        row_text(map, derived, "t"),
        row_text(map, derived, "n")
    );
    format!(
        "WITH \"~r\" AS MATERIALIZED (SELECT * FROM {target} AS \"~r\" \
             WHERE $1::text IS NULL OR \"~r\".{key} > CAST($1::text AS {key_type}) ORDER BY \"~r\".{key} LIMIT $2), \
         \"~n\" AS (SELECT \"~r\".{key}, \"~d\".* FROM \"~r\" CROSS JOIN LATERAL (SELECT {exprs} FROM {src}) AS \"~d\"), \
         \"~w\" AS (UPDATE {target} AS t SET {sets} FROM \"~n\" AS n WHERE t.{key} = n.{key} AND {changed} RETURNING 1) \
         SELECT (SELECT max(\"~r\".{key})::text FROM \"~r\"), (SELECT count(*) FROM \"~w\")",
        exprs = exprs.join(", "),
        src = src_from(map, inputs, R),
        sets = sets.join(", "),
    )
}
