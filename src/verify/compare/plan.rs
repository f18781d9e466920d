//! Where each mapping's expected rows are hashed: on blue when every compared column is a copy
//! blue can hash itself, else in green (the rule's expressions, filter and lookups evaluated
//! there, as the initial copy does), from blue's rows staged in a temporary table.
//!
//! Invariants: a column blue hashes is a verbatim copy of a blue column whose text is green's
//! ([`sql::same_text`]), hashed with the expression green uses for the target column, so the
//! XOR of the parts hashed on each side equals green's row hash for an equal row; blue's rows
//! are read as the initial copy reads them (`ONLY` unless partitioned, the publication's row
//! filter applied).

use std::collections::HashMap;

use tokio_postgres::Client;
use tracing::debug;

use super::sql::{self, Col, Rel, Shape, Side};
use super::{CompareError, db};
use crate::transform::{QualifiedName, TableMap, TargetColumn, quote_ident};

/// One mapping's part of the rows green should hold.
pub(super) enum Source {
    /// Hashed on blue, range by range.
    Blue(Rel),
    /// Each chunk's blue rows staged into green, then evaluated and hashed there.
    Staged(Staged),
    /// Every blue row staged into green once (keyless targets, keys computed by the rule),
    /// with the number of rows whose computed key is NULL (set aside: see
    /// `stage::materialize`).
    Green(Rel, u64),
}

pub(super) struct Staged {
    /// Blue's table, keyed by the source columns the key copies: ranges of green's key are
    /// ranges of these.
    pub blue: Rel,
    /// Select list of the staging `COPY` from blue (over `t`).
    pub copy_select: String,
    /// The staging table (quoted).
    pub table: String,
    /// The expected rows, computed in green from the staging table.
    pub expected: Rel,
}

/// Blue's side of a mapping, from blue's catalog.
struct BlueTable {
    from: String,
    /// Column name -> type with its modifier.
    types: HashMap<String, String>,
    row_filter: Option<String>,
}

/// What every step of a comparison needs: both connections and the target's shape.
pub(super) struct Ctx<'a> {
    pub blue: &'a Client,
    pub green: &'a Client,
    pub shape: &'a Shape,
    /// Statements prepared so far on either side (see `keyed::run_all`).
    pub statements: super::keyed::Statements,
}

/// A mapping's columns in the shape's order: `cols[i]` is the mapping's column of shape column
/// `i`.
pub(super) struct Mapped<'a> {
    pub map: &'a TableMap,
    pub cols: Vec<&'a TargetColumn>,
    /// Index of the mapping among those compared (names its temporary tables).
    pub n: usize,
    /// The shape's key (indices into `cols`).
    pub key: Vec<usize>,
}

impl Mapped<'_> {
    fn key_col(&self, i: usize) -> bool {
        self.key.contains(&i)
    }
}

async fn blue_table(cx: &Ctx<'_>, source: &QualifiedName) -> Result<BlueTable, CompareError> {
    let label = source.to_string();
    let row = cx
        .blue
        .query_opt(
            "SELECT c.relkind::text,
                    array(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           ORDER BY a.attnum),
                    array(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           ORDER BY a.attnum)
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&source.quoted()],
        )
        .await
        .map_err(db(Side::Blue, &label, "reading the table's columns"))?
        .ok_or_else(|| CompareError::Missing {
            side: Side::Blue.name(),
            table: label.clone(),
        })?;
    let (kind, names, types): (String, Vec<String>, Vec<String>) =
        (row.get(0), row.get(1), row.get(2));
    let row_filter = row_filter(cx, source, &label).await?;
    // A partitioned table holds no rows itself; any other is read without its inheritance
    // children, which are tables of their own.
    let only = if kind == "p" { "" } else { "ONLY " };
    Ok(BlueTable {
        from: format!("{only}{} AS t", source.quoted()),
        types: names.into_iter().zip(types).collect(),
        row_filter,
    })
}

/// The publication's row filter of `source` (PostgreSQL 15+), as the stream and the copy apply
/// it. Read from every publication of the table: the mappings do not say which one streams,
/// so filters that differ between publications cannot be told apart and stop the compare.
async fn row_filter(
    cx: &Ctx<'_>,
    source: &QualifiedName,
    label: &str,
) -> Result<Option<String>, CompareError> {
    let rows = cx
        .blue
        .query(
            "SELECT DISTINCT rowfilter FROM pg_publication_tables
              WHERE schemaname = $1 AND tablename = $2",
            &[&source.schema, &source.name],
        )
        .await
        .map_err(db(
            Side::Blue,
            label,
            "reading the publications' row filters",
        ))?;
    let filters: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
    match filters.as_slice() {
        [] | [None] => Ok(None),
        [Some(f)] => Ok(Some(f.clone())),
        _ => Err(CompareError::Mappings(format!(
            "{label} is published with different row filters by several publications: which rows green should have is ambiguous"
        ))),
    }
}

