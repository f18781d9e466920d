//! Checking every mapping against the live blue and green schemas, without writing anything:
//! what `shadowsync check` prints and what `run` requires before it streams.
//!
//! Each table of the publication is mapped through its rule (identity without one) from blue's
//! catalog, exactly as the apply stage will map it from the stream; then the statements the
//! apply stage would run are *prepared* on green, which parses and type-checks every expression
//! and filter. A failing statement is narrowed down to the column or filter at fault, so the
//! problem names the file and line of the rule.
//!
//! Invariant: nothing here writes to either database.

mod lookups;
pub mod round_trip;
mod width;

use tokio_postgres::Client;

use crate::decode::ReplicaIdentity;
use crate::statement as sql;
use crate::transform::rules::{Origin, RuleSet};
use crate::transform::{self, QualifiedName, SourceTable, SourceTableColumn, TableMap, catalog};
use crate::validate::{db_message, narrow_down, rejection};

/// The verdict on one table of the publication.
#[derive(Debug, Clone)]
pub struct MappingCheck {
    pub source: QualifiedName,
    /// `None` when a rule skips the table.
    pub target: Option<QualifiedName>,
    pub rule: Option<Origin>,
    /// Empty when all is well.
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
    /// Things that may go wrong later (a green column narrower than blue's): not problems, but
    /// worth fixing before the sync window.
    pub warnings: Vec<String>,
    /// The mapping, as blue's catalog describes the table now (when it could be built).
    pub map: Option<std::sync::Arc<TableMap>>,
}

impl MappingCheck {
    /// One line for humans: `ok`, `skip` or `FAIL`, the mapping, and where it was written.
    pub fn line(&self) -> String {
        let status = match (&self.target, self.problems.is_empty()) {
            (None, true) => "skip",
            (_, true) => "ok  ",
            (_, false) => "FAIL",
        };
        let how = match &self.rule {
            Some(o) => format!("rule {o}"),
            None => "identity".to_string(),
        };
        match &self.target {
            Some(t) => format!("{status} {} -> {t} ({how})", self.source),
            None => format!("{status} {} ({how})", self.source),
        }
    }
}

