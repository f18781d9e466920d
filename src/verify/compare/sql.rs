//! SQL text of the comparison: how a compared column is hashed, how keys are ordered and
//! ranged, and the queries run over one relation holding rows in the target's shape.
//!
//! Invariants: both sides of a comparison use the same hash and ordering expressions for a
//! column, chosen by green's type ([`Kind`]), so equal values hash equal and keys order alike on
//! blue and green; identifiers are always quoted; key bounds travel as parameters (`$n`) or, for
//! `COPY`, which takes none, as transaction-local settings read with `current_setting`, never as
//! SQL text.

/// How a column is hashed and, as a key, ordered; decided by green's base type. Blue's column
/// (of the same type, or of the same family: see [`same_text`]) is treated alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// smallint, integer, bigint: hashed as bigint (no text form needed), ordered natively.
    Int,
    /// text, varchar: hashed as bytes, ordered by `COLLATE "C"` (byte order on both sides,
    /// whatever each column's collation).
    Text,
    /// Built-in types whose order is the same on any server: hashed by their text, ordered
    /// natively.
    Native,
    /// real, double precision: hashed as the number (`hashfloat8extended`, a third of the
    /// cost of the text form), zeros by their text (`-0` and `0` are equal numbers but
    /// different text); ordered natively. With the sessions' exact float text, two floats
    /// have the same text exactly when they are equal numbers, zeros aside, so this finds
    /// what the text would.
    Float,
    /// boolean: hashed as 0 or 1 (its text form costs a call of the output function per row),
    /// ordered natively.
    Bool,
    /// timestamp, timestamptz: hashed as the instant (no text form needed; with the session's
    /// UTC a timestamptz is the timestamp of the same microseconds), ordered natively.
    Stamp,
    /// Anything else (enums, arrays, ranges, composites, user types): hashed and ordered by the
    /// text form, `COLLATE "C"` (an enum's order could differ between blue and green).
    Other,
}

pub(super) fn kind(base_type: &str) -> Kind {
    match base_type {
        "smallint" | "integer" | "bigint" => Kind::Int,
        "text" | "character varying" => Kind::Text,
        "real" | "double precision" => Kind::Float,
        "boolean" => Kind::Bool,
        "numeric" | "uuid" | "date" | "bytea" | "time without time zone" => Kind::Native,
        "timestamp with time zone" | "timestamp without time zone" => Kind::Stamp,
        _ => Kind::Other,
    }
}

/// Whether a blue column of type `blue` (with its modifier) holds exactly the text green stores
/// for it in a column of type `green` (with its modifier): the same type, or both integers (a
/// value out of green's range is refused, never altered), or both text or varchar (a value too
/// long is refused, never cut). Then blue may hash the column itself.
pub(super) fn same_text(blue: &str, green: &str) -> bool {
    fn family(t: &str) -> Option<u8> {
        match t {
            "smallint" | "integer" | "bigint" => Some(0),
            "text" | "character varying" => Some(1),
            t if t.starts_with("character varying(") => Some(1),
            _ => None,
        }
    }
    blue == green || family(blue).is_some_and(|f| family(green) == Some(f))
}

/// A constant per column standing for NULL in its hash (splitmix64 of the column's seed): NULL
/// and the empty string hash differently.
fn null_mark(seed: u64) -> i64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// The compared columns of the target: what every relation of a comparison gives, column for
/// column.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    /// Target column names, in green's order.
    pub names: Vec<String>,
    pub kinds: Vec<Kind>,
    /// Green's base type of each column (key bounds are cast to it).
    pub base_types: Vec<String>,
    /// The key: indices into `names`.
    pub key: Vec<usize>,
    /// Only these keys (an incremental comparison's changed rows): one array literal of key
    /// texts per key column, row `n` of each together one key.
    pub only: Option<Vec<String>>,
}

