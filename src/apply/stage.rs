//! The apply task: turns the decoded stream into group-committed green transactions.
//!
//! Invariants:
//! - A green commit happens only right after a blue Commit, so green always equals blue at a
//!   blue commit boundary; a blue transaction bigger than the batch limits is written in chunks
//!   inside one green transaction (memory bounded by the limits, not by the transaction). One
//!   chunk may be written in the background while the next is received (two chunks in memory);
//!   whatever else talks to green waits for it first, so statements keep blue's order.
//! - A transaction that begins while complete ones wait in the batch is held back (its row
//!   changes buffered, up to the batch limits) until it commits, or until the complete ones
//!   commit on their own (`max_delay`, green free) or the buffer is full (a large transaction):
//!   its rows never share a green transaction with the complete ones unless it completes too,
//!   so complete transactions never wait for a large one behind them. Memory: the batch, the
//!   held-back changes and one write in flight, each bounded by the limits.
//! - Transactions whose commit precedes green's progress row are skipped: they are in green.
//! - Transactions whose `Origin` is a shadowsync one (another stream's writes, see `origin`) are
//!   skipped too; their end commits with the batch, so the slot moves past them.
//! - The LSN published on `committed` is the end of a blue commit that green has committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

mod inflight;

use inflight::{Inflight, Tally};

use super::batch::Batch;
use super::{Applier, ApplyError};
use crate::decode::{Begin, Commit, Message, OldTuple, Relation};
use crate::lsn::Lsn;
use crate::metrics::Shared;
use crate::source::SourceEvent;
use crate::source::slot::DRAIN_MESSAGE_PREFIX;
use crate::transform::rules::RuleSet;
use crate::transform::{self, TableMap};

/// Bytes a held-back row change holds (every image it carries, counted as the batch counts one),
/// for the held-back bound.
fn held_back_size(msg: &Message) -> usize {
    let size = super::batch::tuple_bytes;
    match msg {
        Message::Insert { new, .. } => size(new),
        Message::Update { old, new, .. } => {
            size(new)
                + old.as_ref().map_or(0, |o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => size(t),
                })
        }
        Message::Delete { old, .. } => match old {
            OldTuple::Key(t) | OldTuple::Full(t) => size(t),
        },
        _ => 0,
    }
}

/// A hold the stage has taken (see `hold`).
struct Hold {
    req: crate::hold::HoldRequest,
    target: Option<Lsn>,
    since: Option<Instant>,
}

/// Group-commit limits (see `[batch]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
}

pub struct ApplyStage {
    /// `None` while a write runs in the background (`inflight`).
    applier: Option<Applier>,
    inflight: Option<Inflight>,
    batch: Batch,
    /// Mapping per blue relation OID (see [`Mapped`]).
    maps: HashMap<u32, Mapped>,
    /// Names of blue's user types, from pgoutput Type messages (quoted `schema.name`).
    types: HashMap<u32, String>,
    rules: Arc<RuleSet>,
    /// Blue, for completing rows whose unchanged TOAST values a rule needs.
    blue: Option<tokio_postgres::Client>,
    limits: Limits,
    /// Green's progress at session start: commits that start before it are already applied.
    skip_before: Lsn,
    skipping: bool,
    /// Which origins mark another shadowsync stream's writes (see `origin`).
    origins: crate::origin::Filter,
    /// The transaction being received is skipped for its origin: an echo.
    echo: bool,
    in_txn: bool,
    /// Last blue commit whose changes are in the batch but not yet committed in green.
    last_commit: Option<Commit>,
    /// Blue transactions in the batch.
    txns: u64,
    /// The transaction being received carries a drain's flush marker (see
    /// `source::slot::drain_target`).
    drain_marker: bool,
    /// A hold taken from `shared` (see `hold`): its target once known, and since when the
    /// stage holds.
    hold: Option<Hold>,
    /// Rows received in the batch, for the batch-size histogram.
    batch_rows: u64,
    batch_started: Option<Instant>,
    /// Rows written and conflicts met in the open green transaction; published only once green
    /// commits them.
    tally: Tally,
    last_lsn: Lsn,
    /// Transactions committing at or before this LSN are written change by change, in blue's
    /// order: a secondary unique constraint on green rejected them coalesced (see
    /// `ApplyError::Reorder`). Compared with `Begin.final_lsn`, which follows stream order
    /// (change LSNs do not: a long transaction's early changes have low LSNs).
    serial_until: Lsn,
    /// Commit LSN of the transaction being received (or last received).
    txn_final_lsn: Lsn,
    /// Row changes of the transaction being received, held back while complete transactions
    /// wait in the batch (see the module's invariants); `holding_back` says it is being done.
    held_back: Vec<SourceEvent>,
    held_back_bytes: usize,
    holding_back: bool,
    /// Source table (`schema.table`) -> snapshot LSN of its initial copy: its changes from
    /// transactions committing before it are in the copy.
    copied_at: HashMap<String, Lsn>,
    /// The same, by relation OID, for the relations seen so far.
    copied_before: HashMap<u32, Lsn>,
    committed: watch::Sender<Lsn>,
    shared: Arc<Shared>,
}

