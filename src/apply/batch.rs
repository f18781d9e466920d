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
use crate::lsn::Lsn;
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
    pub lsn: Lsn,
    /// Commit LSN of that change's blue transaction.
    pub commit_lsn: Lsn,
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
    Delete(Vec<OldRow>),
}

/// The full old image of a keyless table's row, with what a conflict record of it needs when
/// green holds no such row.
#[derive(Debug, Clone, PartialEq)]
pub struct OldRow {
    pub tuple: Tuple,
    /// The image is an update's (else a delete's).
    pub update: bool,
    pub commit_lsn: Lsn,
    pub commit_time: i64,
}

/// A primary-key change whose new image lacks unchanged-TOAST values: green must move the row
/// itself, keeping those values. The caller flushes the batch, then applies it alone.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMove {
    pub map: Arc<TableMap>,
    pub old_key: Tuple,
    pub new: Tuple,
    pub lsn: Lsn,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error(
        "table {table}: key column {column} arrived as an unchanged TOAST value at LSN {lsn}, so the row cannot be identified; set REPLICA IDENTITY FULL on blue for this table"
    )]
    ToastedKey {
        table: String,
        column: String,
        lsn: Lsn,
    },
    #[error(
        "table {table}: an update or delete at LSN {lsn} carries no old row, and green's table has no key to match it; set REPLICA IDENTITY FULL on blue or add a primary key on green"
    )]
    NoOldRow { table: String, lsn: Lsn },
    #[error(
        "table {table}: blue sent an update or delete at LSN {lsn} while it describes the table without a replica identity (no primary key, REPLICA IDENTITY NOTHING), so the row cannot be found on green; blue itself refuses such changes on a published table, so this should not happen, except for a partitioned table published through its root whose key is on its partitions only (blue checks the partition): add the primary key on the partitioned table itself; otherwise report it, with the table's recent ALTER TABLE history. Nothing from this transaction on was applied or confirmed"
    )]
    NoIdentity { table: String, lsn: Lsn },
    #[error(
        "table {table}: blue inserted key {key} a second time at LSN {lsn}, while it describes the table without a replica identity (no primary key yet); green's key holds each key once, so green cannot hold what blue does: remove the duplicate on blue and add the primary key there, or drop green's key; nothing from this transaction on was applied or confirmed"
    )]
    DuplicateWithoutIdentity {
        table: String,
        key: String,
        lsn: Lsn,
    },
    #[error(
        "table {table}: a row at LSN {lsn} has {got} columns where the relation announced {expected}"
    )]
    Arity {
        table: String,
        lsn: Lsn,
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
    fn new(map: Arc<TableMap>, keys: usize) -> Self {
        TableOps {
            map,
            ops: HashMap::with_capacity(keys),
            runs: Vec::new(),
            counts: [0; 3],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.runs.is_empty()
    }

    fn push_insert(&mut self, t: Tuple) {
        match self.runs.last_mut() {
            Some(KeylessRun::Insert(v)) => v.push(t),
            _ => self.runs.push(KeylessRun::Insert(vec![t])),
        }
    }

    fn push_delete(&mut self, old: OldRow) {
        match self.runs.last_mut() {
            Some(KeylessRun::Delete(v)) => v.push(old),
            _ => self.runs.push(KeylessRun::Delete(vec![old])),
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
    txn: (Lsn, i64),
    /// Current segment: values of the source columns that pending readers' keyed lookups
    /// compare with another table's key, per (reader label, source column); `None` once a
    /// value was unknown (unchanged TOAST).
    /// Keyed by reader label, then source column.
    lookup_values: HashMap<String, HashMap<usize, Option<HashSet<Bytes>>>>,
    /// Keys each table held in the last batch handed over: a new batch's map starts that
    /// large, so filling it rehashes no key (hashing is much of the cost of coalescing).
    sizes: HashMap<String, usize>,
    /// Where the previous change went: (a free table, index in `free` or `tables`).
    last: Option<(bool, usize)>,
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
    pub fn begin_txn(&mut self, commit_lsn: Lsn, commit_time: i64) {
        self.txn = (commit_lsn, commit_time);
    }

    /// The mappings whose rules read other tables; call when mappings change.
    pub fn set_readers(&mut self, readers: Vec<Arc<TableMap>>) {
        self.readers = readers;
        self.last = None;
    }

    /// Hands the pending ops over for writing and resets the accounting. Segments come in
    /// order; within one, tables come in first-touch order, except that a table whose rules read
    /// another table of the segment comes after it. A new segment starts whenever a read table
    /// changes behind a reader's back (see [`Batch::start_segment`]), so within a segment every
    /// change of a read table precedes every change of its readers.
    pub fn take(&mut self) -> Vec<TableOps> {
        self.last = None;
        self.by_target.clear();
        self.lookup_values.clear();
        self.rows = 0;
        self.bytes = 0;
        self.free_by_target.clear();
        let mut tables = std::mem::take(&mut self.tables);
        let free = std::mem::take(&mut self.free);
        for t in tables.iter().chain(&free) {
            if t.map.is_keyed() {
                self.sizes.insert(t.map.label.clone(), t.ops.len());
            }
        }
        let mut ordered = Vec::with_capacity(tables.len() + 1);
        for start in std::mem::take(&mut self.segments).into_iter().rev() {
            let later = tables.split_off(start.min(tables.len()));
            ordered.push(order_segment(later));
        }
        ordered.push(order_segment(tables));
        ordered.push(free);
        ordered.into_iter().rev().flatten().collect()
    }

    /// Whether a change of `changed`'s table with these row images (old and new; their keys
    /// are blue's text of its `plain_key` column) may alter what a pending reader of the
    /// current segment looks up: then the change must start a new segment, written after
    /// those readers. A reader whose lookups of the table are keyed (see
    /// `TableMap::keyed_lookups`) is only affected when it looked up one of these keys.
    pub fn affects_pending_reader(&self, changed: &TableMap, images: &[Option<&Tuple>]) -> bool {
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
                    let looked_up = self
                        .lookup_values
                        .get(&t.map.label)
                        .and_then(|columns| columns.get(&l.column));
                    match looked_up {
                        Some(Some(values)) => {
                            images.iter().flatten().any(|image| match &image.0[pk] {
                                Datum::Text(b) | Datum::Binary(b) => values.contains(b),
                                Datum::Null | Datum::UnchangedToast => true,
                            })
                        }
                        Some(None) => true,
                        None => false,
                    }
                })
            })
    }

    /// Records the values a reader's keyed lookups compare (see [`Self::affects_pending_reader`]).
    fn note_lookups(&mut self, map: &TableMap, t: &Tuple) {
        // Looked up by reference: the label is cloned once per segment, not per row.
        if !self.lookup_values.contains_key(&map.label) {
            self.lookup_values.insert(map.label.clone(), HashMap::new());
        }
        let columns = self
            .lookup_values
            .get_mut(&map.label)
            .expect("inserted above");
        for l in &map.keyed_lookups {
            let entry = columns
                .entry(l.column)
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
        self.last = None;
    }

    fn table(&mut self, map: &Arc<TableMap>) -> &mut TableOps {
        // Runs of changes to one table are the common case: the table of the previous change
        // is found without hashing its label.
        let start = self.segments.last().copied().unwrap_or(0);
        match self.last {
            Some((true, i)) if i < self.free.len() && Arc::ptr_eq(&self.free[i].map, map) => {
                return &mut self.free[i];
            }
            Some((false, i))
                if i >= start && i < self.tables.len() && Arc::ptr_eq(&self.tables[i].map, map) =>
            {
                return &mut self.tables[i];
            }
            _ => {}
        }
        let free = map.reads.is_empty() && !self.readers.iter().any(|r| r.reads_table(&map.label));
        let (tables, by_target) = if free {
            (&mut self.free, &mut self.free_by_target)
        } else {
            (&mut self.tables, &mut self.by_target)
        };
        let i = entry(tables, by_target, map, &self.sizes);
        self.last = Some((free, i));
        &mut tables[i]
    }
}