/// A problem outside any one table (a rule naming a table outside the publication).
#[derive(Debug, Clone)]
pub struct Report {
    pub mappings: Vec<MappingCheck>,
    pub problems: Vec<String>,
    /// Things worth knowing outside any one table (replication origins).
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.mappings.iter().all(|m| m.problems.is_empty())
    }

    /// Every problem, one per line, for an error message.
    pub fn problems_text(&self) -> String {
        self.mappings
            .iter()
            .flat_map(|m| m.problems.iter())
            .chain(&self.problems)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Checks the mapping of every table in `tables` (the publication's).
pub async fn check(
    blue: &Client,
    green: &Client,
    tables: &[QualifiedName],
    publication: &str,
    rules: &RuleSet,
) -> Result<Report, tokio_postgres::Error> {
    let mut mappings = Vec::with_capacity(tables.len());
    for table in tables {
        mappings.push(check_table(blue, green, table, publication, rules).await?);
    }
    lookups::annotate(green, &mut mappings).await?;
    let problems = rules
        .rules
        .iter()
        .filter(|r| !tables.contains(&r.source))
        .map(|r| {
            format!(
                "{}: the rule names {}, which is not in publication {publication}: add it (ALTER PUBLICATION \"{publication}\" ADD TABLE {}) or remove the rule",
                r.origin,
                r.source,
                r.source.quoted()
            )
        })
        .collect();
    Ok(Report {
        mappings,
        problems,
        notes: Vec::new(),
    })
}

async fn check_table(
    blue: &Client,
    green: &Client,
    table: &QualifiedName,
    publication: &str,
    rules: &RuleSet,
) -> Result<MappingCheck, tokio_postgres::Error> {
    let rule = rules.get(table);
    let mut verdict = MappingCheck {
        source: table.clone(),
        target: None,
        rule: rule.map(|r| r.origin.clone()),
        problems: Vec::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
        map: None,
    };
    if rule.is_some_and(|r| r.skip) {
        return Ok(verdict);
    }
    let target = rule
        .and_then(|r| r.target.clone())
        .unwrap_or_else(|| table.clone());
    verdict.target = Some(target.clone());
    let at = rule.map(|r| format!("{}: ", r.origin)).unwrap_or_default();
    let Some(green_table) = catalog::green_table(green, &target).await? else {
        verdict.problems.push(if rule.is_some() {
            format!("{at}target table {target} does not exist on green: create it, or fix `target`")
        } else {
            format!(
                "table {table} is in the publication but missing on green: create it on green (same columns), add a rule mapping it, or remove it from the publication"
            )
        });
        return Ok(verdict);
    };
    let checked = TableCheck {
        blue,
        green,
        table,
        publication,
        rules,
        rule,
        at: &at,
        green_table: &green_table,
    };
    let Some((map, blue_full_types)) = checked.map(&mut verdict.problems).await? else {
        return Ok(verdict);
    };
    checked.green_accepts(&map, &mut verdict.problems).await?;
    verdict.notes = notes(table, &map, &green_table);
    verdict.map = Some(map.clone());
    verdict.warnings = narrower_columns(&map, &blue_full_types);
    Ok(verdict)
}

/// What the checks of one table with a target on green share.
struct TableCheck<'a> {
    blue: &'a Client,
    green: &'a Client,
    table: &'a QualifiedName,
    publication: &'a str,
    rules: &'a RuleSet,
    rule: Option<&'a transform::rules::Rule>,
    /// The rule's origin and `: `, to begin its problems with (empty without a rule).
    at: &'a str,
    green_table: &'a catalog::GreenTable,
}

impl TableCheck<'_> {
    /// The mapping, as blue's catalog describes the table now, with blue's spelling of each
    /// column's type (see [`blue_table`]); `None` when it cannot be built, the reasons in
    /// `problems`.
    async fn map(
        &self,
        problems: &mut Vec<String>,
    ) -> Result<Option<(std::sync::Arc<TableMap>, Vec<String>)>, tokio_postgres::Error> {
        let (source, categories, blue_full_types) =
            blue_table(self.blue, self.green, self.table, self.publication).await?;
        problems.extend(partition_identity(self.blue, self.table, &source).await?);
        if !problems.is_empty() {
            return Ok(None);
        }
        if self.rule.is_none() {
            identity_types(
                self.green,
                self.table,
                &source,
                &categories,
                self.green_table,
                problems,
            )
            .await?;
            if !problems.is_empty() {
                return Ok(None);
            }
        }
        match transform::build(&source, self.rule, self.green_table, &self.rules.conflicts) {
            Ok(Some(map)) => Ok(Some((map, blue_full_types))),
            Ok(None) => Ok(None),
            Err(e) => {
                problems.push(e.to_string());
                Ok(None)
            }
        }
    }

    /// Green's verdict on what the apply stage will run: a rule's statements (see
    /// [`prepare_statements`]), a keyless table's full-row match, a last-writer-wins column's
    /// comparison.
    async fn green_accepts(
        &self,
        map: &TableMap,
        problems: &mut Vec<String>,
    ) -> Result<(), tokio_postgres::Error> {
        let green = self.green;
        if self.rule.is_some() {
            prepare_statements(green, map, self.rule, problems).await?;
        }
        if !map.is_keyed() && map.replica_identity == ReplicaIdentity::Full {
            // Identity tables too: the full-row match groups and compares every column's type.
            // (Without detection: `check` creates nothing, and the record table may not exist.)
            let all: Vec<usize> = (0..map.source_columns.len()).collect();
            let text = crate::statement::keyless::delete_matching(map, &all, false);
            if let Some(e) = rejection(green, &text).await? {
                problems.push(format!(
                    "green cannot match the full old rows of keyless table {} column by column: {}; add a primary key on green",
                    map.label,
                    db_message(&e)
                ));
            }
        }
        if let Some(transform::Lww::Column(i)) = map.conflicts.lww() {
            let col = &map.columns[*i];
            let name = transform::quote_ident(&col.name);
            let text = format!(
                "SELECT t.{name} > t.{name} FROM {} AS t LIMIT 0",
                map.target.quoted()
            );
            if let Some(e) = rejection(green, &text).await? {
                let at = self.at;
                problems.push(format!(
                    "{at}last-writer-wins column {} of {} ({}) cannot be compared: {}; name an ordered column such as a timestamp (lww_column), or use [conflicts] resolution = \"apply\"",
                    col.name,
                    map.label,
                    col.sql_type,
                    db_message(&e)
                ));
            }
        }
        Ok(())
    }
}

