//! Green's sequences at cutover: the copy and the stream write blue's ids into green
//! explicitly, so green's sequences stay where they were created, and the application's first
//! INSERT on green without an id would take a value blue already used (a duplicate key). This
//! module sets each green sequence from its blue one.
//!
//! Role: [`discover`] pairs each blue sequence with the green sequence that carries it on
//! (through the mappings' table and column renames, `[[sequence]]` entries, or the same name);
//! [`plan`] reads both sides and decides, per pair, the value to set or why none; [`apply`] sets
//! them inside the caller's green transaction (so the cutover can do it together with its
//! bookkeeping); [`command`] is `shadowsync sequences`.
//!
//! Invariants:
//! - a green sequence never moves backwards in its increment's direction: one already at or
//!   past its target is left alone, and this is checked again just before each `setval`, so
//!   applying a plan twice changes nothing the second time;
//! - each green sequence is set at most once per plan, however many columns or blue sequences
//!   lead to it (the furthest target wins);
//! - identifiers are always quoted and values always parameters (a sequence is named to
//!   `setval` by its oid, sent as `regclass`);
//! - nothing is written to blue, and without `apply` nothing to green.
//!
//! `setval` is not transactional: if the caller's transaction rolls back, the values set stay.
//! They only ever moved forward, so a retry finds those sequences already ahead.

mod discover;
mod read;
mod report;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::GenericClient;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tracing::{debug, info};

pub use discover::{copy_of, discover};
use read::{Need, read, read_all, require};
pub use report::Report;

use crate::failure::DbFailure;
use crate::transform::rules::{Origin, RuleSet};
use crate::transform::{QualifiedName, TableMap};

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Blue,
    Green,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Blue => "blue",
            Side::Green => "green",
        })
    }
}

/// A sequence on one side, by name and oid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub name: QualifiedName,
    pub oid: u32,
}

/// Why a blue sequence is paired with a green one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Green's column is copied from blue's: the sequence behind blue's column carries on in
    /// the one behind green's.
    Column {
        blue_table: QualifiedName,
        blue_column: String,
        green_table: QualifiedName,
        green_column: String,
    },
    /// A `[[sequence]]` entry.
    Entry(Origin),
    /// No column owns the blue sequence; green has one of the same name.
    SameName,
    /// No column owns the blue sequence, and green has none of its name.
    Unowned,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Column {
                blue_table,
                blue_column,
                green_table,
                green_column,
            } => write!(
                f,
                "{blue_table}.{blue_column} -> {green_table}.{green_column}"
            ),
            Via::Entry(origin) => write!(f, "[[sequence]] at {origin}"),
            Via::SameName => f.write_str("no column owns it; same name on green"),
            Via::Unowned => f.write_str("no column owns it"),
        }
    }
}

/// A blue sequence and the green sequence that carries it on (`None`: green has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub blue: Sequence,
    pub green: Option<Sequence>,
    pub via: Vec<Via>,
}

/// Where a sequence stands, as its relation says (`SELECT last_value, is_called FROM seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub last_value: i64,
    /// False before the first `nextval` (or after a RESTART): `nextval` then returns
    /// `last_value` itself.
    pub is_called: bool,
}

/// A sequence's position and definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub position: Position,
    pub increment: i64,
    pub start: i64,
    pub min: i64,
    pub max: i64,
}

impl State {
    /// The last value handed out, or, before the first `nextval`, one step before the value it
    /// will return (in i128: that may lie outside the sequence's type).
    pub fn issued(&self) -> i128 {
        let last = i128::from(self.position.last_value);
        if self.position.is_called {
            last
        } else {
            last - i128::from(self.increment)
        }
    }

    /// Blue's value to carry on: the last value handed out; `None` when the sequence never
    /// handed one out (created or restarted at its start, or at its bound, and not called).
    pub fn carried(&self) -> Option<i64> {
        if !self.position.is_called && self.position.last_value == self.start {
            return None;
        }
        let issued = self.issued();
        let within = (i128::from(self.min)..=i128::from(self.max)).contains(&issued);
        within.then_some(issued as i64)
    }

    /// Whether the sequence already stands at or past `target` in its increment's direction.
    pub fn reached(&self, target: i128) -> bool {
        (self.issued() - target) * i128::from(self.increment.signum()) >= 0
    }
}

/// Why a green sequence is left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leave {
    /// Green is at or past blue's value plus the headroom.
    AlreadyAhead,
    /// Blue never handed out a value: there is nothing to carry on.
    BlueNeverUsed,
    /// Green has no sequence for it: the operator must say which (or none is needed).
    NoGreenSequence,
    /// Another blue sequence sets the same green sequence further.
    SetFurther { by: QualifiedName },
}

