//! A batch: the row changes of one or more blue transactions, coalesced per key, waiting to be
//! written to green as a handful of set-based statements.
//!
//! Invariants:
//! - Applying a batch's ops (per table: deletes, then upserts, then partial updates) leaves each
//!   key in the state the last change for it in LSN order left it in blue: each key holds exactly
//!   one pending op, so the order between keys of one table does not matter.
//! - Keyless tables are never coalesced: their changes stay in arrival order, as runs.
//! - An unchanged-TOAST column (`Datum::UnchangedToast`) is never written: it is filled from an
//!   earlier full image of the same row in the batch, or the op stays a partial update that
//!   leaves green's value alone.
//! - Memory is counted as it arrives (`rows`, `bytes`), so the caller can flush before limits
//!   are passed, whatever the size of a blue transaction.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::decode::{Datum, OldTuple, Tuple};
use crate::transform::TableMap;

/// Values of a row's key columns (`TableMap::row_key`), as blue printed them.
pub type Key = Box<[Option<Bytes>]>;

/// The final pending change of one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyedOp {
    /// Full row image: insert, or overwrite.
    Upsert(Tuple),
    /// Row image with some `UnchangedToast` columns: update the others, keep green's values.
    Update(Tuple),
    /// Delete; the tuple carries at least the key columns.
    Delete(Tuple),
}

/// A key's pending op, with what conflict detection needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub op: KeyedOp,
    /// LSN of the change that left the key so (for errors).
    pub lsn: u64,
    /// Commit LSN of that change's blue transaction.
    pub commit_lsn: u64,
    /// Commit time of that change's blue transaction, in µs since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Whether green should hold the key before the batch: the key's first change in the batch
    /// was an update or a delete. An insert says blue had no such row.
    pub existed: bool,
}

impl KeyedOp {
    pub fn tuple(&self) -> &Tuple {
        match self {
            KeyedOp::Upsert(t) | KeyedOp::Update(t) | KeyedOp::Delete(t) => t,
        }
    }
}

/// Changes of a keyless table, kept in order as runs of one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum KeylessRun {
    Insert(Vec<Tuple>),
    /// Delete one row matching each full old image.
    Delete(Vec<Tuple>),
}

/// A primary-key change whose new image lacks unchanged-TOAST values: green must move the row
/// itself, keeping those values. The caller flushes the batch, then applies it alone.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMove {
    pub map: Arc<TableMap>,
    pub old_key: Tuple,
    pub new: Tuple,
    pub lsn: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error(
        "table {table}: key column {column} arrived as an unchanged TOAST value at LSN {lsn}, so the row cannot be identified; set REPLICA IDENTITY FULL on blue for this table"
    )]
    ToastedKey {
        table: String,
        column: String,
        lsn: String,
    },
    #[error(
        "table {table}: an update or delete at LSN {lsn} carries no old row, and green's table has no key to match it; set REPLICA IDENTITY FULL on blue or add a primary key on green"
    )]
    NoOldRow { table: String, lsn: String },
    #[error(
        "table {table}: a row at LSN {lsn} has {got} columns where the relation announced {expected}"
    )]
    Arity {
        table: String,
        lsn: String,
        got: usize,
        expected: usize,
    },
}

/// Pending changes of one target table.
#[derive(Debug)]
pub struct TableOps {
    pub map: Arc<TableMap>,
    /// Keyed tables: one op per key.
    pub ops: HashMap<Key, Pending>,
    /// Keyless tables: runs in arrival order.
    pub runs: Vec<KeylessRun>,
    /// Changes received, by operation (for metrics): insert, update, delete.
    pub counts: [u64; 3],
}

