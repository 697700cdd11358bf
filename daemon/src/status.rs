//! The status board: every volume's status (the types are the control
//! protocol's, [`replica_control::status`], re-exported here), written
//! atomically to `status.json` in the state directory (see [`StatusBoard`]
//! for when), so operators and tests can read it without talking to the
//! daemon.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use replica_control::status::{
    read, ChunkProgress, Connection, Health, Reason, ReasonKind, ReplicaState, Role, VerifyReport,
    VolumeStatus, STATUS_FILE,
};

/// How often counters (sequences, lag, bytes) reach `status.json` at most;
/// a change of state (connection, replica, health, reasons, resync) is
/// written at once.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// The status of all volumes of a daemon, published to a file.
///
/// Updates change the status in memory only (the data path updates it per
/// segment); one publisher thread writes `status.json` from a snapshot taken
/// under the lock and written outside it: at once after a change of state,
/// otherwise at most once per [`PUBLISH_INTERVAL`]. The control socket's
/// `status` answers from memory. The last status is written when the board
/// is dropped.
pub struct StatusBoard {
    shared: Arc<Board>,
    publisher: Option<JoinHandle<()>>,
}

struct Board {
    path: PathBuf,
    interval: Duration,
    state: Mutex<BoardState>,
    wake: Condvar,
    /// Files written (for tests and figures).
    written: AtomicU64,
    /// What the publisher wrote last: a snapshot equal to it is not
    /// written again.
    last: Mutex<Vec<u8>>,
}

struct BoardState {
    vols: Vec<VolumeStatus>,
    /// Changed since the last write.
    dirty: bool,
    /// A change of state: write now.
    urgent: bool,
    stop: bool,
}

/// The parts of a status whose change is written at once (a reason's kind
/// coming or going, not its text: a running resync's progress is a
/// counter). Taken before and after every update, on the data path: plain
/// values and one short string, not a copy of the whole status.
#[derive(PartialEq)]
struct State {
    dims: (Role, Connection, ReplicaState, Health),
    /// One bit per [`ReasonKind`] present.
    kinds: u32,
    flags: (bool, bool, bool),
    stream: (String, u64, u64),
}

impl State {
    fn of(s: &VolumeStatus) -> Self {
        Self {
            dims: (s.role, s.connection, s.replica, s.health),
            kinds: s.reasons.iter().fold(0, |m, r| m | 1u32 << (r.kind as u32)),
            flags: (s.needs_resync, s.resync_running, s.target_inconsistent),
            stream: (s.generation.clone(), s.epoch, s.generation_base),
        }
    }
}

impl StatusBoard {
    /// A board writing to `<dir>/status.json`.
    pub fn new(dir: &Path, vols: Vec<VolumeStatus>) -> Self {
        Self::with_interval(dir, vols, PUBLISH_INTERVAL)
    }

    /// A board whose counters are written at most once per `interval`.
    pub fn with_interval(dir: &Path, vols: Vec<VolumeStatus>, interval: Duration) -> Self {
        let shared = Arc::new(Board {
            path: dir.join(STATUS_FILE),
            interval,
            state: Mutex::new(BoardState {
                vols,
                dirty: false,
                urgent: false,
                stop: false,
            }),
            wake: Condvar::new(),
            written: AtomicU64::new(0),
            last: Mutex::new(Vec::new()),
        });
        shared.write(&shared.lock().vols.clone(), true);
        let s = shared.clone();
        let publisher = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || s.run())
            .map_err(|e| tracing::error!(error = %e, "cannot start the status publisher; status.json is written when the daemon stops"))
            .ok();
        Self { shared, publisher }
    }

    /// Updates one volume's status; the publisher writes it (at once if its
    /// state changed).
    pub fn update(&self, volume: &str, f: impl FnOnce(&mut VolumeStatus)) {
        let mut g = self.shared.lock();
        let Some(s) = g.vols.iter_mut().find(|s| s.volume == volume) else {
            return;
        };
        let before = State::of(s);
        f(s);
        // Whether counters changed too is the publisher's to find out (it
        // skips a snapshot equal to the last one written).
        let urgent = State::of(s) != before;
        g.dirty = true;
        g.urgent |= urgent;
        drop(g);
        if urgent {
            self.shared.wake.notify_one();
        }
    }

    /// A copy of every volume's status.
    pub fn all(&self) -> Vec<VolumeStatus> {
        self.shared.lock().vols.clone()
    }

    /// A copy of one volume's status.
    pub fn get(&self, volume: &str) -> Option<VolumeStatus> {
        self.shared
            .lock()
            .vols
            .iter()
            .find(|s| s.volume == volume)
            .cloned()
    }

    /// Writes the status now, whatever the timer says (a daemon that stops
    /// writes its last status before it returns, whoever still holds the
    /// board).
    pub fn flush(&self) {
        let snapshot = {
            let mut g = self.shared.lock();
            g.dirty = false;
            g.urgent = false;
            g.vols.clone()
        };
        self.shared.write(&snapshot, true);
    }

    /// How many times `status.json` was written successfully.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }
}

