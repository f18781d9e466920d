//! Replication origins: how shadowsync's writes are told apart from the application's, so that
//! two streams between the same databases (forward blue -> green, reverse green -> blue) never
//! echo each other's writes.
//!
//! Role:
//! - **Marking** (`[origin] mark`): the apply session sets up the replication origin
//!   `shadowsync_<slot>` on its database (`pg_replication_origin_create` when missing, then
//!   `pg_replication_origin_session_setup`), so every transaction it commits carries that origin
//!   in the WAL. It also sets the session variable `shadowsync.origin` to the origin's name: the
//!   cutover's fence lets exactly that origin through (see `fence`).
//! - **Skipping** (`[origin] skip_shadowsync`): a transaction whose pgoutput `Origin` message
//!   names a shadowsync origin (`shadowsync_` prefix) is not applied. Foreign origins (blue
//!   being itself a native subscriber) are applied as any other transaction.
//!
//! Invariants:
//! - The origin name is a function of the slot only, so a restarted session marks with the
//!   same origin, and a reader skips it whatever process wrote it.
//! - A skipped transaction still ends a blue transaction for the apply stage (its end LSN is
//!   published once everything before it is committed in green), so the slot advances past it;
//!   a restart before that re-reads and skips it again: skipping is idempotent.
//! - On PostgreSQL 15 the origin functions need superuser or `EXECUTE` granted on them
//!   ([`grant_sql`]); `check` reports which, and `mark = "on"` refuses to run without it.

use serde::Deserialize;
use tokio_postgres::Client;

use crate::failure::{DbFailure, SqlState};

/// Prefix of every origin shadowsync creates; transactions carrying one are skipped.
pub const PREFIX: &str = "shadowsync_";
/// The session variable naming the origin an apply session marks with (read by the fence).
pub const SESSION_VARIABLE: &str = "shadowsync.origin";
/// How long a session waits for a predecessor's backend to let go of the origin.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The statements granting a non-superuser what marking needs (PostgreSQL 15).
pub fn grant_sql(user: &str) -> String {
    let user = crate::transform::quote_ident(user);
    format!(
        "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
         pg_replication_origin_oid(text), pg_replication_origin_session_setup(text) TO {user}"
    )
}

/// Whether the apply session marks its writes with an origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    /// Mark when the user may; otherwise log a warning once per session and write unmarked.
    #[default]
    Auto,
    /// Always mark; `run` refuses (with the GRANT to run) when the user may not.
    On,
    /// Never mark.
    Off,
}

/// `[origin]` of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// `auto` (default), `on` or `off`: mark the apply session's writes with the replication
    /// origin `shadowsync_<slot>`.
    #[serde(default)]
    pub mark: Mark,
    /// Skip the transactions whose origin is a shadowsync one (default true): another
    /// shadowsync stream wrote them into this stream's source. Turn off only to cascade
    /// (blue -> green -> a third database, each hop by shadowsync).
    #[serde(default = "default_skip")]
    pub skip_shadowsync: bool,
}

fn default_skip() -> bool {
    true
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            mark: Mark::Auto,
            skip_shadowsync: true,
        }
    }
}

/// The origin an apply session of `slot` marks with.
pub fn name(slot: &str) -> String {
    format!("{PREFIX}{slot}")
}

/// Which transactions the apply stage skips, by their `Origin` message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    pub skip_shadowsync: bool,
}

impl Filter {
    pub fn of(config: &OriginConfig) -> Filter {
        Filter {
            skip_shadowsync: config.skip_shadowsync,
        }
    }