impl std::fmt::Display for Leave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leave::AlreadyAhead => f.write_str("already ahead"),
            Leave::BlueNeverUsed => f.write_str("blue never used it"),
            Leave::NoGreenSequence => f.write_str("no green sequence: add a [[sequence]] entry"),
            Leave::SetFurther { by } => write!(f, "set further for blue {by}"),
        }
    }
}

/// What to do with one green sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `setval(green, value, true)`: green's next value is `value` plus its increment.
    Set {
        value: i64,
    },
    Leave(Leave),
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Set { value } => write!(f, "set to {value}"),
            Decision::Leave(why) => write!(f, "left: {why}"),
        }
    }
}

/// One blue sequence, its green sequence, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub blue: QualifiedName,
    pub green: Option<Sequence>,
    pub via: Vec<Via>,
    /// The last value blue handed out; `None` when it never did.
    pub blue_value: Option<i64>,
    /// Green's sequence when planned; `None` without a green sequence.
    pub green_before: Option<State>,
    pub decision: Decision,
}

impl Plan {
    /// Why this pair exists, for messages.
    pub fn via_text(&self) -> String {
        via_text(&self.via)
    }
}

fn via_text(via: &[Via]) -> String {
    via.iter()
        .map(Via::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(
        "cannot connect to {side} ({dsn}): {failure}; check {side}.dsn and that the server is up"
    )]
    Connect {
        side: Side,
        dsn: String,
        failure: Box<DbFailure>,
    },
    #[error("{side}: {context}: {failure}")]
    Catalog {
        side: Side,
        context: String,
        failure: Box<DbFailure>,
    },
    #[error(
        "{origin}: [[sequence]] names {side} sequence {sequence}, which does not exist on {side}: fix the name (schema-qualified, as in \\d) or create the sequence on {side}"
    )]
    EntryMissing {
        origin: Origin,
        side: Side,
        sequence: QualifiedName,
    },
    #[error(
        "{side} user {user} may not {action} {}: run on {side}: {}",
        .sequences.join(", "),
        .grants.join(" ")
    )]
    Privilege {
        side: Side,
        user: String,
        action: &'static str,
        /// Each sequence with what leads to it (tables and columns).
        sequences: Vec<String>,
        grants: Vec<String>,
    },
    #[error("reading {side} sequence {sequence} ({via}): {failure}")]
    Read {
        side: Side,
        sequence: QualifiedName,
        via: String,
        failure: Box<DbFailure>,
    },
    #[error(
        "blue sequence {blue} counts {} (INCREMENT BY {blue_increment}) but green sequence {green} counts {} (INCREMENT BY {green_increment}) ({via}): blue's value means nothing to green; make them agree (ALTER SEQUENCE {} INCREMENT BY {blue_increment} on green) or pair it with another green sequence in a [[sequence]] entry",
        direction(*.blue_increment),
        direction(*.green_increment),
        .green.quoted()
    )]
    Direction {
        blue: String,
        green: QualifiedName,
        via: String,
        blue_increment: i64,
        green_increment: i64,
    },
    #[error(
        "green sequence {green} ({via}) cannot take {target} (blue's value plus the headroom): its range is {min} to {max}; lower --headroom, or widen it (ALTER SEQUENCE {} AS bigint MINVALUE ... MAXVALUE ... on green)",
        .green.quoted()
    )]
    OutOfRange {
        green: QualifiedName,
        via: String,
        target: i128,
        min: i64,
        max: i64,
    },
    #[error(
        "setting green sequence {sequence} to {value} ({via}): {failure}; sequences set before it keep their values (they only moved forward): fix the cause and run again"
    )]
    Set {
        sequence: QualifiedName,
        value: i64,
        via: String,
        failure: Box<DbFailure>,
    },
    #[error("green: {context}: {failure}")]
    Transaction {
        context: &'static str,
        failure: Box<DbFailure>,
    },
}

fn direction(increment: i64) -> &'static str {
    if increment < 0 { "down" } else { "up" }
}

/// An oid sent as `regclass`, so that `setval($1::regclass, ...)` names its sequence by oid,
/// never by text that could be parsed differently.
#[derive(Debug)]
struct RegClass(u32);

impl ToSql for RegClass {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        bytes::BufMut::put_u32(out, self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::REGCLASS
    }

    to_sql_checked!();
}

