//! A hold: the apply stage stopping for a moment at one exact blue commit boundary, so that
//! `verify` can take green's snapshot there while blue's snapshot is taken at the same point.
//!
//! The point `C` is known only once blue's snapshot exists (a temporary slot's consistent
//! point), and the stream must not pass it meanwhile. So a hold has two phases: it is asked
//! with a lower bound `from` (blue's WAL position read before the slot is made, `from <= C`),
//! at which the stage stops at the first transaction committing at or after `from`; once told
//! `C`, it goes on to the first transaction committing at or after `C`, and holds there with
//! green committed up to exactly the transactions committing before `C` (those blue's snapshot
//! sees), until released.
//!
//! Invariants: a hold never lasts longer than [`HOLD_MAX`] in each phase (a verify that died
//! cannot stall the stream); a dropped control releases at once; the stage holds only between
//! transactions, with nothing of the batch uncommitted.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::lsn::Lsn;

/// Longest the stage waits in each phase of a hold.
pub const HOLD_MAX: Duration = Duration::from_secs(30);

/// Why the stage did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An exact hold arrived after the stream had passed its point: take a new point.
    #[error("the stream had passed LSN {0} already")]
    Passed(Lsn),
    #[error("{0}")]
    Other(String),
}

/// The stage's side of a hold (see the module doc).
pub struct HoldRequest {
    pub from: Lsn,
    /// `from` is the exact point already (one phase): refused if the stream passed it.
    pub exact: bool,
    pub target: oneshot::Receiver<Lsn>,
    /// Answered once held at the target: how long the stage had been holding by then.
    pub held: oneshot::Sender<Result<Duration, Refusal>>,
    pub release: oneshot::Receiver<()>,
}

/// The asking side of a hold.
pub struct HoldControl {
    target: Option<oneshot::Sender<Lsn>>,
    held: Option<oneshot::Receiver<Result<Duration, Refusal>>>,
    release: Option<oneshot::Sender<()>>,
    held_at: Option<Instant>,
    /// How long the stage had held when it answered.
    held_before: Duration,
}

/// A hold at `from` (see the module doc): the request for the stage, the control for the asker.
/// `exact`: `from` is the point itself (no first phase); the stage refuses it with
/// [`Refusal::Passed`] when it has already received a transaction committing at or after it.
pub fn request(from: Lsn, exact: bool) -> (HoldRequest, HoldControl) {
    let (target_tx, target) = oneshot::channel();
    let (held, held_rx) = oneshot::channel();
    let (release_tx, release) = oneshot::channel();
    (
        HoldRequest {
            from,
            exact,
            target,
            held,
            release,
        },
        HoldControl {
            target: Some(target_tx),
            held: Some(held_rx),
            release: Some(release_tx),
            held_at: None,
            held_before: Duration::ZERO,
        },
    )
}

impl HoldControl {
    /// Tells the stage the exact point and waits until it holds there.
    pub async fn hold_at(&mut self, target: Lsn, timeout: Duration) -> Result<(), Refusal> {
        let ended =
            || Refusal::Other("the stream ended before the hold (it restarts: try again)".into());
        if let Some(t) = self.target.take() {
            // A stage that refused or dropped the hold closed this; its answer says which.
            let _ = t.send(target);
        }
        let held = self
            .held
            .take()
            .ok_or_else(|| Refusal::Other("the hold was already answered".into()))?;
        let answer = tokio::time::timeout(timeout, held)
            .await
            .map_err(|_| {
                Refusal::Other(format!(
                    "the stream did not reach LSN {target} within {timeout:?}"
                ))
            })?
            .map_err(|_| ended())?;
        self.held_before = answer?;
        self.held_at = Some(Instant::now());
        Ok(())
    }

    /// Lets the stage go on; returns how long it held in all.
    pub fn release(mut self) -> Duration {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
        self.held_before + self.held_at.map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// What a hold's phase 1 needs to know: the request, once the target arrives (None: the asker
/// gave up or took too long, and the hold is dropped).
pub async fn wait_target(req: &mut HoldRequest) -> Option<Lsn> {
    tokio::time::timeout(HOLD_MAX, &mut req.target)
        .await
        .ok()
        .and_then(Result::ok)
}

/// Refuses an exact hold whose point the stream has passed.
pub fn refuse_passed(req: HoldRequest) {
    let _ = req.held.send(Err(Refusal::Passed(req.from)));
}

/// Phase 2: held at the target; answers, then waits for the release (bounded).
pub async fn hold(req: HoldRequest, since: Instant) {
    let HoldRequest { held, release, .. } = req;
    if held.send(Ok(since.elapsed())).is_err() {
        return;
    }
    let _ = tokio::time::timeout(HOLD_MAX, release).await;
    tracing::info!(
        held_ms = since.elapsed().as_millis() as u64,
        "hold released: streaming goes on"
    );
}
