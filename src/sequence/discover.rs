//! Which green sequence carries each blue sequence on: through the mappings (a green column
//! copied from a blue column takes over that column's sequence, across table and column
//! renames), `[[sequence]]` entries, and for free-standing blue sequences (no column owns or
//! uses them) a green sequence of the same schema-qualified name.
//!
//! Invariants: only catalogs are read (no privilege on a sequence is needed to find it); a pair
//! of sequences is listed once however many columns lead to it; a blue sequence that some pair
//! carries is never also listed as lacking a green sequence.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::GenericClient;

use super::{Link, Sequence, SequenceError, Side, Via};
use crate::failure::DbFailure;
use crate::transform::rules::{RuleSet, SequenceRule};
use crate::transform::{QualifiedName, TableMap, TargetColumn};

/// Every pair of blue and green sequences that the cutover must carry on, sorted by blue's
/// name: those behind the mappings' copied columns, those of `[[sequence]]` entries, and the
/// free-standing blue sequences (by a green sequence of the same name, or with none).
pub async fn discover(
    blue: &impl GenericClient,
    green: &impl GenericClient,
    maps: &[Arc<TableMap>],
    rules: &RuleSet,
) -> Result<Vec<Link>, SequenceError> {
    let mut links = Links::default();
    for map in maps {
        column_links(blue, green, map, &mut links).await?;
    }
    for entry in &rules.sequences {
        entry_link(blue, green, entry, &mut links).await?;
    }
    for seq in free_standing(blue).await? {
        // An entry decides for its blue sequence; one a column leads to needs no name match.
        if links.carries(seq.oid) || rules.sequence(&seq.name).is_some() {
            continue;
        }
        let same = named(green, Side::Green, &seq.name).await?;
        let via = if same.is_some() {
            Via::SameName
        } else {
            Via::Unowned
        };
        links.add(seq, same, via);
    }
    Ok(links.finish())
}

/// The blue column a green column copies as it is: `TargetColumn::copied_from` (identity and
/// unlisted columns, `src."id"`), or a rule naming the column bare (`node_id = "id"`, the usual
/// way a rule renames one), which green casts to the target's type just the same.
pub fn copy_of(column: &TargetColumn, names: &[&str]) -> Option<usize> {
    column
        .copied_from(names)
        .or_else(|| bare_reference(column, names))
}

fn bare_reference(column: &TargetColumn, names: &[&str]) -> Option<usize> {
    let [i] = column.inputs.as_slice() else {
        return None;
    };
    let text = column.expr.trim();
    let text = text.strip_prefix("src.").unwrap_or(text);
    let named = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(quoted) if !quoted.replace("\"\"", "").contains('"') => quoted.replace("\"\"", "\""),
        Some(_) => return None,
        // Unquoted, SQL folds it to lower case.
        None if text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            text.to_ascii_lowercase()
        }
        None => return None,
    };
    (names.get(*i) == Some(&named.as_str())).then_some(*i)
}

/// The pairs found so far, merged by (blue, green).
#[derive(Default)]
struct Links {
    links: Vec<Link>,
}

impl Links {
    fn add(&mut self, blue: Sequence, green: Option<Sequence>, via: Via) {
        let green_oid = green.as_ref().map(|g| g.oid);
        match self
            .links
            .iter_mut()
            .find(|l| l.blue.oid == blue.oid && l.green.as_ref().map(|g| g.oid) == green_oid)
        {
            Some(link) if !link.via.contains(&via) => link.via.push(via),
            Some(_) => {}
            None => self.links.push(Link {
                blue,
                green,
                via: vec![via],
            }),
        }
    }

    fn carries(&self, blue_oid: u32) -> bool {
        self.links.iter().any(|l| l.blue.oid == blue_oid)
    }

    /// Sorted; a blue sequence some pair carries is not also reported without a green one.
    fn finish(self) -> Vec<Link> {
        let carried: Vec<u32> = self
            .links
            .iter()
            .filter(|l| l.green.is_some())
            .map(|l| l.blue.oid)
            .collect();
        let mut links: Vec<Link> = self
            .links
            .into_iter()
            .filter(|l| l.green.is_some() || !carried.contains(&l.blue.oid))
            .collect();
        links.sort_by(|a, b| {
            let key = |l: &Link| {
                (
                    l.blue.name.to_string(),
                    l.green.as_ref().map(|g| g.name.to_string()),
                )
            };
            key(a).cmp(&key(b))
        });
        links
    }
}

/// The sequences behind the mapping's copied columns on blue, each paired with the sequence
/// behind the green column it is copied into (or none).
async fn column_links(
    blue: &impl GenericClient,
    green: &impl GenericClient,
    map: &TableMap,
    links: &mut Links,
) -> Result<(), SequenceError> {
    let names: Vec<&str> = map.source_columns.iter().map(|c| c.name.as_str()).collect();
    let copies: Vec<(String, String)> = map
        .columns
        .iter()
        .filter_map(|c| copy_of(c, &names).map(|i| (names[i].to_string(), c.name.clone())))
        .collect();
    if copies.is_empty() {
        return Ok(());
    }
    let blue_columns: Vec<String> = copies.iter().map(|(b, _)| b.clone()).collect();
    let on_blue = behind(blue, Side::Blue, &map.source, &blue_columns).await?;
    let green_columns: Vec<String> = copies
        .iter()
        .filter(|(b, _)| on_blue.contains_key(b))
        .map(|(_, g)| g.clone())
        .collect();
    if green_columns.is_empty() {
        return Ok(());
    }
    let on_green = behind(green, Side::Green, &map.target, &green_columns).await?;
    for (b, g) in copies {
        let Some(seq) = on_blue.get(&b) else {
            continue;
        };
        let via = Via::Column {
            blue_table: map.source.clone(),
            blue_column: b,
            green_table: map.target.clone(),
            green_column: g.clone(),
        };
        links.add(seq.clone(), on_green.get(&g).cloned(), via);
    }
    Ok(())
}

