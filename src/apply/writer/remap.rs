//! Re-deriving lookups inside a write: after the statements writing a looked-up table, one
//! statement per reader recomputes the reader rows whose stored key equals a key the write
//! changed (see `transform::remap` and `statement::remap`), in the same pipeline and the same
//! green transaction as the change itself.
//!
//! Invariants: the re-derivation runs after the looked-up table's statements and before any
//! later table of the write (readers come after the tables they read in a segment, see
//! `batch::Batch::take`), so every reader row sees the looked-up rows as blue had them at that
//! point; the remaps come from every mapping of the publication, not only the relations the
//! stream has described so far (a change of `users` re-derives `vms` before any `vms` change
//! arrived).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{Applier, Origin, Params, Plan};
use crate::apply::batch::KeyedOp;
use crate::apply::batch::TableOps;
use crate::decode::Datum;
use crate::lsn::Lsn;
use crate::statement::{TextArray, WordArray};
use crate::transform::TableMap;
use crate::transform::remap::{self, ForeignKey, Remap};

/// The mappings green is written with, and the remaps they imply.
#[derive(Default)]
pub struct Remaps {
    /// Every mapping, by target label.
    maps: HashMap<String, Arc<TableMap>>,
    /// Blue's foreign keys (see [`Remap::inserted_keys_unread`]).
    fks: Vec<ForeignKey>,
    /// Read table (target label) -> its readers' remaps.
    by_read: HashMap<String, Vec<(Arc<TableMap>, Remap)>>,
}

impl Remaps {
    /// The remaps of `maps` (every mapping of the publication).
    pub fn new(maps: impl IntoIterator<Item = Arc<TableMap>>, fks: Vec<ForeignKey>) -> Self {
        let mut r = Remaps {
            maps: maps.into_iter().map(|m| (m.label.clone(), m)).collect(),
            fks,
            by_read: HashMap::new(),
        };
        r.plan();
        r
    }

    /// A mapping as the stream describes it now (its table may have changed on blue).
    pub fn update(&mut self, map: Arc<TableMap>) {
        if self.maps.get(&map.label) != Some(&map) {
            self.maps.insert(map.label.clone(), map);
            self.plan();
        }
    }

    fn plan(&mut self) {
        self.by_read.clear();
        for reader in self.maps.values() {
            for read in self.maps.values() {
                if let Some(Ok(mut remap)) = remap::plan(reader, read) {
                    remap.inserted_keys_unread = remap.guarded_by(reader, read, &self.fks);
                    self.by_read
                        .entry(read.label.clone())
                        .or_default()
                        .push((reader.clone(), remap));
                }
            }
        }
    }
}

/// The keys `ops` changes (blue's text of the plain key), with the commit LSN and time of the
/// last change of each; without the keys blue inserted when `inserted_unread`.
fn changed_keys(ops: &TableOps, pk: usize, inserted_unread: bool) -> Vec<(&[u8], Lsn, i64)> {
    let mut keys: HashMap<&Bytes, (Lsn, i64)> = HashMap::with_capacity(ops.ops.len());
    for p in ops.ops.values() {
        if inserted_unread && !p.existed && matches!(p.op, KeyedOp::Upsert(_)) {
            continue;
        }
        if let Datum::Text(b) | Datum::Binary(b) = &p.op.tuple().0[pk] {
            let e = keys.entry(b).or_insert((p.commit_lsn, p.commit_time));
            if p.commit_lsn > e.0 {
                *e = (p.commit_lsn, p.commit_time);
            }
        }
    }
    keys.into_iter()
        .map(|(k, (lsn, time))| (k.as_ref(), lsn, time))
        .collect()
}

impl Applier {
    /// Appends the statements re-deriving the readers of `ops`' table, if any.
    pub(super) async fn plan_remaps<'t>(
        &mut self,
        ops: &'t TableOps,
        lsn: Lsn,
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let Some(readers) = self.remaps.by_read.get(&ops.map.label).cloned() else {
            return Ok(());
        };
        let Some(pk) = ops.map.plain_key else {
            return Ok(());
        };
        for (reader, remap) in readers {
            let keys = changed_keys(ops, pk, remap.inserted_keys_unread);
            if keys.is_empty() {
                continue;
            }
            let (text, labelled) = crate::statement::remap::by_keys(&reader, &remap);
            let statement = self.prepared(&reader.label, &text).await?;
            let mut params: Params<'t> = vec![
                Box::new(TextArray(keys.iter().map(|k| Some(k.0)).collect())),
                Box::new(WordArray(
                    keys.iter().map(|k| k.1.as_u64() as i64).collect(),
                )),
                Box::new(WordArray(keys.iter().map(|k| k.2).collect())),
            ];
            if labelled {
                params.push(Box::new(self.slot.clone()));
                params.push(Box::new(reader.source.to_string()));
                params.push(Box::new(reader.label.clone()));
            }
            let origin = Origin {
                what: "re-deriving lookups",
                table: reader.label.clone(),
                lsn,
            };
            plans.push((statement, params.into(), origin));
        }
        Ok(())
    }
}
