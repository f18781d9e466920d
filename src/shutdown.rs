//! The one stop signal every task listens to (after mini-redis' `Shutdown`): a [`Trigger`]
//! fires once, and every [`Shutdown`] subscribed to it sees it.
//!
//! Invariants: a stop is never missed (a listener subscribed after the trigger fired sees it at
//! once) and never undone; a trigger dropped without firing counts as fired, so a task whose
//! owner is gone stops rather than runs unsupervised. Waiting is cancel-safe, for `select!`.

use tokio::sync::watch;
use tokio::time::Instant;

/// The sending side: fires the stop.
#[derive(Debug, Clone)]
pub struct Trigger(watch::Sender<bool>);

/// A listener for the stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    fired: bool,
}

/// A new trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown { rx, fired: false })
}

impl Trigger {
    /// Fires the stop (again is harmless).
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A new listener; it sees a stop fired before it was made.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.0.subscribe(),
            fired: false,
        }
    }
}

impl Shutdown {
    /// Whether the stop fired (or its trigger is gone).
    pub fn is_shutdown(&self) -> bool {
        self.fired || *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Waits for the stop; returns at once once it fired. Cancel-safe.
    pub async fn recv(&mut self) {
        if !self.fired {
            // An error means the trigger was dropped: that is a stop too.
            let _ = self.rx.wait_for(|stop| *stop).await;
            self.fired = true;
        }
    }
}

/// Sleeps until `deadline`, or forever without one: a `select!` branch that may be disarmed.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_listener_sees_the_stop_even_late_ones() {
        let (trigger, mut early) = channel();
        assert!(!early.is_shutdown());
        trigger.fire();
        let mut late = trigger.subscribe();
        for s in [&mut early, &mut late] {
            tokio::time::timeout(Duration::from_secs(1), s.recv())
                .await
                .expect("the stop is seen");
            assert!(s.is_shutdown());
        }
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_a_stop() {
        let (trigger, mut listener) = channel();
        drop(trigger);
        assert!(listener.is_shutdown());
        tokio::time::timeout(Duration::from_secs(1), listener.recv())
            .await
            .expect("a dropped trigger ends the wait");
    }

    #[tokio::test]
    async fn waiting_is_cancel_safe() {
        let (trigger, mut listener) = channel();
        for _ in 0..3 {
            let waited = tokio::time::timeout(Duration::from_millis(10), listener.recv()).await;
            assert!(waited.is_err(), "no stop yet");
        }
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(1), listener.recv())
            .await
            .expect("the stop is seen after cancelled waits");
    }
}