impl TableOps {
    fn new(map: Arc<TableMap>) -> Self {
        TableOps {
            map,
            ops: HashMap::new(),
            runs: Vec::new(),
            counts: [0; 3],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.runs.is_empty()
    }

    fn push_run(&mut self, insert: bool, t: Tuple) {
        match (self.runs.last_mut(), insert) {
            (Some(KeylessRun::Insert(v)), true) | (Some(KeylessRun::Delete(v)), false) => v.push(t),
            (_, true) => self.runs.push(KeylessRun::Insert(vec![t])),
            (_, false) => self.runs.push(KeylessRun::Delete(vec![t])),
        }
    }
}

/// Operation index in `TableOps::counts`.
pub const OP_INSERT: usize = 0;
pub const OP_UPDATE: usize = 1;
pub const OP_DELETE: usize = 2;
pub const OP_NAMES: [&str; 3] = ["insert", "update", "delete"];

/// Coalesced pending changes across tables, with memory accounting.
#[derive(Debug, Default)]
pub struct Batch {
    /// Pending ops of every segment, in segment order.
    tables: Vec<TableOps>,
    /// Target label -> index in `tables`, for the current segment only.
    by_target: HashMap<String, usize>,
    /// Index in `tables` where each segment after the first begins.
    segments: Vec<usize>,
    /// Tables that take no part in lookups (they read no table and no mapping reads them):
    /// their order against other tables does not matter, so they coalesce across segments.
    free: Vec<TableOps>,
    free_by_target: HashMap<String, usize>,
    /// Mappings whose rules read other tables (to tell which tables take part in lookups).
    readers: Vec<Arc<TableMap>>,
    /// Commit LSN and time of the blue transaction being received.
    txn: (u64, i64),
    /// Current segment: values of the source columns that pending readers' keyed lookups
    /// compare with another table's key, per (reader label, source column); `None` once a
    /// value was unknown (unchanged TOAST).
    lookup_values: HashMap<(String, usize), Option<HashSet<Bytes>>>,
    /// Row changes received since the last `take` (not after coalescing: a memory bound).
    pub rows: usize,
    /// Column payload bytes received since the last `take`.
    pub bytes: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(TableOps::is_empty) && self.free.iter().all(TableOps::is_empty)
    }

    /// Following changes belong to the blue transaction with this commit LSN and time.
    pub fn begin_txn(&mut self, commit_lsn: u64, commit_time: i64) {
        self.txn = (commit_lsn, commit_time);
    }

    /// The mappings whose rules read other tables; call when mappings change.
    pub fn set_readers(&mut self, readers: Vec<Arc<TableMap>>) {
        self.readers = readers;
    }

    /// Hands the pending ops over for writing and resets the accounting. Segments come in
    /// order; within one, tables come in first-touch order, except that a table whose rules read
    /// another table of the segment comes after it. A new segment starts whenever a read table
    /// changes behind a reader's back (see [`Batch::start_segment`]), so within a segment every
    /// change of a read table precedes every change of its readers.
    pub fn take(&mut self) -> Vec<TableOps> {
        self.by_target.clear();
        self.lookup_values.clear();
        self.rows = 0;
        self.bytes = 0;
        self.free_by_target.clear();
        let mut tables = std::mem::take(&mut self.tables);
        let free = std::mem::take(&mut self.free);
        let mut ordered = Vec::with_capacity(tables.len() + 1);
        for start in std::mem::take(&mut self.segments).into_iter().rev() {
            let later = tables.split_off(start.min(tables.len()));
            ordered.push(order_segment(later));
        }
        ordered.push(order_segment(tables));
        ordered.push(free);
        ordered.into_iter().rev().flatten().collect()
    }

    /// Whether a change of `changed`'s table with these keys (blue's text of its `plain_key`
    /// column; `None` when unknown) may alter what a pending reader of the current segment
    /// looks up: then the change must start a new segment, written after those readers.
    /// A reader whose lookups of the table are keyed (see `TableMap::keyed_lookups`) is only
    /// affected when it looked up one of these keys.
    pub fn affects_pending_reader(&self, changed: &TableMap, keys: &[Option<&[u8]>]) -> bool {
        let start = self.segments.last().copied().unwrap_or(0);
        let label = &changed.label;
        self.tables[start..]
            .iter()
            .filter(|t| !t.is_empty() && &t.map.label != label && t.map.reads_table(label))
            .any(|t| {
                let Some(lookups) = t.map.keyed_lookups_of(label) else {
                    return true;
                };
                let Some(pk) = changed.plain_key else {
                    return true;
                };
                let key_type = &changed.source_columns[pk].blue_type;
                lookups.iter().any(|l| {
                    if l.key != changed.columns[changed.key[0]].name
                        || &t.map.source_columns[l.column].blue_type != key_type
                        || !TEXT_EQUALITY.contains(&key_type.as_str())
                    {
                        return true;
                    }
                    match self.lookup_values.get(&(t.map.label.clone(), l.column)) {
                        Some(Some(values)) => {
                            keys.iter().any(|k| k.is_none_or(|k| values.contains(k)))
                        }
                        Some(None) => true,
                        None => false,
                    }
                })
            })
    }

