//! What the monitor (see `monitor`) publishes in [`Shared`]: stalls, whether both sides
//! answer, and its reading of the slot.
//!
//! Invariant: a stall stays declared until both sides answer again; readiness is false meanwhile.

use std::sync::atomic::Ordering;

use super::{Shared, SideLabels, Stall};

impl Shared {
    /// The monitor found `side` stalled (see `monitor`); the supervisor drops the session.
    pub fn stalled(&self, side: &'static str, why: &'static str) {
        let mut stall = self.stall.lock().expect("stall lock");
        if stall.as_ref().is_none_or(|s| s.side != side) {
            *stall = Some(Stall {
                side,
                why,
                since: std::time::Instant::now(),
            });
        }
        self.stall_flag.store(true, Ordering::Relaxed);
        self.stall_gauge
            .get_or_create(&SideLabels {
                side: side.to_string(),
            })
            .set(1);
    }

    /// Both sides answer the monitor again.
    pub fn answering(&self) {
        if self.stall_flag.swap(false, Ordering::Relaxed) {
            *self.stall.lock().expect("stall lock") = None;
            for side in ["blue", "green"] {
                self.stall_gauge
                    .get_or_create(&SideLabels {
                        side: side.to_string(),
                    })
                    .set(0);
            }
        }
    }

    /// The stall being reported, if any (an atomic load when there is none).
    pub fn stall(&self) -> Option<Stall> {
        if !self.stall_flag.load(Ordering::Relaxed) {
            return None;
        }
        self.stall.lock().expect("stall lock").clone()
    }

    /// Both sides answered the monitor's last question.
    pub fn both_answer(&self) -> bool {
        self.blue_connected.load(Ordering::Relaxed) && self.green_connected.load(Ordering::Relaxed)
    }

    /// The monitor's reading of the slot: lag as blue counts it, WAL retained, WAL still safe
    /// before blue would invalidate the slot (`None`: no limit or no slot).
    pub fn slot_observed(&self, lag: Option<u64>, retained: Option<i64>, safe: Option<i64>) {
        if let Some(lag) = lag {
            self.lag_seen.store(lag as i64, Ordering::Relaxed);
        }
        if let Some(bytes) = retained {
            self.set_slot_retained(bytes);
        }
        self.slot_safe_wal_bytes.set(safe.unwrap_or(-1));
    }
}