/// The plan for every pair of sequences of `maps` (the published tables' mappings) and
/// `rules` (`[[sequence]]` entries): [`discover`], then [`plan_links`].
pub async fn plan(
    blue: &impl GenericClient,
    green: &impl GenericClient,
    maps: &[Arc<TableMap>],
    rules: &RuleSet,
    headroom: u64,
) -> Result<Vec<Plan>, SequenceError> {
    let links = discover(blue, green, maps, rules).await?;
    plan_links(blue, green, &links, headroom).await
}

/// Reads both sides of every link and decides: green is set to blue's last value plus
/// `headroom` steps of blue's increment, unless green is already there or further. Writes
/// nothing; fails when a sequence cannot be read or would not be settable (privileges,
/// directions, ranges), so that a dry run finds what `apply` would meet.
pub async fn plan_links(
    blue: &impl GenericClient,
    green: &impl GenericClient,
    links: &[Link],
    headroom: u64,
) -> Result<Vec<Plan>, SequenceError> {
    let blue_seqs: Vec<(&Sequence, &[Via])> = links.iter().map(|l| (&l.blue, &l.via[..])).collect();
    require(blue, Side::Blue, &blue_seqs, Need::Read).await?;
    let blue_states = read_all(blue, Side::Blue, &blue_seqs).await?;
    let green_seqs: Vec<(&Sequence, &[Via])> = links
        .iter()
        .filter(|l| blue_states[&l.blue.oid].carried().is_some())
        .filter_map(|l| Some((l.green.as_ref()?, &l.via[..])))
        .collect();
    require(green, Side::Green, &green_seqs, Need::Read).await?;
    let green_states = read_all(green, Side::Green, &green_seqs).await?;
    let mut plans = Vec::with_capacity(links.len());
    for link in links {
        let blue_state = &blue_states[&link.blue.oid];
        let green_state = link.green.as_ref().and_then(|g| green_states.get(&g.oid));
        plans.push(decide(link, blue_state, green_state, headroom)?);
    }
    settle_shared(&mut plans);
    let to_set: Vec<(&Sequence, &[Via])> = plans
        .iter()
        .filter(|p| matches!(p.decision, Decision::Set { .. }))
        .filter_map(|p| Some((p.green.as_ref()?, &p.via[..])))
        .collect();
    require(green, Side::Green, &to_set, Need::Set).await?;
    Ok(plans)
}

/// One link's plan, from both sides' states (`green` is `None` without a green sequence, and
/// when blue never used its own: green's is then not read).
fn decide(
    link: &Link,
    blue: &State,
    green: Option<&State>,
    headroom: u64,
) -> Result<Plan, SequenceError> {
    let via = via_text(&link.via);
    let blue_value = blue.carried();
    let mut plan = Plan {
        blue: link.blue.name.clone(),
        green: link.green.clone(),
        via: link.via.clone(),
        blue_value,
        green_before: green.copied(),
        decision: Decision::Leave(Leave::BlueNeverUsed),
    };
    let Some(value) = blue_value else {
        return Ok(plan);
    };
    let (Some(g), Some(green_seq)) = (green, &link.green) else {
        plan.decision = Decision::Leave(Leave::NoGreenSequence);
        return Ok(plan);
    };
    if blue.increment.signum() != g.increment.signum() {
        return Err(SequenceError::Direction {
            blue: link.blue.name.to_string(),
            green: green_seq.name.clone(),
            via,
            blue_increment: blue.increment,
            green_increment: g.increment,
        });
    }
    let target = i128::from(value) + i128::from(headroom) * i128::from(blue.increment);
    if g.reached(target) {
        plan.decision = Decision::Leave(Leave::AlreadyAhead);
        return Ok(plan);
    }
    if target < i128::from(g.min) || target > i128::from(g.max) {
        return Err(SequenceError::OutOfRange {
            green: green_seq.name.clone(),
            via,
            target,
            min: g.min,
            max: g.max,
        });
    }
    plan.decision = Decision::Set {
        value: target as i64,
    };
    Ok(plan)
}

/// Several blue sequences setting one green sequence (tables merged on green): only the
/// furthest target is set, so the sequence is set once and never moved back by a later one.
fn settle_shared(plans: &mut [Plan]) {
    // Green oid -> the plan with the furthest value, and how far along its direction.
    let mut furthest: HashMap<u32, (usize, i128)> = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        if let (Decision::Set { value }, Some(g), Some(state)) =
            (&p.decision, &p.green, &p.green_before)
        {
            let along = i128::from(*value) * i128::from(state.increment.signum());
            let best = furthest.entry(g.oid).or_insert((i, along));
            if along > best.1 {
                *best = (i, along);
            }
        }
    }
    for i in 0..plans.len() {
        let Some(&(winner, _)) = plans[i].green.as_ref().and_then(|g| furthest.get(&g.oid)) else {
            continue;
        };
        if winner != i && matches!(plans[i].decision, Decision::Set { .. }) {
            let by = plans[winner].blue.clone();
            plans[i].decision = Decision::Leave(Leave::SetFurther { by });
        }
    }
}

