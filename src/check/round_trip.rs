//! `shadowsync check --round-trip REVERSE_CONFIG`: for each table pair, which of blue's columns
//! survive the forward rules (blue → green) then the inverse rules (green → blue, the rollback
//! stream's) unchanged, which are lossy, which of green's columns the inverse ignores, and which
//! of blue's columns it does not produce, judged on real rows sampled from blue.
//!
//! How, per table pair:
//! 1. The forward mapping is `check`'s (its problems are reported by `check` itself); the
//!    inverse mapping is checked the same way with the roles swapped (green's table described
//!    as the reverse stream's source, blue's as its target, the inverse's statements prepared on
//!    blue): see `check_table`.
//! 2. Up to `--sample` rows of blue's table are read as text (see `eval::sample`).
//! 3. Green evaluates the forward expressions and filter over them, `src` built from text arrays
//!    as the apply statements build it, each value as green would store it (see
//!    `eval::stored`). Lookups (`users`, `tenants`) read green's current rows, not the rows the
//!    stream saw when it wrote each row: fine for a sample.
//! 4. Blue evaluates the inverse expressions and filter over green's results, `src` cast to
//!    blue's spelling of green's types (`text` where blue lacks a type, such as green's enums),
//!    exactly as the reverse stream will on blue; lookups read blue's tables. The inverse is
//!    evaluated on blue rather than green because its target is blue: its expressions are
//!    written against blue's types (and may name types green does not have), and the comparison
//!    must be in blue's types. Green's columns the forward rules do not write (left to green's
//!    default) are NULL here; an inverse reading one is noted.
//! 5. Blue compares each produced column with the sampled original by `IS NOT DISTINCT FROM`
//!    in the column's type (by text for types without equality), and counts the changed rows.
//!
//! Invariants: nothing is written anywhere: every statement runs in a `READ ONLY` transaction
//! that is rolled back (see `eval`); no sampled value is ever printed, logged or put in an
//! error: only column names and counts leave this module (a server's message is redacted of
//! the values it quotes, as `failure::DbFailure` does for the stream). A lossy key column or a failing
//! expression makes the pair (and the command) fail; lossy columns are information.

mod eval;

use serde::Serialize;
use tokio_postgres::Client;

use super::MappingCheck;
use crate::transform::TableMap;
use crate::transform::rules::{Rule, RuleSet};

/// Rows sampled per table unless `--sample` says otherwise.
pub const DEFAULT_SAMPLE: u32 = 1000;

/// The round trip of every table pair.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    /// Rows sampled per table, at most.
    pub sample: u32,
    pub tables: Vec<Pair>,
}

impl RoundTrip {
    /// No key is lossy and every expression ran (lossy columns are information).
    pub fn ok(&self) -> bool {
        self.tables.iter().all(|t| t.problems.is_empty())
    }

    /// The JSON report: `check`'s verdict (its problems), the round trip, and `ok` for both.
    pub fn json(&self, check: &super::Report) -> serde_json::Value {
        let problems: Vec<&String> = check
            .mappings
            .iter()
            .flat_map(|m| &m.problems)
            .chain(&check.problems)
            .collect();
        serde_json::json!({
            "check": { "ok": check.ok(), "problems": problems },
            "round_trip": self,
            "ok": check.ok() && self.ok(),
        })
    }

    /// The report for a person, in the style of `check`'s.
    pub fn text(&self) -> String {
        let mut out = format!(
            "round trip: forward then inverse rules over up to {} rows sampled from each blue table, evaluated in rolled-back read-only transactions (no values shown)\n",
            self.sample
        );
        for t in &self.tables {
            t.text(&mut out);
        }
        out
    }
}