/// Index of the pending ops of `map`'s table in `tables`, added when missing (sized as the
/// table's last batch, from `sizes`).
fn entry(
    tables: &mut Vec<TableOps>,
    by_target: &mut HashMap<String, usize>,
    map: &Arc<TableMap>,
    sizes: &HashMap<String, usize>,
) -> usize {
    match by_target.get(&map.label) {
        Some(&i) if Arc::ptr_eq(&tables[i].map, map) => i,
        // The same description sent again (blue resends a relation after invalidations): keep
        // the entry, under the new mapping, so that later changes find it by pointer again.
        Some(&i) if *tables[i].map == **map => {
            tables[i].map = map.clone();
            i
        }
        // A relation re-described mid-batch (e.g. a column added) gets its own entry,
        // so one statement never mixes two row layouts.
        _ => {
            let keys = if map.is_keyed() {
                sizes.get(&map.label).copied().unwrap_or(0)
            } else {
                0
            };
            tables.push(TableOps::new(map.clone(), keys));
            let i = tables.len() - 1;
            by_target.insert(map.label.clone(), i);
            i
        }
    }
}

impl Batch {
    fn account(&mut self, t: &Tuple) {
        self.rows += 1;
        self.bytes += tuple_bytes(t);
    }

    pub fn insert(&mut self, map: &Arc<TableMap>, new: Tuple, lsn: Lsn) -> Result<(), BatchError> {
        check_arity(map, &new, lsn)?;
        self.account(&new);
        if !map.keyed_lookups.is_empty() {
            self.note_lookups(map, &new);
        }
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_INSERT] += 1;
        if !map.is_keyed() {
            ops.push_insert(new);
            return Ok(());
        }
        let key = key_of(map, &new, lsn)?;
        // Without an identity blue may hold a key twice; green's key cannot, and coalescing
        // would keep one row without a trace (see `TableMap::awaits_identity`).
        if map.awaits_identity && ops.ops.contains_key(&key) {
            return Err(BatchError::DuplicateWithoutIdentity {
                table: map.label.clone(),
                key: key_text(map, &key),
                lsn,
            });
        }
        put(&mut ops.ops, key, KeyedOp::Upsert(new), lsn, txn, false);
        Ok(())
    }

    pub fn delete(
        &mut self,
        map: &Arc<TableMap>,
        old: OldTuple,
        lsn: Lsn,
    ) -> Result<(), BatchError> {
        let old = match old {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        };
        no_identity_check(map, lsn)?;
        check_arity(map, &old, lsn)?;
        self.account(&old);
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_DELETE] += 1;
        if !map.is_keyed() {
            ops.push_delete(OldRow {
                tuple: old,
                update: false,
                commit_lsn: txn.0,
                commit_time: txn.1,
            });
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
        lsn: Lsn,
    ) -> Result<Option<RowMove>, BatchError> {
        no_identity_check(map, lsn)?;
        check_arity(map, &new, lsn)?;
        self.account(&new);
        if !map.keyed_lookups.is_empty() {
            self.note_lookups(map, &new);
        }
        let (old_key_tuple, old_full) = old_images(map, old, lsn)?;
        let txn = self.txn;
        let ops = self.table(map);
        ops.counts[OP_UPDATE] += 1;
        if !map.is_keyed() {
            update_keyless(ops, map, old_full, new, lsn, txn)?;
            return Ok(None);
        }
        // The old image (with FULL identity) completes unchanged-TOAST columns for free.
        if let Some(full) = &old_full {
            fill_unchanged(&mut new, full);
        }
        let new_key = key_of(map, &new, lsn)?;
        let old = match old_key_tuple {
            Some(t) => Some((key_of(map, &t, lsn)?, t)),
            None => None,
        };
        match old {
            Some(old) if old.0 != new_key => {
                Ok(update_moved(ops, map, old, new_key, new, lsn, txn))
            }
            _ => {
                update_in_place(&mut ops.ops, new_key, new, lsn, txn);
                Ok(None)
            }
        }
    }
}