    /// Records the values a reader's keyed lookups compare (see [`Self::affects_pending_reader`]).
    fn note_lookups(&mut self, map: &TableMap, t: &Tuple) {
        for l in &map.keyed_lookups {
            let entry = self
                .lookup_values
                .entry((map.label.clone(), l.column))
                .or_insert_with(|| Some(HashSet::new()));
            match (&t.0[l.column], entry.as_mut()) {
                (Datum::Text(b) | Datum::Binary(b), Some(set)) => {
                    set.insert(b.clone());
                }
                // A NULL equals no key.
                (Datum::Null, _) => {}
                (Datum::UnchangedToast, _) => *entry = None,
                (_, None) => {}
            }
        }
    }

    /// Later changes go into a new segment, written after everything pending (in the same
    /// round trip): what a flush would do, without waiting for green.
    pub fn start_segment(&mut self) {
        if self.segments.last() != Some(&self.tables.len()) && !self.tables.is_empty() {
            self.segments.push(self.tables.len());
        }
        self.by_target.clear();
        self.lookup_values.clear();
    }

    fn table(&mut self, map: &Arc<TableMap>) -> &mut TableOps {
        if map.reads.is_empty() && !self.readers.iter().any(|r| r.reads_table(&map.label)) {
            return entry(&mut self.free, &mut self.free_by_target, map);
        }
        entry(&mut self.tables, &mut self.by_target, map)
    }
}

/// The pending ops of `map`'s table in `tables`, added when missing.
fn entry<'a>(
    tables: &'a mut Vec<TableOps>,
    by_target: &mut HashMap<String, usize>,
    map: &Arc<TableMap>,
) -> &'a mut TableOps {
    {
        let idx = match by_target.get(&map.label) {
            // A relation re-described mid-batch (e.g. a column added) gets its own entry,
            // so one statement never mixes two row layouts.
            Some(&i) if Arc::ptr_eq(&tables[i].map, map) || *tables[i].map == **map => i,
            _ => {
                tables.push(TableOps::new(map.clone()));
                let i = tables.len() - 1;
                by_target.insert(map.label.clone(), i);
                i
            }
        };
        &mut tables[idx]
    }
}

impl Batch {
    fn account(&mut self, t: &Tuple) {
        self.rows += 1;
        self.bytes += t.payload_bytes() + 16 * t.0.len();
    }

