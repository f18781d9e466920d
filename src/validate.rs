//! Green's verdict on a mapping: each column expression and the filter prepared (parsed and
//! type-checked by green, never run), so that a rule that does not fit is refused before any row
//! and the problem names the rule's file and line.
//!
//! Used by `check` for every table and by the apply stage when a relation changes shape mid
//! stream. Invariant: nothing here writes; a failure that is the database's (a restart, a lock
//! timeout) is returned as an error, not reported as a problem of the rule.

use tokio_postgres::Client;

use crate::transform::TableMap;
use crate::transform::rules::Rule;

/// Prepares each column expression and the filter alone, to say which one is wrong.
pub async fn narrow_down(
    green: &Client,
    map: &TableMap,
    rule: Option<&Rule>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let all: Vec<usize> = (0..map.source_columns.len()).collect();
    let src = crate::statement::src_relation(map, &all, 1);
    let mut problems = Vec::new();
    for c in &map.columns {
        let text = format!("SELECT CAST(({}) AS {}) FROM {src}", c.expr, c.base_type);
        if let Some(e) = rejection(green, &text).await? {
            let origin = rule
                .and_then(|r| r.columns.get(&c.name))
                .map(|l| l.origin.to_string())
                .or_else(|| rule.map(|r| r.origin.to_string()))
                .unwrap_or_default();
            problems.push(format!(
                "{origin}: column {} of {}: {}",
                c.name,
                map.label,
                db_message(&e)
            ));
        }
    }
    if let Some(f) = &map.filter {
        let text = format!("SELECT ({})::boolean FROM {src}", f.expr);
        if let Some(e) = rejection(green, &text).await? {
            let origin = rule
                .and_then(|r| r.filter.as_ref())
                .map(|l| l.origin.to_string())
                .unwrap_or_default();
            problems.push(format!(
                "{origin}: filter of {}: {}",
                map.label,
                db_message(&e)
            ));
        }
    }
    Ok(problems)
}

/// Green's refusal of `text` (prepared, not run) when it means the rule or mapping does not fit
/// the schemas; any other failure (a restart, a lock timeout) is the database's, and passes.
pub async fn rejection(
    green: &Client,
    text: &str,
) -> Result<Option<tokio_postgres::Error>, tokio_postgres::Error> {
    match green.prepare(text).await {
        Ok(_) => Ok(None),
        Err(e) if is_rule_problem(&e) => Ok(Some(e)),
        Err(e) => Err(e),
    }
}

/// Errors that mean the rule does not fit the schemas (syntax, names, types, unsupported
/// features); anything else (a restart, a lock timeout) is the database's, and passes.
fn is_rule_problem(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(crate::failure::class_of(c), "42" | "0A" | "22"))
}

pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.hint() {
            Some(h) => format!("{} (hint: {h})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}
