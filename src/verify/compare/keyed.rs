//! Comparison of a keyed target: chunks of green's key, a checksum per chunk on each side, and
//! bisection of a chunk whose checksums differ down to small ranges, then to keys.
//!
//! Invariants: a chunk holds at most `chunk_rows` rows of each bounding relation (its upper
//! bound is the least of their `chunk_rows`-th keys), among them every relation staged into
//! green, so staging is bounded by the chunk size; rows are only ever read from ranges of at
//! most [`LEAF_ROWS`] rows per relation (or of one chunk, for a key held many times); ranges are
//! `(lo, hi]` in the key order both sides share, the last one open-ended, so together they
//! cover every key either side has; the statements of one step are all sent at once (pipelined
//! on each connection, blue and green working in parallel), and the next chunk's end and blue
//! rows are fetched while this chunk is summed.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use super::plan::{Ctx, Source};
use super::sql::{Params, Range, Rel, Side};
use super::{CompareError, Tally, db};

/// Parts a differing range is split into.
const FANOUT: u64 = 16;
/// A differing range with at most this many rows on every side is compared key by key.
const LEAF_ROWS: u64 = 64;
/// Splits before a range is compared key by key anyway (a key held many times cannot be
/// split; the range still holds at most a chunk).
const MAX_DEPTH: u32 = 8;

/// Rows and the sum of their row hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Sum {
    pub rows: u64,
    pub hash: i128,
}

impl Sum {
    fn add(self, o: Sum) -> Sum {
        Sum {
            rows: self.rows + o.rows,
            hash: self.hash.wrapping_add(o.hash),
        }
    }

    pub fn from_row(row: &Row) -> Sum {
        let rows: i64 = row.get(0);
        let hash: String = row.get(1);
        Sum {
            rows: rows.max(0) as u64,
            // A sum of bigints always fits: 2^63 rows of 2^63 each stay under 2^127.
            hash: hash.parse().unwrap_or_default(),
        }
    }
}

/// One range's sums: each relation's, in the order of [`Keyed::rels`] (the target last).
struct Sums(Vec<Sum>);

impl Sums {
    fn expected(&self) -> Sum {
        let n = self.0.len() - 1;
        self.0[..n].iter().fold(Sum::default(), |a, &b| a.add(b))
    }

    fn actual(&self) -> Sum {
        self.0[self.0.len() - 1]
    }

    fn equal(&self) -> bool {
        self.expected() == self.actual()
    }

    /// The relation with the most rows in the range, and how many.
    fn biggest(&self) -> (usize, u64) {
        self.0
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.rows))
            .max_by_key(|&(_, rows)| rows)
            .unwrap_or((0, 0))
    }
}

/// Runs each statement on its relation's server, all at once: tokio-postgres pipelines the
/// statements of one connection, and blue's and green's run in parallel.
pub(super) async fn run_all(
    cx: &Ctx<'_>,
    jobs: &[(&Rel, String, Vec<String>)],
    context: &'static str,
) -> Result<Vec<Vec<Row>>, CompareError> {
    futures_util::future::try_join_all(jobs.iter().map(|job| run_one(cx, job, context))).await
}

async fn run_one(
    cx: &Ctx<'_>,
    (rel, sql, params): &(&Rel, String, Vec<String>),
    context: &'static str,
) -> Result<Vec<Row>, CompareError> {
    let client = match rel.side {
        Side::Blue => cx.blue,
        Side::Green => cx.green,
    };
    let values: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let statement = cx
        .statements
        .get(client, rel.side, sql)
        .await
        .map_err(db(rel.side, &rel.label, context))?;
    client
        .query(&statement, &values)
        .await
        .map_err(db(rel.side, &rel.label, context))
}

/// Statements prepared on each side, by text: a comparison's statements differ from chunk to
/// chunk only in their parameters, so each is parsed once and then costs one round trip (a
/// text statement costs two, a parse and a plan each time).
#[derive(Default)]
pub(super) struct Statements(std::sync::Mutex<HashMap<(Side, String), Statement>>);

impl Statements {
    async fn get(
        &self,
        client: &tokio_postgres::Client,
        side: Side,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        let key = (side, sql.to_string());
        if let Some(s) = self.0.lock().expect("statements lock").get(&key) {
            return Ok(s.clone());
        }
        let prepared = client.prepare(sql).await?;
        self.0
            .lock()
            .expect("statements lock")
            .insert(key, prepared.clone());
        Ok(prepared)
    }
}

