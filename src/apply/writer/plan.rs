//! Planning a write: which statements write one table's pending ops, in which order, with
//! which parameters (prepared on first use, see [`Applier::prepared`]).

use std::collections::HashMap;

use super::{Applier, Input, Origin, Params, Plan, arrays, boxed};
use crate::apply::batch::{self, KeyedOp, KeylessRun, TableOps};
use crate::apply::error::NEW_KEYS;
use crate::decode::Tuple;
use crate::lsn::Lsn;
use crate::statement::{self as sql, WordArray, conflict, keyless};
use crate::transform::TableMap;

/// What planning one table's statements shares.
struct TablePlan<'t> {
    map: &'t TableMap,
    /// The batch's last blue LSN, for errors.
    lsn: Lsn,
    /// Every source column.
    all: Vec<usize>,
}

impl TablePlan<'_> {
    fn origin(&self, what: &'static str) -> Origin {
        Origin {
            what,
            table: self.map.label.clone(),
            lsn: self.lsn,
        }
    }
}

/// Whether a keyed table's statements are the conflict-detecting forms, with the labels
/// (slot, source, target) those take.
struct Detect {
    on: bool,
    labels: (String, String, String),
}

impl Detect {
    /// [`keyed_params`], with the detection parameters when detecting.
    fn params<'t>(&self, rows: &[&'t batch::Pending], cols: &[usize], bound: bool) -> Params<'t> {
        keyed_params(rows, cols, self.on.then_some(&self.labels), bound)
    }
}

/// A keyed table's pending ops, by the statement that writes them.
#[derive(Default)]
struct KeyedGroups<'t> {
    deletes: Vec<&'t batch::Pending>,
    upserts: Vec<&'t batch::Pending>,
    /// Keys written with a plain insert (see [`Applier::insert_new_keys`]).
    new_keys: Vec<&'t batch::Pending>,
    /// Updates, by the columns they leave unchanged ([`batch::unchanged_mask`]).
    partial: HashMap<Vec<bool>, Vec<&'t batch::Pending>>,
}

impl<'t> KeyedGroups<'t> {
    /// Groups `ops`; with `insert_new`, keys blue inserted go to `new_keys`.
    fn of(ops: &'t TableOps, insert_new: bool) -> Self {
        let map = &ops.map;
        let mut groups = KeyedGroups::default();
        for p in ops.ops.values() {
            match &p.op {
                KeyedOp::Delete(_) => groups.deletes.push(p),
                // Blue had no row for this key before the batch: neither has green, unless
                // a writer on green inserted it (then the insert fails, and the batch is
                // retried with upserts: `ApplyError::NewKeyExists`).
                KeyedOp::Upsert(_) if insert_new && !p.existed => groups.new_keys.push(p),
                // Without a replica identity on blue (for a moment), a key green holds is
                // no conflict to resolve but a row blue has twice: the plain insert fails,
                // and the row is named as a poison row.
                KeyedOp::Upsert(_) if map.awaits_identity => groups.new_keys.push(p),
                KeyedOp::Upsert(_) => groups.upserts.push(p),
                KeyedOp::Update(t) => groups
                    .partial
                    .entry(batch::unchanged_mask(t))
                    .or_default()
                    .push(p),
            }
        }
        groups
    }
}