impl ApplyStage {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        applier: Applier,
        rules: Arc<RuleSet>,
        blue: Option<tokio_postgres::Client>,
        limits: Limits,
        skip_before: Lsn,
        serial_until: Lsn,
        committed: watch::Sender<Lsn>,
        shared: Arc<Shared>,
    ) -> Self {
        ApplyStage {
            applier: Some(applier),
            inflight: None,
            batch: Batch::default(),
            maps: HashMap::new(),
            types: HashMap::new(),
            rules,
            blue,
            limits,
            skip_before,
            skipping: false,
            origins: crate::origin::Filter::default(),
            echo: false,
            in_txn: false,
            last_commit: None,
            txns: 0,
            drain_marker: false,
            hold: None,
            batch_rows: 0,
            batch_started: None,
            tally: Tally::default(),
            last_lsn: skip_before,
            serial_until,
            txn_final_lsn: Lsn::ZERO,
            held_back: Vec::new(),
            held_back_bytes: 0,
            holding_back: false,
            copied_at: HashMap::new(),
            copied_before: HashMap::new(),
            committed,
            shared,
        }
    }

    /// Tables whose initial copy holds their changes up to a snapshot (see `snapshot`).
    pub fn with_copied_at(mut self, copied_at: HashMap<String, Lsn>) -> Self {
        self.copied_at = copied_at;
        self
    }

    /// Skips the transactions another shadowsync stream wrote (see `origin`).
    pub fn with_origins(mut self, origins: crate::origin::Filter) -> Self {
        self.origins = origins;
        self
    }

    /// Whether a change of `relation` in the current transaction is in its table's copy.
    fn in_copy(&self, relation: u32) -> bool {
        !self.copied_before.is_empty()
            && self
                .copied_before
                .get(&relation)
                .is_some_and(|&lsn| self.txn_final_lsn < lsn)
    }

    /// Runs until the source closes the channel, then commits every complete blue transaction
    /// received and abandons an incomplete one (it will be streamed again).
    pub async fn run(mut self, rx: mpsc::Receiver<Vec<SourceEvent>>) -> Result<(), ApplyError> {
        let result = self.stream(rx).await;
        if let Err(e) = &result
            && self.inflight.is_some()
        {
            // The write in flight runs on regardless: wait for it, so that a batch green
            // committed is counted and acknowledged, and its session's lock is released before
            // the next session starts. The first error is the one reported.
            if let Err(later) = self.settle().await {
                warn!(error = %later, first = %e, "the write in flight failed too");
            }
        }
        // A planned switch starts the next session at once: hand the slot's green session lock
        // back now rather than when green notices the closed connection, which the next
        // session would meet as `SessionBusy`.
        if matches!(result, Ok(()) | Err(ApplyError::Switch(_)))
            && let Some(applier) = self.applier.take()
        {
            applier.release().await;
        }
        result
    }

    async fn stream(&mut self, mut rx: mpsc::Receiver<Vec<SourceEvent>>) -> Result<(), ApplyError> {
        loop {
            let deadline = self
                .batch_started
                .map(|s| tokio::time::Instant::from_std(s + self.limits.max_delay));
            let committable = self.complete_waiting();
            let inflight = &mut self.inflight;
            let event = tokio::select! {
                biased;
                // 1. Green finished the write in flight: publish it (acknowledges a committed
                //    batch to blue at once), and hand green what is ready.
                ended = Inflight::ended(inflight), if inflight.is_some() => {
                    self.settle_ended(ended).await?;
                    if committable {
                        self.commit_complete().await?;
                    }
                    continue;
                }
                // 2. A committed blue transaction must not wait longer than max_delay, however
                //    busy the stream: check the deadline before taking more input.
                _ = crate::shutdown::sleep_until(deadline), if committable => {
                    self.commit_complete().await?;
                    continue;
                }
                // 3. The stream.
                event = rx.recv() => event,
            };
            let Some(events) = event else { break };
            let mut events = events.into_iter().peekable();
            while let Some(event) = events.next() {
                self.handle(event).await?;
                // Group commit: while green writes the batch in flight, this one grows (up to
                // the limits); once green is free, whatever is complete goes.
                let idle = events.peek().is_none() && rx.is_empty() && self.inflight.is_none();
                if self.complete_waiting() && (idle || self.full()) {
                    self.commit_complete().await?;
                }
            }
        }
        if self.complete_waiting() {
            self.commit().await?;
        }
        self.held_back.clear();
        self.holding_back = false;
        if self.in_txn || !self.tally.is_empty() {
            self.tally = Tally::default();
            info!(
                "abandoning an incomplete blue transaction at shutdown; it will be streamed again"
            );
        }
        self.settle().await?;
        self.applier().rollback().await?;
        Ok(())
    }

    /// The applier; only valid when no chunk is in flight (see [`Self::settle`]).
    fn applier(&mut self) -> &mut Applier {
        self.applier
            .as_mut()
            .expect("no chunk in flight: callers settle first")
    }

    /// Green's connection, for catalog reads; only valid when no chunk is in flight.
    fn green(&self) -> &tokio_postgres::Client {
        self.applier
            .as_ref()
            .expect("no chunk in flight: callers settle first")
            .client()
    }

    fn full(&self) -> bool {
        self.batch.rows >= self.limits.max_rows || self.batch.bytes >= self.limits.max_bytes
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), ApplyError> {
        if self.holding_back {
            if matches!(
                event.msg,
                Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. }
            ) {
                return self.hold_back(event).await;
            }
            // Anything else (its Commit, a relation, a truncate) first takes the held-back
            // changes into the batch, in order: the transaction then joins the batch as before.
            self.release_held_back().await?;
        }
        let lsn = event.lsn;
        match event.msg {
            Message::Begin(b) => {
                self.hold_before(b.final_lsn).await?;
                // Complete transactions that have waited max_delay go before the next one
                // joins their green transaction: it may be large (a bulk job's), and would hold
                // them back until its end. Younger ones keep growing the group commit.
                if self.last_commit.is_some()
                    && self
                        .batch_started
                        .is_some_and(|s| s.elapsed() >= self.limits.max_delay)
                {
                    self.commit().await?;
                }
                self.begin(b);
                self.holding_back = self.last_commit.is_some()
                    && !self.skipping
                    && self.txn_final_lsn > self.serial_until;
            }
            Message::Commit(c) => self.end(c),
            Message::Relation(r) => self.relation(r).await?,
            Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } => {
                self.change(event.msg, lsn).await?
            }
            Message::Truncate { options, relations } if !self.skipping => {
                let mut maps = Vec::with_capacity(relations.len());
                for &oid in &relations {
                    if self.in_copy(oid) {
                        continue;
                    }
                    if let Some(map) = self.map(oid, lsn)? {
                        maps.push(map);
                    }
                }
                if !maps.is_empty() {
                    // Earlier changes of the batch first, in order, then the truncate.
                    self.flush(lsn).await?;
                    self.settle().await?;
                    self.applier()
                        .truncate(&maps, options & 2 != 0, lsn)
                        .await?;
                    for m in &maps {
                        *self
                            .tally
                            .written
                            .entry(m.label.clone())
                            .or_default()
                            .entry("truncate")
                            .or_default() += 1;
                    }
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                let schema = if namespace.is_empty() {
                    "pg_catalog".to_string()
                } else {
                    namespace
                };
                self.types
                    .insert(oid, transform::QualifiedName::new(schema, name).quoted());
            }
            Message::Message {
                transactional: true,
                prefix,
                ..
            } if prefix.as_ref() == DRAIN_MESSAGE_PREFIX.as_bytes() => self.drain_marker = true,
            // Right after Begin: the whole transaction is another shadowsync stream's write.
            Message::Origin { name, .. } if !self.skipping && self.origins.skips(&name) => {
                debug!(final_lsn = %self.txn_final_lsn, origin = %String::from_utf8_lossy(&name), "skipping a transaction written by another shadowsync stream");
                self.skipping = true;
                self.echo = true;
            }
            Message::Origin { .. } | Message::Message { .. } => {}
            // A truncate of a transaction green already has.
            Message::Truncate { .. } => {}
        }
        self.last_lsn = self.last_lsn.max(lsn);
        Ok(())
    }

    /// A row change of the transaction being received, into the batch.
    async fn change(&mut self, msg: Message, lsn: Lsn) -> Result<(), ApplyError> {
        match msg {
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. }
                if self.in_copy(relation) => {}
            Message::Insert { relation, new } if !self.skipping => {
                if let Some(map) = self.map_for_change(relation, lsn, &[Some(&new)])? {
                    self.batch.insert(&map, new, lsn)?;
                    self.after_change(lsn).await?;
                }
            }
            Message::Update { relation, old, new } if !self.skipping => {
                let old_image = old.as_ref().map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                });
                if let Some(map) = self.map_for_change(relation, lsn, &[old_image, Some(&new)])? {
                    if let Some(mv) = self.batch.update(&map, old, new, lsn)? {
                        self.flush(lsn).await?;
                        self.settle().await?;
                        self.applier().move_row(&mv).await?;
                    }
                    self.after_change(lsn).await?;
                }
            }
            Message::Delete { relation, old } if !self.skipping => {
                let old_image = match &old {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                };
                if let Some(map) = self.map_for_change(relation, lsn, &[Some(old_image)])? {
                    self.batch.delete(&map, old, lsn)?;
                    self.after_change(lsn).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Complete transactions wait in the batch, and may commit now: none is being received, or
    /// the one being received is held back.
    fn complete_waiting(&self) -> bool {
        self.last_commit.is_some() && (!self.in_txn || self.holding_back)
    }

    /// Commits the complete transactions (see [`Self::commit`]); the held-back changes of the
    /// transaction being received then go into the next batch.
    async fn commit_complete(&mut self) -> Result<(), ApplyError> {
        self.commit().await?;
        if self.holding_back {
            self.release_held_back().await?;
            self.batch_started = Some(Instant::now());
        }
        Ok(())
    }

    /// Holds a change back; a full buffer means a large transaction: the complete ones go first.
    async fn hold_back(&mut self, event: SourceEvent) -> Result<(), ApplyError> {
        self.last_lsn = self.last_lsn.max(event.lsn);
        self.held_back_bytes += held_back_size(&event.msg);
        self.held_back.push(event);
        if self.held_back.len() >= self.limits.max_rows
            || self.held_back_bytes >= self.limits.max_bytes
        {
            self.commit_complete().await?;
        }
        Ok(())
    }

    /// Ends holding back: the held-back changes go into the batch, in order.
    async fn release_held_back(&mut self) -> Result<(), ApplyError> {
        self.holding_back = false;
        self.held_back_bytes = 0;
        for event in std::mem::take(&mut self.held_back) {
            self.change(event.msg, event.lsn).await?;
        }
        Ok(())
    }

    /// Before a transaction committing at `final_lsn`: holds if a hold is due (see `hold`),
    /// with everything before it committed in green.
    async fn hold_before(&mut self, final_lsn: Lsn) -> Result<(), ApplyError> {
        if self.hold.is_none()
            && let Some(req) = self.shared.take_hold()
        {
            // Transactions received so far committed before the request was made; one of
            // them at or past an exact point means green is past it already.
            if req.exact && self.txn_final_lsn >= req.from {
                debug!(point = %req.from, received = %self.txn_final_lsn, "an exact hold came after the stream passed its point");
                crate::hold::refuse_passed(req);
            } else {
                self.hold = Some(Hold {
                    req,
                    target: None,
                    since: None,
                });
            }
        }
        let Some(h) = &self.hold else {
            return Ok(());
        };
        if final_lsn < h.target.unwrap_or(h.req.from) {
            return Ok(());
        }
        self.commit().await?;
        self.settle().await?;
        let mut h = self.hold.take().expect("checked above");
        let since = *h.since.get_or_insert_with(Instant::now);
        if h.target.is_none() {
            let Some(target) = crate::hold::wait_target(&mut h.req).await else {
                info!("a hold was given up by its asker; streaming goes on");
                return Ok(());
            };
            h.target = Some(target);
            if final_lsn < target {
                // Green is before the point: stream on to it.
                self.hold = Some(h);
                return Ok(());
            }
        }
        info!(final_lsn = %final_lsn, "holding before this blue transaction (a consistent point for verify)");
        crate::hold::hold(h.req, since).await;
        Ok(())
    }

    fn begin(&mut self, b: Begin) {
        self.drain_marker = false;
        self.echo = false;
        self.skipping = b.final_lsn < self.skip_before;
        self.txn_final_lsn = b.final_lsn;
        self.batch.begin_txn(b.final_lsn, b.commit_time);
        if self.skipping {
            debug!(final_lsn = %b.final_lsn, "skipping a transaction green already has");
        }
        self.in_txn = true;
        if self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
    }

    fn end(&mut self, c: Commit) {
        self.in_txn = false;
        if std::mem::take(&mut self.skipping) {
            if std::mem::take(&mut self.echo) {
                // Nothing to write, but its end is passed: it commits with the batch (alone, it
                // is published without a green transaction), so the slot moves past it.
                self.last_commit = Some(c);
                self.shared.echo_skipped();
            }
            return;
        }
        self.last_commit = Some(c);
        // A drain's own flush marker is no blue transaction of the users'.
        if !std::mem::take(&mut self.drain_marker) {
            self.txns += 1;
            // pgoutput sends no empty transaction (PostgreSQL 15): this one changed a
            // published table (a drain's report says when that happened after its target).
            self.shared.change_commit_received(c.end_lsn);
        }
    }

    /// A Relation message describes a table; it changes nothing by itself. A description that
    /// cannot be mapped (a leaf of a partitioned table published through its root, a table
    /// missing on green, a rule that no longer fits) is kept as the error it is, raised only
    /// if a change of that relation arrives: as PostgreSQL's own apply worker, which checks a
    /// relation when it has a row to apply to it.
    async fn relation(&mut self, r: Relation) -> Result<(), ApplyError> {
        let oid = r.oid;
        let table = format!("{}.{}", r.namespace, r.name);
        match self.map_relation(r).await {
            Err(ApplyError::Map(e)) => {
                // Routine for the leaves of a root published via the root (blue describes each
                // leaf after the root): not worth a warning until a change needs the mapping.
                debug!(table = %table, lsn = %self.last_lsn, error = %e,
                    "blue described a table that cannot be mapped now; a change to it would stop the pipeline with this error");
                self.maps.insert(oid, Mapped::Unmapped(e));
                Ok(())
            }
            other => other,
        }
    }

    async fn map_relation(&mut self, r: Relation) -> Result<(), ApplyError> {
        // The catalog is read on the applier's connection.
        self.settle().await?;
        let source = transform::QualifiedName::new(&r.namespace, &r.name);
        if let Some(&lsn) = self.copied_at.get(&source.to_string()) {
            self.copied_before.insert(r.oid, lsn);
        }
        let rule = self.rules.get(&source);
        if rule.is_some_and(|rule| rule.skip) {
            debug!(table = %source, "skipped by rule");
            self.maps.insert(r.oid, Mapped::Skipped);
            return Ok(());
        }
        let target = rule
            .and_then(|rule| rule.target.clone())
            .unwrap_or_else(|| source.clone());
        let catalog_err = |source| ApplyError::Green {
            context: "reading the catalog",
            failure: crate::failure::DbFailure::from_pg(&source),
        };
        let green = transform::catalog::green_table(self.green(), &target)
            .await
            .map_err(catalog_err)?
            .ok_or_else(|| transform::MapError::MissingTable {
                blue_table: source.to_string(),
                target: target.to_string(),
            })?;
        let map = match rule {
            None => transform::identity(&r, &green, &self.rules.conflicts)?,
            Some(rule) => {
                let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
                let user: Vec<Option<String>> =
                    oids.iter().map(|o| self.types.get(o).cloned()).collect();
                let types = transform::catalog::resolve_types(self.green(), &oids, &user)
                    .await
                    .map_err(catalog_err)?;
                // Builtin types are spelled alike on both sides; user types as blue named them.
                let blue_types = types
                    .iter()
                    .zip(&user)
                    .map(|(green, blue)| blue.clone().unwrap_or_else(|| green.clone()))
                    .collect();
                let table = transform::SourceTable::from_relation(&r, types, blue_types);
                if let Some(Mapped::Table(old)) = self.maps.get(&r.oid) {
                    dropped_column_check(old, &r, rule)?;
                }
                let map = transform::build(&table, Some(rule), &green, &self.rules.conflicts)?
                    .expect("skipped rules return above");
                // The rule meets this shape of the table for the first time in this session:
                // let green type-check it now, rather than fail on the first row.
                let problems = crate::validate::narrow_down(self.green(), &map, Some(rule))
                    .await
                    .map_err(catalog_err)?;
                if let Some(first) = problems.into_iter().next() {
                    return Err(transform::MapError::Rule {
                        origin: rule.origin.clone(),
                        message: format!(
                            "the rule no longer fits blue table {source} as the stream describes it at LSN {}: {first}; update the rule, then restart",
                            self.last_lsn
                        ),
                    }
                    .into());
                }
                map
            }
        };
        debug!(table = %map.label, oid = r.oid, "relation mapped");
        self.applier().remaps.update(map.clone());
        self.maps.insert(r.oid, Mapped::Table(map));
        let readers = self
            .maps
            .values()
            .filter_map(|m| match m {
                Mapped::Table(m) => Some(m),
                _ => None,
            })
            .filter(|m| !m.reads.is_empty())
            .cloned()
            .collect();
        self.batch.set_readers(readers);
        Ok(())
    }

    fn map(&self, oid: u32, lsn: Lsn) -> Result<Option<Arc<TableMap>>, ApplyError> {
        match self.maps.get(&oid) {
            Some(Mapped::Table(m)) => Ok(Some(m.clone())),
            Some(Mapped::Skipped) => Ok(None),
            Some(Mapped::Unmapped(e)) => Err(ApplyError::Unmapped {
                lsn,
                error: e.clone(),
            }),
            None => Err(ApplyError::UnknownRelation { oid, lsn }),
        }
    }

    /// The mapping for a row change of `tuples` (its old and new images). Pending changes of
    /// tables whose rules read this one precede it in blue's order, so they must not see it:
    /// the change opens a new segment of the batch, written after them, unless no pending
    /// reader looked up its key.
    fn map_for_change(
        &mut self,
        oid: u32,
        lsn: Lsn,
        tuples: &[Option<&crate::decode::Tuple>],
    ) -> Result<Option<Arc<TableMap>>, ApplyError> {
        let map = self.map(oid, lsn)?;
        if let Some(m) = &map
            && self.batch.affects_pending_reader(m, tuples)
        {
            self.batch.start_segment();
        }
        Ok(map)
    }

    async fn after_change(&mut self, lsn: Lsn) -> Result<(), ApplyError> {
        self.batch_rows += 1;
        // Inside a large blue transaction: write what we hold, keep the green transaction open.
        // Replaying a stretch green rejected coalesced: write each change on its own.
        if self.txn_final_lsn <= self.serial_until {
            self.flush(lsn).await?;
        } else if self.in_txn && self.full() {
            self.flush_in_background(lsn).await?;
        }
        Ok(())
    }
}

/// What a blue relation maps to.
enum Mapped {
    Table(Arc<TableMap>),
    /// A rule skips the table.
    Skipped,
    /// Its description cannot be mapped; raised when a change of it arrives.
    Unmapped(transform::MapError),
}

/// A column blue dropped that the rule still uses: stop with the column and the rule's place.
fn dropped_column_check(
    old: &TableMap,
    relation: &Relation,
    rule: &transform::rules::Rule,
) -> Result<(), ApplyError> {
    let dropped: Vec<String> = old
        .source_columns
        .iter()
        .filter(|c| !relation.columns.iter().any(|n| n.name == c.name))
        .map(|c| c.name.clone())
        .collect();
    for column in &dropped {
        let used = rule
            .columns
            .iter()
            .map(|(target, e)| (format!("column {target}"), e))
            .chain(rule.filter.iter().map(|f| ("the filter".to_string(), f)))
            .find(|(_, e)| {
                !transform::expr::inputs(&e.value, std::slice::from_ref(column)).is_empty()
            });
        if let Some((what, e)) = used {
            return Err(transform::MapError::Rule {
                origin: e.origin.clone(),
                message: format!(
                    "blue dropped column {column} of {}.{}, and {what} of the rule uses it: update the rule, then restart",
                    relation.namespace, relation.name
                ),
            }
            .into());
        }
    }
    Ok(())
}