/// An update's old image, checked: (the tuple its old key is read from, the full old row when
/// blue sent one).
fn old_images(
    map: &TableMap,
    old: Option<OldTuple>,
    lsn: Lsn,
) -> Result<(Option<Tuple>, Option<Tuple>), BatchError> {
    match old {
        Some(OldTuple::Full(t)) => {
            check_arity(map, &t, lsn)?;
            Ok((Some(t.clone()), Some(t)))
        }
        Some(OldTuple::Key(t)) => {
            check_arity(map, &t, lsn)?;
            Ok((Some(t), None))
        }
        None => Ok((None, None)),
    }
}

/// Keyless: delete one row equal to the old image, append the new one.
fn update_keyless(
    ops: &mut TableOps,
    map: &TableMap,
    old_full: Option<Tuple>,
    mut new: Tuple,
    lsn: Lsn,
    txn: (Lsn, i64),
) -> Result<(), BatchError> {
    let Some(old_full) = old_full else {
        return Err(BatchError::NoOldRow {
            table: map.label.clone(),
            lsn,
        });
    };
    fill_unchanged(&mut new, &old_full);
    ops.push_delete(OldRow {
        tuple: old_full,
        update: true,
        commit_lsn: txn.0,
        commit_time: txn.1,
    });
    ops.push_insert(new);
    Ok(())
}