impl Shape {
    /// The hash of column `i` given its value expression: `hashtextextended` or
    /// `hashint8extended` seeded by the column's position, NULL as the column's mark.
    pub fn value_hash(&self, i: usize, value: &str) -> String {
        let seed = i + 1;
        let null = null_mark(seed as u64);
        match self.kinds[i] {
            Kind::Int => format!("coalesce(hashint8extended(({value})::int8, {seed}), {null})"),
            Kind::Text => {
                format!("coalesce(hashtextextended(({value})::text COLLATE \"C\", {seed}), {null})")
            }
            Kind::Stamp => {
                format!("coalesce(timestamp_hash_extended(({value})::timestamp, {seed}), {null})")
            }
            Kind::Float => format!(
                "coalesce(CASE WHEN ({value}) = 0 THEN hashtextextended(({value})::text, {seed}) \
                 ELSE hashfloat8extended(({value})::float8, {seed}) END, {null})"
            ),
            Kind::Bool => format!("coalesce(hashint4extended(({value})::int4, {seed}), {null})"),
            Kind::Native | Kind::Other => {
                format!("coalesce(hashtextextended(({value})::text, {seed}), {null})")
            }
        }
    }

    /// The hash of column `i` in `rel` (0 for a column hashed elsewhere).
    pub fn col_hash(&self, rel: &Rel, i: usize) -> String {
        match &rel.cols[i] {
            Col::Value(v) => self.value_hash(i, v),
            Col::Hash(h) => h.clone(),
            Col::Elsewhere => "0::int8".into(),
        }
    }

    /// A row's hash: the XOR of its columns' hashes (each seeded by its position, so values
    /// swapped between columns change it). XOR lets a part of the row be hashed on blue (its
    /// `partial`) and the rest on green.
    pub fn row_hash(&self, rel: &Rel) -> String {
        let mut parts: Vec<String> = rel.partial.iter().cloned().collect();
        parts.extend(
            (0..self.names.len())
                .filter(|&i| !matches!(rel.cols[i], Col::Elsewhere))
                .map(|i| self.col_hash(rel, i)),
        );
        if parts.is_empty() {
            "0::int8".into()
        } else {
            format!("({})", parts.join(" # "))
        }
    }

    /// XOR of the hashes of the columns of `rel` that are values (blue's part of a row staged
    /// into green).
    pub fn value_hashes(&self, rel: &Rel) -> String {
        let parts: Vec<String> = (0..self.names.len())
            .filter(|&i| matches!(rel.cols[i], Col::Value(_)))
            .map(|i| self.col_hash(rel, i))
            .collect();
        if parts.is_empty() {
            "0::int8".into()
        } else {
            format!("({})", parts.join(" # "))
        }
    }

    /// Key column `k` (an index into `key`) of `rel`, as ordered.
    fn order_expr(&self, rel: &Rel, k: usize) -> String {
        let e = &rel.keys[k];
        match self.kinds[self.key[k]] {
            Kind::Int | Kind::Native | Kind::Stamp | Kind::Float | Kind::Bool => e.clone(),
            Kind::Text | Kind::Other => format!("({e})::text COLLATE \"C\""),
        }
    }

    /// A bound of key column `k` (the parameter `p`, text) as compared with [`order_expr`].
    fn bound_expr(&self, k: usize, p: &str) -> String {
        let c = self.key[k];
        match self.kinds[c] {
            Kind::Int => format!("({p})::bigint"),
            Kind::Native | Kind::Stamp | Kind::Float | Kind::Bool => {
                format!("({p})::{}", self.base_types[c])
            }
            Kind::Text | Kind::Other => format!("({p}) COLLATE \"C\""),
        }
    }

    /// The key's expressions, as ordered.
    pub fn order_exprs(&self, rel: &Rel) -> Vec<String> {
        (0..self.key.len())
            .map(|k| self.order_expr(rel, k))
            .collect()
    }

    /// `ORDER BY` list of the key.
    pub fn order_by(&self, rel: &Rel) -> String {
        self.order_exprs(rel).join(", ")
    }