/// What is worth knowing about a mapping: how conflicts are resolved, a key blue cannot use
/// yet, a key that is not green's primary key, rows completed by reading blue.
fn notes(table: &QualifiedName, map: &TableMap, green_table: &catalog::GreenTable) -> Vec<String> {
    let mut notes = vec![format!(
        "conflicts with rows changed on green: {}",
        map.conflicts.describe(&map.columns)
    )];
    let key_columns = map
        .key
        .iter()
        .map(|&k| map.columns[k].name.as_str())
        .collect::<Vec<_>>();
    if map.awaits_identity {
        notes.push(format!(
            "blue table {table} has no replica identity now (no primary key, or REPLICA IDENTITY NOTHING): blue refuses UPDATE and DELETE on it until it has one; inserts and truncates are replicated, matched on green's key ({})",
            key_columns.join(", ")
        ));
    }
    if map.is_keyed()
        && green_table
            .primary_key
            .iter()
            .ne(key_columns.iter().copied())
    {
        notes.push(format!(
            "green table {} has no primary key: rows are matched on its unique index over ({})",
            map.label,
            key_columns.join(", ")
        ));
    }
    let mixed = map.columns.iter().any(|c| c.inputs.len() > 1);
    if (map.filter.is_some() || mixed) && map.replica_identity != ReplicaIdentity::Full {
        notes.push(format!(
            "updates on {table} that leave a TOASTed column unchanged are completed by reading the row from blue by key (the {}); ALTER TABLE {} REPLICA IDENTITY FULL on blue avoids that read",
            if map.filter.is_some() { "filter may move the row in" } else { "rule mixes columns" },
            table.quoted()
        ));
    }
    notes
}

/// A partitioned table published through its root is described with the root's replica
/// identity, but each partition logs old rows by its own: blue checks UPDATE and DELETE
/// against the partition. A root without a key of its own (its partitions have theirs) is
/// described without identity, and a FULL root over partitions that are not FULL sends "full"
/// old rows whose other columns are NULL: either would make green wrong, so both are refused.
async fn partition_identity(
    blue: &Client,
    table: &QualifiedName,
    source: &SourceTable,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let leaves: Vec<(String, String)> = blue
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text
               FROM pg_partition_tree(to_regclass($1)) p
               JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE p.isleaf AND p.level > 0",
            &[&table.quoted()],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if leaves.is_empty() {
        return Ok(Vec::new());
    }
    let mut problems = Vec::new();
    let full = source.replica_identity == ReplicaIdentity::Full;
    if !full && !source.columns.iter().any(|c| c.is_key) {
        problems.push(format!(
            "partitioned table {table} has no primary key (or replica identity index) of its own, so blue describes it without replica identity while its partitions accept UPDATE and DELETE: add the primary key on {} itself, or set REPLICA IDENTITY FULL on it and on each partition",
            table.quoted()
        ));
    }
    let not_full: Vec<&str> = leaves
        .iter()
        .filter(|(_, ri)| ri != "f")
        .map(|(name, _)| name.as_str())
        .collect();
    if full && !not_full.is_empty() {
        problems.push(format!(
            "partitioned table {table} has REPLICA IDENTITY FULL but its partitions {} do not: their updates and deletes would arrive as full old rows holding only the partition's key; run ALTER TABLE ... REPLICA IDENTITY FULL on each of them",
            not_full.join(", ")
        ));
    }
    Ok(problems)
}

