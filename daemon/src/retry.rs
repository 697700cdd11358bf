//! Retry decisions: recoverable errors wait on a schedule (by default 1, 2,
//! 4, 8, 10 minutes, then every 30 minutes); non-recoverable ones go to
//! Critical at once. Decisions take the current time as an argument so they
//! are tested without waiting.

use std::time::{Duration, Instant};

/// How an error is to be handled: the wire's classification (`Recoverable`:
/// network, low disk, busy, retried on the schedule; `Fatal`:
/// authentication, broken sequence, invalid replica state, volume not
/// found, Critical with no retry), one for both roles and the peer.
pub use replica_proto::msg::ErrorClass;

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again at this instant.
    RetryAt(Instant),
    /// Stop and report Critical.
    Critical,
}

/// Attempt counter over a schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    schedule: Vec<Duration>,
    attempt: usize,
}

impl Backoff {
    /// A backoff over `schedule` (the last entry repeats). An empty schedule
    /// retries at once.
    pub fn new(schedule: Vec<Duration>) -> Self {
        Self {
            schedule,
            attempt: 0,
        }
    }

    /// From seconds.
    pub fn from_secs(secs: &[f64]) -> Self {
        Self::new(secs.iter().map(|s| Duration::from_secs_f64(*s)).collect())
    }

    /// Decides after a failure at `now`.
    pub fn on_failure(&mut self, class: ErrorClass, now: Instant) -> Decision {
        match class {
            ErrorClass::Fatal => Decision::Critical,
            ErrorClass::Recoverable => {
                let d = self
                    .schedule
                    .get(self.attempt)
                    .or(self.schedule.last())
                    .copied()
                    .unwrap_or(Duration::ZERO);
                self.attempt = self.attempt.saturating_add(1);
                Decision::RetryAt(now + d)
            }
        }
    }

    /// Replaces the schedule (after a configuration reload); the attempt
    /// count is kept.
    pub fn set_schedule_secs(&mut self, secs: &[f64]) {
        self.schedule = secs.iter().map(|s| Duration::from_secs_f64(*s)).collect();
    }

    /// A connection made progress: start the schedule over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> usize {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_is_1_2_4_8_10_then_30_minutes() {
        let cfg = crate::config::RetryConfig::default();
        let mut b = Backoff::from_secs(&cfg.schedule_secs);
        let t0 = Instant::now();
        let mins: Vec<u64> = (0..9)
            .map(|_| match b.on_failure(ErrorClass::Recoverable, t0) {
                Decision::RetryAt(t) => (t - t0).as_secs() / 60,
                Decision::Critical => panic!("recoverable went critical"),
            })
            .collect();
        assert_eq!(mins, vec![1, 2, 4, 8, 10, 30, 30, 30, 30]);
        b.reset();
        assert_eq!(
            b.on_failure(ErrorClass::Recoverable, t0),
            Decision::RetryAt(t0 + Duration::from_secs(60))
        );
    }

    #[test]
    fn fatal_errors_go_critical_at_once() {
        let mut b = Backoff::from_secs(&[1.0]);
        assert_eq!(
            b.on_failure(ErrorClass::Fatal, Instant::now()),
            Decision::Critical
        );
        assert_eq!(b.attempts(), 0);
    }
}
