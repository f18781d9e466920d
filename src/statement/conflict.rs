//! Conflict-detecting forms of the keyed apply statements: each writes its rows, keeps green's
//! row where last-writer-wins says so, and records every disagreement in `shadowsync.conflicts`,
//! all in one set-based statement.
//!
//! How a statement sees a conflict: each incoming row carries whether green should hold its key
//! before the batch (`~existed`: the key's first change in the batch was an update or delete)
//! and its blue transaction's commit LSN and time. The write's `RETURNING` says which rows were
//! written and whether as inserts (`xmax = 0`, or on a partitioned table whether green had the
//! key before the statement); comparing that with `~existed` finds inserts
//! meeting a row, updates meeting none, and rows kept by last-writer-wins. Green's row as it was
//! before the statement comes from the same snapshot (sub-statements of one statement do not
//! see each other's writes), so the record holds both versions.
//!
//! Invariants: a conflict-free batch writes exactly what the plain statements write, and the
//! extra work is one hash join of the batch with what it wrote (the record's lookup of green's
//! rows runs over the conflicting rows only); the record is part of the batch's transaction;
//! values travel as parameters; identifiers are quoted.
//!
//! Parameters of every statement: the source columns' text arrays (`$1..$n`), then
//! `~existed bool[]`, `~commit_lsn pg_lsn[]`, `~commit_time timestamptz[]`, then the slot, the
//! source table and the target table (text).

use postgres_types::Type;

use super::{Cast, PartialUpdate, column_list, computable, excluded_sets, key_match, select_list};
use crate::transform::{Lww, TableMap, quote_ident};

/// Metadata columns of the incoming rows (never target column names: they start with `~`).
const META: [&str; 3] = ["~existed", "~commit_lsn", "~commit_time"];
const INSERTED: &str = "\"~inserted\"";

/// `(SELECT unnest($1::text[]) AS "~c0", ...) AS "~u" CROSS JOIN LATERAL (SELECT ...) AS src`:
/// the source row as `src` (only the columns at `positions` of `cols`), with the chosen
/// metadata columns beside it in `"~u"` (not in `src`, whose whole-row value a rule may read).
/// `unnest` in a select list streams the arrays in lockstep; in FROM it would first copy every
/// row into a buffer (measured: 5 to 10% of a statement).
fn source(map: &TableMap, cols: &[usize], positions: &[usize], meta: &[usize]) -> String {
    let mut unnests = Vec::with_capacity(positions.len() + meta.len());
    let mut select = Vec::with_capacity(positions.len());
    for &n in positions {
        let col = &map.source_columns[cols[n]];
        unnests.push(format!("unnest(${}::text[]) AS \"~c{n}\"", n + 1));
        select.push(format!(
            "\"~u\".\"~c{n}\"::{} AS {}",
            col.sql_type,
            quote_ident(&col.name)
        ));
    }
    for &m in meta {
        let ty = ["bool", "pg_lsn", "timestamptz"][m];
        unnests.push(format!(
            "unnest(${}::{ty}[]) AS {}",
            cols.len() + 1 + m,
            quote_ident(META[m])
        ));
    }
    format!(
        "(SELECT {}) AS \"~u\" CROSS JOIN LATERAL (SELECT {}) AS src",
        unnests.join(", "),
        select.join(", ")
    )
}

const EXISTED: usize = 0;
const COMMIT_LSN: usize = 1;
const COMMIT_TIME: usize = 2;

fn meta_list(meta: &[usize]) -> String {
    meta.iter()
        .map(|&m| format!(", \"~u\".{}", quote_ident(META[m])))
        .collect()
}

/// `SELECT <targets>, <meta> FROM <every column of cols> [WHERE filter]`.
fn incoming(map: &TableMap, cols: &[usize], targets: &str, meta: &[usize]) -> String {
    incoming_if(map, cols, targets, meta, None)
}