/// The staging table of mapping `n` (quoted).
pub(super) fn staging_name(n: usize) -> String {
    quote_ident(&format!("~verify_stage_{n}"))
}

/// The materialized expected rows of mapping `n` (quoted).
pub(super) fn expected_name(n: usize) -> String {
    quote_ident(&format!("~verify_expected_{n}"))
}

/// Words that are expressions of their own, never a column.
const EXPRESSION_WORDS: [&str; 13] = [
    "user",
    "current_user",
    "session_user",
    "current_role",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_catalog",
    "current_schema",
    "null",
    "default",
];

/// The source column `c` copies as it is (`src."col"`, `"col"`, or a bare lower-case name).
pub(super) fn copy_of(map: &TableMap, c: &TargetColumn) -> Option<usize> {
    let names: Vec<&str> = map.source_columns.iter().map(|s| s.name.as_str()).collect();
    if let Some(j) = c.copied_from(&names) {
        return Some(j);
    }
    let [j] = c.inputs.as_slice() else {
        return None;
    };
    let (name, e) = (names[*j], c.expr.trim());
    let bare = e == name
        && !EXPRESSION_WORDS.contains(&name)
        && name.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_')
        && name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
    (bare || e == quote_ident(name)).then_some(*j)
}

/// Shape column -> the blue column it copies, when blue may hash it (it holds the text green
/// stores).
fn hashable(m: &Mapped<'_>, blue: &BlueTable) -> Vec<Option<usize>> {
    m.cols
        .iter()
        .map(|c| {
            let j = copy_of(m.map, c)?;
            let ty = blue.types.get(&m.map.source_columns[j].name)?;
            sql::same_text(ty, &c.sql_type).then_some(j)
        })
        .collect()
}

/// Builds the mapping's source: see [`Source`].
pub(super) async fn source(cx: &Ctx<'_>, m: &Mapped<'_>) -> Result<Source, CompareError> {
    let blue = blue_table(cx, &m.map.source).await?;
    let shape = cx.shape;
    let hashable = hashable(m, &blue);
    let src_col = |j: usize| format!("t.{}", quote_ident(&m.map.source_columns[j].name));
    let blue_rel = |keys: Vec<String>, cols: Vec<Col>| Rel {
        side: Side::Blue,
        label: m.map.source.to_string(),
        from: blue.from.clone(),
        filter: blue.row_filter.clone(),
        keys,
        cols,
        partial: None,
    };
    // Blue's columns as blue hashes them (the others are hashed in green).
    let blue_cols: Vec<Col> = hashable
        .iter()
        .map(|j| j.map_or(Col::Elsewhere, |j| Col::Value(src_col(j))))
        .collect();
    let key_copied: Option<Vec<usize>> = shape.key.iter().map(|&k| hashable[k]).collect();
    let blue_keys = key_copied.map(|js| js.into_iter().map(src_col).collect::<Vec<_>>());
    let path = |how: &str| debug!(target = %m.map.label, source = %m.map.source, how, "compare");
    if m.map.filter.is_none() && hashable.iter().all(Option::is_some) {
        path("hashed on blue");
        let keys = blue_keys.unwrap_or_default();
        return Ok(Source::Blue(blue_rel(keys, blue_cols)));
    }
    let table = staging_name(m.n);
    let needed = needed(shape, m, &hashable);
    if let Some(keys) = blue_keys.filter(|k| !k.is_empty()) {
        // Ranges of green's key are ranges of blue's: a chunk's rows are staged at a time.
        path("staged into green chunk by chunk");
        let blue = blue_rel(keys, blue_cols);
        let layout = Layout {
            needed,
            hashable,
            per_column: false,
        };
        super::stage::create(cx.green, &table, &layout.definitions(), &m.map.label).await?;
        return Ok(Source::Staged(Staged {
            copy_select: layout.copy_select(shape, &blue, &src_col),
            expected: layout.rel(shape, m, &table),
            blue,
            table,
        }));
    }
    // Every row staged at once; a computed key needs every column's own hash, kept with the
    // key in a table of its own.
    let keyed = !shape.key.is_empty();
    path("staged into green at once");
    let layout = Layout {
        needed,
        hashable,
        per_column: keyed,
    };
    super::stage::create(cx.green, &table, &layout.definitions(), &m.map.label).await?;
    let blue = blue_rel(Vec::new(), blue_cols);
    let copy_select = layout.copy_select(shape, &blue, &src_col);
    super::stage::fill(cx, &blue, &copy_select, &table, &sql::Range::default()).await?;
    let rel = layout.rel(shape, m, &table);
    if !keyed {
        return Ok(Source::Green(rel, 0));
    }
    let expected = expected_name(m.n);
    let (rel, null_keys) = super::stage::materialize(cx, &rel, &expected, &table).await?;
    Ok(Source::Green(rel, null_keys))
}

