//! Replica health: a replica that fails a call is out of rotation at once. It is probed
//! every probe period (`--replica-probe-ms`) until it answers: an answer puts it back in
//! rotation at once, so a replica that restarted takes sessions again within a probe
//! period of being up. Meanwhile it becomes eligible again after an exponential backoff (on
//! probation: its next use tells, a failure doubling the backoff, up to a maximum); and when
//! every replica of a kind is out, a request still tries the one most likely to be up
//! ([`Health::failures`], [`Health::down_until`]) before it fails.
//!
//! The bookkeeping is done where every replica call passes
//! ([`crate::clients::Guarded`]), so routing ([`crate::routing::ReplicaSet::pin`]) only
//! asks [`Health::is_available`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Backoff of a failed replica: `base` after the first failure, doubled after each
/// failed retry, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Time out of rotation after the first failure.
    pub base: Duration,
    /// Longest time out of rotation.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Backoff {
    /// 0.5 s after the first failure, at most 30 s (the orchestrator's flag defaults too).
    pub const DEFAULT: Backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };

    /// The time out of rotation after `failures` consecutive failures (at least 1).
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Consecutive failures (0: healthy).
    failures: u32,
    /// Out of rotation until then.
    down_until: Option<Instant>,
}

/// One replica's health.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    /// Whether the replica may take calls at `now`: healthy, or its backoff is over.
    pub fn is_available(&self, now: Instant) -> bool {
        let s = self.state.lock().expect("health lock poisoned");
        s.down_until.is_none_or(|t| now >= t)
    }

    /// Whether the replica's backoff is over but no call has succeeded since it failed:
    /// time to probe it.
    pub fn on_probation(&self, now: Instant) -> bool {
        let s = self.state.lock().expect("health lock poisoned");
        s.failures > 0 && s.down_until.is_none_or(|t| now >= t)
    }

    /// Consecutive failures so far (0: healthy).
    pub fn failures(&self) -> u32 {
        self.state.lock().expect("health lock poisoned").failures
    }

    /// When the current backoff ends (`None`: healthy).
    pub fn down_until(&self) -> Option<Instant> {
        self.state.lock().expect("health lock poisoned").down_until
    }

    /// Records a failure at `now`: out of rotation for the backoff. A failure while the
    /// replica is already out of rotation (a call that started before) changes nothing.
    /// Returns the backoff when this failure took the replica out of rotation.
    pub fn mark_down(&self, backoff: &Backoff, now: Instant) -> Option<Duration> {
        let mut s = self.state.lock().expect("health lock poisoned");
        if s.down_until.is_some_and(|t| now < t) {
            return None;
        }
        s.failures = s.failures.saturating_add(1);
        let wait = backoff.after(s.failures);
        s.down_until = Some(now + wait);
        Some(wait)
    }

    /// Records a success: back in rotation. Returns whether the replica was failing.
    pub fn mark_up(&self) -> bool {
        let mut s = self.state.lock().expect("health lock poisoned");
        let was = s.failures > 0;
        *s = State::default();
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let b = Backoff {
            base: 100 * MS,
            max: 1000 * MS,
        };
        let waits: Vec<Duration> = (1..=6).map(|f| b.after(f)).collect();
        assert_eq!(
            waits,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.after(u32::MAX), 1000 * MS);
    }

    #[test]
    fn a_failed_replica_is_out_until_its_backoff_ends_and_a_success_restores_it() {
        let b = Backoff {
            base: 100 * MS,
            max: 1000 * MS,
        };
        let h = Health::default();
        let t0 = Instant::now();
        assert!(h.is_available(t0));
        assert_eq!(h.mark_down(&b, t0), Some(100 * MS));
        assert!(!h.is_available(t0));
        assert!(!h.is_available(t0 + 99 * MS));
        assert!(!h.on_probation(t0 + 99 * MS));
        // Failures of calls made before it went down do not extend the backoff.
        assert_eq!(h.mark_down(&b, t0 + 50 * MS), None);
        assert_eq!(h.failures(), 1);
        // Backoff over: eligible again; a failed retry doubles the backoff.
        assert!(h.is_available(t0 + 100 * MS));
        assert!(h.on_probation(t0 + 100 * MS));
        assert_eq!(h.mark_down(&b, t0 + 100 * MS), Some(200 * MS));
        assert!(!h.is_available(t0 + 299 * MS));
        assert!(h.is_available(t0 + 300 * MS));
        // A success puts it back for good.
        assert!(h.mark_up());
        assert!(!h.mark_up());
        assert_eq!(h.failures(), 0);
        assert!(h.is_available(t0));
        assert!(!h.on_probation(t0 + 400 * MS));
        assert_eq!(h.mark_down(&b, t0 + 400 * MS), Some(100 * MS));
    }
}