    pub fn insert(&mut self, map: &Arc<TableMap>, new: Tuple, lsn: u64) -> Result<(), BatchError> {
        check_arity(map, &new, lsn)?;
        self.account(&new);
        if !map.keyed_lookups.is_empty() {
            self.note_lookups(map, &new);
        }
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_INSERT] += 1;
        if !map.is_keyed() {
            ops.push_run(true, new);
            return Ok(());
        }
        let key = key_of(map, &new, lsn)?;
        put(&mut ops.ops, key, KeyedOp::Upsert(new), lsn, txn, false);
        Ok(())
    }

    pub fn delete(
        &mut self,
        map: &Arc<TableMap>,
        old: OldTuple,
        lsn: u64,
    ) -> Result<(), BatchError> {
        let old = match old {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        };
        check_arity(map, &old, lsn)?;
        self.account(&old);
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_DELETE] += 1;
        if !map.is_keyed() {
            ops.push_run(false, old);
            return Ok(());
        }
        let key = key_of(map, &old, lsn)?;
        put(&mut ops.ops, key, KeyedOp::Delete(old), lsn, txn, true);
        Ok(())
    }

    /// Adds an update. Returns a [`RowMove`] when green must move a row itself (see there);
    /// the caller then flushes this batch and applies the move before anything else.
    pub fn update(
        &mut self,
        map: &Arc<TableMap>,
        old: Option<OldTuple>,
        mut new: Tuple,
        lsn: u64,
    ) -> Result<Option<RowMove>, BatchError> {
        check_arity(map, &new, lsn)?;
        self.account(&new);
        if !map.keyed_lookups.is_empty() {
            self.note_lookups(map, &new);
        }
        let (old_key_tuple, old_full) = match old {
            Some(OldTuple::Full(t)) => {
                check_arity(map, &t, lsn)?;
                (Some(t.clone()), Some(t))
            }
            Some(OldTuple::Key(t)) => {
                check_arity(map, &t, lsn)?;
                (Some(t), None)
            }
            None => (None, None),
        };
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_UPDATE] += 1;
        if !map.is_keyed() {
            // Keyless: delete one row equal to the old image, append the new one.
            let Some(old_full) = old_full else {
                return Err(BatchError::NoOldRow {
                    table: map.label.clone(),
                    lsn: crate::progress::format_lsn(lsn),
                });
            };
            fill_unchanged(&mut new, &old_full);
            ops.push_run(false, old_full);
            ops.push_run(true, new);
            return Ok(None);
        }
        // The old image (with FULL identity) completes unchanged-TOAST columns for free.
        if let Some(full) = &old_full {
            fill_unchanged(&mut new, full);
        }
        let new_key = key_of(map, &new, lsn)?;
        let old_key = match &old_key_tuple {
            Some(t) => Some(key_of(map, t, lsn)?),
            None => None,
        };
        let moved = old_key.as_ref().is_some_and(|k| *k != new_key);
        if moved {
            let old_key = old_key.expect("moved implies an old key");
            let prev = ops.ops.remove(&old_key);
            // Green held the old key before the batch unless the batch inserted it.
            let old_existed = prev.as_ref().is_none_or(|p| p.existed);
            if has_unchanged(&new) {
                match prev.as_ref().map(|p| &p.op) {
                    Some(KeyedOp::Upsert(p)) | Some(KeyedOp::Update(p)) => {
                        fill_unchanged(&mut new, p)
                    }
                    _ => {}
                }
            }
            if has_unchanged(&new) && map.completes_partial_rows() {
                // The rule needs the real values (filter, mixed columns): delete the old key
                // and leave a partial image for the new one, which is completed from blue.
                let old_tuple = old_key_tuple.expect("moved implies an old key");
                put_first(
                    &mut ops.ops,
                    old_key,
                    KeyedOp::Delete(old_tuple),
                    lsn,
                    txn,
                    old_existed,
                );
                put(&mut ops.ops, new_key, KeyedOp::Update(new), lsn, txn, false);
                return Ok(None);
            }
            if has_unchanged(&new) {
                // Green holds the only copy of the missing values: restore what was pending
                // for the old key (the caller flushes it first) and let green move the row.
                if let Some(p) = prev {
                    ops.ops.insert(old_key, p);
                }
                return Ok(Some(RowMove {
                    map: map.clone(),
                    old_key: old_key_tuple.expect("moved implies an old key"),
                    new,
                    lsn,
                }));
            }
            let old_tuple = old_key_tuple.expect("moved implies an old key");
            put_first(
                &mut ops.ops,
                old_key,
                KeyedOp::Delete(old_tuple),
                lsn,
                txn,
                old_existed,
            );
            put(&mut ops.ops, new_key, KeyedOp::Upsert(new), lsn, txn, false);
            return Ok(None);
        }
        let pending = match ops.ops.entry(new_key) {
            Entry::Vacant(v) => v.insert(Pending {
                op: KeyedOp::Update(Tuple::default()),
                lsn,
                commit_lsn: txn.0,
                commit_time: txn.1,
                existed: true,
            }),
            Entry::Occupied(o) => o.into_mut(),
        };
        pending.lsn = lsn;
        (pending.commit_lsn, pending.commit_time) = txn;
        let op = &mut pending.op;
        let merged = match std::mem::replace(op, KeyedOp::Update(Tuple::default())) {
            KeyedOp::Upsert(prev) => {
                fill_unchanged(&mut new, &prev);
                new
            }
            KeyedOp::Update(prev) if !prev.0.is_empty() => {
                fill_unchanged(&mut new, &prev);
                new
            }
            _ => new,
        };
        *op = if has_unchanged(&merged) {
            KeyedOp::Update(merged)
        } else {
            KeyedOp::Upsert(merged)
        };
        Ok(None)
    }
}

/// Sets a key's pending op; a key already pending keeps its `existed` (from its first change).
fn put(
    ops: &mut HashMap<Key, Pending>,
    key: Key,
    op: KeyedOp,
    lsn: u64,
    txn: (u64, i64),
    existed: bool,
) {
    match ops.entry(key) {
        Entry::Occupied(o) => {
            let p = o.into_mut();
            p.op = op;
            p.lsn = lsn;
            (p.commit_lsn, p.commit_time) = txn;
        }
        Entry::Vacant(v) => {
            v.insert(Pending {
                op,
                lsn,
                commit_lsn: txn.0,
                commit_time: txn.1,
                existed,
            });
        }
    }
}