/// The source columns green needs of a mapping it evaluates: the inputs of the columns blue
/// does not hash and of the filter, and those of the key (ranges and reported keys read them).
fn needed(shape: &Shape, m: &Mapped<'_>, hashable: &[Option<usize>]) -> Vec<usize> {
    let mut needed: Vec<usize> = Vec::new();
    for (i, c) in m.cols.iter().enumerate() {
        match hashable[i] {
            Some(j) if shape.key.contains(&i) => needed.push(j),
            Some(_) => {}
            None => needed.extend(&c.inputs),
        }
    }
    if let Some(f) = &m.map.filter {
        needed.extend(&f.inputs);
    }
    needed.sort_unstable();
    needed.dedup();
    needed
}

/// The staging table of a mapping evaluated in green: the text of the source columns green
/// needs, and the hashes of the columns blue hashes: each column's (`h<i>`, when the expected
/// rows are kept with every column's hash), or their XOR (`ph`).
struct Layout {
    /// Source columns staged as text.
    needed: Vec<usize>,
    /// Shape column -> the blue column it copies, when blue hashes it.
    hashable: Vec<Option<usize>>,
    per_column: bool,
}

impl Layout {
    /// Shape columns blue hashes.
    fn blue_hashed(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.hashable.len()).filter(|&i| self.hashable[i].is_some())
    }

    fn definitions(&self) -> Vec<String> {
        let mut defs: Vec<String> = self.needed.iter().map(|j| format!("c{j} text")).collect();
        if self.per_column {
            defs.extend(self.blue_hashed().map(|i| format!("h{i} int8")));
        } else {
            defs.push("ph int8".into());
        }
        defs
    }

    /// What blue sends for each row of `blue` (the columns it hashes are its values), in the
    /// staging table's column order.
    fn copy_select(&self, shape: &Shape, blue: &Rel, src_col: &dyn Fn(usize) -> String) -> String {
        let mut select: Vec<String> = self.needed.iter().map(|&j| src_col(j)).collect();
        if self.per_column {
            select.extend(self.blue_hashed().map(|i| shape.col_hash(blue, i)));
        } else {
            select.push(shape.value_hashes(blue));
        }
        select.join(", ")
    }

    /// The expected rows from the staging table: the staged text cast to the source types
    /// under the source names (`src`, as the copy and the apply see it), the rule's filter,
    /// then each compared column green computes (and every key column) as `~verify_v<i>`, and
    /// the hashes blue computed (`~verify_h<i>`, or their XOR `~verify_ph`).
    fn derived(&self, m: &Mapped<'_>, table: &str) -> String {
        let mut inner: Vec<String> = self
            .needed
            .iter()
            .map(|&j| {
                let c = &m.map.source_columns[j];
                format!("s.c{j}::{} AS {}", c.sql_type, quote_ident(&c.name))
            })
            .collect();
        let mut outer = Vec::new();
        if self.per_column {
            for i in self.blue_hashed() {
                inner.push(format!("s.h{i} AS \"~verify_h{i}\""));
                outer.push(format!("src.\"~verify_h{i}\""));
            }
        } else {
            inner.push("s.ph AS \"~verify_ph\"".into());
            outer.push("src.\"~verify_ph\"".into());
        }
        for (i, c) in m.cols.iter().enumerate() {
            if self.hashable[i].is_none() || m.key_col(i) {
                outer.push(format!(
                    "CAST(({}) AS {}) AS \"~verify_v{i}\"",
                    c.expr, c.sql_type
                ));
            }
        }
        let filter = m
            .map
            .filter
            .as_ref()
            .map(|f| format!(" WHERE ({})", f.expr))
            .unwrap_or_default();
        format!(
            "(SELECT {} FROM (SELECT {} FROM {table} AS s) AS src{filter}) AS t",
            outer.join(", "),
            inner.join(", ")
        )
    }

    /// The expected rows over the staging table `table`.
    fn rel(&self, shape: &Shape, m: &Mapped<'_>, table: &str) -> Rel {
        let cols = (0..m.cols.len())
            .map(|i| match (self.hashable[i], self.per_column) {
                (None, _) => Col::Value(format!("t.\"~verify_v{i}\"")),
                (Some(_), true) => Col::Hash(format!("t.\"~verify_h{i}\"")),
                (Some(_), false) => Col::Elsewhere,
            })
            .collect();
        Rel {
            side: Side::Green,
            label: m.map.label.clone(),
            from: self.derived(m, table),
            filter: None,
            keys: shape
                .key
                .iter()
                .map(|k| format!("t.\"~verify_v{k}\""))
                .collect(),
            cols,
            partial: (!self.per_column).then(|| "t.\"~verify_ph\"".to_string()),
        }
    }
}

