//! shadowsync: keeps a green PostgreSQL database in sync with a blue one during a blue-green
//! migration, exactly once, through SQL transform rules evaluated by green.
//!
//! Pipeline: `source` (replication connection) -> `decode` (pgoutput) -> `transform` (mapping
//! of source rows to target statements) -> `apply` (set-based, group-committed writes to green,
//! with `progress` and the `conflicts` record in the same transaction) -> acknowledgement to
//! blue. `metrics` and `admin`
//! observe and steer it; `snapshot` copies blue's existing rows before streaming; `pipeline` wires the stages together; `cluster` starts throwaway
//! PostgreSQL servers for tests and `demo`.

pub mod admin;
pub mod apply;
pub mod check;
pub mod cluster;
pub mod config;
pub mod conflicts;
pub mod decode;
pub mod demo;
pub mod failure;
pub mod logging;
pub mod lsn;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod snapshot;
pub mod source;
pub mod transform;