/// The sequence behind each of `columns` of `table` that has one: the one it owns (serial,
/// bigserial, identity ALWAYS or BY DEFAULT: `pg_get_serial_sequence`), else the single
/// sequence its default calls (a sequence shared by several tables' defaults, owned by one
/// of them or by none).
async fn behind(
    client: &impl GenericClient,
    side: Side,
    table: &QualifiedName,
    columns: &[String],
) -> Result<HashMap<String, Sequence>, SequenceError> {
    let rows = client
        .query(
            "SELECT u.col, n.nspname::text, s.relname::text, s.oid
               FROM unnest($2::text[]) AS u(col)
              CROSS JOIN LATERAL (SELECT coalesce(
                      pg_get_serial_sequence($1, u.col)::regclass::oid,
                      (SELECT min(d.refobjid)
                         FROM pg_attribute a
                         JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                         JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass
                                         AND d.objid = ad.oid
                                         AND d.refclassid = 'pg_class'::regclass
                         JOIN pg_class r ON r.oid = d.refobjid AND r.relkind = 'S'
                        WHERE a.attrelid = to_regclass($1) AND a.attname = u.col
                       HAVING count(DISTINCT d.refobjid) = 1)) AS seq) AS q
               JOIN pg_class s ON s.oid = q.seq
               JOIN pg_namespace n ON n.oid = s.relnamespace",
            &[&table.quoted(), &columns],
        )
        .await
        .map_err(|e| SequenceError::Catalog {
            side,
            context: format!(
                "finding the sequences behind columns {} of {table}",
                columns.join(", ")
            ),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    Ok(rows
        .iter()
        .map(|r| {
            let seq = Sequence {
                name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                oid: r.get(3),
            };
            (r.get(0), seq)
        })
        .collect())
}

/// A `[[sequence]]` entry's pair; both sequences must exist.
async fn entry_link(
    blue: &impl GenericClient,
    green: &impl GenericClient,
    entry: &SequenceRule,
    links: &mut Links,
) -> Result<(), SequenceError> {
    let missing = |side: Side, sequence: &QualifiedName| SequenceError::EntryMissing {
        origin: entry.origin.clone(),
        side,
        sequence: sequence.clone(),
    };
    let b = named(blue, Side::Blue, &entry.blue)
        .await?
        .ok_or_else(|| missing(Side::Blue, &entry.blue))?;
    let g = named(green, Side::Green, &entry.green)
        .await?
        .ok_or_else(|| missing(Side::Green, &entry.green))?;
    links.add(b, Some(g), Via::Entry(entry.origin.clone()));
    Ok(())
}

/// The sequence of that schema-qualified name, if there is one.
async fn named(
    client: &impl GenericClient,
    side: Side,
    name: &QualifiedName,
) -> Result<Option<Sequence>, SequenceError> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1::text AND c.relname = $2::text AND c.relkind = 'S'",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(|e| SequenceError::Catalog {
            side,
            context: format!("looking up sequence {name}"),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    Ok(row.map(|r| Sequence {
        name: name.clone(),
        oid: r.get(0),
    }))
}

/// Blue's sequences that no column owns (serial, identity) or calls in its default, outside
/// the system schemas and extensions: those the application calls `nextval` on itself.
async fn free_standing(blue: &impl GenericClient) -> Result<Vec<Sequence>, SequenceError> {
    let rows = blue
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'S'
                AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype IN ('a', 'i', 'e'))
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_attrdef'::regclass
                                   AND d.refclassid = 'pg_class'::regclass
                                   AND d.refobjid = c.oid)
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| SequenceError::Catalog {
            side: Side::Blue,
            context: "listing the sequences no column owns".to_string(),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    Ok(rows
        .iter()
        .map(|r| Sequence {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            oid: r.get(2),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(expr: &str, inputs: Vec<usize>) -> TargetColumn {
        TargetColumn {
            name: "node_id".to_string(),
            sql_type: "integer".to_string(),
            base_type: "integer".to_string(),
            expr: expr.to_string(),
            inputs,
            collation: None,
            has_equality: true,
            not_null: true,
        }
    }

    #[test]
    fn copies_are_verbatim_or_bare_references() {
        let names = ["id", "Host Name", "x"];
        assert_eq!(copy_of(&column("src.\"id\"", vec![0]), &names), Some(0));
        assert_eq!(copy_of(&column("id", vec![0]), &names), Some(0));
        assert_eq!(copy_of(&column(" ID ", vec![0]), &names), Some(0));
        assert_eq!(copy_of(&column("src.id", vec![0]), &names), Some(0));
        assert_eq!(copy_of(&column("\"Host Name\"", vec![1]), &names), Some(1));
        assert_eq!(copy_of(&column("id + 1000", vec![0]), &names), None);
        assert_eq!(copy_of(&column("hashtext(x)", vec![2]), &names), None);
        assert_eq!(
            copy_of(&column("\"x\" || \"id\"", vec![0, 2]), &names),
            None
        );
        assert_eq!(copy_of(&column("\"x\"||\"x\"", vec![2]), &names), None);
    }
}