/// The shape of the target the mappings write, and each mapping's columns in it: the columns
/// every mapping writes, in the first one's order; its key. The error says why there is none.
pub(super) fn shape(maps: &[std::sync::Arc<TableMap>]) -> Result<(Shape, Vec<Mapped<'_>>), String> {
    let first = &maps[0];
    let columns: Vec<&TargetColumn> = first
        .columns
        .iter()
        .filter(|c| {
            maps.iter()
                .all(|m| m.columns.iter().any(|o| o.name == c.name))
        })
        .collect();
    let mut key = Vec::new();
    for &k in &first.key {
        let name = &first.columns[k].name;
        let i = columns
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| {
                format!(
                    "key column {name} of {} is not written by every mapping",
                    first.label
                )
            })?;
        key.push(i);
    }
    let shape = Shape {
        names: columns.iter().map(|c| c.name.clone()).collect(),
        kinds: columns.iter().map(|c| sql::kind(&c.base_type)).collect(),
        base_types: columns.iter().map(|c| c.base_type.clone()).collect(),
        key,
        only: None,
    };
    let mapped = maps
        .iter()
        .enumerate()
        .map(|(n, map)| Mapped {
            map,
            n,
            key: shape.key.clone(),
            cols: shape
                .names
                .iter()
                .filter_map(|name| map.columns.iter().find(|c| &c.name == name))
                .collect(),
        })
        .collect();
    Ok((shape, mapped))
}

/// The shape and mappings narrowed to the key columns: comparing them compares the sets of
/// keys (rows missing or extra in green), at the cost of hashing the key alone.
pub(super) fn keys_only<'a>(shape: &Shape, mapped: &[Mapped<'a>]) -> (Shape, Vec<Mapped<'a>>) {
    let pick = |v: &[String]| shape.key.iter().map(|&k| v[k].clone()).collect::<Vec<_>>();
    let keys = Shape {
        names: pick(&shape.names),
        kinds: shape.key.iter().map(|&k| shape.kinds[k]).collect(),
        base_types: pick(&shape.base_types),
        key: (0..shape.key.len()).collect(),
        only: None,
    };
    let mapped = mapped
        .iter()
        .map(|m| Mapped {
            map: m.map,
            cols: shape.key.iter().map(|&k| m.cols[k]).collect(),
            n: m.n,
            key: keys.key.clone(),
        })
        .collect();
    (keys, mapped)
}

/// Whether blue holds each key of the mapping's target at most once: the key is blue's primary
/// key or replica identity index (unique, NOT NULL), copied as it is into green's single key
/// column. (Under `REPLICA IDENTITY FULL`, or with no identity, blue may hold a key twice.)
pub(super) fn unique_on_blue(map: &TableMap) -> bool {
    use crate::decode::ReplicaIdentity;
    !map.awaits_identity
        && matches!(
            map.replica_identity,
            ReplicaIdentity::Default | ReplicaIdentity::Index
        )
        && map.plain_key.is_some_and(|j| map.row_key == [j])
}

/// Green's target table, as every comparison reads it.
pub(super) fn target(shape: &Shape, map: &TableMap) -> Rel {
    // A partitioned table's rows are in its partitions; a plain table is read without
    // inheritance children (shadowsync writes the table itself).
    let only = if map.partitioned { "" } else { "ONLY " };
    let col = |name: &String| format!("t.{}", quote_ident(name));
    Rel {
        side: Side::Green,
        label: map.label.clone(),
        from: format!("{only}{} AS t", map.target.quoted()),
        filter: None,
        keys: shape.key.iter().map(|&k| col(&shape.names[k])).collect(),
        cols: shape.names.iter().map(|n| Col::Value(col(n))).collect(),
        partial: None,
    }
}
