//! shadowsync: keeps a green PostgreSQL database in sync with a blue one during a blue-green
//! migration, exactly once, through SQL transform rules evaluated by green.
//!
//! Pipeline: `source` (replication connection) -> `decode` (pgoutput) -> `transform` (mapping
//! of source rows to target columns) -> `apply` (set-based, group-committed writes to green,
//! with `progress` and the `conflicts` record in the same transaction) -> acknowledgement to
//! blue. `snapshot` copies blue's existing rows before streaming; `pipeline` runs the stages
//! under one supervisor; `metrics` and `admin` observe and steer it.
//!
//! Layers, each using only those above it (`tests/layering.rs` keeps the module graph acyclic):
//! - foundations: `lsn`, `failure` (errors by SQLSTATE), `shutdown`, `decode`, `config`,
//!   `session_role`;
//! - what a mapping is: `transform` (rules, expressions, conflict policy), then `statement` (the
//!   SQL text and parameters of the apply, no I/O) and `validate` (green's verdict on a rule);
//! - shadowsync's tables on green: `store` (the schema and its numbered migrations), then
//!   `progress` and `conflicts`;
//! - the stages: `source`, `apply`, `snapshot`, with `metrics`;
//! - `check` (every mapping against both schemas), `drain`, `admin`, `pipeline`;
//! - `sequence` (green's sequences set from blue's at cutover, through `check`'s mappings);
//! - commands and tools: `demo`, `cluster` (throwaway PostgreSQL servers for tests and `demo`).

pub mod admin;
pub mod apply;
pub mod check;
pub mod cluster;
pub mod config;
pub mod conflicts;
pub mod cutover;
pub mod decode;
pub mod demo;
pub mod drain;
pub mod dsn;
pub mod failure;
pub mod fence;
pub mod hold;
pub mod logging;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod origin;
pub mod pipeline;
pub mod progress;
pub mod remap;
pub mod reset;
pub mod reverse;
pub mod sequence;
pub mod session_role;
pub mod shutdown;
pub mod snapshot;
pub mod source;
pub mod statement;
pub mod status_line;
pub mod store;
pub mod streamer;
pub mod tls;
pub mod transform;
pub mod validate;
pub mod verify;