/// One blue table's round trip.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// Blue's table.
    pub source: String,
    /// Green's table (`None`: the forward rules skip the table).
    pub target: Option<String>,
    /// Where the forward rule was written (`None`: identity).
    pub rule: Option<String>,
    /// Where the inverse rule was written (`None`: identity).
    pub inverse_rule: Option<String>,
    /// `unchanged`, `lossy`, `failed`, or `skipped` (not streamed, the forward mapping has
    /// problems, or no sampled row to compare).
    pub status: &'static str,
    /// Both directions ran over the sample: the counts and column verdicts below are the
    /// sample's (`false`: skipped, or failed before the comparison).
    pub evaluated: bool,
    /// Rows sampled from blue.
    pub sampled: u64,
    /// Sampled rows the forward filter keeps out of green.
    pub not_in_green: u64,
    /// Rows in green the inverse filter keeps out of blue (the reverse stream would delete them).
    pub dropped_by_inverse: u64,
    /// Rows compared column by column (in green, and back in blue).
    pub compared: u64,
    /// Blue columns equal to the original on every compared row.
    pub unchanged: Vec<String>,
    pub lossy: Vec<Lossy>,
    /// Blue columns the inverse does not produce (left to blue's default on insert).
    pub not_produced: Vec<String>,
    /// Green columns no inverse expression or filter reads.
    pub ignored: Vec<String>,
    /// Green columns the forward rules do not write (green's default) that the inverse reads:
    /// evaluated as NULL here.
    pub unwritten_read: Vec<String>,
    /// Why the pair fails: a lossy key, a failing expression, an inverse that does not fit.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// A blue column that does not survive the round trip on every compared row.
#[derive(Debug, Clone, Serialize)]
pub struct Lossy {
    pub column: String,
    /// Compared rows whose value changed.
    pub changed: u64,
    /// Part of blue's key: the reverse stream could not match rows.
    pub key: bool,
}