    /// The key columns' text, as selected (`k0, k1, ...`).
    pub fn key_texts(&self, rel: &Rel) -> String {
        rel.keys
            .iter()
            .map(|e| format!("({e})::text"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rows of `rel` inside `range` (and its own filter), parameters added to `params`.
    pub fn conditions(&self, rel: &Rel, range: &Range, params: &mut Params) -> String {
        let mut conds = Vec::new();
        if let Some(f) = &rel.filter {
            conds.push(format!("({f})"));
        }
        for (bound, op) in [(&range.lo, ">"), (&range.hi, "<=")] {
            if let Some(values) = bound {
                let ord = self.order_exprs(rel);
                let b: Vec<String> = values
                    .iter()
                    .enumerate()
                    .map(|(k, v)| self.bound_expr(k, &params.push(v)))
                    .collect();
                conds.push(format!("({}) {op} ({})", ord.join(", "), b.join(", ")));
            }
        }
        if let Some(arrays) = &self.only {
            let arrays: Vec<String> = arrays
                .iter()
                .map(|a| format!("({})::text[]", params.push(a)))
                .collect();
            let names: Vec<String> = (0..self.key.len()).map(|k| format!("k{k}")).collect();
            let keys: Vec<String> = (0..self.key.len())
                .map(|k| self.bound_expr(k, &format!("u.k{k}")))
                .collect();
            conds.push(format!(
                "({}) IN (SELECT {} FROM unnest({}) AS u({}))",
                self.order_exprs(rel).join(", "),
                keys.join(", "),
                arrays.join(", "),
                names.join(", ")
            ));
        }
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" AND ")
        }
    }

    /// Whether the greatest key of a set of rows is the `max()` of the key's order expression:
    /// a single key column ordered as an aggregate orders it (integers, timestamps, text forms
    /// in "C").
    pub fn max_key(&self) -> bool {
        matches!(self.key.as_slice(), [k] if matches!(self.kinds[*k], Kind::Int | Kind::Stamp | Kind::Text | Kind::Other))
    }

    /// The first `limit` rows of `rel` in `range` in key order: their number, the sum of their
    /// row hashes (see [`Self::checksum`]) and their greatest key's text, in one pass (a
    /// chunk's end and its checksum at once). Only for [`Self::max_key`] shapes.
    pub fn lead(&self, rel: &Rel, range: &Range, params: &mut Params, limit: u64) -> String {
        let cond = self.conditions(rel, range, params);
        let limit = params.push(&limit.to_string());
        format!(
            "SELECT count(*), coalesce(sum(s.h), 0)::text, (max(s.o))::text
               FROM (SELECT {} AS h, {} AS o FROM {} WHERE {cond} ORDER BY 2 LIMIT ({limit})::bigint) AS s",
            self.row_hash(rel),
            self.order_by(rel),
            rel.from,
        )
    }

    /// Rows and the sum of row hashes (as text: a numeric) in `range`.
    ///
    /// A row hash is 64 bits (the XOR of 64-bit column hashes); a chunk's checksum is its row
    /// count and the exact sum of its row hashes. Chunks that differ in some rows but have the
    /// same count agree on the sum only if the differing rows' hashes happen to sum alike:
    /// about 2^-64 per differing chunk for hashes spread evenly (a billion differing chunks
    /// would give a 5 in 10^11 chance of one missed); equal rows always sum alike. A leaf
    /// compares every column's 64-bit hash key by key.
    pub fn checksum(&self, rel: &Rel, range: &Range, params: &mut Params) -> String {
        format!(
            "SELECT count(*), coalesce(sum({}), 0)::text FROM {} WHERE {}",
            self.row_hash(rel),
            rel.from,
            self.conditions(rel, range, params)
        )
    }

    /// The key of the `offset`-th row (from 0, a parameter) in `range`, in key order.
    pub fn nth_key(&self, rel: &Rel, range: &Range, params: &mut Params, offset: u64) -> String {
        let cond = self.conditions(rel, range, params);
        let offset = params.push(&offset.to_string());
        format!(
            "SELECT {} FROM {} WHERE {cond} ORDER BY {} OFFSET ({offset})::bigint LIMIT 1",
            self.key_texts(rel),
            rel.from,
            self.order_by(rel)
        )
    }

    /// Keys splitting `range` into parts of `step` rows (every `step`-th key, at most `most`).
    pub fn splits(
        &self,
        rel: &Rel,
        range: &Range,
        params: &mut Params,
        step: u64,
        most: usize,
    ) -> String {
        let cond = self.conditions(rel, range, params);
        let step = params.push(&step.to_string());
        let cols: Vec<String> = (0..self.key.len()).map(|k| format!("k{k}")).collect();
        let texts: Vec<String> = rel
            .keys
            .iter()
            .enumerate()
            .map(|(k, e)| format!("({e})::text AS k{k}"))
            .collect();
        format!(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS n FROM {} WHERE {cond}) AS s
              WHERE n % ({step})::bigint = 0 ORDER BY n LIMIT {most}",
            cols.join(", "),
            texts.join(", "),
            self.order_by(rel),
            rel.from
        )
    }

