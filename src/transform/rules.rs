//! Rule files: the operator's `[[table]]` mappings and `[[sequence]]` pairings, read from TOML
//! with the file and line of every rule and expression kept for error messages.
//!
//! Invariants: a rule names a schema-qualified source table, at most one rule per source table
//! across all files; a `[[sequence]]` entry names a schema-qualified blue and green sequence, at
//! most one entry per blue sequence; unknown keys are rejected; nothing here touches a database
//! (checking rules against live schemas is `transform::build`, `check` and `sequence`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::QualifiedName;

/// Where something was written: `file:line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub origin: Origin,
}

/// One `[[table]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub origin: Origin,
    pub source: QualifiedName,
    /// Green table; `None` means the same name as the source.
    pub target: Option<QualifiedName>,
    /// Only rows matching this SQL condition over `src` exist in green.
    pub filter: Option<Located<String>>,
    /// The table is not replicated.
    pub skip: bool,
    /// Target column -> SQL expression over `src`.
    pub columns: BTreeMap<String, Located<String>>,
    /// Conflict comparison column for this table (overrides `[conflicts] lww_column`).
    pub lww_column: Option<Located<String>>,
}

/// One `[[sequence]]` entry: a blue sequence that no column owns (the application calls
/// `nextval` itself), and the green sequence that carries it on at cutover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRule {
    pub origin: Origin,
    pub blue: QualifiedName,
    pub green: QualifiedName,
}

/// All rules, by source table, and the conflict settings they apply with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// `[[sequence]]` entries, in file order.
    pub sequences: Vec<SequenceRule>,
    /// `[conflicts]` of the config (defaults when rules are loaded alone).
    pub conflicts: super::lww::ConflictsConfig,
}

impl RuleSet {
    pub fn get(&self, source: &QualifiedName) -> Option<&Rule> {
        self.rules.iter().find(|r| &r.source == source)
    }

