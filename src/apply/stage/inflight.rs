//! Writes that run in the background while the apply task keeps receiving: a chunk of a large
//! blue transaction, or a whole batch with its progress row and COMMIT.
//!
//! Invariants:
//! - At most one write is in flight (memory: the batch in flight plus the one being built), and
//!   everything else that talks to green first waits for it (`settle`), so statements reach
//!   green in blue's order.
//! - What a committing write covers (rows, conflicts, the acknowledged LSN) is published only
//!   after green reports the COMMIT done; a failed write publishes nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use tracing::{debug, warn};

use super::ApplyStage;
use crate::apply::batch::{OP_NAMES, TableOps};
use crate::apply::{Applier, ApplyError, Written};
use crate::decode::Commit;
use crate::lsn::Lsn;

/// A write running in the background.
pub(super) struct Inflight {
    task: tokio::task::JoinHandle<Output>,
    /// Commit LSN of the last blue transaction received when the write started: the
    /// transactions it holds commit at or before it.
    final_lsn: Lsn,
    /// Present when the write commits.
    commit: Option<Committing>,
}

impl Drop for Inflight {
    /// Only an unfinished stage drops a write still running (a stalled session the supervisor
    /// gave up on, see `monitor`): the write ends with it, closing its connection, so green
    /// rolls back what it had not committed and the slot's green session lock is not held by a
    /// write nobody waits for. A finished write's task is gone already.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a background write hands back: the applier, the tables (to name a rejected row) and
/// the result.
type Output = (Applier, Vec<TableOps>, Result<Written, ApplyError>);

/// A background write's end, as its task reports it.
pub(super) type Ended = Result<Output, tokio::task::JoinError>;

impl Inflight {
    /// Waits for the write in flight to end (`None` when there is none). Cancel-safe: dropped
    /// before the end, the write keeps running and a later call returns its end.
    pub(super) async fn ended(inflight: &mut Option<Inflight>) -> Option<Ended> {
        match inflight {
            Some(i) => Some((&mut i.task).await),
            None => None,
        }
    }
}

/// A batch green is committing, and what to publish once it has.
pub(super) struct Committing {
    commit: Commit,
    started: Instant,
    txns: u64,
    rows: u64,
    tally: Tally,
}

/// Rows written and conflicts met in an open green transaction: published only when green
/// commits it.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) written: HashMap<String, HashMap<&'static str, u64>>,
    pub(super) conflicts: Vec<crate::conflicts::Seen>,
}

impl Tally {
    pub(super) fn record(&mut self, written: Written) {
        self.conflicts.extend(written.conflicts);
        for (table, ops) in written.rows {
            let entry = self.written.entry(table).or_default();
            for (i, n) in ops.iter().enumerate() {
                if *n > 0 {
                    *entry.entry(OP_NAMES[i]).or_default() += *n;
                }
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.written.is_empty() && self.conflicts.is_empty()
    }
}

impl ApplyStage {
    /// Waits for the write in flight, if any, takes back the applier, and publishes what it
    /// committed.
    pub(super) async fn settle(&mut self) -> Result<(), ApplyError> {
        let ended = Inflight::ended(&mut self.inflight).await;
        self.settle_ended(ended).await
    }

    /// [`Self::settle`] once the write has ended (`ended` from [`Inflight::ended`]).
    pub(super) async fn settle_ended(&mut self, ended: Option<Ended>) -> Result<(), ApplyError> {
        let Some(output) = ended else {
            return Ok(());
        };
        let mut inflight = self.inflight.take().expect("ended implies in flight");
        let (applier, tables, result) = output.map_err(|e| ApplyError::WriteTask(e.to_string()))?;
        self.applier = Some(applier);
        let written = self
            .after_write(result, &tables, inflight.final_lsn)
            .await?;
        match inflight.commit.take() {
            None => self.tally.record(written),
            Some(mut c) => {
                c.tally.record(written);
                self.publish(c);
            }
        }
        Ok(())
    }

    /// Writes pending ops of a large blue transaction without committing, in the background:
    /// green executes this chunk while the next one is received and coalesced.
    pub(super) async fn flush_in_background(&mut self, lsn: Lsn) -> Result<(), ApplyError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.spawn_write(lsn, None).await
    }

    /// Writes pending ops without committing, and waits for green.
    pub(super) async fn flush(&mut self, lsn: Lsn) -> Result<(), ApplyError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let (tables, final_lsn) = self.take_for_write().await?;
        let result = self.applier().write(&tables, None, lsn).await;
        let written = self.after_write(result, &tables, final_lsn).await?;
        self.tally.record(written);
        Ok(())
    }

    /// Writes the rest of the batch, the progress row and COMMIT in the background: the next
    /// batch is received and coalesced while green commits this one. The LSN is published
    /// (acknowledged to blue) by [`Self::settle`], once green has committed.
    pub(super) async fn commit(&mut self) -> Result<(), ApplyError> {
        let Some(c) = self.last_commit.take() else {
            return Ok(());
        };
        // The chunk in flight, if any, belongs to this batch: its rows join the tally first.
        self.settle().await?;
        let committing = Committing {
            commit: c,
            started: Instant::now(),
            txns: std::mem::take(&mut self.txns),
            rows: std::mem::take(&mut self.batch_rows),
            tally: std::mem::take(&mut self.tally),
        };
        self.batch_started = None;
        if self.batch.is_empty() && !self.applier().in_transaction() {
            // Nothing reached green: no need for a green transaction to advance.
            self.publish(committing);
            return Ok(());
        }
        self.spawn_write(c.end_lsn, Some(committing)).await
    }

