//! Isolating a row green rejects (failed cast, NOT NULL, CHECK or unique violation) in a batch:
//! the failing table's pending ops are bisected under savepoints, log2(n) statements rather
//! than one per row, until one op is left that green refuses alone.
//!
//! Invariant: the isolation runs in a transaction that is always rolled back; it only names the
//! row (table, key, LSN, green's message). Nothing is committed or confirmed past the batch.

use std::collections::HashMap;

use super::batch::TableOps;
use super::error::hint_for;
use super::{Applier, ApplyError};
use crate::failure::DbFailure;
use crate::lsn::Lsn;

/// The op green refuses, as the error names it.
pub struct Poison {
    pub key: String,
    pub lsn: Lsn,
    pub failure: DbFailure,
}

/// Whether green refused the data itself (as opposed to losing a connection).
pub fn is_data_error(e: &ApplyError) -> bool {
    matches!(e, ApplyError::Statement { failure, .. }
        if failure.is_rejected_data())
}

impl Applier {
    /// Finds the op of `table` that green rejects; `None` when no single op fails alone (the
    /// failure needed earlier chunks of the transaction, or ops of other tables).
    pub async fn isolate(&mut self, table: &TableOps) -> Result<Option<Poison>, ApplyError> {
        if !table.map.is_keyed() || table.ops.is_empty() {
            return Ok(None);
        }
        self.rollback().await?;
        self.begin_if_needed().await?;
        self.keep_failed_transaction = true;
        let insert_new_keys = std::mem::replace(&mut self.insert_new_keys, false);
        let result = self.bisect(table).await;
        self.insert_new_keys = insert_new_keys;
        self.keep_failed_transaction = false;
        self.rollback().await?;
        result
    }

    async fn bisect(&mut self, table: &TableOps) -> Result<Option<Poison>, ApplyError> {
        let mut candidates: Vec<_> = table.ops.iter().collect();
        // Deterministic order: by LSN, the order blue made the changes in.
        candidates.sort_by_key(|(_, p)| p.lsn);
        loop {
            let half = candidates.len().div_ceil(2);
            let first = subset(table, &candidates[..half]);
            self.savepoint("SAVEPOINT shadowsync_bisect").await?;
            match self
                .write(std::slice::from_ref(&first), None, Lsn::ZERO)
                .await
            {
                Err(e) if is_data_error(&e) => {
                    self.savepoint("ROLLBACK TO SAVEPOINT shadowsync_bisect")
                        .await?;
                    if half == 1 {
                        let (key, pending) = candidates[0];
                        let ApplyError::Statement { failure, .. } = e else {
                            unreachable!("is_data_error matched a statement error")
                        };
                        return Ok(Some(Poison {
                            key: super::batch::key_text(&table.map, key),
                            lsn: pending.lsn,
                            failure: *failure,
                        }));
                    }
                    candidates.truncate(half);
                }
                Err(e) => return Err(e),
                // The first half applies: keep it (the rest may depend on it), search the rest.
                Ok(_) => {
                    self.savepoint("RELEASE SAVEPOINT shadowsync_bisect")
                        .await?;
                    if candidates.len() == half {
                        return Ok(None);
                    }
                    candidates.drain(..half);
                }
            }
        }
    }

    async fn savepoint(&mut self, sql: &str) -> Result<(), ApplyError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| ApplyError::Green {
                context: "bisecting a rejected batch",
                failure: DbFailure::from_pg(&e),
            })
    }
}

fn subset(table: &TableOps, entries: &[(&super::batch::Key, &super::batch::Pending)]) -> TableOps {
    TableOps {
        map: table.map.clone(),
        ops: entries
            .iter()
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect::<HashMap<_, _>>(),
        runs: Vec::new(),
        counts: [0; 3],
    }
}

/// The poison error for a rejected op of `table`.
pub fn poison_error(table: &TableOps, p: Poison) -> ApplyError {
    ApplyError::Poison {
        source_table: table.map.source.to_string(),
        target: table.map.label.clone(),
        key: p.key,
        lsn: p.lsn,
        hint: hint_for(&p.failure),
        failure: Box::new(p.failure),
    }
}