/// Sets a key's pending op with `existed` as given (the key was just removed).
fn put_first(
    ops: &mut HashMap<Key, Pending>,
    key: Key,
    op: KeyedOp,
    lsn: u64,
    txn: (u64, i64),
    existed: bool,
) {
    ops.remove(&key);
    put(ops, key, op, lsn, txn, existed);
}

/// Key types whose text form is canonical (equal values print alike, on both servers), so that
/// keys can be compared as blue printed them. Not text types: green's collation (possibly
/// nondeterministic) decides their equality in the lookup.
const TEXT_EQUALITY: [&str; 4] = ["smallint", "integer", "bigint", "uuid"];

/// A segment's tables, each after the tables of the segment it reads (first-touch order
/// otherwise; a cycle of lookups falls back to first-touch order).
fn order_segment(mut pending: Vec<TableOps>) -> Vec<TableOps> {
    let mut ordered = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let next = (0..pending.len())
            .find(|&i| {
                !pending
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && pending[i].map.reads_table(&o.map.label))
            })
            .unwrap_or(0);
        ordered.push(pending.remove(next));
    }
    ordered
}

fn check_arity(map: &TableMap, t: &Tuple, lsn: u64) -> Result<(), BatchError> {
    if t.0.len() != map.source_columns.len() {
        return Err(BatchError::Arity {
            table: map.label.clone(),
            lsn: crate::progress::format_lsn(lsn),
            got: t.0.len(),
            expected: map.source_columns.len(),
        });
    }
    Ok(())
}

/// Key of a row image; `None` entries are SQL NULLs (possible only in a keyless mapping).
pub fn key_of(map: &TableMap, t: &Tuple, lsn: u64) -> Result<Key, BatchError> {
    map.row_key
        .iter()
        .map(|&i| match &t.0[i] {
            Datum::Null => Ok(None),
            Datum::Text(b) | Datum::Binary(b) => Ok(Some(b.clone())),
            Datum::UnchangedToast => Err(BatchError::ToastedKey {
                table: map.label.clone(),
                column: map.source_columns[i].name.clone(),
                lsn: crate::progress::format_lsn(lsn),
            }),
        })
        .collect()
}

fn has_unchanged(t: &Tuple) -> bool {
    t.0.iter().any(|d| matches!(d, Datum::UnchangedToast))
}

/// Replaces each unchanged-TOAST datum of `new` with `from`'s value for that column.
fn fill_unchanged(new: &mut Tuple, from: &Tuple) {
    for (d, f) in new.0.iter_mut().zip(from.0.iter()) {
        if matches!(d, Datum::UnchangedToast) {
            *d = f.clone();
        }
    }
}