/// [`incoming`], with one more condition.
fn incoming_if(
    map: &TableMap,
    cols: &[usize],
    targets: &str,
    meta: &[usize],
    condition: Option<&str>,
) -> String {
    let all: Vec<usize> = (0..cols.len()).collect();
    let mut sql = format!(
        "SELECT {targets}{} FROM {}",
        meta_list(meta),
        source(map, cols, &all, meta)
    );
    let conditions: Vec<String> = condition
        .map(str::to_string)
        .into_iter()
        .chain(map.filter.iter().map(|f| format!("({})", f.expr)))
        .collect();
    if !conditions.is_empty() {
        sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
    }
    sql
}

/// Positions in `cols` of the source columns the key (and the filter) read.
fn key_positions(map: &TableMap, cols: &[usize]) -> Vec<usize> {
    let mut inputs: Vec<usize> = map
        .key
        .iter()
        .flat_map(|&k| map.columns[k].inputs.iter().copied())
        .chain(map.filter.iter().flat_map(|f| f.inputs.iter().copied()))
        .collect();
    inputs.sort_unstable();
    inputs.dedup();
    inputs
        .iter()
        .filter_map(|c| cols.iter().position(|x| x == c))
        .collect()
}

/// The keys of the incoming rows with whether each existed: `SELECT <keys>, "~existed" ...`.
fn incoming_keys(map: &TableMap, cols: &[usize], cast: Cast) -> String {
    let mut sql = format!(
        "SELECT {}{} FROM {}",
        select_list(map, &map.key, cast),
        meta_list(&[EXISTED]),
        source(map, cols, &key_positions(map, cols), &[EXISTED])
    );
    if let Some(f) = &map.filter {
        sql.push_str(&format!(" WHERE ({})", f.expr));
    }
    sql
}

fn key_names(map: &TableMap) -> Vec<String> {
    map.key
        .iter()
        .map(|&k| quote_ident(&map.columns[k].name))
        .collect()
}