impl Applier {
    /// Plans the statements writing one table's `ops`, appending them to `plans` in the order
    /// they are to run.
    pub(super) async fn plan_table<'t>(
        &mut self,
        ops: &'t TableOps,
        lsn: Lsn,
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let map: &'t TableMap = &ops.map;
        let table = TablePlan {
            map,
            lsn,
            all: (0..map.source_columns.len()).collect(),
        };
        if map.is_keyed() {
            self.plan_keyed(&table, ops, plans).await
        } else {
            self.plan_keyless(&table, &ops.runs, plans).await
        }
    }

    /// A keyed table's statements: deletes, upserts, updates, then the keys blue inserted.
    async fn plan_keyed<'t>(
        &mut self,
        table: &TablePlan<'t>,
        ops: &'t TableOps,
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let map = table.map;
        let detect = Detect {
            on: map.conflicts.detects(),
            labels: (self.slot.clone(), map.source.to_string(), map.label.clone()),
        };
        let insert_new = self.insert_new_keys
            && map.insert_new_keys.is_some()
            && !self.upsert_only.contains(&map.label);
        let groups = KeyedGroups::of(ops, insert_new);
        if !groups.deletes.is_empty() {
            self.plan_deletes(table, &detect, &groups.deletes, plans)
                .await?;
        }
        if !groups.upserts.is_empty() {
            self.plan_upserts(table, &detect, &groups.upserts, plans)
                .await?;
        }
        for (mask, rows) in groups.partial {
            self.plan_update(table, &detect, &mask, &rows, plans)
                .await?;
        }
        // Last: rows blue inserted usually reuse unique values that the batch's updates and
        // deletes free.
        if !groups.new_keys.is_empty() {
            self.plan_new_keys(table, &detect, &groups.new_keys, plans)
                .await?;
        }
        Ok(())
    }

    /// The delete of the keys whose last change in the batch is a delete.
    async fn plan_deletes<'t>(
        &mut self,
        table: &TablePlan<'t>,
        detect: &Detect,
        deletes: &[&'t batch::Pending],
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let map = table.map;
        let text = if detect.on {
            conflict::delete(map)
        } else {
            sql::delete(map)
        };
        let s = self.prepared(&map.label, &text).await?;
        plans.push((
            s,
            detect.params(deletes, &map.row_key, false).into(),
            table.origin("a delete"),
        ));
        Ok(())
    }

    /// The upsert of full rows, after the delete of the rows the filter excludes (when the
    /// mapping has a filter).
    async fn plan_upserts<'t>(
        &mut self,
        table: &TablePlan<'t>,
        detect: &Detect,
        upserts: &[&'t batch::Pending],
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let (map, all) = (table.map, &table.all);
        if let Some(text) = sql::delete_unmatched(map, all) {
            let s = self.prepared(&map.label, &text).await?;
            plans.push((
                s,
                keyed_params(upserts, all, None, false).into(),
                table.origin("a delete of rows the filter excludes"),
            ));
        }
        let text = if detect.on {
            conflict::upsert(map, all)
        } else {
            sql::upsert(map, all)
        };
        let s = self.prepared(&map.label, &text).await?;
        let bound = detect.on && conflict::upsert_takes_commit_bound(map);
        plans.push((
            s,
            detect.params(upserts, all, bound).into(),
            table.origin("an insert or update"),
        ));
        Ok(())
    }

    /// The update of `rows`, which leave the columns of `mask` unchanged (none when no column
    /// is left to set).
    async fn plan_update<'t>(
        &mut self,
        table: &TablePlan<'t>,
        detect: &Detect,
        mask: &[bool],
        rows: &[&'t batch::Pending],
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let map = table.map;
        let cols: Vec<usize> = table.all.iter().copied().filter(|&c| !mask[c]).collect();
        let text = if detect.on {
            conflict::update(map, &cols)
        } else {
            sql::update(map, &cols)
        };
        if let Some(text) = text {
            let s = self.prepared(&map.label, &text).await?;
            plans.push((
                s,
                detect.params(rows, &cols, false).into(),
                table.origin("an update"),
            ));
        }
        Ok(())
    }

    /// The insert of the keys blue inserted: the detecting form, COPY, or a plain INSERT.
    async fn plan_new_keys<'t>(
        &mut self,
        table: &TablePlan<'t>,
        detect: &Detect,
        new_keys: &[&'t batch::Pending],
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let (map, all) = (table.map, &table.all);
        // COPY only as the first statement of the write (after BEGIN at most): a COPY
        // that fails before the server enters copy mode (an earlier statement aborted
        // the transaction) leaves tokio-postgres one reply out of step with its requests
        // (rust-postgres #789). As the first statement it can only fail that way on a
        // privilege, which stops the session and drops the connection.
        let copy = map.copy_new_keys.as_ref().filter(|_| plans.is_empty());
        let (s, input) = match (conflict::insert_new(map, all), copy) {
            (Some(text), _) => {
                let types = conflict::param_types(all.len());
                let s = self.prepared_typed(&map.label, &text, &types).await?;
                (s, detect.params(new_keys, all, false).into())
            }
            (None, Some(sources)) => {
                let s = self.prepared(&map.label, &sql::copy_new(map)).await?;
                (s, Input::Copy(copy_data(new_keys, sources)))
            }
            (None, None) => {
                let s = self
                    .prepared(&map.label, &sql::insert_new(map, all))
                    .await?;
                (s, keyed_params(new_keys, all, None, false).into())
            }
        };
        plans.push((s, input, table.origin(NEW_KEYS)));
        Ok(())
    }

    /// A keyless table's statements: one per run, in arrival order.
    async fn plan_keyless<'t>(
        &mut self,
        table: &TablePlan<'t>,
        runs: &'t [KeylessRun],
        plans: &mut Vec<Plan<'t>>,
    ) -> Result<(), tokio_postgres::Error> {
        let (map, all) = (table.map, &table.all);
        for run in runs {
            match run {
                KeylessRun::Insert(rows) => {
                    let s = self.prepared(&map.label, &sql::upsert(map, all)).await?;
                    let rows: Vec<&Tuple> = rows.iter().collect();
                    plans.push((
                        s,
                        boxed(arrays(&rows, all)).into(),
                        table.origin("an insert"),
                    ));
                }
                KeylessRun::Delete(rows) => {
                    let detect = map.conflicts.detects();
                    let text = keyless::delete_matching(map, all, detect);
                    let s = self.prepared(&map.label, &text).await?;
                    let tuples: Vec<&Tuple> = rows.iter().map(|r| &r.tuple).collect();
                    let mut params = boxed(arrays(&tuples, all));
                    if detect {
                        params.extend(keyless_meta(rows, &self.slot, map));
                    }
                    plans.push((s, params.into(), table.origin("a delete (full-row match)")));
                }
            }
        }
        Ok(())
    }
}

