//! Durable file helpers both roles and `replctl` use (state files, the
//! journal's and the spool's directories), the lock of a state directory,
//! and the OS error they report: what was being done, on which path, and
//! the error itself.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

mod lock;
pub use lock::{DirLock, LOCK_FILE};

/// An OS error with what was being done and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct IoError {
    /// What was being done.
    pub what: &'static str,
    /// On which file or directory.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// Wraps `source` with its context.
    pub fn new(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self {
            what,
            path: path.into(),
            source,
        }
    }

    /// The `map_err` for an operation `what` on `path`.
    pub fn with<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::new(what, path, source)
    }
}

/// Makes the entries of `dir` durable (a created, renamed or removed file).
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IoError::with("sync directory", dir))
}

/// Replaces `path` with `data` atomically and durably: written to a
/// temporary file beside it, synced, renamed over it, and the directory
/// synced. A reader sees the old content or the new, never part of either.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), IoError> {
    replace(path, data, 0o666)
}

/// [`write_atomic`] for a secret (a keyring): the file is created with mode
/// 0600, and never exists under either name with a wider one.
pub fn write_atomic_private(path: &Path, data: &[u8]) -> Result<(), IoError> {
    replace(path, data, 0o600)
}

/// Writes `data` to a new temporary file of mode `mode` (less the umask),
/// syncs it, renames it over `path` and syncs the directory.
fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), IoError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = path.with_extension("tmp");
    // A leftover of an interrupted write: created anew, so it takes `mode`.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new("write state", &tmp, e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(IoError::with("write state", &tmp))?;
    f.write_all(data)
        .map_err(IoError::with("write state", &tmp))?;
    f.sync_all().map_err(IoError::with("sync state", &tmp))?;
    std::fs::rename(&tmp, path).map_err(IoError::with("publish state", path))?;
    sync_dir(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_content_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").expect("first");
        write_atomic(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn errors_say_what_and_where() {
        let d = tempfile::tempdir().expect("tmp");
        let missing = d.path().join("no/such/dir/state.json");
        let e = write_atomic(&missing, b"x").expect_err("no directory");
        assert_eq!(e.what, "write state");
        assert_eq!(e.source.kind(), std::io::ErrorKind::NotFound);
        assert!(e.to_string().contains("no/such/dir/state.tmp"), "{e}");
        let e = sync_dir(&d.path().join("gone")).expect_err("no directory");
        assert_eq!(
            (e.what, e.path.clone()),
            ("sync directory", d.path().join("gone"))
        );
    }

    #[test]
    fn a_private_file_is_mode_0600_even_over_a_wider_leftover() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("keys.toml");
        // An interrupted earlier write left its temporary file, readable by all.
        std::fs::write(d.path().join("keys.tmp"), b"old").expect("leftover");
        std::fs::set_permissions(
            d.path().join("keys.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        write_atomic_private(&p, b"secret").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"secret");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.path().join("keys.tmp").exists());
    }
}
