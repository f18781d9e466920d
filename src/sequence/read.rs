//! What the databases say about a sequence: its position and definition (read from the
//! sequence relation itself, which the catalogs do not hold), and whether the user may read
//! or set it.
//!
//! Invariant: privileges are asked of the catalogs before anything is read or set, so a
//! missing GRANT is named exactly and nothing fails half-way (an error inside the caller's
//! transaction would abort it, and leave no way to ask afterwards).

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::{Position, Sequence, SequenceError, Side, State, Via, via_text};
use crate::failure::DbFailure;
use crate::transform::quote_ident;

/// Each sequence's state, read once however many links name it.
pub(super) async fn read_all(
    client: &impl GenericClient,
    side: Side,
    seqs: &[(&Sequence, &[Via])],
) -> Result<HashMap<u32, State>, SequenceError> {
    let mut states = HashMap::new();
    for (seq, via) in seqs {
        if let std::collections::hash_map::Entry::Vacant(slot) = states.entry(seq.oid) {
            slot.insert(read(client, side, seq, via).await?);
        }
    }
    Ok(states)
}

/// A sequence's position (from the sequence relation itself: the catalogs do not hold it)
/// and its definition.
pub(super) async fn read(
    client: &impl GenericClient,
    side: Side,
    seq: &Sequence,
    via: &[Via],
) -> Result<State, SequenceError> {
    let text = format!(
        "SELECT s.last_value, s.is_called, p.seqincrement, p.seqstart, p.seqmin, p.seqmax
           FROM {} AS s, pg_sequence p WHERE p.seqrelid = $1",
        seq.name.quoted()
    );
    let row = client
        .query_one(&text, &[&seq.oid])
        .await
        .map_err(|e| SequenceError::Read {
            side,
            sequence: seq.name.clone(),
            via: via_text(via),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    Ok(State {
        position: Position {
            last_value: row.get(0),
            is_called: row.get(1),
        },
        increment: row.get(2),
        start: row.get(3),
        min: row.get(4),
        max: row.get(5),
    })
}

/// What a step needs of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// `SELECT ... FROM schema.seq`: USAGE on the schema, SELECT on the sequence.
    Read,
    /// `setval(oid)`: UPDATE on the sequence (no schema lookup: it is named by oid).
    Set,
}

/// Fails, with the exact GRANTs, unless the user has what `need` takes on every sequence;
/// asked of the catalogs first, so that nothing fails half-way (an error inside the caller's
/// transaction would abort it, and leave no way to ask afterwards).
pub(super) async fn require(
    client: &impl GenericClient,
    side: Side,
    seqs: &[(&Sequence, &[Via])],
    need: Need,
) -> Result<(), SequenceError> {
    if seqs.is_empty() {
        return Ok(());
    }
    let oids: Vec<u32> = seqs.iter().map(|(s, _)| s.oid).collect();
    let rows = client
        .query(
            "SELECT c.oid, current_user::text, has_schema_privilege(c.relnamespace, 'USAGE'),
                    has_sequence_privilege(c.oid, 'SELECT'), has_sequence_privilege(c.oid, 'UPDATE')
               FROM pg_class c WHERE c.oid = ANY ($1::oid[])",
            &[&oids],
        )
        .await
        .map_err(|e| SequenceError::Catalog {
            side,
            context: "reading the privileges on the sequences".to_string(),
            failure: Box::new(DbFailure::from_pg(&e)),
        })?;
    let mut user = String::new();
    let (mut sequences, mut grants) = (Vec::new(), Vec::<String>::new());
    for row in &rows {
        user = row.get(1);
        let oid: u32 = row.get(0);
        // The first of the sequence's links names it (one mention is enough).
        let Some((seq, via)) = seqs.iter().find(|(s, _)| s.oid == oid) else {
            continue;
        };
        let wanted = grants_needed(seq, need, row.get(2), row.get(3), row.get(4));
        if !wanted.is_empty() {
            sequences.push(format!("{} ({})", seq.name, via_text(via)));
            grants.extend(wanted);
        }
    }
    if grants.is_empty() {
        return Ok(());
    }
    let to = quote_ident(&user);
    // In the order found (a schema's USAGE before its sequences' grants), each once.
    let mut unique: Vec<String> = Vec::with_capacity(grants.len());
    for g in grants {
        if !unique.contains(&g) {
            unique.push(g);
        }
    }
    Err(SequenceError::Privilege {
        side,
        action: match need {
            Need::Read => "read",
            Need::Set => "set",
        },
        sequences,
        grants: unique.iter().map(|g| format!("{g} TO {to};")).collect(),
        user,
    })
}

/// The GRANTs (without their `TO`) that `need` lacks on `seq`.
fn grants_needed(
    seq: &Sequence,
    need: Need,
    schema_usage: bool,
    select: bool,
    update: bool,
) -> Vec<String> {
    let mut grants = Vec::new();
    if need == Need::Read && !schema_usage {
        grants.push(format!(
            "GRANT USAGE ON SCHEMA {}",
            quote_ident(&seq.name.schema)
        ));
    }
    if need == Need::Read && !select {
        grants.push(format!("GRANT SELECT ON SEQUENCE {}", seq.name.quoted()));
    }
    if need == Need::Set && !update {
        grants.push(format!("GRANT UPDATE ON SEQUENCE {}", seq.name.quoted()));
    }
    grants
}
