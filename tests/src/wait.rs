//! Waiting for a condition, polling.

use std::time::{Duration, Instant};

/// Waits until `f` returns true, polling, or panics after `timeout` with
/// `what` and the last diagnostic `f` left in `why`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(2);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}