/// Target columns copied as they are from a blue column whose values may not fit green's type.
fn narrower_columns(map: &TableMap, blue_full_types: &[String]) -> Vec<String> {
    let names: Vec<&str> = map.source_columns.iter().map(|c| c.name.as_str()).collect();
    map.columns
        .iter()
        .filter_map(|c| {
            let i = c.copied_from(&names)?;
            let source = &map.source_columns[i];
            let why = width::narrower(&blue_full_types[i], &c.sql_type)?;
            Some(format!(
                "column {} of {} is {} on green, narrower than blue's {} ({}.{}): {why}; widen green's column (ALTER TABLE {} ALTER COLUMN {} TYPE {}) unless blue's data is known to fit",
                c.name,
                map.label,
                c.sql_type,
                blue_full_types[i],
                map.source,
                source.name,
                map.target.quoted(),
                transform::quote_ident(&c.name),
                blue_full_types[i]
            ))
        })
        .collect()
}

/// Blue's description of a table, as the stream will describe it, with green's spelling of each
/// type (`text` when green lacks it), each type's category (for identity type checks) and
/// blue's spelling of each type with its modifier (for width checks).
async fn blue_table(
    blue: &Client,
    green: &Client,
    table: &QualifiedName,
    publication: &str,
) -> Result<(SourceTable, Vec<String>, Vec<String>), tokio_postgres::Error> {
    let identity: String = blue
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await?
        .get(0);
    let replica_identity = match identity.as_str() {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let rows = blue
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, -1), t.typcategory::text,
                    c.relreplident = 'f' OR EXISTS (
                      -- Key columns only, as pgoutput marks them: not an index's INCLUDE columns.
                      SELECT 1 FROM pg_index i
                       CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                       WHERE i.indrelid = a.attrelid AND k.attnum = a.attnum AND k.ord <= i.indnkeyatts
                         AND CASE c.relreplident WHEN 'i' THEN i.indisreplident
                                                 WHEN 'd' THEN i.indisprimary ELSE false END),
                    format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
               JOIN pg_type t ON t.oid = a.atttypid
               JOIN pg_class c ON c.oid = a.attrelid
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
                -- A publication column list (PostgreSQL 15+) limits what the stream carries.
                AND a.attname = ANY (coalesce(
                      (SELECT p.attnames FROM pg_publication_tables p
                        WHERE p.pubname = $2 AND p.schemaname = c.relnamespace::regnamespace::name
                          AND p.tablename = c.relname),
                      ARRAY[a.attname]))
              ORDER BY a.attnum",
            &[&table.quoted(), &publication],
        )
        .await?;
    let blue_types: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    let green_types: Vec<String> = green
        .query(
            "SELECT coalesce(format_type(to_regtype(n), -1), 'text')
               FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i",
            &[&blue_types],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let categories = rows.iter().map(|r| r.get(2)).collect();
    let full_types = rows.iter().map(|r| r.get(4)).collect();
    let columns = rows
        .iter()
        .zip(green_types)
        .map(|(r, sql_type)| SourceTableColumn {
            name: r.get(0),
            sql_type,
            blue_type: r.get(1),
            is_key: r.get(3),
        })
        .collect();
    Ok((
        SourceTable {
            name: table.clone(),
            columns,
            replica_identity,
        },
        categories,
        full_types,
    ))
}

