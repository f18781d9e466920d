//! Conflict policy of one mapping: whether green's disagreeing rows are detected, and which
//! value decides last-writer-wins.
//!
//! Invariants: an `Lww::Column` is a written target column (the incoming row carries its
//! value); an `Lww::CommitTime` column exists on green as `timestamptz` and is never mapped from
//! blue (shadowsync alone fills it, with blue's commit time).

use serde::Deserialize;

use super::catalog::GreenTable;
use super::rules::{Origin, Rule};
use super::{MapError, TargetColumn};

/// Default `[conflicts] lww_column`.
pub const DEFAULT_LWW_COLUMN: &str = "updated_at";
/// Default `[conflicts] commit_time_column`.
pub const DEFAULT_COMMIT_TIME_COLUMN: &str = "shadowsync_commit_time";
/// The `lww_column` value that compares blue's commit time instead of a row column.
pub const LWW_COMMIT_TIME: &str = "commit_time";

/// How a conflict (green's row disagreeing with a change from blue) is resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// Last writer wins: the change is applied only when its timestamp is later than or equal
    /// to green's row; a table without the comparison column falls back to `apply`.
    #[default]
    Lww,
    /// Blue always wins.
    Apply,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsConfig {
    /// `lww` (default) or `apply`.
    #[serde(default)]
    pub resolution: Resolution,
    /// Target column compared under `lww` (any ordered type, usually a timestamp), or
    /// `commit_time` to compare blue's commit time with `commit_time_column`. A rule may
    /// override it with its own `lww_column`.
    #[serde(default = "default_lww_column")]
    pub lww_column: String,
    /// Target column (timestamptz) in which shadowsync stores blue's commit time for
    /// `lww_column = "commit_time"`; green's own writers should set it too (e.g. a trigger
    /// setting now(), which shadowsync's replica-role session does not fire).
    #[serde(default = "default_commit_time_column")]
    pub commit_time_column: String,
    /// Detect and record conflicts (true); false applies blue's changes blindly, as
    /// PostgreSQL's own apply worker does, and records nothing.
    #[serde(default = "default_detect")]
    pub detect: bool,
}

impl Default for ConflictsConfig {
    fn default() -> Self {
        ConflictsConfig {
            resolution: Resolution::Lww,
            lww_column: DEFAULT_LWW_COLUMN.to_string(),
            commit_time_column: DEFAULT_COMMIT_TIME_COLUMN.to_string(),
            detect: true,
        }
    }
}

fn default_lww_column() -> String {
    DEFAULT_LWW_COLUMN.to_string()
}
fn default_commit_time_column() -> String {
    DEFAULT_COMMIT_TIME_COLUMN.to_string()
}
fn default_detect() -> bool {
    true
}

/// How conflicts with rows green changed itself are handled for one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// Not detected: blue's changes are applied as they come (`[conflicts] detect = false`).
    Off,
    /// Detected and recorded in `shadowsync.conflicts`; with `lww`, a newer green row is kept.
    Detect { lww: Option<Lww> },
}

/// What last-writer-wins compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lww {
    /// A written target column (index into `TableMap::columns`): the incoming row's value
    /// against green's. Deletes compare green's value with blue's commit time.
    Column(usize),
    /// A green `timestamptz` column that every write sets to blue's commit time, compared with
    /// the incoming change's commit time.
    CommitTime(String),
}

impl ConflictPolicy {
    pub fn detects(&self) -> bool {
        matches!(self, ConflictPolicy::Detect { .. })
    }

    pub fn lww(&self) -> Option<&Lww> {
        match self {
            ConflictPolicy::Detect { lww } => lww.as_ref(),
            ConflictPolicy::Off => None,
        }
    }

    /// `lww` or `apply`, for logs and `check`.
    pub fn describe(&self, columns: &[TargetColumn]) -> String {
        match self {
            ConflictPolicy::Off => "not detected".into(),
            ConflictPolicy::Detect { lww: None } => "apply (blue wins)".into(),
            ConflictPolicy::Detect {
                lww: Some(Lww::Column(i)),
            } => format!("lww on {}", columns[*i].name),
            ConflictPolicy::Detect {
                lww: Some(Lww::CommitTime(c)),
            } => format!("lww on blue's commit time (stored in {c})"),
        }
    }
}

/// The policy of a mapping onto `green` writing `columns`. A comparison column named by the
/// rule must exist; the config's default falls back to `apply` on tables without it.
pub fn policy(
    defaults: &ConflictsConfig,
    rule: Option<&Rule>,
    green: &GreenTable,
    columns: &[TargetColumn],
) -> Result<ConflictPolicy, MapError> {
    if !defaults.detect {
        return Ok(ConflictPolicy::Off);
    }
    let explicit = rule.and_then(|r| r.lww_column.as_ref());
    let name = match (explicit, defaults.resolution) {
        (Some(c), _) => Some((c.value.as_str(), Some(&c.origin))),
        (None, Resolution::Lww) => Some((defaults.lww_column.as_str(), None)),
        (None, Resolution::Apply) => None,
    };
    let Some((name, origin)) = name else {
        return Ok(ConflictPolicy::Detect { lww: None });
    };
    let target = &green.name;
    let fail = |origin: Option<&Origin>, message: String| match origin {
        Some(o) => MapError::Rule {
            origin: o.clone(),
            message,
        },
        None => MapError::Conflicts { message },
    };
    if name == LWW_COMMIT_TIME {
        let column = &defaults.commit_time_column;
        let Some(g) = green.columns.iter().find(|g| &g.name == column) else {
            return Err(fail(
                origin,
                format!(
                    "last-writer-wins on commit_time needs column {column} on green table {target}, where shadowsync stores blue's commit time: ALTER TABLE {} ADD COLUMN {} timestamptz (or set [conflicts] commit_time_column)",
                    target.quoted(),
                    super::quote_ident(column)
                ),
            ));
        };
        if g.sql_type != "timestamp with time zone" {
            return Err(fail(
                origin,
                format!(
                    "column {column} of green table {target} holds blue's commit time for last-writer-wins and must be timestamptz, not {}",
                    g.sql_type
                ),
            ));
        }
        if columns.iter().any(|c| &c.name == column) {
            return Err(fail(
                origin,
                format!(
                    "column {column} of green table {target} holds blue's commit time for last-writer-wins, but the mapping also writes it from blue: rename one of them"
                ),
            ));
        }
        return Ok(ConflictPolicy::Detect {
            lww: Some(Lww::CommitTime(column.clone())),
        });
    }
    match columns.iter().position(|c| c.name == name) {
        Some(i) => Ok(ConflictPolicy::Detect {
            lww: Some(Lww::Column(i)),
        }),
        None if origin.is_some() => Err(fail(
            origin,
            format!(
                "lww_column {name} is not a column the mapping writes on green table {target}: name a written column (such as updated_at), or \"commit_time\""
            ),
        )),
        // The default comparison column is absent: blue wins on this table.
        None => Ok(ConflictPolicy::Detect { lww: None }),
    }
}
