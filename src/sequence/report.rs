//! What `shadowsync sequences` prints: one row per pair of sequences (blue's name, green's, blue's
//! value, green's before, the value set or why not), as a table or JSON, and a summary line
//! that says whether anything changed.

use serde_json::{Value, json};

use super::{Decision, Plan, State};

/// The plans, and with `--apply` what was done.
#[derive(Debug, Clone)]
pub struct Report {
    pub plans: Vec<Plan>,
    /// With `--apply`: what was done, one decision per plan (a sequence found already ahead
    /// when it came to setting it says so).
    pub applied: Option<Vec<Decision>>,
    pub headroom: u64,
    /// Tables whose sequences could not be looked at (their mapping fails `check`).
    pub warnings: Vec<String>,
}

impl Report {
    pub fn new(
        plans: Vec<Plan>,
        applied: Option<Vec<Decision>>,
        headroom: u64,
        warnings: Vec<String>,
    ) -> Report {
        Report {
            plans,
            applied,
            headroom,
            warnings,
        }
    }

    /// What stands for plan `i`: what was done with `--apply`, else what would be.
    pub fn outcome(&self, i: usize) -> &Decision {
        match &self.applied {
            Some(done) => &done[i],
            None => &self.plans[i].decision,
        }
    }

    /// Green sequences set (with `--apply`) or to be set.
    pub fn set_count(&self) -> usize {
        (0..self.plans.len())
            .filter(|&i| matches!(self.outcome(i), Decision::Set { .. }))
            .count()
    }

    /// A table for humans, then the summary and any warnings.
    pub fn table(&self) -> String {
        let set_header = if self.applied.is_some() {
            "value set"
        } else {
            "would set"
        };
        let mut rows = vec![[
            "blue sequence".to_string(),
            "green sequence".to_string(),
            "blue value".to_string(),
            "green before".to_string(),
            set_header.to_string(),
            "via".to_string(),
        ]];
        for (i, p) in self.plans.iter().enumerate() {
            rows.push([
                p.blue.to_string(),
                p.green
                    .as_ref()
                    .map_or("-".to_string(), |g| g.name.to_string()),
                p.blue_value
                    .map_or("never used".to_string(), |v| v.to_string()),
                match (&p.green, &p.green_before) {
                    (_, Some(state)) => before(state),
                    // Blue never used it, so green's was not read (nor needs to be readable).
                    (Some(_), None) => "not read".to_string(),
                    (None, None) => "-".to_string(),
                },
                match self.outcome(i) {
                    Decision::Set { value } => value.to_string(),
                    Decision::Leave(why) => why.to_string(),
                },
                p.via_text(),
            ]);
        }
        let mut out = String::new();
        if !self.plans.is_empty() {
            out.push_str(&aligned(&rows));
        }
        out.push_str(&self.summary());
        out.push('\n');
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// One line: whether anything changed or would.
    pub fn summary(&self) -> String {
        if self.plans.is_empty() {
            return "no sequences: no published column has one, and blue has none that no column owns".to_string();
        }
        let (set, left) = (self.set_count(), self.plans.len() - self.set_count());
        let headroom = match self.headroom {
            0 => String::new(),
            h => format!(" (headroom {h} steps)"),
        };
        match (&self.applied, set) {
            (Some(_), 0) => format!(
                "nothing changed: every green sequence is already at or past blue's{headroom}, or has nothing to carry ({left} left as they are)"
            ),
            (Some(_), n) => format!("set {n} green sequences{headroom}; {left} left as they are"),
            (None, 0) => format!(
                "dry run, nothing changed: no green sequence needs setting{headroom} ({left} left as they are)"
            ),
            (None, n) => format!(
                "dry run, nothing changed: {n} green sequences would be set{headroom}, {left} left as they are; run again with --apply to set them"
            ),
        }
    }

    /// The same as JSON.
    pub fn json(&self) -> Value {
        let sequences: Vec<Value> = self
            .plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (action, value, reason) = match (self.outcome(i), self.applied.is_some()) {
                    (Decision::Set { value }, true) => ("set", Some(*value), None),
                    (Decision::Set { value }, false) => ("would set", Some(*value), None),
                    (Decision::Leave(why), _) => ("leave", None, Some(why.to_string())),
                };
                json!({
                    "blue": p.blue.to_string(),
                    "green": p.green.as_ref().map(|g| g.name.to_string()),
                    "via": p.via.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                    "blue_value": p.blue_value,
                    "green_before": p.green_before.as_ref().map(|s| json!({
                        "last_value": s.position.last_value,
                        "is_called": s.position.is_called,
                        "increment": s.increment,
                    })),
                    "action": action,
                    "value": value,
                    "reason": reason,
                })
            })
            .collect();
        json!({
            "applied": self.applied.is_some(),
            "headroom": self.headroom,
            "changed": if self.applied.is_some() { self.set_count() } else { 0 },
            "summary": self.summary(),
            "sequences": sequences,
            "warnings": self.warnings,
        })
    }
}

/// Green's position before, for the table: its last value, or `unused` before the first call.
fn before(state: &State) -> String {
    if state.position.is_called {
        state.position.last_value.to_string()
    } else {
        format!("unused (next {})", state.position.last_value)
    }
}

fn aligned(rows: &[[String; 6]]) -> String {
    let mut widths = [0usize; 6];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Mapped tables `check` could not map: their columns' sequences were not looked at, which the
/// operator must know before relying on the plan.
pub(super) fn unmapped(check: &crate::check::Report) -> Vec<String> {
    check
        .mappings
        .iter()
        .filter(|m| m.target.is_some() && m.map.is_none())
        .map(|m| {
            format!(
                "{}: {}; the sequences behind its columns were not looked at: fix it (shadowsync check) and run again",
                m.line().trim_start_matches("FAIL ").trim(),
                m.problems.first().map_or("not mapped", String::as_str)
            )
        })
        .collect()
}