    /// A transaction carrying origin `name` is one of shadowsync's own writes: skip it.
    pub fn skips(&self, name: &[u8]) -> bool {
        self.skip_shadowsync && name.starts_with(PREFIX.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("{side}, {context}: {failure}")]
    Db {
        side: &'static str,
        context: &'static str,
        failure: DbFailure,
    },
    #[error(
        "[origin] mark = \"on\", but user {user} may not set up replication origins on {side} (PostgreSQL 15 needs superuser or EXECUTE on the origin functions): run on {side} as a superuser: `{grant}` (or set [origin] mark = \"auto\" to write unmarked, accepting that a reverse stream would echo these writes)"
    )]
    Privilege {
        side: &'static str,
        user: String,
        grant: String,
    },
    #[error(
        "{side} carries the fence of an earlier cutover (it is the old blue of a rollback) on {tables}, which lets through only the writes marked with origin {allowed}; this stream's writes {ours}: set [origin] mark = \"on\" in this config (its blue.slot must be the forward config's reverse.slot), grant the origin functions if needed (see check), and run again"
    )]
    Fenced {
        side: &'static str,
        tables: String,
        allowed: String,
        ours: String,
    },
    #[error(
        "{side} has max_replication_slots = 0, which also bounds the replication origins it can track: set it to at least 1 (restart) to mark this stream's writes"
    )]
    NoOriginSlots { side: &'static str },
    #[error(
        "replication origin {origin} is still in use by another session on {side} (a predecessor's backend that has not exited yet); retrying"
    )]
    Busy { side: &'static str, origin: String },
}

impl OriginError {
    pub fn is_retryable(&self) -> bool {
        match self {
            OriginError::Db { failure, .. } => failure.is_retryable(),
            OriginError::Busy { .. } => true,
            OriginError::Privilege { .. }
            | OriginError::NoOriginSlots { .. }
            | OriginError::Fenced { .. } => false,
        }
    }
}