    /// The first `limit` keys in `range`, in key order.
    pub fn first_keys(
        &self,
        rel: &Rel,
        range: &Range,
        params: &mut Params,
        limit: usize,
    ) -> String {
        format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
            self.key_texts(rel),
            rel.from,
            self.conditions(rel, range, params),
            self.order_by(rel)
        )
    }

    /// Each row in `range`: its key texts, then every column's hash.
    pub fn rows(&self, rel: &Rel, range: &Range, params: &mut Params) -> String {
        let mut select = vec![self.key_texts(rel)];
        select.extend((0..self.names.len()).map(|i| self.col_hash(rel, i)));
        select.retain(|s| !s.is_empty());
        format!(
            "SELECT {} FROM {} WHERE {}",
            select.join(", "),
            rel.from,
            self.conditions(rel, range, params)
        )
    }

    /// Positions (from 1) of the keys given as one text array per key column (`$1`, `$2`, ...),
    /// in key order: the order ranges use, so that keys are reported in it.
    pub fn key_order(&self) -> String {
        let arrays: Vec<String> = (1..=self.key.len())
            .map(|n| format!("${n}::text[]"))
            .collect();
        let names: Vec<String> = (0..self.key.len()).map(|k| format!("k{k}")).collect();
        let order: Vec<String> = (0..self.key.len())
            .map(|k| self.bound_expr(k, &format!("u.k{k}")))
            .collect();
        format!(
            "SELECT n FROM unnest({}) WITH ORDINALITY AS u({}, n) ORDER BY {}",
            arrays.join(", "),
            names.join(", "),
            order.join(", ")
        )
    }

    /// `(row hash, sign)` of every row of `rel`: the input of a multiset comparison.
    pub fn signed_hashes(&self, rel: &Rel, sign: i64) -> String {
        format!(
            "SELECT {} AS h, {sign}::int8 AS c FROM {} WHERE {}",
            self.row_hash(rel),
            rel.from,
            rel.filter.as_deref().unwrap_or("true")
        )
    }
}

/// A PostgreSQL array literal of `values` (each quoted, `"` and `\\` escaped): a text array as
/// one text parameter.
pub(super) fn array_literal<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = values
        .map(|v| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// One relation in the target's shape, on one server.
#[derive(Debug, Clone)]
pub(super) struct Rel {
    pub side: Side,
    /// The table named in errors.
    pub label: String,
    /// `FROM` item, aliased `t`.
    pub from: String,
    /// A condition on its rows (blue's publication row filter).
    pub filter: Option<String>,
    /// Value expressions of the key columns (over `t`).
    pub keys: Vec<String>,
    /// One per compared column: its value, or its hash computed elsewhere.
    pub cols: Vec<Col>,
    /// The XOR of the hashes of the columns hashed elsewhere (by blue, staged in green).
    pub partial: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) enum Col {
    /// The column's value (over `t`): hashed here.
    Value(String),
    /// The column's hash, already computed (by blue, staged in green).
    Hash(String),
    /// Hashed elsewhere, part of the relation's `partial`: the other relation of the mapping
    /// has the column's own hash (see `keyed::Keyed::leaf`).
    Elsewhere,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Side {
    Blue,
    Green,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Blue => "blue",
            Side::Green => "green",
        }
    }
}

/// A range of keys, as key texts: `(lo, hi]`, either end open when `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Range {
    pub lo: Option<Vec<String>>,
    pub hi: Option<Vec<String>>,
}

/// Parameters of one statement: `$n::text`, or, for `COPY`, transaction-local settings
/// `shadowsync.verify_<n>` set with `set_config` just before.
#[derive(Debug, Default)]
pub(super) struct Params {
    pub values: Vec<String>,
    settings: bool,
}

impl Params {
    pub fn numbered() -> Params {
        Params::default()
    }

    pub fn settings() -> Params {
        Params {
            values: Vec::new(),
            settings: true,
        }
    }

    /// Adds a value; returns the SQL reading it (text).
    pub fn push(&mut self, value: &str) -> String {
        self.values.push(value.to_string());
        let n = self.values.len();
        if self.settings {
            format!("current_setting('shadowsync.verify_{n}')")
        } else {
            format!("${n}::text")
        }
    }

