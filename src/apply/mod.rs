//! Apply stage: writes coalesced batches to green, set-based, and commits them together with the
//! progress row.
//!
//! Invariants:
//! - Green commits only at blue commit boundaries, and every commit carries the progress row of
//!   the last blue commit it contains (exactly once, see `progress`).
//! - No per-row round trips: a batch is a few statements per table, all sent pipelined (BEGIN,
//!   statements, progress, COMMIT in one round trip); a failed statement aborts the
//!   transaction, so COMMIT turns into a rollback and the error reaches the caller.
//! - Green runs with `session_replication_role = replica` when allowed, as PostgreSQL's own
//!   apply worker does: foreign keys between replicated tables are consistent at each commit
//!   boundary, not after every coalesced statement.

pub mod batch;
mod complete;
mod error;
mod poison;
mod recovery;
pub mod stage;
mod writer;

pub(crate) use error::NEW_KEYS;
pub use error::{ApplyError, retryable_pg};
pub use recovery::{Recovery, Switch};
pub use writer::{Applier, Remaps, WriteCounts, Written};