fn db(
    side: &'static str,
    context: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> OriginError {
    move |e| OriginError::Db {
        side,
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// What `check` says about marking on one database.
#[derive(Debug, Clone)]
pub struct Privilege {
    pub user: String,
    /// Superuser, or EXECUTE on the functions marking needs.
    pub may_mark: bool,
    /// `max_replication_slots`, which also bounds the origins a server can track (0: none).
    pub max_replication_slots: i32,
}

impl Privilege {
    /// Why a session of this user may not mark its writes on `side`; `None` when it may.
    pub fn refusal(&self, side: &'static str) -> Option<OriginError> {
        if !self.may_mark {
            return Some(OriginError::Privilege {
                side,
                user: self.user.clone(),
                grant: grant_sql(&self.user),
            });
        }
        (self.max_replication_slots == 0).then_some(OriginError::NoOriginSlots { side })
    }
}

/// Whether the session's user may create and set up replication origins. Writes nothing.
pub async fn privilege(client: &Client, side: &'static str) -> Result<Privilege, OriginError> {
    let row = client
        .query_one(
            "SELECT current_user::text,
                    has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE')
                AND has_function_privilege('pg_replication_origin_oid(text)', 'EXECUTE')
                AND has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE'),
                    current_setting('max_replication_slots')::int",
            &[],
        )
        .await
        .map_err(db(side, "reading the replication origin privileges"))?;
    Ok(Privilege {
        user: row.get(0),
        may_mark: row.get(1),
        max_replication_slots: row.get(2),
    })
}

/// What `check` says of `[origin]` on the database the stream writes (`side`): a note, or a
/// problem when `mark = "on"` cannot be honoured. Writes nothing.
pub async fn check(
    client: &Client,
    side: &'static str,
    config: &OriginConfig,
    slot: &str,
) -> Result<Result<String, String>, OriginError> {
    let skip = if config.skip_shadowsync {
        "transactions carrying a shadowsync origin are skipped (no echo)"
    } else {
        "transactions carrying a shadowsync origin are applied ([origin] skip_shadowsync = false)"
    };
    if config.mark == Mark::Off {
        return Ok(Ok(format!(
            "origin: writes to {side} are not marked ([origin] mark = \"off\"): a reverse stream would echo them; {skip}"
        )));
    }
    let p = privilege(client, side).await?;
    let origin = name(slot);
    Ok(match (p.refusal(side), config.mark) {
        (None, _) => Ok(format!(
            "origin: writes to {side} are marked with replication origin {origin} (user {} is superuser or may EXECUTE the origin functions); {skip}",
            p.user
        )),
        (Some(refusal), Mark::On) => Err(refusal.to_string()),
        (Some(OriginError::NoOriginSlots { .. }), _) => Ok(format!(
            "origin: {side} has max_replication_slots = 0, which leaves no replication origin to mark with, so writes go unmarked and a reverse stream would echo them; set it to at least 1 (restart) to mark them; {skip}"
        )),
        (Some(_), _) => Ok(format!(
            "origin: user {} may not set up replication origins on {side}, so its writes go unmarked and a reverse stream would echo them; to mark them (needed for a rollback stream), PostgreSQL 15 needs superuser or, run by a superuser, `{}`; {skip}",
            p.user,
            grant_sql(&p.user)
        )),
    })
}

/// Marks the session's writes with the origin of `slot` as `mode` says (see the module doc);
/// returns the origin's name when marked. Call on a session that holds the slot's session lock
/// (one apply session per slot), before it writes.
pub async fn mark_session(
    client: &Client,
    side: &'static str,
    slot: &str,
    mode: Mark,
) -> Result<Option<String>, OriginError> {
    if mode == Mark::Off {
        return Ok(None);
    }
    let p = privilege(client, side).await?;
    if let Some(refusal) = p.refusal(side) {
        if mode == Mark::On {
            return Err(refusal);
        }
        tracing::warn!(
            side,
            user = %p.user,
            why = %refusal,
            "writes are not marked with a replication origin: a reverse stream would echo them; see [origin] in the README"
        );
        return Ok(None);
    }
    let origin = name(slot);
    client
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL",
            &[&origin],
        )
        .await
        .map_err(db(side, "creating the replication origin"))?;
    setup(client, side, &origin).await?;
    client
        .execute(
            "SELECT set_config($1, $2, false)",
            &[&SESSION_VARIABLE, &origin],
        )
        .await
        .map_err(db(side, "naming the session's origin"))?;
    tracing::info!(side, origin = %origin, "apply session marked with its replication origin");
    Ok(Some(origin))
}

/// Before a stream writes into a database that carries a cutover fence (trigger `trigger`, the
/// old blue of a rollback): the fence must let this session's origin `marked` through, or
/// every write would be refused. No fence: nothing to check.
pub async fn check_fence(
    client: &Client,
    side: &'static str,
    trigger: &str,
    marked: Option<&str>,
) -> Result<(), OriginError> {
    // tgargs: the trigger's arguments, each ended by a NUL byte.
    let rows = client
        .query(
            "SELECT tgrelid::regclass::text, tgargs FROM pg_trigger
              WHERE tgname = $1 AND NOT tgisinternal ORDER BY 1",
            &[&trigger],
        )
        .await
        .map_err(db(side, "looking for a cutover fence"))?;
    let mut blocked = Vec::new();
    let mut allowed = std::collections::BTreeSet::new();
    for row in &rows {
        let args: Vec<u8> = row.get(1);
        let names: Vec<String> = args
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !marked.is_some_and(|m| names.iter().any(|n| n == m)) {
            blocked.push(row.get::<_, String>(0));
        }
        allowed.extend(names);
    }
    if blocked.is_empty() {
        return Ok(());
    }
    let allowed: Vec<String> = allowed.into_iter().collect();
    Err(OriginError::Fenced {
        side,
        tables: blocked.join(", "),
        allowed: if allowed.is_empty() {
            "(none)".to_string()
        } else {
            allowed.join(", ")
        },
        ours: match marked {
            Some(m) => format!("are marked with {m}"),
            None => "are not marked".to_string(),
        },
    })
}

/// `pg_replication_origin_session_setup`, waiting (bounded) for a predecessor's backend that
/// still holds the origin: it has released the slot's session lock, and exits right after.
async fn setup(client: &Client, side: &'static str, origin: &str) -> Result<(), OriginError> {
    let started = std::time::Instant::now();
    loop {
        match client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                let failure = DbFailure::from_pg(&e);
                if !failure.is(&SqlState::OBJECT_IN_USE) {
                    return Err(OriginError::Db {
                        side,
                        context: "setting up the session's replication origin",
                        failure,
                    });
                }
                if started.elapsed() >= BUSY_WAIT {
                    return Err(OriginError::Busy {
                        side,
                        origin: origin.to_string(),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shadowsync_origins_are_skipped() {
        let f = Filter {
            skip_shadowsync: true,
        };
        assert!(f.skips(name("novacron_rollback").as_bytes()));
        assert!(!f.skips(b"pg_16384"), "a native subscription's origin");
        assert!(!f.skips(b"shadowsyn"));
        let off = Filter {
            skip_shadowsync: false,
        };
        assert!(!off.skips(name("x").as_bytes()));
    }

    #[test]
    fn the_grant_quotes_the_user() {
        let sql = grant_sql("App User");
        assert!(sql.ends_with("TO \"App User\""), "{sql}");
    }
}