/// The rows of `pending` (full images) in COPY's text format.
fn copy_data(pending: &[&batch::Pending], sources: &[usize]) -> bytes::Bytes {
    let size: usize = pending
        .iter()
        .map(|p| p.op.tuple().payload_bytes() + sources.len() + 8)
        .sum();
    let mut buf = bytes::BytesMut::with_capacity(size);
    for p in pending {
        sql::copy_row(&mut buf, p.op.tuple(), sources);
    }
    buf.freeze()
}

/// Parameters of a keyed statement: the listed columns' arrays, then, for the
/// conflict-detecting forms (`labels` = slot, source, target), the per-row metadata and labels
/// (see `conflict`), and with `bound` the latest commit time among the rows.
fn keyed_params<'t>(
    rows: &[&'t batch::Pending],
    cols: &[usize],
    labels: Option<&(String, String, String)>,
    bound: bool,
) -> Params<'t> {
    let tuples: Vec<&Tuple> = rows.iter().map(|p| p.op.tuple()).collect();
    let mut params = boxed(arrays(&tuples, cols));
    if let Some((slot, source, target)) = labels {
        params.push(Box::new(
            rows.iter().map(|p| p.existed).collect::<Vec<bool>>(),
        ));
        params.push(Box::new(WordArray(
            rows.iter().map(|p| p.commit_lsn.as_u64() as i64).collect(),
        )));
        params.push(Box::new(WordArray(
            rows.iter().map(|p| p.commit_time).collect(),
        )));
        params.push(Box::new(slot.clone()));
        params.push(Box::new(source.clone()));
        params.push(Box::new(target.clone()));
        if bound {
            let latest = rows.iter().map(|p| p.commit_time).max().unwrap_or(0);
            params.push(Box::new(crate::progress::pg_time(latest)));
        }
    }
    params
}

/// The detection parameters of a keyless delete (see `keyless::delete_matching`): per image
/// whether it is an update's, its commit LSN and time; then slot, source and target labels.
fn keyless_meta<'t>(rows: &[batch::OldRow], slot: &str, map: &TableMap) -> Params<'t> {
    vec![
        Box::new(rows.iter().map(|r| r.update).collect::<Vec<bool>>()),
        Box::new(WordArray(
            rows.iter().map(|r| r.commit_lsn.as_u64() as i64).collect(),
        )),
        Box::new(WordArray(rows.iter().map(|r| r.commit_time).collect())),
        Box::new(slot.to_string()),
        Box::new(map.source.to_string()),
        Box::new(map.label.clone()),
    ]
}