pub(super) struct Keyed<'a> {
    cx: &'a Ctx<'a>,
    sources: &'a [Source],
    /// Relations summed, in the order of [`Sums`]: the expected ones, then green's target.
    rels: Vec<&'a Rel>,
    /// For each expected relation, the blue relation with the hashes of its columns hashed on
    /// blue (a mapping staged into green stages only their XOR).
    companions: Vec<Option<&'a Rel>>,
    /// Relations whose keys bound a chunk: green's target, then those whose rows are staged or
    /// kept in green; when every source is hashed on blue, blue's alone, which leaves green
    /// only the sums to do (green's rows beyond the chunk size then, like blue's otherwise,
    /// only cost bisection, never memory).
    bounding: Vec<&'a Rel>,
    /// Blue's rows have one key each (see [`super::plan::unique_on_blue`]): a chunk of the
    /// first `n` rows then ends at a key, with no row of the same key left for the next.
    unique: bool,
}

impl<'a> Keyed<'a> {
    pub fn new(cx: &'a Ctx<'a>, sources: &'a [Source], target: &'a Rel, unique: bool) -> Keyed<'a> {
        let mut rels = Vec::new();
        let mut companions = Vec::new();
        let mut bounding = vec![target];
        for s in sources {
            match s {
                Source::Blue(r) => {
                    rels.push(r);
                    companions.push(None);
                }
                Source::Green(r, _) => {
                    rels.push(r);
                    companions.push(None);
                    bounding.push(r);
                }
                Source::Staged(s) => {
                    rels.push(&s.expected);
                    companions.push(Some(&s.blue));
                    bounding.push(&s.blue);
                }
            }
        }
        if sources.iter().all(|s| matches!(s, Source::Blue(_))) {
            bounding.remove(0);
            bounding.extend(rels.iter().copied());
        }
        rels.push(target);
        Keyed {
            cx,
            sources,
            rels,
            companions,
            bounding,
            unique,
        }
    }

    /// Compares chunk after chunk; `progress` hears each chunk's rows.
    pub async fn run(
        &self,
        chunk_rows: u64,
        diff: &mut Tally<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), CompareError> {
        let n = chunk_rows.max(1);
        if self.unique
            && self.rels.len() == 2
            && self.bounding.len() == 1
            && self.cx.shape.max_key()
        {
            return self.run_led(n, diff, progress).await;
        }
        let mut lo: Option<Vec<String>> = None;
        let mut hi = self.boundary(&lo, n).await?;
        let mut ahead = self.read_ahead(&Range {
            lo: None,
            hi: hi.clone(),
        });
        loop {
            let range = Range {
                lo: lo.clone(),
                hi: hi.clone(),
            };
            self.load(ahead.await?).await?;
            // While green sums this chunk, the next one's end is found and blue reads its rows.
            let next = async {
                let Some(h) = &hi else { return Ok(None) };
                let lo = Some(h.clone());
                let hi = self.boundary(&lo, n).await?;
                let rows = self.read_ahead(&Range { lo, hi: hi.clone() }).await?;
                Ok::<_, CompareError>(Some((hi, rows)))
            };
            let (next, sums) = tokio::join!(next, self.checksums(std::slice::from_ref(&range)));
            let sums = sums?.remove(0);
            let (e, a) = (sums.expected(), sums.actual());
            diff.diff.rows_blue += e.rows;
            diff.diff.rows_green += a.rows;
            diff.diff.chunks += 1;
            if !sums.equal() {
                self.bisect(range, sums, diff).await?;
            }
            progress(e.rows.max(a.rows));
            match (hi, next?) {
                (Some(h), Some((next_hi, rows))) => {
                    lo = Some(h);
                    hi = next_hi;
                    ahead = Box::pin(std::future::ready(Ok(rows)));
                }
                _ => return Ok(()),
            }
        }
    }

    /// [`Self::run`] for one relation hashed on blue with a simple key: blue reads each chunk
    /// once, finding its end and summing it at once ([`super::sql::Shape::lead`]), and sums
    /// the next chunk while green sums this one (green a chunk behind): each server reads its
    /// rows once, and both work all the time.
    async fn run_led(
        &self,
        n: u64,
        diff: &mut Tally<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), CompareError> {
        let (blue, target) = (self.rels[0], self.rels[1]);
        let mut lo: Option<Vec<String>> = None;
        let mut led = self.lead(blue, &lo, n).await?;
        loop {
            let range = Range {
                lo: lo.clone(),
                hi: led.1.clone(),
            };
            let next = async {
                match &range.hi {
                    Some(h) => Ok(Some(self.lead(blue, &Some(h.clone()), n).await?)),
                    None => Ok::<_, CompareError>(None),
                }
            };
            let actual = async {
                let mut p = Params::numbered();
                let sql = self.cx.shape.checksum(target, &range, &mut p);
                let rows = run_all(
                    self.cx,
                    &[(target, sql, p.values)],
                    "summing a range's row hashes",
                )
                .await?;
                Ok::<_, CompareError>(Sum::from_row(&rows[0][0]))
            };
            let (next, actual) = tokio::join!(next, actual);
            let sums = Sums(vec![led.0, actual?]);
            let (e, a) = (sums.expected(), sums.actual());
            diff.diff.rows_blue += e.rows;
            diff.diff.rows_green += a.rows;
            diff.diff.chunks += 1;
            if !sums.equal() {
                self.bisect(range.clone(), sums, diff).await?;
            }
            progress(e.rows.max(a.rows));
            match next? {
                Some(l) => {
                    lo = range.hi;
                    led = l;
                }
                None => return Ok(()),
            }
        }
    }

    /// Blue's sum of the first `n` rows after `lo`, and their last key: the chunk's end, or
    /// `None` when fewer than `n` are left (the last chunk is open-ended).
    async fn lead(
        &self,
        rel: &Rel,
        lo: &Option<Vec<String>>,
        n: u64,
    ) -> Result<(Sum, Option<Vec<String>>), CompareError> {
        let range = Range {
            lo: lo.clone(),
            hi: None,
        };
        let mut p = Params::numbered();
        let sql = self.cx.shape.lead(rel, &range, &mut p, n);
        let rows = run_all(self.cx, &[(rel, sql, p.values)], "summing a chunk").await?;
        let row = &rows[0][0];
        let sum = Sum::from_row(row);
        let last: Option<String> = row.get(2);
        Ok((sum, last.filter(|_| sum.rows >= n).map(|k| vec![k])))
    }

    /// The upper bound of the chunk after `lo`: the least `chunk_rows`-th key of the bounding
    /// relations (each asked within the bound found so far); `None` when none has that many.
    async fn boundary(
        &self,
        lo: &Option<Vec<String>>,
        chunk_rows: u64,
    ) -> Result<Option<Vec<String>>, CompareError> {
        let mut hi: Option<Vec<String>> = None;
        for rel in &self.bounding {
            let range = Range {
                lo: lo.clone(),
                hi: hi.clone(),
            };
            let mut p = Params::numbered();
            let sql = self.cx.shape.nth_key(rel, &range, &mut p, chunk_rows - 1);
            let rows = run_all(self.cx, &[(rel, sql, p.values)], "finding a chunk's end").await?;
            if let Some(row) = rows[0].first() {
                hi = Some(
                    (0..row.len())
                        .map(|k| row.get::<_, Option<String>>(k).unwrap_or_default())
                        .collect(),
                );
            }
        }
        Ok(hi)
    }

    /// Blue's rows of `range` for every mapping evaluated in green, read into memory.
    fn read_ahead(&self, range: &Range) -> BoxFuture<'_, Result<Vec<Blocks>, CompareError>> {
        let range = range.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            for s in self.sources {
                if let Source::Staged(s) = s {
                    out.push(super::stage::read(self.cx, &s.blue, &s.copy_select, &range).await?);
                }
            }
            Ok(out)
        })
    }

    /// Stages rows read ahead by [`Self::read_ahead`] into their staging tables.
    async fn load(&self, rows: Vec<Blocks>) -> Result<(), CompareError> {
        let staged = self.sources.iter().filter_map(|s| match s {
            Source::Staged(s) => Some(s),
            _ => None,
        });
        for (s, blocks) in staged.zip(rows) {
            super::stage::load(self.cx, &s.expected.label, &s.table, blocks).await?;
        }
        Ok(())
    }

    /// Every relation's sums over each of `ranges`.
    async fn checksums(&self, ranges: &[Range]) -> Result<Vec<Sums>, CompareError> {
        let mut jobs = Vec::with_capacity(ranges.len() * self.rels.len());
        for range in ranges {
            for rel in &self.rels {
                let mut p = Params::numbered();
                let sql = self.cx.shape.checksum(rel, range, &mut p);
                jobs.push((*rel, sql, p.values));
            }
        }
        let rows = run_all(self.cx, &jobs, "summing a range's row hashes").await?;
        let sums: Vec<Sum> = rows.iter().map(|r| Sum::from_row(&r[0])).collect();
        Ok(sums
            .chunks(self.rels.len())
            .map(|c| Sums(c.to_vec()))
            .collect())
    }

    /// Narrows a differing range: split by the keys of its biggest relation, sum each part,
    /// go on with the parts that differ; small parts are compared key by key.
    async fn bisect(
        &self,
        range: Range,
        sums: Sums,
        diff: &mut Tally<'_>,
    ) -> Result<(), CompareError> {
        let mut stack = vec![(range, sums, 0u32)];
        while let Some((range, sums, depth)) = stack.pop() {
            if sums.expected().rows == 0 || sums.actual().rows == 0 {
                self.one_sided(&range, &sums, diff).await?;
                continue;
            }
            let (biggest, rows) = sums.biggest();
            let parts = if rows <= LEAF_ROWS || depth >= MAX_DEPTH {
                Vec::new()
            } else {
                self.split(self.rels[biggest], &range, rows).await?
            };
            if parts.len() < 2 {
                self.leaf(&range, diff).await?;
                continue;
            }
            let part_sums = self.checksums(&parts).await?;
            // Pushed last to first, so that keys are reported in order.
            for (part, s) in parts.into_iter().zip(part_sums).rev() {
                if !s.equal() {
                    stack.push((part, s, depth + 1));
                }
            }
        }
        Ok(())
    }

    /// A differing range only one side has rows in: all of them are missing in green, or
    /// extra there; counted, and the first keys listed while there is room.
    async fn one_sided(
        &self,
        range: &Range,
        sums: &Sums,
        diff: &mut Tally<'_>,
    ) -> Result<(), CompareError> {
        let missing = sums.actual().rows == 0;
        let rows = if missing {
            sums.expected().rows
        } else {
            sums.actual().rows
        };
        let room = diff.room(missing);
        let mut keys = HashMap::new();
        if room > 0 {
            let last = self.rels.len() - 1;
            let jobs: Vec<_> = (0..self.rels.len())
                .filter(|&i| sums.0[i].rows > 0 && (i == last) != missing)
                .map(|i| {
                    let mut p = Params::numbered();
                    let sql = self.cx.shape.first_keys(self.rels[i], range, &mut p, room);
                    (self.rels[i], sql, p.values)
                })
                .collect();
            for rows in run_all(self.cx, &jobs, "listing a range's keys").await? {
                for row in rows {
                    let key: Key = (0..row.len()).map(|k| row.get(k)).collect();
                    keys.insert(key, ());
                }
            }
        }
        let shape = self.cx.shape;
        let listed = self
            .in_key_order(keys)
            .await?
            .into_iter()
            .take(room)
            .map(|(k, ())| key_label(&shape.names, &shape.key, &k))
            .collect();
        diff.bulk(missing, rows, listed);
        Ok(())
    }

    /// `range` in parts of about `rows / FANOUT` rows of `rel`.
    async fn split(&self, rel: &Rel, range: &Range, rows: u64) -> Result<Vec<Range>, CompareError> {
        let step = rows.div_ceil(FANOUT).max(1);
        let mut p = Params::numbered();
        let most = FANOUT as usize - 1;
        let sql = self.cx.shape.splits(rel, range, &mut p, step, most);
        let rows = run_all(self.cx, &[(rel, sql, p.values)], "splitting a range").await?;
        let mut parts = Vec::new();
        let mut lo = range.lo.clone();
        for row in &rows[0] {
            let key: Vec<String> = (0..row.len())
                .map(|k| row.get::<_, Option<String>>(k).unwrap_or_default())
                .collect();
            if range.hi.as_ref() == Some(&key) {
                break;
            }
            parts.push(Range {
                lo: lo.clone(),
                hi: Some(key.clone()),
            });
            lo = Some(key);
        }
        parts.push(Range {
            lo,
            hi: range.hi.clone(),
        });
        Ok(parts)
    }

    /// Compares `range` key by key: each key's column hashes on both sides.
    async fn leaf(&self, range: &Range, diff: &mut Tally<'_>) -> Result<(), CompareError> {
        let shape = self.cx.shape;
        let mut jobs = Vec::new();
        for (i, rel) in self.rels.iter().enumerate() {
            for r in std::iter::once(*rel).chain(self.companions.get(i).copied().flatten()) {
                let mut p = Params::numbered();
                let sql = shape.rows(r, range, &mut p);
                jobs.push((r, sql, p.values));
            }
        }
        let mut results = run_all(self.cx, &jobs, "reading a range's row hashes")
            .await?
            .into_iter();
        let nk = shape.key.len();
        let parse = |row: &Row| -> (Key, Hashes) {
            let key = (0..nk).map(|k| row.get(k)).collect();
            (key, (nk..row.len()).map(|c| row.get(c)).collect())
        };
        let mut by_key: HashMap<Key, (Vec<Hashes>, Vec<Hashes>)> = HashMap::new();
        for i in 0..self.rels.len() {
            let rows = results.next().unwrap_or_default();
            // The hashes of the columns blue hashed, by key, for the rows green computed.
            let blue: HashMap<Key, Hashes> = match self.companions.get(i).copied().flatten() {
                Some(_) => results
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(parse)
                    .collect(),
                None => HashMap::new(),
            };
            for row in &rows {
                let (key, mut hashes) = parse(row);
                if let Some(b) = blue.get(&key) {
                    hashes.iter_mut().zip(b).for_each(|(h, b)| *h ^= b);
                }
                let entry = by_key.entry(key).or_default();
                if i == self.rels.len() - 1 {
                    entry.1.push(hashes);
                } else {
                    entry.0.push(hashes);
                }
            }
        }
        by_key.retain(|_, (e, a)| e != a);
        for (key, (expected, actual)) in self.in_key_order(by_key).await? {
            let label = key_label(&shape.names, &shape.key, &key);
            for n in 0..expected.len().max(actual.len()) {
                match (expected.get(n), actual.get(n)) {
                    (Some(e), Some(a)) if e != a => {
                        let columns = (0..shape.names.len())
                            .filter(|&c| e[c] != a[c])
                            .map(|c| shape.names[c].clone())
                            .collect();
                        diff.differing(label.clone(), columns);
                    }
                    (Some(_), None) => diff.missing(label.clone()),
                    (None, Some(_)) => diff.extra(label.clone()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The differing keys of a leaf in key order (sorted by green, as ranges are).
    async fn in_key_order<V>(&self, keys: HashMap<Key, V>) -> Result<Vec<(Key, V)>, CompareError> {
        let mut keys: Vec<(Key, V)> = keys.into_iter().collect();
        if keys.len() < 2 {
            return Ok(keys);
        }
        let columns: Vec<Vec<Option<String>>> = (0..self.cx.shape.key.len())
            .map(|k| keys.iter().map(|(key, _)| key[k].clone()).collect())
            .collect();
        let values: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let target = self.rels[self.rels.len() - 1];
        let order: Vec<i64> = self
            .cx
            .green
            .query(&self.cx.shape.key_order(), &values)
            .await
            .map_err(db(Side::Green, &target.label, "ordering differing keys"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut slots: Vec<Option<(Key, V)>> = keys.drain(..).map(Some).collect();
        Ok(order
            .into_iter()
            .filter_map(|n| slots.get_mut((n - 1) as usize)?.take())
            .collect())
    }
}

/// One chunk's COPY text of one staged mapping.
type Blocks = Vec<bytes::Bytes>;
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A row's key: each key column's text (NULL only in a rule's computed key).
type Key = Vec<Option<String>>;
/// A row's column hashes, in the shape's order.
type Hashes = Vec<i64>;

/// `(a, b)=(1, x)`: the key as PostgreSQL prints one in its messages.
fn key_label(names: &[String], key: &[usize], values: &[Option<String>]) -> String {
    let names: Vec<&str> = key.iter().map(|&k| names[k].as_str()).collect();
    let values: Vec<&str> = values
        .iter()
        .map(|v| v.as_deref().unwrap_or("NULL"))
        .collect();
    format!("({})=({})", names.join(", "), values.join(", "))
}