    async fn spawn_write(
        &mut self,
        lsn: Lsn,
        commit: Option<Committing>,
    ) -> Result<(), ApplyError> {
        let (tables, final_lsn) = self.take_for_write().await?;
        let mut applier = self.applier.take().expect("settled by take_for_write");
        let progress = commit
            .as_ref()
            .map(|c| (c.commit.end_lsn, c.commit.commit_time));
        self.inflight = Some(Inflight {
            task: tokio::spawn(async move {
                let result = applier.write(&tables, progress, lsn).await;
                (applier, tables, result)
            }),
            final_lsn,
            commit,
        });
        Ok(())
    }

    /// The batch's pending ops, completed from blue, once green is free for them (no write in
    /// flight) and the applier knows whether new keys may take the plain insert (not while
    /// replaying change by change). Returns them with the commit LSN of the last transaction
    /// received, at or before which all of them commit.
    async fn take_for_write(&mut self) -> Result<(Vec<TableOps>, Lsn), ApplyError> {
        let mut tables = self.batch.take();
        crate::apply::complete::complete_rows(self.blue.as_ref(), &mut tables).await?;
        self.settle().await?;
        let final_lsn = self.txn_final_lsn;
        let coalesced = final_lsn > self.serial_until;
        self.applier().insert_new_keys = coalesced;
        Ok((tables, final_lsn))
    }

    /// Green committed a batch: count its rows and conflicts, acknowledge its LSN.
    fn publish(&mut self, c: Committing) {
        let elapsed = c.started.elapsed();
        let end_lsn = c.commit.end_lsn;
        for (table, ops) in c.tally.written {
            for (op, n) in ops {
                self.shared.add_rows(&table, op, n);
            }
        }
        if !c.tally.conflicts.is_empty() {
            log_conflicts(&c.tally.conflicts, end_lsn);
            self.shared.add_conflicts(&c.tally.conflicts);
        }
        self.shared
            .batch_committed(c.txns, c.rows, elapsed, end_lsn);
        debug!(
            end_lsn = %end_lsn,
            txns = c.txns,
            rows = c.rows,
            ms = elapsed.as_millis() as u64,
            "batch committed"
        );
        let _ = self.committed.send(end_lsn);
    }

    /// The outcome of a write of `tables`: a data error is attributed (the failing table
    /// bisected to name the row) in the error that stops the pipeline.
    async fn after_write(
        &mut self,
        result: Result<Written, ApplyError>,
        tables: &[TableOps],
        final_lsn: Lsn,
    ) -> Result<Written, ApplyError> {
        match result {
            // A new key met a row on green: a conflict, not bad input (see `Switch::UpsertsOnly`).
            Err(ApplyError::Statement {
                what: crate::apply::NEW_KEYS,
                table,
                failure,
                ..
            }) if failure.is(&crate::failure::SqlState::UNIQUE_VIOLATION)
                && failure.constraint.is_some()
                && tables.iter().any(|t| {
                    t.map.label == table
                        && t.map.is_new_key_violation(failure.constraint.as_deref())
                }) =>
            {
                Err(crate::apply::Switch::UpsertsOnly { table, failure }.into())
            }
            Err(e) if crate::apply::poison::is_data_error(&e) => {
                let ApplyError::Statement { table, failure, .. } = &e else {
                    return Err(e);
                };
                // Coalescing reorders changes between keys; a secondary unique constraint may
                // care. Replay the stretch in blue's order before calling any row poison.
                if final_lsn > self.serial_until && failure.is_unique_violation() {
                    // Every transaction in this write commits at or before the one received
                    // last.
                    return Err(crate::apply::Switch::Reorder {
                        table: table.clone(),
                        until: final_lsn,
                        failure: failure.clone(),
                    }
                    .into());
                }
                // The table may have ops in several segments of the batch: try each. A row that
                // fails alone for another reason (it needed earlier context) is not the culprit.
                let original = failure.clone();
                for t in tables.iter().filter(|t| &t.map.label == table) {
                    if let Some(p) = self.applier().isolate(t).await?
                        && p.failure.code == original.code
                        && p.failure.constraint == original.constraint
                    {
                        return Err(crate::apply::poison::poison_error(t, p));
                    }
                }
                Err(e)
            }
            other => other,
        }
    }
}

/// One warning per batch and table: counts by kind and resolution, and the first keys (values
/// are in `shadowsync.conflicts`, never in logs).
fn log_conflicts(conflicts: &[crate::conflicts::Seen], end_lsn: Lsn) {
    const KEYS_SHOWN: usize = 10;
    let mut by_table: BTreeMap<&str, Vec<&crate::conflicts::Seen>> = BTreeMap::new();
    for c in conflicts {
        by_table.entry(&c.table).or_default().push(c);
    }
    for (table, seen) in by_table {
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for c in &seen {
            *counts.entry((&c.kind, &c.resolution)).or_default() += 1;
        }
        let counts = counts
            .iter()
            .map(|((k, r), n)| format!("{k}/{r}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut keys: Vec<&str> = seen
            .iter()
            .take(KEYS_SHOWN)
            .map(|c| c.key.as_str())
            .collect();
        if seen.len() > KEYS_SHOWN {
            keys.push("...");
        }
        warn!(
            table,
            conflicts = seen.len(),
            counts = %counts,
            keys = %keys.join(" "),
            end_lsn = %end_lsn,
            "conflicts with green's rows resolved (recorded in shadowsync.conflicts)"
        );
    }
}