    /// The `[[sequence]]` entry for blue sequence `blue`.
    pub fn sequence(&self, blue: &QualifiedName) -> Option<&SequenceRule> {
        self.sequences.iter().find(|s| &s.blue == blue)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("transforms.files: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: Origin, message: String },
    #[error("transforms.files: pattern {pattern} matches no file")]
    NoMatch { pattern: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    table: Vec<toml::Spanned<RuleText>>,
    #[serde(default)]
    sequence: Vec<toml::Spanned<SequenceText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SequenceText {
    /// Blue sequence, schema-qualified (`public.invoice_no`).
    blue: toml::Spanned<String>,
    /// Green sequence, schema-qualified (`billing.invoice_no`).
    green: toml::Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleText {
    /// Blue table, schema-qualified (`public.hypervisors`).
    source: toml::Spanned<String>,
    /// Green table, schema-qualified; default: the source's name.
    target: Option<toml::Spanned<String>>,
    /// SQL condition over `src`; rows not matching it are not in green.
    filter: Option<toml::Spanned<String>>,
    /// Not replicated at all.
    #[serde(default)]
    skip: bool,
    /// Target column = SQL expression over `src`.
    #[serde(default)]
    columns: BTreeMap<String, toml::Spanned<String>>,
    /// Column compared for last-writer-wins, or `commit_time`.
    lww_column: Option<toml::Spanned<String>>,
}

/// Reads every file named by `patterns` (relative to `base`; `*` and `?` allowed in the file
/// name part), in pattern order, files of one pattern sorted by name.
pub fn load(base: &Path, patterns: &[String]) -> Result<RuleSet, RuleError> {
    let mut set = RuleSet::default();
    for pattern in patterns {
        let files = expand(base, pattern)?;
        if files.is_empty() {
            return Err(RuleError::NoMatch {
                pattern: pattern.clone(),
            });
        }
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| RuleError::Read {
                path: file.clone(),
                source,
            })?;
            let (rules, sequences) = parse_file(&file, &text)?;
            for entry in sequences {
                if let Some(first) = set.sequence(&entry.blue) {
                    return Err(RuleError::Invalid {
                        origin: entry.origin.clone(),
                        message: format!(
                            "a second [[sequence]] entry for blue sequence {} (the first is at {})",
                            entry.blue, first.origin
                        ),
                    });
                }
                set.sequences.push(entry);
            }
            for rule in rules {
                if let Some(first) = set.get(&rule.source) {
                    return Err(RuleError::Invalid {
                        origin: rule.origin.clone(),
                        message: format!(
                            "a second rule for {} (the first is at {})",
                            rule.source, first.origin
                        ),
                    });
                }
                set.rules.push(rule);
            }
        }
    }
    Ok(set)
}

/// Parses one rule file's text: its `[[table]]` rules.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Rule>, RuleError> {
    parse_file(file, text).map(|(rules, _)| rules)
}

/// Parses one rule file's text: its `[[table]]` rules and `[[sequence]]` entries.
pub fn parse_file(file: &Path, text: &str) -> Result<(Vec<Rule>, Vec<SequenceRule>), RuleError> {
    let at = |offset: usize| Origin {
        file: file.to_path_buf(),
        line: line_of(text, offset),
    };
    let parsed: FileText = toml::from_str(text).map_err(|e| RuleError::Invalid {
        origin: at(e.span().map(|s| s.start).unwrap_or(0)),
        message: e.message().to_string(),
    })?;
    let located = |s: &toml::Spanned<String>| Located {
        value: s.get_ref().clone(),
        origin: at(s.span().start),
    };
    let mut rules = Vec::with_capacity(parsed.table.len());
    for spanned in parsed.table {
        let origin = at(spanned.span().start);
        let r = spanned.into_inner();
        let name = |s: &toml::Spanned<String>, field: &str| {
            qualified(s.get_ref()).ok_or_else(|| RuleError::Invalid {
                origin: at(s.span().start),
                message: format!(
                    "{field} = {:?}: write a schema-qualified table name such as \"public.{}\"",
                    s.get_ref(),
                    s.get_ref()
                ),
            })
        };
        let source = name(&r.source, "source")?;
        let target = r.target.as_ref().map(|t| name(t, "target")).transpose()?;
        if r.skip && (target.is_some() || r.filter.is_some() || !r.columns.is_empty()) {
            return Err(RuleError::Invalid {
                origin,
                message: format!(
                    "the rule for {source} has skip = true and also a target, filter or columns; a skipped table is not replicated, so remove one or the other"
                ),
            });
        }
        for (column, expr) in &r.columns {
            if expr.get_ref().trim().is_empty() {
                return Err(RuleError::Invalid {
                    origin: at(expr.span().start),
                    message: format!(
                        "column {column} of the rule for {source} has an empty expression"
                    ),
                });
            }
        }
        rules.push(Rule {
            origin,
            source,
            target,
            filter: r.filter.as_ref().map(located),
            skip: r.skip,
            columns: r
                .columns
                .iter()
                .map(|(c, e)| (c.clone(), located(e)))
                .collect(),
            lww_column: r.lww_column.as_ref().map(located),
        });
    }
    let mut sequences = Vec::with_capacity(parsed.sequence.len());
    for spanned in parsed.sequence {
        let origin = at(spanned.span().start);
        let e = spanned.into_inner();
        let name = |s: &toml::Spanned<String>, field: &str| {
            qualified(s.get_ref()).ok_or_else(|| RuleError::Invalid {
                origin: at(s.span().start),
                message: format!(
                    "[[sequence]] {field} = {:?}: write a schema-qualified sequence name such as \"public.{}\"",
                    s.get_ref(),
                    s.get_ref()
                ),
            })
        };
        let (blue, green) = (name(&e.blue, "blue")?, name(&e.green, "green")?);
        if let Some(first) = sequences.iter().find(|s: &&SequenceRule| s.blue == blue) {
            return Err(RuleError::Invalid {
                origin,
                message: format!(
                    "a second [[sequence]] entry for blue sequence {blue} (the first is at {})",
                    first.origin
                ),
            });
        }
        sequences.push(SequenceRule {
            origin,
            blue,
            green,
        });
    }
    Ok((rules, sequences))
}

/// `schema.table` (each part may be double-quoted) into its unquoted parts.
pub(crate) fn qualified(text: &str) -> Option<QualifiedName> {
    let parts = split_ident_path(text.trim())?;
    match parts.as_slice() {
        [schema, name] if !schema.is_empty() && !name.is_empty() => {
            Some(QualifiedName::new(schema.clone(), name.clone()))
        }
        _ => None,
    }
}

/// Splits `a.b` / `"A.x".b` on dots outside double quotes, unquoting each part.
fn split_ident_path(text: &str) -> Option<Vec<String>> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) => quoted = true,
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                parts.last_mut()?.push('"');
            }
            ('"', true) => quoted = false,
            ('.', false) => parts.push(String::new()),
            (c, _) => parts.last_mut()?.push(c),
        }
    }
    (!quoted).then_some(parts)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Files matching `pattern` relative to `base`; wildcards only in the last path component.