    /// For settings: the statement setting them (parameters: the values).
    pub fn set_sql(&self) -> Option<String> {
        if !self.settings || self.values.is_empty() {
            return None;
        }
        let sets: Vec<String> = (1..=self.values.len())
            .map(|n| format!("set_config('shadowsync.verify_{n}', ${n}::text, true)"))
            .collect();
        Some(format!("SELECT {}", sets.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> (Shape, Rel) {
        let shape = Shape {
            names: vec!["id".into(), "name".into(), "doc".into()],
            kinds: vec![Kind::Int, Kind::Text, Kind::Other],
            base_types: vec!["bigint".into(), "text".into(), "jsonb".into()],
            key: vec![0, 1],
            only: None,
        };
        let rel = Rel {
            side: Side::Green,
            label: "public.t".into(),
            from: "\"public\".\"t\" AS t".into(),
            filter: None,
            keys: vec!["t.\"id\"".into(), "t.\"name\"".into()],
            cols: vec![
                Col::Value("t.\"id\"".into()),
                Col::Value("t.\"name\"".into()),
                Col::Hash("t.\"~h2\"".into()),
            ],
            partial: None,
        };
        (shape, rel)
    }

    #[test]
    fn ranges_compare_key_rows_with_parameters() {
        let (shape, rel) = shape();
        let mut p = Params::numbered();
        let range = Range {
            lo: Some(vec!["1".into(), "a'b".into()]),
            hi: None,
        };
        let cond = shape.conditions(&rel, &range, &mut p);
        assert_eq!(
            cond,
            "(t.\"id\", (t.\"name\")::text COLLATE \"C\") > (($1::text)::bigint, ($2::text) COLLATE \"C\")"
        );
        assert_eq!(p.values, vec!["1", "a'b"]);
    }

    #[test]
    fn settings_stand_in_for_parameters_of_copy() {
        let (shape, rel) = shape();
        let mut p = Params::settings();
        let range = Range {
            lo: None,
            hi: Some(vec!["9".into(), "z".into()]),
        };
        let cond = shape.conditions(&rel, &range, &mut p);
        assert!(
            cond.contains("current_setting('shadowsync.verify_1')"),
            "{cond}"
        );
        assert!(!cond.contains('9'), "{cond}");
        assert_eq!(
            p.set_sql().unwrap(),
            "SELECT set_config('shadowsync.verify_1', $1::text, true), set_config('shadowsync.verify_2', $2::text, true)"
        );
    }

    #[test]
    fn row_hash_xors_column_hashes_and_takes_precomputed_ones() {
        let (shape, rel) = shape();
        let h = shape.row_hash(&rel);
        assert!(
            h.starts_with("(coalesce(hashint8extended((t.\"id\")::int8, 1), "),
            "{h}"
        );
        assert!(h.contains(" # t.\"~h2\")"), "{h}");
        assert_ne!(null_mark(1), null_mark(2));
    }

    #[test]
    fn key_subsets_travel_as_array_parameters() {
        let (mut shape, rel) = shape();
        shape.only = Some(vec![
            array_literal(["1", "2"].into_iter()),
            array_literal(["a\"b", "c\\d"].into_iter()),
        ]);
        let mut p = Params::numbered();
        let cond = shape.conditions(&rel, &Range::default(), &mut p);
        assert!(cond.contains("IN (SELECT (u.k0)::bigint, (u.k1) COLLATE \"C\" FROM unnest(($1::text)::text[], ($2::text)::text[]) AS u(k0, k1))"), "{cond}");
        assert_eq!(p.values, vec!["{\"1\",\"2\"}", r#"{"a\"b","c\\d"}"#]);
    }

    #[test]
    fn text_forms_that_agree_across_types() {
        assert!(same_text("integer", "bigint"));
        assert!(same_text("text", "character varying(20)"));
        assert!(same_text("numeric(10,2)", "numeric(10,2)"));
        assert!(!same_text("numeric(10,2)", "numeric(10,3)"));
        assert!(!same_text("text", "uuid"));
        assert!(!same_text(
            "timestamp without time zone",
            "timestamp with time zone"
        ));
    }
}
