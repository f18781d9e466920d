//! What the sessions of this process learned about green, carried into the next session: the
//! planned switches a write found necessary.
//!
//! A switch is not a failure: green refused a coalesced write for a reason that a different way
//! of writing avoids (blue's order for a secondary unique constraint; upserts where a writer on
//! green inserted keys). The session ends with its green transaction rolled back, and the next
//! one resumes from green's progress with the switch in effect. Invariant: switches only ever
//! make writing more careful, never less (`serial_until` never moves back).

use std::collections::BTreeSet;

use crate::failure::DbFailure;
use crate::lsn::Lsn;

#[cfg(test)]
use super::ApplyError;

/// A planned change of how green is written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Switch {
    #[error(
        "a unique or exclusion constraint of green table {table} rejects the coalesced batch ending at blue LSN {}: {failure}; replaying that stretch change by change, in blue's order",
        *.until
    )]
    Reorder {
        table: String,
        until: Lsn,
        failure: Box<DbFailure>,
    },
    #[error(
        "green table {table} already has a row for a key that blue inserted ({failure}): a writer on green wrote that key. Retrying the batch; {table} is written with upserts from now on, which record such rows in shadowsync.conflicts"
    )]
    UpsertsOnly {
        table: String,
        failure: Box<DbFailure>,
    },
}

impl Switch {
    /// The target table that asked for it.
    pub fn table(&self) -> &str {
        match self {
            Switch::Reorder { table, .. } | Switch::UpsertsOnly { table, .. } => table,
        }
    }

    /// Its name in metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Switch::Reorder { .. } => "blue_order",
            Switch::UpsertsOnly { .. } => "upserts_only",
        }
    }
}

/// What the sessions of this process learned about green, carried into the next session.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Transactions committing at or before this LSN are replayed change by change (a unique
    /// constraint on green rejected them coalesced: [`Switch::Reorder`]).
    pub serial_until: Lsn,
    /// Target tables whose new keys are written with upserts, never with a plain insert (a
    /// writer on green inserted keys there: [`Switch::UpsertsOnly`]).
    pub upsert_only: BTreeSet<String>,
}

impl Recovery {
    /// Takes in a switch for the sessions to come.
    pub fn learn(&mut self, switch: &Switch) {
        match switch {
            Switch::Reorder { until, .. } => self.serial_until = self.serial_until.max(*until),
            Switch::UpsertsOnly { table, .. } => {
                self.upsert_only.insert(table.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique_violation() -> Box<DbFailure> {
        Box::new(DbFailure {
            code: Some(crate::failure::SqlState::UNIQUE_VIOLATION),
            constraint: Some("items_pkey".into()),
            message: "duplicate key value violates unique constraint".into(),
            tls: None,
        })
    }

    #[test]
    fn recovery_learns_the_switches_for_the_next_sessions() {
        let mut r = Recovery::default();
        let e = Switch::UpsertsOnly {
            table: "public.items".into(),
            failure: unique_violation(),
        };
        assert!(ApplyError::from(e.clone()).is_retryable());
        r.learn(&e);
        r.learn(&Switch::Reorder {
            table: "public.items".into(),
            until: Lsn::from_u64(100),
            failure: unique_violation(),
        });
        r.learn(&Switch::Reorder {
            table: "public.items".into(),
            until: Lsn::from_u64(50),
            failure: unique_violation(),
        });
        assert_eq!(r.serial_until, Lsn::from_u64(100), "never moves back");
        assert_eq!(
            r.upsert_only.iter().collect::<Vec<_>>(),
            vec!["public.items"]
        );
    }
}