/// `left.k = CAST(right.k AS <column type>)`: `right` holds written values (cast without the
/// type modifier), `left` stored ones.
fn key_match_stored(map: &TableMap, left: &str, right: &str) -> String {
    map.key
        .iter()
        .map(|&k| {
            let n = quote_ident(&map.columns[k].name);
            format!(
                "{left}.{n} = CAST({right}.{n} AS {})",
                map.columns[k].sql_type
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn returning_key(map: &TableMap) -> String {
    key_names(map)
        .iter()
        .map(|n| format!("t.{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Incoming row of a conflict: the written target columns (a delete has none: NULL).
/// (`s.*`, not `s`: a target column named `s` would take the bare name.)
const INCOMING_ROW: &str = "to_jsonb(s.*) - '{~existed,~commit_lsn,~commit_time}'::text[]";

/// The record insert over conflicting rows `c` (with green's pre-statement row `e`). `rows`
/// is the FROM list that provides `c`, the incoming row `s` (its key and values) and `e`.
fn record(
    map: &TableMap,
    params_from: usize,
    (kind, resolution, incoming): (&str, &str, &str),
    rows: &str,
    rest: &str,
) -> String {
    let key_json = map
        .key
        .iter()
        .map(|&k| {
            let n = &map.columns[k].name;
            format!(
                "{}, s.{}",
                crate::transform::quote_literal(n),
                quote_ident(n)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO shadowsync.conflicts (slot, source_table, target_table, key, kind, resolution, incoming, existing, commit_lsn, commit_time) \
         SELECT ${}, ${}, ${}, jsonb_build_object({key_json}), {kind}, {resolution}, {incoming}, to_jsonb(e.*), s.\"~commit_lsn\", s.\"~commit_time\" \
         FROM {rows} {rest} \
         RETURNING kind, resolution, key::text",
        params_from,
        params_from + 1,
        params_from + 2,
    )
}

/// The record's rows when `c` holds the whole incoming rows: `s` is `c` itself.
fn copy_of_c(map: &TableMap) -> String {
    format!(
        "c CROSS JOIN LATERAL (SELECT c.*) AS s LEFT JOIN {} AS e ON {}",
        map.target.quoted(),
        key_match(map, "s", "e")
    )
}

/// Green's row is absent (key columns are never NULL in a primary key).
fn absent(map: &TableMap, alias: &str) -> String {
    format!("{alias}.{} IS NULL", key_names(map)[0])
}

/// Whether a last-writer-wins timestamp is a point in time (so blue's commit time bounds it).
pub(super) fn is_time(base_type: &str) -> bool {
    matches!(
        base_type,
        "timestamp with time zone" | "timestamp without time zone" | "date"
    )
}

/// Whether [`upsert`] takes one more parameter after the labels: the latest commit time among
/// its rows (timestamptz), the floor of each incoming row's timestamp.
///
/// Why: a row's own timestamp (`updated_at = now()`) is when its transaction started, not when
/// it committed. Two blue transactions updating one row can commit in the opposite order of
/// their `now()`, so blue's final row can carry the older timestamp; compared alone, it would
/// lose to the version shadowsync wrote just before, and green would keep a row blue no longer
/// has. An incoming change is therefore as new as the later of its timestamp and its commit,
/// and green's row is kept only when it is newer than both. (A green write between two
/// commits of one batch loses to blue: the bound is the statement's latest commit.)
pub fn upsert_takes_commit_bound(map: &TableMap) -> bool {
    match map.conflicts.lww() {
        Some(Lww::Column(i)) => is_time(&map.columns[*i].base_type),
        _ => false,
    }
}

/// Under `commit_time` last-writer-wins, the plain insert of new keys
/// ([`super::sql::insert_new`]) with the commit time column written too. It takes the
/// parameters of the other conflict-detecting statements (prepare it with [`param_types`]:
/// it reads only the arrays and `~commit_time`). `None` under any other policy.
pub fn insert_new(map: &TableMap, cols: &[usize]) -> Option<String> {
    let Some(Lww::CommitTime(c)) = map.conflicts.lww() else {
        return None;
    };
    let targets = computable(map, cols);
    let written = select_list(map, &targets, Cast::Write);
    Some(format!(
        "INSERT INTO {} AS t ({}, {}) OVERRIDING SYSTEM VALUE {}",
        map.target.quoted(),
        column_list(map, &targets),
        quote_ident(c),
        incoming(map, cols, &written, &[COMMIT_TIME])
    ))
}

/// Parameter types of a conflict-detecting statement over `n` source columns, for statements
/// that leave some unread (PostgreSQL cannot infer the type of an unread parameter).
pub fn param_types(n: usize) -> Vec<Type> {
    let mut types = vec![Type::TEXT_ARRAY; n];
    types.extend([
        Type::BOOL_ARRAY,
        Type::PG_LSN_ARRAY,
        Type::TIMESTAMPTZ_ARRAY,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
    ]);
    types
}

/// Upsert of full rows with detection: `insert_exists`, `update_missing` (applied as an
/// insert), and under lww `insert_older` / `update_older` (green's row kept).
pub fn upsert(map: &TableMap, cols: &[usize]) -> String {
    let targets = computable(map, cols);
    let write = UpsertWrite::new(map, cols, &targets);
    let written = select_list(map, &targets, Cast::Write);
    // The rows written, the batch's keys with what each expected (read again, keys only), and
    // the full incoming rows only when some key disagreed.
    let rows = incoming(map, cols, &written, &write.meta);
    // Keys as stored (the exact type, modifier included), to match what `w` returns.
    let keys = incoming_keys(map, cols, Cast::Match);
    let key_list = key_names(map)
        .iter()
        .map(|k| format!("k.{k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (returned, inserted, before) = inserted_test(map);
    format!(
        "WITH w AS (INSERT INTO {tbl} AS t ({ins}) OVERRIDING SYSTEM VALUE {rows} \
               ON CONFLICT ({keys}) DO UPDATE SET {sets}{guard} \
               RETURNING {ret}{returned}), \
         c AS MATERIALIZED (SELECT * FROM (SELECT {key_list}, k.\"~existed\", {inserted} AS {INSERTED} \
                                             FROM ({k}) AS k LEFT JOIN w ON {kw}{before}) AS c0 \
               WHERE c0.{INSERTED} IS NULL OR c0.{INSERTED} = c0.\"~existed\") {record}",
        tbl = map.target.quoted(),
        ins = write.insert_cols.join(", "),
        keys = key_names(map).join(", "),
        sets = write.sets.join(", "),
        guard = write.guard,
        ret = returning_key(map),
        k = keys,
        kw = key_match(map, "k", "w"),
        record = upsert_record(map, cols, &targets, &written),
    )
}

/// How [`upsert`] writes under the table's last-writer-wins policy.
struct UpsertWrite {
    /// The INSERT's columns (quoted).
    insert_cols: Vec<String>,
    /// Metadata columns the written rows carry (see `META`).
    meta: Vec<usize>,
    /// `ON CONFLICT ... DO UPDATE SET` assignments.
    sets: Vec<String>,
    /// The update's `WHERE`, keeping green's newer row (empty without lww).
    guard: String,
}

impl UpsertWrite {
    fn new(map: &TableMap, cols: &[usize], targets: &[usize]) -> Self {
        let mut write = UpsertWrite {
            insert_cols: targets
                .iter()
                .map(|&i| quote_ident(&map.columns[i].name))
                .collect(),
            meta: Vec::new(),
            sets: excluded_sets(map, targets),
            guard: String::new(),
        };
        match map.conflicts.lww() {
            Some(Lww::Column(i)) if targets.contains(i) => {
                let n = quote_ident(&map.columns[*i].name);
                write.guard = if upsert_takes_commit_bound(map) {
                    // EXCLUDED carries no per-row metadata: the statement's latest commit time
                    // stands in for each row's (see `upsert_takes_commit_bound`).
                    format!(
                        " WHERE (t.{n} > GREATEST(EXCLUDED.{n}, ${}::timestamptz)) IS NOT TRUE",
                        cols.len() + 7
                    )
                } else {
                    format!(" WHERE (t.{n} > EXCLUDED.{n}) IS NOT TRUE")
                };
            }
            Some(Lww::CommitTime(c)) => {
                let n = quote_ident(c);
                write.insert_cols.push(n.clone());
                write.meta.push(COMMIT_TIME);
                write.sets.push(format!("{n} = EXCLUDED.{n}"));
                write.guard = format!(" WHERE (t.{n} > EXCLUDED.{n}) IS NOT TRUE");
            }
            _ => {}
        }
        if write.sets.is_empty() {
            // Every column is a key: a no-op update, so that an existing row is still returned.
            let k = &key_names(map)[0];
            write.sets.push(format!("{k} = EXCLUDED.{k}"));
        }
        write
    }
}

/// How [`upsert`]'s `c` tells a row written as an insert: (what `w` returns for it, the test
/// over `w`, the join the test needs).
fn inserted_test(map: &TableMap) -> (String, String, String) {
    // Whether the upsert inserted the row (rather than updating one): `xmax = 0` of the row
    // returned. A partitioned table returns no system columns from an INSERT (PostgreSQL:
    // "cannot retrieve a system column in this context"), so there the question goes to
    // green's row before the statement, which the statement's snapshot still sees.
    //
    // Joined once (a correlated EXISTS would be copied into both arms of the WHERE: measured
    // 650 ms against 250 ms for 20k upserts into a 1M-row table of 16 partitions). A green
    // writer committing between the statement's snapshot and ON CONFLICT's read of the latest
    // row can make the two disagree, and its row then goes unrecorded, as any race of a
    // concurrent writer with a statement that has already taken its snapshot.
    if map.partitioned {
        (
            String::new(),
            format!(
                "CASE WHEN w.{first} IS NOT NULL THEN e0.{first} IS NULL END",
                first = key_names(map)[0],
            ),
            format!(
                " LEFT JOIN {} AS e0 ON {}",
                map.target.quoted(),
                key_match(map, "e0", "k")
            ),
        )
    } else {
        (
            format!(", (t.xmax = 0) AS {INSERTED}"),
            format!("w.{INSERTED}"),
            String::new(),
        )
    }
}

/// The record of [`upsert`]'s conflicting rows `c`, each joined with its full incoming row
/// (`written`, the select list of `targets`) and green's row before the statement.
fn upsert_record(map: &TableMap, cols: &[usize], targets: &[usize], written: &str) -> String {
    // Uncorrelated, so green evaluates it once: a conflict-free batch never reads these.
    let s = incoming_if(
        map,
        cols,
        written,
        &[COMMIT_LSN, COMMIT_TIME],
        Some("EXISTS (SELECT FROM c)"),
    );
    let same = same_as_green(map, targets);
    // With a filter, an update finding no row is a row moving in, not a conflict.
    let moved_in = if map.filter.is_some() {
        // coalesce: a kept row has no `~inserted` and must stay recorded.
        format!(" AND NOT coalesce(c.{INSERTED} AND c.\"~existed\", false)")
    } else {
        String::new()
    };
    record(
        map,
        cols.len() + 4,
        (
            &format!(
                "CASE WHEN c.{INSERTED} IS NULL THEN CASE WHEN c.\"~existed\" THEN 'update_older' ELSE 'insert_older' END \
                 WHEN c.\"~existed\" THEN 'update_missing' ELSE 'insert_exists' END"
            ),
            &format!("CASE WHEN c.{INSERTED} IS NULL THEN 'keep' ELSE 'apply' END"),
            INCOMING_ROW,
        ),
        &format!(
            "c JOIN ({s}) AS s ON {} LEFT JOIN {} AS e ON {}",
            key_match_stored(map, "c", "s"),
            map.target.quoted(),
            key_match_stored(map, "e", "s")
        ),
        &format!(
            "WHERE NOT (c.{INSERTED} IS NOT NULL AND NOT c.\"~existed\" AND {same}){moved_in}"
        ),
    )
}

/// Rows whose values equal green's are not a conflict, whatever their history: the incoming
/// row `s` (cast as stored) against green's `e`, over `targets`.
fn same_as_green(map: &TableMap, targets: &[usize]) -> String {
    format!(
        "ROW({})::text = ROW({})::text",
        targets
            .iter()
            .map(|&i| format!(
                "CAST(s.{} AS {})",
                quote_ident(&map.columns[i].name),
                map.columns[i].sql_type
            ))
            .collect::<Vec<_>>()
            .join(", "),
        targets
            .iter()
            .map(|&i| format!("e.{}", quote_ident(&map.columns[i].name)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Update from partial images (unchanged TOAST) with detection: `update_missing` (skipped:
/// the full row is unknown) and under lww `update_older`. `None` when no column would change.
pub fn update(map: &TableMap, cols: &[usize]) -> Option<String> {
    let PartialUpdate {
        sets,
        mut assignments,
        select,
    } = PartialUpdate::new(map, cols)?;
    let mut guard = String::new();
    match map.conflicts.lww() {
        Some(Lww::Column(i)) if sets.contains(i) => {
            let n = quote_ident(&map.columns[*i].name);
            guard = if is_time(&map.columns[*i].base_type) {
                format!(" AND (t.{n} > GREATEST(s.{n}, s.\"~commit_time\")) IS NOT TRUE")
            } else {
                format!(" AND (t.{n} > s.{n}) IS NOT TRUE")
            };
        }
        Some(Lww::CommitTime(c)) => {
            let n = quote_ident(c);
            assignments.push(format!("{n} = s.\"~commit_time\""));
            guard = format!(" AND (t.{n} > s.\"~commit_time\") IS NOT TRUE");
        }
        _ => {}
    }
    let s = incoming(map, cols, &select, &[EXISTED, COMMIT_LSN, COMMIT_TIME]);
    let missing_ok = if map.filter.is_some() {
        format!("WHERE NOT {}", absent(map, "e"))
    } else {
        String::new()
    };
    Some(format!(
        "WITH s AS ({s}), \
         w AS (UPDATE {tbl} AS t SET {assign} FROM s WHERE {ts}{guard} RETURNING {ret}), \
         c AS MATERIALIZED (SELECT s.* FROM s WHERE NOT EXISTS (SELECT 1 FROM w WHERE {ws})) {record}",
        tbl = map.target.quoted(),
        assign = assignments.join(", "),
        ts = key_match(map, "t", "s"),
        ret = returning_key(map),
        ws = key_match(map, "w", "s"),
        record = record(
            map,
            cols.len() + 4,
            (
                &format!(
                    "CASE WHEN {} THEN 'update_missing' ELSE 'update_older' END",
                    absent(map, "e")
                ),
                &format!("CASE WHEN {} THEN 'skip' ELSE 'keep' END", absent(map, "e")),
                INCOMING_ROW,
            ),
            &copy_of_c(map),
            &missing_ok,
        ),
    ))
}

/// Delete by key with detection: `delete_missing`, and under lww `delete_older` (green's row
/// changed after blue committed the delete: kept). Parameters start with the `row_key` columns.
pub fn delete(map: &TableMap) -> String {
    let guard = match map.conflicts.lww() {
        // A delete has only blue's commit time to compare, meaningful only against a time.
        Some(Lww::Column(i)) if is_time(&map.columns[*i].base_type) => {
            let n = quote_ident(&map.columns[*i].name);
            format!(" AND (t.{n} > s.\"~commit_time\") IS NOT TRUE")
        }
        Some(Lww::Column(_)) => String::new(),
        Some(Lww::CommitTime(c)) => {
            format!(
                " AND (t.{} > s.\"~commit_time\") IS NOT TRUE",
                quote_ident(c)
            )
        }
        None => String::new(),
    };
    let s = incoming(
        &TableMap {
            // Deletes carry only the identity: no filter applies to them.
            filter: None,
            ..map.clone()
        },
        &map.row_key,
        &select_list(map, &map.key, Cast::Match),
        &[EXISTED, COMMIT_LSN, COMMIT_TIME],
    );
    // A key the batch inserted and deleted was never meant to be in green; with a filter, a
    // missing row may simply never have matched it.
    let relevant = if map.filter.is_some() {
        format!("WHERE NOT {}", absent(map, "e"))
    } else {
        format!("WHERE NOT {} OR c.\"~existed\"", absent(map, "e"))
    };
    format!(
        "WITH s AS ({s}), \
         w AS (DELETE FROM {tbl} AS t USING s WHERE {ts}{guard} RETURNING {ret}), \
         c AS MATERIALIZED (SELECT s.* FROM s WHERE NOT EXISTS (SELECT 1 FROM w WHERE {ws})) {record}",
        tbl = map.target.quoted(),
        ts = key_match(map, "t", "s"),
        ret = returning_key(map),
        ws = key_match(map, "w", "s"),
        record = record(
            map,
            map.row_key.len() + 4,
            (
                &format!(
                    "CASE WHEN {} THEN 'delete_missing' ELSE 'delete_older' END",
                    absent(map, "e")
                ),
                &format!(
                    "CASE WHEN {} THEN 'apply' ELSE 'keep' END",
                    absent(map, "e")
                ),
                "NULL::jsonb",
            ),
            &copy_of_c(map),
            &relevant,
        ),
    )
}