/// Sets green's sequences as planned, through `client` (the caller's green transaction, or a
/// plain connection). Each sequence is read again just before it is set, and left alone if it
/// is already at or past the planned value (a plan applied twice sets nothing the second time).
/// Returns what was done, one decision per plan.
pub async fn apply(
    client: &impl GenericClient,
    plans: &[Plan],
) -> Result<Vec<Decision>, SequenceError> {
    let to_set: Vec<(&Sequence, &[Via])> = plans
        .iter()
        .filter(|p| matches!(p.decision, Decision::Set { .. }))
        .filter_map(|p| Some((p.green.as_ref()?, &p.via[..])))
        .collect();
    require(client, Side::Green, &to_set, Need::Read).await?;
    require(client, Side::Green, &to_set, Need::Set).await?;
    let mut done = Vec::with_capacity(plans.len());
    for plan in plans {
        let (Decision::Set { value }, Some(green)) = (&plan.decision, &plan.green) else {
            done.push(plan.decision.clone());
            continue;
        };
        let now = read(client, Side::Green, green, &plan.via).await?;
        if now.reached(i128::from(*value)) {
            debug!(blue = %plan.blue, green = %green.name, value, "green sequence already at or past the value");
            done.push(Decision::Leave(Leave::AlreadyAhead));
            continue;
        }
        client
            .query_one(
                "SELECT setval($1::regclass, $2, true)",
                &[&RegClass(green.oid), value],
            )
            .await
            .map_err(|e| SequenceError::Set {
                sequence: green.name.clone(),
                value: *value,
                via: plan.via_text(),
                failure: Box::new(DbFailure::from_pg(&e)),
            })?;
        info!(
            blue = %plan.blue,
            green = %green.name,
            value,
            before_last_value = now.position.last_value,
            before_is_called = now.position.is_called,
            "green sequence set"
        );
        done.push(Decision::Set { value: *value });
    }
    Ok(done)
}

/// What `shadowsync sequences` does.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Set the sequences (in one green transaction); otherwise only plan.
    pub apply: bool,
    /// Steps of blue's increment past blue's last value.
    pub headroom: u64,
}

/// `shadowsync sequences`: maps the publication's tables as `check` does, plans every
/// sequence, and with `apply` sets them in one green transaction.
pub async fn command(
    config: &crate::config::Config,
    opts: &Options,
) -> Result<Report, SequenceError> {
    let rules = config.rules()?;
    let blue_dsn = config.blue_dsn()?;
    let green_dsn = config.green_dsn()?;
    let connect_err = |side, dsn: &crate::config::Dsn| {
        let dsn = dsn.to_string();
        move |e: tokio_postgres::Error| SequenceError::Connect {
            side,
            dsn,
            failure: Box::new(DbFailure::from_pg(&e)),
        }
    };
    let (blue, blue_conn) = blue_dsn
        .connect("shadowsync-sequences")
        .await
        .map_err(connect_err(Side::Blue, &blue_dsn))?;
    let (mut green, green_conn) = green_dsn
        .connect("shadowsync-sequences")
        .await
        .map_err(connect_err(Side::Green, &green_dsn))?;
    let result = run(&blue, &mut green, config, &rules, opts).await;
    blue_conn.abort();
    green_conn.abort();
    result
}