/// Which columns of a partial image are unchanged TOAST (bit i = column i), for grouping
/// partial updates that can share one statement. Tables wider than 128 columns share a mask
/// per distinct pattern anyway: the caller groups by the full vector.
pub fn unchanged_mask(t: &Tuple) -> Vec<bool> {
    t.0.iter()
        .map(|d| matches!(d, Datum::UnchangedToast))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ReplicaIdentity;
    use crate::transform::{QualifiedName, SourceColumn, TargetColumn};

    fn map(keyed: bool) -> Arc<TableMap> {
        let cols = ["id", "a", "big"];
        Arc::new(TableMap {
            source: QualifiedName::new("public", "t"),
            target: QualifiedName::new("public", "t"),
            source_columns: cols
                .iter()
                .map(|c| SourceColumn {
                    name: c.to_string(),
                    sql_type: "text".into(),
                    blue_type: "bigint".into(),
                })
                .collect(),
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, c)| TargetColumn {
                    name: c.to_string(),
                    sql_type: "text".into(),
                    base_type: "text".into(),
                    expr: format!("src.\"{c}\""),
                    inputs: vec![i],
                })
                .collect(),
            key: if keyed { vec![0] } else { vec![] },
            row_key: if keyed { vec![0] } else { vec![] },
            replica_identity: if keyed {
                ReplicaIdentity::Default
            } else {
                ReplicaIdentity::Full
            },
            label: "public.t".into(),
            filter: None,
            reads: vec![],
            origin: None,
            conflicts: crate::transform::ConflictPolicy::Off,
            keyed_lookups: vec![],
            plain_key: None,
        })
    }

    fn t(vals: &[Option<&str>]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    Some("<u>") => Datum::UnchangedToast,
                    Some(s) => Datum::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Datum::Null,
                })
                .collect(),
        )
    }

    fn key(s: &str) -> Key {
        vec![Some(Bytes::copy_from_slice(s.as_bytes()))].into_boxed_slice()
    }

    fn only_table(b: &mut Batch) -> TableOps {
        let mut tables = b.take();
        assert_eq!(tables.len(), 1);
        tables.pop().unwrap()
    }

    #[test]
    fn insert_then_update_coalesces_to_one_upsert() {
        let m = map(true);
        let mut b = Batch::default();
        b.insert(&m, t(&[Some("1"), Some("x"), Some("big")]), 10)
            .unwrap();
        b.update(&m, None, t(&[Some("1"), Some("y"), Some("<u>")]), 20)
            .unwrap();
        assert_eq!(b.rows, 2);
        let ops = only_table(&mut b);
        assert_eq!(
            ops.ops[&key("1")].op,
            KeyedOp::Upsert(t(&[Some("1"), Some("y"), Some("big")]))
        );
        assert_eq!(ops.counts, [1, 1, 0]);
    }

    #[test]
    fn existed_follows_each_key_s_first_change_and_commit_follows_its_last() {
        let m = map(true);
        let mut b = Batch::default();
        b.begin_txn(100, 7);
        b.insert(&m, t(&[Some("1"), Some("x"), Some("a")]), 10)
            .unwrap();
        b.update(&m, None, t(&[Some("2"), Some("x"), Some("a")]), 11)
            .unwrap();
        b.delete(&m, OldTuple::Key(t(&[Some("3"), None, None])), 12)
            .unwrap();
        b.begin_txn(200, 8);
        b.delete(&m, OldTuple::Key(t(&[Some("1"), None, None])), 20)
            .unwrap();
        b.insert(&m, t(&[Some("3"), Some("y"), Some("b")]), 21)
            .unwrap();
        // A key change: the old key existed, the new one did not.
        b.update(
            &m,
            Some(OldTuple::Key(t(&[Some("2"), None, None]))),
            t(&[Some("4"), Some("z"), Some("c")]),
            22,
        )
        .unwrap();
        let ops = only_table(&mut b);
        let seen = |k: &str| {
            let p = &ops.ops[&key(k)];
            (p.existed, p.commit_lsn, p.commit_time)
        };
        assert_eq!(seen("1"), (false, 200, 8));
        assert_eq!(seen("2"), (true, 200, 8));
        assert_eq!(seen("3"), (true, 200, 8));
        assert_eq!(seen("4"), (false, 200, 8));
    }

    #[test]
    fn unchanged_toast_without_earlier_image_stays_partial() {
        let m = map(true);
        let mut b = Batch::default();
        b.update(&m, None, t(&[Some("1"), Some("y"), Some("<u>")]), 20)
            .unwrap();
        b.update(&m, None, t(&[Some("1"), Some("z"), Some("<u>")]), 30)
            .unwrap();
        let ops = only_table(&mut b);
        assert_eq!(
            ops.ops[&key("1")].op,
            KeyedOp::Update(t(&[Some("1"), Some("z"), Some("<u>")]))
        );
    }

    #[test]
    fn partial_then_full_update_becomes_upsert() {
        let m = map(true);
        let mut b = Batch::default();
        b.update(&m, None, t(&[Some("1"), Some("y"), Some("<u>")]), 20)
            .unwrap();
        b.update(&m, None, t(&[Some("1"), Some("z"), Some("new")]), 30)
            .unwrap();
        let ops = only_table(&mut b);
        assert_eq!(
            ops.ops[&key("1")].op,
            KeyedOp::Upsert(t(&[Some("1"), Some("z"), Some("new")]))
        );
    }

    #[test]
    fn delete_wins_and_reinsert_wins_over_delete() {
        let m = map(true);
        let mut b = Batch::default();
        b.insert(&m, t(&[Some("1"), Some("x"), None]), 1).unwrap();
        b.delete(&m, OldTuple::Key(t(&[Some("1"), None, None])), 2)
            .unwrap();
        b.insert(&m, t(&[Some("2"), Some("x"), None]), 3).unwrap();
        b.delete(&m, OldTuple::Key(t(&[Some("2"), None, None])), 4)
            .unwrap();
        b.insert(&m, t(&[Some("2"), Some("again"), None]), 5)
            .unwrap();
        let ops = only_table(&mut b);
        assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Delete(_)));
        assert_eq!(
            ops.ops[&key("2")].op,
            KeyedOp::Upsert(t(&[Some("2"), Some("again"), None]))
        );
    }

    #[test]
    fn key_change_moves_the_row() {
        let m = map(true);
        let mut b = Batch::default();
        let mv = b
            .update(
                &m,
                Some(OldTuple::Key(t(&[Some("1"), None, None]))),
                t(&[Some("2"), Some("x"), Some("v")]),
                5,
            )
            .unwrap();
        assert!(mv.is_none());
        let ops = only_table(&mut b);
        assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Delete(_)));
        assert!(matches!(ops.ops[&key("2")].op, KeyedOp::Upsert(_)));
    }

    #[test]
    fn key_swap_through_a_third_key_ends_right() {
        let m = map(true);
        let mut b = Batch::default();
        let k = |s: &str| Some(OldTuple::Key(t(&[Some(s), None, None])));
        b.update(&m, k("1"), t(&[Some("3"), Some("one"), None]), 1)
            .unwrap();
        b.update(&m, k("2"), t(&[Some("1"), Some("two"), None]), 2)
            .unwrap();
        b.update(&m, k("3"), t(&[Some("2"), Some("one"), None]), 3)
            .unwrap();
        let ops = only_table(&mut b);
        assert!(matches!(ops.ops[&key("3")].op, KeyedOp::Delete(_)));
        assert_eq!(
            ops.ops[&key("1")].op,
            KeyedOp::Upsert(t(&[Some("1"), Some("two"), None]))
        );
        assert_eq!(
            ops.ops[&key("2")].op,
            KeyedOp::Upsert(t(&[Some("2"), Some("one"), None]))
        );
    }

    #[test]
    fn key_change_with_unchanged_toast_asks_green_to_move_the_row() {
        let m = map(true);
        let mut b = Batch::default();
        b.update(&m, None, t(&[Some("1"), Some("y"), Some("<u>")]), 1)
            .unwrap();
        let mv = b
            .update(
                &m,
                Some(OldTuple::Key(t(&[Some("1"), None, None]))),
                t(&[Some("2"), Some("x"), Some("<u>")]),
                5,
            )
            .unwrap()
            .expect("a move");
        assert_eq!(mv.lsn, 5);
        // The pending partial update of key 1 is still there, to be flushed before the move.
        let ops = only_table(&mut b);
        assert!(matches!(ops.ops[&key("1")].op, KeyedOp::Update(_)));
    }

    #[test]
    fn key_change_with_unchanged_toast_known_in_batch_is_an_upsert() {
        let m = map(true);
        let mut b = Batch::default();
        b.insert(&m, t(&[Some("1"), Some("x"), Some("big")]), 1)
            .unwrap();
        let mv = b
            .update(
                &m,
                Some(OldTuple::Key(t(&[Some("1"), None, None]))),
                t(&[Some("2"), Some("x"), Some("<u>")]),
                5,
            )
            .unwrap();
        assert!(mv.is_none());
        let ops = only_table(&mut b);
        assert_eq!(
            ops.ops[&key("2")].op,
            KeyedOp::Upsert(t(&[Some("2"), Some("x"), Some("big")]))
        );
    }

    #[test]
    fn keyless_changes_stay_in_order_as_runs() {
        let m = map(false);
        let mut b = Batch::default();
        b.insert(&m, t(&[Some("1"), Some("x"), None]), 1).unwrap();
        b.insert(&m, t(&[Some("1"), Some("x"), None]), 2).unwrap();
        b.update(
            &m,
            Some(OldTuple::Full(t(&[Some("1"), Some("x"), Some("big")]))),
            t(&[Some("1"), Some("y"), Some("<u>")]),
            3,
        )
        .unwrap();
        b.delete(&m, OldTuple::Full(t(&[Some("1"), Some("x"), None])), 4)
            .unwrap();
        let ops = only_table(&mut b);
        assert_eq!(
            ops.runs,
            vec![
                KeylessRun::Insert(vec![t(&[Some("1"), Some("x"), None]); 2]),
                KeylessRun::Delete(vec![t(&[Some("1"), Some("x"), Some("big")])]),
                KeylessRun::Insert(vec![t(&[Some("1"), Some("y"), Some("big")])]),
                KeylessRun::Delete(vec![t(&[Some("1"), Some("x"), None])]),
            ]
        );
    }

    #[test]
    fn a_lookup_barrier_starts_a_segment_written_in_order() {
        let users = map(true);
        let mut vms = (*map(true)).clone();
        vms.label = "public.vms".into();
        vms.reads = vec![vec!["t".into()]];
        let vms = Arc::new(vms);
        let mut free = (*map(true)).clone();
        free.label = "public.free".into();
        let free = Arc::new(free);
        let mut b = Batch::default();
        b.set_readers(vec![vms.clone()]);
        b.insert(&free, t(&[Some("1"), Some("f"), None]), 1)
            .unwrap();
        b.insert(&vms, t(&[Some("1"), Some("vm"), None]), 2)
            .unwrap();
        assert!(
            b.affects_pending_reader(&users, &[Some(b"9")]),
            "vms reads public.t (not keyed)"
        );
        b.start_segment();
        b.insert(&users, t(&[Some("9"), Some("u"), None]), 3)
            .unwrap();
        b.insert(&vms, t(&[Some("2"), Some("vm"), None]), 4)
            .unwrap();
        b.insert(&free, t(&[Some("2"), Some("f"), None]), 5)
            .unwrap();
        assert!(
            b.affects_pending_reader(&users, &[Some(b"9")]),
            "a later users change would need yet another segment"
        );
        let taken = b.take();
        let labels: Vec<&str> = taken.iter().map(|o| o.map.label.as_str()).collect();
        // A table outside lookups coalesces across segments (one entry, first); then segment
        // 1: vms; segment 2: users (read) before vms (reader).
        assert_eq!(
            labels,
            ["public.free", "public.vms", "public.t", "public.vms"]
        );
        assert_eq!(taken[0].ops.len(), 2);
    }

    #[test]
    fn keyed_lookups_split_only_for_keys_a_pending_reader_looked_up() {
        let mut users = (*map(true)).clone();
        users.plain_key = Some(0);
        let users = Arc::new(users);
        let mut vms = (*map(true)).clone();
        vms.label = "public.vms".into();
        vms.reads = vec![vec!["t".into()]];
        vms.keyed_lookups = vec![crate::transform::KeyedLookup {
            relation: vec!["t".into()],
            key: "id".into(),
            column: 1,
        }];
        let vms = Arc::new(vms);
        let mut b = Batch::default();
        b.set_readers(vec![vms.clone()]);
        b.insert(&vms, t(&[Some("1"), Some("5"), None]), 1).unwrap();
        assert!(
            !b.affects_pending_reader(&users, &[Some(b"9")]),
            "a new user 9"
        );
        assert!(
            b.affects_pending_reader(&users, &[Some(b"5")]),
            "user 5 was looked up"
        );
        assert!(b.affects_pending_reader(&users, &[None]), "an unknown key");
        b.update(&vms, None, t(&[Some("1"), Some("<u>"), None]), 2)
            .unwrap();
        assert!(
            b.affects_pending_reader(&users, &[Some(b"9")]),
            "a looked-up value is unknown"
        );
        b.start_segment();
        assert!(
            !b.affects_pending_reader(&users, &[Some(b"5")]),
            "a new segment"
        );
        // A key that is not copied verbatim cannot be compared.
        let mut computed = (*users).clone();
        computed.plain_key = None;
        b.insert(&vms, t(&[Some("2"), Some("7"), None]), 3).unwrap();
        assert!(b.affects_pending_reader(&computed, &[Some(b"9")]));
    }

    #[test]
    fn keyless_update_without_old_row_is_a_clear_error() {
        let m = map(false);
        let mut b = Batch::default();
        let err = b
            .update(&m, None, t(&[Some("1"), None, None]), 0x10)
            .unwrap_err();
        assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");
    }

    #[test]
    fn toasted_key_is_a_clear_error() {
        let m = map(true);
        let mut b = Batch::default();
        let err = b
            .update(&m, None, t(&[Some("<u>"), None, None]), 0x10)
            .unwrap_err();
        assert!(err.to_string().contains("key column id"), "{err}");
    }
}