/// An update that changed the row's key from `old` (the old key and the tuple it was read
/// from) to `new_key`; `Some` when green must move the row itself.
fn update_moved(
    ops: &mut TableOps,
    map: &Arc<TableMap>,
    (old_key, old_tuple): (Key, Tuple),
    new_key: Key,
    mut new: Tuple,
    lsn: Lsn,
    txn: (Lsn, i64),
) -> Option<RowMove> {
    let prev = ops.ops.remove(&old_key);
    // Green held the old key before the batch unless the batch inserted it.
    let old_existed = prev.as_ref().is_none_or(|p| p.existed);
    if has_unchanged(&new) {
        match prev.as_ref().map(|p| &p.op) {
            Some(KeyedOp::Upsert(p)) | Some(KeyedOp::Update(p)) => fill_unchanged(&mut new, p),
            _ => {}
        }
    }
    if has_unchanged(&new) && !map.completes_partial_rows() {
        // Green holds the only copy of the missing values: restore what was pending
        // for the old key (the caller flushes it first) and let green move the row.
        if let Some(p) = prev {
            ops.ops.insert(old_key, p);
        }
        return Some(RowMove {
            map: map.clone(),
            old_key: old_tuple,
            new,
            lsn,
        });
    }
    // Delete the old key, write the new one: whole, or (when the rule needs the real
    // values: filter, mixed columns) as a partial image completed from blue.
    put_first(
        &mut ops.ops,
        old_key,
        KeyedOp::Delete(old_tuple),
        lsn,
        txn,
        old_existed,
    );
    let op = if has_unchanged(&new) {
        KeyedOp::Update(new)
    } else {
        KeyedOp::Upsert(new)
    };
    put(&mut ops.ops, new_key, op, lsn, txn, false);
    None
}

/// An update that kept the row's key: merged into the key's pending op, filling unchanged
/// TOAST from an earlier image; a key not pending yet existed on green (blue updated it).
fn update_in_place(
    ops: &mut HashMap<Key, Pending>,
    key: Key,
    mut new: Tuple,
    lsn: Lsn,
    txn: (Lsn, i64),
) {
    let pending = match ops.entry(key) {
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
}

/// Sets a key's pending op; a key already pending keeps its `existed` (from its first change).
fn put(
    ops: &mut HashMap<Key, Pending>,
    key: Key,
    op: KeyedOp,
    lsn: Lsn,
    txn: (Lsn, i64),
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
    lsn: Lsn,
    txn: (Lsn, i64),
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

/// Memory a row image is counted for against `[batch] max_bytes`: its column payload plus a
/// per-column overhead.
pub fn tuple_bytes(t: &Tuple) -> usize {
    t.payload_bytes() + 16 * t.0.len()
}

/// `(id)=(5)`: a key's columns and values, as PostgreSQL writes keys in its messages.
pub fn key_text(map: &TableMap, key: &Key) -> String {
    let names: Vec<&str> = map
        .row_key
        .iter()
        .map(|&i| map.source_columns[i].name.as_str())
        .collect();
    let values: Vec<String> = key
        .iter()
        .map(|v| match v {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => "NULL".into(),
        })
        .collect();
    format!("({})=({})", names.join(", "), values.join(", "))
}

/// Updates and deletes need a replica identity (see `TableMap::awaits_identity`).
fn no_identity_check(map: &TableMap, lsn: Lsn) -> Result<(), BatchError> {
    if map.awaits_identity {
        return Err(BatchError::NoIdentity {
            table: map.label.clone(),
            lsn,
        });
    }
    Ok(())
}

fn check_arity(map: &TableMap, t: &Tuple, lsn: Lsn) -> Result<(), BatchError> {
    if t.0.len() != map.source_columns.len() {
        return Err(BatchError::Arity {
            table: map.label.clone(),
            lsn,
            got: t.0.len(),
            expected: map.source_columns.len(),
        });
    }
    Ok(())
}

/// Key of a row image; `None` entries are SQL NULLs (possible only in a keyless mapping).
pub fn key_of(map: &TableMap, t: &Tuple, lsn: Lsn) -> Result<Key, BatchError> {
    map.row_key
        .iter()
        .map(|&i| match &t.0[i] {
            Datum::Null => Ok(None),
            Datum::Text(b) | Datum::Binary(b) => Ok(Some(b.clone())),
            Datum::UnchangedToast => Err(BatchError::ToastedKey {
                table: map.label.clone(),
                column: map.source_columns[i].name.clone(),
                lsn,
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
#[path = "batch_tests.rs"]
mod tests;