async fn run(
    blue: &tokio_postgres::Client,
    green: &mut tokio_postgres::Client,
    config: &crate::config::Config,
    rules: &RuleSet,
    opts: &Options,
) -> Result<Report, SequenceError> {
    let publication = &config.blue.publication;
    let tables = crate::source::catalog::check_blue(blue, publication).await?;
    let checked = crate::check::check(blue, green, &tables, publication, rules)
        .await
        .map_err(|e| SequenceError::Catalog {
            side: Side::Green,
            context: "mapping the publication's tables".to_string(),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    let maps: Vec<Arc<TableMap>> = checked
        .mappings
        .iter()
        .filter_map(|m| m.map.clone())
        .collect();
    let warnings = report::unmapped(&checked);
    let links = discover(blue, &*green, &maps, rules).await?;
    if !opts.apply {
        let plans = plan_links(blue, &*green, &links, opts.headroom).await?;
        return Ok(Report::new(plans, None, opts.headroom, warnings));
    }
    let failed = |context| {
        move |e: tokio_postgres::Error| SequenceError::Transaction {
            context,
            failure: Box::new(DbFailure::from_pg(&e)),
        }
    };
    let tx = green
        .transaction()
        .await
        .map_err(failed("beginning a transaction"))?;
    let plans = plan_links(blue, &tx, &links, opts.headroom).await?;
    let done = apply(&tx, &plans).await?;
    tx.commit().await.map_err(failed("committing"))?;
    Ok(Report::new(plans, Some(done), opts.headroom, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(last_value: i64, is_called: bool, increment: i64) -> State {
        let (min, max) = if increment > 0 {
            (1, i64::MAX)
        } else {
            (i64::MIN, -1)
        };
        State {
            position: Position {
                last_value,
                is_called,
            },
            increment,
            start: if increment > 0 { 1 } else { -1 },
            min,
            max,
        }
    }

    fn link() -> Link {
        let seq = |n: &str, oid| Sequence {
            name: QualifiedName::new("public", n),
            oid,
        };
        Link {
            blue: seq("b", 1),
            green: Some(seq("g", 2)),
            via: vec![Via::SameName],
        }
    }

    #[test]
    fn blue_values_carried() {
        assert_eq!(state(5, true, 1).carried(), Some(5));
        assert_eq!(state(1, false, 1).carried(), None);
        // Restarted at 1000, not called since: 999 was (as good as) handed out.
        assert_eq!(state(1000, false, 1).carried(), Some(999));
        assert_eq!(state(-3, true, -1).carried(), Some(-3));
        assert_eq!(state(-1, false, -1).carried(), None);
    }

    #[test]
    fn green_never_moves_back() {
        let set = |blue: State, green: State, headroom| {
            decide(&link(), &blue, Some(&green), headroom)
                .map(|p| p.decision)
                .map_err(|e| e.to_string())
        };
        let value = |value| Ok(Decision::Set { value });
        assert_eq!(set(state(5, true, 1), state(1, false, 1), 0), value(5));
        assert_eq!(set(state(5, true, 1), state(1, false, 1), 10), value(15));
        assert_eq!(
            set(state(5, true, 1), state(5, true, 1), 0),
            Ok(Decision::Leave(Leave::AlreadyAhead))
        );
        assert_eq!(
            set(state(5, true, 1), state(100, true, 1), 10),
            Ok(Decision::Leave(Leave::AlreadyAhead))
        );
        // Green unused but starting past blue: its first value is already beyond.
        assert_eq!(
            set(state(5, true, 1), state(6, false, 1), 0),
            Ok(Decision::Leave(Leave::AlreadyAhead))
        );
        assert_eq!(set(state(5, true, 1), state(5, false, 1), 0), value(5));
        // Counting down: further means lower.
        assert_eq!(set(state(-3, true, -1), state(-1, false, -1), 0), value(-3));
        assert_eq!(set(state(-3, true, -1), state(-1, false, -1), 2), value(-5));
        assert_eq!(
            set(state(-3, true, -1), state(-50, true, -1), 2),
            Ok(Decision::Leave(Leave::AlreadyAhead))
        );
        let err = set(state(5, true, 1), state(1, false, -1), 0).unwrap_err();
        assert!(
            err.contains("counts up") && err.contains("counts down"),
            "{err}"
        );
        let mut small = state(1, false, 1);
        small.max = 10;
        let err = set(state(5, true, 1), small, 10).unwrap_err();
        assert!(
            err.contains("cannot take 15") && err.contains("1 to 10"),
            "{err}"
        );
    }

    #[test]
    fn a_shared_green_sequence_is_set_once() {
        let plan = |blue: &str, value| Plan {
            blue: QualifiedName::new("public", blue),
            green: link().green,
            via: vec![],
            blue_value: Some(value),
            green_before: Some(state(1, false, 1)),
            decision: Decision::Set { value },
        };
        let mut plans = vec![plan("a", 5), plan("b", 9), plan("c", 7)];
        settle_shared(&mut plans);
        let by = QualifiedName::new("public", "b");
        assert_eq!(
            plans[0].decision,
            Decision::Leave(Leave::SetFurther { by: by.clone() })
        );
        assert_eq!(plans[1].decision, Decision::Set { value: 9 });
        assert_eq!(plans[2].decision, Decision::Leave(Leave::SetFurther { by }));
    }
}
