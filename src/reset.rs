//! `shadowsync reset`: start over after a failed or rehearsal run. Clears shadowsync's
//! bookkeeping for the slot on green (progress, initial-copy state, the cutover mark),
//! optionally empties the target tables and drops the slot on blue; each step is reported.
//!
//! Invariants: refused while a sidecar of the slot is connected to green (its per-slot session
//! lock is held for the whole reset, so none can start meanwhile); green's part is one
//! transaction (all of it or nothing); the conflict record is kept (it is history, not state);
//! a slot in use on blue is never dropped.

use tokio_postgres::Client;

use crate::config::Config;
use crate::transform::QualifiedName;

/// What to reset besides green's bookkeeping.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResetOptions {
    /// Drop the slot on blue (the next run then starts with a fresh initial copy).
    pub drop_slot: bool,
    /// Empty the green tables the mappings write.
    pub truncate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] crate::failure::Unreachable),
    #[error("{0}; nothing was reset on green")]
    Db(#[from] crate::failure::OnSide),
    #[error(
        "a shadowsync session of slot {slot} is connected to green: stop that sidecar first, then run reset again; nothing was reset"
    )]
    Running { slot: String },
    #[error(
        "replication slot {slot} is in use on blue (walsender pid {pid}): stop the sidecar using it first; green was reset, the slot was kept"
    )]
    SlotActive { slot: String, pid: i32 },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Fence(#[from] crate::fence::FenceError),
}

/// Resets the slot of `config`; returns the steps done, in order, for the operator.
pub async fn reset(config: &Config, opts: ResetOptions) -> Result<Vec<String>, ResetError> {
    let slot = &config.blue.slot;
    let (mut green, green_conn) = config
        .green_dsn()?
        .connect_to("green", "shadowsync-reset")
        .await?;
    let (blue, blue_conn) = config
        .blue_dsn()?
        .connect_to("blue", "shadowsync-reset")
        .await?;
    let result = async {
        crate::store::migrate(&green).await?;
        let locked: bool = green
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('shadowsync.apply:' || $1, 0))",
                &[slot],
            )
            .await
            .map_err(crate::failure::on(
                "green",
                "taking the per-slot session lock",
            ))?
            .get(0);
        if !locked {
            return Err(ResetError::Running { slot: slot.clone() });
        }
        let targets = if opts.truncate {
            targets(config, &blue, &green).await?
        } else {
            Vec::new()
        };
        let mut steps = clear_green(&mut green, slot, &targets).await?;
        steps.extend(blue_steps(&blue, slot, opts.drop_slot).await?);
        Ok(steps)
    }
    .await;
    green_conn.abort();
    blue_conn.abort();
    result
}

/// The green tables the mappings write (as `check` maps them).
async fn targets(
    config: &Config,
    blue: &Client,
    green: &Client,
) -> Result<Vec<QualifiedName>, ResetError> {
    let rules = config.rules()?;
    let tables = crate::source::catalog::check_blue(blue, &config.blue.publication).await?;
    let report = crate::check::check(blue, green, &tables, &config.blue.publication, &rules)
        .await
        .map_err(crate::failure::on("blue", "mapping the published tables"))?;
    let mut targets: Vec<QualifiedName> = report
        .mappings
        .iter()
        .filter_map(|m| m.map.as_ref().map(|m| m.target.clone()))
        .collect();
    targets.sort_by_key(|t| t.to_string());
    targets.dedup();
    Ok(targets)
}

/// Green's part, in one transaction.
async fn clear_green(
    green: &mut Client,
    slot: &str,
    targets: &[QualifiedName],
) -> Result<Vec<String>, ResetError> {
    let tx = green
        .transaction()
        .await
        .map_err(crate::failure::on("green", "starting the reset"))?;
    let mut steps = Vec::new();
    for (table, what) in [
        ("shadowsync.progress", "progress row"),
        ("shadowsync.copy_ranges", "initial-copy ranges"),
        ("shadowsync.copy_state", "initial-copy state"),
        ("shadowsync.cutover", "cutover mark"),
        ("shadowsync.verify_points", "verify points"),
    ] {
        let n = tx
            .execute(&format!("DELETE FROM {table} WHERE slot = $1"), &[&slot])
            .await
            .map_err(crate::failure::on(
                "green",
                "clearing shadowsync's bookkeeping",
            ))?;
        steps.push(format!(
            "green: {what} of slot {slot} cleared ({n} rows of {table})"
        ));
    }
    if !targets.is_empty() {
        let names: Vec<String> = targets.iter().map(|t| t.quoted()).collect();
        tx.batch_execute(&format!("TRUNCATE {}", names.join(", ")))
            .await
            .map_err(crate::failure::on("green", "emptying the target tables"))?;
        steps.push(format!("green: emptied {}", names.join(", ")));
    }
    tx.commit()
        .await
        .map_err(crate::failure::on("green", "committing the reset"))?;
    steps.push("green: shadowsync.conflicts kept (the record of the earlier run)".to_string());
    Ok(steps)
}

/// Blue's part: the slot (dropped on request, else reported) and any fence left up.
async fn blue_steps(blue: &Client, slot: &str, drop_slot: bool) -> Result<Vec<String>, ResetError> {
    let mut steps = Vec::new();
    let row = blue
        .query_opt(
            "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(crate::failure::on("blue", "looking up the slot"))?;
    match (row, drop_slot) {
        (None, _) => steps.push(format!("blue: no slot {slot}")),
        (Some(r), true) => {
            if let Some(pid) = r.get::<_, Option<i32>>(0) {
                return Err(ResetError::SlotActive {
                    slot: slot.to_string(),
                    pid,
                });
            }
            blue.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(crate::failure::on("blue", "dropping the slot"))?;
            steps.push(format!("blue: slot {slot} dropped (the next run starts with a fresh initial copy)"));
        }
        (Some(r), false) => steps.push(format!(
            "blue: slot {slot} kept at {}: the next run resumes there without copying rows committed before it; add --drop-slot to start from a fresh copy",
            r.get::<_, Option<String>>(1).unwrap_or_default()
        )),
    }
    let fenced = crate::fence::fenced_tables(blue).await?;
    if !fenced.is_empty() {
        steps.push(format!(
            "blue: the cutover fence is still up on {} (writes refused): shadowsync cutover --config F --abort removes it",
            fenced.join(", ")
        ));
    }
    Ok(steps)
}
