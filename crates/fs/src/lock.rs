//! The lock of a daemon's state directory: one process at a time owns it.
//!
//! `replicad` holds an exclusive `flock` of `<state_dir>/replicad.lock` from
//! start-up until its process exits (after its last status is written), so
//! a second daemon with the same state directory is refused at once, a
//! tool that opens a replica without the daemon (`replctl point` when no
//! daemon answers) cannot race one starting, and `replctl unprotect` knows
//! when the daemon is really gone before it removes the directory. The
//! kernel releases the lock when the process ends, however it ends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::IoError;

/// The lock file's name in a state directory.
pub const LOCK_FILE: &str = "replicad.lock";

/// A held lock of a state directory (released on drop).
#[derive(Debug)]
pub struct DirLock {
    _held: Flock<File>,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` if no other process holds it (`Ok(None)`:
    /// one does).
    pub fn try_lock(dir: &Path) -> Result<Option<Self>, IoError> {
        let path = dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| IoError::new("open the state directory's lock", &path, e))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Some(Self { _held: held, path })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(IoError::new(
                "lock the state directory",
                &path,
                std::io::Error::from(e),
            )),
        }
    }

    /// Waits up to `timeout` for the lock of `dir` (`Ok(None)`: still
    /// held then).
    pub fn wait(dir: &Path, timeout: Duration) -> Result<Option<Self>, IoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = Self::try_lock(dir)? {
                return Ok(Some(l));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let d = tempfile::tempdir().expect("dir");
        let held = DirLock::try_lock(d.path()).expect("lock").expect("free");
        // flock locks belong to the open file: a second open is refused
        // even in the same process.
        assert!(DirLock::try_lock(d.path()).expect("try").is_none());
        assert!(DirLock::wait(d.path(), Duration::from_millis(50))
            .expect("wait")
            .is_none());
        drop(held);
        assert!(DirLock::wait(d.path(), Duration::from_secs(1))
            .expect("wait")
            .is_some());
    }
}