/// Identity mappings: green must have every blue column, with a type blue's text casts to.
async fn identity_types(
    green: &Client,
    table: &QualifiedName,
    source: &SourceTable,
    categories: &[String],
    green_table: &catalog::GreenTable,
    problems: &mut Vec<String>,
) -> Result<(), tokio_postgres::Error> {
    for (c, category) in source.columns.iter().zip(categories) {
        let Some(gc) = green_table.columns.iter().find(|g| g.name == c.name) else {
            problems.push(format!(
                "column {} of table {table} exists on blue but not on green: run ALTER TABLE {} ADD COLUMN \"{}\" {}; on green, or map the table with a rule",
                c.name,
                table.quoted(),
                c.name,
                c.blue_type
            ));
            continue;
        };
        if gc.base_type == c.blue_type {
            continue;
        }
        let compatible: bool = green
            .query_one(
                "SELECT coalesce(
                    to_regtype($2) IS NOT NULL AND (
                      (SELECT typcategory::text FROM pg_type WHERE oid = to_regtype($2)) IN ('S', $3)
                      OR EXISTS (SELECT 1 FROM pg_cast WHERE castsource = to_regtype($1) AND casttarget = to_regtype($2))),
                    false)",
                &[&c.blue_type, &gc.base_type, category],
            )
            .await?
            .get(0);
        if !compatible {
            problems.push(format!(
                "column {} of table {table} is {} on blue but {} on green, and blue's values cannot be cast to it: change green's column type (ALTER TABLE ... ALTER COLUMN \"{}\" TYPE {}) or map the column with a transform rule",
                c.name, c.blue_type, gc.sql_type, c.name, c.blue_type
            ));
        }
    }
    Ok(())
}

/// Prepares what the apply stage will run; a failure is narrowed to the column or filter.
async fn prepare_statements(
    green: &Client,
    map: &TableMap,
    rule: Option<&transform::rules::Rule>,
    problems: &mut Vec<String>,
) -> Result<(), tokio_postgres::Error> {
    let all: Vec<usize> = (0..map.source_columns.len()).collect();
    let mut statements = vec![sql::upsert(map, &all)];
    if map.is_keyed() {
        statements.push(sql::delete(map));
    }
    statements.extend(sql::delete_unmatched(map, &all));
    for text in statements {
        if let Some(e) = rejection(green, &text).await? {
            problems.extend(narrow_down(green, map, rule).await?);
            if problems.is_empty() {
                problems.push(format!(
                    "{}: green rejects the statement for {}: {}",
                    rule.map(|r| r.origin.to_string()).unwrap_or_default(),
                    map.label,
                    db_message(&e)
                ));
            }
            return Ok(());
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
}

/// `shadowsync check`: everything `run` verifies before streaming, writing nothing (the slot
/// is not created, the `shadowsync` schema not touched).
pub async fn command(config: &crate::config::Config) -> Result<Report, CheckError> {
    let rules = config.rules()?;
    let blue_dsn = config.blue_dsn()?;
    let green_dsn = config.green_dsn()?;
    let (blue, blue_conn) = blue_dsn
        .connect("shadowsync-check")
        .await
        .map_err(|source| crate::source::SourceError::Connect {
            dsn: blue_dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    let (green, green_conn) = green_dsn
        .connect("shadowsync-check")
        .await
        .map_err(|source| crate::apply::ApplyError::Connect {
            dsn: green_dsn.to_string(),
            failure: crate::failure::DbFailure::from_pg(&source),
        })?;
    let result = async {
        let tables = crate::source::catalog::check_blue(&blue, &config.blue.publication).await?;
        crate::source::slot::refuse_lost(&blue, &config.blue.slot).await?;
        let mut report = check(&blue, &green, &tables, &config.blue.publication, &rules)
            .await
            .map_err(|source| {
                CheckError::Source(crate::source::SourceError::Blue {
                    context: "checking the mappings",
                    failure: crate::failure::DbFailure::from_pg(&source),
                })
            })?;
        match crate::origin::check(&green, "green", &config.origin, &config.blue.slot).await? {
            Ok(note) => report.notes.push(note),
            Err(problem) => report.problems.push(problem),
        }
        Ok(report)
    }
    .await;
    blue_conn.abort();
    green_conn.abort();
    result
}