fn expand(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, RuleError> {
    let full = base.join(pattern);
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return Ok(vec![full]);
    }
    let dir = full.parent().unwrap_or(base).to_path_buf();
    let entries = std::fs::read_dir(&dir).map_err(|source| RuleError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVACRON: &str = r#"
[[table]]
source = "public.hypervisors"
target = "public.compute_nodes"
[table.columns]
name = "hostname"
status = "(CASE status WHEN 'active' THEN 'online' ELSE 'maintenance' END)::node_status"

[[table]]
source = "public.virtual_machines"
target = "public.vms"
filter = "status <> 'deleted'"

[[table]]
source = "public.audit_log"
skip = true
"#;

    #[test]
    fn rules_keep_their_lines() {
        let rules = parse(Path::new("t.toml"), NOVACRON).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].origin.line, 2);
        assert_eq!(
            rules[0].target,
            Some(QualifiedName::new("public", "compute_nodes"))
        );
        assert_eq!(rules[0].columns["status"].origin.line, 7);
        assert_eq!(
            rules[1].filter.as_ref().unwrap().origin.to_string(),
            "t.toml:12"
        );
        assert!(rules[2].skip);
    }

    #[test]
    fn mistakes_name_file_and_line() {
        let err = parse(Path::new("r.toml"), "[[table]]\nsource = \"hypervisors\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("r.toml:2:") && err.contains("schema-qualified"),
            "{err}"
        );
        let err = parse(
            Path::new("r.toml"),
            "[[table]]\nsource = \"public.x\"\nfilterr = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("r.toml:3") && err.contains("filterr"), "{err}");
        let err = parse(
            Path::new("r.toml"),
            "[[table]]\nsource = \"public.x\"\nskip = true\ntarget = \"public.y\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("skip = true"), "{err}");
    }

    #[test]
    fn sequence_entries_keep_their_lines() {
        let text = "[[table]]\nsource = \"public.x\"\n\n[[sequence]]\nblue = \"public.invoice_no\"\ngreen = \"billing.invoice_no\"\n";
        let (rules, sequences) = parse_file(Path::new("s.toml"), text).unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            sequences,
            vec![SequenceRule {
                origin: Origin {
                    file: PathBuf::from("s.toml"),
                    line: 4
                },
                blue: QualifiedName::new("public", "invoice_no"),
                green: QualifiedName::new("billing", "invoice_no"),
            }]
        );
        let err = parse_file(
            Path::new("s.toml"),
            "[[sequence]]\nblue = \"public.a\"\ngreen = \"public.a\"\nskip = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("s.toml:4") && err.contains("skip"), "{err}");
        let err = parse_file(
            Path::new("s.toml"),
            "[[sequence]]\nblue = \"invoice_no\"\ngreen = \"public.invoice_no\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("s.toml:2:") && err.contains("schema-qualified"),
            "{err}"
        );
        let err = parse_file(
            Path::new("s.toml"),
            "[[sequence]]\nblue = \"public.a\"\ngreen = \"public.a\"\n[[sequence]]\nblue = \"public.a\"\ngreen = \"public.b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("s.toml:4:") && err.contains("first is at s.toml:1"),
            "{err}"
        );
        let err = parse_file(Path::new("s.toml"), "[[sequence]]\nblue = \"public.a\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.toml:1") && err.contains("green"), "{err}");
    }

    #[test]
    fn quoted_names_and_wildcards() {
        assert_eq!(
            qualified("\"My.Schema\".\"T\"\"x\""),
            Some(QualifiedName::new("My.Schema", "T\"x"))
        );
        assert_eq!(qualified("a.b.c"), None);
        assert!(wildcard_match("*.toml", "novacron.toml"));
        assert!(wildcard_match("n?vacron.*", "novacron.toml"));
        assert!(!wildcard_match("*.toml", "novacron.yaml"));
    }
}