impl Pair {
    fn new(forward: &MappingCheck) -> Pair {
        Pair {
            source: forward.source.to_string(),
            target: forward.target.as_ref().map(|t| t.to_string()),
            rule: forward.rule.as_ref().map(|o| o.to_string()),
            inverse_rule: None,
            status: "skipped",
            evaluated: false,
            sampled: 0,
            not_in_green: 0,
            dropped_by_inverse: 0,
            compared: 0,
            unchanged: Vec::new(),
            lossy: Vec::new(),
            not_produced: Vec::new(),
            ignored: Vec::new(),
            unwritten_read: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn text(&self, out: &mut String) {
        let tag = match self.status {
            "unchanged" => "ok  ",
            "lossy" => "loss",
            "failed" => "FAIL",
            _ => "skip",
        };
        let how = |o: &Option<String>| {
            o.as_ref()
                .map_or("identity".into(), |o| format!("rule {o}"))
        };
        let head = match &self.target {
            Some(t) => format!(
                "{tag} {} -> {t} -> {} ({}, inverse {})",
                self.source,
                self.source,
                how(&self.rule),
                how(&self.inverse_rule)
            ),
            None => format!("{tag} {} ({})", self.source, how(&self.rule)),
        };
        out.push_str(&head);
        if !self.evaluated && self.sampled > 0 {
            out.push_str(&format!(
                ": {} rows sampled, not compared (see below)",
                self.sampled
            ));
        } else if self.evaluated {
            out.push_str(&format!(
                ": {} rows sampled, {} not in green (forward filter), {} dropped by the inverse filter, {} compared",
                self.sampled, self.not_in_green, self.dropped_by_inverse, self.compared
            ));
        }
        out.push('\n');
        let mut line = |label: &str, items: &[String]| {
            if !items.is_empty() {
                out.push_str(&format!("     {label}: {}\n", items.join(", ")));
            }
        };
        line("unchanged", &self.unchanged);
        let lossy: Vec<String> = self
            .lossy
            .iter()
            .map(|l| {
                let key = if l.key { " KEY" } else { "" };
                format!(
                    "{}{key} ({} of {} rows changed)",
                    l.column, l.changed, self.compared
                )
            })
            .collect();
        line("lossy", &lossy);
        line(
            "not produced by the inverse (blue's default)",
            &self.not_produced,
        );
        line("green columns the inverse ignores", &self.ignored);
        line(
            "green columns not written forward but read by the inverse (NULL here)",
            &self.unwritten_read,
        );
        for p in &self.problems {
            out.push_str(&format!("     {p}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("     note: {n}\n"));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoundTripError {
    #[error(transparent)]
    Check(#[from] super::CheckError),
    #[error(
        "{side}: {context} of {table}: {failure}; the database failed, not the rules: check that it is up and run the check again"
    )]
    Db {
        side: &'static str,
        context: &'static str,
        table: String,
        failure: Box<crate::failure::DbFailure>,
    },
}

fn db(
    side: &'static str,
    context: &'static str,
    table: &str,
) -> impl FnOnce(tokio_postgres::Error) -> RoundTripError {
    let table = table.to_string();
    move |e| RoundTripError::Db {
        side,
        context,
        table,
        failure: Box::new(crate::failure::DbFailure::from_pg(&e)),
    }
}

/// What the round trip of every pair needs.
pub struct Ctx<'a> {
    pub blue: &'a Client,
    pub green: &'a Client,
    pub rules: &'a RuleSet,
    pub inverse_rules: &'a RuleSet,
    /// The forward stream's publication (on blue).
    pub publication: &'a str,
    /// The reverse stream's publication (on green; its column lists limit what it carries).
    pub inverse_publication: &'a str,
    pub sample: u32,
}

/// The round trip of every table `check` mapped (`forward`: its verdicts).
pub async fn run(cx: &Ctx<'_>, forward: &[MappingCheck]) -> Result<RoundTrip, RoundTripError> {
    let mut tables = Vec::with_capacity(forward.len());
    for f in forward {
        tables.push(pair(cx, f).await?);
    }
    Ok(RoundTrip {
        sample: cx.sample,
        tables,
    })
}

async fn pair(cx: &Ctx<'_>, forward: &MappingCheck) -> Result<Pair, RoundTripError> {
    let mut out = Pair::new(forward);
    let (Some(target), Some(map)) = (&forward.target, &forward.map) else {
        if forward.target.is_some() {
            out.notes
                .push("the forward mapping has problems (listed by check): not evaluated".into());
        } else {
            out.notes
                .push("not streamed to green: the round trip does not apply".into());
        }
        return Ok(out);
    };
    if !forward.problems.is_empty() {
        out.notes
            .push("the forward mapping has problems (listed by check): not evaluated".into());
        return Ok(out);
    }
    let label = map.source.to_string();
    let inverse = super::check_table(
        cx.green,
        cx.blue,
        target,
        cx.inverse_publication,
        cx.inverse_rules,
    )
    .await
    .map_err(db("green", "checking the inverse mapping", &label))?;
    out.inverse_rule = inverse.rule.as_ref().map(|o| o.to_string());
    let Some(inv) = inverse_map(&inverse, map, &mut out) else {
        out.status = "failed";
        return Ok(out);
    };
    let inv_rule = cx.inverse_rules.get(&inv.source);
    columns_read(map, &inv, &mut out);
    evaluate(cx, map, &inv, inv_rule, &mut out).await?;
    out.status = if !out.problems.is_empty() {
        "failed"
    } else if out.compared == 0 && out.dropped_by_inverse == 0 {
        "skipped"
    } else if out.lossy.is_empty() && out.dropped_by_inverse == 0 {
        "unchanged"
    } else {
        "lossy"
    };
    Ok(out)
}

/// The inverse mapping of `map`, when it maps green's table back onto blue's and fits.
fn inverse_map(
    inverse: &MappingCheck,
    map: &TableMap,
    out: &mut Pair,
) -> Option<std::sync::Arc<TableMap>> {
    out.notes
        .extend(inverse.warnings.iter().map(|w| format!("inverse: {w}")));
    let problems: Vec<String> = inverse
        .problems
        .iter()
        .map(|p| format!("inverse mapping: {p}"))
        .collect();
    if !problems.is_empty() {
        out.problems = problems;
        return None;
    }
    match &inverse.target {
        None => out.problems.push(format!(
            "the inverse rules skip {}: the reverse stream would not carry its changes back to {}; map it in the inverse rules",
            map.target, map.source
        )),
        Some(t) if t != &map.source => out.problems.push(format!(
            "the inverse rules map {} to {t}, not back to {}: set target = \"{}\" in its inverse rule",
            map.target, map.source, map.source
        )),
        Some(_) => {}
    }
    if !out.problems.is_empty() {
        return None;
    }
    inverse.map.clone()
}

/// Green columns the inverse ignores, and those it reads that the forward rules leave to
/// green's default; blue columns the inverse does not produce.
fn columns_read(map: &TableMap, inv: &TableMap, out: &mut Pair) {
    for (j, c) in inv.source_columns.iter().enumerate() {
        let read = inv.columns.iter().any(|t| t.inputs.contains(&j))
            || inv.filter.as_ref().is_some_and(|f| f.inputs.contains(&j));
        let written = map.columns.iter().any(|t| t.name == c.name);
        if !read {
            out.ignored.push(c.name.clone());
        } else if !written {
            out.unwritten_read.push(c.name.clone());
        }
    }
    out.not_produced = map
        .source_columns
        .iter()
        .filter(|s| !inv.columns.iter().any(|t| t.name == s.name))
        .map(|s| s.name.clone())
        .collect();
}

/// Samples blue, runs the rules both ways and fills in the verdict on each produced column.
async fn evaluate(
    cx: &Ctx<'_>,
    map: &TableMap,
    inv: &TableMap,
    inv_rule: Option<&Rule>,
    out: &mut Pair,
) -> Result<(), RoundTripError> {
    let label = map.source.to_string();
    if map.source_columns.is_empty() || inv.source_columns.is_empty() {
        out.notes
            .push("a table without columns: nothing to compare".into());
        return Ok(());
    }
    let sample = eval::sample(cx.blue, map, cx.publication, cx.sample)
        .await
        .map_err(db("blue", "sampling rows", &label))?;
    out.sampled = sample.rows as u64;
    let fwd_rule = cx.rules.get(&map.source);
    let fwd = match eval::forward(cx.green, map, fwd_rule, &sample).await {
        Ok(f) => f,
        Err(e) => return rule_failed(e, out, "green", "evaluating the forward rules", &label),
    };
    out.not_in_green = (sample.rows - fwd.rows.len()) as u64;
    // Green's row as the reverse stream would see it, column by inverse source column.
    let green: Vec<eval::Column> = inv
        .source_columns
        .iter()
        .map(
            |c| match map.columns.iter().position(|t| t.name == c.name) {
                Some(i) => fwd.columns[i].clone(),
                None => vec![None; fwd.rows.len()],
            },
        )
        .collect();
    // Blue's columns the inverse produces and the sample holds, with the originals of the
    // rows in green.
    let originals: Vec<(usize, eval::Column)> = inv
        .columns
        .iter()
        .enumerate()
        .filter_map(|(t, c)| {
            let j = map.source_columns.iter().position(|s| s.name == c.name)?;
            let values = fwd
                .rows
                .iter()
                .map(|&r| sample.columns[j][r].clone())
                .collect();
            Some((t, values))
        })
        .collect();
    let equality = equality(cx.blue, inv, &originals).await.map_err(db(
        "blue",
        "looking up equality of blue's types",
        &label,
    ))?;
    let compared: Vec<eval::Comparison<'_>> = originals
        .iter()
        .zip(&equality)
        .map(|((t, values), &eq)| eval::Comparison {
            target: *t,
            original: values,
            equality: eq,
        })
        .collect();
    let counts = match eval::inverse(cx.blue, inv, inv_rule, &green, &compared).await {
        Ok(c) => c,
        Err(e) => return rule_failed(e, out, "blue", "evaluating the inverse rules", &label),
    };
    out.evaluated = true;
    out.compared = counts.kept;
    out.dropped_by_inverse = fwd.rows.len() as u64 - counts.kept;
    verdicts(inv, &compared, &counts.changed, out);
    Ok(())
}

/// A failure of the rules goes into the report; one of the database is an error.
fn rule_failed(
    e: eval::EvalError,
    out: &mut Pair,
    side: &'static str,
    context: &'static str,
    table: &str,
) -> Result<(), RoundTripError> {
    match e {
        eval::EvalError::Rule(problems) => {
            out.problems.extend(problems);
            Ok(())
        }
        eval::EvalError::Db(e) => Err(db(side, context, table)(e)),
    }
}

/// Whether blue has a default equality for each compared column's type.
async fn equality(
    blue: &Client,
    inv: &TableMap,
    originals: &[(usize, eval::Column)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    let mut columns: Vec<crate::transform::catalog::GreenColumn> = originals
        .iter()
        .map(|(t, _)| {
            let c = &inv.columns[*t];
            crate::transform::catalog::GreenColumn {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
                base_type: c.base_type.clone(),
                collation: None,
                has_equality: true,
                not_null: false,
            }
        })
        .collect();
    crate::transform::catalog::probe_equality(blue, &mut columns).await?;
    Ok(columns.iter().map(|c| c.has_equality).collect())
}

/// Unchanged and lossy columns from blue's counts; a lossy key column is a problem.
fn verdicts(inv: &TableMap, compared: &[eval::Comparison<'_>], changed: &[u64], out: &mut Pair) {
    // No row came back: every column would be "unchanged" on no rows, which says nothing.
    let vacuous = out.compared == 0;
    if vacuous {
        out.notes.push(if out.sampled == 0 {
            "blue's table is empty: nothing to compare".to_string()
        } else {
            "no sampled row comes back to blue (filters): nothing compared".to_string()
        });
    }
    for (c, &n) in compared.iter().zip(changed).filter(|_| !vacuous) {
        let name = inv.columns[c.target].name.clone();
        let key = inv.key.contains(&c.target);
        if n == 0 {
            out.unchanged.push(name);
            continue;
        }
        if key {
            out.problems.push(format!(
                "KEY column {name} of {} does not survive the round trip ({n} of {} compared rows changed): the reverse stream could not match its rows on blue; make the inverse rule give back blue's {name} exactly",
                inv.target, out.compared
            ));
        }
        out.lossy.push(Lossy {
            column: name,
            changed: n,
            key,
        });
    }
    if out.dropped_by_inverse > 0 {
        out.notes.push(format!(
            "{} sampled rows in green do not pass the inverse filter: the reverse stream would delete them from blue",
            out.dropped_by_inverse
        ));
    }
    if out.not_in_green > 0 {
        out.notes.push(format!(
            "{} sampled rows are not in green (forward filter): the reverse stream never sees them, blue keeps them as they are",
            out.not_in_green
        ));
    }
}

/// `shadowsync check --round-trip`: `check` of `config` (all of it, as `shadowsync check`
/// runs it), then the round trip through the inverse rules of `inverse` (the reverse stream's
/// config: its rules, and its publication on green). Connects with `config`'s DSNs only: blue
/// and green are the forward stream's.
pub async fn command(
    config: &crate::config::Config,
    inverse: &crate::config::Config,
    sample: u32,
) -> Result<(super::Report, RoundTrip), RoundTripError> {
    let report = super::command(config).await?;
    let rules = config.rules().map_err(super::CheckError::from)?;
    let inverse_rules = inverse.rules().map_err(super::CheckError::from)?;
    let blue_dsn = config.blue_dsn().map_err(super::CheckError::from)?;
    let green_dsn = config.green_dsn().map_err(super::CheckError::from)?;
    let (blue, blue_conn) = blue_dsn.connect("shadowsync-check").await.map_err(|e| {
        super::CheckError::Source(crate::source::SourceError::Connect {
            dsn: blue_dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&e),
        })
    })?;
    let (green, green_conn) = green_dsn.connect("shadowsync-check").await.map_err(|e| {
        super::CheckError::Apply(crate::apply::ApplyError::Connect {
            dsn: green_dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&e),
        })
    })?;
    let cx = Ctx {
        blue: &blue,
        green: &green,
        rules: &rules,
        inverse_rules: &inverse_rules,
        publication: &config.blue.publication,
        inverse_publication: &inverse.blue.publication,
        sample,
    };
    let trip = run(&cx, &report.mappings).await;
    blue_conn.abort();
    green_conn.abort();
    Ok((report, trip?))
}