impl Drop for StatusBoard {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
        let last = self.shared.lock().vols.clone();
        self.shared.write(&last, true);
    }
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The publisher: waits for a change, writes a snapshot outside the lock.
    fn run(&self) {
        let mut last = Instant::now();
        let mut g = self.lock();
        loop {
            if g.stop {
                return;
            }
            let due = g.urgent || (g.dirty && last.elapsed() >= self.interval);
            if !due {
                let wait = if g.dirty {
                    self.interval.saturating_sub(last.elapsed())
                } else {
                    self.interval
                };
                g = self
                    .wake
                    .wait_timeout(g, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            g.dirty = false;
            g.urgent = false;
            let snapshot = g.vols.clone();
            drop(g);
            self.write(&snapshot, false);
            last = Instant::now();
            g = self.lock();
        }
    }

    /// Writes `vols` unless (`force` unset) the file holds them already.
    fn write(&self, vols: &[VolumeStatus], force: bool) {
        let json = serde_json::to_vec_pretty(vols).unwrap_or_default();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if !force && *last == json {
            return;
        }
        // Status is advisory and rebuilt at start: replace the file
        // atomically (readers never see a partial one) but skip the fsync.
        let tmp = self.path.with_extension("tmp");
        match std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, &self.path)) {
            Ok(()) => {
                self.written.fetch_add(1, Ordering::AcqRel);
                *last = json;
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn on_disk(dir: &Path) -> VolumeStatus {
        read(dir).expect("status.json").remove(0)
    }

    #[test]
    fn counters_wait_for_the_timer_and_a_change_of_state_is_written_at_once() {
        let d = tempfile::tempdir().expect("tempdir");
        // A timer that never fires within the test: only changes of state
        // may write.
        let board = StatusBoard::with_interval(
            d.path(),
            vec![VolumeStatus::new("v", Role::Primary)],
            Duration::from_secs(3600),
        );
        assert_eq!(board.written(), 1, "the initial status is written at once");
        for i in 1..=1000 {
            board.update("v", |s| {
                s.segments = i;
                s.durable_seq = i;
            });
        }
        assert_eq!(
            board.get("v").expect("v").segments,
            1000,
            "memory is current"
        );
        board.update("v", |s| s.health = Health::Warning);
        wait_until("the change of state on disk", || {
            read(d.path()).is_ok_and(|v| v[0].health == Health::Warning)
        });
        assert_eq!(
            board.written(),
            2,
            "1000 counter updates and one change of state: two writes in all"
        );
        let s = on_disk(d.path());
        assert_eq!(
            (s.segments, s.durable_seq),
            (1000, 1000),
            "the write carries the counters too"
        );
        board.update("v", |s| s.segments = 1001);
        drop(board);
        assert_eq!(
            on_disk(d.path()).segments,
            1001,
            "the last status is written when the board goes"
        );
    }

    #[test]
    fn the_publisher_does_not_write_what_the_file_holds_already() {
        let d = tempfile::tempdir().expect("tempdir");
        let board = StatusBoard::with_interval(
            d.path(),
            vec![VolumeStatus::new("v", Role::Primary)],
            Duration::from_secs(3600),
        );
        let same = board.all();
        board.shared.write(&same, false);
        assert_eq!(board.written(), 1, "equal to the initial write: skipped");
        board.update("v", |s| s.segments = 7);
        board.shared.write(&board.all(), false);
        assert_eq!(board.written(), 2, "a changed counter is written");
        assert_eq!(on_disk(d.path()).segments, 7);
        board.shared.write(&board.all(), true);
        assert_eq!(board.written(), 3, "a forced write always goes out");
    }

    #[test]
    fn counters_reach_the_file_within_the_interval() {
        let d = tempfile::tempdir().expect("tempdir");
        let board = StatusBoard::with_interval(
            d.path(),
            vec![VolumeStatus::new("v", Role::Secondary)],
            Duration::from_millis(50),
        );
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            n += 1;
            board.update("v", |s| s.applied_seq = n);
        }
        let written = board.written();
        let elapsed = started.elapsed();
        wait_until("the counter on disk", || {
            read(d.path()).is_ok_and(|v| v[0].applied_seq == n)
        });
        // At most one write per interval (plus the initial one and the one
        // in flight), however many updates.
        let bound = 2 + elapsed.as_millis() as u64 / 50 + 1;
        assert!(
            written <= bound,
            "{written} writes for {n} updates in {elapsed:?} (bound {bound})"
        );
        assert!(n > bound, "the loop updated more often than it wrote ({n})");
    }
}
